"""FlashAttention-2 Triton kernels (attention_kernels.flash_attention) vs a float64 reference.

CPU tests run the real kernels under the Triton interpreter: the ``interpreter`` fixture sets
``TRITON_INTERPRET=1`` for the test only (the kernels are built per mode at launch, so the
order in which other tests imported ``core_attention`` or Triton does not matter) and
``ATTENTION_KERNELS_POISON=1`` so every output and gradient buffer starts NaN-filled.
Tests marked ``gpu`` run the compiled kernels on CUDA at realistic sizes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

# Imported here, before any test sets TRITON_INTERPRET, as in a whole-suite run where other
# tests import Triton first: the interpreted kernels must not depend on the import-time mode.
import triton  # noqa: F401

from attention_kernels import available_kernels
from attention_kernels import flash_attention as fa
from core_attention import BackendUnavailableError, attention
from core_attention.functional import triton_unsupported_reason

pytestmark = [
    # The interpreter turns 1-element program ids into Python ints for range(): NumPy warns.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(fa.POISON_ENV, "1")
    monkeypatch.delenv("CORE_ATTENTION_BACKEND", raising=False)


@pytest.fixture
def compiled(monkeypatch):
    """Compiled kernels on CUDA with the first config of each list (one compile per variant
    instead of autotuning; test_gpu_every_config covers the other configs)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(fa.POISON_ENV, "1")
    monkeypatch.setenv(fa.CONFIG_ENV, "0")
    monkeypatch.delenv("CORE_ATTENTION_BACKEND", raising=False)


