"""Triton kernels of ttr_activation (backend ``"triton"``); the same algorithm as the C++ ones.

Stage 1 (``_ttr_column_values_kernel``): one program per (image, selected neuron) walks
that one column of the fc1 output over all T tokens: max and min of the activation
(the register value) and, over the patch rows, the mean and unbiased std
("only_outliers"). Stage 2 (``_ttr_activation_kernel``): one program per tile of rows
x columns computes gelu and, where a column is selected (``SLOT[col] >= 0``),
overwrites the patch rows (fill or keep) and the register rows (register value). The
two per-image reductions that need more than one column ("layer_signed_max": over the
K columns; "mean": the mean of the lowest 75% of the patches, a sort) work on stage 1's
[B, K] or the gathered [B, T, K] columns with PyTorch in the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsr_kernels.reference.ttr_activation import PATCH_VALUES, bottom_mean_count
from dsr_kernels.triton import triton_interpreting


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    """gelu(x) in float32: 0.5 x (1 + erf(x / sqrt 2)), or the tanh form (tanh via exp(-2|u|))."""
    if TANH:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        return 0.5 * x * (1.0 + t)
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _ttr_column_values_kernel(
    H, NEURONS, HI, LO, FILL, THRESH,
    T, F, K, P0, P1,
    TANH: tl.constexpr, OUTLIERS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per (b, k): max / min of gelu(h[b, :, n_k]) and, for only_outliers, mean and mean + std over the patches."""
    pid = tl.program_id(0)
    b = pid // K
    k = pid % K
    n = tl.load(NEURONS + k).to(tl.int64)
    base = H + b.to(tl.int64) * T * F + n
    offs = tl.arange(0, BLOCK_T)
    hi = tl.full([BLOCK_T], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_T], float("inf"), tl.float32)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + offs
        ok = t < T
        a = _gelu(tl.load(base + t.to(tl.int64) * F, mask=ok, other=0.0).to(tl.float32), TANH)
        hi = tl.maximum(hi, tl.where(ok, a, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
        lo = tl.minimum(lo, tl.where(ok, a, float("inf")), propagate_nan=tl.PropagateNan.ALL)
        if OUTLIERS:
            acc += tl.where((t >= P0) & (t < P1), a, 0.0)
    # (tl.max / tl.min drop NaN: a column with a NaN activation has NaN max and min, as torch.amax)
    has_nan = tl.max((hi != hi).to(tl.int32), axis=0) > 0
    tl.store(HI + pid, tl.where(has_nan, float("nan"), tl.max(hi, axis=0)))
    tl.store(LO + pid, tl.where(has_nan, float("nan"), tl.min(lo, axis=0)))
    if OUTLIERS:
        P = P1 - P0
        mean = tl.sum(acc, axis=0) / P
        sq = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, T, BLOCK_T):  # second pass for the centred sum of squares
            t = start + offs
            patch = (t >= P0) & (t < P1)
            a = _gelu(tl.load(base + t.to(tl.int64) * F, mask=patch, other=0.0).to(tl.float32), TANH)
            d = tl.where(patch, a - mean, 0.0)
            sq += d * d
        # Unbiased; NaN for a single patch (then nothing is replaced), as torch.std.
        std = tl.where(P > 1, tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(P - 1, 1)), float("nan"))
        tl.store(FILL + pid, mean)
        tl.store(THRESH + pid, mean + std)


