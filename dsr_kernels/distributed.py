"""Context parallelism on ``torch.distributed``: ring and Ulysses attention with registers and exact statistics.

Each rank of a process group holds a shard of the sequence ([B, H, N_local, D]) and calls
the same function; the result on each rank is its shard of what
:func:`dsr_kernels.attention` returns on the whole sequence, statistics and gradients
included (docs/distributed.md):

- :func:`ring_attention`: the K/V shards circulate around the ring (``isend`` / ``irecv``
  posted before each step's compute, waited after it); each step is one call of the fused
  op (two where a causal step covers only part of the queries), and the partial outputs
  merge by their log-sum-exps. The registers and the sink enter the first step only (each
  rank's own shard), so each query's softmax sees them once. Key mass needs every
  query's final lse: a second ring pass circulates (q, lse) and reads the column sums of
  exp(s - lse) from the backward kernel (dV with dO = 1 and a value head dim of 1).
  The backward is FlashAttention's ring backward: each step's gradient with the global
  out and lse, dK / dV accumulators travelling with their shard and returning home.
- :func:`ulysses_attention`: all-to-all from sequence shards to head shards, the fused op
  on the full sequence with H / G heads, all-to-all back.
- :func:`shard_sequence` / :func:`unshard_sequence`: the contiguous split and the
  load-balanced one for causal attention (rank r holds chunk r and chunk 2G - 1 - r of
  2G chunks), equal or stated lengths.

Inputs are checked on every rank, and the ranks compare their shapes, dtypes and options
in one small ``all_gather`` before any collective that could hang: bad input raises the
same ValueError on every rank. Only ``torch.distributed`` moves data (gloo for CPU
tensors, NCCL for CUDA ones); nothing here is a communication layer of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.backends import check_name, names, resolve
from dsr_kernels.ops.attention import (
    MAX_HEAD_DIM,
    attention,
    check_operands,
    check_options,
    check_registers,
    check_sinks,
)
from dsr_kernels.rope import ROPE_STYLES, RopeStyle, apply_rope
from dsr_kernels.types import AttentionStats
from dsr_kernels.validation import check_device, check_tensor, last_dim_contiguous, shape_str

__all__ = ["ring_attention", "shard_lengths", "shard_sequence", "ulysses_attention", "unshard_sequence"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- layout


class Segment(NamedTuple):
    """A run of a rank's tokens that is contiguous in the global sequence."""

    start: int  # global position of its first token
    local: int  # index of its first token in the rank's shard
    length: int


