"""mos: the Mixture-of-Sequence layer for long-sequence CTR models, its CTR model, data and training."""
from .config import DataConfig, ModelConfig, MoSAblation, MoSConfig, RunConfig, TrainConfig
from .layer import MoSLayer, MoSOutput, RoutingInfo
from .model import CTRModel, CTROutput

__all__ = ["CTRModel", "CTROutput", "DataConfig", "ModelConfig", "MoSAblation", "MoSConfig", "MoSLayer", "MoSOutput",
           "RoutingInfo", "RunConfig", "TrainConfig"]
