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


def rope_3d_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dim between (t, h, w): h and w get 2 (head_dim // 6) channels
    each, t the rest (128 -> 44, 42, 42; 72 -> 24, 24, 24; 64 -> 24, 20, 20)."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def rope_3d_tables(
    frames: int,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    *,
    split: tuple[int, int, int] | None = None,
    theta: float = 10000.0,
    style: str = "interleaved",
    num_identity_rows: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """3-D rotary tables for a frames x grid_h x grid_w token grid (video DiTs: Wan, CogVideoX,
    HunyuanVideo), token = (t * grid_h + row) * grid_w + col.

    The head dim is split between the three axes: ``split`` = (channels for t, for h, for w),
    each even, summing to head_dim; default :func:`rope_3d_split` (Wan 2.1's; HunyuanVideo
    uses (16, 56, 56) with theta 256, CogVideoX (D/4, 3D/8, 3D/8)). Each axis rotates its
    pairs by its own coordinate with frequencies theta^(-2i / channels of the axis), as
    Wan's ``rope_params`` and diffusers' ``get_1d_rotary_pos_embed`` per axis. With
    ``style="interleaved"`` (Wan's complex pairs, diffusers' ``use_real_unbind_dim=-1``)
    the axes take consecutive channel ranges, pairs (2i, 2i + 1); with ``"half"`` the pair
    angles (t's, then h's, then w's) fill pairs (i, i + D/2). ``num_identity_rows`` rows of
    (cos 1, sin 0) come first: tokens prepended to the sequence (registers) stay unrotated.

    Returns (cos, sin), each [num_identity_rows + frames * grid_h * grid_w, head_dim] float32.
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"rope_3d_tables(): style must be one of {ROPE_STYLES}, got {style!r}")
    split = rope_3d_split(head_dim) if split is None else tuple(split)
    if len(split) != 3 or any(c < 0 or c % 2 for c in split) or sum(split) != head_dim:
        raise ValueError(
            f"rope_3d_tables(): split must be 3 even channel counts summing to head_dim={head_dim}, got {split}"
        )
    angles = []  # per axis: [frames, grid_h, grid_w, channels / 2] pair angles
    for axis, (n, channels) in enumerate(zip((frames, grid_h, grid_w), split, strict=True)):
        freqs = theta ** (-torch.arange(0, channels, 2, dtype=torch.float64, device=device) / max(channels, 1))
        ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * freqs[None, :]
        shape = [1, 1, 1, channels // 2]
        shape[axis] = n
        angles.append(ang.view(shape).expand(frames, grid_h, grid_w, channels // 2))
    ang = torch.cat(angles, dim=-1).reshape(frames * grid_h * grid_w, head_dim // 2)
    ang = ang.repeat_interleave(2, dim=-1) if style == "interleaved" else torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().float(), ang.sin().float()
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
