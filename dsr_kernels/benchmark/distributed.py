"""Context parallelism in the bench: ring and Ulysses attention on N local processes, and a model of
the same layer on G GPUs.

**Measured** (one case per shape and process count N): the case starts N processes
(``torch.multiprocessing``, gloo on CPU tensors; NCCL, one GPU each, when N GPUs are present), each
holding 1 / N of one attention layer's sequence (B, H, S, D, R = 16 kv registers), and times, every
provider in lockstep on all ranks (a barrier before each call; a call's time is the slowest rank's):

- ``single``: :func:`dsr_kernels.attention` on the whole sequence in one process (rank 0, with all of
  the CPU threads; the other ranks wait): the baseline of the scaling;
- ``ring``, ``ulysses``: :func:`dsr_kernels.distributed.ring_attention` / ``ulysses_attention`` on each
  rank's shard: the layer as it runs;
- ``ring_compute``, ``ulysses_compute``: their fused calls without the communication (ring: N calls of
  the op, the query shard against a key shard, the registers in the first; Ulysses: the op on the
  whole sequence with H / N heads);
- ``ring_comm``, ``ulysses_comm``: their communication without the compute, as the schemes move the
  data (ring: N - 1 ``isend`` / ``irecv`` exchanges of the K/V shard with the neighbours, and in the
  backward N - 1 more of K/V and N of the float32 dK / dV; Ulysses: ``all_to_all_single`` of q, k, v
  and of out, and in the backward of dout and dq, dk, dv).

Each scheme's row carries the bytes a rank sends per layer (counted from the shapes), the time in
communication against compute, how much of the communication the layer hid (overlap), and the
speed-up against ``single``, paired by round. **On one CPU the N processes share its cores** (each
rank gets cores / N threads, ``single`` all of them), so the speed-up says what splitting the work
among processes costs on this machine, not what N devices would give; the tables say so.

**Model** (no measurement; :func:`layer_model`, :func:`crossover_tokens`): the same layer on G devices
with link bandwidth ``link_gbs`` (GB/s a device sends while it receives as much) and attention
throughput ``tflops``. Ring: each of the G steps computes a query shard against a K/V shard,
4 B H n^2 D FLOPs (n = S / G; the backward 10 B H n^2 D) while the next K/V shard, 2 B Hk n D b bytes
(the backward also the float32 dK / dV: 2 B Hk n D (b + 4)), travels: the step hides its transfer
once n >= Hk b F / (2 H W) (backward: Hk (b + 4) F / (5 H W)), i.e. from S* = G times that. Ulysses:
the all-to-alls of q, k, v and out move (G - 1) / G of 2 (H + Hk) B n D b bytes per device before and
after the attention, which cannot start before them; they cost less than the compute once
S >= (G - 1) / G (H + Hk) b F / (2 H W) (backward: 0.4 times that). Defaults: H200 with NVLink,
``LINK_GBS`` = 900 GB/s and ``TFLOPS`` = 790 TFLOP/s in bfloat16.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.common import Timing, speedup_fields, synchronize, timing_fields
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table, error_row

SCHEMES = ("ring", "ulysses")
BASELINE = "single"
PROVIDERS = (BASELINE, *(f"{s}{part}" for s in SCHEMES for part in ("", "_compute", "_comm")))
MODES = ("fwd", "full")  # forward; forward and backward
MODEL = "model"  # the provider of the analytic rows

# The model's defaults: H200 (NVLink 4, 900 GB/s per GPU; 790 TFLOP/s of bfloat16 attention, below the
# 989 TFLOP/s dense peak), and the other links of the plot: NVLink one way, a 400 Gb/s NIC per GPU.
LINK_GBS = 900.0
TFLOPS = 790.0
LINKS = {"NVLink 900 GB/s": 900.0, "NVLink one way 450 GB/s": 450.0, "400 Gb/s NIC 50 GB/s": 50.0}
MODEL_GROUPS = (2, 4, 8, 16, 32, 64)
MODEL_DTYPE_BYTES = 2  # bfloat16
TIMEOUT_S = 600.0  # a case's processes, all together
WARMUP_CALLS = 2  # per provider, before the timed rounds (the same number on every rank)
MAX_REPS = 100


@dataclass(frozen=True)
class LayerShape:
    """One attention layer: batch, query / key-value heads, the whole sequence's tokens, head dim, registers."""

    name: str
    B: int
    H: int
    Hk: int
    S: int
    D: int
    R: int = 16

    def describe(self) -> str:
        kv = f", Hk {self.Hk}" if self.Hk != self.H else ""
        return f"B {self.B}, H {self.H}{kv}, S {self.S}, D {self.D}, R {self.R}"


