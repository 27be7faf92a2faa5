"""The profile: FLOPs versus accuracy of MoS and its baselines, with paired statistics
(`study.profile`; the parts: `runs`, `paired`, `references`, `measures`, `tables`)."""
from .study import profile, quick_overrides

__all__ = ["profile", "quick_overrides"]
