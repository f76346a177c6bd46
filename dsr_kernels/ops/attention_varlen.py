"""``dsr_kernels.attention_varlen``: register attention over packed variable-length sequences.

flash-attn's varlen layout: the sequences of a batch are packed along one token axis
(q [Tq, H, D], k [Tk, Hk, D], v [Tk, Hk, Dv]) and ``cu_seqlens_q`` / ``cu_seqlens_k``
(S + 1 offsets) say where each starts, so no padding is stored or computed. Every
sequence attends only to its own keys (and the registers, and the sink).

This file holds the public function and the checks of the packed layout; the call then
takes the same path as a batched one (:func:`dsr_kernels.ops.attention.run`, the custom
op ``dsr_kernels::attention_fwd`` with the offsets in its
:class:`~dsr_kernels.attention_call.AttentionCall`). Backends: "cpu" and "triton" run
their kernels, whose tasks are (sequence, head, query block), one launch, no loop over
sequences; "torch" and "reference" run one sequence at a time
(:func:`dsr_kernels.reference.attention.per_sequence`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.backends import resolve
from dsr_kernels.ops.attention import (
    MAX_SEQLEN,
    check_head_dims,
    check_operands,
    check_options,
    check_registers,
    check_sinks,
    run,
)
from dsr_kernels.types import AttentionStats
from dsr_kernels.validation import check_device, check_tensor, last_dim_contiguous, shape_str

__all__ = ["attention_varlen"]

_PACKED = {
    "q": "3-D [Tq, H, D] (packed sequences)",
    "k": "3-D [Tk, Hk, D] (packed sequences)",
    "v": "3-D [Tk, Hk, Dv] (packed sequences)",
}


def _check_varlen_args(fn, q, k, v, cu_q, cu_k, max_q, max_k, kv_registers, sinks, num_prefix_tokens, scale):
    """Raises ValueError / TypeError naming the argument; returns (S, max_q, max_k) as ints."""
    check_operands(fn, q, k, v, _PACKED)
    Tq, H, D = q.shape
    Tk, Hk, Dv = k.shape[0], k.shape[1], v.shape[2]
    if k.shape[2] != D or Hk == 0 or H % Hk != 0:
        raise ValueError(
            f"{fn}(): argument 'k' must have shape [Tk, Hk, D={D}] with Hk dividing H={H}, got {shape_str(k)}"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{fn}(): argument 'v' must have shape [Tk={Tk}, Hk={Hk}, Dv] as k, got {shape_str(v)}")
    if max(Tq, Tk) >= MAX_SEQLEN:
        raise ValueError(f"{fn}(): packed lengths must be below 2**31, got Tq={Tq}, Tk={Tk}")
    if H == 0 or D == 0 or Dv == 0:
        raise ValueError(f"{fn}(): empty heads or head dims, got q {shape_str(q)}, v {shape_str(v)}")
    check_head_dims(fn, D, Dv, q)
    offsets = []
    for name, cu, total in (("cu_seqlens_q", cu_q, Tq), ("cu_seqlens_k", cu_k, Tk)):
        check_tensor(fn, name, cu)
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"{fn}(): argument '{name}' must be a 1-D int32 / int64 tensor of S + 1 >= 2 offsets, "
                f"got {shape_str(cu)} {cu.dtype}"
            )
        check_device(fn, name, cu, q, "q")
        host = cu.tolist()  # S + 1 integers (a device sync on GPU, as flash-attn's own checks)
        if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:], strict=False)):
            raise ValueError(
                f"{fn}(): argument '{name}' must rise from 0 to {total} (the packed length) without decreasing, "
                f"got {host if len(host) <= 8 else host[:4] + ['...'] + host[-2:]}"
            )
        offsets.append(host)
    if len(offsets[0]) != len(offsets[1]):
        raise ValueError(
            f"{fn}(): cu_seqlens_q and cu_seqlens_k must hold one offset per sequence + 1, got "
            f"{len(offsets[0])} and {len(offsets[1])}"
        )
    S = len(offsets[0]) - 1
    lengths_q = [b - a for a, b in zip(offsets[0], offsets[0][1:], strict=False)]
    lengths_k = [b - a for a, b in zip(offsets[1], offsets[1][1:], strict=False)]
    for name, given, actual in (("max_seqlen_q", max_q, max(lengths_q)), ("max_seqlen_k", max_k, max(lengths_k))):
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < actual):
            raise ValueError(
                f"{fn}(): argument '{name}' must be an int >= the longest sequence ({actual}), got {given!r}"
            )
    check_registers(fn, kv_registers, q, ("S", S), H, D, Dv)
    check_sinks(fn, sinks, q, H)
    check_options(fn, num_prefix_tokens, None, scale)
    return S, max(lengths_q), max(lengths_k)


# ----------------------------------------------------------------------------- public API


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    causal: bool = False,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    return_stats: bool = False,
    key_mass_in_backward: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, AttentionStats]:
    """Register attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: [Tq, H, D], the S sequences' queries packed; k: [Tk, Hk, D], v: [Tk, Hk, Dv]
            (Hk dividing H: grouped K/V heads read in place). Any strides (a last
            dim that is not contiguous is copied).
        cu_seqlens_q, cu_seqlens_k: [S + 1] int32 / int64 offsets, rising from 0 to Tq /
            Tk: sequence s is rows cu[s] .. cu[s + 1]. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence (flash-attn's arguments);
            computed from the offsets when None. ``max_seqlen_k`` sizes ``key_mass``.
        kv_registers: (rk, rv), rk [H, R, D] shared by every sequence or [S, H, R, D] one
            set per sequence, rv the same with Dv.
        sinks: [H] attention-sink logits.
        causal: bottom-right aligned within each sequence (flash-attn's): query i of a
            sequence with nq queries and nk keys sees key j iff j <= i + nk - nq.
        num_prefix_tokens, scale, backend: as :func:`dsr_kernels.attention`.
        key_mass_in_backward: as :func:`dsr_kernels.attention`'s (the key mass summed by
            the backward; the "torch" backend, which runs one sequence at a time, and
            "reference" compute it in the forward).
        return_stats: also return the statistics per sequence: lse, entropy,
            register_share [H, Tq] (packed as the queries; flash-attn's softmax_lse layout)
            and key_mass [S, H, R + max_seqlen_k] (sequence s's registers then its keys,
            zeros past its keys).

    Returns:
        out [Tq, H, Dv] in q's dtype, or ``(out, stats)``.
    """
    fn = "attention_varlen"
    _, long_q, long_k = _check_varlen_args(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_registers, sinks, num_prefix_tokens,
        scale,
    )  # fmt: skip
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))  # (any strides: as attention's)
    rk, rv = (last_dim_contiguous(t) for t in kv_registers) if kv_registers is not None else (None, None)
    needs = ("varlen",) + (("value_head_dim",) if v.shape[-1] != q.shape[-1] else ())
    backend = resolve("attention", backend, q, needs)
    call = AttentionCall(
        q=q,
        k=k,
        v=v,
        rk=rk,
        rv=rv,
        sinks=sinks,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=long_q if max_seqlen_q is None else max_seqlen_q,
        max_seqlen_k=long_k if max_seqlen_k is None else max_seqlen_k,
        causal=int(Causal.BOTTOM_RIGHT if causal else Causal.NONE),
        num_prefix_tokens=num_prefix_tokens,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        return_stats=return_stats,
        key_mass_in_backward=bool(key_mass_in_backward),
    )
    out, stats = run(call, backend)
    return (out, stats) if return_stats else out
