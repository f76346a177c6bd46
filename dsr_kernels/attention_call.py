"""One record of an attention call, built once after validation and handed to every layer.

:class:`AttentionCall` holds everything a backend needs (q, k, v, the registers, sinks,
masks, packed-sequence offsets, rotary tables, causal alignment, scale, which statistics
to return, and whether the key mass comes from the backward). Its field list is the single source of

- the ``torch.library`` schemas of ``dsr_kernels::attention_fwd`` / ``attention_bwd``
  (:func:`schema`) and the custom op's argument order (:meth:`AttentionCall.as_args`);
- the argument order of the C++ ops ``dsr_kernels::attention_{fwd,bwd}_cpu``, whose schema
  (csrc/cpu/attention.cpp, ``kAttentionArgsSchema``) a test compares with :func:`schema`.

Adding an argument means a field here plus the kernels that use it.

Options have one representation from the top to the kernels: :class:`Causal` and
:class:`~dsr_kernels.rope.RopeStyle`, small ints (the kernels' constants).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

from torch import Tensor

from dsr_kernels.rope import RopeStyle

__all__ = ["AttentionCall", "AttentionGrads", "AttentionOutputs", "Causal", "RopeStyle", "schema"]


class Causal(IntEnum):
    """Which token keys a query sees (registers are always seen).

    ``TOP_LEFT``: key j visible to query i iff j <= i (torch's SDPA ``is_causal``);
    ``BOTTOM_RIGHT``: iff j <= i + Nk - Nq (flash-attn; per sequence for packed ones).
    Both are the usual lower triangle when Nq == Nk.
    """

    NONE = 0
    TOP_LEFT = 1
    BOTTOM_RIGHT = 2


def _f(schema_type: str, default=None):
    return field(default=default, metadata={"schema": schema_type})


@dataclass(frozen=True)
class AttentionCall:
    """A validated attention call; see :func:`dsr_kernels.attention` for the contract.

    Batched: q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv]. Packed sequences
    (``cu_seqlens_q`` given): q [Tq, H, D], k [Tk, Hk, D], v [Tk, Hk, Dv] and the
    offsets [S + 1] (int32 / int64); ``max_seqlen_*`` the longest sequence (0 when batched).
    rk [H, R, D] (shared) or [B | S, H, R, D], rv the same with Dv; sinks [H]; key_mask
    [B, Nk] bool; attn_mask bool or float, expanded to [B, H, Nq, Nk]; rope_cos /
    rope_sin [N, D] in the accumulation dtype (contiguous), ``rope_style`` a
    :class:`RopeStyle` (NONE without tables).
    """

    q: Tensor = _f("Tensor")
    k: Tensor = _f("Tensor")
    v: Tensor = _f("Tensor")
    rk: Tensor | None = _f("Tensor?")
    rv: Tensor | None = _f("Tensor?")
    sinks: Tensor | None = _f("Tensor?")
    key_mask: Tensor | None = _f("Tensor?")
    attn_mask: Tensor | None = _f("Tensor?")
    cu_seqlens_q: Tensor | None = _f("Tensor?")
    cu_seqlens_k: Tensor | None = _f("Tensor?")
    max_seqlen_q: int = _f("int", 0)
    max_seqlen_k: int = _f("int", 0)
    rope_cos: Tensor | None = _f("Tensor?")
    rope_sin: Tensor | None = _f("Tensor?")
    rope_style: int = _f("int", int(RopeStyle.NONE))
    causal: int = _f("int", int(Causal.NONE))
    num_prefix_tokens: int = _f("int", 0)
    scale: float = _f("float", 1.0)
    return_stats: bool = _f("bool", False)
    # With return_stats: the forward leaves key_mass to the backward, whose dK/dV pass sums
    # the probabilities it recomputes (dsr_kernels.outliers.record_training_statistics).
    key_mass_in_backward: bool = _f("bool", False)

    # ------------------------------------------------------------------ the argument list

    def as_args(self) -> tuple:
        """The fields in schema order (what the custom ops take)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_args(cls, args) -> AttentionCall:
        """The inverse of :meth:`as_args` (extra trailing arguments are ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**dict(zip(names, args, strict=False)))

    def replace(self, **changes) -> AttentionCall:
        return dataclasses.replace(self, **changes)

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The tensor fields in order (what autograd saves); :meth:`with_tensors` restores them."""
        return tuple(getattr(self, name) for name in _TENSOR_FIELDS)

    def with_tensors(self, tensors) -> AttentionCall:
        return self.replace(**dict(zip(_TENSOR_FIELDS, tensors, strict=True)))

    # ------------------------------------------------------------------ derived facts

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def num_registers(self) -> int:
        return 0 if self.rk is None else self.rk.shape[-2]

    @property
    def num_sequences(self) -> int:
        """B, or S for packed sequences."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else self.q.shape[0]

    @property
    def causal_offset(self) -> int | None:
        """Batched calls: key j is visible to query i iff j <= i + offset (None: no causal mask)."""
        if self.causal == Causal.NONE:
            return None
        return 0 if self.causal == Causal.TOP_LEFT else self.k.shape[-2] - self.q.shape[-2]


_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionCall) if f.metadata["schema"].startswith("Tensor"))


def schema() -> str:
    """The call's fields as a ``torch.library`` argument list: ``Tensor q, ..., bool return_stats``."""
    return ", ".join(f"{f.metadata['schema']} {f.name}" for f in dataclasses.fields(AttentionCall))


class AttentionOutputs(NamedTuple):
    """What the forward writes: out (q's dtype), lse (float32; float64 for float64 inputs)
    and, with statistics, entropy, register_share (as lse's shape) and key_mass [B | S, H,
    R + Nk] (float32; empty [0] tensors without)."""

    out: Tensor
    lse: Tensor
    entropy: Tensor
    register_share: Tensor
    key_mass: Tensor


class AttentionGrads(NamedTuple):
    """What the backward writes: gradients of q, k, v and, where the call has them, of
    rk, rv and sinks (None where it does not)."""

    dq: Tensor
    dk: Tensor
    dv: Tensor
    drk: Tensor | None
    drv: Tensor | None
    dsinks: Tensor | None