@dataclass(frozen=True)
class Layout:
    """Which global positions each rank holds.

    ``lengths[r]``: rank r's number of tokens. Contiguous (``balanced=False``): rank r
    holds positions [sum(lengths[:r]), sum(lengths[:r + 1])). Balanced: rank r's shard is
    a front chunk of ceil(n_r / 2) tokens followed by a back chunk of floor(n_r / 2), the
    chunks in global order F_0, F_1, ..., F_{G-1}, B_{G-1}, ..., B_0, so that under causal
    attention every rank has about the same work. Within a rank, positions increase.
    """

    lengths: tuple[int, ...]
    balanced: bool

    def segments(self, rank: int) -> tuple[Segment, ...]:
        n = self.lengths
        if not self.balanced:
            return (Segment(sum(n[:rank]), 0, n[rank]),)
        front = [(x + 1) // 2 for x in n]
        back = [x // 2 for x in n]
        segs = (
            Segment(sum(front[:rank]), 0, front[rank]),
            Segment(sum(front) + sum(back[rank + 1 :]), front[rank], back[rank]),
        )
        return tuple(s for s in segs if s.length)

    def in_global_order(self) -> list[tuple[int, Segment]]:
        """(rank, segment) of every segment, sorted by global position."""
        pieces = [(r, s) for r in range(len(self.lengths)) for s in self.segments(r)]
        return sorted(pieces, key=lambda p: p[1].start)

    def prefix_count(self, rank: int, num_prefix_tokens: int) -> int:
        """How many of rank's tokens lie among the first ``num_prefix_tokens`` positions (a prefix of its shard)."""
        return sum(min(max(num_prefix_tokens - s.start, 0), s.length) for s in self.segments(rank))

    def to_global(self) -> Tensor:
        """perm such that x_global = x_concat[perm], x_concat the shards concatenated in rank order."""
        offsets = [sum(self.lengths[:r]) for r in range(len(self.lengths))]
        idx = [torch.arange(offsets[r] + s.local, offsets[r] + s.local + s.length) for r, s in self.in_global_order()]
        return torch.cat(idx)


def shard_lengths(n: int, world_size: int, *, balanced: bool = False) -> list[int]:
    """The default shard lengths of a sequence of ``n`` tokens over ``world_size`` ranks.

    Contiguous: ``torch.tensor_split``'s sizes (the last ranks one shorter when G does
    not divide n). Balanced: n split into 2G such chunks, rank r holding chunk r and
    chunk 2G - 1 - r.
    """
    if not balanced:
        return [n // world_size + (r < n % world_size) for r in range(world_size)]
    chunks = [n // (2 * world_size) + (c < n % (2 * world_size)) for c in range(2 * world_size)]
    return [chunks[r] + chunks[2 * world_size - 1 - r] for r in range(world_size)]


def _group_info(fn: str, group) -> tuple[object, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{fn}(): torch.distributed is not initialised: call torch.distributed.init_process_group "
            "first (torchrun sets up its environment), or pass 'group'"
        )
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _check_lengths(fn: str, lengths, n: int, world: int) -> tuple[int, ...]:
    lengths = tuple(int(x) for x in lengths)
    if len(lengths) != world or sum(lengths) != n or min(lengths) < 1:
        raise ValueError(
            f"{fn}(): argument 'lengths' must give each of the {world} ranks at least one token and "
            f"sum to the sequence length {n}, got {list(lengths)}"
        )
    return lengths


def shard_sequence(
    x: Tensor, dim: int, group=None, *, balanced: bool = False, lengths: list[int] | None = None
) -> Tensor:
    """This rank's shard of ``x`` (the whole sequence, the same on every rank) along ``dim``.

    ``balanced=False``: a contiguous piece (a view of x). ``balanced=True``: the
    load-balanced split for causal attention (a front chunk and a back chunk, copied).
    ``lengths``: each rank's number of tokens (default :func:`shard_lengths`); under
    ``balanced`` a rank's front chunk has ceil(n_r / 2) of them. No communication.
    Shard q, k, v, ``key_mask`` (dim 1) and the rope tables (dim 0) the same way.
    """
    group, rank, world = _group_info("shard_sequence", group)
    n = x.shape[dim]
    lengths = shard_lengths(n, world, balanced=balanced) if lengths is None else lengths
    layout = Layout(_check_lengths("shard_sequence", lengths, n, world), balanced)
    parts = [x.narrow(dim, s.start, s.length) for s in layout.segments(rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(x: Tensor, dim: int, group=None, *, balanced: bool = False) -> Tensor:
    """The whole sequence from every rank's shard ``x`` (lengths may differ), on every rank.

    The inverse of :func:`shard_sequence` with the same ``balanced``: an ``all_gather``
    (shards padded to the longest). The result has no autograd history. The ranks' shards
    must agree but for ``dim`` (else the same ValueError on every rank).
    """
    fn = "unshard_sequence"
    group, _, _ = _group_info(fn, group)
    dim = dim % x.dim()
    dtypes = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *_DTYPES)
    shape = [s if d != dim else -1 for d, s in enumerate(x.shape)][:8]  # (a fixed-size vector: 8 dims compared)
    meta = [x.dim(), dtypes.index(x.dtype) if x.dtype in dtypes else -1, x.shape[dim], *shape, *[0] * (8 - len(shape))]
    rows = [[int(v) for v in row] for row in _all_gather_ints(torch.tensor(meta), group, x.device).tolist()]
    if any(row[:2] + row[3:] != rows[0][:2] + rows[0][3:] for row in rows):
        seen = ", ".join(
            f"rank {r} {row[3 : 3 + min(row[0], 8)]} {dtypes[row[1]] if row[1] >= 0 else 'another dtype'}"
            for r, row in enumerate(rows)
        )
        raise ValueError(f"{fn}(): the shards must have the same dtype and shape but for dim {dim} (-1), got {seen}")
    lengths = [int(row[2]) for row in rows]
    layout = Layout(tuple(lengths), balanced)
    shards = _gather_padded(x.detach(), dim, lengths, group)
    return torch.cat([shards[r].narrow(dim, s.local, s.length) for r, s in layout.in_global_order()], dim)


# ----------------------------------------------------------------------------- communication


def _comm_device(group, like: torch.device) -> torch.device:
    """Where small bookkeeping tensors go: the data's device under NCCL, the CPU otherwise."""
    return like if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _all_gather_ints(x: Tensor, group, device: torch.device) -> Tensor:
    """[G, len(x)]: every rank's x (a small float64 / int64 vector)."""
    x = x.to(_comm_device(group, device))
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return torch.stack(out).cpu()


def _gather_padded(x: Tensor, dim: int, lengths: list[int], group) -> list[Tensor]:
    """Every rank's x, whose ``dim`` is ``lengths[r]`` long on rank r (all_gather of padded copies)."""
    longest = max(lengths)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim).contiguous() if pad[dim] else x.contiguous()
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded, group=group)
    return [t.narrow(dim, 0, n) for t, n in zip(out, lengths, strict=True)]


class _Exchange:
    """Tensors sent to the next rank of the ring while the same number arrive from the previous one."""

    def __init__(self, plan: _Plan, send: list[Tensor], recv_like: list[tuple], tag: int):
        self.received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in recv_like]
        ops = [dist.P2POp(dist.isend, t, plan.next, plan.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, plan.prev, plan.group, tag + i) for i, t in enumerate(self.received)]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Tensor]:
        for w in self._works:
            w.wait()
        return self.received


def _like(t: Tensor, length: int, dim: int) -> tuple:
    shape = list(t.shape)
    shape[dim] = length
    return tuple(shape), t.dtype, t.device


def _all_reduce_sum(tensors: list[Tensor], group) -> list[Tensor]:
    """The sums over the ranks of several tensors, in one all_reduce (float32, or float64 for float64)."""
    if not tensors:
        return []
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(acc) for t in tensors])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


# ----------------------------------------------------------------------------- validation

# What every rank must agree on, in the order of the metadata vector (N_q and N_k may differ).
_FIELDS = {
    "ok": "its own checks",
    "B": "the batch size (q.shape[0])",
    "H": "the query head count (q.shape[1])",
    "Hk": "the key/value head count (k.shape[1])",
    "D": "the head dim (q.shape[3])",
    "Dv": "the value head dim (v.shape[3])",
    "dtype": "the dtype",
    "device": "the device type",
    "registers": "kv_registers",
    "R": "the register count",
    "sinks": "whether sinks are given",
    "key_mask": "whether key_mask is given",
    "rope": "whether rope is given",
    "rope_style": "rope_style",
    "causal": "causal",
    "balanced": "balanced",
    "prefix": "num_prefix_tokens",
    "scale": "scale",
    "stats": "return_stats",
    "grad": "whether gradients are recorded (grad mode and an input that requires grad)",
    "backend": "the backend",
    "values": "the values of kv_registers and sinks (a checksum: parameters, the same on every rank)",
    "Nq": None,
    "Nk": None,
}
_DEVICES = ("cpu", "cuda")


