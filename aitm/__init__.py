"""AITM and its baselines in PyTorch: models, losses, features, training, metrics, checkpoints."""

from aitm.model import AITM, AITMConfig

__all__ = ["AITM", "AITMConfig"]
