"""Backend ``"torch"`` of register attention: PyTorch ops on any device, O(chunk * Nk) memory.

Two ways to get ``out`` and ``lse``:

- On the CPU, without causal masking or attn_mask, the tokens and the registers are two
  calls of PyTorch's own fused CPU flash-attention kernel (``aten::_scaled_dot_product_
  flash_attention_for_cpu``, which returns the logsumexp), merged with the sink by their
  log-sum-exps: out = sum_part exp(lse_part - lse) out_part. No K/V concatenation, no
  [Nq, Nk] matrix, and SDPA's speed. The backward calls the matching backward kernel
  with the merged output and lse, which is exactly FlashAttention's gradient of the
  merged softmax.
- Otherwise queries are processed in chunks whose logits [B, H, C, R + Nk] stay under a
  fixed element budget; the backward recomputes the probabilities chunk by chunk from
  the saved lse.

The statistics are one more chunked sweep that reuses the final lse: log p = s - lse,
so the entropy -sum p log p needs no log per element, and key_mass is a column sum.
fp16/bf16 are computed in float32, float64 in float64.

The functions write into outputs allocated by ``dsr_kernels.ops.attention`` so that all
backends and the fake (meta) implementation agree on shapes and strides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, AttentionGrads, AttentionOutputs, Causal
from dsr_kernels.reference.attention import per_sequence
from dsr_kernels.rope import RopeStyle, apply_rope, apply_rope_transpose
from dsr_kernels.types import FLOATS, AttentionStats, Backend

BACKEND = Backend("torch", None, FLOATS)  # PyTorch ops: any device

# Elements of one [B, H, C, R + Nk] logits block. A handful of such blocks are live at
# once: 2**22 float32 elements (16 MiB each) keeps the working set near 100 MiB.
CHUNK_ELEMENTS = 1 << 22

_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cpu_flash_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _uses_cpu_flash(call: AttentionCall) -> bool:
    # (PyTorch's CPU flash kernel needs one head dim for q, k and v.)
    return (
        call.q.device.type == "cpu"
        and call.attn_mask is None
        and call.causal == Causal.NONE
        and _cpu_flash is not None
        and call.v.shape[-1] == call.q.shape[-1]
    )


def _unpack(call: AttentionCall) -> tuple:
    """(q, k, v, rk, rv, sinks, key_mask, scale): what the CPU flash paths read."""
    return call.q, call.k, call.v, call.rk, call.rv, call.sinks, call.key_mask, call.scale


def _repeat_heads(t: Tensor, group: int) -> Tensor:
    """[B, Hk, N, D] -> [B, Hk * group, N, D], head h reading head h // group (grouped K/V).

    This backend repeats grouped K/V heads (a copy); the "cpu" and "triton" kernels read
    them in place.
    """
    return t.repeat_interleave(group, dim=1)


def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chunks(q: Tensor, num_keys: int, chunk_elements: int | None):
    B, H, Nq, _ = q.shape
    C = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, B * H * num_keys))
    for i0 in range(0, Nq, C):
        yield i0, min(Nq, i0 + C)


def _registers(q: Tensor, rk: Tensor | None, rv: Tensor | None, dtype: torch.dtype):
    if rk is None:
        return None, None
    B, H = q.shape[:2]
    return rk.to(dtype).expand(B, H, -1, -1), rv.to(dtype).expand(B, H, -1, -1)


def _token_logits(qc: Tensor, row0: int, k: Tensor, call: AttentionCall) -> Tensor:
    """Masked logits of one query chunk qc [B, H, C, D] (rows row0 ..) on the token keys k
    (call's, in the accumulation dtype): [B, H, C, Nk]."""
    C, Nk = qc.shape[2], k.shape[2]
    s = torch.matmul(qc, k.transpose(-1, -2)).mul_(call.scale)
    key_mask, attn_mask, causal_offset = call.key_mask, call.attn_mask, call.causal_offset
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    if causal_offset is not None:
        i = torch.arange(row0, row0 + C, device=qc.device)[:, None]
        causal = torch.arange(Nk, device=qc.device)[None, :] <= i + causal_offset
        allowed = causal if allowed is None else allowed & causal
    if attn_mask is not None:
        am = attn_mask[:, :, row0 : row0 + C]
        if am.dtype == torch.bool:
            allowed = am if allowed is None else allowed & am
        else:
            s.add_(am)
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    return s


def _logits(qc: Tensor, row0: int, k: Tensor, rk: Tensor | None, call: AttentionCall) -> Tensor:
    """[B, H, C, R + Nk] logits of one query chunk, registers first (never masked)."""
    s = _token_logits(qc, row0, k, call)
    if rk is None:
        return s
    return torch.cat([torch.matmul(qc, rk.transpose(-1, -2)).mul_(call.scale), s], dim=-1)


def _rotated(call: AttentionCall) -> AttentionCall:
    """The call with q and k rotated in the accumulation type, rounded back to their dtype
    (as the kernels do), and no rotary tables left."""
    q, k = call.q, call.k
    acc = _acc_dtype(q)
    cos, sin = call.rope_cos.to(acc), call.rope_sin.to(acc)
    style = RopeStyle(call.rope_style)
    q = apply_rope(q.to(acc), cos, sin, style).to(q.dtype)
    k = apply_rope(k.to(acc), cos, sin, style).to(k.dtype)
    return call.replace(q=q, k=k, rope_cos=None, rope_sin=None, rope_style=int(RopeStyle.NONE))


def _overlaps(t: Tensor) -> bool:
    """Whether two indices of t share memory (a stride 0 from expand, unfold's overlapping rows)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    span = 1
    for st, n in dims:
        if st < span:
            return True
        span = st * n
    return False


def _no_overlap(t: Tensor | None) -> Tensor | None:
    """t, or a copy where its elements share memory: PyTorch's CPU flash kernels read such
    views wrongly (heads overlapping as unfold makes them gave wrong outputs)."""
    return t.contiguous() if t is not None and _overlaps(t) else t


def _without_overlaps(call: AttentionCall) -> AttentionCall:
    return call.replace(**{name: _no_overlap(getattr(call, name)) for name in ("q", "k", "v", "rk", "rv")})


def _all_finite(*tensors: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _undefined_rows_nan(out: Tensor, lse: Tensor) -> None:
    """Rows with a NaN or +inf logit (lse NaN or +inf): out and lse NaN (the NaN contract of
    reference/attention.py; PyTorch's kernels give lse = +inf, or 0 times a NaN sink)."""
    undefined = torch.isnan(lse) | (lse == float("inf"))
    if undefined.any():
        lse.masked_fill_(undefined, float("nan"))
        out.masked_fill_(undefined[..., None], float("nan"))


def _key_mask_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, Nk] bool -> additive [B, 1, 1, Nk] (what the CPU flash kernel takes)."""
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill_(~key_mask, float("-inf"))[:, None, None, :]


# ----------------------------------------------------------------------------- forward


def _fwd_cpu_flash(call: AttentionCall, out: Tensor, lse: Tensor) -> None:
    q, k, v, rk, rv, sinks, key_mask, scale = _unpack(call)
    acc = _acc_dtype(q)
    bias = _key_mask_bias(key_mask, q.dtype)
    o_tok, lse_tok = _cpu_flash(q, k, v, attn_mask=bias, scale=scale)
    if key_mask is not None:  # the kernel reports lse = 0 for a row with every key masked
        lse_tok = lse_tok.masked_fill(~key_mask.any(-1)[:, None, None], float("-inf"))
    parts = [(o_tok, lse_tok.to(acc))]
    if rk is not None:
        rk_, rv_ = _registers(q, rk, rv, q.dtype)
        o_reg, lse_reg = _cpu_flash(q, rk_, rv_, scale=scale)
        parts.append((o_reg, lse_reg.to(acc)))
    lses = [p[1] for p in parts]
    if sinks is not None:
        lses.append(sinks.to(acc)[None, :, None].expand_as(lses[0]))
    total = torch.logsumexp(torch.stack(lses), dim=0)  # [B, H, Nq]; -inf if nothing attended
    lse.copy_(total)
    if len(parts) == 1 and sinks is None:
        out.copy_(o_tok)
        return
    total_safe = total.masked_fill(torch.isneginf(total), 0.0)
    # out = sum_part w_part * out_part, accumulated in place (in float32 for half inputs).
    merged = out if out.dtype == acc else torch.empty_like(out, dtype=acc)
    torch.mul(parts[0][0], torch.exp(parts[0][1] - total_safe)[..., None], out=merged)
    for o, part_lse in parts[1:]:
        merged.addcmul_(o, torch.exp(part_lse - total_safe)[..., None])
    if merged is not out:
        out.copy_(merged)


def _fwd_chunked(call: AttentionCall, out: Tensor, lse: Tensor, chunk_elements: int | None) -> None:
    q, k, v, rk, rv, sinks, _, _ = _unpack(call)
    acc = _acc_dtype(q)
    k_, v_ = k.to(acc), v.to(acc)
    rk_, rv_ = _registers(q, rk, rv, acc)
    R = 0 if rk is None else rk_.shape[2]
    sink = None if sinks is None else sinks.to(acc)[None, :, None]  # [1, H, 1]
    for i0, i1 in _chunks(q, R + k.shape[2], chunk_elements):
        s = _logits(q[:, :, i0:i1].to(acc), i0, k_, rk_, call)
        m = s.amax(-1)  # [B, H, C]
        if sink is not None:
            m = torch.maximum(m, sink)
        m = m.masked_fill(torch.isinf(m), 0.0)  # rows with nothing to attend: keep exp() finite
        p = s.sub_(m[..., None]).exp_()  # unnormalised
        denom = p.sum(-1)
        if sink is not None:
            denom = denom + torch.exp(sink - m)
        lse[:, :, i0:i1] = m + torch.log(denom)  # log(0) = -inf where nothing is attended
        p.mul_(torch.where(denom > 0, denom.reciprocal(), 0.0)[..., None])
        o = torch.matmul(p[..., R:], v_)
        if rv_ is not None:
            o += torch.matmul(p[..., :R], rv_)
        out[:, :, i0:i1] = o


def _stats_sweep(call: AttentionCall, outputs: AttentionOutputs, chunk_elements: int | None) -> None:
    """entropy, register_share and key_mass from the final lse, chunk by chunk.

    log p = s - lse directly, so the entropy -sum p log p takes no log per element.
    """
    q, k, rk, sinks, scale = call.q, call.k, call.rk, call.sinks, call.scale
    _, lse, entropy, register_share, key_mass = outputs
    acc = _acc_dtype(q)
    k_ = k.to(acc)
    rk_, _ = _registers(q, rk, rk, acc)
    R = 0 if rk is None else rk_.shape[2]
    tiny = torch.finfo(acc).min
    with_mass = not call.key_mass_in_backward  # else the backward sums it (_bwd_chunked)
    if with_mass:
        key_mass.zero_()
    for i0, i1 in _chunks(q, R + k.shape[2], chunk_elements):
        qc = q[:, :, i0:i1].to(acc)
        lse_c = lse[:, :, i0:i1].to(acc)
        # Rows with lse = -inf attend nothing: subtracting +inf gives them p = 0.
        lse_c = lse_c.masked_fill(torch.isneginf(lse_c), float("inf"))[..., None]
        ent = torch.zeros_like(lse_c[..., 0])
        share = torch.zeros_like(ent)
        parts = [(R, torch.matmul(qc, rk_.transpose(-1, -2)).mul_(scale))] if R else []
        parts.append((call.num_prefix_tokens, _token_logits(qc, i0, k_, call)))
        col = 0
        for n_register_cols, log_p in parts:
            hidden = log_p == float("-inf")  # masked keys: p = 0, in NaN rows too
            log_p.sub_(lse_c)
            log_p.clamp_(min=tiny)  # p = 0 entries (masked, or a -inf logit): 0 * finite, not 0 * -inf
            p = torch.exp(log_p).masked_fill_(hidden, 0.0)
            ent -= torch.linalg.vecdot(p, log_p)
            if n_register_cols:
                share += p[..., :n_register_cols].sum(-1)
            if with_mass:
                key_mass[..., col : col + p.shape[-1]] += p.sum(2)
            col += p.shape[-1]
        if sinks is not None:
            log_p_sink = (sinks.to(acc)[None, :, None] - lse_c[..., 0]).clamp(min=tiny)
            ent -= torch.exp(log_p_sink) * log_p_sink
        entropy[:, :, i0:i1] = ent
        # (a row with a NaN or +inf logit: NaN even with no register column to sum)
        register_share[:, :, i0:i1] = share.masked_fill_(torch.isnan(lse_c[..., 0]), float("nan"))


def attention_fwd_torch(call: AttentionCall, outputs: AttentionOutputs, *, chunk_elements: int | None = None) -> None:
    """Fills out [B, H, Nq, Dv], lse [B, H, Nq] and, with return_stats, the statistics.

    With rope tables, q and the token keys are rotated first (the registers are not).
    """
    group = call.q.shape[1] // call.k.shape[1]
    if group > 1:
        call = call.replace(k=_repeat_heads(call.k, group), v=_repeat_heads(call.v, group))
    if call.rope_cos is not None:
        call = _rotated(call)
    out, lse = outputs.out, outputs.lse
    # PyTorch's CPU flash kernel can drop a NaN logit (its row max skips NaN in bf16) and
    # keeps a NaN key that an additive -inf masks: inputs with a non-finite q or key take
    # the chunks, which follow the NaN contract.
    if _uses_cpu_flash(call) and _all_finite(call.q, call.k, call.rk):
        _fwd_cpu_flash(_without_overlaps(call), out, lse)
    else:
        _fwd_chunked(call, out, lse, chunk_elements)
    _undefined_rows_nan(out, lse)
    if call.return_stats:
        _stats_sweep(call, outputs, chunk_elements)


def attention_varlen_torch(call: AttentionCall) -> tuple[Tensor, AttentionStats]:
    """Packed sequences, one at a time: this backend's batched op on each sequence
    (:func:`dsr_kernels.reference.attention.per_sequence`), differentiable through it."""

    def batched(sub: AttentionCall) -> tuple[Tensor, AttentionStats]:
        out, lse, entropy, share, key_mass = torch.ops.dsr_kernels.attention_fwd(*sub.as_args(), "torch")
        return out, AttentionStats(lse.detach().float(), entropy.detach(), share.detach(), key_mass.detach())

    return per_sequence(call, batched)


# ----------------------------------------------------------------------------- backward


def _sink_grad(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """d sinks_h = -sum_{b,i} p_sink,bhi * delta_bhi, with p_sink = exp(sinks - lse), 0 in a
    row that attends nothing (lse = -inf: every key hidden and the sink -inf)."""
    lse = lse.to(delta.dtype)
    p_sink = torch.exp(sinks.to(delta.dtype)[None, :, None] - lse).masked_fill(lse == float("-inf"), 0.0)
    return -(p_sink * delta).sum((0, 2))


def _store_register_grads(rk: Tensor, drk_b: Tensor, drv_b: Tensor, drk: Tensor, drv: Tensor) -> None:
    if rk.dim() == 3:  # shared across the batch: sum the per-sample gradients
        drk_b, drv_b = drk_b.sum(0), drv_b.sum(0)
    drk.copy_(drk_b)
    drv.copy_(drv_b)


def _bwd_cpu_flash(call: AttentionCall, dout: Tensor, out: Tensor, lse: Tensor, grads: AttentionGrads) -> None:
    # The kernel computes P = exp(s - lse) and delta = rowsum(dO * O) from what it is
    # given: passing the merged out and lse yields the merged softmax's gradient. Rows
    # with lse = -inf get +inf instead, so that their P is 0 rather than inf.
    q, k, v, rk, rv, _, key_mask, scale = _unpack(call)
    dq, dk, dv, drk, drv, _ = grads
    lse_ = lse.masked_fill(torch.isneginf(lse), float("inf"))  # float64 for float64 inputs
    bias = _key_mask_bias(key_mask, q.dtype)
    dq_tok, dk_, dv_ = _cpu_flash_bwd(dout, q, k, v, out, lse_, 0.0, False, attn_mask=bias, scale=scale)
    dk.copy_(dk_)
    dv.copy_(dv_)
    if rk is None:
        dq.copy_(dq_tok)
        return
    rk_, rv_ = _registers(q, rk, rv, q.dtype)
    dq_reg, drk_b, drv_b = _cpu_flash_bwd(dout, q, rk_, rv_, out, lse_, 0.0, False, scale=scale)
    if dq.dtype == dq_tok.dtype:
        torch.add(dq_tok, dq_reg, out=dq)
    else:
        dq.copy_(dq_tok.to(_acc_dtype(q)) + dq_reg)
    _store_register_grads(rk, drk_b, drv_b, drk, drv)


def _bwd_chunked(
    call: AttentionCall,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    grads: AttentionGrads,
    chunk_elements: int | None,
    key_mass: Tensor | None = None,
) -> None:
    q, k, v, rk, rv, _, _, scale = _unpack(call)
    dq, dk, dv, drk, drv, _ = grads
    acc = delta.dtype
    k_, v_ = k.to(acc), v.to(acc)
    rk_, rv_ = _registers(q, rk, rv, acc)
    R = 0 if rk is None else rk_.shape[2]
    dk_, dv_ = torch.zeros_like(k_), torch.zeros_like(v_)
    drk_b = drv_b = None
    if rk is not None:
        drk_b, drv_b = torch.zeros_like(rk_), torch.zeros_like(rv_)
    mass = None if key_mass is None else torch.zeros(key_mass.shape, dtype=acc, device=key_mass.device)
    for i0, i1 in _chunks(q, R + k.shape[2], chunk_elements):
        qc, doc = q[:, :, i0:i1].to(acc), dout[:, :, i0:i1].to(acc)
        lse_c, delta_c = lse[:, :, i0:i1].to(acc), delta[:, :, i0:i1]
        p = _logits(qc, i0, k_, rk_, call)
        hidden = p == float("-inf")  # masked keys: p = 0 and no gradient, in NaN rows too
        p.sub_(lse_c.masked_fill(torch.isneginf(lse_c), float("inf"))[..., None]).exp_().masked_fill_(hidden, 0.0)
        if mass is not None:  # the key mass: column sums of P over the chunks, in order
            mass += p.sum(2)
        dp = torch.matmul(doc, v_.transpose(-1, -2))  # [B, H, C, Nk]
        if rv_ is not None:
            dp = torch.cat([torch.matmul(doc, rv_.transpose(-1, -2)), dp], dim=-1)
        ds = dp.sub_(delta_c[..., None]).mul_(p).masked_fill_(hidden, 0.0)  # dS = P * (dP - delta)
        dq_c = torch.matmul(ds[..., R:], k_)
        dk_ += torch.matmul(ds[..., R:].transpose(-1, -2), qc)
        dv_ += torch.matmul(p[..., R:].transpose(-1, -2), doc)
        if rk_ is not None:
            dq_c += torch.matmul(ds[..., :R], rk_)
            drk_b += torch.matmul(ds[..., :R].transpose(-1, -2), qc)
            drv_b += torch.matmul(p[..., :R].transpose(-1, -2), doc)
        dq[:, :, i0:i1] = dq_c.mul_(scale)
    dk.copy_(dk_.mul_(scale))
    dv.copy_(dv_)
    if rk is not None:
        _store_register_grads(rk, drk_b.mul_(scale), drv_b, drk, drv)
    if key_mass is not None:
        key_mass.copy_(mass)


def attention_bwd_torch(
    call: AttentionCall,
    dout: Tensor,
    out: Tensor,
    lse: Tensor,
    grads: AttentionGrads,
    *,
    key_mass: Tensor | None = None,
    chunk_elements: int | None = None,
) -> None:
    """Fills dq, dk, dv (and drk, drv, dsinks when present) from the saved out and lse,
    and key_mass [B, H, R + Nk] when given (column sums of P: the chunked path).

    dS = P * (dO V^T - delta) with delta = rowsum(dO * O); dQ = dS K scale,
    dK = dS^T Q scale, dV = P^T dO; d sink_h = -sum_{b,i} p_sink * delta. With rope the
    gradients of the rotated q and k are rotated back (the transpose of the rotation).
    """
    q, k, v = call.q, call.k, call.v
    acc = _acc_dtype(q)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # gradients of the repeated heads, summed over each group
        B, Hk, Nk = k.shape[:3]
        dk_rep = torch.empty(B, Hk * group, Nk, k.shape[3], dtype=acc, device=k.device)
        dv_rep = torch.empty(B, Hk * group, Nk, v.shape[3], dtype=acc, device=v.device)
        repeated = call.replace(k=_repeat_heads(k, group), v=_repeat_heads(v, group))
        attention_bwd_torch(
            repeated,
            dout,
            out,
            lse,
            grads._replace(dk=dk_rep, dv=dv_rep),
            key_mass=key_mass,
            chunk_elements=chunk_elements,
        )
        grads.dk.copy_(dk_rep.unflatten(1, (Hk, group)).sum(2))
        grads.dv.copy_(dv_rep.unflatten(1, (Hk, group)).sum(2))
        return
    if call.rope_cos is not None:
        dq_rot, dk_rot = torch.empty_like(grads.dq, dtype=acc), torch.empty_like(grads.dk, dtype=acc)
        attention_bwd_torch(
            _rotated(call),
            dout,
            out,
            lse,
            grads._replace(dq=dq_rot, dk=dk_rot),
            key_mass=key_mass,
            chunk_elements=chunk_elements,
        )
        cos, sin, style = call.rope_cos.to(acc), call.rope_sin.to(acc), RopeStyle(call.rope_style)
        grads.dq.copy_(apply_rope_transpose(dq_rot, cos, sin, style))
        grads.dk.copy_(apply_rope_transpose(dk_rot, cos, sin, style))
        return
    sinks, dsinks = call.sinks, grads.dsinks
    # PyTorch's kernel passes masked keys gradient 0 * NaN when a row is NaN (its lse, out or
    # dout): calls with non-finite values take the chunks, which give them none.
    if key_mass is None and _uses_cpu_flash(call) and _all_finite(q, k, call.rk, out, dout):
        _bwd_cpu_flash(_without_overlaps(call), _no_overlap(dout), out, lse, grads)
        if sinks is not None:
            dsinks.copy_(_sink_grad(sinks, lse, (dout.to(acc) * out.to(acc)).sum(-1)))
        return
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # [B, H, Nq]
    _bwd_chunked(call, dout, lse, delta, grads, chunk_elements, key_mass)
    if sinks is not None:
        dsinks.copy_(_sink_grad(sinks, lse, delta))
