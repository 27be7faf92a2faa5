"""Inputs shared by the bad- and unusual-input tests (tests/ops/test_<op>_inputs.py; the layer's
in tests/test_layer_inputs.py, the config's in tests/test_config.py).

Bad input fails at once, naming the argument the caller passed. Messages start with the
argument's name ("offsets: expected ..."), so every match is anchored at the start: an error
about an internal tensor (say "session_offsets" when the caller passed "offsets") does not count.
"""
from __future__ import annotations

import torch

import mos_kernels as mk

DIM = 4     # the width of the bad-input cases


def named(name: str) -> str:
    """A match pattern: the message starts with `name`, as a whole word."""
    return rf"^{name}(?![\w.])"


def with_value_at(t, index, value):
    """A copy of t with t[index] = value."""
    t = t.clone()
    t[index] = value
    return t


# ---- the routing ops on good small arguments, any of them replaced ---------------------------

def call_theme_route(pooled=None, prototypes=None, **kw):
    pooled = torch.randn(4, DIM) if pooled is None else pooled
    prototypes = torch.randn(3, DIM) if prototypes is None else prototypes
    return mk.theme_route(pooled, prototypes, **kw)


def call_session_pool_route(values=None, session_offsets=None, prototypes=None, **kw):
    values = torch.randn(5, DIM) if values is None else values
    session_offsets = torch.tensor([0, 2, 5]) if session_offsets is None else session_offsets
    prototypes = torch.randn(3, DIM) if prototypes is None else prototypes
    return mk.session_pool_route(values, session_offsets, prototypes, **kw)