def reference(q, k, v, *, causal=False, scale=None, key_lengths=None):
    """float64 ``(out, lse)`` of softmax(q k^T * scale) v, masks built as explicit index tests.

    Causal is top-left aligned (key j visible to query i iff j <= i); a row with no visible
    key gives out = 0 and lse = -inf, and contributes no gradient.
    """
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    group = h // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    allowed = torch.ones(b, 1, nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (j <= i)
    if key_lengths is not None:
        allowed = allowed & (j < key_lengths.to(q.device)[:, None, None, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach().nan_to_num(neginf=0.0)
    e = torch.exp(scores - row_max)
    denom = e.sum(-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bhjd->bhid", e / safe, v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def make_inputs(b, h, h_kv, nq, nk, d, dv=None, dtype=torch.float32):
    q = torch.randn(b, h, nq, d, dtype=dtype)
    k = torch.randn(b, h_kv, nk, d, dtype=dtype)
    v = torch.randn(b, h_kv, nk, dv or d, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, *, causal, scale=None, key_lengths=None, tol, fn=None):
    """Output and dq/dk/dv of ``fn`` (default: core_attention.attention with backend="triton")
    against the float64 reference; every element must be finite (outputs start as NaN)."""
    if fn is None:

        def fn(q, k, v):
            return attention(
                q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, backend="triton"
            )

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, causal=causal, scale=scale, key_lengths=key_lengths)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.to(torch.float64))

    outputs = (t.detach() for t in (out, *grads))
    for name, got, want in zip(("out", "dq", "dk", "dv"), outputs, (ref.detach(), *ref_grads)):
        assert got.shape == want.shape, name
        assert got.dtype == q.dtype, name
        assert torch.isfinite(got).all(), f"{name} has unwritten (NaN) or non-finite elements"
        # A reference that is exactly zero (e.g. dq with a single admissible key, where
        # dS = P (dP - rowsum(dO * O)) cancels) is compared relative to dO instead.
        scale_ref = want if want.norm() > 0 else dout
        err = float((got.double() - want).norm() / scale_ref.double().norm())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_dense_attention_is_registered():
    assert "dense_attention" in available_kernels()


# Every combination of the four flags, at lengths 1, 17 and 129. With nq != nk the key
# length is OTHER_LENGTH[length], so both Nq < Nk and Nq > Nk occur.
LENGTHS = (1, 17, 129)
OTHER_LENGTH = {1: 17, 17: 129, 129: 40}
HEAD_DIMS = (32, 64, 16, 96)
FLAG_CASES = list(itertools.product((False, True), repeat=4))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(
    ("causal", "gqa", "key_lengths", "unequal"),
    FLAG_CASES,
    ids=[
        "-".join(n for n, f in zip(("causal", "gqa", "keylen", "nq!=nk"), c) if f) or "plain"
        for c in FLAG_CASES
    ],
)
def test_matches_float64_reference(interpreter, length, causal, gqa, key_lengths, unequal):
    nq = length
    nk = OTHER_LENGTH[length] if unequal else length
    case = FLAG_CASES.index((causal, gqa, key_lengths, unequal))
    d = HEAD_DIMS[(case + LENGTHS.index(length)) % len(HEAD_DIMS)]
    h, h_kv = (2, 1) if gqa else (2, 2)
    q, k, v = make_inputs(2, h, h_kv, nq, nk, d)
    lengths = None
    if key_lengths:
        # Item 0's length exceeds Nk (the kernel clamps it); item 1 masks a random tail.
        lengths = torch.tensor([nk + 3, int(torch.randint(1, nk + 1, ()))])
    check_against_reference(q, k, v, causal=causal, key_lengths=lengths, tol=1e-3)


@pytest.mark.parametrize(
    ("d", "dv"), [(32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (40, 24)]
)
def test_head_dims(interpreter, d, dv):
    q, k, v = make_inputs(1, 2, 1, 33, 50, d, dv)
    check_against_reference(q, k, v, causal=True, key_lengths=torch.tensor([41]), tol=1e-3)


def test_custom_scale_mqa_and_strided_inputs(interpreter):
    # [B, N, H, D] projections viewed as [B, H, N, D]: non-contiguous head and token strides.
    q = torch.randn(2, 45, 4, 32).transpose(1, 2)
    k = torch.randn(2, 70, 1, 32).transpose(1, 2)
    v = torch.randn(2, 70, 1, 32).transpose(1, 2)
    check_against_reference(
        q, k, v, causal=False, scale=0.3, key_lengths=torch.tensor([70, 33]), tol=1e-3
    )


def test_float16_inputs(interpreter):
    q, k, v = make_inputs(2, 4, 2, 47, 65, 64, dtype=torch.float16)
    check_against_reference(q, k, v, causal=True, key_lengths=torch.tensor([65, 20]), tol=1e-2)


def test_rows_without_keys_are_zero_with_zero_gradient(interpreter):
    q, k, v = make_inputs(2, 2, 1, 20, 33, 32)
    lengths = torch.tensor([0, 17])
    for causal in (False, True):
        check_against_reference(q, k, v, causal=causal, key_lengths=lengths, tol=1e-3)
        out = attention(q, k, v, causal=causal, key_lengths=lengths, backend="triton")
        assert (out[0] == 0).all()


def test_logsumexp_matches_reference(interpreter):
    q, k, v = make_inputs(2, 4, 2, 37, 29, 32)
    lengths = torch.tensor([0, 11])
    out, lse = fa.flash_attn_func(q, k, v, causal=True, key_lengths=lengths, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=True, key_lengths=lengths)
    assert lse.dtype == torch.float32
    assert torch.isneginf(lse[0]).all()
    assert rel_err(lse[1], ref_lse[1]) < 1e-5
    assert rel_err(out, ref_out) < 1e-5


def test_raw_launchers_write_every_element(interpreter):
    """The launchers themselves, into NaN-filled buffers (no allocation by the op)."""
    q, k, v = make_inputs(2, 6, 3, 29, 18, 24, 40)
    lengths = torch.tensor([18, 7], dtype=torch.int32)
    scale = 0.2
    nan = float("nan")
    out = torch.full((2, 6, 29, 40), nan)
    lse = torch.full((2, 6, 29), nan)
    fa.launch_forward(q, k, v, out, lse, lengths, True, scale)
    ref_out, ref_lse = reference(q, k, v, causal=True, scale=scale, key_lengths=lengths)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(lse, ref_lse) < 1e-5

    dout = torch.randn_like(out)
    delta, dq, dk, dv = (torch.full(t.shape, nan) for t in (lse, q, k, v))
    fa.launch_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, lengths, True, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, causal=True, scale=scale, key_lengths=lengths)
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert rel_err(delta, (dout.double() * ref_out).sum(-1)) < 1e-5
    for got, exp in zip((dq, dk, dv), want):
        assert rel_err(got, exp) < 1e-5
    assert (dk[1, :, 7:] == 0).all() and (dv[1, :, 7:] == 0).all()


def test_auto_picks_triton_under_the_interpreter(interpreter, monkeypatch):
    q, k, v = make_inputs(1, 2, 2, 9, 9, 32)
    assert triton_unsupported_reason(q, k, v, causal=True) is None
    calls = []
    real = fa.flash_attn_func

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "flash_attn_func", spy)
    out = attention(q, k, v, causal=True)
    assert len(calls) == 1
    assert rel_err(out, reference(q, k, v, causal=True)[0]) < 1e-5


