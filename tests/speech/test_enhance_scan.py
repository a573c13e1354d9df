"""Selective scan and Mamba against a float64 naive recurrence written here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attn_speech.enhance import scan_kernel
from attn_speech.enhance.mamba import BiMamba, Mamba
from attn_speech.enhance.selective_scan import BACKENDS, scan_chunked, selective_scan

needs_kernel = pytest.mark.skipif(
    not scan_kernel.available(), reason=f"no compiled scan kernel: {scan_kernel.build_error()}"
)
USABLE = [b for b in BACKENDS if b != "kernel" or scan_kernel.available()]


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Per-element recurrence over batch, channel, time and state, float64."""
    delta = F.softplus(delta + delta_bias[:, None])
    bsz, d, length = u.shape
    y = torch.zeros(bsz, d, length, dtype=torch.float64)
    for b in range(bsz):
        for c in range(d):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                h = torch.exp(delta[b, c, t] * A[c]) * h + delta[b, c, t] * B[b, :, t] * u[b, c, t]
                y[b, c, t] = (C[b, :, t] * h).sum() + D[c] * u[b, c, t]
    return y * z * torch.sigmoid(z)


def random_inputs(bsz, d, n, length, gen, requires_grad=False):
    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).detach()
        return t.requires_grad_(requires_grad)

    u, delta, z = r(bsz, d, length), r(bsz, d, length), r(bsz, d, length)
    A = (-torch.rand(d, n, generator=gen, dtype=torch.float64) * 4 - 0.1).requires_grad_(
        requires_grad
    )
    B, C = r(bsz, n, length), r(bsz, n, length)
    D, bias = r(d), r(d, scale=0.5)
    return u, delta, A, B, C, D, z, bias


@pytest.mark.parametrize("length", [1, 7, 33, 130])
def test_backends_match_naive_float64(length):
    gen = torch.Generator().manual_seed(length)
    args = random_inputs(2, 3, 5, length, gen)
    u, delta, A, B, C, D, z, bias = args
    want = naive_scan(*args)
    for backend in (*USABLE, "auto"):
        got = selective_scan(
            u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, backend=backend
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunk_sizes_agree(chunk):
    gen = torch.Generator().manual_seed(chunk)
    u, delta, A, B, C, *_ = random_inputs(2, 4, 6, 45, gen)
    delta = F.softplus(delta)
    ref = selective_scan(u, delta, A, B, C, backend="sequential")
    torch.testing.assert_close(scan_chunked(u, delta, A, B, C, chunk=chunk), ref)


def test_gradients_match():
    gen = torch.Generator().manual_seed(5)
    grads = []
    for backend in USABLE:
        gen.manual_seed(5)
        args = random_inputs(2, 3, 4, 77, gen, requires_grad=True)
        u, delta, A, B, C, D, z, bias = args
        y = selective_scan(
            u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, backend=backend
        )
        w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (y * w).sum().backward()
        grads.append([t.grad.clone() for t in args])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gradcheck_chunked():
    gen = torch.Generator().manual_seed(9)
    u, delta, A, B, C, *_ = random_inputs(1, 2, 3, 11, gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: scan_chunked(*a, chunk=4), (u, F.softplus(delta), A, B, C)
    )


def test_bad_inputs_named():
    u = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, u, torch.zeros(3, 4), torch.zeros(1, 4, 5), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="backend"):
        selective_scan(
            u, u, torch.zeros(2, 4), torch.zeros(1, 4, 5), torch.zeros(1, 4, 5), backend="x"
        )