def _values_checksum(opts: _Options, device: torch.device) -> Tensor:
    """A float64 0-d tensor on ``device`` that differs between ranks whose kv_registers or sinks
    differ (position-weighted sums; NaN and inf as large finite stand-ins), without a sync."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, t in enumerate(t for t in (*(opts.kv_registers or ()), opts.sinks) if t is not None):
        x = t.detach().reshape(-1).to(device=device, dtype=torch.float64)
        x = x.nan_to_num(nan=7.0e299, posinf=3.0e299, neginf=-5.0e299)
        weights = (torch.arange(x.numel(), device=device, dtype=torch.float64) % 13 + 1) * (i + 1)
        total = total + (x * weights).sum()
    return total


def _local_meta(fn: str, q, k, v, opts: _Options, backend_names: tuple[str, ...]) -> dict:
    """This rank's checks (raising as :func:`dsr_kernels.attention` does) and the facts the ranks compare."""
    check_operands(fn, q, k, v, {"q": "4-D [B, H, Nq, D]", "k": "4-D [B, Hk, Nk, D]", "v": "4-D [B, Hk, Nk, Dv]"})
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape[0] != B or k.shape[3] != D or Hk == 0 or H % Hk:
        raise ValueError(
            f"{fn}(): argument 'k' must have shape [B={B}, Hk, Nk, D={D}] with Hk dividing H={H}, got {shape_str(k)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}(): argument 'v' must have shape [B={B}, Hk={Hk}, Nk={Nk}, Dv] as k, got {shape_str(v)}")
    if 0 in (B, H, Nq, Nk, D, Dv):
        raise ValueError(
            f"{fn}(): every rank needs a non-empty shard, got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}(): head dims must be at most {MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    rk, _ = check_registers(fn, opts.kv_registers, q, ("B", B), H, D, Dv)
    check_sinks(fn, opts.sinks, q, H)
    if opts.key_mask is not None:
        check_tensor(fn, "key_mask", opts.key_mask)
        if opts.key_mask.dtype != torch.bool or opts.key_mask.shape != (B, Nk):
            raise ValueError(
                f"{fn}(): argument 'key_mask' must be a bool tensor [B={B}, Nk={Nk}] (this rank's keys), got "
                f"{opts.key_mask.dtype} {shape_str(opts.key_mask)}"
            )
        check_device(fn, "key_mask", opts.key_mask, q, "q")
    if opts.rope_style not in ROPE_STYLES:
        raise ValueError(f"{fn}(): argument 'rope_style' must be one of {ROPE_STYLES}, got {opts.rope_style!r}")
    if opts.rope is not None:
        if not isinstance(opts.rope, (tuple, list)) or len(opts.rope) != 2:
            raise TypeError(f"{fn}(): argument 'rope' must be a pair (cos, sin), got {type(opts.rope).__name__}")
        if Nq != Nk or D % 2:
            raise ValueError(
                f"{fn}(): argument 'rope' needs self-attention (Nq == Nk) and an even D, got q "
                f"{shape_str(q)}, k {shape_str(k)}"
            )
        for name, t in zip(("rope[0]", "rope[1]"), opts.rope, strict=True):
            check_tensor(fn, name, t)
            if tuple(t.shape) != (Nq, D) or not t.is_floating_point():
                raise ValueError(
                    f"{fn}(): argument '{name}' must be floating [N_local={Nq}, D={D}] (this rank's rows of the "
                    f"table), got {t.dtype} {shape_str(t)}"
                )
            check_device(fn, name, t, q, "q")
    if opts.causal and Nq != Nk:
        raise ValueError(f"{fn}(): causal needs self-attention shards (Nq == Nk on each rank), got Nq={Nq}, Nk={Nk}")
    check_options(fn, opts.num_prefix_tokens, None, opts.scale)
    check_name("attention", opts.backend)
    backend = resolve("attention", opts.backend, q, ("value_head_dim",) if Dv != D else ())
    if backend not in backend_names:
        raise ValueError(
            f"{fn}(): backend {backend!r} cannot run it: the ring's steps need a backend whose backward takes a "
            f"given out and lse, one of {backend_names} ('reference' is the single-device oracle)"
        )
    scale = D**-0.5 if opts.scale is None else float(opts.scale)
    return dict(
        ok=1, B=B, H=H, Hk=Hk, D=D, Dv=Dv, dtype=_DTYPES.index(q.dtype),
        device=_DEVICES.index(q.device.type) if q.device.type in _DEVICES else len(_DEVICES),
        registers=0 if rk is None else rk.dim() - 2, R=0 if rk is None else rk.shape[-2],
        sinks=int(opts.sinks is not None), key_mask=int(opts.key_mask is not None), rope=int(opts.rope is not None),
        rope_style=int(RopeStyle.parse(opts.rope_style)), causal=int(bool(opts.causal)), balanced=int(opts.balanced),
        prefix=opts.num_prefix_tokens, scale=scale, stats=int(bool(opts.return_stats)),
        grad=int(_records_grad(q, k, v, opts)), backend=names("attention").index(backend),
        values=_values_checksum(opts, q.device), Nq=Nq, Nk=Nk,
    )  # fmt: skip


def _agree(fn: str, group, q, k, v, opts: _Options, backend_names: tuple[str, ...]) -> dict:
    """Checks this rank's inputs, then compares every rank's: the same ValueError on every rank, or the facts.

    One all_gather of a small vector (and, only when some rank's own checks failed, an
    all_gather_object of the messages), so that no rank enters a collective the others skip.
    """
    error = None
    try:
        meta = _local_meta(fn, q, k, v, opts, backend_names)
    except (TypeError, ValueError, RuntimeError) as e:  # (BackendUnavailable is a RuntimeError)
        error, meta = f"{type(e).__name__}: {e}", {name: 0 for name in _FIELDS}
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    vector = torch.tensor([float(meta[f]) for f in _FIELDS if f != "values"], dtype=torch.float64)
    # (the checksum stays on the device: one transfer, no sync before the all_gather)
    values = meta["values"] if isinstance(meta["values"], Tensor) else torch.zeros((), dtype=torch.float64)
    vector = torch.cat([vector.to(values.device), values.reshape(1)])
    order = [f for f in _FIELDS if f != "values"] + ["values"]
    table = _all_gather_ints(vector, group, device)
    rows = [dict(zip(order, row.tolist(), strict=True)) for row in table]
    if not all(row["ok"] for row in rows):
        messages = [None] * len(rows)
        dist.all_gather_object(messages, error, group=group)
        raise ValueError(f"{fn}(): bad input on {_by_message(messages)}")
    differ = [
        f"{what}: " + ", ".join(f"rank {r} {_show(field, row[field])}" for r, row in enumerate(rows))
        for field, what in _FIELDS.items()
        if what is not None and len({row[field] for row in rows}) > 1
    ]
    if differ:
        raise ValueError(f"{fn}(): every rank must call it with the same shapes (but the sequence length), "
                         f"dtype and options; they differ in {'; '.join(differ)}")  # fmt: skip
    facts = dict(rows[0])
    facts["Nq"] = tuple(int(row["Nq"]) for row in rows)
    facts["Nk"] = tuple(int(row["Nk"]) for row in rows)
    facts["backend"] = names("attention")[int(facts["backend"])]
    if facts["prefix"] > sum(facts["Nk"]):
        raise ValueError(f"{fn}(): argument 'num_prefix_tokens' must be at most N={sum(facts['Nk'])}, "
                         f"got {opts.num_prefix_tokens}")  # fmt: skip
    return facts


def _records_grad(q: Tensor, k: Tensor, v: Tensor, opts: _Options) -> bool:
    """Whether autograd records the call (then every rank must take part in its backward)."""
    tensors = [q, k, v, *(opts.kv_registers or ()), opts.sinks]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _show(field: str, value: float) -> str:
    if field == "dtype":
        return str(_DTYPES[int(value)])
    if field == "backend":
        return repr(names("attention")[int(value)])
    if field == "registers":
        return ("none", "shared", "per sample")[int(value)]
    if field == "rope_style":
        return repr(RopeStyle(int(value)).label)
    if field in ("sinks", "key_mask", "rope", "causal", "balanced", "stats", "grad"):
        return str(bool(value))
    return f"{value:g}"


def _by_message(messages: list[str | None]) -> str:
    """The ranks' error messages, each once with the ranks that raised it: "ranks 0, 1: <message>"."""
    ranks: dict[str, list[str]] = {}
    for r, m in enumerate(messages):
        if m is not None:
            ranks.setdefault(m, []).append(str(r))
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(rs)}: {m}" for m, rs in ranks.items())


