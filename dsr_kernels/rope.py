"""Rotary position embeddings: tables and their application, shared by every backend.

A table pair ``(cos, sin)`` is [N, D] (one row per token position, one column per head
channel). Rotating x [..., N, D]:

    rope(x)[d] = x[d] * cos[d] + sign[d] * x[partner(d)] * sin[d]

with, for ``style="interleaved"`` (EVA, LightningDiT), pairs (2i, 2i + 1): partner(d) =
d xor 1 and sign = -1 on even d, +1 on odd d; for ``style="half"`` (GPT-NeoX, Llama),
pairs (i, i + D/2): sign = -1 on the first half. A row with cos = 1 and sin = 0 leaves
its token unrotated (DSR's in-sequence registers). The Triton attention kernels apply
the same formula to q and k tiles as they load them.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

ROPE_STYLES = ("interleaved", "half")


class RopeStyle(IntEnum):
    """How the kernels pair channels: the value of their ``ROPE`` constant (0: no rotary tables)."""

    NONE = 0
    INTERLEAVED = 1  # pairs (2i, 2i + 1)
    HALF = 2  # pairs (i, i + D/2)

    @classmethod
    def parse(cls, style: str | int) -> RopeStyle:
        """``"interleaved"`` / ``"half"`` (the public spelling) or a RopeStyle."""
        return cls(style) if isinstance(style, int) else cls(ROPE_STYLES.index(style) + 1)

    @property
    def label(self) -> str:
        """The public spelling ("interleaved", "half")."""
        return ROPE_STYLES[self - 1]


def _partner(x: Tensor, style: str | RopeStyle) -> Tensor:
    """x[..., partner(d)] for every d."""
    D = x.shape[-1]
    if RopeStyle.parse(style) == RopeStyle.INTERLEAVED:
        return x.unflatten(-1, (D // 2, 2)).flip(-1).flatten(-2)
    return torch.cat([x[..., D // 2 :], x[..., : D // 2]], dim=-1)


def _sign(D: int, style: str | RopeStyle, like: Tensor) -> Tensor:
    d = torch.arange(D, device=like.device)
    first = d % 2 == 0 if RopeStyle.parse(style) == RopeStyle.INTERLEAVED else d < D // 2
    return torch.where(first, -1.0, 1.0).to(like.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, style: str | RopeStyle) -> Tensor:
    """rope(x) for x [..., N, D] with tables [N, D] (broadcast over leading dims)."""
    return x * cos + _sign(x.shape[-1], style, x) * _partner(x, style) * sin


def apply_rope_transpose(g: Tensor, cos: Tensor, sin: Tensor, style: str | RopeStyle) -> Tensor:
    """The transpose (adjoint) of :func:`apply_rope`: the gradient w.r.t. x given g = dL/d rope(x).

    dx[e] = g[e] cos[e] + sign[p(e)] g[p(e)] sin[p(e)], p the (involutive) partner map.
    """
    return g * cos + _partner(_sign(g.shape[-1], style, g) * g * sin, style)


def rope_2d_tables(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    num_identity_rows: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """EVA-style 2D rotary tables for a grid_h x grid_w token grid, interleaved pairs.

    As EVA-02's ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)`` (used
    by LightningDiT, RAE, DSR and JiT), computed the same way in float32 so that the
    tables equal their checkpoint buffers: frequencies theta^(-2i / (head_dim / 2)),
    each repeated for its channel pair; the first half of the channels rotates with
    the row index, the second half with the column index (token = row * grid_w + col).
    ``num_identity_rows`` rows of (cos 1, sin 0) come first: tokens prepended to the
    sequence (registers, in-context tokens) that are not rotated.

    Returns (cos, sin), each [num_identity_rows + grid_h * grid_w, head_dim] float32.
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_tables(): head_dim must be a multiple of 4, got {head_dim}")
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))

    def axis(n: int) -> Tensor:  # [n, dim]: angle of each channel (pairs repeated)
        pos = torch.arange(n, device=device, dtype=torch.float32)
        return (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)

    ang = torch.cat(
        [axis(grid_h)[:, None, :].expand(grid_h, grid_w, dim), axis(grid_w)[None, :, :].expand(grid_h, grid_w, dim)],
        dim=-1,
    ).reshape(grid_h * grid_w, head_dim)
    cos, sin = ang.cos(), ang.sin()
    if num_identity_rows:
        cos = torch.cat([torch.ones(num_identity_rows, head_dim, device=device), cos])
        sin = torch.cat([torch.zeros(num_identity_rows, head_dim, device=device), sin])
    return cos, sin


def rope_1d_tables(
    length: int, head_dim: int, *, theta: float = 10000.0, style: str = "half", device=None
) -> tuple[Tensor, Tensor]:
    """Plain 1D rotary tables [length, head_dim] float32 for the given pairing style."""
    if head_dim % 2:
        raise ValueError(f"rope_1d_tables(): head_dim must be even, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / head_dim)
    ang = torch.arange(length, dtype=torch.float64, device=device)[:, None] * freqs[None, :]
    ang = ang.repeat_interleave(2, dim=-1) if style == "interleaved" else torch.cat([ang, ang], dim=-1)
    return torch.cos(ang).float(), torch.sin(ang).float()
