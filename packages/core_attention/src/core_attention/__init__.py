"""core_attention: the attention mechanisms shared by every attention-apps application.

Mechanisms only (as timm's ``layers``), no model architectures. Every entry point takes
``backend="auto" | "torch" | "triton"``; see :mod:`core_attention.backends`.
"""

from core_attention.backends import BackendUnavailableError
from core_attention.functional import attention

__all__ = ["BackendUnavailableError", "attention"]

__version__ = "0.1.0"
