"""Triton kernels of register attention (backend ``"triton"``).

Forward: one pass of online softmax (FlashAttention-2, Dao 2023) over the register block
and then the token blocks. Alongside the running max m, denominator l and output
accumulator it keeps, per query, t = sum_j p~_j (s_j - m) (rescaled like l), from which
the entropy is log(l) - t / l, and the unnormalised register mass. A second launch,
key-block-major, re-reads q and the saved lse to sum p_ij over queries for each key
(key_mass) without atomics and without materialising [Nq, Nk].

Backward: FlashAttention-2: delta = rowsum(dO * O) (and the sink gradient) in a
preprocessing launch, then dK/dV by key block and dQ by query block. Register keys get
their own key blocks; when registers are shared across the batch the per-sample
gradients are summed afterwards in PyTorch, so no path uses atomics and the backward is
deterministic.

All logits are kept in log2 units (scaled by log2(e)) so that exp2 is used throughout.
Head dims that are not powers of two are split into two power-of-two column blocks
(72 = 64 + 16 with 8 masked columns) instead of padding to the next power of two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, AttentionGrads, AttentionOutputs, Causal
from dsr_kernels.rope import RopeStyle, apply_rope_transpose
from dsr_kernels.triton import triton_interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# "split" | "pad" | "auto": how a head dim that is not a power of two is tiled.
HEAD_SPLIT = os.environ.get("DSR_ATTN_HEAD_SPLIT", "auto")


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _row_starts(BASE, rows, stride_row, ALIGNED: tl.constexpr):
    """Pointers to the first column of each row; ALIGNED: the launcher checked that every
    row starts on a 16-byte boundary (base and strides), which the compiler cannot see
    when a stride is not a multiple of 16 elements (head dim 72: rows of 144 bytes), and
    without which it loads the tile 2 bytes at a time and does not pipeline it."""
    starts = BASE + rows * stride_row
    if ALIGNED:
        starts = tl.multiple_of(starts, [16])
    return starts


@triton.jit
def _program(CU_Q, CU_K, H, NQ, NK, TQ, CAUSAL_OFFSET, VARLEN: tl.constexpr):
    """What program row bh = tl.program_id(1) works on: (batch or sequence b64, head h64).

    Packed sequences (VARLEN): sequence b64's query / key rows start at q_start / k_start of
    the [1, H, T, D] views, it has NQ queries and NK keys, its causal mask is bottom-right
    aligned (offset NK - NQ), and its row statistics start at h * TQ + q_start. Batched:
    rows start at 0 and the statistics of (b, h) at bh * NQ.
    Returns (b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base).
    """
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    q_start = 0
    k_start = 0
    stat_base = bh.to(tl.int64) * NQ
    if VARLEN:
        q_start = tl.load(CU_Q + b64).to(tl.int64)
        k_start = tl.load(CU_K + b64).to(tl.int64)
        NQ = (tl.load(CU_Q + b64 + 1) - q_start).to(tl.int32)
        NK = (tl.load(CU_K + b64 + 1) - k_start).to(tl.int32)
        CAUSAL_OFFSET = NK - NQ
        stat_base = h64 * TQ + q_start
    return b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base


@triton.jit
def _load_tile(BASE, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = _row_starts(BASE, rows, stride_row, ALIGNED)[:, None] + offs_d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_qk(BASE, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, COS, SIN,
             ROPE: tl.constexpr, IS_REGISTER: tl.constexpr, ALIGNED: tl.constexpr):
    """A q or k tile, rotated when ROPE (1 interleaved pairs, 2 half pairs) for token rows.

    rope(x)[d] = x[d] cos[n, d] + sign[d] x[partner(d)] sin[n, d] (dsr_kernels.rope), in
    float32, rounded back to x's dtype for the tensor cores. Register keys never rotate.
    """
    x = _load_tile(BASE, rows, n_rows, stride_row, offs_d, HEAD_DIM, ALIGNED)
    if ROPE != 0 and not IS_REGISTER:
        if ROPE == 1:
            # the partner of column 2i is 2i + 1 and back: the pairs of the tile just loaded,
            # swapped in registers (a column block starts on an even column, so no pair
            # straddles two blocks) instead of a second, gathered (scalar) load
            first = (offs_d % 2) == 0
            even, odd = tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
            xp = tl.reshape(tl.join(odd, even), [x.shape[0], x.shape[1]])
        else:
            first = offs_d < HEAD_DIM // 2  # (this gather compiles to vector loads: two shifted ranges)
            partner = tl.where(first, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
            xp = _load_tile(BASE, rows, n_rows, stride_row, partner, HEAD_DIM, ALIGNED)
        in_tab = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        tab = rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        c = tl.load(COS + tab, mask=in_tab, other=1.0)
        s = tl.load(SIN + tab, mask=in_tab, other=0.0)
        sign = tl.where(first, -1.0, 1.0)
        x = (x.to(tl.float32) * c + sign[None, :] * xp.to(tl.float32) * s).to(x.dtype)
    return x


@triton.jit
def _store_tile(BASE, x, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = _row_starts(BASE, rows, stride_row, ALIGNED)[:, None] + offs_d[None, :]
    tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with float32 accumulation."""
    if DOT_PRECISION == "upcast":
        # Triton's CPU interpreter multiplies bfloat16 bit patterns as if they were
        # integers; bf16 x bf16 products are exact in float32, so upcasting first gives
        # what the tensor cores compute.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _qk(a0, a1, b0, b1, SPLIT_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, D] @ b[N, D]^T over the (one or two) head-dim column blocks."""
    s = _mma(a0, tl.trans(b0), DOT_PRECISION)
    if SPLIT_D:
        s += _mma(a1, tl.trans(b1), DOT_PRECISION)
    return s


