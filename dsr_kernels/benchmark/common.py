"""The one timing helper of the benchmarks, with peak memory, noise flags and the environment.

:func:`time_interleaved` warms every provider up until its time is stable, then
interleaves the repeats across providers (CUDA events after an L2 flush on a GPU,
``time.perf_counter`` on the CPU). Rows give medians with the 20th and 80th
percentiles; ratios between providers are medians of per-round ratios (paired), with
their own p20/p80; a row is noisy when its spread exceeds 10% of its median, when other
processes took over 10% of the CPUs meanwhile (:class:`CpuLoad`), or when its warm-up
never settled. Peak memory is measured in a separate call:
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the high-water mark of the
allocations PyTorch's profiler records (tensor memory, as on the GPU), and the process's
resident high-water mark (:func:`peak_rss_mb`: every allocation, the kernels' own too).
While it runs, the timing reports where it stands (warm-up, rounds done, seconds left) to
whoever listens (:func:`progress_to`: the runner's progress bar).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsr_kernels.info import cpu_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """One call of fn in milliseconds: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class CpuLoad:
    """How much of the machine's CPU time other processes took while a measurement ran.

    Reads the machine's busy time from ``/proc/stat`` and this process's own CPU time
    from ``os.times()`` at start and stop; what is left is other processes (and time a
    hypervisor stole). ``foreign_pct`` is that share of all CPUs over the wall time, None
    where ``/proc/stat`` does not exist.
    """

    def __init__(self) -> None:
        self._start = self._sample()
        self.foreign_pct: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(v) for v in fields]
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        busy = sum(ticks[:3]) + sum(ticks[5:8])
        own = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        busy, own = end[1] - self._start[1], end[2] - self._start[2]
        cpus = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
        if wall <= 0:
            return None
        # /proc/stat counts in clock ticks (10 ms): over a short window the quantised busy
        # time can exceed wall x cpus, so the share is clamped to [0, 100].
        self.foreign_pct = min(100.0, max(0.0, 100.0 * (busy - own) / (wall * cpus)))
        return self.foreign_pct


class _CacheFlush:
    """Before each timed GPU call, overwrite a buffer larger than the L2 cache (as
    ``triton.testing.do_bench`` does), so that no provider finds the previous one's data
    cached. Nothing on the CPU: its caches are part of what the CPU kernels are measured with."""

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


@dataclass(frozen=True)
class CaseProgress:
    """Where a measurement stands inside one case: what it is doing ("round 3 of at least 5")
    and, once it can tell, about how many seconds of it are left."""

    text: str
    left_s: float | None = None


_listeners: list[Callable[[CaseProgress], None]] = []