@dataclass(frozen=True)
class _Options:
    """The keyword options of both functions, as given."""

    kv_registers: tuple[Tensor, Tensor] | None
    sinks: Tensor | None
    key_mask: Tensor | None
    causal: bool
    balanced: bool
    num_prefix_tokens: int
    scale: float | None
    return_stats: bool
    rope: tuple[Tensor, Tensor] | None
    rope_style: str
    backend: str


def _rotated(q: Tensor, k: Tensor, opts: _Options) -> tuple[Tensor, Tensor]:
    """q and k rotated by this shard's rows of the rope tables (differentiably, in the accumulation type)."""
    if opts.rope is None:
        return q, k
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = (t.to(acc) for t in opts.rope)
    return tuple(apply_rope(t.to(acc), cos, sin, opts.rope_style).to(t.dtype) for t in (q, k))


# ----------------------------------------------------------------------------- ring


class Block(NamedTuple):
    """One fused call of a ring step: queries [q0, q1) against the first m keys of the visiting shard."""

    q0: int
    q1: int
    m: int
    causal: bool  # square and causal (a rank's own shard); else every one of the m keys is visible


@dataclass(frozen=True)
class _Plan:
    """Everything a ring pass needs besides the tensors."""

    group: object
    rank: int
    world: int
    next: int  # global ranks of the ring neighbours
    prev: int
    q_layout: Layout
    k_layout: Layout
    causal: bool
    num_prefix_tokens: int
    scale: float
    return_stats: bool
    backend: str

    def source(self, step: int) -> int:
        """Whose shard this rank holds at a step (its own at step 0)."""
        return (self.rank - step) % self.world

    def blocks(self, q_rank: int, k_rank: int) -> list[Block]:
        """The calls that cover the visible (query of q_rank, key of k_rank) pairs.

        Shards of different ranks never overlap in position, so under causal a query
        segment sees a prefix of the other shard (the segments before it) in full, and a
        rank's own shard is square causal (its positions increase).
        """
        nq, nk = self.q_layout.lengths[q_rank], self.k_layout.lengths[k_rank]
        if not self.causal or q_rank == k_rank:
            return [Block(0, nq, nk, self.causal)]
        blocks: list[Block] = []
        for seg in self.q_layout.segments(q_rank):
            m = sum(s.length for s in self.k_layout.segments(k_rank) if s.start < seg.start)
            if m == 0:
                continue
            if blocks and blocks[-1].m == m and blocks[-1].q1 == seg.local:
                blocks[-1] = blocks[-1]._replace(q1=seg.local + seg.length)
            else:
                blocks.append(Block(seg.local, seg.local + seg.length, m, False))
        return blocks

    def call(self, block: Block, q: Tensor, kv: list[Tensor | None], extras: dict) -> AttentionCall:
        """The fused op's record for one block (extras: registers, sinks, prefix count of the step)."""
        k, v, key_mask = kv
        m = block.m
        return AttentionCall(
            q=q[:, :, block.q0 : block.q1],
            k=k[:, :, :m],
            v=v[:, :, :m],
            rk=extras.get("rk"),
            rv=extras.get("rv"),
            sinks=extras.get("sinks"),
            key_mask=None if key_mask is None else key_mask[:, :m],
            causal=int(Causal.TOP_LEFT if block.causal else Causal.NONE),
            num_prefix_tokens=min(extras.get("prefix", 0), m),
            scale=self.scale,
            return_stats=extras.get("stats", False),
        )


