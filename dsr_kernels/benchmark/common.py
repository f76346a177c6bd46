"""Timing, peak memory and result files shared by the benchmarks.

Times are medians with the 20th and 80th percentiles, taken with CUDA events on a GPU
and ``time.perf_counter`` on the CPU, after warm-up. Peak memory is measured in a
separate run: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the high-water
mark of the allocations PyTorch's profiler records (tensor memory, as on the GPU).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch


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


def measure_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_s: float = 1.0,
) -> list[float]:
    """Per-call times in milliseconds: at least min_reps, up to max_reps or budget_s."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        times.append(_time_once(fn, device))
    return times


def interleaved_times(
    fns: dict[str, Callable[[], object] | tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]],
    device: torch.device,
    *,
    repeats: int,
    rng: random.Random | None = None,
    max_warmup: int = 10,
    tolerance: float = 0.05,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call milliseconds of each provider, the repeats interleaved across providers.

    ``fns`` maps a provider to a callable, or to (setup, callable) where ``setup()`` is a
    context manager entered around the provider's call but outside its timed region
    (switching a model's state, say). Each provider is first warmed up until two
    successive times agree within ``tolerance`` (at most ``max_warmup`` calls); then each
    of ``repeats`` rounds calls every provider once, in an order shuffled per round, so
    that drift of the machine's speed hits all providers alike. Returns ({provider:
    times}, {provider: warm-up calls}).
    """
    rng = rng or random.Random(0)
    entries = {name: f if isinstance(f, tuple) else (contextlib.nullcontext, f) for name, f in fns.items()}
    warm: dict[str, int] = {}
    for name, (setup, fn) in entries.items():
        with setup():
            last, calls = None, 0
            while calls < max_warmup:
                t = _time_once(fn, device)
                calls += 1
                if last is not None and abs(t - last) <= tolerance * min(t, last):
                    break
                last = t
        warm[name] = calls
    times: dict[str, list[float]] = {name: [] for name in entries}
    order = list(entries)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            setup, fn = entries[name]
            with setup():
                synchronize(device)
                times[name].append(_time_once(fn, device))
    return times, warm


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
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """What produced a result: device, versions, date."""
    import dsr_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "dsr_kernels": dsr_kernels.__version__,
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # PyTorch's CPU allocator: with THP_MEM_ALLOC_ENABLE=1 large tensors use huge pages,
        # which removes most first-touch page faults (a large share of CPU timings).
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def write_results(out_dir: str | os.PathLike, stem: str, env: dict, rows: list[dict]) -> tuple[Path, Path]:
    """``<stem>.json`` (environment + rows) and ``<stem>.csv`` (rows tagged with the environment)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str) + "\n")
    tags = {k: env[k] for k in ("date", "device_name", "torch", "triton", "dsr_kernels")}
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + list(tags))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **tags})
    return json_path, csv_path


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def run_suite(
    *,
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence,
    providers: Sequence[str],
    modes: Sequence[str],
    baseline: str,
    make_inputs: Callable,
    mode_fn: Callable,
    work: Callable,
    memory: bool,
    budget_s: float,
    log: Callable[[str], None],
    columns: Sequence[str],
) -> list[dict]:
    """Every provider x mode x shape, the baseline first so that ratios use this run's numbers.

    make_inputs(shape, device, dtype, requires_grad) -> inputs; mode_fn(provider, mode,
    inputs) -> a callable to time; work(shape, mode) -> {"flops": ..., "bytes": ...}
    (either may be absent) for the achieved TFLOP/s and GB/s.
    """
    providers = [baseline] + [p for p in providers if p != baseline]
    rows: list[dict] = []
    for shape in shapes:
        for mode in modes:
            inputs = make_inputs(shape, device, dtype, requires_grad=mode != "fwd")
            base_ms = None
            for name in providers:
                fields = asdict(shape)
                row = {
                    "op": op,
                    "shape": fields.pop("name"),
                    **fields,
                    "dtype": str(dtype).replace("torch.", ""),
                    "provider": name,
                    "mode": mode,
                }
                try:
                    fn = mode_fn(name, mode, inputs)
                    row.update(summarize(measure_ms(fn, device, budget_s=budget_s)))
                    if memory:
                        row["peak_mem_mb"] = peak_memory_mb(fn, device)
                    seconds = row["median_ms"] * 1e-3
                    amount = work(shape, mode)
                    if "flops" in amount:
                        row["tflops"] = amount["flops"] / seconds / 1e12
                    if "bytes" in amount:
                        row["gb_per_s"] = amount["bytes"] / seconds / 1e9
                    if name == baseline:
                        base_ms = row["median_ms"]
                    row["speedup_vs_baseline"] = base_ms / row["median_ms"] if base_ms else None
                except Exception as exc:  # a provider that cannot run here is reported, not hidden
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                rows.append(row)
                log(format_table([row], columns).splitlines()[1])
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