def all_shapes(device: torch.device) -> list[LayerShape]:
    """The measured layers: small ones on a CPU; Wan 2.1's at 81 frames of 480p (32,760 tokens) on GPUs."""
    if device.type == "cuda":
        return [
            LayerShape("wan1.3b-480p-81f", 1, 12, 12, 32760, 128),
            LayerShape("wan14b-480p-81f", 1, 40, 40, 32760, 128),
        ]
    return [
        LayerShape("cp-s512", 1, 8, 8, 512, 64),
        LayerShape("cp-s1024", 1, 8, 8, 1024, 64),
        LayerShape("cp-s4096", 1, 8, 8, 4096, 64),
    ]


# The layers of the model's rows and plot (heads and head dim: Wan 2.1 1.3B and 14B; a GQA layer).
MODEL_SHAPES = (
    LayerShape("wan1.3b-480p-81f", 1, 12, 12, 32760, 128),
    LayerShape("wan14b-480p-81f", 1, 40, 40, 32760, 128),
    LayerShape("gqa-h32-hk8", 1, 32, 8, 32760, 128),
)
PRESETS = {  # (preset, device type): (shapes, process counts, modes)
    ("quick", "cpu"): (("cp-s512",), (2,), ("fwd",)),
    ("default", "cpu"): (("cp-s1024",), (2,), MODES),
    ("full", "cpu"): (("cp-s1024", "cp-s4096"), (2, 4), MODES),
    ("quick", "cuda"): (("wan1.3b-480p-81f",), None, ("fwd",)),
    ("default", "cuda"): (("wan1.3b-480p-81f", "wan14b-480p-81f"), None, MODES),
    ("full", "cuda"): (("wan1.3b-480p-81f", "wan14b-480p-81f"), None, MODES),
}


# ----------------------------------------------------------------------------- the model


def ring_step(shape: LayerShape, G: int, *, direction: str = "fwd", dtype_bytes: int = MODEL_DTYPE_BYTES) -> dict:
    """One ring step on one device: {"bytes": what a steady step sends, "kv_bytes": the K/V shard,
    "dkv_bytes": the float32 dK / dV accumulators (backward), "flops": the step's attention without
    registers, "register_flops": what the first step adds}; ``direction`` "fwd" or "bwd"."""
    n = shape.S / G
    kv = 2 * shape.B * shape.Hk * n * shape.D * dtype_bytes
    dkv = 2 * shape.B * shape.Hk * n * shape.D * 4 if direction == "bwd" else 0.0
    per_pair = 4 if direction == "fwd" else 10  # QK^T, PV; the backward recomputes P and adds dV, dP, dQ, dK
    return {
        "bytes": kv + dkv,
        "kv_bytes": kv,
        "dkv_bytes": dkv,
        "flops": per_pair * shape.B * shape.H * n * n * shape.D,
        "register_flops": per_pair * shape.B * shape.H * n * shape.R * shape.D,
    }


def ulysses_layer(shape: LayerShape, G: int, *, direction: str = "fwd", dtype_bytes: int = MODEL_DTYPE_BYTES) -> dict:
    """What Ulysses moves and computes per device per layer: the all-to-alls of q, k, v and out (backward:
    dout and dq, dk, dv) send (G - 1) / G of each local tensor; the attention of H / G heads of the
    whole sequence (and the registers)."""
    n = shape.S / G
    nbytes = (G - 1) / G * shape.B * n * shape.D * dtype_bytes * 2 * (shape.H + shape.Hk)
    per_pair = 4 if direction == "fwd" else 10
    heads = shape.H / G
    return {
        "bytes": nbytes,
        "flops": per_pair * shape.B * heads * shape.S * shape.S * shape.D,
        "register_flops": per_pair * shape.B * heads * shape.S * shape.R * shape.D,
    }


def crossover_tokens(
    shape: LayerShape,
    G: int,
    *,
    scheme: str,
    direction: str = "fwd",
    link_gbs: float = LINK_GBS,
    tflops: float = TFLOPS,
    dtype_bytes: int = MODEL_DTYPE_BYTES,
) -> float:
    """The sequence length S (whole sequence) from which the scheme's communication takes no longer than its
    compute: ring, a step's K/V transfer against the step's attention (the transfer is then hidden behind
    it); Ulysses, the all-to-alls against the attention (they are on its critical path: from there on
    they are at most half of the layer). Without the registers' FLOPs (the first ring step only)."""
    W, F = link_gbs * 1e9, tflops * 1e12
    if scheme == "ring":
        probe = ring_step(shape, G, direction=direction, dtype_bytes=dtype_bytes)
    elif scheme == "ulysses":
        probe = ulysses_layer(shape, G, direction=direction, dtype_bytes=dtype_bytes)
    else:
        raise ValueError(f"crossover_tokens(): scheme must be 'ring' or 'ulysses', got {scheme!r}")
    # bytes grow as S and FLOPs as S^2: comm(S) = compute(S) at S = S_probe * (bytes / W) / (flops / F)
    return shape.S * (probe["bytes"] / W) / (probe["flops"] / F)


