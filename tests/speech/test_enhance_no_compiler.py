"""MambAttention inference and training gradients where no C++ compiler is found: every
compiled kernel reports why and the network runs on PyTorch's ops, with the same result."""

from __future__ import annotations

import textwrap

import torch

from attn_speech.enhance.model import MambAttention
from attn_speech.enhance.stft import mag_pha_stft

TINY = {"channels": 8, "num_blocks": 1, "num_heads": 2, "d_state": 4, "expand": 2}


def test_enhance_without_a_compiler(tmp_path, without_compiler):
    torch.manual_seed(5)
    model = MambAttention(**TINY).eval()
    model.save_pretrained(tmp_path / "model")
    wav = torch.randn(1, 3000)
    torch.save(wav, tmp_path / "wav.pt")
    with torch.no_grad():
        want = model.enhance(wav)
    want_grads = training_grads(model, wav)
    script = textwrap.dedent(
        f"""
        import torch
        from core_attention import cpu_attention
        from attn_speech.enhance import norm_kernel, scan_kernel
        from attn_speech.enhance.model import MambAttention
        from attn_speech.enhance.stft import mag_pha_stft

        assert not (cpu_attention.available() or scan_kernel.available())
        assert not norm_kernel.available()
        assert "no-such-compiler" in scan_kernel.build_error()
        model = MambAttention.from_pretrained({str(tmp_path / "model")!r}).eval()
        with torch.no_grad():
            out = model.enhance(torch.load({str(tmp_path / "wav.pt")!r}))
        torch.save(out, {str(tmp_path / "out.pt")!r})
        mag, pha, _ = mag_pha_stft(torch.load({str(tmp_path / "wav.pt")!r}), model.stft)
        sum(o.square().mean() for o in model(mag, pha)).backward()
        torch.save([p.grad for p in model.parameters()], {str(tmp_path / "grads.pt")!r})
        """
    )
    without_compiler(script)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=1e-4, atol=1e-5)
    for got, grad in zip(torch.load(tmp_path / "grads.pt"), want_grads):
        torch.testing.assert_close(got, grad, rtol=1e-3, atol=1e-5)


def training_grads(model: MambAttention, wav: torch.Tensor) -> list[torch.Tensor]:
    """Parameter gradients of a squared-output loss (the scan's PyTorch loop without a
    compiler, its compiled backward with one)."""
    mag, pha, _ = mag_pha_stft(wav, model.stft)
    model.zero_grad()
    sum(o.square().mean() for o in model(mag, pha)).backward()
    return [p.grad.clone() for p in model.parameters()]
