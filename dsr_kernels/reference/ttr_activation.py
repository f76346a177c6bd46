"""Reference MLP activation with test-time registers: the definition.

Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need Trained Registers"
(2025): a few "register neurons" of the MLPs create the outlier tokens. At inference
their activation is moved out of the image patches into one extra token appended to the
sequence (the test-time register), which then plays the part of a trained register.

Differentiable with plain autograd; ``compute_dtype`` float64 is the test oracle, the
input dtype gives "eager PyTorch at that dtype" (the error baseline of the tests).
:func:`ttr_activation_backward` is its gradient in closed form, the backward of every
fused backend (custom op ``dsr_kernels::ttr_activation_bwd``, dsr_kernels/ops/ttr_activation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsr_kernels.types import FLOATS, Backend

BACKEND = Backend("reference", None, FLOATS)  # any device, any float dtype: the definition

PATCH_VALUES = ("zero", "mean", "only_outliers", "same")
REGISTER_VALUES = ("signed_max", "max", "layer_signed_max")
APPROXIMATIONS = ("none", "tanh")
MEAN_BOTTOM_FRACTION = 0.75  # "mean": the mean of the lowest 75% of the patch activations (as released)


def signed_max(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """The value of largest magnitude along ``dim``, sign kept (the positive one on a tie)."""
    hi, lo = x.amax(dim), x.amin(dim)
    return torch.where(hi >= -lo, hi, lo)


def patch_std(patch: Tensor) -> Tensor:
    """Unbiased std over dim 1 (as torch.std), keepdim; NaN for a single patch (then nothing is replaced)."""
    if patch.shape[1] < 2:
        return torch.full_like(patch[:, :1], float("nan"))
    return patch.std(1, keepdim=True)


def bottom_mean_count(patches: int) -> int:
    """How many of the lowest patch activations "mean" averages: int(0.75 P), at least 1."""
    return max(1, int(MEAN_BOTTOM_FRACTION * patches))


def ttr_activation_ref(
    h: Tensor,
    neurons: Tensor | None,
    *,
    num_registers: int = 1,
    num_prefix_tokens: int = 0,
    patch_values: str = "zero",
    register_value: str = "signed_max",
    approximate: str = "none",
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """GELU of the fc1 output with the selected neurons redirected into the test-time registers.

    h [B, T, F]: the MLP's pre-activation over T = P + N + R tokens: ``num_prefix_tokens``
    P (CLS, trained registers: never modified), N patches, then the R =
    ``num_registers`` test-time registers (appended zero tokens). neurons [K] int64:
    distinct columns of this layer. With a = gelu(h) (``approximate`` "none": erf,
    "tanh": the tanh form), the result is a except, at each selected column n:

    - register rows: ``register_value`` of a[b, :, n] over all T tokens: "signed_max"
      (the value of largest magnitude, sign kept), "max", or "layer_signed_max" (one value
      per image: the signed max over all tokens and all K selected columns);
    - patch rows, ``patch_values``: "zero" (0); "mean" (the mean of the lowest 75% of the
      image's patch activations of n); "only_outliers" (activations above mean + std of
      the patches, unbiased std, replaced by the mean); "same" (unchanged).

    Returns [B, T, F] in h's dtype.
    """
    a = F.gelu(h.to(compute_dtype), approximate=approximate)
    if neurons is None or neurons.numel() == 0:
        return a.to(h.dtype)
    T = h.shape[1]
    p0, p1 = num_prefix_tokens, T - num_registers
    idx = neurons.to(device=h.device, dtype=torch.long)
    sel = a[:, :, idx]  # [B, T, K]
    if register_value == "signed_max":
        reg = signed_max(sel, 1)  # [B, K]
    elif register_value == "max":
        reg = sel.amax(1)
    elif register_value == "layer_signed_max":
        reg = signed_max(sel, (1, 2))[:, None].expand(-1, sel.shape[2])
    else:
        raise ValueError(
            f"ttr_activation_ref(): register_value must be one of {REGISTER_VALUES}, got {register_value!r}"
        )
    patch = sel[:, p0:p1]  # [B, N, K]
    if patch_values == "zero":
        new = torch.zeros_like(patch)
    elif patch_values == "mean":
        low = patch.sort(dim=1).values[:, : bottom_mean_count(patch.shape[1])]
        new = low.mean(1, keepdim=True).expand_as(patch)
    elif patch_values == "only_outliers":
        mean = patch.mean(1, keepdim=True)
        thresh = mean + patch_std(patch)
        new = torch.where(patch > thresh, mean.expand_as(patch), patch)
    elif patch_values == "same":
        new = patch
    else:
        raise ValueError(f"ttr_activation_ref(): patch_values must be one of {PATCH_VALUES}, got {patch_values!r}")
    cols = torch.cat([sel[:, :p0], new, reg[:, None].expand(-1, T - p1, -1)], dim=1)  # [B, T, K]
    out = a.index_copy(2, idx, cols)
    return out.to(h.dtype)


def ttr_activation_backward(
    dout: Tensor,
    h: Tensor,
    neurons: Tensor,
    num_registers: int,
    num_prefix_tokens: int,
    patch_values: str,
    register_value: str,
    tanh: bool,
) -> Tensor:
    """dh, the gradient of :func:`ttr_activation_ref` given dout [B, T, F]; h [B, T, F], neurons
    [K] int64, the options in the order of the op ``dsr_kernels::ttr_activation_bwd`` (``tanh``:
    ``approximate="tanh"``).

    dh = dout * gelu'(h), except in the selected columns: a register value's gradient goes to
    the token it came from; "zero" patches pass none; "mean" and "only_outliers" pass theirs to
    the patches their mean was taken over (a threshold comparison has no gradient).
    Computed with PyTorch ops on the K gathered columns, in float32 (float64 for float64 h),
    on h's device; returns h's dtype.
    """
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
        a = F.gelu(xs, approximate=approx)
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
