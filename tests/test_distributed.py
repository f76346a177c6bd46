"""Ring and Ulysses attention (``dsr_kernels.distributed``) on 2 and 4 gloo CPU processes.

Each world is one ``torch.multiprocessing`` spawn (spawning costs seconds) whose ranks run
every case of that world inside one process group: the same full inputs on every rank,
sharded with ``shard_sequence``, the distributed op's out, statistics and gradients
gathered with ``unshard_sequence`` and compared with single-process
``dsr_kernels.attention`` on the full tensors (and with the float64 reference), within the
tolerance rule of the other tests (2x eager PyTorch's error at the dtype, plus ulps).
The ranks report to the parent through a manager; the parent waits a bounded time and
kills ranks that hang. Bad input must raise the same ValueError on every rank.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsr_kernels
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.distributed import (
    Layout,
    ring_attention,
    shard_lengths,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
)
from dsr_kernels.reference.attention import attention_ref
from dsr_kernels.rope import rope_1d_tables
from utils import assert_close, max_abs_err, ulp_atol

WORLD_TIMEOUT_S = 300  # a whole world, on a loaded 2-core machine
COLLECTIVE_TIMEOUT_S = 120  # gloo's own timeout: a rank stuck in a collective raises


@dataclass(frozen=True)
class Case:
    name: str
    fn: str  # "ring" | "ulysses"
    dtype: torch.dtype = torch.float32
    B: int = 2
    H: int = 4
    Hk: int = 4
    N: int = 23
    Nk: int | None = None  # keys of another length (cross-attention shards; not causal)
    D: int = 8
    Dv: int = 8
    R: int = 0
    per_sample: bool = False  # registers [B, H, R, D] instead of [H, R, D]
    sinks: bool = False
    key_mask: bool = False
    causal: bool = False
    rope: bool = False
    prefix: int = 0
    lengths: tuple[int, ...] | None = None  # stated shard lengths (default: shard_lengths)
    backend: str = "auto"


FN = {"ring": ring_attention, "ulysses": ulysses_attention}

TWO = [
    Case("ring-registers-sinks-mask-prefix", "ring", R=3, sinks=True, key_mask=True, prefix=3),
    Case("ring-causal-per-sample-rope-prefix", "ring", R=2, per_sample=True, sinks=True, causal=True, rope=True,
         prefix=7),
    Case("ring-causal-stated-lengths-gqa-dv", "ring", Hk=2, Dv=12, R=3, causal=True, key_mask=True, lengths=(7, 16)),
    Case("ring-cross-shards-registers", "ring", N=23, Nk=30, R=3, sinks=True, key_mask=True),
    Case("ring-causal-torch-backend", "ring", R=3, sinks=True, causal=True, rope=True, backend="torch"),
    Case("ring-causal-triton-backend", "ring", D=16, Dv=16, R=3, sinks=True, causal=True, rope=True, prefix=7,
         backend="triton"),
    Case("ring-bf16-causal-registers-sinks-rope", "ring", dtype=torch.bfloat16, R=3, sinks=True, causal=True,
         rope=True),
    Case("ulysses-registers-sinks-mask-prefix", "ulysses", R=3, sinks=True, key_mask=True, prefix=3),
    Case("ulysses-causal-per-sample-rope-gqa-prefix", "ulysses", Hk=2, R=2, per_sample=True, sinks=True,
         causal=True, rope=True, prefix=7),
    Case("ulysses-bf16-causal-stated-lengths", "ulysses", dtype=torch.bfloat16, R=3, sinks=True, causal=True,
         lengths=(16, 7)),
]  # fmt: skip

FOUR = [
    Case("ring-causal-registers-sinks-rope-prefix", "ring", N=37, R=3, sinks=True, causal=True, rope=True, prefix=6),
    Case("ring-unequal-per-sample-mask", "ring", N=37, R=2, per_sample=True, key_mask=True),
    Case("ring-bf16-causal", "ring", dtype=torch.bfloat16, N=37, R=3, sinks=True, causal=True),
    Case("ulysses-causal-registers-sinks", "ulysses", N=37, R=3, sinks=True, causal=True, key_mask=True),
    Case("ulysses-bf16-stated-lengths", "ulysses", dtype=torch.bfloat16, N=37, R=3, rope=True, lengths=(3, 20, 9, 5)),
]


# ----------------------------------------------------------------------------- one case, on every rank


def _inputs(case: Case) -> dict:
    """The full inputs, the same on every rank (seeded by the case's name)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    Nk = case.Nk or case.N

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(case.dtype)

    x = dict(q=randn(case.B, case.H, case.N, case.D), k=randn(case.B, case.Hk, Nk, case.D))
    x["v"] = randn(case.B, case.Hk, Nk, case.Dv)
    if case.R:
        lead = (case.B,) if case.per_sample else ()
        x["kv_registers"] = (randn(*lead, case.H, case.R, case.D), randn(*lead, case.H, case.R, case.Dv))
    if case.sinks:
        x["sinks"] = randn(case.H)
    if case.key_mask:
        mask = torch.rand(case.B, Nk, generator=g) > 0.3
        mask[:, 0] = True  # every query sees a key (causal included)
        x["key_mask"] = mask
    if case.rope:
        x["rope"] = rope_1d_tables(case.N, case.D, style="interleaved")
    x["dout"] = randn(case.B, case.H, case.N, case.Dv)
    return x


def _leaves(x: dict, shard=None, dtype: torch.dtype | None = None) -> tuple[dict, list[torch.Tensor]]:
    """The call's keywords with fresh leaves (q, k, v sharded by ``shard``; cast to ``dtype``) and the
    tensors to differentiate."""
    kw, wrt = {}, []

    def leaf(t, sharded):
        t = shard(t, 2) if sharded and shard else t
        t = (t.to(dtype) if dtype else t).detach().clone().requires_grad_(True)
        wrt.append(t)
        return t

    for name in ("q", "k", "v"):
        kw[name] = leaf(x[name], True)
    if "kv_registers" in x:
        kw["kv_registers"] = tuple(leaf(t, False) for t in x["kv_registers"])
    if "sinks" in x:
        kw["sinks"] = leaf(x["sinks"], False)
    if "key_mask" in x:
        kw["key_mask"] = shard(x["key_mask"], 1) if shard else x["key_mask"]
    if "rope" in x:
        kw["rope"] = tuple(shard(t, 0) for t in x["rope"]) if shard else x["rope"]
    return kw, wrt


def _results(out, stats, grads) -> dict:
    return {"out": out, **stats._asdict(), **{f"d{i}": g for i, g in enumerate(grads)}}


def _check(case: Case, world: int) -> None:
    x = _inputs(case)
    balanced = case.causal

    def shard(t, dim):
        lengths = list(case.lengths) if case.lengths and t.shape[dim] == case.N else None
        return shard_sequence(t, dim, balanced=balanced, lengths=lengths)

    def gather(t, dim=2):
        return unshard_sequence(t, dim, balanced=balanced)

    # distributed, gathered
    kw, wrt = _leaves(x, shard)
    out, stats = FN[case.fn](**kw, causal=case.causal, num_prefix_tokens=case.prefix, return_stats=True,
                             backend=case.backend)  # fmt: skip
    assert out.dtype == case.dtype and all(s.dtype == torch.float32 for s in stats)
    grads = torch.autograd.grad(out, wrt, shard(x["dout"], 2))
    with torch.no_grad():  # without statistics (and without autograd): the same out
        plain = FN[case.fn](**kw, causal=case.causal, num_prefix_tokens=case.prefix, backend=case.backend)
    assert_close("out without statistics", plain, out, atol=ulp_atol(out, case.dtype))
    key_mass = torch.cat([stats.key_mass[..., : case.R], gather(stats.key_mass[..., case.R :])], dim=-1)
    reg_mass, reg_grads = stats.key_mass[..., : case.R], grads[3:]
    got = _results(gather(out), stats._replace(lse=gather(stats.lse), entropy=gather(stats.entropy),
                   register_share=gather(stats.register_share), key_mass=key_mass),
                   [gather(g) for g in grads[:3]] + list(reg_grads))  # fmt: skip
    # every rank holds the same register statistics and gradients: the whole sequence's
    same = [reg_mass, *reg_grads]
    for t in same:
        copies = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(copies, t.contiguous())
        assert all(torch.equal(c, t) for c in copies), "register key mass / gradients differ between the ranks"

    # single process: the package's op, eager PyTorch at the dtype and the float64 reference
    kw, wrt = _leaves(x)
    single_out, single_stats = dsr_kernels.attention(**kw, causal=case.causal, num_prefix_tokens=case.prefix,
                                                     return_stats=True, backend=case.backend)  # fmt: skip
    single = _results(single_out, single_stats, torch.autograd.grad(single_out, wrt, x["dout"]))
    refs = {}
    for dtype in (torch.float64, case.dtype):
        kw, wrt = _leaves(x, dtype=torch.float64 if dtype == torch.float64 else None)
        Nk = case.Nk or case.N
        o, s = attention_ref(**kw, causal_offset=Nk - case.N if case.causal else None, num_prefix_tokens=case.prefix,
                             compute_dtype=dtype)  # fmt: skip
        refs[dtype] = _results(o, s, torch.autograd.grad(o, wrt, x["dout"].to(o.dtype)))
    K = max(case.N * case.H // case.Hk, case.R + (case.Nk or case.N), case.D, case.Dv)
    for name, value in got.items():
        ref, eager = refs[torch.float64][name], refs[case.dtype][name]
        atol = 2.0 * max_abs_err(eager, ref) + ulp_atol(ref, case.dtype, reduction=K)
        assert value.shape == single[name].shape, f"{name}: shape {tuple(value.shape)} != {tuple(single[name].shape)}"
        assert_close(f"{name} against single-process attention", value, single[name], atol=atol)
        assert_close(f"{name} against the float64 reference", value, ref, atol=atol)


def _group_of_one_cases(rank: int, world: int) -> None:
    """A group of one runs the single-device op (each rank in a group of its own)."""
    groups = [dist.new_group([r]) for r in range(world)]  # (every rank creates every group)
    case = Case("one", "ring", R=3, sinks=True, causal=True, rope=True)
    x = _inputs(case)
    kw, _ = _leaves(x)
    want, want_stats = dsr_kernels.attention(**kw, causal=True, return_stats=True)
    for fn in FN.values():
        got, got_stats = fn(**kw, group=groups[rank], causal=True, return_stats=True)
        assert_close("out", got, want, atol=1e-6)
        for name, a, b in zip(want_stats._fields, got_stats, want_stats, strict=True):
            assert_close(name, a, b, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(rank: int, world: int) -> dict:
    """Calls that must raise the same ValueError on every rank: name -> (function, keywords)."""
    q = torch.randn(2, 4, 5, 8)
    mine = dict(q=q, k=q.clone(), v=q.clone())
    wider = torch.randn(2, 4, 5, 8 + 8 * rank)
    half = {n: t.to(torch.bfloat16 if rank else torch.float32) for n, t in mine.items()}
    return {
        "shapes-differ": (ring_attention, dict(q=wider, k=wider, v=wider)),
        "dtypes-differ": (ulysses_attention, half),
        "options-differ": (ring_attention, dict(mine, causal=rank == 0)),
        "grad-differs": (ring_attention, dict(mine, q=q.clone().requires_grad_(rank == 0))),
        "heads-not-divisible": (ulysses_attention, {n: t[:, :3] for n, t in mine.items()}),
        "one-rank-bad-key-mask": (ring_attention, dict(mine, key_mask=torch.ones(2, 5 + rank, dtype=torch.bool))),
        "reference-backend-in-a-ring": (ring_attention, dict(mine, backend="reference")),
        "unshard-shapes-differ": (unshard_sequence, dict(x=torch.zeros(2, 3 + rank, 4 + rank), dim=2)),
        # parameters that are not the same on every rank (a seed per rank): silently wrong otherwise
        "sinks-differ": (ring_attention, dict(mine, sinks=torch.full((4,), 0.5 + rank))),
        "registers-differ": (
            ulysses_attention,
            dict(
                mine, kv_registers=(torch.ones(4, 2, 8), torch.ones(4, 2, 8).index_fill(1, torch.tensor([rank]), 2.0))
            ),
        ),
        "rope-style-differs": (
            ring_attention,
            dict(mine, rope=(torch.ones(5, 8), torch.zeros(5, 8)), rope_style=("interleaved", "half")[rank % 2]),
        ),
    }


BAD_WORDS = {
    "shapes-differ": ["the head dim", "rank 0 8", "rank 1 16"],
    "dtypes-differ": ["dtype", "rank 0 torch.float32", "rank 1 torch.bfloat16"],
    "options-differ": ["causal", "rank 0 True", "rank 1 False"],
    "grad-differs": ["gradients are recorded", "rank 0 True", "rank 1 False"],
    "heads-not-divisible": ["G=2", "H=3", "divide"],
    "one-rank-bad-key-mask": ["rank 1", "key_mask"],
    "reference-backend-in-a-ring": ["'reference'", "backend"],
    "unshard-shapes-differ": ["rank 0 [2, 3, -1", "rank 1 [2, 4, -1"],
    "sinks-differ": ["values of kv_registers and sinks", "rank 0", "rank 1"],
    "registers-differ": ["values of kv_registers and sinks", "rank 0", "rank 1"],
    "rope-style-differs": ["rope_style", "rank 0 'interleaved'", "rank 1 'half'"],
}


def _bad_input_cases(rank: int, world: int) -> dict:
    found = {}
    for name, (fn, kw) in _bad_inputs(rank, world).items():
        try:
            fn(**kw)
            found[name] = "no error"
        except ValueError as e:
            found[name] = str(e)
        alive = torch.ones(1)
        dist.all_reduce(alive)  # the group is still in step after the error
        assert alive.item() == world
    return found


# ----------------------------------------------------------------------------- the worlds


def _worker(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    report = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
        for case in TWO if world == 2 else FOUR:
            t0 = time.perf_counter()
            if case.backend == "triton" and not triton_interpreting():
                report[case.name] = "skip: Triton on CPU tensors needs TRITON_INTERPRET=1 (unset with a GPU)"
                continue
            try:
                _check(case, world)
                report[case.name] = "ok"
            except Exception:
                report[case.name] = traceback.format_exc()
            report[f"{case.name}:seconds"] = time.perf_counter() - t0
        if world == 2:
            for name, fn in (("group-of-one", _group_of_one_cases), ("bad-input", _bad_input_cases)):
                try:
                    report[name] = fn(rank, world) or "ok"
                except Exception:
                    report[name] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        report["setup"] = traceback.format_exc()
    results[rank] = report
    # Leave without interpreter teardown: a gloo work freed on gloo's thread during exit can
    # abort the process (tests/test_models.py's DDP test saw it too); the report is in.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int) -> dict:
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    ctx = mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {WORLD_TIMEOUT_S} s (a hang); reported: {dict(results)}")
    found = dict(results)
    manager.shutdown()
    missing = [r for r in range(world) if r not in found]
    assert not missing, f"ranks {missing} did not report"
    for rank, report in found.items():
        assert "setup" not in report, f"rank {rank}: {report['setup']}"
    return found


@pytest.fixture(scope="module")
def world2():
    return _run_world(2)


@pytest.fixture(scope="module")
def world4():
    return _run_world(4)


def _assert_ok(results: dict, name: str) -> None:
    if str(results[0][name]).startswith("skip: "):
        pytest.skip(results[0][name].removeprefix("skip: "))
    failed = {rank: report[name] for rank, report in results.items() if report[name] != "ok"}
    assert not failed, "\n".join(f"rank {rank}:\n{text}" for rank, text in failed.items())


@pytest.mark.parametrize("case", [c.name for c in TWO])
def test_two_processes(world2, case):
    _assert_ok(world2, case)


@pytest.mark.parametrize("case", [c.name for c in FOUR])
def test_four_processes(world4, case):
    _assert_ok(world4, case)


def test_group_of_one_is_the_single_device_op(world2):
    _assert_ok(world2, "group-of-one")


@pytest.mark.parametrize("name", list(BAD_WORDS))
def test_bad_input_raises_the_same_error_on_every_rank(world2, name):
    messages = [report["bad-input"] for report in world2.values()]
    assert all(isinstance(m, dict) for m in messages), messages
    seen = [m[name] for m in messages]
    assert len(set(seen)) == 1, f"the ranks raised different errors: {seen}"
    assert seen[0] != "no error", "no rank raised"
    missing = [w for w in BAD_WORDS[name] if w not in seen[0]]
    assert not missing, f"the message lacks {missing}: {seen[0]}"


def test_shard_lengths_and_layout():
    assert shard_lengths(10, 4) == [3, 3, 2, 2]
    assert shard_lengths(23, 2, balanced=True) == [6 + 5, 6 + 6]  # chunks 6, 6, 6, 5
    layout = Layout((11, 12), balanced=True)
    # rank 0: chunks 0 and 3, rank 1: chunks 1 and 2 (front ceil(n / 2), back floor(n / 2))
    assert [tuple(s) for s in layout.segments(0)] == [(0, 0, 6), (18, 6, 5)]
    assert [tuple(s) for s in layout.segments(1)] == [(6, 0, 6), (12, 6, 6)]
    assert layout.to_global().tolist() == [*range(6), *range(11, 23), *range(6, 11)]
    assert layout.prefix_count(1, 8) == 2 and layout.prefix_count(0, 8) == 6
