"""mos: the Mixture-of-Sequence (MoS) layer for long-sequence CTR models, on the ops of `mos_kernels`.

    from mos import MoSConfig, MoSLayer
    out = MoSLayer(MoSConfig(dim=64, num_themes=8))(values, target, offsets)   # out.output: [B, 64]

`mos.boosting` trains a model around the layer so that it is never worse than its backbone;
`mos.delong` compares two models' AUCs on the same examples. The CTR lab (models, baselines,
data, training, the profile and the `python -m mos` command line) is `mos.lab`, which this
package never imports.
"""
from .config import MoSAblation, MoSConfig
from .layer import MoSLayer, MoSOutput, RoutingInfo

__all__ = ["MoSAblation", "MoSConfig", "MoSLayer", "MoSOutput", "RoutingInfo"]
