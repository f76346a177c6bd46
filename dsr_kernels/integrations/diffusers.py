"""The fused attention in diffusers' transformers: a ``"dsr"`` attention backend and a processor.

Two ways in, for what the installed diffusers offers:

- **The attention dispatcher** (models whose processors call ``dispatch_attention_fn``,
  e.g. Flux, Wan, HunyuanVideo, QwenImage): importing this module registers ``"dsr"`` as
  one of diffusers' attention backends, so ``model.set_attention_backend("dsr")`` and
  ``with attention_backend("dsr"):`` run :func:`dsr_kernels.scaled_dot_product_attention`.
  The dispatcher passes no layer identity, so this path has no registers or statistics.
  Processors that call torch's SDPA themselves (DiT, PixArt, SD3, Latte, CogVideoX:
  ``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ``CogVideoXAttnProcessor2_0``) never
  see a backend: ``model.set_attention_backend("dsr")`` warns, naming them (this module
  wraps diffusers' ``ModelMixin.set_attention_backend`` for that); :func:`patch` is the
  way in for them.
- **The processor** :class:`DSRAttnProcessor`, for every diffusers attention module
  (``Attention`` of DiT, PixArt, SD3, ... and the ``AttentionModuleMixin`` modules of
  Flux): it wraps the module's own processor, so the projections, norms and RoPE stay
  diffusers' code, and only the attention product runs on the fused kernels, with
  optional learned kv registers per layer (``register_k`` / ``register_v`` [H, R, D],
  trainable, saved in the model's state dict), sink logits per head, and the attention
  statistics recorded per layer inside :func:`dsr_kernels.outliers.collect`.
  :func:`patch` installs it on every attention module of a model or pipeline.

How the processor reaches the attention product: processors that use the dispatcher get
``"dsr"`` as their backend for the call; the others call
``torch.nn.functional.scaled_dot_product_attention``, which is redirected to the fused
one for the duration of the processor's call (the redirection is process-wide while it
lasts: do not run a model in another thread meanwhile). Calls the fused kernels cannot
serve (dropout, a float mask that needs a gradient) run PyTorch's SDPA with a warning,
as :func:`dsr_kernels.scaled_dot_product_attention` does.

Rotary embeddings: the processors of the video transformers rotate q and k themselves
(CogVideoX, HunyuanVideo, Wan). Where their tables have the form the kernels take, the
processor is called without them and the kernel rotates q and the token keys
(``dsr_kernels.attention(..., rope=(cos, sin))``; the text tokens, which these models
leave unrotated, get identity rows; registers are never rotated): see ``_ROPE_PLANS``.
Otherwise (and for every other processor) the wrapped processor applies them as diffusers
does. ``DSRAttnProcessor.rope_path`` says which ("kernel" / "diffusers") and
``rope_reason`` why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.backends import resolve
from dsr_kernels.ops.attention import MAX_HEAD_DIM, attention, check_attention_args, validated_attention
from dsr_kernels.ops.attention_dropin import scaled_dot_product_attention
from dsr_kernels.rope import apply_rope

__all__ = ["BACKEND_NAME", "DSRAttnProcessor", "enable_parallelism", "patch", "register_backend"]

BACKEND_NAME = "dsr"


@dataclass
class _Call:
    """What the processor of the attention module being run wants from the attention product."""

    processor: DSRAttnProcessor
    backend: str
    rope: tuple[Tensor, Tensor] | None = None  # (cos, sin) [N, D] for the kernel: the processor did not rotate
    rope_style: str = "interleaved"


_CURRENT: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dsr_diffusers_call", default=None)
_TORCH_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """SDPA's arguments: the fused attention with the current processor's registers, sinks and statistics.

    It stands in for ``torch.nn.functional.scaled_dot_product_attention`` while a
    :class:`DSRAttnProcessor` runs (q, k, v [B, H, S, D], out [B, H, S, Dv]), and is what
    the ``"dsr"`` backend of diffusers' dispatcher runs (:func:`_dispatch_backend`). With
    ``return_lse=True`` it also returns the log-sum-exp of each query's softmax [B, H, S]
    (float32, natural log, over the registers, the sink and the keys; not differentiable).
    """
    call = _CURRENT.get()
    if return_lse and not _attention_serves(query, key, value, attn_mask, dropout_p):
        raise ValueError(
            f"the {BACKEND_NAME!r} attention backend returns the lse only of calls dsr_kernels.attention takes as "
            f"they are (4-D q, k, v of one batch, H a multiple of Hk, head dims <= {MAX_HEAD_DIM}, no dropout, no "
            f"mask that requires a gradient); got q {tuple(query.shape)}, k {tuple(key.shape)}, "
            f"v {tuple(value.shape)}, dropout_p={dropout_p}"
        )
    if call is None:
        if return_lse:
            return _attention_with_lse(query, key, value, attn_mask, is_causal, scale)
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    proc = call.processor
    kv_registers = None
    if proc.register_k is not None:
        kv_registers = (proc.register_k.to(query.dtype), proc.register_v.to(query.dtype))
    sinks = proc.sinks
    rope = call.rope
    if rope is not None:
        n = rope[0].shape[0]
        if query.shape[-2] != n or key.shape[-2] != n:
            raise RuntimeError(
                f"DSRAttnProcessor({type(proc.inner).__name__}): rotary tables for {n} tokens, but the attention "
                f"has {query.shape[-2]} queries and {key.shape[-2]} keys (the processor's layout changed?)"
            )
        rope = tuple(t.to(query.device) for t in rope)  # as diffusers' apply_rotary_emb moves them
        if not _attention_serves(query, key, value, attn_mask, dropout_p):
            # the drop-in's broadcasting or PyTorch's SDPA: rotate here, as the processor would have
            query, key = (apply_rope(t, *rope, call.rope_style).to(t.dtype) for t in (query, key))
            rope = None
    recording = outliers.active_layer(proc)
    if return_lse:
        out, stats = _attention_with_lse(
            query,
            key,
            value,
            attn_mask,
            is_causal,
            scale,
            kv_registers=kv_registers,
            sinks=sinks,
            rope=rope,
            rope_style=call.rope_style,
            return_stats=recording is not None,
            backend=call.backend,
        )
        if recording is not None:
            report, layer = recording
            report.record_attention(layer, stats, proc.num_kv_registers)
        return out, stats.lse
    if (recording is not None or rope is not None) and query.dim() == 4 and dropout_p == 0.0:
        mask = attn_mask
        if mask is not None and mask.dim() < 4:
            mask = mask.view(*(1,) * (4 - mask.dim()), *mask.shape)
        out = attention(
            query,
            key,
            value,
            kv_registers=kv_registers,
            sinks=sinks,
            attn_mask=mask,
            causal=is_causal,
            scale=scale,
            return_stats=recording is not None,
            rope=rope,
            rope_style=call.rope_style,
            backend=call.backend,
        )
        if recording is None:
            return out
        out, stats = out
        report, layer = recording
        report.record_attention(layer, stats, proc.num_kv_registers)
        return out
    return scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        kv_registers=kv_registers,
        sinks=sinks,
        backend=call.backend,
    )


def _attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    *,
    return_stats: bool = False,
    backend: str = "auto",
    **options: Any,
) -> tuple[Tensor, Any]:
    """:func:`dsr_kernels.attention` on an SDPA call, with the lse (torch's top-left ``is_causal``, a mask of
    any rank up to 4): (out, its :class:`AttentionStats`) when ``return_stats``, else (out, lse [B, H, S])."""
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.view(*(1,) * (4 - attn_mask.dim()), *attn_mask.shape)
    out, stats = validated_attention(
        "attention",
        query,
        key,
        value,
        kv_registers=options.get("kv_registers"),
        sinks=options.get("sinks"),
        key_mask=None,
        attn_mask=attn_mask,
        causal=Causal.TOP_LEFT if is_causal else Causal.NONE,
        num_prefix_tokens=0,
        scale=scale,
        return_stats=return_stats,
        backend=backend,
        rope=options.get("rope"),
        rope_style=options.get("rope_style", "interleaved"),
    )
    return (out, stats) if return_stats else (out, stats.lse)


def _attention_serves(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float) -> bool:
    """Whether :func:`dsr_kernels.attention` takes this SDPA call as it is (no broadcasting to resolve,
    nothing that :func:`dsr_kernels.scaled_dot_product_attention` hands to PyTorch)."""
    return (
        all(t.dim() == 4 and t.shape[0] == query.shape[0] for t in (query, key, value))
        and key.shape[1] == value.shape[1]
        and query.shape[1] % key.shape[1] == 0
        and max(query.shape[-1], value.shape[-1]) <= MAX_HEAD_DIM
        and dropout_p == 0.0
        and not (attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled())
    )


def _dispatch_backend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``"dsr"`` backend of diffusers' dispatcher (which passes only the arguments named here).

    q, k, v [B, S, H, D], out [B, S, H, Dv]; a 2-D ``attn_mask`` [B, S_k] masks keys (as
    diffusers' native backend reads it). ``return_lse=True`` also returns the lse in
    diffusers' layout, that of its flash backends: [B, S, H] float32, natural log. With
    ``_parallel_config`` (``model.enable_parallelism(config=ContextParallelConfig(...))``)
    diffusers' own ring / Ulysses autograd functions run, calling the fused kernels on each
    shard through :func:`_cp_forward_op` / :func:`_cp_backward_op`.
    """
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]
    if _parallel_config is not None:
        return _context_parallel(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _parallel_config
        )
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    out = _fused_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse=return_lse)
    if not return_lse:
        return out.permute(0, 2, 1, 3)
    out, lse = out
    return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1).contiguous()


