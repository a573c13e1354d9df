"""Model architectures, registered with timm when imported (timm's ``models`` idiom)."""

from attn_vision.models import biformer, halonet
from attn_vision.models._registry import list_models

__all__ = ["biformer", "halonet", "list_models"]
