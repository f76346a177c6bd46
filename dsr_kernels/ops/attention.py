"""``dsr_kernels.attention``: attention over [registers ; tokens] with in-kernel statistics.

This file holds the public function, the validation (one place, before any launch), the
backend dispatch and the ``torch.library`` registration (custom ops ``dsr_kernels::
attention_fwd`` / ``attention_bwd`` with fake implementations and autograd), so that
``torch.compile(fullgraph=True)`` traces through it without a graph break.

Implementations, side by side:
- reference: ``dsr_kernels/reference/attention.py`` (float64, the definition)
- torch:     ``dsr_kernels/torch/attention.py`` (chunked PyTorch ops, any device)
- triton:    ``dsr_kernels/triton/attention.py`` (fused forward, statistics, backward)
- cpu:       ``dsr_kernels/cpu/attention.py``, launching the C++ kernels of
  ``csrc/cpu/attention.cpp`` (statistics in the same pass, FlashAttention-2 backward)

Which one runs: :func:`dsr_kernels.backends.resolve` (the registry of every op's backends).
Backend ``<name>`` other than the reference lives in ``dsr_kernels/<name>/attention.py``
as ``attention_fwd_<name>(call, outputs)`` / ``attention_bwd_<name>(call, dout, out, lse,
grads)``, imported when it first runs. Every layer takes one
:class:`~dsr_kernels.attention_call.AttentionCall`, built here after validation; packed
sequences (``attention_varlen``) are the same op with offsets in the call.
"""

import dataclasses
import importlib
import math

import torch
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, AttentionGrads, AttentionOutputs, Causal
from dsr_kernels.attention_call import schema as call_schema
from dsr_kernels.backends import resolve
from dsr_kernels.reference.attention import attention_call_ref
from dsr_kernels.rope import ROPE_STYLES, RopeStyle
from dsr_kernels.types import AttentionStats
from dsr_kernels.validation import check_device, check_dtype, check_tensor, last_dim_contiguous, shape_str

MAX_HEAD_DIM = 256
MAX_SEQLEN = 2**31  # row indices are 32-bit in the kernels (and BLAS's interface): checked before allocating
_ANY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
# Shared by the batched call (here) and packed sequences (attention_varlen.py): the parts
# that do not depend on the layout.


def check_operands(fn: str, q: Tensor, k: Tensor, v: Tensor, layout: dict[str, str]) -> None:
    """q, k, v are tensors of ``layout``'s rank (e.g. {"q": "[B, H, Nq, D]", ...}) with q's dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t)
        if t.dim() != layout[name].count(",") + 1:
            raise ValueError(f"{fn}(): argument '{name}' must be {layout[name]}, got shape {shape_str(t)}")
    if q.dtype not in _ANY_DTYPES:
        raise TypeError(f"{fn}(): argument 'q' must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        check_dtype(fn, name, t, q, "q")
        check_device(fn, name, t, q, "q")


def check_registers(fn: str, kv_registers, q: Tensor, lead: tuple[str, int], H: int, D: int, Dv: int):
    """kv_registers is None or (rk [H, R, D] | [lead, H, R, D], rv the same with Dv); returns (rk, rv)."""
    if kv_registers is None:
        return None, None
    if not isinstance(kv_registers, (tuple, list)) or len(kv_registers) != 2:
        raise TypeError(f"{fn}(): argument 'kv_registers' must be a pair (rk, rv), got {type(kv_registers).__name__}")
    rk, rv = kv_registers
    name0, n0 = lead
    for name, t, d in (("kv_registers[0]", rk, D), ("kv_registers[1]", rv, Dv)):
        check_tensor(fn, name, t)
        ok = (t.dim() == 3 and t.shape[0] == H and t.shape[2] == d) or (
            t.dim() == 4 and t.shape[0] == n0 and t.shape[1] == H and t.shape[3] == d
        )
        if not ok or t.shape[-2] == 0:
            what = "D" if t is rk else "Dv"
            raise ValueError(
                f"{fn}(): argument '{name}' must have shape [H={H}, R, {what}={d}] or "
                f"[{name0}={n0}, H={H}, R, {what}={d}] with R >= 1 (one register per query head), got {shape_str(t)}"
            )
        check_dtype(fn, name, t, q, "q")
        check_device(fn, name, t, q, "q")
    if rk.shape[:-1] != rv.shape[:-1]:
        raise ValueError(
            f"{fn}(): kv_registers keys and values must have the same shape but for the head dim, "
            f"got {shape_str(rk)} and {shape_str(rv)}"
        )
    return rk, rv


def check_sinks(fn: str, sinks: Tensor | None, q: Tensor, H: int) -> None:
    if sinks is None:
        return
    check_tensor(fn, "sinks", sinks)
    if sinks.shape != (H,):
        raise ValueError(f"{fn}(): argument 'sinks' must have shape [H={H}], got {shape_str(sinks)}")
    if not sinks.is_floating_point():
        raise TypeError(f"{fn}(): argument 'sinks' must be a floating tensor, got {sinks.dtype}")
    check_device(fn, "sinks", sinks, q, "q")


def check_head_dims(fn: str, D: int, Dv: int, q: Tensor) -> None:
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}(): head dims must be at most {MAX_HEAD_DIM}, got D={D}, Dv={Dv} (q {shape_str(q)})")


def check_options(fn: str, num_prefix_tokens: int, max_prefix: int | None, scale: float | None) -> None:
    """num_prefix_tokens an int in [0, max_prefix] (None: no upper bound); scale finite or None."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"{fn}(): argument 'num_prefix_tokens' must be an int, got {type(num_prefix_tokens).__name__}")
    if num_prefix_tokens < 0 or (max_prefix is not None and num_prefix_tokens > max_prefix):
        bound = f"[0, Nk={max_prefix}]" if max_prefix is not None else "[0, inf)"
        raise ValueError(f"{fn}(): argument 'num_prefix_tokens' must be in {bound}, got {num_prefix_tokens}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{fn}(): argument 'scale' must be a finite number or None, got {scale!r}")