# ----------------------------------------------------------------------------- context parallelism
# diffusers' TemplatedRingAttention / TemplatedUlyssesAttention (attention_dispatch.py) own the
# communication: they call a backend's forward op on each shard, ``forward_op(ctx, q, k, v, attn_mask,
# dropout_p, is_causal, scale, enable_gqa, return_lse, _save_ctx=..., _parallel_config=...)`` with q, k, v
# [B, S, H, D], wanting (out [B, S, H, D], lse [B, S, H]) where the ring merges partial outputs by their
# lse; and its backward op, ``backward_op(ctx, grad_out, query=, key=, value=, out=, lse=)``, where the
# ring passes each K/V chunk with the merged (global) out and lse, and Ulysses passes nothing (what the
# forward saved). The fused backward takes exactly that: the probabilities of a chunk recomputed from
# the global lse, delta = rowsum(dout * out) from the global out (FlashAttention's ring backward).


def _context_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, config):
    """One call of the dispatcher under diffusers' context parallelism (``config``: its ParallelConfig)."""
    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
    except ImportError as exc:  # diffusers < 0.36 has no templated context parallelism
        raise NotImplementedError(
            f"the {BACKEND_NAME!r} backend's context parallelism needs diffusers' "
            f"_templated_context_parallel_attention (diffusers >= 0.36; 0.42.1 is tested): {exc}"
        ) from exc
    call = _CURRENT.get()
    backend = "auto"
    if call is not None:
        proc = call.processor
        if proc.register_k is not None or proc.sinks is not None or outliers.active_layer(proc) is not None:
            raise NotImplementedError(
                f"DSRAttnProcessor({type(proc.inner).__name__}): kv registers, sinks and statistics are not "
                "supported under diffusers' context parallelism (its ring would add the registers and the sink to "
                "every K/V shard, and their gradients do not leave its autograd function); use "
                "dsr_kernels.distributed.ring_attention / ulysses_attention, which take them"
            )
        if call.rope is not None:  # the shard's own tables (diffusers' plan splits them as the tokens)
            q, k = (t.permute(0, 2, 1, 3) for t in (query, key))
            rope = tuple(t.to(query.device) for t in call.rope)
            q, k = (apply_rope(t, *rope, call.rope_style).to(t.dtype) for t in (q, k))
            query, key = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
        backend = call.backend
    return _templated_context_parallel_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        forward_op=functools.partial(_cp_forward_op, backend=backend),
        backward_op=_cp_backward_op,
        _parallel_config=config,
    )