def test_torch_compile_fullgraph(interpreter):
    """A small model calling core_attention.attention(backend="triton") compiles with no graph
    break (fullgraph=True) and matches eager, forward and backward."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 3 * 64)
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x, lengths):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
            y = attention(q, k, v, causal=True, key_lengths=lengths, backend="triton")
            return self.proj(y.transpose(1, 2).reshape(b, n, 64))

    torch._dynamo.reset()
    model = Block()
    x = torch.randn(2, 19, 64)
    lengths = torch.tensor([19, 12])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x, lengths)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    y_ref = model(x, lengths)
    y_ref.square().sum().backward()
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 1e-6
    for got, p in zip(grads, model.parameters()):
        assert rel_err(got, p.grad) < 1e-6
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        ({"attn_mask": torch.ones(9, 9, dtype=torch.bool)}, "attn_mask"),
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"dtype": torch.float64}, "float64"),
        ({"dtype": torch.bfloat16}, "bfloat16"),
        ({"d": 320}, "head dim 320"),
    ],
)
def test_unsupported_cases_name_the_feature(interpreter, kwargs, feature):
    dtype = kwargs.pop("dtype", torch.float32)
    d = kwargs.pop("d", 32)
    q, k, v = make_inputs(1, 2, 2, 9, 9, d, dtype=dtype)
    with pytest.raises(BackendUnavailableError, match=feature):
        attention(q, k, v, backend="triton", **kwargs)
    # auto falls back to the PyTorch path for the same call
    out = attention(q, k, v, backend="auto", **kwargs)
    assert out.shape == (1, 2, 9, d)


def test_autotune_pruning_picks_the_architecture_list(monkeypatch):
    """The compiled-mode autotuner keeps exactly the table list for the device and tile class
    (the device is faked: pruning only reads the capability, head dims and dtype)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = fa._load_kernels(False)
    kernels = {"fwd": mod._attn_fwd, "dkdv": mod._attn_bwd_dkdv, "dq": mod._attn_bwd_dq}
    cases = [
        ((9, 0), 64, torch.bfloat16, ("hopper", "d64")),
        ((9, 0), 96, torch.float16, ("hopper", "d128")),
        ((8, 0), 128, torch.bfloat16, ("ampere", "d128")),
        ((8, 9), 32, torch.float16, ("other", "d64")),
        ((12, 0), 128, torch.bfloat16, ("other", "d128")),
        ((9, 0), 256, torch.bfloat16, ("any", "big")),
        ((8, 0), 64, torch.float32, ("any", "big")),
    ]
    for capability, d, dtype, (arch, cls) in cases:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        q = torch.empty(1, 1, 1, d, dtype=dtype)
        block = fa._block(d)
        for name, kernel in kernels.items():
            kept = mod._pruner(name)(kernel.configs, {"Q": q}, BLOCK_D=block, BLOCK_DV=block)
            assert kept == mod._TABLE[arch, cls, name], (capability, d, dtype, name)
            for config in kept:
                for key in ("BLOCK_M", "BLOCK_N"):
                    size = config.kwargs[key]
                    assert size >= 16 and size & (size - 1) == 0
            # ATTENTION_KERNELS_CONFIG=i picks the i-th of the same list, clamped to its last.
            meta = {"BLOCK_D": block, "BLOCK_DV": block}
            for index in (0, 1, 99):
                monkeypatch.setenv(fa.CONFIG_ENV, str(index))
                forced = fa._tuned(mod, name, q, meta)
                assert forced.config is kept[min(index, len(kept) - 1)]
            monkeypatch.delenv(fa.CONFIG_ENV)
            assert fa._tuned(mod, name, q, meta) is kernel


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(1, 1, 1, 4, 4, 16)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fa.flash_attn_func(q, k, v)


