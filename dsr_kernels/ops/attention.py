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
as ``attention_fwd_<name>`` / ``attention_bwd_<name>``, imported when it first runs.
"""

import importlib
import math

import torch
from torch import Tensor

from dsr_kernels.backends import resolve
from dsr_kernels.reference.attention import attention_ref
from dsr_kernels.rope import ROPE_STYLES
from dsr_kernels.types import AttentionStats

MAX_HEAD_DIM = 256
MAX_SEQLEN = 2**31  # row indices are 32-bit in the kernels (and BLAS's interface): checked before allocating
_ANY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_attention_args(
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
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t)
        if t.dim() != 4:
            what = {"q": "[B, H, Nq, D]", "k": "[B, Hk, Nk, D]", "v": "[B, Hk, Nk, Dv]"}[name]
            raise ValueError(f"{fn}(): argument '{name}' must be 4-D {what}, got shape {_shape(t)}")
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if q.dtype not in _ANY_DTYPES:
        raise TypeError(f"{fn}(): argument 'q' must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}(): argument '{name}' must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but q is on {q.device}")
    if k.shape[0] != B or k.shape[3] != D or Hk == 0 or H % Hk != 0:
        raise ValueError(
            f"{fn}(): argument 'k' must have shape [B={B}, Hk, Nk, D={D}] with Hk dividing H={H} "
            f"(Hk < H: grouped-query attention) to match q, got {_shape(k)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}(): argument 'v' must have shape [B={B}, Hk={Hk}, Nk={Nk}, Dv] as k, got {_shape(v)}")
    if Nq == 0 or Nk == 0 or B == 0 or H == 0 or D == 0 or Dv == 0:
        raise ValueError(f"{fn}(): empty inputs are not supported, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}(): head dims must be at most {MAX_HEAD_DIM}, got D={D}, Dv={Dv} (q {_shape(q)})")
    for name, n in (("Nq", Nq), ("Nk", Nk)):
        if n >= MAX_SEQLEN:
            raise ValueError(
                f"{fn}(): sequence lengths must be below 2**31 (the kernels index rows in 32 bits), got {name}={n} "
                f"(q {_shape(q)}, k {_shape(k)})"
            )

    if kv_registers is not None:
        if not isinstance(kv_registers, (tuple, list)) or len(kv_registers) != 2:
            raise TypeError(
                f"{fn}(): argument 'kv_registers' must be a pair (rk, rv), got {type(kv_registers).__name__}"
            )
        rk, rv = kv_registers
        for name, t, d in (("kv_registers[0]", rk, D), ("kv_registers[1]", rv, Dv)):
            _check_tensor(fn, name, t)
            ok = (t.dim() == 3 and t.shape[0] == H and t.shape[2] == d) or (
                t.dim() == 4 and t.shape[0] == B and t.shape[1] == H and t.shape[3] == d
            )
            if not ok or t.shape[-2] == 0:
                what = "D" if d == D else "Dv"
                raise ValueError(
                    f"{fn}(): argument '{name}' must have shape [H={H}, R, {what}={d}] or "
                    f"[B={B}, H={H}, R, {what}={d}] with R >= 1 (one register per query head), got {_shape(t)}"
                )
            if t.dtype != q.dtype:
                raise TypeError(f"{fn}(): argument '{name}' must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but q is on {q.device}")
        if rk.shape[:-1] != rv.shape[:-1]:
            raise ValueError(
                f"{fn}(): kv_registers keys and values must have the same shape but for the head dim, "
                f"got {_shape(rk)} and {_shape(rv)}"
            )
        if Nk + rk.shape[-2] >= MAX_SEQLEN:
            raise ValueError(f"{fn}(): R + Nk must be below 2**31, got R={rk.shape[-2]}, Nk={Nk}")

    if sinks is not None:
        _check_tensor(fn, "sinks", sinks)
        if sinks.shape != (H,):
            raise ValueError(f"{fn}(): argument 'sinks' must have shape [H={H}], got {_shape(sinks)}")
        if not sinks.is_floating_point():
            raise TypeError(f"{fn}(): argument 'sinks' must be a floating tensor, got {sinks.dtype}")
        if sinks.device != q.device:
            raise ValueError(f"{fn}(): argument 'sinks' is on {sinks.device} but q is on {q.device}")

    if key_mask is not None:
        _check_tensor(fn, "key_mask", key_mask)
        if key_mask.dtype != torch.bool:
            raise TypeError(f"{fn}(): argument 'key_mask' must be a bool tensor, got {key_mask.dtype}")
        if key_mask.shape != (B, Nk):
            raise ValueError(f"{fn}(): argument 'key_mask' must have shape [B={B}, Nk={Nk}], got {_shape(key_mask)}")
        if key_mask.device != q.device:
            raise ValueError(f"{fn}(): argument 'key_mask' is on {key_mask.device} but q is on {q.device}")

    if attn_mask is not None:
        _check_tensor(fn, "attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{fn}(): argument 'attn_mask' must be bool or floating, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"{fn}(): argument 'attn_mask' is on {attn_mask.device} but q is on {q.device}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{fn}(): gradients with respect to a float 'attn_mask' are not supported")
        target = (B, H, Nq, Nk)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)):
            raise ValueError(
                f"{fn}(): argument 'attn_mask' must be broadcastable to [B={B}, H={H}, Nq={Nq}, Nk={Nk}], "
                f"got {_shape(attn_mask)}"
            )
        attn_mask = attn_mask.expand(target)  # a view with zero strides, never a copy

    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"{fn}(): argument 'num_prefix_tokens' must be an int, got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens <= Nk:
        raise ValueError(f"{fn}(): argument 'num_prefix_tokens' must be in [0, Nk={Nk}], got {num_prefix_tokens}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{fn}(): argument 'scale' must be a finite number or None, got {scale!r}")
    return attn_mask


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t


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
        _check_tensor(fn, name, t)
        if tuple(t.shape) != (Nq, D):
            raise ValueError(f"{fn}(): argument '{name}' must have shape [N={Nq}, D={D}], got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}(): argument '{name}' must be floating, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but q is on {q.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{fn}(): gradients with respect to '{name}' (the rope tables) are not supported")


# ----------------------------------------------------------------------------- custom ops


def _alloc_fwd(q: Tensor, k: Tensor, v: Tensor, rk: Tensor | None, return_stats: bool):
    B, H, Nq, _ = q.shape
    Dv = v.shape[3]
    R = 0 if rk is None else rk.shape[-2]
    f32 = dict(dtype=torch.float32, device=q.device)
    # lse is also what the backward recomputes probabilities from: float64 for float64
    # inputs (the public statistics are float32 either way).
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # out is written in [B, Nq, H, Dv] memory order: out.transpose(1, 2).reshape(B, Nq, H * Dv)
    # is then free, which is the layout the output projection of a transformer block reads.
    out = torch.empty(B, Nq, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, Nq, dtype=lse_dtype, device=q.device)
    if return_stats:
        return (
            out,
            lse,
            torch.empty(B, H, Nq, **f32),
            torch.empty(B, H, Nq, **f32),
            torch.empty(B, H, R + k.shape[2], **f32),
        )
    empty = torch.empty(0, **f32)
    return out, lse, empty, empty.clone(), empty.clone()


def _alloc_bwd(q: Tensor, k: Tensor, v: Tensor, rk: Tensor | None, rv: Tensor | None, sinks: Tensor | None):
    def bnhd(t: Tensor) -> Tensor:  # gradient in [B, N, H, D] memory order, seen as [B, H, N, D]
        B, H, N, D = t.shape
        return torch.empty(B, N, H, D, dtype=t.dtype, device=t.device).transpose(1, 2)

    none = torch.empty(0, dtype=q.dtype, device=q.device)
    drk = torch.empty(rk.shape, dtype=rk.dtype, device=rk.device) if rk is not None else none
    drv = torch.empty(rv.shape, dtype=rv.dtype, device=rv.device) if rv is not None else none.clone()
    dsinks = torch.empty(sinks.shape, dtype=sinks.dtype, device=sinks.device) if sinks is not None else none.clone()
    return bnhd(q), bnhd(k), bnhd(v), drk, drv, dsinks


def _impl(backend: str, direction: str):
    module = importlib.import_module(f"dsr_kernels.{backend}.attention")  # triton is imported only here
    return getattr(module, f"attention_{direction}_{backend}")


def _fwd_impl(backend: str):
    return _impl(backend, "fwd")


def _bwd_impl(backend: str):
    return _impl(backend, "bwd")


_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? rk, Tensor? rv, Tensor? sinks, Tensor? key_mask, "
    "Tensor? attn_mask, int num_prefix_tokens, float scale, int? causal_offset, Tensor? rope_cos, "
    "Tensor? rope_sin, int rope_style, bool return_stats, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rk, Tensor? rv, Tensor? sinks, "
    "Tensor? key_mask, Tensor? attn_mask, Tensor out, Tensor lse, float scale, int? causal_offset, "
    "Tensor? rope_cos, Tensor? rope_sin, int rope_style, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# rope_style in the schemas: an index into ROPE_STYLES (the op signature takes no enum).


def _rope_kwargs(rope_cos, rope_sin, rope_style: int) -> dict:
    if rope_cos is None:
        return {}
    return dict(rope_cos=rope_cos, rope_sin=rope_sin, rope_style=ROPE_STYLES[rope_style])


@torch.library.custom_op("dsr_kernels::attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _attention_fwd_op(
    q,
    k,
    v,
    rk,
    rv,
    sinks,
    key_mask,
    attn_mask,
    num_prefix_tokens,
    scale,
    causal_offset,
    rope_cos,
    rope_sin,
    rope_style,
    return_stats,
    backend,
):
    outputs = _alloc_fwd(q, k, v, rk, return_stats)
    _fwd_impl(backend)(
        q,
        k,
        v,
        rk,
        rv,
        sinks,
        key_mask,
        attn_mask,
        num_prefix_tokens,
        scale,
        causal_offset,
        return_stats,
        *outputs,
        **_rope_kwargs(rope_cos, rope_sin, rope_style),
    )
    return outputs


@_attention_fwd_op.register_fake
def _(
    q,
    k,
    v,
    rk,
    rv,
    sinks,
    key_mask,
    attn_mask,
    num_prefix_tokens,
    scale,
    causal_offset,
    rope_cos,
    rope_sin,
    rope_style,
    return_stats,
    backend,
):
    return _alloc_fwd(q, k, v, rk, return_stats)


@torch.library.custom_op("dsr_kernels::attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _attention_bwd_op(
    dout,
    q,
    k,
    v,
    rk,
    rv,
    sinks,
    key_mask,
    attn_mask,
    out,
    lse,
    scale,
    causal_offset,
    rope_cos,
    rope_sin,
    rope_style,
    backend,
):
    grads = _alloc_bwd(q, k, v, rk, rv, sinks)
    dq, dk, dv, drk, drv, dsinks = grads
    _bwd_impl(backend)(
        dout,
        q,
        k,
        v,
        rk,
        rv,
        sinks,
        key_mask,
        attn_mask,
        out,
        lse,
        scale,
        causal_offset,
        dq,
        dk,
        dv,
        drk if rk is not None else None,
        drv if rk is not None else None,
        dsinks if sinks is not None else None,
        **_rope_kwargs(rope_cos, rope_sin, rope_style),
    )
    return grads


@_attention_bwd_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    rk,
    rv,
    sinks,
    key_mask,
    attn_mask,
    out,
    lse,
    scale,
    causal_offset,
    rope_cos,
    rope_sin,
    rope_style,
    backend,
):
    return _alloc_bwd(q, k, v, rk, rv, sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, rk, rv, sinks, key_mask, attn_mask, _, scale, causal_offset, cos, sin, style, _, backend = inputs
    ctx.save_for_backward(q, k, v, rk, rv, sinks, key_mask, attn_mask, cos, sin, output[0], output[1])
    ctx.scale, ctx.causal_offset, ctx.rope_style, ctx.backend = scale, causal_offset, style, backend


def _backward(ctx, dout, *_stat_grads):
    q, k, v, rk, rv, sinks, key_mask, attn_mask, cos, sin, out, lse = ctx.saved_tensors
    dq, dk, dv, drk, drv, dsinks = torch.ops.dsr_kernels.attention_bwd(
        dout,
        q,
        k,
        v,
        rk,
        rv,
        sinks,
        key_mask,
        attn_mask,
        out,
        lse,
        ctx.scale,
        ctx.causal_offset,
        cos,
        sin,
        ctx.rope_style,
        ctx.backend,
    )
    has_reg, has_sink = rk is not None, sinks is not None
    grads = (dq, dk, dv, drk if has_reg else None, drv if has_reg else None, dsinks if has_sink else None)
    return grads + (None,) * 10  # masks, sizes, scale, causal, rope tables (not differentiable), flags


torch.library.register_autograd("dsr_kernels::attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _attention(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    causal: str | None,
    num_prefix_tokens: int,
    scale: float | None,
    return_stats: bool,
    backend: str,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
) -> tuple[Tensor, AttentionStats]:
    """Validated dispatch shared by ``attention`` and the drop-in interfaces.

    causal: None, "bottom_right" (flash-attn: key j visible to query i iff
    j <= i + Nk - Nq) or "top_left" (torch SDPA: iff j <= i).
    """
    attn_mask = _check_attention_args(fn, q, k, v, kv_registers, sinks, key_mask, attn_mask, num_prefix_tokens, scale)
    _check_rope(fn, q, k, rope, rope_style)
    # Any strides: the kernels read rows in place; a last dim that is not contiguous is
    # copied first, as torch's SDPA does.
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if kv_registers is not None:
        kv_registers = tuple(_last_dim_contiguous(t) for t in kv_registers)
    causal_offset = {None: None, "top_left": 0, "bottom_right": k.shape[2] - q.shape[2]}[causal]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    needs = ("value_head_dim",) if v.shape[-1] != q.shape[-1] else ()
    backend = resolve("attention", backend, q, needs)
    if backend == "reference":
        return attention_ref(
            q,
            k,
            v,
            kv_registers=kv_registers,
            sinks=sinks,
            key_mask=key_mask,
            attn_mask=attn_mask,
            causal_offset=causal_offset,
            num_prefix_tokens=num_prefix_tokens,
            scale=scale,
            rope=rope,
            rope_style=rope_style,
        )
    rk, rv = kv_registers if kv_registers is not None else (None, None)
    cos = sin = None
    if rope is not None:  # tables in the accumulation type, [N, D] contiguous (a few KiB)
        table_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = (t.to(table_dtype).contiguous() for t in rope)
    out, lse, entropy, register_share, key_mass = torch.ops.dsr_kernels.attention_fwd(
        q,
        k,
        v,
        rk,
        rv,
        sinks,
        key_mask,
        attn_mask,
        num_prefix_tokens,
        scale,
        causal_offset,
        cos,
        sin,
        ROPE_STYLES.index(rope_style),
        return_stats,
        backend,
    )
    stats = AttentionStats(lse.detach().float(), entropy.detach(), register_share.detach(), key_mass.detach())
    return out, stats


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
    out, stats = _attention(
        "attention",
        q,
        k,
        v,
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=key_mask,
        attn_mask=attn_mask,
        causal="bottom_right" if causal else None,
        num_prefix_tokens=num_prefix_tokens,
        scale=scale,
        return_stats=return_stats,
        backend=backend,
        rope=rope,
        rope_style=rope_style,
    )
    return (out, stats) if return_stats else out