def layer_model(
    shape: LayerShape,
    G: int,
    *,
    scheme: str,
    mode: str = "fwd",
    link_gbs: float = LINK_GBS,
    tflops: float = TFLOPS,
    dtype_bytes: int = MODEL_DTYPE_BYTES,
) -> dict:
    """The layer's time on G devices: compute, communication, the layer (ring: each step the longer of its
    compute and its transfer, the last step's compute alone; Ulysses: the all-to-alls then the compute),
    the exposed communication, the efficiency (compute / layer), the bytes a device sends, all per device;
    ``mode`` "fwd" or "full" (forward and backward)."""
    W, F = link_gbs * 1e9, tflops * 1e12
    compute = comm = layer = nbytes = 0.0
    for direction in ("fwd", "bwd") if mode == "full" else ("fwd",):
        if scheme == "ring":
            # forward: the K/V shard travels during steps 0 .. G - 2; backward: also each step's dK / dV
            # travels during the next step, and the last one after it (home).
            step = ring_step(shape, G, direction=direction, dtype_bytes=dtype_bytes)
            t_kv, t_dkv = step["kv_bytes"] / W, step["dkv_bytes"] / W
            steps = [(step["flops"] + step["register_flops"]) / F] + [step["flops"] / F] * (G - 1)
            moves = [(t_kv if i < G - 1 else 0.0) + (t_dkv if i > 0 else 0.0) for i in range(G)]
            compute += sum(steps)
            comm += sum(moves) + t_dkv
            layer += sum(max(c, m) for c, m in zip(steps, moves, strict=True)) + t_dkv
            nbytes += (G - 1) * step["kv_bytes"] + G * step["dkv_bytes"]
        elif scheme == "ulysses":
            part = ulysses_layer(shape, G, direction=direction, dtype_bytes=dtype_bytes)
            t_c = (part["flops"] + part["register_flops"]) / F
            t_m = part["bytes"] / W
            compute, comm, layer, nbytes = compute + t_c, comm + t_m, layer + t_c + t_m, nbytes + part["bytes"]
        else:
            raise ValueError(f"layer_model(): scheme must be 'ring' or 'ulysses', got {scheme!r}")
    return {
        "compute_s": compute,
        "comm_s": comm,
        "layer_s": layer,
        "exposed_comm_s": layer - compute,
        "efficiency": compute / layer,
        "bytes": nbytes,
    }


def model_rows(shapes=MODEL_SHAPES, groups=MODEL_GROUPS, *, link_gbs: float = LINK_GBS, tflops: float = TFLOPS):
    """The analytic rows: per layer, G, scheme and mode, the crossover length and the layer at its own S."""
    rows = []
    for shape in shapes:
        for G in groups:
            for scheme in SCHEMES:
                base = dict(section="distributed", shape=shape.name, provider=MODEL, scheme=scheme, G=G,
                            B=shape.B, H=shape.H, Hk=shape.Hk, S=shape.S, D=shape.D, R=shape.R, link_gbs=link_gbs,
                            tflops=tflops, dtype="bfloat16")  # fmt: skip
                if scheme == "ulysses" and (shape.H % G or shape.Hk % G):
                    continue  # Ulysses gives each device H / G heads
                for mode in MODES:
                    at = layer_model(shape, G, scheme=scheme, mode=mode, link_gbs=link_gbs, tflops=tflops)
                    fwd = crossover_tokens(shape, G, scheme=scheme, link_gbs=link_gbs, tflops=tflops)
                    bwd = crossover_tokens(shape, G, scheme=scheme, direction="bwd", link_gbs=link_gbs, tflops=tflops)
                    rows.append({**base, "mode": mode, "crossover_tokens": fwd if mode == "fwd" else max(fwd, bwd),
                                 "model_ms": 1e3 * at["layer_s"], "model_compute_ms": 1e3 * at["compute_s"],
                                 "model_comm_ms": 1e3 * at["comm_s"], "efficiency": at["efficiency"],
                                 "bytes_per_device": at["bytes"]})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- the ranks


