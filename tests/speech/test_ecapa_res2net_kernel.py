"""The compiled Res2Net kernel against float64 computations written from the definitions (odd
lengths, widths of one to five vectors, paddings of 1-4 frames, lengths shorter than the
padding, padded batches, column views of wider tensors, one and three threads), and FastEcapa
with the kernel against its PyTorch path, the reference EcapaTDNN, and a process where no
compiler is found."""

from __future__ import annotations

import textwrap

import pytest
import torch

from attn_speech.ecapa import conv_kernel, res2net_kernel
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.fast import FastEcapa
from attn_speech.ecapa.lengths import relative_from_frames
from attn_speech.ecapa.model import EcapaTDNN

pytestmark = pytest.mark.skipif(
    not res2net_kernel.available(),
    reason=f"no compiled Res2Net kernel: {res2net_kernel.build_error()}",
)


@pytest.fixture(autouse=True)
def _wide_registers(monkeypatch):
    """The kernels run on AVX2-only CPUs as well (FastEcapa takes them only with AVX-512)."""
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", True)


@pytest.fixture(params=[1, 3])
def threads(request, monkeypatch):
    """Threads the kernel runs on (the tiles shared out however small the problem)."""
    monkeypatch.setattr(res2net_kernel, "_SHARED_WORK", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _reflect(x: torch.Tensor, pad: int, frames: list[int] | None) -> torch.Tensor:
    """SpeechBrain's "same" reflection of ``x`` ``[B, T, W]`` row by row, from the definition
    (frame ``-t`` before the start, ``2 (last) - t`` past an item's last valid frame, the
    index clamped into the tensor)."""
    b, t, _ = x.shape
    out = []
    for i in range(b):
        last = max((frames[i] if frames is not None else t) - 1, 0)
        rows = []
        for q in range(t + 2 * pad):
            s = abs(q - pad)
            s = 2 * last - s if s > last else s
            rows.append(x[i, min(max(s, 0), t - 1)])
        out.append(torch.stack(rows))
    return torch.stack(out)


def _res2net_float64(u, weights, bias, scale, shift, a, dilation, frames):
    """The groups from the definition, in float64: group ``i``'s input is ``u``'s own columns
    (``i = 1``) or ``y_{i-1} + a u_i``, reflection padded, convolved, ReLU, BatchNorm."""
    u = u.double()
    out = u.clone()
    w = weights[0].shape[0]
    y = None
    for i, weight in enumerate(weights, start=1):
        cols = slice(i * w, (i + 1) * w)
        x = u[..., cols] if y is None else y + a.double()[cols] * u[..., cols]
        pad = dilation * (weight.shape[-1] - 1) // 2
        xp = _reflect(x, pad, frames).transpose(1, 2)
        r = torch.nn.functional.conv1d(xp, weight.double(), bias[i - 1].double(), dilation=dilation)
        y = scale[i - 1].double() * r.relu().transpose(1, 2) + shift[i - 1].double()
        out[..., cols] = y
    return out


CASES = [  # batch, T, width, groups, taps, dilation, valid frames per item (None: all T)
    (1, 37, 16, 3, 3, 2, None),
    (1, 50, 48, 3, 3, 3, None),
    (3, 23, 32, 3, 3, 4, None),
    (3, 29, 80, 2, 3, 2, [29, 11, 1]),
    (3, 9, 16, 3, 3, 4, [9, 3, 2]),
    (1, 3, 16, 3, 3, 4, None),  # T shorter than the padding: the reflection folds more than once
    (1, 1, 32, 2, 3, 2, None),
    (3, 4, 16, 3, 5, 1, [4, 2, 1]),
    (1, 61, 128, 7, 3, 2, None),  # ECAPA-TDNN C = 1024's groups (two panels each)
    (2, 13, 16, 1, 1, 1, [13, 5]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("b", "t", "w", "groups", "taps", "d", "frames"), CASES)
@pytest.mark.parametrize("view", [False, True])
def test_res2net_equals_float64_definition(threads, dtype, b, t, w, groups, taps, d, frames, view):
    g = torch.Generator().manual_seed(b * 1000 + t * 10 + w)
    c = (groups + 1) * w

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    if view:  # u: columns of a wider tensor, batch items not adjacent
        u = rand(2 * b, t, c + 9)[::2, :, 5 : 5 + c]
    else:
        u = rand(b, t, c)
    weights = [rand(w, w, taps, scale=(w * taps) ** -0.5) for _ in range(groups)]
    bias, scale, shift = rand(groups, w), rand(groups, w), rand(groups, w)
    a = rand(c)
    fr = None if frames is None else torch.tensor(frames)
    expected = _res2net_float64(u, weights, bias, scale, shift, a, d, frames)
    packed = res2net_kernel.pack_groups(weights, dtype)
    out = res2net_kernel.res2net(u, packed, bias, scale, shift, a, taps, d, fr)
    assert out is u
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}
    torch.testing.assert_close(u.double(), expected, **tol)


def test_wrong_arguments_are_refused(monkeypatch):
    w, groups = 16, 3
    u = torch.randn(2, 10, (groups + 1) * w)
    packed = res2net_kernel.pack_groups([torch.randn(w, w, 3)] * groups, torch.float32)
    v, a = torch.randn(groups, w), torch.randn((groups + 1) * w)

    def call(u=u, packed=packed, bias=v, taps=3, a=a, frames=None):
        res2net_kernel.res2net(u, packed, bias, v, v, a, taps, 2, frames)

    with pytest.raises(ValueError, match="unit stride"):
        call(u=u.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="do not split"):
        call(u=u[..., :-16])
    with pytest.raises(ValueError, match="do not split"):
        call(taps=1)
    with pytest.raises(ValueError, match="bias"):
        call(bias=v.double())
    with pytest.raises(ValueError, match="packed"):
        call(packed=packed.double())
    with pytest.raises(ValueError, match="frames"):
        call(frames=torch.tensor([10]))
    assert res2net_kernel.supports(u, w, 3)
    assert not res2net_kernel.supports(u.bfloat16(), w, 3)
    assert not res2net_kernel.supports(u, 20, 3)  # not whole vectors of 16
    monkeypatch.setattr(conv_kernel, "WIDE_REGISTERS", False)
    assert not res2net_kernel.supports(u, w, 3)  # 256-bit vectors: the PyTorch path


# groups of 16 and 32 channels (whole vectors: the kernel's); dilations 2, 3, 4 pad the
# groups by 2, 3, 4 frames
CONFIGS = [
    EcapaConfig(channels=(128, 128, 128, 128, 384), attention_channels=8, se_channels=8),
    EcapaConfig(channels=(256, 256, 256, 256, 768), attention_channels=8, se_channels=8),
]
# groups of 5 channels: the PyTorch path
ODD = EcapaConfig(channels=(40, 40, 40, 40, 120), attention_channels=8, se_channels=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("frames", [[157, 101, 3], [93], [40, 2]])
def test_fast_network_with_kernel_equals_pytorch_path_and_reference(
    monkeypatch, dtype, cfg, frames, random_batchnorm
):
    torch.manual_seed(len(frames) + cfg.channels[0])
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    model = model.to(dtype)
    fast = FastEcapa(model)
    t = max(frames)
    feats = torch.randn(len(frames), t, 80, dtype=dtype)
    lengths = relative_from_frames(torch.tensor(frames), t) if len(frames) > 1 else None
    calls = []
    run = res2net_kernel.res2net
    monkeypatch.setattr(res2net_kernel, "res2net", lambda *a: calls.append(1) or run(*a))
    got = fast(feats, lengths)
    assert len(calls) == 3  # one per block
    with monkeypatch.context() as m:
        m.setattr(res2net_kernel, "supports", lambda *a: False)
        pytorch = fast(feats, lengths)
    assert len(calls) == 3
    with torch.no_grad():
        expected = model(feats, lengths)
    tol = {"atol": 3e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(got, pytorch, **tol)
    torch.testing.assert_close(got, expected, **tol)
    if len(frames) > 1:  # each item alone, where the reference can reflect it
        for i, f in enumerate(frames):
            if f > cfg.dilations[-2] * (cfg.kernel_sizes[-2] - 1) // 2:
                torch.testing.assert_close(fast(feats[i : i + 1, :f]), got[i : i + 1], **tol)


def test_groups_of_partial_vectors_take_the_pytorch_path(monkeypatch, random_batchnorm):
    model = EcapaTDNN(ODD).eval()
    random_batchnorm(model)
    calls = []
    monkeypatch.setattr(res2net_kernel, "res2net", lambda *a: calls.append(1))
    feats = torch.randn(2, 40, 80)
    lengths = relative_from_frames(torch.tensor([40, 21]), 40)
    got = FastEcapa(model)(feats, lengths)
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(got, model(feats, lengths), atol=3e-5, rtol=1e-5)


def test_fast_network_without_a_compiler(tmp_path, random_batchnorm, without_compiler):
    """No compiler: the kernels report why and FastEcapa runs its PyTorch path, with the same
    embeddings."""
    cfg = CONFIGS[0]
    torch.manual_seed(3)
    model = EcapaTDNN(cfg).eval()
    random_batchnorm(model)
    feats = torch.randn(2, 61, 80)
    lengths = relative_from_frames(torch.tensor([61, 30]), 61)
    torch.save({"model": model, "feats": feats, "lengths": lengths}, tmp_path / "in.pt")
    want = FastEcapa(model)(feats, lengths)
    script = textwrap.dedent(
        f"""
        import torch
        from attn_speech.ecapa import conv_kernel, pooling_kernel, res2net_kernel, strassen_kernel
        from attn_speech.ecapa.fast import FastEcapa

        kernels = (conv_kernel, pooling_kernel, res2net_kernel, strassen_kernel)
        assert not any(kernel.available() for kernel in kernels)
        assert "no-such-compiler" in res2net_kernel.build_error()
        saved = torch.load({str(tmp_path / "in.pt")!r}, weights_only=False)
        out = FastEcapa(saved["model"])(saved["feats"], saved["lengths"])
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    without_compiler(script)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=3e-5, rtol=1e-5)