# --------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16 at realistic sizes.

GPU_CASES = [
    # (b, h, h_kv, nq, nk, d, causal, key_lengths)
    (2, 8, 8, 1024, 1024, 64, False, False),
    (2, 8, 8, 1024, 1024, 128, True, False),
    (2, 8, 2, 2048, 2048, 128, True, True),
    (2, 8, 1, 2048, 2048, 64, False, True),
    (2, 8, 8, 4096, 4096, 128, False, False),
    (2, 8, 4, 4096, 4096, 64, True, False),
    (2, 8, 2, 1000, 3001, 96, True, True),
    (2, 8, 8, 3001, 1000, 96, False, False),
    (1, 4, 4, 1024, 1024, 256, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "h", "h_kv", "nq", "nk", "d", "causal", "with_lengths"), GPU_CASES)
def test_gpu_bfloat16_matches_float64(compiled, b, h, h_kv, nq, nk, d, causal, with_lengths):
    q, k, v = (t.cuda() for t in make_inputs(b, h, h_kv, nq, nk, d, dtype=torch.bfloat16))
    reason = fa.unsupported_reason(q, k, v)
    if reason is not None:
        pytest.skip(reason)
    lengths = torch.tensor([nk, nk // 3 + 1], device="cuda") if with_lengths else None
    check_against_reference(q, k, v, causal=causal, key_lengths=lengths, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_every_config(compiled, monkeypatch, index, d):
    """Each autotuning config of this GPU's lists (the index is clamped to a list's last),
    on uneven lengths with causal masking, GQA and key lengths: every masked path."""
    monkeypatch.setenv(fa.CONFIG_ENV, str(index))
    q, k, v = (t.cuda() for t in make_inputs(2, 4, 2, 777, 1000, d, dtype=torch.bfloat16))
    lengths = torch.tensor([1000, 333], device="cuda")
    check_against_reference(q, k, v, causal=True, key_lengths=lengths, tol=1e-2)


@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch, compiled):
    monkeypatch.setenv(fa.CONFIG_ENV, "auto")
    q, k, v = (t.cuda() for t in make_inputs(2, 8, 2, 2048, 2048, 128, dtype=torch.bfloat16))
    check_against_reference(q, k, v, causal=False, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(compiled, dtype):
    q, k, v = (t.cuda() for t in make_inputs(2, 4, 2, 777, 513, 64, dtype=dtype))
    lengths = torch.tensor([513, 100], device="cuda")
    check_against_reference(q, k, v, causal=True, key_lengths=lengths, tol=1e-2)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(compiled):
    def f(q, k, v):
        return attention(q, k, v, causal=True, backend="triton")

    torch._dynamo.reset()
    q, k, v = (t.cuda() for t in make_inputs(2, 8, 2, 1024, 1024, 128, dtype=torch.bfloat16))
    check_against_reference(q, k, v, causal=True, tol=1e-2, fn=torch.compile(f, fullgraph=True))
    torch._dynamo.reset()
