"""``dsr_kernels.norm_modulate``: norm + adaLN modulation + register insertion + token norms.

Public function, validation (one place, before any launch), backend dispatch and the
autograd formula shared by the compiled op (``dsr_kernels::norm_modulate_fwd``, defined
in csrc/ops.cpp with CPU, CUDA and Meta kernels) and the Triton op
(``dsr_kernels::norm_modulate_fwd_triton``, a Python custom op with a fake kernel).

Implementations, side by side:
- reference: ``dsr_kernels/reference/norm_modulate.py`` (float64, the definition)
- cpu / cuda: ``csrc/cpu/norm_modulate.cpp``, ``csrc/cuda/norm_modulate.cu``
- triton:    ``dsr_kernels/triton/norm_modulate.py``

Which one runs: :func:`dsr_kernels.backends.resolve` (the registry of every op's backends).
"""

import math

import torch
from torch import Tensor

from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import check_name, resolve
from dsr_kernels.reference.norm_modulate import norm_modulate_ref
from dsr_kernels.types import FLOATS, NormModulateResult

KINDS = ("layernorm", "rmsnorm")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_norm_modulate_args(x, shift, scale, weight, bias, kind, eps, registers, backend) -> None:
    fn = "norm_modulate"
    check_name(fn, backend)
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}(): argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}(): argument 'x' must be 3-D [B, N, D], got shape {_shape(x)}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{fn}(): argument 'x' must be float16, bfloat16 or float32, got {x.dtype}")
    B, N, D = x.shape
    if D == 0:
        raise ValueError(f"{fn}(): argument 'x' must have D >= 1, got shape {_shape(x)}")
    if kind not in KINDS:
        raise ValueError(f"{fn}(): argument 'kind' must be one of {KINDS}, got {kind!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}(): argument 'eps' must be a finite number > 0, got {eps!r}")
    expected = {"shift": (B, D), "scale": (B, D), "weight": (D,), "bias": (D,)}
    for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias), ("registers", registers)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}(): argument '{name}' must be a torch.Tensor or None, got {type(t).__name__}")
        if name == "registers":
            if not ((t.dim() == 2 and t.shape[1] == D) or (t.dim() == 3 and t.shape[0] == B and t.shape[2] == D)):
                raise ValueError(
                    f"{fn}(): argument 'registers' must have shape [R, D={D}] or [B={B}, R, D={D}], got {_shape(t)}"
                )
        elif tuple(t.shape) != expected[name]:
            want = ", ".join(
                f"{n}={v}"
                for n, v in zip(("B", "D") if len(expected[name]) == 2 else ("D",), expected[name], strict=True)
            )
            raise ValueError(f"{fn}(): argument '{name}' must have shape [{want}], got {_shape(t)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}(): argument '{name}' must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but x is on {x.device}")


# ----------------------------------------------------------------------------- Triton op

_FWD_SCHEMA = (
    "(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, Tensor? registers, str kind, "
    "float eps, bool return_norms, bool return_moments) "
    "-> (Tensor out, Tensor residual, Tensor norms, Tensor moments, Tensor mean, Tensor rstd)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor? dresidual, Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, "
    "Tensor? registers, Tensor mean, Tensor rstd, str kind) "
    "-> (Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias, Tensor dregisters)"
)


def _alloc_fwd(x, registers, kind, return_norms, return_moments):
    """Outputs as the compiled op allocates them (empty [0] tensors stand for 'none')."""
    B, N, D = x.shape
    T = N + (0 if registers is None else registers.shape[-2])
    stat = dict(dtype=torch.float32, device=x.device)

    def maybe(shape, keep, **opts):
        return torch.empty(shape if keep else (0,), **opts)

    return (
        torch.empty(B, T, D, dtype=x.dtype, device=x.device),
        maybe((B, T, D), registers is not None, dtype=x.dtype, device=x.device),
        maybe((B, T), return_norms, **stat),
        maybe((B, T, 2), return_moments, **stat),
        maybe((B, T), kind == "layernorm", **stat),
        torch.empty(B, T, **stat),
    )


def _alloc_bwd(x, shift, scale, weight, bias, registers):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, *(like(t) for t in (shift, scale, weight, bias, registers))


