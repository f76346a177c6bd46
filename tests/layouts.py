"""Tensors with the memory layouts real code hands to the ops, for the property tests.

A :class:`Layout` turns logical values into a tensor of the same shape and values laid
out in memory some other way: transposed storage, a stepped or narrowed slice of a larger
buffer (whose other elements are NaN, so that any element read by mistake shows), an odd
storage offset, a last dim that is not contiguous, ``expand`` (stride 0: the values are
made constant along that dim first) or ``unfold`` (overlapping rows: the values are a
sliding window over one longer row). ``build(base)`` makes the view from a base tensor
that may require grad, so the gradient of every layout lands in one leaf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor


def _garbage(t: Tensor):
    """What fills the storage around a view: NaN for floats (a stray read shows), else 0."""
    return float("nan") if t.is_floating_point() else 0


KINDS = ("contiguous", "transposed", "last_dim_strided", "step_slice", "padded_rows", "offset", "expanded", "unfolded")


@dataclass(frozen=True)
class Layout:
    kind: str = "contiguous"
    dim: int = 0  # the dim that is expanded, stepped or transposed with its neighbour

    def values(self, logical: Tensor) -> Tensor:
        """The values this layout can hold closest to ``logical`` (constant along an
        expanded dim; a sliding window for unfold), as a contiguous tensor of its shape."""
        if self.kind == "expanded" and logical.dim() > 0 and logical.shape[self.dim] > 1:
            return logical.narrow(self.dim, 0, 1).expand(logical.shape).contiguous()
        if self.kind == "unfolded" and logical.dim() >= 2:
            n, d = logical.shape[-2], logical.shape[-1]
            row = torch.cat([logical[..., 0, :], logical[..., 1:, -1]], dim=-1)  # [..., n + d - 1]
            return row.unfold(-1, d, 1).contiguous() if n > 0 and d > 0 else logical.contiguous()
        return logical.contiguous()

    def base(self, values: Tensor) -> Tensor:
        """The storage tensor (a leaf to take gradients on) for ``values`` (from :meth:`values`)."""
        shape, k = values.shape, self.kind
        if values.dim() == 0 or values.numel() == 0:
            return values.clone()
        if k == "transposed" and values.dim() >= 2:
            d = min(self.dim, values.dim() - 2)
            return values.transpose(d, d + 1).contiguous()
        if k == "last_dim_strided" and values.dim() >= 2:
            return values.transpose(-1, -2).contiguous()
        if k == "step_slice":
            d = self.dim % values.dim()
            big = list(shape)
            big[d] = 2 * shape[d] + 1
            storage = torch.full(big, _garbage(values), dtype=values.dtype)
            storage.narrow(d, 1, 2 * shape[d]).unflatten(d, (shape[d], 2)).select(d + 1, 0).copy_(values)
            return storage
        if k == "padded_rows":
            storage = torch.full((*shape[:-1], shape[-1] + 3), _garbage(values), dtype=values.dtype)
            storage[..., : shape[-1]] = values
            return storage
        if k == "offset":
            flat = torch.full((values.numel() + 1,), _garbage(values), dtype=values.dtype)
            flat[1:] = values.flatten()
            return flat
        if k == "expanded" and shape[self.dim] > 1:
            return values.narrow(self.dim, 0, 1).clone()
        if k == "unfolded" and values.dim() >= 2 and shape[-2] > 0 and shape[-1] > 0:
            return torch.cat([values[..., 0, :], values[..., 1:, -1]], dim=-1).clone()
        return values.clone()

    def build(self, base: Tensor, shape: torch.Size) -> Tensor:
        """The view of ``base`` (from :meth:`base`) with this layout and ``shape``."""
        k, n = self.kind, len(shape)
        if n == 0 or base.numel() == 0 or torch.Size(shape).numel() == 0:
            return base.view(shape) if base.shape != shape else base
        if k == "transposed" and n >= 2:
            d = min(self.dim, n - 2)
            return base.transpose(d, d + 1)
        if k == "last_dim_strided" and n >= 2:
            return base.transpose(-1, -2)
        if k == "step_slice":
            d = self.dim % n
            return base.narrow(d, 1, 2 * shape[d]).unflatten(d, (shape[d], 2)).select(d + 1, 0)
        if k == "padded_rows":
            return base[..., : shape[-1]]
        if k == "offset":
            return base[1:].view(shape)
        if k == "expanded" and shape[self.dim] > 1:
            return base.expand(shape)
        if k == "unfolded" and n >= 2:
            return base.unfold(-1, shape[-1], 1)
        return base

    def make(self, logical: Tensor) -> Tensor:
        """A tensor of ``logical``'s shape with this layout (its values: :meth:`values`)."""
        return self.build(self.base(self.values(logical)), logical.shape)


def layouts(ndim: int, kinds: tuple[str, ...] = KINDS):
    """A strategy of layouts for tensors of ``ndim`` dims (``dim`` in range)."""
    return st.builds(Layout, st.sampled_from(kinds), st.integers(0, max(0, ndim - 1)))


def plant(values: Tensor, where: str, value: float, index: tuple[int, ...]) -> Tensor:
    """values with ``value`` (NaN, +-inf) planted at one element, a row (last dim) or a
    column (one feature of every row), at ``index`` (taken modulo the shape)."""
    out = values.clone()
    if out.numel() == 0:
        return out
    idx = [i % s for i, s in zip(index, out.shape, strict=False)]
    if where == "element" or out.dim() < 2:
        out[tuple(idx)] = value
    elif where == "row":
        out[tuple(idx[:-1])] = value
    elif where == "column":
        out[(*idx[:-2], slice(None), idx[-1])] = value
    return out
