"""Re-id losses shared by every model family: OIM and its focal and triplet-aided variants."""

from models.losses.oim import AVERAGE_OVER_MODES, AverageOver, OIMLoss
from models.losses.triplet import TRIPLET_MINING_MODES, TripletMining, lut_triplet_loss

__all__ = [
    "AVERAGE_OVER_MODES",
    "TRIPLET_MINING_MODES",
    "AverageOver",
    "OIMLoss",
    "TripletMining",
    "lut_triplet_loss",
]
