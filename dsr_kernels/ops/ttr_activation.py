"""``dsr_kernels.ttr_activation``: the MLP activation with test-time registers, fused.

This file holds the public function, the validation (one place, before any launch), the
backend dispatch and the autograd registration for both ops that run the kernels: the
compiled ``dsr_kernels::ttr_activation_fwd`` (CPU, CUDA and Meta kernels) and the Triton
``dsr_kernels::ttr_activation_fwd_triton`` (a Python custom op with a fake kernel, defined
here so that ``torch.compile(fullgraph=True)`` traces through without importing triton).
Both share one backward op, ``dsr_kernels::ttr_activation_bwd``.

Implementations, side by side:
- reference:  ``dsr_kernels/reference/ttr_activation.py`` (the definition, and
  ``ttr_activation_backward``: its gradient in closed form, the backward of every backend)
- cpu, cuda:  ``dsr_kernels/cpu/ttr_activation.py``, the compiled op of ``csrc/ttr_activation.cpp``
  (schema and registration) with the kernels of ``csrc/cpu/ttr_activation.cpp`` and
  ``csrc/cuda/ttr_activation.cu``
- triton:     ``dsr_kernels/triton/ttr_activation.py`` (kernels and launcher, imported when it first runs)

Which one runs: :func:`dsr_kernels.backends.resolve` (the registry of every op's backends).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import check_name, resolve
from dsr_kernels.cpu.ttr_activation import ttr_activation_fwd_compiled
from dsr_kernels.reference.ttr_activation import (
    APPROXIMATIONS,
    PATCH_VALUES,
    REGISTER_VALUES,
    ttr_activation_backward,
    ttr_activation_ref,
)
from dsr_kernels.types import FLOATS
from dsr_kernels.validation import check_choice, check_dim, check_floating, check_int, check_tensor, is_int, shape_str

__all__ = ["check_neurons", "ttr_activation", "ttr_activation_op"]


# ----------------------------------------------------------------------------- validation


def check_neurons(fn: str, neurons, width: int, name: str = "neurons") -> Tensor:
    """``neurons`` as a [K] int64 CPU tensor of distinct columns in [0, width); raises otherwise.

    A device tensor is read back (a device sync) the first time only: the validated host
    copy is kept on the tensor, keyed by its version counter."""
    if isinstance(neurons, Tensor):
        if neurons.dim() != 1:
            raise ValueError(f"{fn}: argument '{name}' must be a 1-D tensor [K], got shape {shape_str(neurons)}")
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
        if not all(is_int(n) for n in seq):
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


def _check_ttr_activation_args(h, num_registers, num_prefix_tokens, patch_values, register_value, approximate, backend):
    fn = "ttr_activation"
    check_name(fn, backend)
    check_tensor(fn, "h", h)
    check_dim(fn, "h", h, 3, "[B, T, F] (the fc1 output)")
    check_floating(fn, "h", h, FLOATS)
    T = h.shape[1]
    check_int(fn, "num_registers", num_registers, 1)
    check_int(fn, "num_prefix_tokens", num_prefix_tokens, 0)
    if num_prefix_tokens + num_registers > T:
        raise ValueError(
            f"{fn}(): num_prefix_tokens ({num_prefix_tokens}) + num_registers ({num_registers}) exceed the "
            f"{T} tokens of 'h' {shape_str(h)}"
        )
    check_choice(fn, "patch_values", patch_values, PATCH_VALUES)
    check_choice(fn, "register_value", register_value, REGISTER_VALUES)
    check_choice(fn, "approximate", approximate, APPROXIMATIONS)


# ----------------------------------------------------------------------------- custom ops

_FWD_SCHEMA = (
    "(Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, str register_value, "
    "bool tanh) -> Tensor"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, "
    "str register_value, bool tanh) -> Tensor"
)


def _alloc_out(h: Tensor) -> Tensor:
    """The output (and dh) as the compiled op allocates it: h's shape and dtype, contiguous."""
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsr_kernels::ttr_activation_fwd_triton", mutates_args=(), schema=_FWD_SCHEMA)
def _ttr_activation_fwd_triton(h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    from dsr_kernels.triton.ttr_activation import ttr_activation_triton  # triton is imported here, on first use

    out = _alloc_out(h)
    ttr_activation_triton(
        h,
        neurons,
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
    return _alloc_out(h)


@torch.library.custom_op("dsr_kernels::ttr_activation_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _ttr_activation_bwd(dout, h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    return ttr_activation_backward(
        dout, h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh
    )


@_ttr_activation_bwd.register_fake
def _(dout, h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, tanh):
    return _alloc_out(h)


# ----------------------------------------------------------------------------- autograd


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


def ttr_activation_op(
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
    """:func:`ttr_activation` without the argument checks, for callers that made them once
    (a module checks its neurons buffer when it changes, not on every call).

    ``neurons`` already validated (:func:`check_neurons`), [K] int64 on the CPU (no device
    sync: the compiled op checks them again on the host and copies them asynchronously) or
    on h's device; ``backend`` already resolved (:func:`dsr_kernels.backends.resolve`), not
    "auto". Traced by ``torch.compile(fullgraph=True)`` without a graph break."""
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
    fwd = torch.ops.dsr_kernels.ttr_activation_fwd_triton if backend == "triton" else ttr_activation_fwd_compiled
    return fwd(h, neurons, num_registers, num_prefix_tokens, patch_values, register_value, approximate == "tanh")


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
    _check_ttr_activation_args(h, num_registers, num_prefix_tokens, patch_values, register_value, approximate, backend)
    idx = check_neurons("ttr_activation()", [] if neurons is None else neurons, h.shape[2])  # [K] int64 on the CPU
    return ttr_activation_op(
        h,
        idx,
        num_registers=num_registers,
        num_prefix_tokens=num_prefix_tokens,
        patch_values=patch_values,
        register_value=register_value,
        approximate=approximate,
        backend=resolve("ttr_activation", backend, h),
    )
