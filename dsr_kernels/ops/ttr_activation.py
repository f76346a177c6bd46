"""``dsr_kernels.ttr_activation``: the MLP activation with test-time registers, fused.

Public function, validation (one place, before any launch), backend dispatch and
autograd for the compiled op (``dsr_kernels::ttr_activation_fwd``, defined in
csrc/ops.cpp with CPU, CUDA and Meta kernels) and the Triton op
(``dsr_kernels::ttr_activation_fwd_triton``, a Python custom op with a fake kernel).

Implementations, side by side:
- reference: ``dsr_kernels/reference/ttr_activation.py`` (the definition)
- cpu / cuda: ``csrc/cpu/ttr_activation.cpp``, ``csrc/cuda/ttr_activation.cu``
- triton:    ``dsr_kernels/triton/ttr_activation.py``

Which one runs: :func:`dsr_kernels.backends.resolve` (the registry of every op's backends).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import check_name, resolve
from dsr_kernels.reference.ttr_activation import (
    APPROXIMATIONS,
    PATCH_VALUES,
    REGISTER_VALUES,
    bottom_mean_count,
    patch_std,
    ttr_activation_ref,
)
from dsr_kernels.types import FLOATS


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_neurons(fn: str, neurons, width: int, name: str = "neurons") -> Tensor:
    """``neurons`` as a [K] int64 CPU tensor of distinct columns in [0, width); raises otherwise.

    A device tensor is read back (a device sync) the first time only: the validated host
    copy is kept on the tensor, keyed by its version counter."""
    if isinstance(neurons, Tensor):
        if neurons.dim() != 1:
            raise ValueError(f"{fn}: argument '{name}' must be a 1-D tensor [K], got shape {_shape(neurons)}")
        if neurons.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{fn}: argument '{name}' must be an int64 tensor, got {neurons.dtype}")
        if neurons.device.type != "cpu":
            # Reading a device tensor waits for the device: do it once per tensor (and
            # again only after an in-place change), keeping the validated host copy.
            cached = getattr(neurons, "_dsr_checked_neurons", None)
            if cached is not None and cached[0] == neurons._version and cached[1] == width:
                return cached[2]
            values = check_neurons(fn, neurons.detach().to("cpu", torch.int64), width, name)
            neurons._dsr_checked_neurons = (neurons._version, width, values)
            return values
        values = neurons.detach().to(torch.int64)
    else:
        try:
            seq = list(neurons)
        except TypeError:
            raise TypeError(
                f"{fn}: argument '{name}' must be an int64 tensor or a sequence of ints, got {type(neurons).__name__}"
            ) from None
        if not all(_is_int(n) for n in seq):
            raise TypeError(f"{fn}: argument '{name}' must hold ints, got {seq!r}")
        values = torch.tensor(seq, dtype=torch.int64)
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= width:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{fn}: argument '{name}' holds {bad}, not a neuron index in [0, {width})")
        if values.unique().numel() != values.numel():
            raise ValueError(f"{fn}: argument '{name}' must hold distinct neurons, got {values.tolist()}")
    return values


def _check_args(fn, h, num_registers, num_prefix_tokens, patch_values, register_value, approximate, backend) -> None:
    check_name("ttr_activation", backend)
    if not isinstance(h, Tensor):
        raise TypeError(f"{fn}: argument 'h' must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 3:
        raise ValueError(f"{fn}: argument 'h' must be 3-D [B, T, F] (the fc1 output), got shape {_shape(h)}")
    if h.dtype not in FLOATS:
        raise TypeError(f"{fn}: argument 'h' must be float16, bfloat16, float32 or float64, got {h.dtype}")
    T = h.shape[1]
    if not _is_int(num_registers) or num_registers < 1:
        raise ValueError(f"{fn}: argument 'num_registers' must be an int >= 1, got {num_registers!r}")
    if not _is_int(num_prefix_tokens) or num_prefix_tokens < 0:
        raise ValueError(f"{fn}: argument 'num_prefix_tokens' must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens + num_registers > T:
        raise ValueError(
            f"{fn}: num_prefix_tokens ({num_prefix_tokens}) + num_registers ({num_registers}) exceed the "
            f"{T} tokens of 'h' {_shape(h)}"
        )
    for name, value, allowed in (
        ("patch_values", patch_values, PATCH_VALUES),
        ("register_value", register_value, REGISTER_VALUES),
        ("approximate", approximate, APPROXIMATIONS),
    ):
        if value not in allowed:
            raise ValueError(f"{fn}: argument '{name}' must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------- custom ops

_FWD_SCHEMA = (
    "(Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, str register_value, "
    "bool tanh) -> Tensor"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, "
    "str register_value, bool tanh) -> Tensor"
)


@torch.library.custom_op("dsr_kernels::ttr_activation_fwd_triton", mutates_args=(), schema=_FWD_SCHEMA)
def _ttr_activation_fwd_triton(h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    from dsr_kernels.triton.ttr_activation import ttr_activation_triton

    h = h.contiguous()
    out = torch.empty_like(h)
    if out.numel():
        ttr_activation_triton(
            h,
            neurons.to(h.device, non_blocking=True).contiguous(),
            out,
            num_registers=num_registers,
            num_prefix_tokens=num_prefix_tokens,
            patch_values=patch_values,
            register_value=register_value,
            tanh=tanh,
        )
    return out


@_ttr_activation_fwd_triton.register_fake
def _(h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsr_kernels::ttr_activation_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _ttr_activation_bwd(dout, h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    """dh = dout * gelu'(h), except in the selected columns: a register value's gradient goes to
    the token it came from; "zero" patches pass none; "mean" and "only_outliers" pass theirs to
    the patches their mean was taken over (a threshold comparison has no gradient).
    Computed with PyTorch ops on the K gathered columns, in float32 (float64 for float64 h)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    approx = "tanh" if tanh else "none"
    x, g = h.to(acc), dout.to(acc)
    dh = torch.ops.aten.gelu_backward(g, x, approximate=approx)
    K = neurons.numel()
    if K:
        neurons = neurons.to(h.device, non_blocking=True)  # (the forward may have been given them on the CPU)
        B, T, _ = h.shape
        p0, p1 = num_prefix_tokens, T - num_registers
        xs = x.index_select(2, neurons)  # [B, T, K]
        gs = g.index_select(2, neurons)
        a = torch.nn.functional.gelu(xs, approximate=approx)
        da = torch.ops.aten.gelu_backward(torch.ones_like(xs), xs, approximate=approx)  # gelu'(h) of the columns
        dsel = torch.zeros_like(xs)  # d loss / d a over the selected columns
        dsel[:, :p0] = gs[:, :p0]
        patch, gp = a[:, p0:p1], gs[:, p0:p1]
        if patch_values == "same":
            dsel[:, p0:p1] = gp
        elif patch_values == "mean" and p1 > p0:
            m = bottom_mean_count(p1 - p0)
            low = patch.topk(m, dim=1, largest=False).indices  # [B, m, K]
            share = (gp.sum(1, keepdim=True) / m).expand(-1, m, -1)
            dsel[:, p0:p1].scatter_add_(1, low, share)
        elif patch_values == "only_outliers" and p1 > p0:
            mean = patch.mean(1, keepdim=True)
            replaced = patch > mean + patch_std(patch)
            dsel[:, p0:p1] = gp.masked_fill(replaced, 0) + gp.masked_fill(~replaced, 0).sum(1, keepdim=True) / (p1 - p0)
        dv = gs[:, p1:].sum(1)  # [B, K]: d loss / d register value
        if register_value == "layer_signed_max":
            flat = a.reshape(B, T * K)
            hi, lo = flat.amax(1), flat.amin(1)
            src = torch.where(hi >= -lo, flat.argmax(1), flat.argmin(1))  # [B] flat (t, k)
            dsel.view(B, T * K).scatter_add_(1, src[:, None], dv.sum(1, keepdim=True))
        else:
            hi, lo = a.amax(1), a.amin(1)
            use_hi = hi >= -lo if register_value == "signed_max" else torch.ones_like(hi, dtype=torch.bool)
            src = torch.where(use_hi, a.argmax(1), a.argmin(1))  # [B, K] token index
            dsel.scatter_add_(1, src[:, None], dv[:, None])
        dh.index_copy_(2, neurons, dsel * da)
    return dh.to(h.dtype)


