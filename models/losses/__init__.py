"""Re-id losses shared by every model family: OIM and its focal and triplet-aided variants."""

from models.losses.oim import OIMLoss
from models.losses.triplet import TRIPLET_MINING_MODES, TripletMining, lut_triplet_loss

__all__ = ["TRIPLET_MINING_MODES", "OIMLoss", "TripletMining", "lut_triplet_loss"]