@torch.library.custom_op("dsr_kernels::norm_modulate_fwd_triton", mutates_args=(), schema=_FWD_SCHEMA)
def _norm_modulate_fwd_triton(x, shift, scale, weight, bias, registers, kind, eps, return_norms, return_moments):
    from dsr_kernels.triton.norm_modulate import norm_modulate_fwd_triton

    outs = _alloc_fwd(x, registers, kind, return_norms, return_moments)
    out, residual, norms, moments, mean, rstd = outs
    if out.numel():
        contiguous = [t.contiguous() if t is not None else None for t in (x, shift, scale, weight, bias, registers)]
        norm_modulate_fwd_triton(
            *contiguous,
            kind == "layernorm",
            eps,
            out,
            residual if registers is not None else None,
            norms if return_norms else None,
            moments if return_moments else None,
            mean if kind == "layernorm" else None,
            rstd,
        )
    return outs


@_norm_modulate_fwd_triton.register_fake
def _(x, shift, scale, weight, bias, registers, kind, eps, return_norms, return_moments):
    return _alloc_fwd(x, registers, kind, return_norms, return_moments)


@torch.library.custom_op("dsr_kernels::norm_modulate_bwd_triton", mutates_args=(), schema=_BWD_SCHEMA)
def _norm_modulate_bwd_triton(dout, dresidual, x, shift, scale, weight, bias, registers, mean, rstd, kind):
    from dsr_kernels.triton.norm_modulate import ROWS_PER_CHUNK, norm_modulate_bwd_triton

    dx, dshift, dscale, dweight, dbias, dregisters = _alloc_bwd(x, shift, scale, weight, bias, registers)
    B, N, D = x.shape
    T = N + (0 if registers is None else registers.shape[-2])
    chunks = -(-T // ROWS_PER_CHUNK)
    f32 = dict(dtype=torch.float32, device=x.device)
    partials = {
        name: torch.zeros(B, chunks, D, **f32)
        for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias))
        if t is not None
    }
    dregs = torch.zeros(B, registers.shape[-2], D, **f32) if registers is not None else None
    if B * T:
        x_, scale_, weight_, bias_, regs_ = (
            t.contiguous() if t is not None else None for t in (x, scale, weight, bias, registers)
        )
        dres = dresidual.contiguous() if dresidual is not None and dresidual.numel() else None
        norm_modulate_bwd_triton(
            dout.contiguous(),
            dres,
            x_,
            scale_,
            weight_,
            bias_,
            regs_,
            kind == "layernorm",
            mean if kind == "layernorm" else None,
            rstd,
            dx,
            dregs,
            partials,
        )
    for name, dst in (("shift", dshift), ("scale", dscale)):
        if name in partials:
            dst.copy_(partials[name].sum(1))
    for name, dst in (("weight", dweight), ("bias", dbias)):
        if name in partials:
            dst.copy_(partials[name].sum((0, 1)))
    if registers is not None:
        dregisters.copy_(dregs.sum(0) if registers.dim() == 2 else dregs)
    return dx, dshift, dscale, dweight, dbias, dregisters


@_norm_modulate_bwd_triton.register_fake
def _(dout, dresidual, x, shift, scale, weight, bias, registers, mean, rstd, kind):
    return _alloc_bwd(x, shift, scale, weight, bias, registers)


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, shift, scale, weight, bias, registers, kind, _eps, _norms, _moments = inputs
    ctx.save_for_backward(x, shift, scale, weight, bias, registers, output[4], output[5])
    ctx.kind = kind


def _backward_with(bwd_op):
    def backward(ctx, dout, dresidual, *_stat_grads):
        x, shift, scale, weight, bias, registers, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale, dweight, dbias, dregs = bwd_op(
            dout,
            dresidual if registers is not None else None,
            x,
            shift,
            scale,
            weight,
            bias,
            registers,
            mean,
            rstd,
            ctx.kind,
        )

        def keep(grad, t):
            return grad if t is not None else None

        return (
            dx,
            keep(dshift, shift),
            keep(dscale, scale),
            keep(dweight, weight),
            keep(dbias, bias),
            keep(dregs, registers),
            None,
            None,
            None,
            None,
        )

    return backward


