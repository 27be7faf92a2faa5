"""Sample-level mixture-of-experts baselines around the same sequence encoder as MoS.

Each routes whole examples (not sessions) to E experts that all read the whole sequence:
`gshard` (top-2 softmax gating, load-balance loss), `dselect_k` (DSelect-k smooth-step binary
selectors), `expert_choice` (each expert takes its top-C examples of the batch). They share
`SampleMoE`: the gate representation, the expert layout and the combination of outputs.
"""
from .dselect_k import DSelectK
from .expert_choice import ExpertChoice
from .gshard import GShard
from .sample_moe import EncoderOutput, SampleMoE

__all__ = ["DSelectK", "EncoderOutput", "ExpertChoice", "GShard", "SampleMoE"]