def _cp_call(query: Tensor, key: Tensor, value: Tensor, attn_mask, is_causal: bool, scale, backend: str):
    """The validated :class:`AttentionCall` of one shard (q, k, v [B, S, H, D]) and the backend that runs it."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.view(*(1,) * (4 - attn_mask.dim()), *attn_mask.shape)
    attn_mask = check_attention_args("attention", q, k, v, None, None, None, attn_mask, 0, scale)
    backend = resolve("attention", backend, q, ("value_head_dim",) if v.shape[-1] != q.shape[-1] else ())
    if backend == "reference":
        raise NotImplementedError(
            f"the {BACKEND_NAME!r} backend's context parallelism runs the fused backward on each shard; the "
            "'reference' backend has none (use 'auto', 'cpu', 'torch' or 'triton')"
        )
    call = AttentionCall(
        q=q,
        k=k,
        v=v,
        attn_mask=attn_mask,
        causal=int(Causal.TOP_LEFT if is_causal else Causal.NONE),
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
    )
    return call, backend


def _cp_forward_op(
    ctx: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any = None,
    *,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """diffusers' forward-op contract on one shard: out [B, S, H, Dv] (and lse [B, S, H] float32)."""
    if dropout_p:
        raise ValueError(f"the {BACKEND_NAME!r} attention backend has no dropout (dropout_p={dropout_p})")
    call, backend = _cp_call(query, key, value, attn_mask, is_causal, scale, backend)
    out, lse, *_ = torch.ops.dsr_kernels.attention_fwd(*call.as_args(), backend)
    out, lse = out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # [B, S, H, Dv], [B, S, H]
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.dsr_call = call.replace(q=None, k=None, v=None)  # the mask, causal, scale
        ctx.dsr_backend = backend
    return (out, lse) if return_lse else out


