"""attn_speech: Speaker verification (ECAPA-TDNN) and speech enhancement (MambAttention)."""

__version__ = "0.1.0"