class _Merged:
    """Running out, lse and row statistics of the steps seen so far (merged by log-sum-exp)."""

    def __init__(self, B: int, H: int, n: int, Dv: int, like: Tensor, stats: bool):
        self.acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        f = dict(dtype=self.acc, device=like.device)
        self.out = torch.zeros(B, H, n, Dv, **f)
        self.lse = torch.full((B, H, n), float("-inf"), **f)
        self.entropy = torch.zeros(B, H, n, **f) if stats else None
        self.share = torch.zeros(B, H, n, **f) if stats else None

    def add(self, block: Block, out: Tensor, lse: Tensor, entropy: Tensor, share: Tensor) -> None:
        rows = slice(block.q0, block.q1)
        lse_a, lse_b = self.lse[:, :, rows], lse.to(self.acc)
        new = torch.logaddexp(lse_a, lse_b)
        safe = torch.where(torch.isneginf(new), 0.0, new)  # rows that attend nothing yet: weights 0
        w_a, w_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
        self.out[:, :, rows] = w_a[..., None] * self.out[:, :, rows] + w_b[..., None] * out.to(self.acc)
        if self.entropy is not None:
            # The entropy of a mixture of disjoint outcome sets: H = sum_s w_s (H_s - log w_s).
            live = ~torch.isneginf(lse_b)
            ent_b = torch.where(live, entropy.to(self.acc), 0.0)
            self.entropy[:, :, rows] = (
                w_a * self.entropy[:, :, rows]
                - torch.special.xlogy(w_a, w_a)
                + w_b * ent_b
                - torch.special.xlogy(w_b, w_b)
            )
            self.share[:, :, rows] = w_a * self.share[:, :, rows] + w_b * torch.where(live, share.to(self.acc), 0.0)
        self.lse[:, :, rows] = new


def _fwd(call: AttentionCall, backend: str):
    return torch.ops.dsr_kernels.attention_fwd(*call.as_args(), backend)


def _bwd(call: AttentionCall, dout: Tensor, out: Tensor, lse: Tensor, backend: str):
    return torch.ops.dsr_kernels.attention_bwd(dout, out, lse, *call.as_args(), backend)


def _rows(t: Tensor, block: Block) -> Tensor:
    return t[:, :, block.q0 : block.q1].contiguous()