torch.library.register_autograd(
    "dsr_kernels::norm_modulate_fwd_triton",
    _backward_with(torch.ops.dsr_kernels.norm_modulate_bwd_triton),
    setup_context=_setup_context,
)
if extension_loaded():
    torch.library.register_autograd(
        "dsr_kernels::norm_modulate_fwd",
        _backward_with(torch.ops.dsr_kernels.norm_modulate_bwd),
        setup_context=_setup_context,
    )


# ----------------------------------------------------------------------------- public API


def _norm_modulate(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor | None,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    kind: str,
    eps: float,
    registers: Tensor | None,
    return_norms: bool,
    return_moments: bool,
    backend: str,
) -> tuple[NormModulateResult, Tensor | None]:
    """norm_modulate plus, with return_moments, [B, T, 2] float32 (max |h_d|, sum h_d^4) per token."""
    _check_norm_modulate_args(x, shift, scale, weight, bias, kind, eps, registers, backend)
    if registers is not None and registers.shape[-2] == 0:
        registers = None  # R = 0 is no registers, for every backend (no residual; the Meta kernel agrees)
    backend = resolve("norm_modulate", backend, x)
    if backend == "reference":
        result = norm_modulate_ref(
            x,
            shift,
            scale,
            weight=weight,
            bias=bias,
            kind=kind,
            eps=eps,
            registers=registers,
            return_norms=return_norms,
        )
        moments = None
        if return_moments:
            h = result.residual if result.residual is not None else x
            h = h.detach().double()
            moments = torch.stack([h.abs().amax(-1), h.pow(4).sum(-1)], -1).float()
        return result, moments
    ops = torch.ops.dsr_kernels
    op = ops.norm_modulate_fwd_triton if backend == "triton" else ops.norm_modulate_fwd
    out, residual, norms, moments, _, _ = op(
        x, shift, scale, weight, bias, registers, kind, float(eps), return_norms, return_moments
    )
    result = NormModulateResult(
        out,
        residual if registers is not None else None,
        norms.detach().float() if return_norms else None,
    )
    return result, (moments.detach().float() if return_moments else None)


def norm_modulate(
    x: Tensor,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-6,
    registers: Tensor | None = None,
    return_norms: bool = False,
    backend: str = "auto",
) -> NormModulateResult:
    """Normalise, modulate (adaLN), insert registers and measure token norms in one pass.

    Equivalent to :func:`dsr_kernels.reference.norm_modulate.norm_modulate_ref`: over the
    tokens h of ``[registers ; x]``, y = norm(h) * weight + bias and
    out = y * (1 + scale[b]) + shift[b], where norm is LayerNorm ((h - mean) /
    sqrt(var + eps)) or RMSNorm (h / sqrt(mean(h^2) + eps)).

    Args:
        x: [B, N, D] float16 / bfloat16 / float32 (float64 on "cpu" and "reference").
        shift, scale: [B, D] adaLN modulation (either may be None), x's dtype.
        weight, bias: [D] optional affine of the norm (DiT: none; LightningDiT: RMSNorm
            with weight).
        kind: "layernorm" or "rmsnorm".
        eps: > 0 (DiT uses 1e-6).
        registers: [R, D] (shared, e.g. a learned parameter) or [B, R, D]. When given
            the kernel also writes the residual stream with the registers in front,
            [B, R + N, D] (no torch.cat), and ``out`` covers all R + N tokens: DSR's
            register_start block in one pass. R = 0 is the same as None (no residual).
        return_norms: also return the L2 norm of each input token [B, T] float32.
        backend: "auto" (compiled CUDA/CPU kernels when built, else Triton on CUDA, else
            "reference"), "cuda", "cpu", "triton" or "reference". An explicit backend
            that cannot run raises and says why.

    Gradients flow to x, shift, scale, weight, bias and registers (summed over the
    batch when shared), through ``out`` and ``residual``; norms are not differentiable.
    All backends accumulate in float32 (float64 for float64 inputs); the backward uses
    no atomics and is deterministic.

    Returns:
        :class:`NormModulateResult` (out [B, T, D], residual [B, R + N, D] or None,
        norms [B, T] or None), T = R + N.
    """
    result, _ = _norm_modulate(
        x,
        shift,
        scale,
        weight=weight,
        bias=bias,
        kind=kind,
        eps=eps,
        registers=registers,
        return_norms=return_norms,
        return_moments=False,
        backend=backend,
    )
    return result
