"""One training step of MambAttention with the MP-SENet losses (no metric discriminator)."""

from __future__ import annotations

import torch

from attn_speech.enhance.losses import LossWeights, enhancement_loss
from attn_speech.enhance.stft import mag_pha_istft, mag_pha_stft

__all__ = ["make_loss_fn", "si_sdr"]


def make_loss_fn(stft, weights: LossWeights | None = None):
    """``loss_fn(model, (clean, noisy))`` for :class:`attn_training.Trainer`.

    Both signals are scaled by the noisy signal's RMS (MP-SENet's ``norm_factor``), so the
    loss sees the level the network is fed at inference.
    """

    weights = LossWeights() if weights is None else weights

    def loss_fn(model, batch):
        clean, noisy = batch
        rms = noisy.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        clean, noisy = clean / rms, noisy / rms
        clean_spec = mag_pha_stft(clean, stft)
        mag, pha, _ = mag_pha_stft(noisy, stft)
        est = model(mag, pha)
        est_wav = mag_pha_istft(est[0], est[1], stft, length=clean.shape[1])
        total, terms = enhancement_loss(clean, est_wav, clean_spec, est, stft, weights)
        return total, {name: value.detach() for name, value in terms.items()}

    return loss_fn


def si_sdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al. 2019) of ``[..., samples]`` signals."""
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + eps) * ref
    noise = est - target
    return 10 * torch.log10(target.square().sum(-1) / (noise.square().sum(-1) + eps) + eps)
