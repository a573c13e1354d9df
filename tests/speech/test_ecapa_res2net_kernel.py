"""The compiled Res2Net glue kernel against float64 computations written from the definitions
(odd widths and lengths, paddings of 2-4 frames, lengths shorter than the padding, padded
batches, column views of wider tensors), and FastEcapa with the kernel against its PyTorch
path, the reference EcapaTDNN, and a process where no compiler is found."""

from __future__ import annotations

import textwrap

import pytest
import torch

from attn_speech.ecapa import res2net_kernel
from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.fast import FastEcapa
from attn_speech.ecapa.lengths import relative_from_frames
from attn_speech.ecapa.model import EcapaTDNN
from attn_speech.ecapa.time_conv import pad_time, reflect_edges

pytestmark = pytest.mark.skipif(
    not res2net_kernel.available(),
    reason=f"no compiled Res2Net kernel: {res2net_kernel.build_error()}",
)

TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}


def _group_step(u, col, r, scale, shift, a, buf, frames=None, next_input=True):
    """One group's glue: :meth:`Res2NetGlue.step` on a glue of its own."""
    res2net_kernel.Res2NetGlue(u, buf, a, frames).step(col, r, scale, shift, next_input)


def _pad_input(u, col, buf, frames=None):
    """The first group's input: :meth:`Res2NetGlue.pad_input` on a glue of its own."""
    res2net_kernel.Res2NetGlue(u, buf, u.new_ones(u.shape[-1]), frames).pad_input(col)


@pytest.fixture(params=[1, 3])
def threads(request, monkeypatch):
    """Threads the kernel runs on (the rows shared out however small the problem)."""
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