_BATCHED = {"q": "4-D [B, H, Nq, D]", "k": "4-D [B, Hk, Nk, D]", "v": "4-D [B, Hk, Nk, Dv]"}


def check_attention_args(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_registers: tuple | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    num_prefix_tokens: int,
    scale: float | None,
) -> Tensor | None:
    """Raises ValueError/TypeError naming the argument; returns attn_mask viewed as 4-D."""
    check_operands(fn, q, k, v, _BATCHED)
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape[0] != B or k.shape[3] != D or Hk == 0 or H % Hk != 0:
        raise ValueError(
            f"{fn}(): argument 'k' must have shape [B={B}, Hk, Nk, D={D}] with Hk dividing H={H} "
            f"(Hk < H: grouped-query attention) to match q, got {shape_str(k)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}(): argument 'v' must have shape [B={B}, Hk={Hk}, Nk={Nk}, Dv] as k, got {shape_str(v)}")
    if Nq == 0 or Nk == 0 or B == 0 or H == 0 or D == 0 or Dv == 0:
        raise ValueError(
            f"{fn}(): empty inputs are not supported, got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    check_head_dims(fn, D, Dv, q)
    for name, n in (("Nq", Nq), ("Nk", Nk)):
        if n >= MAX_SEQLEN:
            raise ValueError(
                f"{fn}(): sequence lengths must be below 2**31 (the kernels index rows in 32 bits), got {name}={n} "
                f"(q {shape_str(q)}, k {shape_str(k)})"
            )
    rk, _ = check_registers(fn, kv_registers, q, ("B", B), H, D, Dv)
    if rk is not None and Nk + rk.shape[-2] >= MAX_SEQLEN:
        raise ValueError(f"{fn}(): R + Nk must be below 2**31, got R={rk.shape[-2]}, Nk={Nk}")
    check_sinks(fn, sinks, q, H)

    if key_mask is not None:
        check_tensor(fn, "key_mask", key_mask)
        if key_mask.dtype != torch.bool:
            raise TypeError(f"{fn}(): argument 'key_mask' must be a bool tensor, got {key_mask.dtype}")
        if key_mask.shape != (B, Nk):
            raise ValueError(f"{fn}(): argument 'key_mask' must have shape [B={B}, Nk={Nk}], got {shape_str(key_mask)}")
        check_device(fn, "key_mask", key_mask, q, "q")

    if attn_mask is not None:
        check_tensor(fn, "attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{fn}(): argument 'attn_mask' must be bool or floating, got {attn_mask.dtype}")
        check_device(fn, "attn_mask", attn_mask, q, "q")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{fn}(): gradients with respect to a float 'attn_mask' are not supported")
        target = (B, H, Nq, Nk)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)):
            raise ValueError(
                f"{fn}(): argument 'attn_mask' must be broadcastable to [B={B}, H={H}, Nq={Nq}, Nk={Nk}], "
                f"got {shape_str(attn_mask)}"
            )
        attn_mask = attn_mask.expand(target)  # a view with zero strides, never a copy

    check_options(fn, num_prefix_tokens, Nk, scale)
    return attn_mask