@_ttr_activation_bwd.register_fake
def _(dout, h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    h, neurons, *attrs = inputs
    ctx.save_for_backward(h, neurons)
    ctx.attrs = attrs


def _backward(ctx, dout):
    h, neurons = ctx.saved_tensors
    dh = torch.ops.dsr_kernels.ttr_activation_bwd(dout.contiguous(), h, neurons, *ctx.attrs)
    return dh, None, None, None, None, None, None


torch.library.register_autograd("dsr_kernels::ttr_activation_fwd_triton", _backward, setup_context=_setup_context)
if extension_loaded():
    torch.library.register_autograd("dsr_kernels::ttr_activation_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _ttr_activation(
    h: Tensor,
    neurons: Tensor,
    *,
    num_registers: int,
    num_prefix_tokens: int,
    patch_values: str,
    register_value: str,
    approximate: str,
    backend: str,
) -> Tensor:
    """The op without argument checks: ``neurons`` already validated, [K] int64 on the CPU
    (no device sync: the compiled op checks them again on the host and copies them
    asynchronously) or on h's device."""
    if backend == "reference":
        return ttr_activation_ref(
            h,
            neurons.to(h.device, non_blocking=True),
            num_registers=num_registers,
            num_prefix_tokens=num_prefix_tokens,
            patch_values=patch_values,
            register_value=register_value,
            approximate=approximate,
        )
    ops = torch.ops.dsr_kernels
    op = ops.ttr_activation_fwd_triton if backend == "triton" else ops.ttr_activation_fwd
    return op(h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, approximate == "tanh")


def ttr_activation(
    h: Tensor,
    neurons: Tensor | list[int] | None,
    *,
    num_registers: int = 1,
    num_prefix_tokens: int = 0,
    patch_values: str = "zero",
    register_value: str = "signed_max",
    approximate: str = "none",
    backend: str = "auto",
) -> Tensor:
    """GELU of an MLP's fc1 output with test-time registers, in one pass over the activation.

    Equivalent to :func:`dsr_kernels.reference.ttr_activation.ttr_activation_ref`. The
    sequence of T tokens is ``num_prefix_tokens`` prefix tokens (CLS, trained registers:
    never modified), the patches, then the ``num_registers`` test-time registers (extra
    tokens appended to the sequence). With a = gelu(h), the result is a except at the
    selected register neurons n:

    - in the register rows: the value of largest magnitude of a[b, :, n] over all tokens,
      sign kept (``register_value="signed_max"``; "max": the plain max, as in the first
      release; "layer_signed_max": one value per image over all tokens and all selected
      neurons, as in the DSR release);
    - in the patch rows (``patch_values``): 0 ("zero"); the mean of the lowest 75% of
      the image's patch activations ("mean"); activations above mean + std of the patches
      replaced by the mean ("only_outliers"); unchanged ("same").

    The selected columns are reduced first (B x T x K values: the register value and the
    patch statistics), then one pass over h writes gelu with the overwrites: the cost of
    the plain GELU plus K columns.

    Args:
        h: [B, T, F] fc1 output (pre-activation), float16 / bfloat16 / float32 (float64
            on "cpu" and "reference").
        neurons: [K] distinct column indices in [0, F) (an int64 tensor or a list of
            ints), the register neurons of this layer; empty or None: plain GELU.
        num_registers: >= 1, the trailing test-time register rows.
        num_prefix_tokens: >= 0, the leading rows left as they are (the released code
            skips row 0 even without a CLS token: pass 1 to reproduce it).
        approximate: GELU's "none" (erf) or "tanh" form.
        backend: "auto" (compiled CUDA/CPU kernels when built, else Triton on CUDA, else
            "reference"), "cuda", "cpu", "triton" or "reference". An explicit backend that
            cannot run raises and says why.

    Gradients flow to h (through the overwritten columns to the tokens that gave their
    values). Returns [B, T, F] in h's dtype, contiguous.
    """
    fn = "ttr_activation()"
    _check_args(fn, h, num_registers, num_prefix_tokens, patch_values, register_value, approximate, backend)
    idx = check_neurons(fn, [] if neurons is None else neurons, h.shape[2])  # [K] int64 on the CPU
    return _ttr_activation(
        h,
        idx,
        num_registers=num_registers,
        num_prefix_tokens=num_prefix_tokens,
        patch_values=patch_values,
        register_value=register_value,
        approximate=approximate,
        backend=resolve("ttr_activation", backend, h),
    )