def naive_mamba(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba forward written out with explicit loops (causal conv, per-step scan)."""
    bsz, length, _ = x.shape
    xz = x @ m.in_proj.weight.t()
    u, z = xz[..., : m.d_inner], xz[..., m.d_inner :]
    w, cb = m.conv1d.weight[:, 0], m.conv1d.bias
    k = w.shape[1]
    conv = torch.zeros_like(u)
    for t in range(length):
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                conv[:, t] += w[:, j] * u[:, s]
    u = F.silu(conv + cb)
    dbc = u @ m.x_proj.weight.t()
    dt, b, c = dbc.split([m.dt_rank, m.d_state, m.d_state], -1)
    delta = F.softplus(dt @ m.dt_proj.weight.t() + m.dt_proj.bias)
    A = -torch.exp(m.A_log)
    h = torch.zeros(bsz, m.d_inner, m.d_state, dtype=x.dtype)
    ys = []
    for t in range(length):
        h = (
            torch.exp(delta[:, t, :, None] * A) * h
            + (delta[:, t, :, None] * b[:, t, None, :]) * u[:, t, :, None]
        )
        ys.append((h * c[:, t, None, :]).sum(-1) + m.D * u[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ m.out_proj.weight.t()


def test_mamba_matches_naive():
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, d_conv=4, expand=4).double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), naive_mamba(m, x))


def test_bimamba_backward_direction_sees_the_future():
    torch.manual_seed(1)
    m = BiMamba(8, d_state=4, expand=2).double()
    x = torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True)
    m(x)[0, 0].sum().backward()
    assert x.grad[0, 1:].abs().sum() > 0  # frame 0 depends on later frames
    fwd = m.forward_mamba
    x2 = x.detach().clone().requires_grad_(True)
    fwd(x2)[0, 0].sum().backward()
    assert x2.grad[0, 1:].abs().sum() == 0  # the forward direction alone is causal
    assert m(x).shape == x.shape


def reference_tokens(u, delta_in, A, B, C, D, z, w, bias, reverse):
    """scan_tokens' definition through the sequential backend, ``[S, L, *]`` layout."""
    delta = F.softplus(delta_in @ w.t() + bias)
    flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)
    y = selective_scan(
        *(flip(t).transpose(1, 2) for t in (u, delta)),
        A,
        *(flip(t).transpose(1, 2) for t in (B, C)),
        D,
        z=flip(z).transpose(1, 2),
        backend="sequential",
    )
    return flip(y.transpose(1, 2))


@needs_kernel
@pytest.mark.parametrize("length", [1, 7, 130])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_scan_with_step_projection_float64(length, reverse):
    gen = torch.Generator().manual_seed(length)
    s, d, n, r = 3, 37, 5, 3  # 37 channels: two full blocks of 16 and a partial one
    xz = torch.randn(s, length, 2 * d, generator=gen, dtype=torch.float64)
    dbc = torch.randn(s, length, r + 2 * n, generator=gen, dtype=torch.float64)
    A = -torch.rand(d, n, generator=gen, dtype=torch.float64) * 4 - 0.1
    D, bias = (
        torch.randn(d, generator=gen, dtype=torch.float64),
        torch.randn(d, dtype=torch.float64),
    )
    w = torch.randn(d, r, generator=gen, dtype=torch.float64)
    u, z = xz[..., :d], xz[..., d:]  # strided views, as Mamba passes them
    b, c, low = dbc[..., r : r + n], dbc[..., r + n :], dbc[..., :r]
    got = scan_kernel.scan_tokens(
        u, low, A, b, c, D, z=z, dt_weight=w, dt_bias=bias, reverse=reverse
    )
    want = reference_tokens(u, low, A, b, c, D, z, w, bias, reverse)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # float32 (polynomial exp and log1p) to float32 rounding
    got32 = scan_kernel.scan_tokens(
        *(t.float() for t in (u, low, A, b, c, D)),
        z=z.float(),
        dt_weight=w.float(),
        dt_bias=bias.float(),
        reverse=reverse,
    )
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_conv_silu(reverse):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 40, generator=gen, dtype=torch.float64)[..., 3:24]  # strided
    w = torch.randn(21, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(21, generator=gen, dtype=torch.float64)
    seq = x.flip(1) if reverse else x
    want = F.silu(F.conv1d(seq.transpose(1, 2), w[:, None], bias, padding=3, groups=21)[..., :11])
    want = want.transpose(1, 2)
    torch.testing.assert_close(
        scan_kernel.conv_silu(x, w, bias, reverse), want.flip(1) if reverse else want
    )


@needs_kernel
def test_bimamba_kernel_path_matches_reference():
    """Inference on the kernels (tiled, reverse direction without flips) equals the
    sequential reference, in float64 and to float32 rounding in float32."""
    torch.manual_seed(2)
    m = BiMamba(6, d_state=5, d_conv=4, expand=3).double().eval()  # d_inner 18
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 23, 6, dtype=torch.float64)
    m.tile_tokens = 50  # two sequences per tile, the last tile short
    m32 = copy.deepcopy(m).float()
    with torch.no_grad():
        got = m(x)
        got32 = m32(x.float()).double()
        for mod in m.modules():
            if isinstance(mod, Mamba):
                mod.scan_backend = "sequential"
        want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got32, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_threads_give_the_same_result():
    gen = torch.Generator().manual_seed(6)
    s, length, d, n = 4, 64, 48, 16  # large enough to be split between threads
    u, low, z = (torch.randn(s, length, d, generator=gen) for _ in range(3))
    b, c = (torch.randn(s, length, n, generator=gen) for _ in range(2))
    A = -torch.rand(d, n, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = scan_kernel.scan_tokens(u, F.softplus(low), A, b, c, z=z)
            conv = scan_kernel.conv_silu(u.repeat(6, 1, 1), low[0, :4].t().contiguous(), None)
            results.append((y, conv))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def scan_grads(backend, args, weight, with_d, with_z, softplus):
    """Output and gradients of every input (D, z only when given) of one backend."""
    u, delta, A, B, C, D, z, bias = (t.detach().clone().requires_grad_(True) for t in args)
    y = selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D if with_d else None,
        z=z if with_z else None,
        delta_bias=bias,
        delta_softplus=softplus,
        backend=backend,
    )
    (y * weight).sum().backward()
    used = [u, delta, A, B, C, bias] + [D] * with_d + [z] * with_z
    return y.detach(), [t.grad for t in used]


