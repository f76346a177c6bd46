"""``dsr_kernels.norm_modulate``: norm + adaLN modulation + register insertion + token norms.

This file holds the public function, the validation (one place, before any launch), the
backend dispatch and the autograd formula, registered for both ops that run the kernels:
the compiled ``dsr_kernels::norm_modulate_fwd`` (CPU, CUDA and Meta kernels) and the
Triton ``dsr_kernels::norm_modulate_fwd_triton`` (a Python custom op with a fake kernel,
defined here so that ``torch.compile(fullgraph=True)`` traces through without importing triton).

Implementations, side by side:
- reference:  ``dsr_kernels/reference/norm_modulate.py`` (float64, the definition)
- cpu, cuda:  ``dsr_kernels/cpu/norm_modulate.py``, the compiled op of ``csrc/norm_modulate.cpp``
  (schema and registration) with the kernels of ``csrc/cpu/norm_modulate.cpp`` and
  ``csrc/cuda/norm_modulate.cu``
- triton:     ``dsr_kernels/triton/norm_modulate.py`` (kernels and launchers, imported when it first runs)

Which one runs: :func:`dsr_kernels.backends.resolve` (the registry of every op's backends).
"""

import math

import torch
from torch import Tensor

from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import check_name, resolve
from dsr_kernels.cpu.norm_modulate import norm_modulate_bwd_compiled, norm_modulate_fwd_compiled
from dsr_kernels.reference.norm_modulate import norm_modulate_ref
from dsr_kernels.types import FLOATS, NormModulateResult
from dsr_kernels.validation import check_device, check_dim, check_dtype, check_floating, check_tensor, shape_str

__all__ = ["KINDS", "norm_modulate", "norm_modulate_with_moments"]

KINDS = ("layernorm", "rmsnorm")


# ----------------------------------------------------------------------------- validation


def _check_norm_modulate_args(x, shift, scale, weight, bias, registers, kind, eps, backend) -> None:
    fn = "norm_modulate"
    check_name(fn, backend)
    check_tensor(fn, "x", x)
    check_dim(fn, "x", x, 3, "[B, N, D]")
    check_floating(fn, "x", x, FLOATS)
    B, N, D = x.shape
    if D == 0:
        raise ValueError(f"{fn}(): argument 'x' must have D >= 1, got shape {shape_str(x)}")
    if kind not in KINDS:
        raise ValueError(f"{fn}(): argument 'kind' must be one of {KINDS}, got {kind!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}(): argument 'eps' must be a finite number > 0, got {eps!r}")
    expected = {"shift": (B, D), "scale": (B, D), "weight": (D,), "bias": (D,)}
    for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias), ("registers", registers)):
        if check_tensor(fn, name, t, optional=True) is None:
            continue
        if name == "registers":
            if not ((t.dim() == 2 and t.shape[1] == D) or (t.dim() == 3 and t.shape[0] == B and t.shape[2] == D)):
                raise ValueError(
                    f"{fn}(): argument 'registers' must have shape [R, D={D}] or [B={B}, R, D={D}], got {shape_str(t)}"
                )
        elif tuple(t.shape) != expected[name]:
            dims = ("B", "D") if len(expected[name]) == 2 else ("D",)
            want = ", ".join(f"{n}={v}" for n, v in zip(dims, expected[name], strict=True))
            raise ValueError(f"{fn}(): argument '{name}' must have shape [{want}], got {shape_str(t)}")
        check_dtype(fn, name, t, x, "x")
        check_device(fn, name, t, x, "x")


# ----------------------------------------------------------------------------- Triton custom ops

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


def _triton():
    from dsr_kernels.triton import norm_modulate  # triton is imported here, when a kernel first runs

    return norm_modulate


@torch.library.custom_op("dsr_kernels::norm_modulate_fwd_triton", mutates_args=(), schema=_FWD_SCHEMA)
def _norm_modulate_fwd_triton(x, shift, scale, weight, bias, registers, kind, eps, return_norms, return_moments):
    outputs = _alloc_fwd(x, registers, kind, return_norms, return_moments)
    _triton().norm_modulate_fwd_triton((x, shift, scale, weight, bias, registers), outputs, kind=kind, eps=eps)
    return outputs


@_norm_modulate_fwd_triton.register_fake
def _(x, shift, scale, weight, bias, registers, kind, eps, return_norms, return_moments):
    return _alloc_fwd(x, registers, kind, return_norms, return_moments)


@torch.library.custom_op("dsr_kernels::norm_modulate_bwd_triton", mutates_args=(), schema=_BWD_SCHEMA)
def _norm_modulate_bwd_triton(dout, dresidual, x, shift, scale, weight, bias, registers, mean, rstd, kind):
    grads = _alloc_bwd(x, shift, scale, weight, bias, registers)
    inputs = (x, shift, scale, weight, bias, registers)
    _triton().norm_modulate_bwd_triton(dout, dresidual, inputs, mean, rstd, grads, kind=kind)
    return grads


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
        dresidual = dresidual if registers is not None else None
        grads = bwd_op(dout, dresidual, x, shift, scale, weight, bias, registers, mean, rstd, ctx.kind)
        # Only the tensor inputs given have a gradient; kind, eps and the two flags have none.
        inputs = (x, shift, scale, weight, bias, registers)
        return *(g if t is not None else None for g, t in zip(grads, inputs, strict=True)), None, None, None, None

    return backward


torch.library.register_autograd(
    "dsr_kernels::norm_modulate_fwd_triton",
    _backward_with(torch.ops.dsr_kernels.norm_modulate_bwd_triton),
    setup_context=_setup_context,
)
if extension_loaded():
    torch.library.register_autograd(
        "dsr_kernels::norm_modulate_fwd", _backward_with(norm_modulate_bwd_compiled), setup_context=_setup_context
    )


# ----------------------------------------------------------------------------- public API


def norm_modulate_with_moments(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    registers: Tensor | None,
    kind: str,
    eps: float,
    return_norms: bool,
    return_moments: bool,
    backend: str,
) -> tuple[NormModulateResult, Tensor | None]:
    """:func:`norm_modulate` and, with ``return_moments``, [B, T, 2] float32 (max |h_d|, sum h_d^4)
    per token h of ``[registers ; x]``, from the same pass (what :class:`~dsr_kernels.modules.NormModulate`
    records for the outlier statistics). Every argument as in :func:`norm_modulate`, in the
    custom ops' order, none optional."""
    _check_norm_modulate_args(x, shift, scale, weight, bias, registers, kind, eps, backend)
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
    fwd = torch.ops.dsr_kernels.norm_modulate_fwd_triton if backend == "triton" else norm_modulate_fwd_compiled
    out, residual, norms, moments, _, _ = fwd(
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
    result, _ = norm_modulate_with_moments(
        x, shift, scale, weight, bias, registers, kind, eps, return_norms, return_moments=False, backend=backend
    )
    return result
