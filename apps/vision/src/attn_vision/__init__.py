"""attn_vision: BiFormer and HaloNet image backbones on timm.

Importing the package registers its models with timm, so ``timm.create_model`` builds them;
:func:`list_models` names them.
"""

from attn_vision.models import list_models

__all__ = ["list_models"]

__version__ = "0.1.0"