@needs_kernel
@pytest.mark.parametrize("n", [5, 16])
@pytest.mark.parametrize(("with_d", "with_z"), [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("softplus", [True, False])
def test_kernel_gradients_match_sequential_float64(n, with_d, with_z, softplus):
    """The compiled backward against autograd through the step loop: 37 channels (two full
    blocks of 16 and a partial one), an odd length, three sequences."""
    gen = torch.Generator().manual_seed(n + 2 * with_d + 4 * with_z + 8 * softplus)
    args = list(random_inputs(3, 37, n, 29, gen))
    if not softplus:
        args[1] = args[1].abs() + 0.05  # a positive step size as given
    weight = torch.randn(3, 37, 29, generator=gen, dtype=torch.float64)
    want_y, want = scan_grads("sequential", args, weight, with_d, with_z, softplus)
    for backend in ("kernel", "auto"):
        got_y, got = scan_grads(backend, args, weight, with_d, with_z, softplus)
        torch.testing.assert_close(got_y, want_y, rtol=1e-10, atol=1e-10)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("n", [5, 16])
def test_kernel_gradients_float32_close_to_float64(n):
    gen = torch.Generator().manual_seed(20 + n)
    args = random_inputs(2, 21, n, 45, gen)
    weight = torch.randn(2, 21, 45, generator=gen, dtype=torch.float64)
    want_y, want = scan_grads("kernel", args, weight, True, True, True)
    got_y, got = scan_grads("kernel", [t.float() for t in args], weight.float(), True, True, True)
    torch.testing.assert_close(got_y.double(), want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        scale = w.abs().max()
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=0, atol=1e-5)


@needs_kernel
def test_kernel_gradcheck():
    gen = torch.Generator().manual_seed(11)
    u, delta, A, B, C, D, z, bias = random_inputs(2, 3, 2, 5, gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(
            *a[:5], a[5], z=a[6], delta_bias=a[7], delta_softplus=True, backend="kernel"
        ),
        (u, delta, A, B, C, D, z, bias),
    )


@needs_kernel
def test_training_uses_the_compiled_backward():
    """Mamba with gradients runs the compiled scan and its backward (no step loop), and its
    parameter gradients equal the sequential backend's."""
    torch.manual_seed(3)
    m = BiMamba(6, d_state=5, expand=3).double()
    ref = copy.deepcopy(m)
    for mod in ref.modules():
        if isinstance(mod, Mamba):
            mod.scan_backend = "sequential"
    x = torch.randn(2, 19, 6, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        m(x).square().sum().backward()
    names = {e.name for e in prof.events()}
    assert "selective_scan::scan_f64" in names
    assert "selective_scan::scan_grad_f64" in names
    ref(x).square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        tol = 1e-6 if name.endswith("A_log") else 1e-9  # Mamba forms A in float32
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol / 10, msg=name)
