"""The attention residual U-Net (Chae et al. 2021, arXiv 2101.09433; Oktay et al. 2018)."""

from attn_medical.models.config import AttentionResUNetConfig
from attn_medical.models.pretrained import CheckpointError, load_pretrained, save_pretrained
from attn_medical.models.res_unet import AttentionResUNet

__all__ = [
    "AttentionResUNet",
    "AttentionResUNetConfig",
    "CheckpointError",
    "load_pretrained",
    "save_pretrained",
]
