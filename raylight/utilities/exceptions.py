"""``pytorch_lightning.utilities.exceptions``'s names."""

from raylight.shared.config import MisconfigurationException

__all__ = ["MisconfigurationException"]