@triton.jit
def _mask_logits(
    s, rows, cols, n_keys, b64, h64, NQ,
    KEY_MASK, stride_kmb, stride_kmn,
    ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
    CAUSAL_OFFSET,
    IS_REGISTER: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """-inf where key `cols` may not be attended by query `rows`; adds a float bias."""
    valid = cols < n_keys
    keep = valid[None, :]
    if not IS_REGISTER:
        if HAS_KEY_MASK:
            km = tl.load(KEY_MASK + b64 * stride_kmb + cols * stride_kmn, mask=valid, other=0)
            keep = keep & (km[None, :] != 0)
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + CAUSAL_OFFSET)
        if MASK_KIND != 0:
            am_ptrs = (
                ATTN_MASK + b64 * stride_amb + h64 * stride_amh
                + rows[:, None].to(tl.int64) * stride_amm + cols[None, :] * stride_amn
            )
            am_in = (rows[:, None] < NQ) & valid[None, :]
            if MASK_KIND == 1:  # boolean: True = may attend
                keep = keep & (tl.load(am_ptrs, mask=am_in, other=0) != 0)
            else:  # additive float bias, natural-log units
                s = s + tl.load(am_ptrs, mask=am_in, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(
    acc0, acc1, m_i, l_i, t_i, r_i,
    q0, q1, K_BASE, V_BASE, stride_kn, stride_vn, start_n, n_keys,
    rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, NUM_PREFIX, qk_scale,
    KEY_MASK, stride_kmb, stride_kmn,
    ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
    CAUSAL_OFFSET,
    COS, SIN,
    IS_REGISTER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_D: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, RETURN_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr, HEAD_DIM_V: tl.constexpr, SPLIT_DV: tl.constexpr, ALIGNED: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d0, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    k1 = k0
    if SPLIT_D:
        k1 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d1, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    s = _qk(q0, q1, k0, k1, SPLIT_D, DOT_PRECISION) * qk_scale
    s = _mask_logits(
        s, rows, cols, n_keys, b64, h64, NQ,
        KEY_MASK, stride_kmb, stride_kmn,
        ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
        CAUSAL_OFFSET, IS_REGISTER, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
    )
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attendable yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    p_sum = tl.sum(p, 1)
    if RETURN_STATS:
        # t = sum p~ (s - m): shift by the change of m, rescale, add this block.
        # (where() first: no -inf * 0 even in the lanes that are thrown away)
        shift = (tl.where(l_i > 0.0, m_i, m_use) - m_use) * l_i
        t_i = alpha * (t_i + shift) + tl.sum(p * tl.where(p > 0.0, s - m_use[:, None], 0.0), 1)
        r_i = r_i * alpha
        if IS_REGISTER:
            r_i += p_sum
        else:
            if start_n < NUM_PREFIX:
                r_i += tl.sum(tl.where(cols[None, :] < NUM_PREFIX, p, 0.0), 1)
    l_i = l_i * alpha + p_sum
    v0 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v0, HEAD_DIM_V, ALIGNED)
    acc0 = acc0 * alpha[:, None] + _mma(p.to(v0.dtype), v0, DOT_PRECISION)
    if SPLIT_DV:
        v1 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v1, HEAD_DIM_V, ALIGNED)
        acc1 = acc1 * alpha[:, None] + _mma(p.to(v1.dtype), v1, DOT_PRECISION)
    return acc0, acc1, m_new, l_i, t_i, r_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, RK, RV, SINKS, KEY_MASK, ATTN_MASK, COS, SIN,
    OUT, LSE, ENTROPY, REG_SHARE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_rkb, stride_rkh, stride_rkn,
    stride_rvb, stride_rvh, stride_rvn,
    stride_kmb, stride_kmn,
    stride_amb, stride_amh, stride_amm, stride_amn,
    stride_ob, stride_oh, stride_om,
    H, KV_GROUP, NQ, NK, R, NUM_PREFIX, CAUSAL_OFFSET, qk_scale,
    CU_Q, CU_K, TQ, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, RETURN_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr, SPLIT_DV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """out_i = sum_j softmax_j(s_ij) v_j over [registers ; tokens] (+ sink), s = q k^T scale."""
    pid_m = tl.program_id(0)
    b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base = _program(CU_Q, CU_K, H, NQ, NK, TQ, CAUSAL_OFFSET, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    offs_v0 = tl.arange(0, BLOCK_DV0)
    offs_v1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)

    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    q0 = _load_qk(q_base, rows, NQ, stride_qm, offs_d0, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
    q1 = q0
    if SPLIT_D:
        q1 = _load_qk(q_base, rows, NQ, stride_qm, offs_d1, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)

    # The sink is one more outcome with logit sinks[h]: start the running softmax on it.
    if HAS_SINKS:
        sink = tl.load(SINKS + h64).to(tl.float32)
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink * 1.4426950408889634
        # exp(sink - m) = 1, or 0 for a -inf sink (no outcome; a NaN sink keeps NaN)
        l_i = tl.zeros([BLOCK_M], tl.float32) + tl.where(sink == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV1], tl.float32)

    rk_base = RK + b64 * stride_rkb + h64 * stride_rkh
    rv_base = RV + b64 * stride_rvb + h64 * stride_rvh
    for start_n in range(0, R, BLOCK_N):
        acc0, acc1, m_i, l_i, t_i, r_i = _fwd_tile(
            acc0, acc1, m_i, l_i, t_i, r_i,
            q0, q1, rk_base, rv_base, stride_rkn, stride_rvn, start_n, R,
            rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, NUM_PREFIX, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            True, HEAD_DIM, BLOCK_N, SPLIT_D, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
            RETURN_STATS, DOT_PRECISION, ROPE, HEAD_DIM_V, SPLIT_DV, ALIGNED,
        )

    hi = NK
    if IS_CAUSAL:  # key j is visible to query i iff j <= i + CAUSAL_OFFSET
        hi = tl.maximum(tl.minimum(NK, (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET), 0)
    k_base = K + b64 * stride_kb + (h64 // KV_GROUP) * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + (h64 // KV_GROUP) * stride_vh + k_start * stride_vn
    for start_n in range(0, hi, BLOCK_N):
        acc0, acc1, m_i, l_i, t_i, r_i = _fwd_tile(
            acc0, acc1, m_i, l_i, t_i, r_i,
            q0, q1, k_base, v_base, stride_kn, stride_vn, start_n, NK,
            rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, NUM_PREFIX, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            False, HEAD_DIM, BLOCK_N, SPLIT_D, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
            RETURN_STATS, DOT_PRECISION, ROPE, HEAD_DIM_V, SPLIT_DV, ALIGNED,
        )

    # A query with nothing to attend (l = 0) gets out = 0, lse = -inf, entropy = 0.
    # A NaN or +inf logit has made l NaN (a +inf sink alone leaves m = +inf): such a row
    # stays alive and all of it is NaN.
    l_i = tl.where(m_i == float("inf"), float("nan"), l_i)
    alive = l_i != 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    inv_l = 1.0 / l_safe
    o_base = OUT + b64 * stride_ob + h64 * stride_oh + q_start * stride_om
    _store_tile(o_base, (acc0 * inv_l[:, None]).to(OUT.dtype.element_ty), rows, NQ, stride_om, offs_v0, HEAD_DIM_V, ALIGNED)
    if SPLIT_DV:
        _store_tile(o_base, (acc1 * inv_l[:, None]).to(OUT.dtype.element_ty), rows, NQ, stride_om, offs_v1, HEAD_DIM_V, ALIGNED)
    row_ok = rows < NQ
    stat_offs = stat_base + rows
    log2_l = tl.log2(l_safe)
    tl.store(LSE + stat_offs, tl.where(alive, (m_i + log2_l) * 0.6931471805599453, float("-inf")), mask=row_ok)
    if RETURN_STATS:
        tl.store(ENTROPY + stat_offs, tl.where(alive, (log2_l - t_i * inv_l) * 0.6931471805599453, 0.0), mask=row_ok)
        tl.store(REG_SHARE + stat_offs, r_i * inv_l, mask=row_ok)


# ----------------------------------------------------------------------------- key mass


@triton.jit
def _key_mass_tile(
    Q, LSE, K_BASE, stride_kn, start_n, n_keys, b64, h64, q_start, stat_base,
    stride_qb, stride_qh, stride_qm, NQ, qk_scale,
    KEY_MASK, stride_kmb, stride_kmn,
    ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
    COS, SIN,
    IS_REGISTER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr, ALIGNED: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    k0 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d0, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    k1 = k0
    if SPLIT_D:
        k1 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d1, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    mass = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    if not IS_REGISTER:
        if IS_CAUSAL:  # queries i < j - offset cannot see key j
            lo = (tl.maximum(start_n - CAUSAL_OFFSET, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, NQ, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q0 = _load_qk(q_base, rows, NQ, stride_qm, offs_d0, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
        q1 = q0
        if SPLIT_D:
            q1 = _load_qk(q_base, rows, NQ, stride_qm, offs_d1, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
        # Rows past NQ or with lse = -inf contribute exp2(s - inf) = 0.
        lse = tl.load(LSE + stat_base + rows, mask=rows < NQ, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        s = _qk(q0, q1, k0, k1, SPLIT_D, DOT_PRECISION) * qk_scale
        s = _mask_logits(
            s, rows, cols, n_keys, b64, h64, NQ,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
            CAUSAL_OFFSET, IS_REGISTER, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
        )
        # Masked keys get p = 0 even in a NaN row, whose lse is NaN (the reference's contract),
        # and so do the tile's rows past NQ (zeros times a non-finite key would be NaN).
        hidden = (s == float("-inf")) | (rows >= NQ)[:, None]
        mass += tl.sum(tl.where(hidden, 0.0, tl.exp2(s - lse2[:, None])), 0)
    return mass


@triton.jit
def _attn_key_mass_kernel(
    Q, K, RK, LSE, KEY_MASK, ATTN_MASK, COS, SIN, KEY_MASS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_rkb, stride_rkh, stride_rkn,
    stride_kmb, stride_kmn,
    stride_amb, stride_amh, stride_amm, stride_amn,
    H, KV_GROUP, NQ, NK, R, N_REG_BLOCKS, CAUSAL_OFFSET, qk_scale, KM_STRIDE,
    CU_Q, CU_K, TQ, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr, SPLIT_DV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """key_mass[b, h, j] = sum_i exp(s_ij - lse_i): one program per key block, no atomics."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base = _program(CU_Q, CU_K, H, NQ, NK, TQ, CAUSAL_OFFSET, VARLEN)
    out_base = KEY_MASS + bh.to(tl.int64) * KM_STRIDE
    if pid_n < N_REG_BLOCKS:
        start_n = pid_n * BLOCK_N
        mass = _key_mass_tile(
            Q, LSE, RK + b64 * stride_rkb + h64 * stride_rkh, stride_rkn, start_n, R,
            b64, h64, q_start, stat_base, stride_qb, stride_qh, stride_qm, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            True, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, BLOCK_N,
            HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE, ALIGNED,
        )
        cols = start_n + tl.arange(0, BLOCK_N)
        tl.store(out_base + cols, mass, mask=cols < R)
    else:
        start_n = (pid_n - N_REG_BLOCKS) * BLOCK_N
        mass = _key_mass_tile(
            Q, LSE, K + b64 * stride_kb + (h64 // KV_GROUP) * stride_kh + k_start * stride_kn, stride_kn, start_n, NK,
            b64, h64, q_start, stat_base, stride_qb, stride_qh, stride_qm, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            False, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, BLOCK_N,
            HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE, ALIGNED,
        )
        cols = start_n + tl.arange(0, BLOCK_N)
        tl.store(out_base + R + cols, mass, mask=cols < NK)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DOUT, LSE, SINKS, DELTA, DSINK_PARTIAL,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, NQ,
    CU_Q, TQ, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id; with sinks, partial sums of -p_sink,i * delta_i."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b64, h64, q_start, _, NQ, _, _, stat_base = _program(CU_Q, CU_Q, H, NQ, NQ, TQ, 0, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    o_base = OUT + b64 * stride_ob + h64 * stride_oh + q_start * stride_om
    do_base = DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
    o = _load_tile(o_base, rows, NQ, stride_om, offs_d0, HEAD_DIM, ALIGNED).to(tl.float32)
    do = _load_tile(do_base, rows, NQ, stride_dom, offs_d0, HEAD_DIM, ALIGNED).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if SPLIT_D:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        o = _load_tile(o_base, rows, NQ, stride_om, offs_d1, HEAD_DIM, ALIGNED).to(tl.float32)
        do = _load_tile(do_base, rows, NQ, stride_dom, offs_d1, HEAD_DIM, ALIGNED).to(tl.float32)
        delta += tl.sum(o * do, 1)
    stat_offs = stat_base + rows
    tl.store(DELTA + stat_offs, delta, mask=rows < NQ)
    if HAS_SINKS:
        lse = tl.load(LSE + stat_offs, mask=rows < NQ, other=float("inf"))
        # a row that attends nothing (lse = -inf: every key hidden, sink -inf) gives the sink nothing
        p_sink = tl.where(lse == float("-inf"), 0.0, tl.exp(tl.load(SINKS + h64).to(tl.float32) - lse))
        tl.store(DSINK_PARTIAL + bh.to(tl.int64) * tl.num_programs(0) + pid_m, -tl.sum(p_sink * delta, 0))


@triton.jit
def _dkdv_tile(
    Q, DOUT, LSE, DELTA, K_BASE, V_BASE, stride_kn, stride_vn, start_n, n_keys,
    b64, h64, q_start, stat_base,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    NQ, qk_scale,
    KEY_MASK, stride_kmb, stride_kmn,
    ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
    COS, SIN,
    IS_REGISTER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr, SPLIT_DV: tl.constexpr, ALIGNED: tl.constexpr,
    RETURN_KEY_MASS: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    offs_v0 = tl.arange(0, BLOCK_DV0)
    offs_v1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
    k0 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d0, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    v0 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v0, HEAD_DIM_V, ALIGNED)
    k1 = k0
    v1 = v0
    if SPLIT_D:
        k1 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d1, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    if SPLIT_DV:
        v1 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v1, HEAD_DIM_V, ALIGNED)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_DV0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_DV1], tl.float32)
    mass = tl.zeros([BLOCK_N], tl.float32)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    do_base = DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
    lo = 0
    if not IS_REGISTER:
        if IS_CAUSAL:
            lo = (tl.maximum(start_n - CAUSAL_OFFSET, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, NQ, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q0 = _load_qk(q_base, rows, NQ, stride_qm, offs_d0, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
        do0 = _load_tile(do_base, rows, NQ, stride_dom, offs_v0, HEAD_DIM_V, ALIGNED)
        q1 = q0
        do1 = do0
        if SPLIT_D:
            q1 = _load_qk(q_base, rows, NQ, stride_qm, offs_d1, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
        if SPLIT_DV:
            do1 = _load_tile(do_base, rows, NQ, stride_dom, offs_v1, HEAD_DIM_V, ALIGNED)
        stat_offs = stat_base + rows
        lse = tl.load(LSE + stat_offs, mask=rows < NQ, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + stat_offs, mask=rows < NQ, other=0.0)
        s = _qk(q0, q1, k0, k1, SPLIT_D, DOT_PRECISION) * qk_scale
        s = _mask_logits(
            s, rows, cols, n_keys, b64, h64, NQ,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
            CAUSAL_OFFSET, IS_REGISTER, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
        )
        # [BLOCK_M, BLOCK_N]; 0 at masked keys (NaN rows too) and in the rows past NQ (as in _key_mass_tile)
        hidden = (s == float("-inf")) | (rows >= NQ)[:, None]
        p = tl.where(hidden, 0.0, tl.exp2(s - lse2[:, None]))
        if RETURN_KEY_MASS:  # the key mass: column sums of P over the query blocks, in order
            mass += tl.sum(p, 0)
        pt = tl.trans(p.to(do0.dtype))
        dv0 += _mma(pt, do0, DOT_PRECISION)
        dp = _qk(do0, do1, v0, v1, SPLIT_DV, DOT_PRECISION)
        if SPLIT_DV:
            dv1 += _mma(pt, do1, DOT_PRECISION)
        # (0 at masked keys: they pass no gradient, even when their value row makes dp NaN)
        dst = tl.trans(tl.where(hidden, 0.0, p * (dp - delta[:, None])).to(q0.dtype))
        dk0 += _mma(dst, q0, DOT_PRECISION)
        if SPLIT_D:
            dk1 += _mma(dst, q1, DOT_PRECISION)
    return dk0, dk1, dv0, dv1, mass


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, RK, RV, DOUT, LSE, DELTA, KEY_MASK, ATTN_MASK, COS, SIN,
    DK, DV, DRK, DRV, KEY_MASS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_rkb, stride_rkh, stride_rkn,
    stride_rvb, stride_rvh, stride_rvn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_kmb, stride_kmn,
    stride_amb, stride_amh, stride_amm, stride_amn,
    H, KV_GROUP, NQ, NK, R, N_REG_BLOCKS, CAUSAL_OFFSET, qk_scale, sm_scale, KM_STRIDE,
    CU_Q, CU_K, TQ, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr, SPLIT_DV: tl.constexpr,
    ALIGNED: tl.constexpr, RETURN_KEY_MASS: tl.constexpr,
):
    """dV_j = sum_i p_ij dO_i, dK_j = scale sum_i p_ij (dO_i . v_j - delta_i) q_i.

    Register key blocks write float32 per-sample gradients DRK [B, H, R, D] and DRV [B, H, R, Dv].
    With RETURN_KEY_MASS, also key_mass[b, h, j] = sum_i p_ij into KEY_MASS [B | S, H, KM_STRIDE]
    (registers first), as _attn_key_mass_kernel does in the forward: one program per key block.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base = _program(CU_Q, CU_K, H, NQ, NK, TQ, CAUSAL_OFFSET, VARLEN)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    offs_v0 = tl.arange(0, BLOCK_DV0)
    offs_v1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
    if pid_n < N_REG_BLOCKS:
        start_n = pid_n * BLOCK_N
        dk0, dk1, dv0, dv1, mass = _dkdv_tile(
            Q, DOUT, LSE, DELTA,
            RK + b64 * stride_rkb + h64 * stride_rkh, RV + b64 * stride_rvb + h64 * stride_rvh,
            stride_rkn, stride_rvn, start_n, R, b64, h64, q_start, stat_base,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            True, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, BLOCK_N,
            HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE,
            HEAD_DIM_V, BLOCK_DV0, BLOCK_DV1, SPLIT_DV, ALIGNED, RETURN_KEY_MASS,
        )
        cols = start_n + tl.arange(0, BLOCK_N)
        if RETURN_KEY_MASS:
            tl.store(KEY_MASS + bh.to(tl.int64) * KM_STRIDE + cols, mass, mask=cols < R)
        # DRK / DRV are contiguous float32 [B, H, R, HEAD_DIM] / [B, H, R, HEAD_DIM_V].
        base = bh.to(tl.int64) * R * HEAD_DIM
        base_v = bh.to(tl.int64) * R * HEAD_DIM_V
        _store_tile(DRK + base, dk0 * sm_scale, cols, R, HEAD_DIM, offs_d0, HEAD_DIM, False)
        _store_tile(DRV + base_v, dv0, cols, R, HEAD_DIM_V, offs_v0, HEAD_DIM_V, False)
        if SPLIT_D:
            _store_tile(DRK + base, dk1 * sm_scale, cols, R, HEAD_DIM, offs_d1, HEAD_DIM, False)
        if SPLIT_DV:
            _store_tile(DRV + base_v, dv1, cols, R, HEAD_DIM_V, offs_v1, HEAD_DIM_V, False)
    else:
        start_n = (pid_n - N_REG_BLOCKS) * BLOCK_N
        dk0, dk1, dv0, dv1, mass = _dkdv_tile(
            Q, DOUT, LSE, DELTA,
            K + b64 * stride_kb + (h64 // KV_GROUP) * stride_kh + k_start * stride_kn,
            V + b64 * stride_vb + (h64 // KV_GROUP) * stride_vh + k_start * stride_vn,
            stride_kn, stride_vn, start_n, NK, b64, h64, q_start, stat_base,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            False, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, BLOCK_N,
            HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE,
            HEAD_DIM_V, BLOCK_DV0, BLOCK_DV1, SPLIT_DV, ALIGNED, RETURN_KEY_MASS,
        )
        cols = start_n + tl.arange(0, BLOCK_N)
        if RETURN_KEY_MASS:
            tl.store(KEY_MASS + bh.to(tl.int64) * KM_STRIDE + R + cols, mass, mask=cols < NK)
        dk_base = DK + b64 * stride_dkb + h64 * stride_dkh + k_start * stride_dkn
        dv_base = DV + b64 * stride_dvb + h64 * stride_dvh + k_start * stride_dvn
        _store_tile(dk_base, (dk0 * sm_scale).to(DK.dtype.element_ty), cols, NK, stride_dkn, offs_d0, HEAD_DIM, ALIGNED)
        _store_tile(dv_base, dv0.to(DV.dtype.element_ty), cols, NK, stride_dvn, offs_v0, HEAD_DIM_V, ALIGNED)
        if SPLIT_D:
            _store_tile(dk_base, (dk1 * sm_scale).to(DK.dtype.element_ty), cols, NK, stride_dkn, offs_d1, HEAD_DIM, ALIGNED)
        if SPLIT_DV:
            _store_tile(dv_base, dv1.to(DV.dtype.element_ty), cols, NK, stride_dvn, offs_v1, HEAD_DIM_V, ALIGNED)


@triton.jit
def _dq_tile(
    dq0, dq1, q0, q1, do0, do1, lse2, delta,
    K_BASE, V_BASE, stride_kn, stride_vn, start_n, n_keys,
    rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, qk_scale,
    KEY_MASK, stride_kmb, stride_kmn,
    ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
    COS, SIN,
    IS_REGISTER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_D: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr, HEAD_DIM_V: tl.constexpr, SPLIT_DV: tl.constexpr, ALIGNED: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d0, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    v0 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v0, HEAD_DIM_V, ALIGNED)
    k1 = k0
    v1 = v0
    if SPLIT_D:
        k1 = _load_qk(K_BASE, cols, n_keys, stride_kn, offs_d1, HEAD_DIM, COS, SIN, ROPE, IS_REGISTER, ALIGNED)
    if SPLIT_DV:
        v1 = _load_tile(V_BASE, cols, n_keys, stride_vn, offs_v1, HEAD_DIM_V, ALIGNED)
    s = _qk(q0, q1, k0, k1, SPLIT_D, DOT_PRECISION) * qk_scale
    s = _mask_logits(
        s, rows, cols, n_keys, b64, h64, NQ,
        KEY_MASK, stride_kmb, stride_kmn,
        ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn,
        CAUSAL_OFFSET, IS_REGISTER, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL,
    )
    p = tl.where(s == float("-inf"), 0.0, tl.exp2(s - lse2[:, None]))  # (as in _dkdv_tile)
    dp = _qk(do0, do1, v0, v1, SPLIT_DV, DOT_PRECISION)
    ds = tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None])).to(k0.dtype)
    dq0 += _mma(ds, k0, DOT_PRECISION)
    if SPLIT_D:
        dq1 += _mma(ds, k1, DOT_PRECISION)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, RK, RV, DOUT, LSE, DELTA, KEY_MASK, ATTN_MASK, COS, SIN, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_rkb, stride_rkh, stride_rkn,
    stride_rvb, stride_rvh, stride_rvn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_kmb, stride_kmn,
    stride_amb, stride_amh, stride_amm, stride_amn,
    H, KV_GROUP, NQ, NK, R, CAUSAL_OFFSET, qk_scale, sm_scale,
    CU_Q, CU_K, TQ, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr, SPLIT_DV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dQ_i = scale sum_j p_ij (dO_i . v_j - delta_i) k_j over registers and tokens."""
    pid_m = tl.program_id(0)
    b64, h64, q_start, k_start, NQ, NK, CAUSAL_OFFSET, stat_base = _program(CU_Q, CU_K, H, NQ, NK, TQ, CAUSAL_OFFSET, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    offs_v0 = tl.arange(0, BLOCK_DV0)
    offs_v1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    do_base = DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
    q0 = _load_qk(q_base, rows, NQ, stride_qm, offs_d0, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
    do0 = _load_tile(do_base, rows, NQ, stride_dom, offs_v0, HEAD_DIM_V, ALIGNED)
    q1 = q0
    do1 = do0
    if SPLIT_D:
        q1 = _load_qk(q_base, rows, NQ, stride_qm, offs_d1, HEAD_DIM, COS, SIN, ROPE, False, ALIGNED)
    if SPLIT_DV:
        do1 = _load_tile(do_base, rows, NQ, stride_dom, offs_v1, HEAD_DIM_V, ALIGNED)
    stat_offs = stat_base + rows
    lse = tl.load(LSE + stat_offs, mask=rows < NQ, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + stat_offs, mask=rows < NQ, other=0.0)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)

    rk_base = RK + b64 * stride_rkb + h64 * stride_rkh
    rv_base = RV + b64 * stride_rvb + h64 * stride_rvh
    for start_n in range(0, R, BLOCK_N):
        dq0, dq1 = _dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse2, delta,
            rk_base, rv_base, stride_rkn, stride_rvn, start_n, R,
            rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            True, HEAD_DIM, BLOCK_N, SPLIT_D, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE,
            HEAD_DIM_V, SPLIT_DV, ALIGNED,
        )
    hi = NK
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(NK, (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET), 0)
    k_base = K + b64 * stride_kb + (h64 // KV_GROUP) * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + (h64 // KV_GROUP) * stride_vh + k_start * stride_vn
    for start_n in range(0, hi, BLOCK_N):
        dq0, dq1 = _dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse2, delta,
            k_base, v_base, stride_kn, stride_vn, start_n, NK,
            rows, offs_d0, offs_d1, offs_v0, offs_v1, b64, h64, NQ, qk_scale,
            KEY_MASK, stride_kmb, stride_kmn,
            ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, CAUSAL_OFFSET,
            COS, SIN,
            False, HEAD_DIM, BLOCK_N, SPLIT_D, HAS_KEY_MASK, MASK_KIND, IS_CAUSAL, DOT_PRECISION, ROPE,
            HEAD_DIM_V, SPLIT_DV, ALIGNED,
        )
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqm
    _store_tile(dq_base, (dq0 * sm_scale).to(DQ.dtype.element_ty), rows, NQ, stride_dqm, offs_d0, HEAD_DIM, ALIGNED)
    if SPLIT_D:
        _store_tile(dq_base, (dq1 * sm_scale).to(DQ.dtype.element_ty), rows, NQ, stride_dqm, offs_d1, HEAD_DIM, ALIGNED)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Tiling:
    block_d0: int
    block_d1: int
    split_d: bool


def _tiling(head_dim: int, mode: str | None = None) -> _Tiling:
    """Power-of-two column blocks covering head_dim: 72 -> 64 + 16, 80 -> 64 + 16, 96 -> 64 + 32."""
    mode = HEAD_SPLIT if mode is None else mode
    full = max(16, triton.next_power_of_2(head_dim))
    if mode != "pad" and full > 16 and full != head_dim:
        d0 = full // 2
        d1 = max(16, triton.next_power_of_2(head_dim - d0))
        if d0 + d1 < full:
            return _Tiling(d0, d1, True)
    # Unused second block: 16 columns the kernels never touch (SPLIT_D is False).
    return _Tiling(full, 16, False)


def _wider(a: _Tiling, b: _Tiling) -> _Tiling:
    """The tiling with more columns (q / k vs v when their head dims differ)."""

    def width(t: _Tiling) -> int:
        return t.block_d0 + (t.block_d1 if t.split_d else 0)

    return a if width(a) >= width(b) else b


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision products, so that the kernel matches eager float32
    # (tf32 would add ~1e-3 relative error); fp16/bf16 use the tensor cores as is.
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and triton_interpreting():
        return "upcast"
    return "tf32"


def _fwd_config(tiling: _Tiling, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward and dQ launches.

    Chosen from benchmarks/results/kernels-sm90 so that no launch spills on sm_90: two
    warp groups (8 warps) share the 128-row query block.
    """
    width = tiling.block_d0 + (tiling.block_d1 if tiling.split_d else 0)
    if dtype == torch.float32:  # full-precision (ieee) dots: FP32 pipes, small tiles
        return (32, 32, 8, 2) if width <= 128 else (16, 32, 8, 2)
    if width <= 64:
        return 128, 64, 8, 3
    if width <= 128:
        return 128, 64, 8, 2
    return 64, 32, 8, 2


def _bwd_config(tiling: _Tiling, dtype: torch.dtype, heavy: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the key-block-major launches (dK/dV, key mass).

    Chosen from benchmarks/results/kernels-sm90 so that no launch spills on sm_90
    (masks and RoPE included): dK and dV accumulate BLOCK_N x D float32 each, so 8 warps
    share them above head dim 64, with the query block halved to 32 rows (16 when `heavy`:
    RoPE or a float mask add their own tiles); past 128, 32 x 32 tiles without pipelining.
    """
    width = tiling.block_d0 + (tiling.block_d1 if tiling.split_d else 0)
    if dtype == torch.float32:
        return 16, 32, 8, 1
    if width <= 64:
        return 64, 64, 4, 2
    if width <= 128:
        return (16 if heavy else 32), 64, 8, 2
    return 32, 32, 8, 1


def _rows_aligned(*tensors: Tensor | None) -> bool:
    """ALIGNED of the kernels: every row of every tile tensor starts on a 16-byte boundary
    (the data pointer, and all strides but the last in bytes, are multiples of 16). When
    not, the kernels compile a second specialisation without the promise."""
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors
        if t is not None
    )


def _reg_strides(rk: Tensor | None) -> tuple[int, int, int]:
    if rk is None:
        return 0, 0, 0
    if rk.dim() == 3:  # [H, R, D] shared across the batch
        return 0, rk.stride(0), rk.stride(1)
    return rk.stride(0), rk.stride(1), rk.stride(2)


def _mask_args(q: Tensor, key_mask: Tensor | None, attn_mask: Tensor | None):
    """Pointers, strides and flags for the two optional masks (q stands in for absent ones)."""
    km = key_mask if key_mask is not None else q
    km_strides = (key_mask.stride(0), key_mask.stride(1)) if key_mask is not None else (0, 0)
    if attn_mask is None:
        return km, km_strides, q, (0, 0, 0, 0), 0
    kind = 1 if attn_mask.dtype == torch.bool else 2
    return km, km_strides, attn_mask, tuple(attn_mask.stride()), kind


@dataclass(frozen=True)
class _Launch:
    """What the forward and backward launchers share for one call: the [B, H, N, D] views
    the kernels read (packed sequences: [1, H, T, D] with batch stride 0, program row =
    sequence), sizes, constexpr flags and the pointer stand-ins for absent operands."""

    q: Tensor
    k: Tensor
    v: Tensor
    n_rows: int  # program rows per head: B, or S packed sequences
    nq: int  # queries per program row: Nq, or the longest sequence's
    nk: int  # token keys of the views (Nk or Tk)
    n_keys: int  # keys per program row: Nk, or the longest sequence's
    R: int
    cu_q: Tensor  # offsets (q stands in when batched)
    cu_k: Tensor
    tq: int  # packed query rows (0 when batched)
    tiling: _Tiling  # the launch configs follow the wider of the two head dims
    vt: _Tiling
    flags: dict
    mask_kind: int
    km: Tensor
    km_strides: tuple
    am: Tensor
    am_strides: tuple
    rk: Tensor
    rv: Tensor
    cos: Tensor
    sin: Tensor
    causal_offset: int
    qk_scale: float
    varlen: bool

    def heavy(self) -> bool:
        """Rotary tables or a float mask: more registers live in the backward's inner loop."""
        return self.flags["ROPE"] != 0 or self.mask_kind == 2


def _prepare(call: AttentionCall) -> _Launch:
    q, k, v = call.q, call.k, call.v
    if call.varlen:
        q, k, v = (_packed_as_bhnd(t) for t in (q, k, v))
        n_rows, nq, n_keys, tq = call.num_sequences, call.max_seqlen_q, call.max_seqlen_k, q.shape[2]
        cu_q, cu_k = call.cu_seqlens_q, call.cu_seqlens_k
    else:
        n_rows, nq, n_keys, tq = q.shape[0], q.shape[2], k.shape[2], 0
        cu_q = cu_k = q
    D, Dv = q.shape[3], v.shape[3]
    tiling, vt = _tiling(D), _tiling(Dv)
    km, km_strides, am, am_strides, mask_kind = _mask_args(q, call.key_mask, call.attn_mask)
    flags = dict(
        HEAD_DIM=D, BLOCK_D0=tiling.block_d0, BLOCK_D1=tiling.block_d1, SPLIT_D=tiling.split_d,
        HEAD_DIM_V=Dv, BLOCK_DV0=vt.block_d0, BLOCK_DV1=vt.block_d1, SPLIT_DV=vt.split_d,
        HAS_KEY_MASK=call.key_mask is not None, MASK_KIND=mask_kind,
        IS_CAUSAL=call.causal != Causal.NONE, DOT_PRECISION=_dot_precision(q.dtype), ROPE=call.rope_style,
    )  # fmt: skip
    has_rope = call.rope_cos is not None
    return _Launch(
        q=q,
        k=k,
        v=v,
        n_rows=n_rows,
        nq=nq,
        nk=k.shape[2],
        n_keys=n_keys,
        R=call.num_registers,
        cu_q=cu_q,
        cu_k=cu_k,
        tq=tq,
        tiling=_wider(tiling, vt),
        vt=vt,
        flags=flags,
        mask_kind=mask_kind,
        km=km,
        km_strides=km_strides,
        am=am,
        am_strides=am_strides,
        rk=call.rk if call.rk is not None else q,
        rv=call.rv if call.rv is not None else q,
        cos=call.rope_cos if has_rope else q,
        sin=call.rope_sin if has_rope else q,
        # (packed sequences: each is bottom-right aligned in the kernels, which set the offset)
        causal_offset=0 if call.varlen or call.causal == Causal.NONE else call.causal_offset,
        qk_scale=call.scale * LOG2E,
        varlen=call.varlen,
    )


def attention_fwd_triton(call: AttentionCall, outputs: AttentionOutputs) -> None:
    """Fills out, lse and, with return_stats, the statistics (shapes: :class:`AttentionOutputs`;
    the contract: dsr_kernels/reference/attention.py)."""
    L = _prepare(call)
    q, k, v, rk, rv, H = L.q, L.k, L.v, call.rk, call.rv, L.q.shape[1]
    out = _packed_as_bhnd(outputs.out) if L.varlen else outputs.out
    lse, entropy, register_share, key_mass = outputs[1:]
    sinks = call.sinks.contiguous() if call.sinks is not None else q
    block_m, block_n, warps, stages = _fwd_config(L.tiling, q.dtype)
    stats_dst = (entropy, register_share) if call.return_stats else (lse, lse)
    aligned = _rows_aligned(q, k, v, rk, rv, out)
    _attn_fwd_kernel[(triton.cdiv(L.nq, block_m), L.n_rows * H)](
        q, k, v, L.rk, L.rv, sinks, L.km, L.am, L.cos, L.sin,
        out, lse, *stats_dst,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_reg_strides(rk), *_reg_strides(rv),
        *L.km_strides, *L.am_strides,
        out.stride(0), out.stride(1), out.stride(2),
        H, H // k.shape[1], L.nq, L.nk, L.R, call.num_prefix_tokens, L.causal_offset, L.qk_scale,
        L.cu_q, L.cu_k, L.tq, VARLEN=L.varlen,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_SINKS=call.sinks is not None,
        RETURN_STATS=call.return_stats, ALIGNED=aligned, num_warps=warps, num_stages=stages, **L.flags,
    )  # fmt: skip
    if not call.return_stats or call.key_mass_in_backward:  # (the backward's dK/dV pass sums it)
        return
    block_m, block_n, warps, stages = _bwd_config(L.tiling, q.dtype, L.heavy())
    n_reg_blocks = triton.cdiv(L.R, block_n)
    if L.varlen:
        key_mass.zero_()  # past each sequence's keys
    _attn_key_mass_kernel[(n_reg_blocks + triton.cdiv(L.n_keys, block_n), L.n_rows * H)](
        q, k, L.rk, lse, L.km, L.am, L.cos, L.sin, key_mass,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *_reg_strides(rk), *L.km_strides, *L.am_strides,
        H, H // k.shape[1], L.nq, L.nk, L.R, n_reg_blocks, L.causal_offset, L.qk_scale, L.R + L.n_keys,
        L.cu_q, L.cu_k, L.tq, VARLEN=L.varlen,
        BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned, num_warps=warps, num_stages=stages, **L.flags,
    )  # fmt: skip


def attention_bwd_triton(
    call: AttentionCall,
    dout: Tensor,
    out: Tensor,
    lse: Tensor,
    grads: AttentionGrads,
    *,
    key_mass: Tensor | None = None,
) -> None:
    """Fills dq, dk, dv (and drk, drv, dsinks when present) and, when given, key_mass
    (float32 [B | S, H, R + Nk]: the column sums of P, summed by the dK/dV kernel).

    With rope the kernels produce the gradients of the rotated q and k (float32); they
    are rotated back with the transpose of the rotation afterwards.
    """
    L = _prepare(call)
    q, k, v, rk, rv, sinks = L.q, L.k, L.v, call.rk, call.rv, call.sinks
    B, H, _, D = q.shape
    NK, Dv, vt = k.shape[2], v.shape[3], L.vt
    if dout.stride(-1) != 1:  # (packed first: the kernels' views keep a batch stride of 0)
        dout = dout.contiguous()
    view = _packed_as_bhnd if L.varlen else (lambda t: t)
    dout, out = view(dout), view(out)
    dq_out, dk_out, dv_out = (view(g) for g in grads[:3])
    dq, dk, dv = dq_out, dk_out, dv_out
    drk, drv, dsinks = grads[3:]
    group = H // k.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    if call.rope_cos is not None:
        dq, dk = torch.empty(dq.shape, **f32), torch.empty(dk.shape, **f32)
    if group > 1:
        # Grouped K/V heads: the dk, dv kernel writes one gradient per query head (float32),
        # summed over each group afterwards (as flash-attn 2's backward does), so no two
        # programs add into the same rows: deterministic, no atomics, K/V read in place.
        if L.varlen:  # [1, H, Tk, D] with batch stride 0, as the kernels read packed sequences
            dk, dv = _packed_as_bhnd(torch.empty(NK, H, D, **f32)), _packed_as_bhnd(torch.empty(NK, H, Dv, **f32))
        else:
            dk, dv = torch.empty(B, H, NK, D, **f32), torch.empty(B, H, NK, Dv, **f32)

    aligned = _rows_aligned(q, k, v, rk, rv, out, dout, dq, dk, dv)
    pre_m = 64
    delta = torch.empty(lse.shape, **f32)  # [B, H, Nq] or [H, Tq]
    n_pre = triton.cdiv(L.nq, pre_m)
    dsink_partial = torch.empty(L.n_rows * H, n_pre, **f32) if sinks is not None else delta
    _attn_bwd_preprocess_kernel[(n_pre, L.n_rows * H)](
        out, dout, lse, sinks.contiguous() if sinks is not None else q, delta, dsink_partial,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        H, L.nq,
        L.cu_q, L.tq, VARLEN=L.varlen,
        HEAD_DIM=Dv, BLOCK_D0=vt.block_d0, BLOCK_D1=vt.block_d1, SPLIT_D=vt.split_d,
        BLOCK_M=pre_m, HAS_SINKS=sinks is not None, ALIGNED=aligned,
    )  # fmt: skip
    if sinks is not None:
        dsinks.copy_(dsink_partial.view(L.n_rows, H, n_pre).sum((0, 2)))

    block_m, block_n, warps, stages = _bwd_config(L.tiling, q.dtype, L.heavy())
    n_reg_blocks = triton.cdiv(L.R, block_n)
    if L.R:
        drk_buf, drv_buf = torch.empty(L.n_rows, H, L.R, D, **f32), torch.empty(L.n_rows, H, L.R, Dv, **f32)
    else:
        drk_buf = drv_buf = delta
    if key_mass is not None and L.varlen:
        key_mass.zero_()  # past each sequence's keys
    _attn_bwd_dkdv_kernel[(n_reg_blocks + triton.cdiv(L.n_keys, block_n), L.n_rows * H)](
        q, k, v, L.rk, L.rv, dout, lse, delta, L.km, L.am, L.cos, L.sin,
        dk, dv, drk_buf, drv_buf, key_mass if key_mass is not None else delta,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_reg_strides(rk), *_reg_strides(rv),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        *L.km_strides, *L.am_strides,
        H, group, L.nq, NK, L.R, n_reg_blocks, L.causal_offset, L.qk_scale, call.scale,
        key_mass.shape[-1] if key_mass is not None else 0,
        L.cu_q, L.cu_k, L.tq, VARLEN=L.varlen,
        BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned, RETURN_KEY_MASS=key_mass is not None,
        num_warps=warps, num_stages=stages, **L.flags,
    )  # fmt: skip
    if L.R:
        if rk.dim() == 3:  # shared registers: sum the per-sample gradients over the batch
            drk_buf, drv_buf = drk_buf.sum(0), drv_buf.sum(0)
        drk.copy_(drk_buf)
        drv.copy_(drv_buf)

    block_m, block_n, warps, stages = _fwd_config(L.tiling, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(L.nq, block_m), L.n_rows * H)](
        q, k, v, L.rk, L.rv, dout, lse, delta, L.km, L.am, L.cos, L.sin, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_reg_strides(rk), *_reg_strides(rv),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *L.km_strides, *L.am_strides,
        H, group, L.nq, NK, L.R, L.causal_offset, L.qk_scale, call.scale,
        L.cu_q, L.cu_k, L.tq, VARLEN=L.varlen,
        BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned, num_warps=warps, num_stages=stages, **L.flags,
    )  # fmt: skip
    if group > 1:
        dk = dk.unflatten(1, (H // group, group)).sum(2)
        dv_out.copy_(dv.unflatten(1, (H // group, group)).sum(2))
    if call.rope_cos is not None:
        style = RopeStyle(call.rope_style)
        dq_out.copy_(apply_rope_transpose(dq, call.rope_cos, call.rope_sin, style))
        dk = apply_rope_transpose(dk, call.rope_cos, call.rope_sin, style)
    if dk is not dk_out:
        dk_out.copy_(dk)


def _packed_as_bhnd(t: Tensor) -> Tensor:
    """[T, H, D] packed sequences as the [1, H, T, D] view the kernels read, with batch stride 0:
    the program row's batch index is the sequence, which must move no pointer but the registers'."""
    T, H, D = t.shape
    return t.as_strided((1, H, T, D), (0, t.stride(1), t.stride(0), t.stride(2)))