def _check_rope(fn: str, q: Tensor, k: Tensor, rope, rope_style: str) -> None:
    if rope_style not in ROPE_STYLES:
        raise ValueError(f"{fn}(): argument 'rope_style' must be one of {ROPE_STYLES}, got {rope_style!r}")
    if rope is None:
        return
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"{fn}(): argument 'rope' must be a pair (cos, sin), got {type(rope).__name__}")
    Nq, D, Nk = q.shape[2], q.shape[3], k.shape[2]
    if Nq != Nk:
        raise ValueError(f"{fn}(): argument 'rope' needs self-attention (Nq == Nk), got Nq={Nq}, Nk={Nk}")
    if D % 2:
        raise ValueError(f"{fn}(): argument 'rope' needs an even head dim, got D={D}")
    for name, t in (("rope[0]", rope[0]), ("rope[1]", rope[1])):
        check_tensor(fn, name, t)
        if tuple(t.shape) != (Nq, D):
            raise ValueError(f"{fn}(): argument '{name}' must have shape [N={Nq}, D={D}], got {shape_str(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}(): argument '{name}' must be floating, got {t.dtype}")
        check_device(fn, name, t, q, "q")
        if t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{fn}(): gradients with respect to '{name}' (the rope tables) are not supported")


# ----------------------------------------------------------------------------- custom ops


def alloc_outputs(call: AttentionCall) -> AttentionOutputs:
    """The forward's outputs (empty [0] tensors stand for statistics not asked for).

    Batched: out [B, H, Nq, Dv] in [B, Nq, H, Dv] memory order (out.transpose(1, 2)
    .reshape(B, Nq, H * Dv) is then free: the layout an output projection reads), lse and
    the row statistics [B, H, Nq], key_mass [B, H, R + Nk]. Packed sequences: out
    [Tq, H, Dv], the row statistics [H, Tq] (flash-attn's softmax_lse layout), key_mass
    [S, H, R + max_seqlen_k]. With ``key_mass_in_backward`` the forward leaves key_mass
    to the backward: it is NaN until the backward fills it in place (:func:`_backward`).
    """
    q, v = call.q, call.v
    f32 = dict(dtype=torch.float32, device=q.device)
    # lse is also what the backward recomputes probabilities from: float64 for float64
    # inputs (the public statistics are float32 either way).
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if call.varlen:
        Tq, H, _ = q.shape
        out = torch.empty(Tq, H, v.shape[-1], dtype=q.dtype, device=q.device)
        rows, keys = (H, Tq), (call.num_sequences, H, call.num_registers + call.max_seqlen_k)
    else:
        B, H, Nq, _ = q.shape
        out = torch.empty(B, Nq, H, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        rows, keys = (B, H, Nq), (B, H, call.num_registers + call.k.shape[2])
    lse = torch.empty(rows, dtype=lse_dtype, device=q.device)
    if call.return_stats:
        key_mass = torch.full(keys, math.nan, **f32) if call.key_mass_in_backward else torch.empty(keys, **f32)
        return AttentionOutputs(out, lse, torch.empty(rows, **f32), torch.empty(rows, **f32), key_mass)
    empty = torch.empty(0, **f32)
    return AttentionOutputs(out, lse, empty, empty.clone(), empty.clone())


def alloc_grads(call: AttentionCall) -> AttentionGrads:
    """Gradients in the layout of the forward's out (empty [0] tensors for absent registers / sinks)."""

    def like(t: Tensor) -> Tensor:
        if t.dim() == 4:  # [B, H, N, D], in [B, N, H, D] memory order
            B, H, N, D = t.shape
            return torch.empty(B, N, H, D, dtype=t.dtype, device=t.device).transpose(1, 2)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)  # packed [T, H, D]

    def small(t: Tensor | None) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else call.q.new_empty(0)

    return AttentionGrads(like(call.q), like(call.k), like(call.v), small(call.rk), small(call.rv), small(call.sinks))


