"""attn_medical: Attention residual U-Net segmentation in 2D and 3D."""

__version__ = "0.1.0"
