"""Triton kernels of norm_modulate (backend ``"triton"``); the same algorithm as the CUDA ones.

Forward and dX: one program per BLOCK_ROWS rows (tokens) of [registers ; x], walking
the rows in BLOCK_D columns: pass 1 sums (and max |h|, sum h^4), pass 2 the centred variance
(LayerNorm), pass 3 writes out = (norm(h) * w + b) * (1 + scale) + shift and the residual.
Parameter gradients: one program per (sample, chunk of rows, channel tile) writing
partial sums that the launcher reduces in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsr_kernels.triton import triton_interpreting

ROWS_PER_CHUNK = 64  # as kRowsPerChunk in csrc/include/dsr_kernels/norm_modulate.h


@triton.jit
def _max_nan(a, b):
    """max that, as torch.amax, gives NaN when either is NaN (tl.max drops NaN)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_ptrs(X, REGS, rows, N, R, T, D, SHARED_REGISTERS: tl.constexpr):
    """Start of each row (b * T + t) of [registers ; x]: a pointer per row, int64 offsets."""
    rows64 = rows.to(tl.int64)
    b = rows64 // T
    t = rows64 % T
    if SHARED_REGISTERS:
        reg_off = t * D
    else:
        reg_off = (b * R + t) * D
    # Both offsets are formed for every row; only the selected pointer is dereferenced.
    return tl.where(t < R, REGS + reg_off, X + (b * N + t - R) * D)


