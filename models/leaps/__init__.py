"""LEAPS (Dong et al., arXiv:2303.11859): Sparse R-CNN with a flexible re-id head and diverse re-id
sample matching. ``Leaps(config)`` builds the model; ``LeapsConfig`` validates its settings."""

from models.leaps.config import LeapsConfig
from models.leaps.model import Leaps

__all__ = ["Leaps", "LeapsConfig"]
