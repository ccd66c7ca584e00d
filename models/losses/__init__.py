"""Re-id losses shared by every model family: OIM and its focal and triplet-aided variants."""

from models.losses.oim import AVERAGE_OVER_MODES, AverageOver, OIMConfig, OIMLoss
from models.losses.triplet import TRIPLET_MINING_MODES, TripletMining, lut_triplet_loss

__all__ = [
    "AVERAGE_OVER_MODES",
    "TRIPLET_MINING_MODES",
    "AverageOver",
    "OIMConfig",
    "OIMLoss",
    "TripletMining",
    "lut_triplet_loss",
]