def _circulating(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _ring_forward(plan: _Plan, q: Tensor, kv: list[Tensor | None], regs: dict) -> _Merged:
    """The merged out, lse (and row statistics) of this rank's queries over every shard's keys."""
    B, H, n, _ = q.shape
    merged = _Merged(B, H, n, kv[1].shape[-1], q, plan.return_stats)
    for step in range(plan.world):
        src = plan.source(step)
        pending = None
        if step + 1 < plan.world:  # the next shard travels while this one is computed
            n_next = plan.k_layout.lengths[plan.source(step + 1)]
            sent = [t for t in kv if t is not None]
            pending = _Exchange(plan, sent, [_like(t, n_next, 2 if t.dim() == 4 else 1) for t in sent], tag=0)
        extras = dict(regs if step == 0 else {}, prefix=plan.k_layout.prefix_count(src, plan.num_prefix_tokens))
        extras["stats"] = plan.return_stats
        for block in plan.blocks(plan.rank, src):
            out, lse, entropy, share, _ = _fwd(plan.call(block, q, kv, extras), plan.backend)
            merged.add(block, out, lse, entropy, share)
        if pending is not None:
            received = iter(pending.wait())
            kv = [None if t is None else next(received) for t in kv]
    return merged


def _key_mass(plan: _Plan, q: Tensor, lse: Tensor, kv: list[Tensor | None], regs: dict) -> Tensor:
    """key_mass [B, H, R + Nk_local]: sum_i exp(s_ij - lse_i) over every rank's queries, with their final lse.

    A second ring pass: (q, lse) circulate and the keys stay. Each block's column sums
    come from the backward kernel: dV = P^T dO with P = exp(s - lse), so with dO = 1, a
    value head dim of 1 and out = 0 (delta = 0), dV is the key mass of the block's keys
    (and dRv the registers', on each rank's own queries; summed over the ranks after).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, _, key_mask = kv
    B, H = q.shape[:2]
    n = k.shape[2]
    group_size = H // k.shape[1]
    k_acc = k.to(acc).repeat_interleave(group_size, 1) if group_size > 1 else k.to(acc)  # key mass is per query head
    v1 = torch.zeros(B, H, n, 1, dtype=acc, device=q.device)
    mass = torch.zeros(B, H, n, dtype=acc, device=q.device)
    reg_mass = None
    extras = {}
    if "rk" in regs:
        rk = regs["rk"].to(acc).expand(B, *regs["rk"].shape[-3:]).contiguous()  # per sample: dRv is not summed
        extras = dict(rk=rk, rv=torch.zeros(*rk.shape[:-1], 1, dtype=acc, device=q.device))
    mine = [q.contiguous(), lse.contiguous()]
    for step in range(plan.world):
        src = plan.source(step)
        pending = None
        if step + 1 < plan.world:
            n_next = plan.q_layout.lengths[plan.source(step + 1)]
            pending = _Exchange(plan, mine, [_like(t, n_next, 2) for t in mine], tag=8)
        q_src, lse_src = mine
        for block in plan.blocks(src, plan.rank):
            call = plan.call(block, q_src.to(acc), [k_acc, v1, key_mask], extras if step == 0 else {})
            rows = block.q1 - block.q0
            ones = torch.ones(B, H, rows, 1, dtype=acc, device=q.device)
            zeros = torch.zeros(B, H, rows, 1, dtype=acc, device=q.device)
            _, _, dv, _, drv, _ = _bwd(call, ones, zeros, _rows(lse_src, block), plan.backend)
            mass[:, :, : block.m] += dv[..., 0]
            if step == 0 and extras:
                reg_mass = drv[..., 0]
        if pending is not None:
            mine = pending.wait()
    if reg_mass is None:
        return mass.float()
    (reg_mass,) = _all_reduce_sum([reg_mass], plan.group)
    return torch.cat([reg_mass, mass], dim=-1).float()


def _ring_backward(plan: _Plan, saved: dict, dout: Tensor) -> tuple[Tensor, ...]:
    """FlashAttention's ring backward: each step's gradient with the global out and lse.

    dQ accumulates here; dK / dV (float32) travel with their shard, one step behind it,
    and arrive home after the last step. Register and sink gradients come from the first
    step (the only one that has them) and are summed over the ranks in one all_reduce.
    """
    q, out, lse, regs = saved["q"], saved["out"], saved["lse"], saved["regs"]
    kv = saved["kv"]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = None  # the travelling dK / dV of the shard held at this step
    d_regs = {}
    pending_kv = pending_dkv = None
    for step in range(plan.world):
        src = plan.source(step)
        if step + 1 < plan.world:
            n_next = plan.k_layout.lengths[plan.source(step + 1)]
            sent = [t for t in kv if t is not None]
            pending_kv = _Exchange(plan, sent, [_like(t, n_next, 2 if t.dim() == 4 else 1) for t in sent], tag=0)
        extras = dict(regs if step == 0 else {}, prefix=0)
        parts = []
        for block in plan.blocks(plan.rank, src):
            call = plan.call(block, q, kv, extras)
            dq_b, dk_b, dv_b, drk, drv, dsinks = _bwd(call, _rows(dout, block), _rows(out, block), _rows(lse, block),
                                                      plan.backend)  # fmt: skip
            dq[:, :, block.q0 : block.q1] += dq_b
            parts.append((block.m, dk_b, dv_b))
            if step == 0:
                d_regs = {"rk": drk, "rv": drv, "sinks": dsinks}
        k, v = kv[0], kv[1]
        if pending_dkv is None:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            dkv = pending_dkv.wait()
        for m, dk_b, dv_b in parts:
            dkv[0][:, :, :m] += dk_b
            dkv[1][:, :, :m] += dv_b
        if plan.world > 1:  # to the rank that holds this shard next (after the last step: its owner)
            n_next = plan.k_layout.lengths[plan.source(step + 1)]
            pending_dkv = _Exchange(plan, dkv, [_like(t, n_next, 2) for t in dkv], tag=4)
        if pending_kv is not None:
            received = iter(pending_kv.wait())
            kv = [None if t is None else next(received) for t in kv]
            pending_kv = None
    if pending_dkv is not None:
        dkv = pending_dkv.wait()
    present = [name for name in ("rk", "rv", "sinks") if name in regs]
    reduced = dict(zip(present, _all_reduce_sum([d_regs[name] for name in present], plan.group), strict=True))
    k, v = saved["kv"][0], saved["kv"][1]
    return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), reduced.get("rk"), reduced.get("rv"),
            reduced.get("sinks"))  # fmt: skip


class RingAttentionFn(torch.autograd.Function):
    """Ring attention of this rank's (rotated) queries; saves the global out and lse for the backward."""

    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, rk, rv, sinks, key_mask):
        kv = [_circulating(k), _circulating(v), _circulating(key_mask)]
        regs = {name: t for name, t in (("rk", rk), ("rv", rv), ("sinks", sinks)) if t is not None}
        merged = _ring_forward(plan, q, kv, regs)
        B, H, n, Dv = merged.out.shape
        out = torch.empty(B, n, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)  # the op's memory order
        out.copy_(merged.out)
        if plan.return_stats:
            key_mass = _key_mass(plan, q, merged.lse, kv, regs)
            stats = (merged.entropy.float(), merged.share.float(), key_mass)
        else:
            stats = tuple(q.new_empty(0, dtype=torch.float32) for _ in range(3))
        ctx.plan = plan
        ctx.save_for_backward(q, kv[0], kv[1], kv[2], rk, rv, sinks, out, merged.lse)
        ctx.mark_non_differentiable(merged.lse, *stats)
        return out, merged.lse, *stats

    @staticmethod
    def backward(ctx, dout, *_stat_grads):
        q, k, v, key_mask, rk, rv, sinks, out, lse = ctx.saved_tensors
        regs = {name: t for name, t in (("rk", rk), ("rv", rv), ("sinks", sinks)) if t is not None}
        saved = dict(q=q, kv=[k, v, key_mask], regs=regs, out=out, lse=lse)
        grads = _ring_backward(ctx.plan, saved, dout)
        return (None, *grads, None)


