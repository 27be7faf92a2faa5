"""The whole layer on a kernel backend against the same layer on the reference: shared by the
fixed cases (tests/test_layer_backends.py) and the randomised ones (tests/test_layer_fuzz.py);
and the small batch and layer the tests of the layer's parts share."""
from __future__ import annotations

import torch

import mos_kernels as mk
from tests.kernel_cases import random_values
from tests.oracles import live_extras
from tests.tolerances import assert_close


def compare_with_reference(options: dict, lengths, backend: str, device, timestamps=None) -> None:
    """MoSLayer(dim=16, num_heads=2, num_themes=4, session_len=3, **options) on `backend`
    against the same weights on the reference (the zero-initialised correction made live), on
    random histories of `lengths` (and `timestamps` [T] for gap sessions): the output, the
    auxiliary loss, and the gradient of the inputs and of every parameter."""
    from mos import MoSConfig, MoSLayer
    from mos_kernels.backend import IMPLEMENTED

    assert all("triton" in IMPLEMENTED[op] for op in ("grouped_linear", "expert_target_attention",
                                                        "jagged_self_attention", "session_pool_route",
                                                        "theme_dispatch", "theme_gather"))
    config = dict(dim=16, num_heads=2, num_themes=4, session_len=3)
    config.update(options)
    torch.manual_seed(0)
    reference = live_extras(MoSLayer(MoSConfig(backend="reference", **config))).to(device)
    fused = MoSLayer(MoSConfig(backend=backend, **config)).to(device)
    fused.load_state_dict(reference.state_dict())
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    values = random_values(sum(lengths), 16, torch.float32, device)
    target = random_values(len(lengths), 16, torch.float32, device, seed=1)
    results = []
    for layer in (reference, fused):
        x, t = values.clone().requires_grad_(), target.clone().requires_grad_()
        out = layer(x, t, offsets, timestamps=timestamps)
        (out.output.square().sum() + out.aux_loss).backward()
        results.append((out, x.grad, t.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (ref, ref_x, ref_t, ref_params), (got, got_x, got_t, got_params) = results
    assert_close(got.output, ref.output, "layer")
    assert_close(got.aux_loss, ref.aux_loss, "layer")
    _same_gradient(got_x, ref_x, "values")
    _same_gradient(got_t, ref_t, "target")
    assert set(got_params) == set(ref_params)
    # A batch with tokens reaches every parameter; one without any (all histories empty) may
    # leave some unreached, on both backends alike.
    reached = sum(lengths) > 0
    for name, grad in ref_params.items():
        assert not reached or (grad is not None and got_params[name] is not None), f"{name} got no gradient"
        _same_gradient(got_params[name], grad, name)


def _same_gradient(got, want, name: str) -> None:
    """Equal gradients; none on both sides (an input the output does not reach) is equal too."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: a gradient on one backend only"
        return
    assert_close(got, want, "layer", msg=name)


# Four histories, one empty and one of a single event; d = 8.
SMALL_DIM = 8
SMALL_LENGTHS = [0, 7, 1, 12]


def small_batch(seed: int = 0):
    """(values [20, 8], target [4, 8], offsets [5]) of SMALL_LENGTHS, float32."""
    from tests.oracles import generator, offsets_of, randn
    gen = generator(seed)
    values = randn(gen, sum(SMALL_LENGTHS), SMALL_DIM, dtype=torch.float32)
    target = randn(gen, len(SMALL_LENGTHS), SMALL_DIM, dtype=torch.float32)
    return values, target, offsets_of(SMALL_LENGTHS)


def small_layer(**parts):
    """MoSLayer(dim=8, num_heads=2, num_themes=3, session_len=3, **parts), seeded."""
    from mos import MoSLayer
    torch.manual_seed(0)
    return MoSLayer(dim=SMALL_DIM, num_heads=2, num_themes=3, session_len=3, **parts)
