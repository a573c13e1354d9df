"""attn_video_gen: multi-condition video diffusion (UniVG) and DiT feature caching
(ProfilingDiT) on diffusers."""

__version__ = "0.1.0"