def _options(**kw) -> _Options:
    if kw["balanced"] is None:
        kw["balanced"] = bool(kw["causal"])
    return _Options(**kw)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    balanced: bool | None = None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    return_stats: bool = False,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
    backend: str = "auto",
) -> Tensor | tuple[Tensor, AttentionStats]:
    """:func:`dsr_kernels.attention` over a sequence sharded across ``group``: ring attention.

    Each rank passes its shard, and gets its shard of what ``dsr_kernels.attention``
    returns on the whole sequence (out, statistics and gradients; the registers' key mass
    and their and the sinks' gradients are the whole sequence's, the same on every rank).

    Args:
        q: [B, H, Nq_local, D]; k [B, Hk, Nk_local, D], v [B, Hk, Nk_local, Dv]: this
            rank's tokens (Nq_local == Nk_local for causal and rope; lengths may differ
            between ranks). Same dtype, head counts and options on every rank.
        group: the process group (default: the world).
        kv_registers, sinks: as ``attention`` (the same tensors on every rank).
        key_mask: [B, Nk_local] bool, this rank's keys.
        causal: causal over global positions.
        balanced: how the tokens were sharded (:func:`shard_sequence`'s ``balanced``);
            default: balanced exactly when causal.
        num_prefix_tokens: the first tokens of the whole sequence that are in-sequence registers.
        scale, rope_style: as ``attention``; rope: (cos, sin), this rank's rows [N_local, D].
        return_stats: also return :class:`AttentionStats` of this rank's queries (lse,
            entropy, register_share [B, H, Nq_local]) and keys (key_mass [B, H, R +
            Nk_local], registers first), each equal to the single-device statistic.
            Key mass costs a second ring pass (docs/distributed.md).
        backend: "auto", "cpu", "torch" or "triton" (each step is one fused call).

    A group of one is the single-device op. Bad input raises the same ValueError on
    every rank (the ranks compare shapes, dtypes and options first).
    """
    fn = "ring_attention"
    group, rank, world = _group_info(fn, group)
    opts = _options(kv_registers=kv_registers, sinks=sinks, key_mask=key_mask, causal=causal, balanced=balanced,
                    num_prefix_tokens=num_prefix_tokens, scale=scale, return_stats=return_stats, rope=rope,
                    rope_style=rope_style, backend=backend)  # fmt: skip
    ring_backends = tuple(b for b in names("attention") if b != "reference")
    facts = _agree(fn, group, q, k, v, opts, ring_backends)
    plan = _Plan(
        group=group,
        rank=rank,
        world=world,
        next=dist.get_global_rank(group, (rank + 1) % world),
        prev=dist.get_global_rank(group, (rank - 1) % world),
        q_layout=Layout(facts["Nq"], opts.balanced),
        k_layout=Layout(facts["Nk"], opts.balanced),
        causal=bool(causal),
        num_prefix_tokens=num_prefix_tokens,
        scale=facts["scale"],
        return_stats=bool(return_stats),
        backend=facts["backend"],
    )
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    q, k = _rotated(q, k, opts)
    rk, rv = (last_dim_contiguous(t) for t in kv_registers) if kv_registers is not None else (None, None)
    out, lse, entropy, share, key_mass = RingAttentionFn.apply(plan, q, k, v, rk, rv, sinks, key_mask)
    if not return_stats:
        return out
    return out, AttentionStats(lse.float(), entropy, share, key_mass)


# ----------------------------------------------------------------------------- Ulysses