@triton.jit
def _ttr_activation_kernel(
    H, OUT, SLOT, REG, FILL, THRESH,
    T, F, K, P0, P1, ROWS,
    TANH: tl.constexpr, HAS_NEURONS: tl.constexpr, PATCH_MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """out = gelu(h), with selected columns of patch rows (PATCH_MODE 0 zero / 1 mean: fill;
    2 only_outliers: fill where a > thresh; 3 same: keep) and of register rows (reg) overwritten."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < ROWS
    col_ok = cols < F
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    a = _gelu(tl.load(H + offs, mask=ok, other=0.0).to(tl.float32), TANH)
    if HAS_NEURONS:
        slot = tl.load(SLOT + cols, mask=col_ok, other=-1)  # [BLOCK_F]: k of a selected column, else -1
        sel = slot >= 0
        t = rows % T
        b = (rows // T).to(tl.int64)
        vidx = b[:, None] * K + slot[None, :]
        is_reg = (t >= P1)[:, None] & sel[None, :] & ok
        reg = tl.load(REG + vidx, mask=is_reg, other=0.0)
        a = tl.where(is_reg, reg, a)
        if PATCH_MODE != 3:
            is_patch = ((t >= P0) & (t < P1))[:, None] & sel[None, :] & ok
            fill = tl.load(FILL + vidx, mask=is_patch, other=0.0)
            if PATCH_MODE == 2:
                thresh = tl.load(THRESH + vidx, mask=is_patch, other=0.0)
                is_patch = is_patch & (a > thresh)
            a = tl.where(is_patch, fill, a)
    tl.store(OUT + offs, a.to(OUT.dtype.element_ty), mask=ok)


def ttr_activation_triton(
    h: Tensor,
    neurons: Tensor,
    out: Tensor,
    *,
    num_registers: int,
    num_prefix_tokens: int,
    patch_values: str,
    register_value: str,
    tanh: bool,
) -> None:
    """Writes ttr_activation(h) into out [B, T, F], contiguous; h [B, T, F]; neurons [K] int64 (on
    the CPU or on h's device), validated."""
    if not out.numel():
        return
    h = h.contiguous()
    neurons = neurons.to(h.device, non_blocking=True).contiguous()
    B, T, F = h.shape
    K = neurons.numel()
    p0, p1 = num_prefix_tokens, T - num_registers
    f32 = dict(dtype=torch.float32, device=h.device)
    reg = fill = thresh = slot = h.new_empty(0, dtype=torch.float32)
    mode = PATCH_VALUES.index(patch_values)
    if K:
        hi, lo = torch.empty(B, K, **f32), torch.empty(B, K, **f32)
        fill, thresh = torch.zeros(B, K, **f32), torch.zeros(B, K, **f32)
        outliers = patch_values == "only_outliers" and p1 > p0
        _ttr_column_values_kernel[(B * K,)](
            h, neurons, hi, lo, fill, thresh,
            T, F, K, p0, p1,
            TANH=tanh, OUTLIERS=outliers, BLOCK_T=128 if not triton_interpreting() else 64,
        )  # fmt: skip
        if register_value == "max":
            reg = hi
        else:  # signed max; "layer_signed_max": one value per image, over every token and selected column
            if register_value == "layer_signed_max":
                hi, lo = hi.amax(1, keepdim=True), lo.amin(1, keepdim=True)
            reg = torch.where(hi >= -lo, hi, lo).expand(B, K).contiguous()
        if patch_values == "mean" and p1 > p0:
            cols = torch.nn.functional.gelu(
                h[:, p0:p1].index_select(2, neurons).float(), approximate="tanh" if tanh else "none"
            )  # [B, P, K]: the selected columns only
            m = bottom_mean_count(p1 - p0)
            fill = cols.topk(m, dim=1, largest=False).values.mean(1).contiguous()
        slot = torch.full((F,), -1, dtype=torch.int32, device=h.device)
        slot[neurons] = torch.arange(K, dtype=torch.int32, device=h.device)
    rows = B * T
    block_f = min(128, triton.next_power_of_2(F))
    block_r = max(1, min(64, 1024 // block_f))  # 8 elements per thread: registers for full occupancy
    grid = (triton.cdiv(rows, block_r), triton.cdiv(F, block_f))
    _ttr_activation_kernel[grid](
        h, out, slot, reg, fill, thresh,
        T, F, max(K, 1), p0, p1, rows,
        TANH=tanh, HAS_NEURONS=K > 0, PATCH_MODE=mode, BLOCK_R=block_r, BLOCK_F=block_f,
    )  # fmt: skip
