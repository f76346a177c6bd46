"""Analytic FLOP counts of the reference models, from their configuration.

Counted: every matrix product of the forward pass -- patch embeddings (convolutions),
the timestep MLP, q/k/v and output projections, the MLPs, the adaLN projections (once per
sample, or per token in DiT^DH's head), the two attention products (Q K^T and P V, 2 T^2 D
multiply-adds per block), the final layer or head. Not counted: norms, softmax, RoPE,
activations, residual adds (as the published numbers do). ``macs`` are multiply-adds
(the DiT paper's "Gflops"); ``flops = 2 * macs``.

Each model counts its own parts (``model.macs_by_part()``, multiply-adds per sample,
built from :func:`block_macs`); :func:`flops` scales them to a batch.

Reproduces the published numbers: DiT-S/2, B/2, L/2, XL/2 at 256 px: 6.06, 23.0, 80.7,
118.6 GMACs; LightningDiT-S/B/XL on 256 RAE tokens of 768 channels: 12.4 / 46.6 / 238.1
GFLOPs, and with 36 registers (from block 4 for S and B, 8 for XL) 13.7 / 51.2 / 262.9.
The video models (:mod:`dsr_kernels.models.video`) count the same parts over their
sequences (per frame, per position, or all T x h x w tokens, registers included) and the
text cross-attention; ``tests/test_video.py`` checks them against
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class FlopCount(NamedTuple):
    """flops = 2 * macs for a batch; by_block: MACs of each part ("embed", "blocks.i", "final", ...)."""

    flops: int
    macs: int
    by_block: dict[str, int]


def mlp_macs(dim: int, hidden: int, *, gated: bool = False) -> int:
    """Multiply-adds of one token through an MLP dim -> hidden -> dim (SwiGLU: two input projections)."""
    return (3 if gated else 2) * dim * hidden


def attention_macs(queries: int, keys: int, dim: int) -> int:
    """Q K^T and P V of one sequence: 2 * queries * keys * dim (dim = heads x head dim)."""
    return 2 * queries * keys * dim


def block_macs(tokens: int, dim: int, mlp: int, *, adaln: int = 0, attention: int | None = None) -> int:
    """One transformer block over ``tokens`` tokens: qkv + proj (4 D^2 per token), the MLP
    (``mlp`` multiply-adds per token), Q K^T and P V (2 T^2 D: every token attends every
    token; ``attention`` gives them otherwise, e.g. the video models' per-frame
    sequences) and ``adaln`` more."""
    attn = attention_macs(tokens, tokens, dim) if attention is None else attention
    return tokens * (4 * dim * dim + mlp) + attn + adaln


def flops(model: nn.Module, batch_size: int = 1) -> FlopCount:
    """The forward FLOPs of ``model`` for ``batch_size`` samples (see the module docstring)."""
    count = getattr(model, "macs_by_part", None)
    if count is None:
        raise TypeError(f"flops(): {type(model).__name__} does not count its FLOPs (no macs_by_part() method)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"flops(): 'batch_size' must be an int >= 1, got {batch_size!r}")
    parts = count()
    macs = batch_size * sum(parts.values())
    by_block = {k: batch_size * v for k, v in parts.items()}
    return FlopCount(2 * macs, macs, by_block)