def _seq_to_heads(x: Tensor, lengths: tuple[int, ...], group) -> Tensor:
    """[B, Hx, n_rank, E] sequence shards -> [B, Hx / G, N, E] head shards (tokens in rank order)."""
    G, rank = len(lengths), dist.get_rank(group)
    B, Hx, n, E = x.shape
    send = x.reshape(B, G, Hx // G, n, E).transpose(0, 1).contiguous()  # [G, B, Hx/G, n, E]: one piece per rank
    per = [B * (Hx // G) * m * E for m in lengths]
    recv = x.new_empty(sum(per))
    dist.all_to_all_single(recv, send.reshape(-1), per, [per[rank]] * G, group=group)
    pieces = [p.view(B, Hx // G, m, E) for p, m in zip(recv.split(per), lengths, strict=True)]
    return torch.cat(pieces, dim=2)


def _heads_to_seq(y: Tensor, lengths: tuple[int, ...], group) -> Tensor:
    """The inverse of :func:`_seq_to_heads`: [B, Hx / G, N, E] -> [B, Hx, n_rank, E]."""
    G, rank = len(lengths), dist.get_rank(group)
    B, Hg, _, E = y.shape
    n = lengths[rank]
    send = torch.cat([p.reshape(-1) for p in y.split(list(lengths), dim=2)])
    per = [B * Hg * m * E for m in lengths]
    recv = y.new_empty(G * B * Hg * n * E)
    dist.all_to_all_single(recv, send, [per[rank]] * G, per, group=group)
    return recv.view(G, B, Hg, n, E).transpose(0, 1).reshape(B, G * Hg, n, E)


class SeqToHeadsFn(torch.autograd.Function):
    """Ulysses' all-to-all, differentiable (the backward is the inverse all-to-all)."""

    @staticmethod
    def forward(ctx, x, lengths, group, inverse: bool):
        ctx.lengths, ctx.group, ctx.inverse = lengths, group, inverse
        return (_heads_to_seq if inverse else _seq_to_heads)(x, lengths, group)

    @staticmethod
    def backward(ctx, grad):
        return (_seq_to_heads if ctx.inverse else _heads_to_seq)(grad, ctx.lengths, ctx.group), None, None, None


class SumGradsFn(torch.autograd.Function):
    """Identity forward; the backward sums the gradients over the ranks (one all_reduce for all of them)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):  # (custom Functions materialise None gradients as zeros: every rank reduces the same)
        return (None, *_all_reduce_sum(list(grads), ctx.group))


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    balanced: bool | None = None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    return_stats: bool = False,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
    backend: str = "auto",
) -> Tensor | tuple[Tensor, AttentionStats]:
    """:func:`dsr_kernels.attention` over a sequence sharded across ``group``: Ulysses (all-to-all).

    The arguments and results are :func:`ring_attention`'s. An all-to-all turns the
    sequence shards of q, k, v into head shards (H / G query heads and Hk / G key/value
    heads of the whole sequence on each rank), the fused op runs on them with those
    heads' registers and sinks, and an all-to-all turns out and the statistics back. G
    must divide H and Hk (a ValueError on every rank says so otherwise). Any backend,
    "reference" included.
    """
    fn = "ulysses_attention"
    group, rank, world = _group_info(fn, group)
    opts = _options(kv_registers=kv_registers, sinks=sinks, key_mask=key_mask, causal=causal, balanced=balanced,
                    num_prefix_tokens=num_prefix_tokens, scale=scale, return_stats=return_stats, rope=rope,
                    rope_style=rope_style, backend=backend)  # fmt: skip
    facts = _agree(fn, group, q, k, v, opts, names("attention"))
    H, Hk = int(facts["H"]), int(facts["Hk"])
    if H % world or Hk % world:
        raise ValueError(
            f"{fn}(): the group size G={world} must divide the query head count H={H} and the key/value head "
            f"count Hk={Hk} (each rank attends H / G heads of the whole sequence); use ring_attention, or a "
            "group whose size divides both"
        )
    lq, lk = facts["Nq"], facts["Nk"]
    q, k = _rotated(q, k, opts)
    qh = SeqToHeadsFn.apply(q, lq, group, False)  # [B, H/G, Nq, D]
    kh = SeqToHeadsFn.apply(k, lk, group, False)
    vh = SeqToHeadsFn.apply(v, lk, group, False)
    mask = None
    if key_mask is not None:
        mask = torch.cat(_gather_padded(key_mask, 1, list(lk), group), dim=1)
    # The gathered tokens are in rank order; causal attention and the prefix tokens need global order.
    reorder = opts.balanced and world > 1 and (causal or num_prefix_tokens > 0)
    if reorder:
        perm_q, perm_k = (Layout(n, True).to_global().to(q.device) for n in (lq, lk))
        qh, kh, vh = qh[:, :, perm_q], kh[:, :, perm_k], vh[:, :, perm_k]
        mask = None if mask is None else mask[:, perm_k]
    heads = slice(rank * H // world, (rank + 1) * H // world)
    regs, head_sinks = None, None
    present = [t for t in (*(kv_registers or ()), sinks) if t is not None]
    if present and any(t.requires_grad for t in present) and torch.is_grad_enabled():
        present = list(SumGradsFn.apply(group, *present))  # each rank's heads' gradients, summed: the whole
    if kv_registers is not None:
        regs = tuple(t[heads] if t.dim() == 3 else t[:, heads] for t in present[:2])
    if sinks is not None:
        head_sinks = present[-1][heads]
    result = attention(qh, kh, vh, kv_registers=regs, sinks=head_sinks, key_mask=mask, causal=causal,
                       num_prefix_tokens=num_prefix_tokens, scale=scale, return_stats=return_stats,
                       backend=backend)  # fmt: skip
    out, stats = result if return_stats else (result, None)
    if reorder:
        out = out[:, :, torch.argsort(perm_q)]
    out = SeqToHeadsFn.apply(out, lq, group, True)
    if not return_stats:
        return out
    R = int(facts["R"])
    rows = torch.stack([stats.lse, stats.entropy, stats.register_share], dim=-1)  # [B, H/G, Nq, 3]
    tokens = stats.key_mass[..., R:, None]  # [B, H/G, Nk, 1]
    if reorder:
        rows, tokens = rows[:, :, torch.argsort(perm_q)], tokens[:, :, torch.argsort(perm_k)]
    rows = _heads_to_seq(rows.contiguous(), lq, group)
    tokens = _heads_to_seq(tokens.contiguous(), lk, group)[..., 0]
    key_mass = tokens
    if R:
        reg_mass = torch.cat(_gather_padded(stats.key_mass[..., :R], 1, [H // world] * world, group), dim=1)
        key_mass = torch.cat([reg_mass, tokens], dim=-1)
    return out, AttentionStats(rows[..., 0], rows[..., 1], rows[..., 2], key_mass)
