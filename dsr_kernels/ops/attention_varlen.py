"""``dsr_kernels.attention_varlen``: register attention over packed variable-length sequences.

flash-attn's varlen layout: the sequences of a batch are packed along one token axis
(q [Tq, H, D], k [Tk, Hk, D], v [Tk, Hk, Dv]) and ``cu_seqlens_q`` / ``cu_seqlens_k``
(S + 1 offsets) say where each starts, so no padding is stored or computed. Every
sequence attends only to its own keys (and the registers, and the sink).

Backends: "cpu" runs the C++ kernel of csrc/cpu/attention.cpp, whose tasks are
(sequence, head, query block) — one launch, no loop over sequences; "torch" and
"reference" loop over the sequences in Python, calling the batch op on each (the
definition, and the fallback where no kernel takes the call); the Triton kernels
take them the same way (program rows are (sequence, head), sequence offsets are read in
the kernels).

The op is registered with ``torch.library`` (``dsr_kernels::attention_varlen_fwd`` /
``_bwd``, fake implementations and autograd) for the kernel backends.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from dsr_kernels.backends import resolve
from dsr_kernels.ops.attention import MAX_HEAD_DIM, MAX_SEQLEN, _check_tensor, _last_dim_contiguous, _shape, attention
from dsr_kernels.types import AttentionStats

__all__ = ["attention_varlen"]

_ANY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_varlen_args(fn, q, k, v, cu_q, cu_k, max_q, max_k, kv_registers, sinks, num_prefix_tokens, scale):
    """Raises ValueError / TypeError naming the argument; returns (S, max_q, max_k) as ints."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t)
        if t.dim() != 3:
            what = {"q": "[Tq, H, D]", "k": "[Tk, Hk, D]", "v": "[Tk, Hk, Dv]"}[name]
            raise ValueError(f"{fn}(): argument '{name}' must be 3-D {what} (packed sequences), got {_shape(t)}")
    Tq, H, D = q.shape
    Tk, Hk, Dv = k.shape[0], k.shape[1], v.shape[2]
    if q.dtype not in _ANY_DTYPES:
        raise TypeError(f"{fn}(): argument 'q' must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}(): argument '{name}' must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but q is on {q.device}")
    if k.shape[2] != D or Hk == 0 or H % Hk != 0:
        raise ValueError(
            f"{fn}(): argument 'k' must have shape [Tk, Hk, D={D}] with Hk dividing H={H}, got {_shape(k)}"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{fn}(): argument 'v' must have shape [Tk={Tk}, Hk={Hk}, Dv] as k, got {_shape(v)}")
    if max(Tq, Tk) >= MAX_SEQLEN:
        raise ValueError(f"{fn}(): packed lengths must be below 2**31, got Tq={Tq}, Tk={Tk}")
    if H == 0 or D == 0 or Dv == 0:
        raise ValueError(f"{fn}(): empty heads or head dims, got q {_shape(q)}, v {_shape(v)}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}(): head dims must be at most {MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    offsets = []
    for name, cu, total in (("cu_seqlens_q", cu_q, Tq), ("cu_seqlens_k", cu_k, Tk)):
        _check_tensor(fn, name, cu)
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"{fn}(): argument '{name}' must be a 1-D int32 / int64 tensor of S + 1 >= 2 offsets, "
                f"got {_shape(cu)} {cu.dtype}"
            )
        if cu.device != q.device:
            raise ValueError(f"{fn}(): argument '{name}' is on {cu.device} but q is on {q.device}")
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
    if kv_registers is not None:
        if not isinstance(kv_registers, (tuple, list)) or len(kv_registers) != 2:
            raise TypeError(
                f"{fn}(): argument 'kv_registers' must be a pair (rk, rv), got {type(kv_registers).__name__}"
            )
        for name, t, d in (("kv_registers[0]", kv_registers[0], D), ("kv_registers[1]", kv_registers[1], Dv)):
            _check_tensor(fn, name, t)
            ok = (t.dim() == 3 and t.shape[0] == H and t.shape[2] == d) or (
                t.dim() == 4 and t.shape[0] == S and t.shape[1] == H and t.shape[3] == d
            )
            if not ok or t.shape[-2] == 0:
                raise ValueError(
                    f"{fn}(): argument '{name}' must have shape [H={H}, R, {d}] (shared) or [S={S}, H={H}, R, {d}] "
                    f"(per sequence) with R >= 1, got {_shape(t)}"
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(
                    f"{fn}(): argument '{name}' must have q's dtype and device, got {t.dtype} on {t.device}"
                )
        if kv_registers[0].shape[:-1] != kv_registers[1].shape[:-1]:
            raise ValueError(f"{fn}(): kv_registers keys and values must have the same shape but for the head dim")
    if sinks is not None:
        _check_tensor(fn, "sinks", sinks)
        if sinks.shape != (H,) or not sinks.is_floating_point() or sinks.device != q.device:
            raise ValueError(
                f"{fn}(): argument 'sinks' must be a floating [H={H}] tensor on q's device, got {_shape(sinks)}"
            )
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"{fn}(): argument 'num_prefix_tokens' must be an int >= 0, got {num_prefix_tokens!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{fn}(): argument 'scale' must be a finite number or None, got {scale!r}")
    return S, max(lengths_q), max(lengths_k), offsets


# ----------------------------------------------------------------------------- kernel op


def _alloc_fwd(q: Tensor, v: Tensor, rk: Tensor | None, S: int, max_k: int, return_stats: bool):
    Tq, H, _ = q.shape
    R = 0 if rk is None else rk.shape[-2]
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty(Tq, H, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(H, Tq, **f32)
    if return_stats:
        return out, lse, torch.empty(H, Tq, **f32), torch.empty(H, Tq, **f32), torch.empty(S, H, R + max_k, **f32)
    empty = torch.empty(0, **f32)
    return out, lse, empty, empty.clone(), empty.clone()


def _alloc_bwd(q, k, v, rk, rv, sinks):
    """Contiguous gradients (empty_like would copy the inputs' strides: a strided last dim, say)."""
    none = torch.empty(0, dtype=q.dtype, device=q.device)

    def like(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return (
        like(q),
        like(k),
        like(v),
        like(rk) if rk is not None else none,
        like(rv) if rv is not None else none.clone(),
        like(sinks) if sinks is not None else none.clone(),
    )


def _impl(backend: str, direction: str):
    module = importlib.import_module(f"dsr_kernels.{backend}.attention")
    return getattr(module, f"attention_varlen_{direction}_{backend}")


@torch.library.custom_op(
    "dsr_kernels::attention_varlen_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, Tensor? rk, Tensor? rv, Tensor? sinks, int num_prefix_tokens, float scale, bool causal, "
    "bool return_stats, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _varlen_fwd_op(
    q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, num_prefix_tokens, scale, causal, return_stats, backend
):
    outputs = _alloc_fwd(q, v, rk, cu_q.shape[0] - 1, max_k, return_stats)
    _impl(backend, "fwd")(
        q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, num_prefix_tokens, scale, causal, return_stats, *outputs
    )
    return outputs


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, num_prefix_tokens, scale, causal, return_stats, backend):
    return _alloc_fwd(q, v, rk, cu_q.shape[0] - 1, max_k, return_stats)


@torch.library.custom_op(
    "dsr_kernels::attention_varlen_bwd",
    mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, Tensor? rk, "
    "Tensor? rv, Tensor? sinks, Tensor out, Tensor lse, float scale, bool causal, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _varlen_bwd_op(dout, q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, out, lse, scale, causal, backend):
    grads = _alloc_bwd(q, k, v, rk, rv, sinks)
    dq, dk, dv, drk, drv, dsinks = grads
    _impl(backend, "bwd")(
        dout, q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, out, lse, scale, causal, dq, dk, dv,
        drk if rk is not None else None, drv if rv is not None else None, dsinks if sinks is not None else None,
    )  # fmt: skip
    return grads


@_varlen_bwd_op.register_fake
def _(dout, q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, out, lse, scale, causal, backend):
    return _alloc_bwd(q, k, v, rk, rv, sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, rk, rv, sinks, _, scale, causal, _, backend = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, rk, rv, sinks, output[0], output[1])
    ctx.scale, ctx.causal, ctx.backend, ctx.max_q, ctx.max_k = scale, causal, backend, max_q, max_k


def _backward(ctx, dout, *_stat_grads):
    q, k, v, cu_q, cu_k, rk, rv, sinks, out, lse = ctx.saved_tensors
    dq, dk, dv, drk, drv, dsinks = torch.ops.dsr_kernels.attention_varlen_bwd(
        dout, q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, rk, rv, sinks, out, lse, ctx.scale, ctx.causal, ctx.backend
    )
    return (dq, dk, dv, None, None, None, None, drk if rk is not None else None, drv if rv is not None else None,
            dsinks if sinks is not None else None, None, None, None, None, None)  # fmt: skip


torch.library.register_autograd("dsr_kernels::attention_varlen_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- per-sequence loop


def _loop(q, k, v, offsets, kv_registers, sinks, causal, num_prefix_tokens, scale, max_k, backend):
    """The "torch" / "reference" path: the batch op on each sequence, results packed as the kernel's."""
    Tq, H, _ = q.shape
    Dv, S = v.shape[2], len(offsets[0]) - 1
    R = 0 if kv_registers is None else kv_registers[0].shape[-2]
    out = q.new_zeros(Tq, H, Dv)
    f32 = dict(dtype=torch.float32, device=q.device)
    lse, entropy, share = torch.full((H, Tq), -math.inf, **f32), torch.zeros(H, Tq, **f32), torch.zeros(H, Tq, **f32)
    key_mass = torch.zeros(S, H, R + max_k, **f32)
    pieces = []
    for s in range(S):
        (q0, q1), (k0, k1) = offsets[0][s : s + 2], offsets[1][s : s + 2]
        if q1 == q0:
            continue
        regs = None if kv_registers is None else tuple(t if t.dim() == 3 else t[s : s + 1] for t in kv_registers)
        qs = q[q0:q1].transpose(0, 1)[None]  # [1, H, nq, D]
        ks, vs = k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        prefix = min(num_prefix_tokens, k1 - k0)
        if k1 == k0:
            if regs is None:  # nothing but the sink to attend: out = 0 (no value), p_sink = 1
                if sinks is not None:  # (a NaN or +inf sink: a NaN row, out too: the NaN contract)
                    sink = sinks.float().masked_fill(sinks == float("inf"), float("nan"))
                    undefined = torch.where(sink.isnan(), float("nan"), 0.0)
                    lse[:, q0:q1] = sink[:, None]
                    entropy[:, q0:q1] = share[:, q0:q1] = undefined[:, None]
                    if undefined.isnan().any():
                        pieces.append((q0, q1, undefined[None, :, None].expand(q1 - q0, H, Dv).to(q.dtype)))
                continue
            ks, vs = (t.expand(1, *t.shape[-3:]) for t in regs)  # the registers are the only keys
            regs, prefix = None, R  # (and count in the register share)
        o, st = attention(
            qs, ks, vs, kv_registers=regs, sinks=sinks, causal=causal and k1 > k0,
            num_prefix_tokens=prefix, scale=scale, return_stats=True, backend=backend,
        )  # fmt: skip
        pieces.append((q0, q1, o[0].transpose(0, 1)))
        lse[:, q0:q1], entropy[:, q0:q1], share[:, q0:q1] = st.lse[0], st.entropy[0], st.register_share[0]
        key_mass[s, :, : st.key_mass.shape[-1]] = st.key_mass[0]
    if pieces:  # (assembled by cat, so that gradients flow to every sequence's q, k, v)
        parts, end = [], 0
        for q0, q1, o in pieces:
            parts += [out[end:q0], o]
            end = q1
        out = torch.cat(parts + [out[end:]])
    return out, AttentionStats(lse, entropy, share, key_mass)


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
        return_stats: also return the statistics per sequence: lse, entropy,
            register_share [H, Tq] (packed as the queries; flash-attn's softmax_lse layout)
            and key_mass [S, H, R + max_seqlen_k] (sequence s's registers then its keys,
            zeros past its keys).

    Returns:
        out [Tq, H, Dv] in q's dtype, or ``(out, stats)``.
    """
    fn = "attention_varlen"
    S, long_q, long_k, offsets = _check_varlen_args(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_registers, sinks, num_prefix_tokens,
        scale,
    )  # fmt: skip
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))  # (any strides: as attention's)
    if kv_registers is not None:
        kv_registers = tuple(_last_dim_contiguous(t) for t in kv_registers)
    max_q = long_q if max_seqlen_q is None else max_seqlen_q
    max_k = long_k if max_seqlen_k is None else max_seqlen_k
    needs = ("varlen",) + (("value_head_dim",) if v.shape[-1] != q.shape[-1] else ())
    backend = resolve("attention", backend, q, needs)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend in ("torch", "reference"):
        out, stats = _loop(q, k, v, offsets, kv_registers, sinks, causal, num_prefix_tokens, scale, max_k, backend)
        return (out, stats) if return_stats else out
    rk, rv = kv_registers if kv_registers is not None else (None, None)
    out, lse, entropy, share, key_mass = torch.ops.dsr_kernels.attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, rk, rv, sinks, num_prefix_tokens, scale, causal,
        return_stats, backend,
    )  # fmt: skip
    if not return_stats:
        return out
    return out, AttentionStats(lse.detach(), entropy.detach(), share.detach(), key_mass.detach())
