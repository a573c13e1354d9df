"""Triton kernels of FlashAttention-2 (Dao 2023), forward and backward.

Loaded only through :func:`attention_kernels.flash_attention._kernels`, which executes this
file once per Triton mode: ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a
function, so compiled and interpreted kernels come from two separate loads of this file.

Shapes (strides are passed explicitly; the last dimension must have stride 1):

* ``Q [B, H, N_Q, HEAD_DIM]``, ``K [B, H_KV, N_K, HEAD_DIM]``, ``V [B, H_KV, N_K, HEAD_DIM_V]``
  with ``H = H_KV * GROUP``: query head ``h`` reads key/value head ``h // GROUP``.
* ``Out [B, H, N_Q, HEAD_DIM_V]``; ``Lse [B, H, N_Q]`` float32, contiguous, natural-log
  logsumexp of each row's scaled scores (``-inf`` for a row with no admissible key).
* ``KeyLengths [B]`` (any integer dtype) or ``None``: keys ``>= KeyLengths[b]`` are ignored.

Causal masking is top-left aligned (query ``i`` sees keys ``j <= i``), as
``scaled_dot_product_attention(is_causal=True)``. Scores live in the log2 domain inside the
kernels (``qk_scale = scale * log2(e)``) so that ``exp2`` replaces ``exp``.

Head dims are padded to a power of two (at least 16, the smallest ``tl.dot`` tile) and the
padding columns are masked on every load and store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# Autotuning. Every kernel gets the union of all configs and a pruning function that keeps
# the list for the device's architecture and the tile class (head dim, dtype). Each list ends
# with a small config that fits any GPU Triton supports, so pruning never leaves nothing
# runnable (the autotuner scores a config that runs out of resources as infinitely slow).
# Under the interpreter a single small config is used: benchmarking there is meaningless.
#
# The lists hold configs that ptxas (triton 3.5.1, bf16, `ptxas -v`) compiled for sm_90a /
# sm_80 without register spills, or with a few dozen bytes at most; wider tiles spilled
# hundreds of bytes (the dK/dV kernel keeps two [BLOCK_N, D] fp32 accumulators resident).
# They are a starting point: which one wins is measured by the autotuner on the device.


def _cfg(block_m, block_n, warps, stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )


# (arch, tile class, kernel) -> configs. Tile classes: "d64" (both head dims padded to at
# most 64), "d128" (at most 128), "big" (head dim above 128, or float32 inputs, whose tiles
# take twice the bytes per element). For the backward kernels BLOCK_N is the key block and
# BLOCK_M the query block: dK/dV keeps BLOCK_N keys resident and streams query blocks past
# them; dQ keeps BLOCK_M query rows resident and streams key blocks.
_TABLE = {
    ("hopper", "d64", "fwd"): [
        _cfg(128, 128, 8, 3),
        _cfg(128, 64, 8, 3),
        _cfg(128, 64, 4, 3),
        _cfg(64, 64, 4, 3),
    ],
    ("hopper", "d64", "dkdv"): [
        _cfg(64, 128, 8, 3),
        _cfg(32, 128, 8, 3),
        _cfg(64, 64, 8, 3),
        _cfg(32, 64, 4, 3),
    ],
    ("hopper", "d64", "dq"): [
        _cfg(128, 128, 8, 3),
        _cfg(128, 64, 8, 3),
        _cfg(64, 64, 8, 3),
        _cfg(64, 32, 4, 3),
    ],
    ("hopper", "d128", "fwd"): [
        _cfg(128, 64, 8, 3),
        _cfg(128, 64, 8, 4),
        _cfg(128, 128, 8, 3),
        _cfg(128, 32, 8, 3),
        _cfg(64, 32, 4, 3),
    ],
    ("hopper", "d128", "dkdv"): [
        _cfg(32, 64, 8, 3),
        _cfg(64, 64, 8, 3),
        _cfg(32, 128, 8, 3),
        _cfg(32, 32, 4, 3),
    ],
    ("hopper", "d128", "dq"): [_cfg(128, 64, 8, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 3)],
    ("ampere", "d64", "fwd"): [
        _cfg(128, 64, 8, 2),
        _cfg(128, 128, 8, 2),
        _cfg(128, 32, 8, 2),
        _cfg(64, 32, 4, 3),
    ],
    ("ampere", "d64", "dkdv"): [_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 3), _cfg(32, 32, 4, 3)],
    ("ampere", "d64", "dq"): [
        _cfg(128, 64, 8, 2),
        _cfg(64, 64, 8, 3),
        _cfg(64, 32, 4, 3),
        _cfg(32, 64, 4, 3),
    ],
    ("ampere", "d128", "fwd"): [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)],
    ("ampere", "d128", "dkdv"): [_cfg(64, 64, 8, 3), _cfg(32, 64, 8, 3), _cfg(32, 32, 4, 3)],
    ("ampere", "d128", "dq"): [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 3)],
    ("any", "big", "fwd"): [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
    ("any", "big", "dkdv"): [_cfg(32, 32, 8, 2), _cfg(16, 32, 4, 2), _cfg(16, 32, 4, 1)],
    ("any", "big", "dq"): [_cfg(32, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
}
# Other GPUs (8.6 / 8.9, Blackwell, ...) use the A100 lists with at most 2 pipeline stages:
# the 8.6 / 8.9 parts have about 100 KB of shared memory per block.
for (_arch, _cls, _kernel), _cs in list(_TABLE.items()):
    if _arch == "ampere":
        _TABLE["other", _cls, _kernel] = [
            _cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, min(c.num_stages, 2))
            for c in _cs
        ]

# Different tile shapes per kernel under the interpreter, so the tests cover blocks that do
# not line up (BLOCK_M != BLOCK_N) in the causal diagonal logic.
_INTERPRET_CONFIGS = {
    "fwd": [_cfg(64, 32, 4, 1)],
    "dkdv": [_cfg(32, 64, 4, 1)],
    "dq": [_cfg(64, 32, 4, 1)],
}


def _arch(device: torch.device) -> str:
    """ "hopper" (9.x: H100, H200), "ampere" (8.0: A100, A30) or "other" (8.6/8.9 parts with
    about 100 KB of shared memory, Blackwell, ...)."""
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return "hopper"
    return "ampere" if (major, minor) == (8, 0) else "other"


def _tile_class(block_d: int, block_dv: int, dtype: torch.dtype) -> str:
    widest = max(block_d, block_dv)
    if widest > 128 or dtype == torch.float32:
        return "big"
    return "d64" if widest <= 64 else "d128"


def _configs(kernel: str) -> list:
    if INTERPRET:
        return _INTERPRET_CONFIGS[kernel]
    return [c for key, cs in _TABLE.items() if key[2] == kernel for c in cs]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        cls = _tile_class(args["BLOCK_D"], args["BLOCK_DV"], q.dtype)
        wanted = _TABLE["any" if cls == "big" else _arch(q.device), cls, kernel]
        keep = [c for c in configs if any(c is w for w in wanted)]
        return keep or configs[-1:]

    return prune


_KEYS = ["N_Q_BUCKET", "N_K_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "GROUP"]


def _autotune(kernel: str):
    return triton.autotune(
        configs=_configs(kernel),
        key=_KEYS,
        prune_configs_by=None if INTERPRET else {"early_config_prune": _pruner(kernel)},
    )


# --------------------------------------------------------------------------------------
# Reductions. triton.language's own jit-defined helpers (tl.sum, tl.max, tl.zeros, tl.cdiv)
# are decorated once, at `import triton`, in whatever mode was active then; a process that
# imported Triton compiled and later runs these kernels interpreted (or the reverse) cannot
# call them. The kernels therefore use only Triton builtins and the helpers in this file.


@triton.jit
def _own_max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_sum_combine(a, b):
    return a + b


if INTERPRET:
    # The interpreter reduces with NumPy when the combine function *is* tl.sum's or tl.max's
    # (compared by identity, never called), and element by element in Python otherwise.
    _max_combine = getattr(tl.standard, "_elementwise_max", _own_max_combine)
    _sum_combine = getattr(tl.standard, "_sum_combine", _own_sum_combine)
else:
    _max_combine = _own_max_combine
    _sum_combine = _own_sum_combine


# --------------------------------------------------------------------------------------
# Tile helpers. CHECK_ROWS / a partial head dim decide at compile time which masks exist,
# so full interior tiles load without predicates.


@triton.jit
def _load_tile(
    ptrs,
    rows,
    n_rows,
    cols,
    N_COLS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(
                ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0
            )
    else:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    if N_COLS == BLOCK_COLS:
        tl.store(ptrs, value, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _key_length(KeyLengths, off_b, N_K, HAS_KEY_LENGTHS: tl.constexpr):
    if HAS_KEY_LENGTHS:
        kv_len = tl.load(KeyLengths + off_b)
        kv_len = tl.maximum(tl.minimum(kv_len, N_K), 0).to(tl.int32)
    else:
        kv_len = N_K
    return kv_len


@triton.jit
def _query_block_key_range(
    start_m, kv_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """Keys ``[0, full)`` need no mask for this query block; ``[full, hi)`` need one."""
    if IS_CAUSAL:
        # Row i sees j <= i: every key below the block's first row is visible to all rows.
        hi = tl.minimum(kv_len, (start_m + 1) * BLOCK_M)
        full = tl.minimum(kv_len, start_m * BLOCK_M) // BLOCK_N * BLOCK_N
    else:
        hi = kv_len
        full = kv_len // BLOCK_N * BLOCK_N
    return full, hi


# --------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    lo,
    hi,
    kv_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        k = _load_tile(k_ptrs, offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < kv_len
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_combine))
            # A row with no admissible key so far keeps m = -inf; subtracting 0 instead
            # avoids (-inf) - (-inf) = NaN and leaves its p and alpha at exactly 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_combine))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :]
        v = _load_tile(v_ptrs, offs_n, kv_len, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd")
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    KeyLengths,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    GROUP,
    N_Q,
    N_K,
    N_Q_BUCKET,
    N_K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head); online softmax over key blocks."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    kv_len = _key_length(KeyLengths, off_b, N_K, HAS_KEY_LENGTHS)

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        offs_m,
        N_Q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    full, hi = _query_block_key_range(start_m, kv_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, 0, full, kv_len, qk_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, IS_CAUSAL, INPUT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, full, hi, kv_len, qk_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, IS_CAUSAL, INPUT_PRECISION,
    )  # fmt: skip

    # Rows with no admissible key: l = 0, acc = 0 -> output 0 and lse = -inf.
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_div)) * _LN2)
    _store_tile(
        o_base + offs_m[:, None] * stride_om + offs_dv[None, :],
        out.to(Out.dtype.element_ty), offs_m, N_Q, offs_dv, HEAD_DIM_V, BLOCK_DV,
    )  # fmt: skip
    tl.store(Lse + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# --------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV (one program per key block, looping over the
# query rows of every query head in the key/value head's group, so GQA needs neither
# copies of K/V nor atomics), then dQ (one program per query block). This is the
# FlashAttention-2 split: no atomic accumulation anywhere.


@triton.jit
def _attn_bwd_preprocess(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    N_Q,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    do_ptrs = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    o = _load_tile(
        o_ptrs + offs_m[:, None] * stride_om + offs_dv[None, :],
        offs_m,
        N_Q,
        offs_dv,
        HEAD_DIM_V,
        BLOCK_DV,
        True,
    )
    do = _load_tile(
        do_ptrs + offs_m[:, None] * stride_dom + offs_dv[None, :],
        offs_m,
        N_Q,
        offs_dv,
        HEAD_DIM_V,
        BLOCK_DV,
        True,
    )
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _sum_combine)
    tl.store(Delta + off_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    offs_n,
    lo,
    hi,
    N_Q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
            offs_m,
            N_Q,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            CHECK_ROWS,
        )
        do = _load_tile(
            do_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
            offs_m,
            N_Q,
            offs_dv,
            HEAD_DIM_V,
            BLOCK_DV,
            CHECK_ROWS,
        )
        if CHECK_ROWS:
            # lse = +inf makes p = 0 on rows past N_Q (whose q and dO also load as 0).
            lse = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Only reached for key blocks below the key length, so every row here has at least
        # key 0 admissible and a finite lse.
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        if MASK_CAUSAL:
            # Masked before exp2: a score above the row's lse would overflow.
            qkT = tl.where(offs_m[None, :] >= offs_n[:, None], qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse[None, :] * _LOG2E)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@_autotune("dkdv")
@triton.heuristics({"EVEN_Q": lambda args: args["N_Q"] % args["BLOCK_M"] == 0})
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    KeyLengths,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    H_KV,
    GROUP,
    N_Q,
    N_K,
    N_Q_BUCKET,
    N_K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, kv head); sums over its GROUP query heads."""
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    off_b = off_bhk // H_KV
    off_hk = off_bhk % H_KV
    kv_len = _key_length(KeyLengths, off_b, N_K, HAS_KEY_LENGTHS)

    n_lo = start_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    k = _load_tile(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
        offs_n,
        kv_len,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    v = _load_tile(
        v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
        offs_n,
        kv_len,
        offs_dv,
        HEAD_DIM_V,
        BLOCK_DV,
        True,
    )
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)

    # A block wholly past the key length gets no gradient: skip its query loop entirely.
    q_end = tl.where(n_lo < kv_len, N_Q, 0)
    if IS_CAUSAL:
        # Query rows below n_lo see none of these keys; blocks starting at or after the
        # block's last key see all of them and need no causal mask.
        lo = n_lo // BLOCK_M * BLOCK_M
        diag_end = (n_lo + BLOCK_N + BLOCK_M - 2) // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * H + off_h
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        lse_base = Lse + off_bh.to(tl.int64) * N_Q
        delta_base = Delta + off_bh.to(tl.int64) * N_Q
        if IS_CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                lo, tl.minimum(diag_end, q_end), N_Q, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                BLOCK_DV, BLOCK_M, True, not EVEN_Q, INPUT_PRECISION,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                diag_end, q_end, N_Q, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                BLOCK_DV, BLOCK_M, False, not EVEN_Q, INPUT_PRECISION,
            )  # fmt: skip
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                0, q_end, N_Q, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                BLOCK_DV, BLOCK_M, False, not EVEN_Q, INPUT_PRECISION,
            )  # fmt: skip

    # Keys past the key length were loaded as zeros and still produced p > 0 in their own
    # columns; their gradients are zero by definition. dS is w.r.t. the scaled scores.
    valid = (offs_n < kv_len)[:, None]
    dk = tl.where(valid, dk * sm_scale, 0.0)
    dv = tl.where(valid, dv, 0.0)
    dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
    dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
    _store_tile(
        dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty), offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D,
    )  # fmt: skip
    _store_tile(
        dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :],
        dv.to(DV.dtype.element_ty), offs_n, N_K, offs_dv, HEAD_DIM_V, BLOCK_DV,
    )  # fmt: skip


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    lo,
    hi,
    kv_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
            offs_n,
            kv_len,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            MASKED,
        )
        v = _load_tile(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
            offs_n,
            kv_len,
            offs_dv,
            HEAD_DIM_V,
            BLOCK_DV,
            MASKED,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < kv_len
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@_autotune("dq")
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    KeyLengths,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    H,
    GROUP,
    N_Q,
    N_K,
    N_Q_BUCKET,
    N_K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head); same key range as the forward."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    kv_len = _key_length(KeyLengths, off_b, N_K, HAS_KEY_LENGTHS)

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        offs_m,
        N_Q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = _load_tile(
        do_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
        offs_m,
        N_Q,
        offs_dv,
        HEAD_DIM_V,
        BLOCK_DV,
        True,
    )
    row_ok = offs_m < N_Q
    # Rows past N_Q get lse = +inf (p = 0). A row with lse = -inf has no admissible key,
    # which happens only when kv_len = 0, and then the key loops below are empty.
    lse2 = (
        tl.load(Lse + off_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
    )
    delta = tl.load(Delta + off_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    full, hi = _query_block_key_range(start_m, kv_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, 0, full, kv_len,
        qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, IS_CAUSAL,
        INPUT_PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, full, hi, kv_len,
        qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, IS_CAUSAL,
        INPUT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    _store_tile(
        dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D,
    )  # fmt: skip