@triton.jit
def _program_rows(X, REGS, N, R, T, D, ROWS, SHARED_REGISTERS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """This program's BLOCK_ROWS rows of [registers ; x]: int64 index b * T + t, in-range mask,
    sample b, token t and the pointer to each row's start."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rows64 = rows.to(tl.int64)
    src = _row_ptrs(X, REGS, rows, N, R, T, D, SHARED_REGISTERS)
    return rows64, rows < ROWS, rows64 // T, rows64 % T, src


@triton.jit
def _norm_modulate_fwd_kernel(
    X, REGS, SHIFT, SCALE, W, BIAS,
    OUT, RESIDUAL, NORMS, MOMENTS, MEAN, RSTD,
    N, R, T, D, ROWS, eps,
    SHARED_REGISTERS: tl.constexpr, LAYERNORM: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RETURN_NORMS: tl.constexpr,
    RETURN_MOMENTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = (norm(h) * w + bias) * (1 + scale[b]) + shift[b] for BLOCK_ROWS tokens h."""
    rows64, row_ok, b64, _, src = _program_rows(X, REGS, N, R, T, D, ROWS, SHARED_REGISTERS, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    acc_sum = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    acc_sq = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    acc_max = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    acc_4 = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for start in range(0, D, BLOCK_D):
        m = row_ok[:, None] & (start + cols < D)[None, :]
        h = tl.load(src[:, None] + (start + cols)[None, :], mask=m, other=0.0).to(tl.float32)
        acc_sum += h
        acc_sq += h * h
        if RETURN_MOMENTS:
            acc_max = tl.maximum(acc_max, tl.abs(h), propagate_nan=tl.PropagateNan.ALL)
            acc_4 += h * h * h * h
    sumsq = tl.sum(acc_sq, 1)
    if LAYERNORM:
        mean = tl.sum(acc_sum, 1) / D
        acc_var = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        for start in range(0, D, BLOCK_D):
            m = row_ok[:, None] & (start + cols < D)[None, :]
            h = tl.load(src[:, None] + (start + cols)[None, :], mask=m, other=0.0).to(tl.float32)
            diff = tl.where(m, h - mean[:, None], 0.0)
            acc_var += diff * diff
        var = tl.sum(acc_var, 1) / D
    else:
        mean = tl.zeros([BLOCK_ROWS], tl.float32)
        var = sumsq / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + rows64, rstd, mask=row_ok)
    if LAYERNORM:
        tl.store(MEAN + rows64, mean, mask=row_ok)
    if RETURN_NORMS:
        tl.store(NORMS + rows64, tl.sqrt(sumsq), mask=row_ok)
    if RETURN_MOMENTS:
        tl.store(MOMENTS + 2 * rows64, tl.reduce(acc_max, 1, _max_nan), mask=row_ok)
        tl.store(MOMENTS + 2 * rows64 + 1, tl.sum(acc_4, 1), mask=row_ok)

    for start in range(0, D, BLOCK_D):
        offs = start + cols
        col_ok = offs < D
        m = row_ok[:, None] & col_ok[None, :]
        h_raw = tl.load(src[:, None] + offs[None, :], mask=m, other=0.0)
        dst = rows64[:, None] * D + offs[None, :]
        if HAS_RESIDUAL:
            tl.store(RESIDUAL + dst, h_raw, mask=m)
        y = (h_raw.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        per_sample = b64[:, None] * D + offs[None, :]
        if HAS_SCALE:
            y = y * (1.0 + tl.load(SCALE + per_sample, mask=m, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            y = y + tl.load(SHIFT + per_sample, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + dst, y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _grad_xhat(src, DOUT, SCALE, W, rows64, b64, offs, m, col_ok, mean, rstd, D,
               HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr):
    """xhat and gxhat = dout * (1 + scale) * w on one [BLOCK_ROWS, BLOCK_D] tile."""
    xhat = (tl.load(src[:, None] + offs[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
    gx = tl.load(DOUT + rows64[:, None] * D + offs[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        gx = gx * (1.0 + tl.load(SCALE + b64[:, None] * D + offs[None, :], mask=m, other=0.0).to(tl.float32))
    if HAS_W:
        gx = gx * tl.load(W + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return xhat, gx


@triton.jit
def _norm_modulate_bwd_dx_kernel(
    X, REGS, SCALE, W, DOUT, DRES, MEAN, RSTD, DX, DREGS,
    N, R, T, D, ROWS,
    SHARED_REGISTERS: tl.constexpr, LAYERNORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dh = rstd (gxhat - mean(gxhat) - xhat mean(gxhat xhat)) + dresidual, gxhat = dout (1 + scale) w."""
    rows64, row_ok, b64, t64, src = _program_rows(X, REGS, N, R, T, D, ROWS, SHARED_REGISTERS, BLOCK_ROWS)
    rstd = tl.load(RSTD + rows64, mask=row_ok, other=0.0)
    if LAYERNORM:
        mean = tl.load(MEAN + rows64, mask=row_ok, other=0.0)
    else:
        mean = tl.zeros([BLOCK_ROWS], tl.float32)
    cols = tl.arange(0, BLOCK_D)
    acc1 = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        col_ok = offs < D
        m = row_ok[:, None] & col_ok[None, :]
        xhat, gx = _grad_xhat(src, DOUT, SCALE, W, rows64, b64, offs, m, col_ok, mean, rstd, D, HAS_SCALE, HAS_W)
        acc1 += gx
        acc2 += tl.where(m, gx * xhat, 0.0)
    if LAYERNORM:
        c1 = tl.sum(acc1, 1) / D
    else:
        c1 = tl.zeros([BLOCK_ROWS], tl.float32)
    c2 = tl.sum(acc2, 1) / D
    is_reg = t64 < R
    # Register rows go to the float32 per-sample buffer [B, R, D], token rows to dx [B, N, D].
    reg_dst = DREGS + (b64 * R + t64) * D
    x_dst = DX + (b64 * N + t64 - R) * D
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        col_ok = offs < D
        m = row_ok[:, None] & col_ok[None, :]
        xhat, gx = _grad_xhat(src, DOUT, SCALE, W, rows64, b64, offs, m, col_ok, mean, rstd, D, HAS_SCALE, HAS_W)
        dh = rstd[:, None] * (gx - c1[:, None] - xhat * c2[:, None])
        if HAS_DRES:
            dh += tl.load(DRES + rows64[:, None] * D + offs[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(reg_dst[:, None] + offs[None, :], dh, mask=m & is_reg[:, None])
        tl.store(x_dst[:, None] + offs[None, :], dh.to(DX.dtype.element_ty), mask=m & ~is_reg[:, None])


@triton.jit
def _norm_modulate_bwd_params_kernel(
    X, REGS, SCALE, W, BIAS, DOUT, MEAN, RSTD,
    P_SHIFT, P_SCALE, P_W, P_BIAS,
    N, R, T, D, CHUNKS,
    SHARED_REGISTERS: tl.constexpr, LAYERNORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, WANT_SHIFT: tl.constexpr, WANT_SCALE: tl.constexpr, WANT_W: tl.constexpr,
    WANT_BIAS: tl.constexpr, ROWS_PER_CHUNK: tl.constexpr, SUB_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial sums over one chunk of ROWS_PER_CHUNK rows of one sample, for one tile of channels."""
    task = tl.program_id(0)
    b64 = (task // CHUNKS).to(tl.int64)
    c = task % CHUNKS
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = offs < D
    one_plus_scale = tl.full([BLOCK_D], 1.0, tl.float32)
    if HAS_SCALE:
        one_plus_scale += tl.load(SCALE + b64 * D + offs, mask=col_ok, other=0.0).to(tl.float32)
    w = tl.full([BLOCK_D], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + offs, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs, mask=col_ok, other=0.0).to(tl.float32)
    s_shift = tl.zeros([BLOCK_D], tl.float32)
    s_scale = tl.zeros([BLOCK_D], tl.float32)
    s_w = tl.zeros([BLOCK_D], tl.float32)
    s_bias = tl.zeros([BLOCK_D], tl.float32)
    t_end = tl.minimum(T, c * ROWS_PER_CHUNK + ROWS_PER_CHUNK)
    for t0 in range(c * ROWS_PER_CHUNK, t_end, SUB_ROWS):
        t = t0 + tl.arange(0, SUB_ROWS)
        row_ok = t < t_end
        rows = b64 * T + t
        m = row_ok[:, None] & col_ok[None, :]
        src = _row_ptrs(X, REGS, rows, N, R, T, D, SHARED_REGISTERS)
        if LAYERNORM:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        else:
            mean = tl.zeros([SUB_ROWS], tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = (tl.load(src[:, None] + offs[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(DOUT + rows[:, None] * D + offs[None, :], mask=m, other=0.0).to(tl.float32)
        s_shift += tl.sum(g, 0)
        s_scale += tl.sum(g * (xhat * w[None, :] + bias[None, :]), 0)
        s_w += tl.sum(g * xhat, 0) * one_plus_scale
        s_bias += tl.sum(g, 0) * one_plus_scale
    out = task.to(tl.int64) * D + offs
    if WANT_SHIFT:
        tl.store(P_SHIFT + out, s_shift, mask=col_ok)
    if WANT_SCALE:
        tl.store(P_SCALE + out, s_scale, mask=col_ok)
    if WANT_W:
        tl.store(P_W + out, s_w, mask=col_ok)
    if WANT_BIAS:
        tl.store(P_BIAS + out, s_bias, mask=col_ok)


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): up to 1024 columns a step, several short rows a program.

    The CPU interpreter pays per program and per operation, not per element, so it gets
    more rows per program; the tiling does not change any row's arithmetic.
    """
    if triton_interpreting():
        block_d = min(4096, max(16, triton.next_power_of_2(D)))
        return max(1, min(64, 32768 // block_d)), block_d, 16
    # On a GPU: up to 1,024 columns a step (512 elements for short rows), at most 4 per
    # thread, so that the four float32 accumulators of the forward leave registers for
    # 50% occupancy or more (benchmarks/results/kernels-sm90).
    block_d = min(1024, max(16, triton.next_power_of_2(D)))
    return max(1, 512 // block_d), block_d, 8


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [t.contiguous() if t is not None else None for t in tensors]


def norm_modulate_fwd_triton(
    inputs: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    outputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
    *,
    kind: str,
    eps: float,
) -> None:
    """The forward of ``inputs`` = (x [B, N, D], shift, scale [B, D], weight, bias [D],
    registers [R, D] or [B, R, D]; None for those not given), into ``outputs`` = (out
    [B, T, D], residual [B, T, D], norms [B, T], moments [B, T, 2], mean [B, T], rstd [B, T])
    as dsr_kernels.ops.norm_modulate allocates them: an empty ``[0]`` tensor is an output
    not asked for (no registers, "rmsnorm", no norms or moments)."""
    out, residual, norms, moments, mean, rstd = outputs
    if not out.numel():
        return
    x, shift, scale, weight, bias, registers = _contiguous(*inputs)
    B, N, D = x.shape
    R = 0 if registers is None else registers.shape[-2]
    T = R + N
    layernorm = kind == "layernorm"
    has_residual, has_norms, has_moments = (t.numel() > 0 for t in (residual, norms, moments))
    block_rows, block, warps = _blocks(D)
    dummy = rstd  # the pointer passed for an absent tensor (never dereferenced)
    _norm_modulate_fwd_kernel[(triton.cdiv(B * T, block_rows),)](
        x, registers if registers is not None else x,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        out, residual if has_residual else out, norms if has_norms else dummy,
        moments if has_moments else dummy, mean if layernorm else dummy, rstd,
        N, R, T, D, B * T, eps,
        SHARED_REGISTERS=registers is not None and registers.dim() == 2, LAYERNORM=layernorm,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_W=weight is not None,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=has_residual, RETURN_NORMS=has_norms,
        RETURN_MOMENTS=has_moments, BLOCK_ROWS=block_rows, BLOCK_D=block, num_warps=warps,
    )


def norm_modulate_bwd_triton(
    dout: Tensor,
    dresidual: Tensor | None,
    inputs: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    mean: Tensor,
    rstd: Tensor,
    grads: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
    *,
    kind: str,
) -> None:
    """The gradients of the forward's ``inputs`` given dout [B, T, D] and dresidual (None, or
    empty, without registers) and its mean, rstd: into ``grads`` = (dx, dshift, dscale, dweight,
    dbias, dregisters) as dsr_kernels.ops.norm_modulate allocates them (empty ``[0]`` for an
    input that is None).

    dx and the float32 per-sample dregisters [B, R, D] come from one pass over the rows; the
    parameter gradients from float32 partial sums [B, chunks, D] over chunks of
    ROWS_PER_CHUNK rows, reduced here in a fixed order (no atomics: deterministic)."""
    x, shift, scale, weight, bias, registers = inputs
    dx, dshift, dscale, dweight, dbias, dregisters = grads
    B, N, D = x.shape
    R = 0 if registers is None else registers.shape[-2]
    T = R + N
    chunks = triton.cdiv(T, ROWS_PER_CHUNK)
    f32 = dict(dtype=torch.float32, device=x.device)
    partials = {
        name: torch.zeros(B, chunks, D, **f32)
        for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias))
        if t is not None
    }
    dregs = torch.zeros(B, R, D, **f32) if registers is not None else None
    if B * T:
        x, scale, weight, bias, registers = _contiguous(x, scale, weight, bias, registers)
        dres = dresidual.contiguous() if dresidual is not None and dresidual.numel() else None
        _launch_bwd(dout.contiguous(), dres, x, scale, weight, bias, registers, kind, mean, rstd, dx, dregs, partials)
    for name, dst in (("shift", dshift), ("scale", dscale)):
        if name in partials:
            dst.copy_(partials[name].sum(1))
    for name, dst in (("weight", dweight), ("bias", dbias)):
        if name in partials:
            dst.copy_(partials[name].sum((0, 1)))
    if registers is not None:
        dregisters.copy_(dregs.sum(0) if registers.dim() == 2 else dregs)


def _launch_bwd(
    dout: Tensor,
    dresidual: Tensor | None,
    x: Tensor,
    scale: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    registers: Tensor | None,
    kind: str,
    mean: Tensor,
    rstd: Tensor,
    dx: Tensor,
    dregisters: Tensor | None,
    partials: dict[str, Tensor],
) -> None:
    """The backward's kernels on contiguous inputs: dx, dregisters, and ``partials[name]`` for
    the names in shift / scale / weight / bias."""
    B, N, D = x.shape
    R = 0 if registers is None else registers.shape[-2]
    T = R + N
    layernorm = kind == "layernorm"
    block_rows, block, warps = _blocks(D)
    shared = registers is not None and registers.dim() == 2
    dummy = rstd
    mean = mean if layernorm else dummy
    _norm_modulate_bwd_dx_kernel[(triton.cdiv(B * T, block_rows),)](
        x, registers if registers is not None else x, scale if scale is not None else dummy,
        weight if weight is not None else dummy, dout, dresidual if dresidual is not None else dout,
        mean, rstd, dx, dregisters if dregisters is not None else dummy,
        N, R, T, D, B * T,
        SHARED_REGISTERS=shared, LAYERNORM=layernorm, HAS_SCALE=scale is not None, HAS_W=weight is not None,
        HAS_DRES=dresidual is not None, BLOCK_ROWS=block_rows, BLOCK_D=block, num_warps=warps,
    )
    if not partials:
        return
    chunks = triton.cdiv(T, ROWS_PER_CHUNK)
    # Channels are independent here, so the tile shape changes speed, not results: large
    # tiles keep the CPU interpreter's per-program overhead down.
    tile = min(1024 if triton_interpreting() else 256, max(16, triton.next_power_of_2(D)))
    sub_rows = ROWS_PER_CHUNK if triton_interpreting() else 4  # 8 elements per thread: occupancy
    _norm_modulate_bwd_params_kernel[(B * chunks, triton.cdiv(D, tile))](
        x, registers if registers is not None else x, scale if scale is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy, dout,
        mean, rstd,
        partials.get("shift", dummy), partials.get("scale", dummy), partials.get("weight", dummy),
        partials.get("bias", dummy),
        N, R, T, D, chunks,
        SHARED_REGISTERS=shared, LAYERNORM=layernorm, HAS_SCALE=scale is not None, HAS_W=weight is not None,
        HAS_BIAS=bias is not None, WANT_SHIFT="shift" in partials, WANT_SCALE="scale" in partials,
        WANT_W="weight" in partials, WANT_BIAS="bias" in partials, ROWS_PER_CHUNK=ROWS_PER_CHUNK,
        SUB_ROWS=sub_rows, BLOCK_D=tile,
        num_warps=4,
    )
