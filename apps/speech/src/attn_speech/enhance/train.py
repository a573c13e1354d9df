"""The training loss of MambAttention (Kühne et al. 2025): the MP-SENet losses (Lu et al.
2023), optionally with the metric discriminator (:mod:`attn_speech.enhance.discriminator`).

Batches are ``(clean, noisy)`` waveforms ``[B, samples]``.
"""

from __future__ import annotations

import torch

from attn_speech.enhance.discriminator import discriminator_loss, metric_loss, pesq_targets
from attn_speech.enhance.losses import LossWeights, enhancement_loss
from attn_speech.enhance.stft import mag_pha_istft, mag_pha_stft

__all__ = ["DISCRIMINATOR", "make_loss_fn", "si_sdr"]

DISCRIMINATOR = "discriminator"
"""The name of the metric discriminator among the trainer's auxiliary models."""


def make_loss_fn(stft, weights: LossWeights | None = None, *, metric_discriminator: bool = False):
    """``loss_fn(model, (clean, noisy))`` for :class:`attn_training.Trainer`; with
    ``metric_discriminator``, ``loss_fn(model, (clean, noisy), {"discriminator": D})``.

    Both signals are scaled by the noisy signal's RMS (MP-SENet's ``norm_factor``), so the
    loss sees the level the network is fed at inference.

    With the discriminator the returned loss is the generator's loss plus ``weights.metric``
    times its metric loss plus the discriminator's own loss: the two parts reach disjoint
    parameters (the enhanced spectrum is detached for D's loss, D is frozen for the
    generator's), so one backward pass gives each optimizer its gradients. Unlike MP-SENet,
    which updates D first, both networks step on the same batch at once.
    """

    weights = LossWeights() if weights is None else weights

    def generator(model, batch):
        clean, noisy = batch
        rms = noisy.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        clean, noisy = clean / rms, noisy / rms
        clean_spec = mag_pha_stft(clean, stft)
        mag, pha, _ = mag_pha_stft(noisy, stft)
        est = model(mag, pha)
        est_wav = mag_pha_istft(est[0], est[1], stft, length=clean.shape[1])
        total, terms = enhancement_loss(clean, est_wav, clean_spec, est, stft, weights)
        return total, terms, clean, est_wav, clean_spec[0], est[0]

    def loss_fn(model, batch):
        total, terms, *_ = generator(model, batch)
        return total, {name: value.detach() for name, value in terms.items()}

    def loss_fn_with_discriminator(model, batch, aux):
        disc = aux[DISCRIMINATOR]
        total, terms, clean, est_wav, clean_mag, est_mag = generator(model, batch)
        targets, valid = pesq_targets(clean, est_wav)
        terms["metric"] = metric_loss(disc, clean_mag, est_mag)
        terms["discriminator"] = discriminator_loss(disc, clean_mag, est_mag, targets, valid)
        terms["generator"] = total + weights.metric * terms["metric"]
        if bool(valid.any()):
            terms["pesq_norm"] = targets[valid].mean()
        values = {name: value.detach() for name, value in terms.items()}
        return terms["generator"] + terms["discriminator"], values

    return loss_fn_with_discriminator if metric_discriminator else loss_fn


def si_sdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al. 2019) of ``[..., samples]`` signals."""
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + eps) * ref
    noise = est - target
    return 10 * torch.log10(target.square().sum(-1) / (noise.square().sum(-1) + eps) + eps)