def _cp_backward_op(
    ctx: Any,
    grad_out: Tensor,
    *args: Any,
    query: Tensor | None = None,
    key: Tensor | None = None,
    value: Tensor | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """diffusers' backward-op contract: (dq, dk, dv) [B, S, H, D] of one shard, the K/V chunk and the
    merged out / lse given by the ring (or the forward's own, saved, for Ulysses)."""
    saved = ctx.saved_tensors
    query, key, value, out, lse = (
        s if t is None else t for s, t in zip(saved, (query, key, value, out, lse), strict=True)
    )
    q, k, v, dout, o = (t.permute(0, 2, 1, 3) for t in (query, key, value, grad_out.to(query.dtype), out))
    lse = lse.permute(0, 2, 1).to(saved[4].dtype).contiguous()  # [B, H, S], the kernels' accumulation type
    call = ctx.dsr_call.replace(q=q, k=k, v=v)
    dq, dk, dv, *_ = torch.ops.dsr_kernels.attention_bwd(dout, o.to(q.dtype), lse, *call.as_args(), ctx.dsr_backend)
    return tuple(t.permute(0, 2, 1, 3) for t in (dq, dk, dv))


def register_backend() -> bool:
    """Registers ``"dsr"`` among diffusers' attention backends (and makes
    ``ModelMixin.set_attention_backend("dsr")`` warn about the processors it cannot reach); True
    when the installed diffusers has the dispatcher (>= 0.35), False otherwise. Idempotent; run
    on import of this module."""
    try:
        from diffusers.models import attention_dispatch as dispatch
    except Exception:
        return False
    names = dispatch.AttentionBackendName
    registry = dispatch._AttentionBackendRegistry
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # AttentionBackendName is a str Enum: a member is added the way Enum builds its own.
        member = str.__new__(names, BACKEND_NAME)
        member._name_, member._value_ = BACKEND_NAME.upper(), BACKEND_NAME
        member.__objclass__ = names
        names._member_map_[member._name_] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append(member._name_)
        type.__setattr__(names, member._name_, member)
    if member not in registry._backends:
        # Context parallelism: diffusers' ring / Ulysses call _cp_forward_op / _cp_backward_op on each shard.
        cp = "supports_context_parallel" in inspect.signature(registry.register).parameters
        registry.register(member, constraints=[], **({"supports_context_parallel": True} if cp else {}))(
            _dispatch_backend
        )
    from diffusers.models.modeling_utils import ModelMixin

    if not hasattr(ModelMixin.set_attention_backend, "_dsr_checks"):
        ModelMixin.set_attention_backend = _checking_set_attention_backend(ModelMixin.set_attention_backend)
    return True


def _checking_set_attention_backend(set_attention_backend):
    """diffusers' ``ModelMixin.set_attention_backend``, which warns when ``"dsr"`` cannot reach a processor."""

    @functools.wraps(set_attention_backend)
    def checked(self: nn.Module, backend: str) -> None:
        set_attention_backend(self, backend)
        if isinstance(backend, str) and backend.lower() == BACKEND_NAME:
            _warn_bypassing_processors(self)

    checked._dsr_checks = True
    return checked


def _warn_bypassing_processors(model: nn.Module) -> None:
    """The backend reaches only the processors that call diffusers' dispatcher (those with an
    ``_attention_backend``); the others (DiT's, PixArt's, SD3's ``AttnProcessor2_0``, ...) call
    torch's SDPA themselves, and set_attention_backend leaves them as they are, silently."""
    bypassing = Counter(
        type(module.processor).__name__
        for _, module in _attention_modules(model)
        if module.processor is not None
        and not hasattr(module.processor, "_attention_backend")
        and not isinstance(module.processor, DSRAttnProcessor)
    )
    if bypassing:
        found = ", ".join(f"{name} x {count}" for name, count in bypassing.items())
        warnings.warn(
            f"set_attention_backend({BACKEND_NAME!r}): {bypassing.total()} attention module(s) of "
            f"{type(model).__name__} keep running torch's attention: their processors ({found}) call it "
            f"themselves, not diffusers' attention dispatcher. Use dsr_kernels.patch(model) instead",
            UserWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _redirected_sdpa():
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _TORCH_SDPA


Tables = tuple[Tensor, Tensor]


def _pair(value: Any, shape: tuple[int, ...]) -> Tables | str:
    """``value`` as a pair of tensors of the given shape, or why it is not one."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(t, Tensor) for t in value)):
        return f"the tables are a {type(value).__name__}, not a pair of tensors"
    if any(tuple(t.shape) != shape for t in value):
        return f"tables of shapes {[tuple(t.shape) for t in value]}, not {list(shape)}"
    return value[0], value[1]


def _with_unrotated_rows(tables: Tables, before: int, after: int) -> Tables:
    """Identity rows (cos 1, sin 0) for ``before`` tokens ahead of the rotated ones and ``after`` behind them."""
    cos, sin = tables
    D = cos.shape[1]
    cos = torch.cat([cos.new_ones(before, D), cos, cos.new_ones(after, D)])
    return cos, torch.cat([sin.new_zeros(before, D), sin, sin.new_zeros(after, D)])


def _cogvideox_tables(attn: nn.Module, arguments: dict[str, Any], head_dim: int) -> Tables | str:
    """CogVideoX: [text ; video] tokens; diffusers' ``apply_rotary_emb`` (interleaved pairs, tables
    (cos, sin) [N_video, head_dim]) rotates the video tokens of q and k."""
    if getattr(attn, "is_cross_attention", False):
        return "cross-attention: the processor rotates q but not k"
    tables = _pair(arguments["image_rotary_emb"], (arguments["hidden_states"].shape[1], head_dim))
    if isinstance(tables, str):
        return tables
    return _with_unrotated_rows(tables, before=arguments["encoder_hidden_states"].shape[1], after=0)


def _hunyuan_video_tables(attn: nn.Module, arguments: dict[str, Any], head_dim: int) -> Tables | str:
    """HunyuanVideo: [video ; text] tokens (double- and single-stream blocks alike); ``apply_rotary_emb``
    rotates the video tokens."""
    tables = _pair(arguments["image_rotary_emb"], (arguments["hidden_states"].shape[1], head_dim))
    if isinstance(tables, str):
        return tables
    encoder = arguments.get("encoder_hidden_states")
    return _with_unrotated_rows(tables, before=0, after=0 if encoder is None else encoder.shape[1])


def _wan_tables(attn: nn.Module, arguments: dict[str, Any], head_dim: int) -> Tables | str:
    """Wan: self-attention of the video tokens; its own rotation takes, for pair (2i, 2i + 1), the cosine at
    channel 2i and the sine at channel 2i + 1 of (freqs_cos, freqs_sin) [1, N, 1, head_dim]."""
    if arguments.get("encoder_hidden_states") is not None:
        return "cross-attention"
    tables = _pair(arguments["rotary_emb"], (1, arguments["hidden_states"].shape[1], 1, head_dim))
    if isinstance(tables, str):
        return tables
    cos, sin = tables
    return cos[0, :, 0, 0::2].repeat_interleave(2, -1), sin[0, :, 0, 1::2].repeat_interleave(2, -1)


@dataclass(frozen=True)
class _RopePlan:
    """How one diffusers processor rotates q and k, so that the kernel can do it instead: the argument that
    carries its tables, and what turns them into the kernel's (cos, sin) [N, D] for the whole attended
    sequence (or says why they do not have that form)."""

    keyword: str
    tables: Any  # (attn, the call's arguments by name, head_dim) -> Tables | str
    style: str = "interleaved"


# By the processor's class (diffusers' own only: a subclass may rotate differently). Latte's processor
# (AttnProcessor2_0) has no rotary embeddings; Flux's and the image models' keep their own (diffusers path).
_ROPE_PLANS = {
    "CogVideoXAttnProcessor2_0": _RopePlan("image_rotary_emb", _cogvideox_tables),
    "FusedCogVideoXAttnProcessor2_0": _RopePlan("image_rotary_emb", _cogvideox_tables),
    "HunyuanVideoAttnProcessor2_0": _RopePlan("image_rotary_emb", _hunyuan_video_tables),
    "WanAttnProcessor": _RopePlan("rotary_emb", _wan_tables),
}


def _rope_plan(inner: Any) -> _RopePlan | None:
    cls = type(inner)
    return _ROPE_PLANS.get(cls.__name__) if cls.__module__.startswith("diffusers.") else None


class _ProcessorCall:
    """A :class:`DSRAttnProcessor`'s ``__call__`` as diffusers reads it: with the wrapped processor's signature.

    diffusers' attention modules (``Attention.forward`` and others) pass a keyword on to their processor only
    if ``inspect.signature(processor.__call__)`` names it, and drop the others with a log line. The processor's
    own ``forward(attn, hidden_states, *args, **kwargs)`` names none, so CogVideoX's ``image_rotary_emb`` was
    dropped. Held in the instance's ``__dict__``: calling the processor itself still goes through
    ``nn.Module.__call__``.
    """

    def __init__(self, processor: DSRAttnProcessor) -> None:
        self.processor = processor

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.processor.inner.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return nn.Module.__call__(self.processor, *args, **kwargs)


class DSRAttnProcessor(nn.Module):
    """A diffusers attention processor: the module's own processor, with the attention product fused.

    Args:
        inner: the processor it wraps (the attention module's current one).
        heads, head_dim: the attention module's query heads and head dim (for the registers).
        num_kv_registers: learned kv registers per head (``register_k``, ``register_v``
            [heads, R, head_dim]), trainable, every query may attend them.
        sinks: learn a sink logit per head (``sinks`` [heads], initialised to 0).
        backend: the backend of :func:`dsr_kernels.attention`.

    Every argument the wrapped processor takes reaches it (its signature is this one's, as
    diffusers' attention modules read it), except rotary tables that the kernel applies
    instead. ``rope_path`` says who rotates q and k: ``"kernel"`` when the wrapped
    processor is one whose rotation the kernel reproduces (CogVideoX's, HunyuanVideo's,
    Wan's) and the last tables it was given had the form the kernel takes;
    ``"diffusers"`` when they did not, or the wrapped processor is another one (it applies
    whatever rotary embeddings it takes, as without the patch); None when a processor of
    the first kind has been given no tables (Wan's cross-attention). ``rope_reason`` says why.

    Being an ``nn.Module``, it is a submodule of the attention module: its parameters are
    the model's (optimiser, ``state_dict``, ``.to()``), and
    :func:`dsr_kernels.outliers.collect` records its statistics under the attention
    module's name.
    """

    def __init__(
        self,
        inner: Any,
        *,
        heads: int,
        head_dim: int,
        num_kv_registers: int = 0,
        sinks: bool = False,
        backend: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(inner, DSRAttnProcessor):
            raise TypeError("DSRAttnProcessor: the processor to wrap is a DSRAttnProcessor already")
        self.inner = inner
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.register_parameter("register_k", None)
        self.register_parameter("register_v", None)
        self.register_parameter("sinks", None)
        self.add_registers(num_kv_registers, sinks=sinks, device=device, dtype=dtype)
        self.__call__ = _ProcessorCall(self)  # for diffusers' inspect.signature(processor.__call__)
        plan = _rope_plan(inner)
        self.rope_path: str | None = "diffusers" if plan is None else None
        self.rope_reason = (
            f"{type(inner).__name__} applies the rotary embeddings it takes (if any) itself"
            if plan is None
            else f"no {plan.keyword!r} tables have reached {type(inner).__name__} yet"
        )

    def add_registers(
        self, num_kv_registers: int = 0, *, sinks: bool = False, device=None, dtype=None
    ) -> DSRAttnProcessor:
        """Adds kv registers and / or sinks where there are none (as RegisterAttention.add_registers)."""
        if num_kv_registers and self.register_k is None:
            for name in ("register_k", "register_v"):  # N(0, 0.02) truncated, as RegisterAttention's
                empty = torch.empty(self.heads, num_kv_registers, self.head_dim, device=device, dtype=dtype)
                setattr(self, name, nn.Parameter(nn.init.trunc_normal_(empty, std=0.02)))
        elif num_kv_registers and num_kv_registers != self.num_kv_registers:
            raise ValueError(
                f"DSRAttnProcessor: has {self.num_kv_registers} kv registers already, asked for {num_kv_registers}"
            )
        if sinks and self.sinks is None:
            self.sinks = nn.Parameter(torch.zeros(self.heads, device=device, dtype=dtype))
        return self

    @property
    def num_kv_registers(self) -> int:
        return 0 if self.register_k is None else self.register_k.shape[1]

    @property
    def _parallel_config(self) -> Any:
        """The wrapped processor's: ``enable_parallelism`` hands its config to the processors that have one,
        and the wrapped one calls the dispatcher with it (without this, it ran each shard alone)."""
        try:
            return self.__dict__["inner"]._parallel_config
        except (KeyError, AttributeError):
            raise AttributeError(f"{type(self.__dict__.get('inner')).__name__} has no _parallel_config") from None

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        self.inner._parallel_config = config

    def forward(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        args, kwargs, call = self._take_rope(attn, hidden_states, args, kwargs)
        token = _CURRENT.set(call)
        try:
            if hasattr(self.inner, "_attention_backend") and register_backend():
                from diffusers.models.attention_dispatch import AttentionBackendName

                previous = self.inner._attention_backend
                self.inner._attention_backend = AttentionBackendName(BACKEND_NAME)
                try:
                    return self.inner(attn, hidden_states, *args, **kwargs)
                finally:
                    self.inner._attention_backend = previous
            with _redirected_sdpa():
                return self.inner(attn, hidden_states, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def _take_rope(
        self, attn: nn.Module, hidden_states: Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict, _Call]:
        """The call's arguments for the wrapped processor, less the rotary tables the kernel will apply."""
        call = _Call(self, self.backend)
        plan = _rope_plan(self.inner)
        if plan is None:
            return args, kwargs, call
        try:
            bound = inspect.signature(self.inner.__call__).bind(attn, hidden_states, *args, **kwargs)
        except TypeError:  # let the processor say what is wrong with the call
            return args, kwargs, call
        if bound.arguments.get(plan.keyword) is None:
            return args, kwargs, call
        tables = plan.tables(attn, bound.arguments, self.head_dim)
        if not isinstance(tables, str) and any(t.requires_grad and torch.is_grad_enabled() for t in tables):
            tables = "the tables require a gradient (the kernel takes constant ones)"
        if isinstance(tables, str):
            self.rope_path, self.rope_reason = "diffusers", f"{type(self.inner).__name__}: {tables}"
            return args, kwargs, call
        self.rope_path = "kernel"
        self.rope_reason = (
            f"{type(self.inner).__name__}'s {plan.keyword!r} tables go to the kernel ({plan.style} pairs)"
        )
        bound.arguments[plan.keyword] = None
        call.rope, call.rope_style = tables, plan.style
        return bound.args[2:], bound.kwargs, call

    def extra_repr(self) -> str:
        return (
            f"inner={type(self.inner).__name__}, heads={self.heads}, head_dim={self.head_dim}, "
            f"num_kv_registers={self.num_kv_registers}, sinks={self.sinks is not None}, backend={self.backend!r}, "
            f"rope_path={self.rope_path!r}"
        )


def _model_of(obj: Any) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    for name in ("transformer", "unet"):
        model = getattr(obj, name, None)
        if isinstance(model, nn.Module):
            return model
    raise TypeError(f"patch(): {type(obj).__name__} is neither a diffusers model nor a pipeline with a transformer")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers' attention modules of ``model`` (those with a processor), with their names."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _heads_and_dim(module: nn.Module) -> tuple[int, int]:
    heads = getattr(module, "heads", None)
    inner_dim = getattr(module, "inner_dim", None)
    if heads is None or inner_dim is None:
        q = getattr(module, "to_q", None)
        raise TypeError(
            f"patch(): cannot tell the heads of {type(module).__name__} (no 'heads' / 'inner_dim'"
            + (f"; to_q {tuple(q.weight.shape)}" if q is not None else "")
            + ")"
        )
    return int(heads), int(inner_dim) // int(heads)


def patch(obj: Any, *, num_kv_registers: int = 0, sinks: bool = False, backend: str = "auto") -> list[str]:
    """Installs a :class:`DSRAttnProcessor` on every attention module of a diffusers model or pipeline.

    Returns the names of the attention modules. The outputs stay what they were without
    registers and sinks (the same computation, on the fused kernels); with them, the new
    parameters are created on the model's device and dtype, trainable.
    """
    if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
        raise ValueError(f"patch(): argument 'num_kv_registers' must be an int >= 0, got {num_kv_registers!r}")
    from dsr_kernels.backends import check_name

    check_name("attention", backend)
    model = _model_of(obj)
    register_backend()
    names = []
    for name, module in _attention_modules(model):
        processor = module.processor
        ref = next(module.parameters(), None)
        where = dict(device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        if isinstance(processor, DSRAttnProcessor):
            processor.add_registers(num_kv_registers, sinks=sinks, **where)
            processor.backend = backend
        else:
            heads, head_dim = _heads_and_dim(module)
            module.set_processor(
                DSRAttnProcessor(
                    processor,
                    heads=heads,
                    head_dim=head_dim,
                    num_kv_registers=num_kv_registers,
                    sinks=sinks,
                    backend=backend,
                    **where,
                )
            )
        names.append(name)
    if not names:
        raise ValueError(f"patch(): found no diffusers attention module in {type(model).__name__}")
    return names


def enable_parallelism(model: nn.Module, config: Any, *, cp_plan: dict | None = None) -> None:
    """diffusers' ``model.enable_parallelism(config=config, cp_plan=cp_plan)``, also on a torch without an accelerator.

    diffusers 0.42.1 (``ModelMixin._resolve_parallel_config``) places rank r on
    ``torch.device(accelerator, r % torch.accelerator.device_count())``: on a CPU-only torch
    (gloo processes on CPUs) the count is 0 and it raises ``ZeroDivisionError``. There, for a
    ``ContextParallelConfig`` (or a ``ParallelConfig`` holding one and no tensor parallelism),
    this builds diffusers' ("ring", "ulysses") device mesh on "cpu" (or takes ``config.mesh``),
    sets the config up for device "cpu" as diffusers would, and then runs diffusers' own
    ``enable_parallelism``. With an accelerator it is diffusers' call unchanged.
    """
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    cp = getattr(config, "context_parallel_config", None)
    on_cpu = torch.accelerator.device_count() == 0 and cp is not None and config.tensor_parallel_config is None
    if not on_cpu:
        model.enable_parallelism(config=config, cp_plan=cp_plan)
        return
    if not torch.distributed.is_initialized():
        raise RuntimeError("enable_parallelism(): torch.distributed must be initialised first (e.g. gloo on CPUs)")
    mesh = cp.mesh or torch.distributed.device_mesh.init_device_mesh(
        "cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names
    )

    def resolve_on_cpu(cfg: Any) -> Any:
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)
        model._parallel_config = config
        return config

    model._resolve_parallel_config = resolve_on_cpu  # this call's, instead of the one that divides by 0
    try:
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    finally:
        del model._resolve_parallel_config


register_backend()
