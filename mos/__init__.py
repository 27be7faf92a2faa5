"""mos: the Mixture-of-Sequence (MoS) layer for long-sequence CTR models, on the ops of `mos_kernels`.

    from mos import MoSConfig, MoSLayer
    out = MoSLayer(MoSConfig(dim=64, num_themes=8))(values, target, offsets)   # out.output: [B, 64]

`mos.routing` holds the router and routing unit the layer takes as parts (`MoSLayer(router=...)`).

`mos.boosting` trains a model around the layer with its backbone part exactly the backbone and
serves the MoS correction only where it beats the backbone on validation;
`mos.delong` compares two models' AUCs on the same examples. The CTR lab (models, baselines,
data, training, the profile and the `python -m mos` command line) is `mos.lab`, which this
package never imports.

The names below load on first use, so that `python -m mos --help` answers before torch is
imported; `from mos import MoSLayer` loads the layer and `mos_kernels`, nothing else.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module of this package that defines it.
_EXPORTS = {"MoSConfig": "config", "MoSLayer": "layer", "MoSOutput": "outputs",
            "RoutingInfo": "outputs"}
__all__ = sorted(_EXPORTS)
# Names this package exported before the CTR lab moved to mos.lab -> where they are now.
_MOVED = {"CTRModel": "mos.lab.model", "CTROutput": "mos.lab.model", "DataConfig": "mos.lab.data.config",
          "ModelConfig": "mos.lab.config", "MoSAblation": "mos.lab.config", "RunConfig": "mos.lab.config",
          "TrainConfig": "mos.lab.config"}

if TYPE_CHECKING:     # what type checkers and IDEs read; at run time __getattr__ below loads them
    from .config import MoSConfig
    from .layer import MoSLayer
    from .outputs import MoSOutput, RoutingInfo


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _MOVED:
            raise AttributeError(f"mos.{name} is part of the CTR lab now: from {_MOVED[name]} import {name}")
        raise AttributeError(f"module 'mos' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value       # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