def alloc_key_mass(call: AttentionCall) -> Tensor:
    """The backward's key mass: the forward's key_mass shape when the call leaves it to the
    backward, else an empty [0] tensor."""
    f32 = dict(dtype=torch.float32, device=call.q.device)
    if not (call.return_stats and call.key_mass_in_backward):
        return torch.empty(0, **f32)
    rows = call.num_sequences
    keys = call.num_registers + (call.max_seqlen_k if call.varlen else call.k.shape[2])
    return torch.empty(rows, call.q.shape[1], keys, **f32)  # (H is q's dim 1, batched or packed)


def _present(call: AttentionCall, grads: AttentionGrads) -> AttentionGrads:
    """The gradients as launchers take them: None for what the call does not have."""
    has_reg, has_sink = call.rk is not None, call.sinks is not None
    return grads._replace(
        drk=grads.drk if has_reg else None,
        drv=grads.drv if has_reg else None,
        dsinks=grads.dsinks if has_sink else None,
    )


def launcher(backend: str, direction: str):
    """``attention_{direction}_{backend}`` of ``dsr_kernels/{backend}/attention.py`` (imported when first run).

    The backward launchers also take ``key_mass=`` (a float32 [B | S, H, R + Nk] tensor to
    fill with the column sums of the probabilities they recompute, or None)."""
    module = importlib.import_module(f"dsr_kernels.{backend}.attention")  # triton is imported only here
    return getattr(module, f"attention_{direction}_{backend}")