def bytes_sent(shape: LayerShape, world: int, scheme: str, mode: str, dtype_bytes: int) -> float:
    """What one rank sends per layer as ``dsr_kernels.distributed`` moves it (the measured shape, its dtype)."""
    return layer_model(shape, world, scheme=scheme, mode=mode, dtype_bytes=dtype_bytes)["bytes"]


def _inputs(shape: LayerShape, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)  # the same whole sequence on every rank

    def rand(*size):
        return torch.randn(*size, generator=g).to(device, dtype)

    return {
        "q": rand(shape.B, shape.H, shape.S, shape.D),
        "k": rand(shape.B, shape.Hk, shape.S, shape.D),
        "v": rand(shape.B, shape.Hk, shape.S, shape.D),
        "rk": rand(shape.H, shape.R, shape.D) * 0.5,
        "rv": rand(shape.H, shape.R, shape.D),
        "dout": rand(shape.B, shape.H, shape.S, shape.D),
    }


def _differentiable(fn, inputs: list[torch.Tensor], mode: str, dout_of):
    """fn() as the timed call: in inference mode for "fwd", forward and the gradients of every input for "full"."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return fn()

        return forward
    for t in inputs:
        t.requires_grad_(True)

    def full():
        outs = fn()
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return torch.autograd.grad(outs, inputs, [dout_of(o) for o in outs])

    return full


def _exchange(tensors: list[torch.Tensor], rank: int, world: int) -> None:
    """One ring exchange: every tensor to the next rank, as many from the previous (isend / irecv)."""
    import torch.distributed as dist

    nxt, prev = (rank + 1) % world, (rank - 1) % world
    recv = [torch.empty_like(t) for t in tensors]
    works = [dist.isend(t, nxt) for t in tensors] + [dist.irecv(r, prev) for r in recv]
    for w in works:
        w.wait()


def _all_to_all(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_to_all_single(torch.empty_like(t), t)


def _providers(shape: LayerShape, mode: str, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{provider: (threads, callable)} of this rank; a provider that cannot be built is (None, its error)."""
    import dsr_kernels

    full = _inputs(shape, device, dtype)
    n = shape.S // world
    mine = slice(rank * n, (rank + 1) * n)  # the contiguous split (S divisible by N: the shapes are)
    local = {name: full[name][:, :, mine].contiguous() for name in ("q", "k", "v", "dout")}
    heads = slice(rank * shape.H // world, (rank + 1) * shape.H // world)
    kv_heads = slice(rank * shape.Hk // world, (rank + 1) * shape.Hk // world)
    threads = max(1, (os.cpu_count() or 1) // world)
    out: dict = {}

    def dout_local(o):
        return local["dout"][..., : o.shape[-2], :].expand_as(o)

    # single: rank 0 alone, on the whole sequence, with every thread
    if rank == 0:
        q, k, v, rk, rv = (full[n_].detach().clone() for n_ in ("q", "k", "v", "rk", "rv"))
        out[BASELINE] = (
            os.cpu_count() or 1,
            _differentiable(
                lambda q=q, k=k, v=v, rk=rk, rv=rv: dsr_kernels.attention(q, k, v, kv_registers=(rk, rv)),
                [q, k, v, rk, rv],
                mode,
                lambda o: full["dout"],
            ),
        )
    else:
        out[BASELINE] = (threads, lambda: None)

    try:
        from dsr_kernels import distributed
    except ImportError as exc:
        distributed, missing = None, f"dsr_kernels.distributed is not available: {exc}"
    for scheme in SCHEMES:
        if distributed is None:
            out[scheme] = (None, missing)
            continue
        q, k, v, rk, rv = (t.detach().clone() for t in (local["q"], local["k"], local["v"], full["rk"], full["rv"]))
        fn = getattr(distributed, f"{scheme}_attention")
        out[scheme] = (
            threads,
            _differentiable(lambda fn=fn, q=q, k=k, v=v, rk=rk, rv=rv: fn(q, k, v, kv_registers=(rk, rv)),
                            [q, k, v, rk, rv], mode, dout_local),
        )  # fmt: skip

    # ring_compute: N steps of the fused op, the local query shard against a key shard; registers in the first
    q, k, v, rk, rv = (t.detach().clone() for t in (local["q"], local["k"], local["v"], full["rk"], full["rv"]))

    def ring_steps(q=q, k=k, v=v, rk=rk, rv=rv):
        return [dsr_kernels.attention(q, k, v, kv_registers=(rk, rv) if i == 0 else None) for i in range(world)]

    out["ring_compute"] = (threads, _differentiable(ring_steps, [q, k, v, rk, rv], mode, dout_local))
    # ulysses_compute: H / N heads of the whole sequence
    if shape.H % world or shape.Hk % world:
        out["ulysses_compute"] = (None, f"N={world} does not divide H={shape.H}, Hk={shape.Hk}")
        out["ulysses_comm"] = (None, f"N={world} does not divide H={shape.H}, Hk={shape.Hk}")
    else:
        qh = full["q"][:, heads].contiguous()
        kh, vh = (full[n_][:, kv_heads].contiguous() for n_ in ("k", "v"))
        rkh, rvh = (full[n_][heads].contiguous() for n_ in ("rk", "rv"))
        out["ulysses_compute"] = (
            threads,
            _differentiable(lambda: dsr_kernels.attention(qh, kh, vh, kv_registers=(rkh, rvh)), [qh, kh, vh, rkh, rvh],
                            mode, lambda o: full["dout"][:, heads]),
        )  # fmt: skip
        ulysses_fwd = [local["q"], local["k"], local["v"], local["q"]]  # q, k, v in; out (q's shape) back
        ulysses_bwd = [local["dout"], local["q"], local["k"], local["v"]]  # dout in; dq, dk, dv back
        sent = ulysses_fwd + (ulysses_bwd if mode == "full" else [])
        out["ulysses_comm"] = (threads, lambda: _all_to_all(sent))
    kv = [local["k"], local["v"]]
    dkv = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in kv]

    def ring_comm():
        for _ in range(world - 1):
            _exchange(kv, rank, world)
        if mode == "full":
            for _ in range(world - 1):
                _exchange(kv, rank, world)
            for _ in range(world):
                _exchange(dkv, rank, world)

    out["ring_comm"] = (threads, ring_comm)
    return out


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _busy_cpu_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def _time_ranks(fns: dict, device: torch.device, budget_s: float, min_reps: int) -> tuple[dict, float | None, int]:
    """Times every provider in lockstep on all ranks: WARMUP_CALLS untimed calls each, then rounds (the
    order rotating by round, the same on every rank; a barrier before each call) until rank 0 has spent
    ``budget_s`` and done ``min_reps`` rounds. Returns ({provider: per-round ms, the slowest rank's}, the
    share of the CPUs that processes other than the ranks took, the rounds)."""
    import torch.distributed as dist

    names = list(fns)
    for name in names:
        threads, fn = fns[name]
        if device.type == "cpu":
            torch.set_num_threads(threads)
        for _ in range(WARMUP_CALLS):
            dist.barrier()
            fn()
            synchronize(device)
    times = {name: [] for name in names}
    began, busy0, own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
    rounds = 0
    while True:
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for name in order:
            threads, fn = fns[name]
            if device.type == "cpu":
                torch.set_num_threads(threads)
            dist.barrier()
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        go = rounds < min_reps or (rounds < MAX_REPS and time.perf_counter() - began < budget_s)
        flag = torch.tensor([1 if go else 0], device=device)
        dist.broadcast(flag, 0)
        if not int(flag):
            break
    wall, busy1 = time.perf_counter() - began, _busy_cpu_s()
    per_rank = torch.tensor([[times[n][i] for i in range(rounds)] for n in names], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(per_rank) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, per_rank)
    slowest = torch.stack(gathered).amax(0).cpu()
    own = torch.tensor([_own_cpu_s() - own0], dtype=torch.float64, device=device)
    dist.all_reduce(own)
    foreign = None
    if busy0 is not None and busy1 is not None and wall > 0:
        foreign = min(100.0, max(0.0, 100.0 * (busy1 - busy0 - float(own)) / (wall * (os.cpu_count() or 1))))
    return {n: slowest[i].tolist() for i, n in enumerate(names)}, foreign, rounds


def _rank_main(rank: int, world: int, spec: dict) -> None:
    """One process of a case: its shard, the providers, the lockstep timing; rank 0 writes the result file."""
    import torch.distributed as dist

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{spec['init_file']}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=spec["timeout_s"]),
    )
    result: dict = {"modes": {}}
    try:
        shape, dtype = LayerShape(**spec["shape"]), getattr(torch, spec["dtype"])
        for mode in spec["modes"]:
            built = _providers(shape, mode, rank, world, device, dtype)
            wanted = {p: built[p] for p in spec["providers"] if p in built}
            errors = {p: e for p, (threads, e) in wanted.items() if threads is None}
            fns = {p: entry for p, entry in wanted.items() if p not in errors}
            # one first call each; a provider that fails on any rank is dropped on every rank
            for name in list(fns):
                try:
                    fns[name][1]()
                    synchronize(device)
                    ok = 1
                except Exception as exc:  # reported in the provider's row
                    errors[name], ok = f"{type(exc).__name__}: {exc}".splitlines()[0][:300], 0
                flag = torch.tensor([ok], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if not int(flag):
                    errors.setdefault(name, "failed on another rank")
                    del fns[name]
            times, foreign, rounds = _time_ranks(fns, device, spec["budget_s"], spec["min_reps"])
            result["modes"][mode] = {"times": times, "errors": errors, "foreign_cpu_pct": foreign, "rounds": rounds}
        result["threads"] = max(1, (os.cpu_count() or 1) // world) if not cuda else None
        result["backend"] = dist.get_backend()
        dist.barrier()
        if rank == 0:
            Path(spec["result_file"]).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, spec: dict) -> dict:
    """Runs :func:`_rank_main` on ``world`` new processes; their result, or raises (ending them) past the timeout."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dsr-bench-cp-") as tmp:
        spec = dict(spec, init_file=str(Path(tmp) / "init"), result_file=str(Path(tmp) / "result.json"))
        context = mp.start_processes(_rank_main, args=(world, spec), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + spec["timeout_s"]
        try:
            while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world} processes did not finish within {spec['timeout_s']:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return json.loads(Path(spec["result_file"]).read_text())


# ----------------------------------------------------------------------------- rows


def _flops(shape: LayerShape, mode: str) -> float:
    """The whole layer's attention FLOPs (registers included), one device."""
    per_pair = 4 if mode == "fwd" else 14
    return per_pair * shape.B * shape.H * shape.S * (shape.S + shape.R) * shape.D


def _measured_rows(shape: LayerShape, world: int, providers: list[str], modes, cfg: BenchConfig) -> list[dict]:
    spec = dict(shape=asdict(shape), device=cfg.device.type, dtype=str(cfg.dtype).replace("torch.", ""),
                modes=list(modes), providers=providers, budget_s=cfg.budget_s, min_reps=5,
                timeout_s=TIMEOUT_S)  # fmt: skip
    base = dict(section="distributed", shape=shape.name, world=world, B=shape.B, H=shape.H, Hk=shape.Hk,
                S=shape.S, D=shape.D, R=shape.R, dtype=spec["dtype"])  # fmt: skip
    result = _spawn(world, spec)
    dtype_bytes = torch.empty(0, dtype=cfg.dtype).element_size()
    rows = []
    for mode in modes:
        got = result["modes"][mode]
        timing = Timing(
            got["times"], dict.fromkeys(got["times"], WARMUP_CALLS), dict.fromkeys(got["times"], True),
            got["foreign_cpu_pct"], 0.0,
        )  # fmt: skip
        by_provider = {}
        for p in providers:
            row = dict(base, provider=p, mode=mode, backend=result["backend"], threads_per_rank=result["threads"])
            if p in got["errors"]:
                row = error_row(RuntimeError(got["errors"][p]), **row)
            elif p in got["times"]:
                row.update(timing_fields(timing, p))
            by_provider[p] = row
        for scheme in SCHEMES:
            row = by_provider.get(scheme)
            if row is None or "median_ms" not in row:
                continue
            row["bytes_per_rank"] = bytes_sent(shape, world, scheme, mode, dtype_bytes)
            row["gflops_per_rank"] = _flops(shape, mode) / world / 1e9
            comm, compute = by_provider.get(f"{scheme}_comm", {}), by_provider.get(f"{scheme}_compute", {})
            if "median_ms" in comm and "median_ms" in compute:
                total, c, m = row["median_ms"], compute["median_ms"], comm["median_ms"]
                row.update(comm_ms=m, compute_ms=c, comm_share_pct=100.0 * m / total,
                           overlap_pct=100.0 * max(0.0, min(1.0, (c + m - total) / m)) if m > 0 else None,
                           link_gbs=row["bytes_per_rank"] / (m * 1e-3) / 1e9,
                           tflops=row["gflops_per_rank"] / (c * 1e-3) / 1e3)  # fmt: skip
                # the model at this machine's measured link and compute: its prediction of the layer
                at = layer_model(shape, world, scheme=scheme, mode=mode, link_gbs=row["link_gbs"],
                                 tflops=row["tflops"], dtype_bytes=dtype_bytes)  # fmt: skip
                row["model_ms"] = 1e3 * at["layer_s"]
            if BASELINE in got["times"]:
                row.update(speedup_fields(got["times"][scheme], got["times"][BASELINE], BASELINE))
                row["speedup_noise"] = report.noise_reasons([row, by_provider[BASELINE]])
        rows += by_provider.values()
    return rows


class DistributedSection(Section):
    """Ring and Ulysses attention on N local processes, and the model of the layer on G GPUs."""

    def providers(self, device: torch.device) -> list[str]:
        return list(PROVIDERS)

    def shapes(self, device: torch.device) -> list[LayerShape]:
        return all_shapes(device)

    def plan(self, cfg: BenchConfig) -> tuple[list[LayerShape], tuple[int, ...], tuple[str, ...]]:
        """The measured shapes, process counts and modes of this run."""
        cuda = cfg.device.type == "cuda"
        names, worlds, modes = PRESETS[(cfg.preset, "cuda" if cuda else "cpu")]
        if worlds is None:  # GPUs: 2, 4, 8, ... up to their number
            count = torch.cuda.device_count()
            worlds = tuple(2**i for i in range(1, 8) if 2**i <= count)
        names = self.my_shapes(cfg) or names
        modes = self.my_modes(cfg) or modes
        shapes = [s for s in self.shapes(cfg.device) if s.name in names]
        self.notes = []
        if cuda and not worlds:
            self.notes.append("needs 2 GPUs or more for NCCL ranks (one GPU each); only the model ran")
        if cfg.device.type == "cpu":
            cores = os.cpu_count() or 1
            self.notes.append(
                f"on this CPU the N processes share its {cores} cores: each rank runs {{cores}} / N threads and "
                "'single' all of them, so the speed-up is that of the machine's cores split among processes, not "
                "of N devices; the run's 'other processes' share counts these ranks too".replace("{cores}", str(cores))
            )
        return shapes, worlds, modes

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        cases = [Case("distributed", "distributed model (analytic)", lambda: model_rows(), 0.2)]
        shapes, worlds, modes = self.plan(cfg)
        providers = self.my_providers(cfg)
        for shape in shapes:
            for world in worlds:
                est = 15 + len(modes) * (3 * cfg.budget_s + 2)
                cases.append(
                    Case(
                        "distributed",
                        f"distributed {shape.name} N={world} {','.join(modes)}",
                        lambda shape=shape, world=world: _measured_rows(shape, world, providers, modes, cfg),
                        est,
                    )
                )
        return cases

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        out = []
        measured = [r for r in rows if r["provider"] != MODEL]
        if measured:
            cores = env.get("cpu_count") or os.cpu_count()
            where = (
                f"{measured[0].get('backend')}; the N processes share this CPU's {cores} cores"
                if env.get("device") == "cpu"
                else f"{measured[0].get('backend')}, one GPU per process"
            )
            out += report.table(
                f"distributed ({env.get('dtype')}; {where}): median ms [p20, p80] of the layer (the slowest rank); "
                "comm / compute: the communication and the fused calls timed alone; overlap: the share of the "
                "communication the layer hid; speed-up against one process on the whole sequence",
                [{**self.cells(r), "note": report.noise_cell(r)} for r in measured],
            )
        model = [r for r in rows if r["provider"] == MODEL and r.get("mode") == "fwd"]
        if model:
            first = model[0]
            display = []
            for name in dict.fromkeys(r["shape"] for r in model):
                for scheme in SCHEMES:
                    mine = {r["G"]: r for r in model if r["shape"] == name and r["scheme"] == scheme}
                    cells = {"layer": name, "scheme": scheme}
                    for G in MODEL_GROUPS:
                        cells[f"G={G}"] = f"{mine[G]['crossover_tokens']:,.0f}" if G in mine else "-"
                    display.append(cells)
            out += report.table(
                f"distributed model: from which sequence length (tokens, the whole sequence) the communication takes "
                f"no longer than the compute, forward, bfloat16, {first['link_gbs']:.0f} GB/s links, "
                f"{first['tflops']:.0f} TFLOP/s (ring: a step's K/V transfer, hidden behind its attention; Ulysses: "
                "the all-to-alls, on the critical path); '-': G does not divide the heads",
                display,
            )
        return out

    def cells(self, r: dict) -> dict[str, str]:
        def ms(key):
            return report.num(r.get(key)) if r.get(key) is not None else ""

        return {
            "shape": r["shape"],
            "mode": r.get("mode", ""),
            "N": str(r.get("world", "")),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            "comm ms": ms("comm_ms"),
            "compute ms": ms("compute_ms"),
            "comm share": f"{r['comm_share_pct']:.0f}%" if r.get("comm_share_pct") is not None else "",
            "overlap": f"{r['overlap_pct']:.0f}%" if r.get("overlap_pct") is not None else "",
            "MB sent / rank": f"{r['bytes_per_rank'] / 1e6:.2f}" if r.get("bytes_per_rank") else "",
            "model ms": ms("model_ms"),
            "x vs 1 process": report.speedup_cell(r),
        }

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        lines = []
        shared = " (the processes share this CPU's cores)" if env.get("device") == "cpu" else ""
        for r in rows:
            if r["provider"] not in SCHEMES or "median_ms" not in r:
                continue
            parts = [f"{report.num(r['median_ms'])} ms"]
            if r.get("comm_ms") is not None:
                parts.append(
                    f"communication alone {report.num(r['comm_ms'])} ms ({r['bytes_per_rank'] / 1e6:.2f} MB a rank, "
                    f"{r['link_gbs']:.2f} GB/s), compute alone {report.num(r['compute_ms'])} ms"
                )
            if r.get("speedup") is not None:
                parts.append(report.faster_sentence(r["provider"], r, "one process"))
            lines.append(
                f"distributed {r['shape']} {r['mode']}, {r['provider']} on N={r['world']} {r.get('backend')} "
                f"processes{shared}: {'; '.join(parts)}."
            )
        model = {
            (r["shape"], r["scheme"], r["G"]): r for r in rows if r["provider"] == MODEL and r.get("mode") == "fwd"
        }
        for (name, scheme, G), r in model.items():
            if G != 8 or "crossover_tokens" not in r:
                continue
            lines.append(
                f"distributed model, {name} on G=8 ({r['link_gbs']:.0f} GB/s, {r['tflops']:.0f} TFLOP/s, bfloat16 "
                f"forward): {scheme}'s communication takes no longer than its compute from "
                f"{r['crossover_tokens']:,.0f} tokens; at the layer's {r['S']:,} tokens its efficiency is "
                f"{100 * r['efficiency']:.0f}%."
            )
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        # With H = Hk the crossover depends on G, the links and the device only (not on B, H, D).
        shape, G = MODEL_SHAPES[1], 8
        crossover, efficiency = {}, {}
        lengths = [2**i for i in range(10, 21)]
        for link, gbs in LINKS.items():
            for scheme in SCHEMES:
                ys = [crossover_tokens(shape, g, scheme=scheme, link_gbs=gbs) for g in MODEL_GROUPS]
                crossover[f"{scheme}, {link}"] = (list(MODEL_GROUPS), ys, None, None)
                eff = [100 * layer_model(LayerShape(**{**asdict(shape), "S": S}), G, scheme=scheme,
                                         link_gbs=gbs)["efficiency"] for S in lengths]  # fmt: skip
                efficiency[f"{scheme}, {link}"] = (lengths, eff, None, None)
        panels = [
            {"title": f"tokens from which communication <= compute (H = Hk; {TFLOPS:.0f} TFLOP/s, bf16, forward)",
             "xlabel": "devices G (Ulysses: G divides the heads)", "ylabel": "tokens S (whole sequence)",
             "series": crossover, "logx": True, "logy": True},
            {"title": f"{shape.name} layer ({shape.describe().rsplit(', S', 1)[0]}) on G={G}: efficiency",
             "xlabel": "tokens S", "ylabel": "compute / layer time, %", "series": efficiency, "logx": True},
        ]  # fmt: skip
        measured = [r for r in rows if r["provider"] in SCHEMES and r.get("comm_ms") is not None]
        paths = [
            plots.lines(
                folder / "distributed-model.png",
                panels,
                suptitle=plots.title(
                    "distributed", "the model of ring / Ulysses on G GPUs: when communication hides", env
                ),
            )
        ]
        if measured:
            groups_ = [f"{r['shape']} {r['mode']} N={r['world']} {r['provider']}" for r in measured]
            series = {
                what: [(r.get(key), None, None) for r in measured]
                for what, key in (("layer", "median_ms"), ("compute alone", "compute_ms"),
                                  ("communication alone", "comm_ms"),
                                  ("model at the measured link and compute", "model_ms"))
            }  # fmt: skip
            paths.append(
                plots.bars(
                    folder / "distributed-measured.png",
                    groups_,
                    series,
                    ylabel="ms (median)",
                    suptitle=plots.title("distributed", "the layer, its compute and its communication alone", env),
                )
            )
        return paths


SECTION = DistributedSection(
    name="distributed",
    title="context parallelism: ring and Ulysses on N processes, and the model of the layer on G GPUs",
    baseline=BASELINE,
    mode_names=MODES,
    main_job=False,
)