@contextlib.contextmanager
def progress_to(listener: Callable[[CaseProgress], None]) -> Iterator[None]:
    """Sends the progress of every measurement made inside the block to ``listener``
    (the runner's progress bar), so that a long case shows that it moves."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report_progress(text: str, left_s: float | None = None) -> None:
    for listener in list(_listeners):
        listener(CaseProgress(text, left_s))


@dataclass
class Timing:
    """What :func:`time_interleaved` measured: per-call milliseconds of each provider, in the
    order of the rounds (``times[p][i]`` and ``times[q][i]`` ran in the same round)."""

    times: dict[str, list[float]]
    warmup_calls: dict[str, int]
    stable: dict[str, bool]  # whether two successive warm-up calls agreed within the tolerance
    foreign_cpu_pct: float | None  # other processes' share of the CPUs meanwhile
    seconds: float


Provider = Callable[[], object] | tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]


def time_interleaved(
    fns: dict[str, Provider],
    device: torch.device,
    *,
    budget_s: float,
    min_reps: int = 5,
    max_reps: int = 100,
    max_warmup: int = 12,
    tolerance: float = 0.05,
    rng: random.Random | None = None,
) -> Timing:
    """The one timing helper of the benchmarks: warm up, then interleave the repeats.

    ``fns`` maps a provider to a callable, or to (setup, callable) where ``setup()`` is a
    context manager entered around the provider's calls but outside the timed region
    (switching a model's state, say). Each provider is first called until two successive
    times agree within ``tolerance`` (at most ``max_warmup`` calls, and past 3 calls no
    longer than ``budget_s``; a provider that never settles is reported as such): a cold
    first call (allocations, autotuning, page faults) is never timed. Then rounds call every provider
    once each, in an order shuffled per round, so that drift of the machine's speed hits
    all providers alike, until at least ``min_reps`` rounds and ``budget_s`` seconds of
    rounds have passed (at most ``max_reps``). CUDA events time GPU calls (after an L2
    flush), ``time.perf_counter`` CPU ones.
    """
    rng = rng or random.Random(0)
    entries = {name: f if isinstance(f, tuple) else (contextlib.nullcontext, f) for name, f in fns.items()}
    if not entries:  # every provider failed its first call: nothing to time
        return Timing({}, {}, {}, None, 0.0)
    flush = _CacheFlush(device)
    load = CpuLoad()
    began = time.perf_counter()

    def once(fn) -> float:
        flush()
        synchronize(device)
        return _time_once(fn, device)

    warm: dict[str, int] = {}
    stable: dict[str, bool] = {}
    for i, (name, (setup, fn)) in enumerate(entries.items()):
        with setup():
            last, calls, ok, spent = None, 0, False, 0.0
            # at most max_warmup calls, and no more than the rounds' budget once 3 calls are done
            while calls < max_warmup and (calls < 3 or spent < max(budget_s, 1e-3) * 1e3):
                report_progress(f"warm-up {i + 1} of {len(entries)}, call {calls + 1}")
                t = once(fn)
                calls, spent = calls + 1, spent + t
                if last is not None and abs(t - last) <= tolerance * min(t, last):
                    ok = True
                    break
                last = t
        warm[name], stable[name] = calls, ok
    times: dict[str, list[float]] = {name: [] for name in entries}
    order = list(entries)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (rounds < max_reps and time.perf_counter() - start < budget_s):
        rng.shuffle(order)
        for name in order:
            setup, fn = entries[name]
            with setup():
                times[name].append(once(fn))
        rounds += 1
        report_progress(
            f"round {rounds} of at least {min_reps}", _rounds_left_s(rounds, start, budget_s, min_reps, max_reps)
        )
    return Timing(times, warm, stable, load.stop(), time.perf_counter() - began)


def _rounds_left_s(rounds: int, start: float, budget_s: float, min_reps: int, max_reps: int) -> float:
    """Seconds the rounds loop of :func:`time_interleaved` has left: it stops once it has done
    ``min_reps`` rounds and spent ``budget_s``, or after ``max_reps`` rounds."""
    spent = time.perf_counter() - start
    per_round = spent / rounds
    left = max((min_reps - rounds) * per_round, budget_s - spent, 0.0)
    return min(left, (max_reps - rounds) * per_round)


NOISY_SPREAD_PCT = 10.0  # a row whose p20-p80 spread exceeds this share of its median is noisy
NOISY_FOREIGN_CPU_PCT = 10.0  # ... or during which other processes took this share of the CPUs


def timing_fields(timing: Timing, name: str) -> dict[str, object]:
    """One provider's row fields: median, p20, p80, spread, reps, warm-up, and whether it is noisy (and why)."""
    ts = timing.times[name]
    row: dict[str, object] = dict(summarize(ts))
    row["spread_pct"] = 100.0 * (row["p80_ms"] - row["p20_ms"]) / row["median_ms"]
    row["warmup_calls"] = timing.warmup_calls[name]
    row["warmup_stable"] = timing.stable[name]
    row["foreign_cpu_pct"] = timing.foreign_cpu_pct
    reasons = []
    if row["spread_pct"] > NOISY_SPREAD_PCT:
        reasons.append(f"p20-p80 spread {row['spread_pct']:.0f}% of the median")
    if timing.foreign_cpu_pct is not None and timing.foreign_cpu_pct > NOISY_FOREIGN_CPU_PCT:
        reasons.append(f"other processes took {timing.foreign_cpu_pct:.0f}% of the CPUs")
    if not timing.stable[name]:
        reasons.append(f"not stable after {timing.warmup_calls[name]} warm-up calls")
    row["noisy"] = bool(reasons)
    row["noise"] = "; ".join(reasons) or None
    return row


def speedup_fields(
    times: Sequence[float], baseline_times: Sequence[float], baseline: str, prefix: str = "speedup"
) -> dict[str, object]:
    """ "x faster than <baseline>" (>1: faster) as the median of the per-round ratios
    baseline / time, with their p20 and p80, and whether 1 lies inside that spread: fields
    ``<prefix>``, ``<prefix>_p20``, ``<prefix>_p80``, ``<prefix>_within_noise`` (and
    ``baseline`` for the row's main comparison, prefix ``speedup``)."""
    r = ratio_summary(baseline_times, times)
    fields: dict[str, object] = {"baseline": baseline} if prefix == "speedup" else {}
    fields.update(
        {
            prefix: r["median"],
            f"{prefix}_p20": r["p20"],
            f"{prefix}_p80": r["p80"],
            f"{prefix}_within_noise": r["p20"] <= 1.0 <= r["p80"],
        }
    )
    return fields


def overhead_fields(times: Sequence[float], reference_times: Sequence[float], prefix: str) -> dict[str, object]:
    """``<prefix>_pct``: how much longer ``times`` take than ``reference_times`` in % (median of
    the per-round ratios), with ``<prefix>_p20_pct``/``_p80_pct`` and ``<prefix>_within_noise``."""
    r = ratio_summary(times, reference_times)
    return {
        f"{prefix}_pct": 100.0 * (r["median"] - 1),
        f"{prefix}_p20_pct": 100.0 * (r["p20"] - 1),
        f"{prefix}_p80_pct": 100.0 * (r["p80"] - 1),
        f"{prefix}_within_noise": r["p20"] <= 1.0 <= r["p80"],
    }


def ratio_fields(times: Sequence[float], against: Sequence[float], prefix: str, against_name: str) -> dict[str, object]:
    """A ratio paired by round: speed-up fields when ``prefix`` ends in "speedup", overhead ones otherwise."""
    if prefix.endswith("speedup"):
        return speedup_fields(times, against, against_name, prefix)
    return overhead_fields(times, against, prefix)


def ratio_of(row: dict, prefix: str) -> tuple[float | None, float | None, float | None]:
    """(median, p20, p80) of a ratio a row carries: a speed-up (x) or an overhead (%)."""
    if prefix.endswith("speedup"):
        keys = (prefix, f"{prefix}_p20", f"{prefix}_p80")
    else:
        keys = (f"{prefix}_pct", f"{prefix}_p20_pct", f"{prefix}_p80_pct")
    return tuple(row.get(k) for k in keys)  # type: ignore[return-value]


def ratio_summary(times: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Median and p20/p80 of the per-round ratios times[i] / baseline[i] (same round: paired)."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    qs = statistics.quantiles(ratios, n=5) if len(ratios) >= 2 else [ratios[0]] * 4
    return {"median": statistics.median(ratios), "p20": qs[0], "p80": qs[3]}


def summarize(times: Sequence[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": qs[0], "p80_ms": qs[3], "reps": len(times)}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak tensor memory allocated while fn runs, above what was live before, in MiB."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the system (glibc's malloc_trim), so that the
    resident set is what is live: memory a call allocates then counts even where earlier
    calls left freed pages resident for it to reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_mb(fn: Callable[[], object]) -> tuple[float, float] | None:
    """(the process's resident high-water mark during fn, what fn added to the resident set
    before it) in MiB: every allocation, the C++ kernels' own buffers included (which
    PyTorch's profiler does not see). The free heap is released first. Linux only (the peak
    is reset through /proc/self/clear_refs); None elsewhere."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _proc_status_mb("VmRSS")
    result = fn()
    del result
    peak = _proc_status_mb("VmHWM")
    if before is None or peak is None:
        return None
    return peak, peak - before


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's start/stop lines, which its C++ library prints to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _git_commit() -> str | None:
    """The checkout's short commit, with "+dirty" when tracked files differ from it (None outside a checkout)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip() or None
        if commit:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            )
            if status.stdout.strip():
                commit += "+dirty"
        return commit
    except Exception:
        return None


def _command() -> str:
    """How this process was started, as the user typed it ('dsr-kernels bench --quick')."""
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "cli.py", "dsr-kernels"):
        prog = "dsr-kernels"
    return " ".join([prog, *sys.argv[1:]])


def environment(device: torch.device) -> dict[str, object]:
    """What produced a result: device, processor, threads, versions, commit, date."""
    import dsr_kernels
    from dsr_kernels._extension import cpu_capability, extension_loaded

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "processor": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_kernels_isa": cpu_capability(),
        "compute_capability": (
            ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "dsr_kernels": dsr_kernels.__version__,
        "git_commit": _git_commit(),
        "extension_built": extension_loaded(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # PyTorch's CPU allocator: with THP_MEM_ALLOC_ENABLE=1 large tensors use huge pages,
        # which removes most first-touch page faults (a large share of CPU timings).
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "command": _command(),
    }
    return env