CASES = [  # batch, T, width, pad, valid frames per item (None: all T)
    (1, 37, 16, 2, None),
    (1, 50, 21, 3, None),
    (3, 23, 5, 4, None),
    (3, 29, 35, 2, [29, 11, 1]),
    (3, 9, 7, 4, [9, 3, 2]),
    (1, 3, 13, 4, None),  # T shorter than the padding: the reflection folds more than once
    (1, 1, 3, 2, None),
    (3, 4, 17, 3, [4, 2, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("b", "t", "w", "pad", "frames"), CASES)
@pytest.mark.parametrize("view", [False, True])
def test_group_step_equals_float64_definition(threads, dtype, b, t, w, pad, frames, view):
    g = torch.Generator().manual_seed(b * 1000 + t * 10 + w)
    groups = 4
    c = groups * w
    if view:  # u: columns of a wider tensor, batch items not adjacent
        wide = torch.randn(2 * b, t, c + 9, generator=g, dtype=torch.float64).to(dtype)
        u = wide[::2, :, 5 : 5 + c]
    else:
        u = torch.randn(b, t, c, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(b, t, w, generator=g, dtype=torch.float64).to(dtype)
    scale, shift = (torch.randn(w, generator=g, dtype=torch.float64).to(dtype) for _ in "ab")
    a = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    fr = None if frames is None else torch.tensor(frames)
    before = u.double().clone()
    buf = torch.full((b, t + 2 * pad, w), float("nan"), dtype=dtype)
    col, nxt = w, slice(2 * w, 3 * w)

    _group_step(u, col, r, scale, shift, a, buf, fr)

    y = scale.double() * r.double() + shift.double()
    expected_u = before.clone()
    expected_u[..., col : col + w] = y
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(u.double(), expected_u, rtol=rtol, atol=atol)
    inner = y + a[nxt].double() * before[..., nxt]
    expected = _reflect(inner, pad, frames)
    torch.testing.assert_close(buf.double(), expected, rtol=rtol, atol=atol)
    # what the PyTorch path pads (pad_time per item, reflect_edges on a full batch)
    torch.testing.assert_close(buf.double(), pad_time(inner, pad, fr), rtol=rtol, atol=atol)
    if frames is None:
        full = torch.full_like(expected, float("nan"))
        full[:, pad : pad + t] = inner
        torch.testing.assert_close(buf.double(), reflect_edges(full, pad), rtol=rtol, atol=atol)

    # the last group: its output only, buf untouched
    buf.fill_(float("nan"))
    res2net_kernel.Res2NetGlue(u, buf, a, fr).step(3 * w, r, scale, shift, next_input=False)
    expected_u[..., 3 * w :] = y
    torch.testing.assert_close(u.double(), expected_u, rtol=rtol, atol=atol)
    assert buf.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("b", "t", "w", "pad", "frames"), CASES)
def test_pad_input_equals_pad_time(threads, dtype, b, t, w, pad, frames):
    g = torch.Generator().manual_seed(t + w)
    u = torch.randn(b, t, 3 * w + 2, generator=g, dtype=torch.float64).to(dtype)[..., 1:-1]
    fr = None if frames is None else torch.tensor(frames)
    buf = torch.full((b, t + 2 * pad, w), float("nan"), dtype=dtype)
    _pad_input(u, w, buf, fr)
    x = u[..., w : 2 * w]
    torch.testing.assert_close(buf, pad_time(x, pad, fr), rtol=0, atol=0)
    torch.testing.assert_close(buf.double(), _reflect(x.double(), pad, frames), rtol=0, atol=0)


def test_wrong_arguments_are_refused():
    u, r = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
    buf, a, s = torch.empty(2, 14, 8), torch.randn(32), torch.randn(8)
    with pytest.raises(ValueError, match="columns"):
        _group_step(u, 24, r, s, s, a, buf)  # the next group's would be past C
    with pytest.raises(ValueError, match="r must be"):
        _group_step(u, 8, r[:, :9], s, s, a, buf)
    with pytest.raises(ValueError, match="buf"):
        _group_step(u, 8, r, s, s, a, torch.empty(2, 13, 8))
    with pytest.raises(ValueError, match="scale"):
        _group_step(u, 8, r, s.double(), s, a, buf)
    with pytest.raises(ValueError, match="unit stride"):
        _group_step(u.transpose(1, 2).contiguous().transpose(1, 2), 8, r, s, s, a, buf)
    assert not res2net_kernel.supports(u.bfloat16())


# widths 5 and 6 (not multiples of 16); dilations 2, 3, 4 pad the groups by 2, 3, 4 frames
CONFIGS = [
    EcapaConfig(channels=(40, 40, 40, 40, 120), attention_channels=8, se_channels=8),
    EcapaConfig(channels=(48, 48, 48, 48, 144), attention_channels=8, se_channels=8),
]


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
    step = res2net_kernel.Res2NetGlue.step
    monkeypatch.setattr(
        res2net_kernel.Res2NetGlue, "step", lambda *a, **k: calls.append(1) or step(*a, **k)
    )
    got = fast(feats, lengths)
    assert len(calls) == 3 * 7  # three blocks of seven groups
    with monkeypatch.context() as m:
        m.setattr(res2net_kernel, "supports", lambda u: False)
        pytorch = fast(feats, lengths)
    assert len(calls) == 3 * 7
    with torch.no_grad():
        expected = model(feats, lengths)
    tol = {"atol": 3e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(got, pytorch, **tol)
    torch.testing.assert_close(got, expected, **tol)
    if len(frames) > 1:  # each item alone, where the reference can reflect it
        for i, f in enumerate(frames):
            if f > cfg.dilations[-2] * (cfg.kernel_sizes[-2] - 1) // 2:
                torch.testing.assert_close(fast(feats[i : i + 1, :f]), got[i : i + 1], **tol)


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
        from attn_speech.ecapa import conv_kernel, pooling_kernel, res2net_kernel
        from attn_speech.ecapa.fast import FastEcapa

        kernels = (conv_kernel, pooling_kernel, res2net_kernel)
        assert not any(kernel.available() for kernel in kernels)
        assert "no-such-compiler" in res2net_kernel.build_error()
        saved = torch.load({str(tmp_path / "in.pt")!r}, weights_only=False)
        out = FastEcapa(saved["model"])(saved["feats"], saved["lengths"])
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    without_compiler(script)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=3e-5, rtol=1e-5)
