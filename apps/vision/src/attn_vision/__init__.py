"""attn_vision: BiFormer and HaloNet image backbones on timm."""

__version__ = "0.1.0"
