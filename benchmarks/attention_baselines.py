"""The attention baselines MoS is timed against, outside mos_kernels: they are not ours.

  sdpa_padded     causal SDPA on jagged segments padded to the longest (the padding copies included)
  flex            compiled FlexAttention with a causal document mask on the jagged layout itself
  varlen_attn     torch's varlen flash attention over the jagged layout (no padding), where the
                  installed torch has `torch.nn.attention.varlen` (CUDA only)
  DenseTransformerLayer  one pre-LN causal transformer layer (SDPA) over padded sequences

Every function takes rows [N, d] split into `num_heads` heads and returns [N, d].
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.jagged import positions_in_segment, segment_ids


def sdpa_padded(q, k, v, offsets, max_len: int, num_heads: int):
    """Causal SDPA on every segment padded to max_len (right padding: a real row never sees a
    padded key under the causal mask), back to the jagged rows."""
    num_segments, dim = offsets.numel() - 1, q.shape[1]

    def heads(x):
        padded = mk.jagged_to_padded(x, offsets, max_len)
        return padded.view(num_segments, max_len, num_heads, dim // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    out = out.transpose(1, 2).reshape(num_segments, max_len, dim)
    return out[segment_ids(offsets, q.shape[0], check=False), positions_in_segment(offsets, q.shape[0], check=False)]


_compiled_flex = None


def flex(q, k, v, block_mask, num_heads: int):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    def heads(x):                                                 # [T, d] -> [1, H, T, dh]
        return x.view(1, x.shape[0], num_heads, -1).transpose(1, 2)

    out = _compiled_flex(heads(q), heads(k), heads(v), block_mask=block_mask)
    return out.transpose(1, 2).reshape(q.shape)


def document_mask(offsets, num_rows, device):
    from torch.nn.attention.flex_attention import create_block_mask
    document = segment_ids(offsets, num_rows, check=False)

    def causal_document(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    # Compiled, the mask is evaluated block by block; eager would materialise all T x T entries.
    return create_block_mask(causal_document, 1, 1, num_rows, num_rows, device=device, _compile=True)


def causal_keywords(function) -> dict:
    """The keyword that makes `varlen_attn` causal: torch 2.10-2.11 take is_causal=True, later
    releases window_size=(-1, 0) (no left limit, no key after the query)."""
    parameters = inspect.signature(function).parameters
    if "window_size" in parameters:
        return {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return {"is_causal": True}
    raise TypeError(f"varlen_attn: expected an is_causal or window_size parameter, got ({', '.join(parameters)})")


def varlen_reason() -> str | None:
    """None when torch has varlen attention, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def varlen(q, k, v, offsets, max_len: int, num_heads: int):
    """Causal varlen flash attention over every segment of the jagged rows."""
    reason = varlen_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from torch.nn.attention.varlen import varlen_attn
    cumulative = offsets.to(torch.int32)

    def heads(x):
        return x.view(x.shape[0], num_heads, -1)

    out = varlen_attn(heads(q), heads(k), heads(v), cumulative, cumulative, max_len, max_len,
                      **causal_keywords(varlen_attn))
    return out.reshape(q.shape)


class DenseTransformerLayer(nn.Module):
    """One pre-LN causal transformer layer (the block of the MoS experts) over padded sequences."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        examples, length, dim = x.shape
        q, k, v = (t.view(examples, length, self.num_heads, -1).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(dim, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(attn)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