_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_GRADS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_FWD_SCHEMA = f"({call_schema()}, str backend) -> {_OUTPUTS}"
_BWD_SCHEMA = f"(Tensor dout, Tensor out, Tensor lse, {call_schema()}, str backend) -> {_GRADS}"
# The same backward, and the key mass its dK/dV pass sums (calls with key_mass_in_backward);
# a second op so that attention_bwd keeps its six outputs for the callers that unpack them.
_BWD_KEY_MASS_SCHEMA = _BWD_SCHEMA.replace(_GRADS, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("dsr_kernels::attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _attention_fwd_op(*args):
    """args: the fields of :class:`AttentionCall`, then the backend."""
    call = AttentionCall.from_args(args)
    outputs = alloc_outputs(call)
    launcher(args[-1], "fwd")(call, outputs)
    return tuple(outputs)


@_attention_fwd_op.register_fake
def _(*args):
    return tuple(alloc_outputs(AttentionCall.from_args(args)))


def _bwd(dout, out, lse, args, with_key_mass: bool) -> tuple[AttentionGrads, Tensor]:
    call = AttentionCall.from_args(args)
    grads = alloc_grads(call)
    key_mass = alloc_key_mass(call) if with_key_mass else call.q.new_empty(0, dtype=torch.float32)
    extra = {"key_mass": key_mass} if key_mass.numel() else {}
    launcher(args[-1], "bwd")(call, dout, out, lse, _present(call, grads), **extra)
    return grads, key_mass


@torch.library.custom_op("dsr_kernels::attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _attention_bwd_op(dout, out, lse, *args):
    """args: the fields of :class:`AttentionCall`, then the backend."""
    return tuple(_bwd(dout, out, lse, args, False)[0])


@_attention_bwd_op.register_fake
def _(dout, out, lse, *args):
    return tuple(alloc_grads(AttentionCall.from_args(args)))


@torch.library.custom_op("dsr_kernels::attention_bwd_key_mass", mutates_args=(), schema=_BWD_KEY_MASS_SCHEMA)
def _attention_bwd_key_mass_op(dout, out, lse, *args):
    """attention_bwd's gradients, then the key mass (:func:`alloc_key_mass`'s shape)."""
    grads, key_mass = _bwd(dout, out, lse, args, True)
    return (*grads, key_mass)


@_attention_bwd_key_mass_op.register_fake
def _(dout, out, lse, *args):
    call = AttentionCall.from_args(args)
    return (*alloc_grads(call), alloc_key_mass(call))


def _setup_context(ctx, inputs, output):
    call = AttentionCall.from_args(inputs)
    ctx.save_for_backward(*call.tensors(), output[0], output[1])
    ctx.call, ctx.backend = call.with_tensors((None,) * len(call.tensors())), inputs[-1]
    # The backward fills the forward's key_mass in place (a detached alias: no reference cycle).
    ctx.key_mass = output[4].detach() if call.return_stats and call.key_mass_in_backward else None


def _backward(ctx, dout, *_stat_grads):
    *tensors, out, lse = ctx.saved_tensors
    call = ctx.call.with_tensors(tensors)
    if ctx.key_mass is None:
        dq, dk, dv, drk, drv, dsinks = torch.ops.dsr_kernels.attention_bwd(dout, out, lse, *call.as_args(), ctx.backend)
    else:
        dq, dk, dv, drk, drv, dsinks, key_mass = torch.ops.dsr_kernels.attention_bwd_key_mass(
            dout, out, lse, *call.as_args(), ctx.backend
        )
        # Into the user's stats.key_mass: eager tensors only (a traced graph has no such
        # side output; run() leaves the key mass to the forward under torch.compile).
        if type(ctx.key_mass) is Tensor:
            ctx.key_mass.copy_(key_mass)
    differentiable = {
        "q": dq,
        "k": dk,
        "v": dv,
        "rk": drk if call.rk is not None else None,
        "rv": drv if call.rk is not None else None,
        "sinks": dsinks if call.sinks is not None else None,
    }
    # masks, offsets, rope tables (not differentiable), sizes and flags, the backend: None
    return tuple(differentiable.get(f.name) for f in dataclasses.fields(AttentionCall)) + (None,)


torch.library.register_autograd("dsr_kernels::attention_fwd", _backward, setup_context=_setup_context)


def _needs_grad(call: AttentionCall) -> bool:
    return any(t is not None and t.requires_grad for t in (call.q, call.k, call.v, call.rk, call.rv, call.sinks))


def run(call: AttentionCall, backend: str) -> tuple[Tensor, AttentionStats]:
    """A validated call on a resolved backend: out and the statistics.

    "reference" is the definition, differentiable by autograd; "torch" runs packed
    sequences one at a time (its batched op per sequence, :func:`dsr_kernels.torch.
    attention.attention_varlen_torch`); every other call is the custom op.
    """
    if backend == "reference":
        return attention_call_ref(call)  # (key mass from the forward: autograd is its backward)
    if backend == "torch" and call.varlen:  # (per sequence: key mass from the forward)
        return launcher("torch", "varlen")(call.replace(key_mass_in_backward=False))
    if call.key_mass_in_backward and (
        not (call.return_stats and torch.is_grad_enabled() and _needs_grad(call)) or torch.compiler.is_compiling()
    ):  # no (eager) backward will fill it: the forward computes it
        call = call.replace(key_mass_in_backward=False)
    out, lse, entropy, register_share, key_mass = torch.ops.dsr_kernels.attention_fwd(*call.as_args(), backend)
    return out, AttentionStats(lse.detach().float(), entropy.detach(), register_share.detach(), key_mass.detach())


# ----------------------------------------------------------------------------- public API


def validated_attention(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    causal: Causal,
    num_prefix_tokens: int,
    scale: float | None,
    return_stats: bool,
    backend: str,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
    key_mass_in_backward: bool = False,
) -> tuple[Tensor, AttentionStats]:
    """Validates a batched call (errors name ``fn``), builds its :class:`AttentionCall` and runs it.

    Shared by :func:`attention` and the drop-in interfaces (``dsr_kernels.ops.attention_dropin``).
    """
    attn_mask = check_attention_args(fn, q, k, v, kv_registers, sinks, key_mask, attn_mask, num_prefix_tokens, scale)
    _check_rope(fn, q, k, rope, rope_style)
    # Any strides: the kernels read rows in place; a last dim that is not contiguous is
    # copied first, as torch's SDPA does.
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    rk, rv = (last_dim_contiguous(t) for t in kv_registers) if kv_registers is not None else (None, None)
    needs = ("value_head_dim",) if v.shape[-1] != q.shape[-1] else ()
    backend = resolve("attention", backend, q, needs)
    cos = sin = None
    if rope is not None:  # tables in the accumulation type, [N, D] contiguous (a few KiB)
        table_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = (t.to(table_dtype).contiguous() for t in rope)
    call = AttentionCall(
        q=q,
        k=k,
        v=v,
        rk=rk,
        rv=rv,
        sinks=sinks,
        key_mask=key_mask,
        attn_mask=attn_mask,
        rope_cos=cos,
        rope_sin=sin,
        rope_style=int(RopeStyle.parse(rope_style) if rope is not None else RopeStyle.NONE),
        causal=int(causal),
        num_prefix_tokens=num_prefix_tokens,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        return_stats=return_stats,
        key_mass_in_backward=bool(key_mass_in_backward),
    )
    return run(call, backend)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    key_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    return_stats: bool = False,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
    key_mass_in_backward: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, AttentionStats]:
    """Softmax attention over [registers ; tokens] (+ sink), with outlier statistics.

    Equivalent to :func:`dsr_kernels.reference.attention.attention_ref`: with logits
    s_ij = scale * q_i . key_j over the R register keys followed by the Nk token keys,
    p_ij = exp(s_ij - lse_i) where lse_i = log(sum_j exp(s_ij) + exp(sinks[h])), and
    out_i = sum_j p_ij value_j. No concatenated K/V tensor and no [Nq, Nk] matrix is built
    (backends "triton", "cpu" and "torch").

    Args:
        q: [B, H, Nq, D] float16 / bfloat16 / float32 (float64 for "torch"/"reference").
            Any strides: a view of a packed qkv projection output [B, N, 3, H, D]
            is read in place; a last dim that is not contiguous is copied first, and
            so are rows that overlap (``expand``, ``unfold``) on the "cpu" backend.
        k: [B, Hk, Nk, D] and v: [B, Hk, Nk, Dv], q's dtype and device. Hk may divide H
            (grouped-query attention, MQA when Hk = 1): query head h reads K/V head
            h // (H / Hk) in place (the "torch" backend repeats them). Dv may differ
            from D (every backend tiles v, out and their gradients by Dv: no padding).
        kv_registers: (rk, rv), rk [H, R, D] (shared by the batch, e.g. learned) or
            [B, H, R, D], rv the same with Dv: R register keys/values per query head,
            placed before the tokens. Never masked.
        sinks: [H] logits of attention sinks: exp(sinks[h]) joins the denominator of
            head h as one more outcome with no value vector.
        key_mask: [B, Nk] bool, True where a token key may be attended.
        attn_mask: bool (True = may attend) or additive float, broadcastable to
            [B, H, Nq, Nk] and read in place with broadcast strides; token keys only.
        causal: token key j is visible to query i iff j <= i + Nk - Nq (bottom-right
            aligned, as flash-attn; the usual lower triangle when Nq == Nk).
        num_prefix_tokens: the first tokens of the sequence that are in-sequence
            registers (DSR prepends them); only ``register_share`` uses it.
        scale: logit scale, default 1 / sqrt(D).
        return_stats: also return :class:`AttentionStats` (lse, entropy,
            register_share [B, H, Nq] and key_mass [B, H, R + Nk], float32).
        rope: (cos, sin) rotary tables [N, D] (self-attention, N = Nq = Nk), applied
            inside the kernels to q and the token keys (never to kv_registers); rows of
            cos 1, sin 0 leave a token unrotated (``dsr_kernels.rope``).
        rope_style: "interleaved" (pairs 2i, 2i + 1: EVA, LightningDiT, JiT) or "half"
            (pairs i, i + D/2).
        key_mass_in_backward: with return_stats in training, leave the key mass to the
            backward: its dK/dV pass sums the probabilities it recomputes (no launch of
            its own in the forward). ``stats.key_mass`` is NaN until the backward fills it
            in place (eager autograd; see ``dsr_kernels.outliers.record_training_statistics``).
            Ignored (the forward computes it) when no input requires grad and by the
            "reference" backend.
        backend: "auto" (Triton for CUDA tensors; the C++ kernel "cpu" for CPU tensors
            when the extension is built; else "torch"), "triton", "cpu", "torch" (chunked
            PyTorch, memory O(chunk * Nk)) or "reference" (float64, materialises the
            probabilities). An explicit backend that cannot run the call raises
            :class:`~dsr_kernels.BackendUnavailable` with the reason.

    A query with no attendable key, no register and no sink gets out = 0, lse = -inf.
    Gradients flow to q, k, v, the registers (summed over the batch when shared) and
    sinks; the statistics are not differentiable. The backward uses no atomics, so it is
    deterministic.

    Returns:
        out [B, H, Nq, Dv] in q's dtype (memory order [B, Nq, H, Dv]), or
        ``(out, stats)`` with ``return_stats=True``.
    """
    out, stats = validated_attention(
        "attention",
        q,
        k,
        v,
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=key_mask,
        attn_mask=attn_mask,
        causal=Causal.BOTTOM_RIGHT if causal else Causal.NONE,
        num_prefix_tokens=num_prefix_tokens,
        scale=scale,
        return_stats=return_stats,
        backend=backend,
        rope=rope,
        rope_style=rope_style,
        key_mass_in_backward=key_mass_in_backward,
    )
    return (out, stats) if return_stats else out
