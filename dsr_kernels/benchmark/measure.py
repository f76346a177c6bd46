"""The one measure routine of the bench: every section's cases run through :func:`measure`.

A case names its rows by key (a provider, or (provider, R)) and gives their fields (what
was measured: section, shape, provider, mode, ...). :func:`measure` then builds each
key's callable, calls each once (one that cannot run the shape becomes a row with its
error, not a crash), times them all with
:func:`dsr_kernels.benchmark.common.time_interleaved` (warm-up until stable, repeats
interleaved across providers, median and p20/p80), adds the ratios the section asks for,
each paired by round within this run (a speed-up against the baseline, overheads against
other rows) and whether a noisy row makes one of them not measurable, the section's own
fields (TFLOP/s, GB/s, FLOP overheads), and peak memory.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Hashable

import torch

from dsr_kernels.benchmark.common import (
    Provider,
    peak_memory_mb,
    peak_rss_mb,
    ratio_fields,
    report_progress,
    synchronize,
    time_interleaved,
    timing_fields,
)
from dsr_kernels.benchmark.report import noise_reasons
from dsr_kernels.benchmark.section import BenchConfig, error_row

Key = Hashable


def probe(fns: dict[Key, Provider], device: torch.device) -> tuple[dict, dict]:
    """Calls each provider once (its setup entered); returns (those that ran, {key: error} of
    those that raised), so that one provider that cannot run a shape is reported, not fatal."""
    ok, failed = {}, {}
    for i, (key, entry) in enumerate(fns.items()):
        report_progress(f"first call {i + 1} of {len(fns)}")
        try:
            _with_setup(entry)()
            synchronize(device)
            ok[key] = entry
        except Exception as exc:  # reported in the provider's row
            failed[key] = exc
    return ok, failed


def _with_setup(entry: Provider) -> Callable[[], object]:
    if not isinstance(entry, tuple):
        return entry
    setup, fn = entry

    def call():
        with setup():
            return fn()

    return call


def measure(
    rows: dict[Key, dict],
    build: Callable[[Key], Provider],
    cfg: BenchConfig,
    *,
    baseline: Callable[[Key], Key | None] = lambda key: None,
    versus: str = "speedup",
    ratios: Callable[[Key], dict[str, tuple[Key, Key]]] = lambda key: {},
    fields: Callable[[Key, dict, dict[Key, list[float]]], dict] | None = None,
    memory: Callable[[Key], bool] | None = None,
    rss: bool = False,
    budget_s: float | None = None,
    min_reps: int = 5,
    seed: int = 0,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[dict]:
    """Measures one case; returns its rows, in the order of ``rows``.

    Hooks of the section:

    - ``build(key)``: the key's callable, or (setup, callable) with ``setup()`` a context
      entered around its calls, untimed; an exception becomes the row's error. It may add
      fields to ``rows[key]``.
    - ``baseline(key)``: the key this row is compared against (itself: the row is the
      baseline and says so), through ``versus``: "speedup" (x faster than the baseline) or
      an overhead prefix ("latency_overhead": % longer than the baseline).
    - ``ratios(key)``: more comparisons, {field prefix: (key timed, key it is against)}; a
      prefix ending in "speedup" gives a speed-up, any other an overhead in %.
    - ``fields(key, row, times)``: the section's own fields from the timed row.
    - ``memory(key)``: whether to measure the key's peak memory (when ``cfg.memory``), and
      with ``rss`` on a CPU the process's resident peak too.

    Every comparison also gets ``<prefix>_noise``: why one of the rows it pairs is noisy,
    or None (the summary then says "not measurable here" instead of a direction).
    ``budget_s`` (default: the preset's), ``min_reps`` and ``seed`` go to the timing;
    ``context()`` is entered around the first calls and the timing (inference mode, say).
    """
    device = cfg.device
    fns: dict[Key, Provider] = {}
    for key, row in rows.items():
        try:
            fns[key] = build(key)
        except Exception as exc:
            rows[key] = error_row(exc, **row)
    with context():
        ok, failed = probe(fns, device)
        for key, exc in failed.items():
            rows[key] = error_row(exc, **rows[key])
        timing = time_interleaved(
            ok,
            device,
            budget_s=cfg.budget_s if budget_s is None else budget_s,
            min_reps=min_reps,
            rng=random.Random(seed),
        )
    times = timing.times
    compared: dict[Key, dict[str, tuple[Key, Key]]] = {}
    for key, row in rows.items():
        if key not in times:
            continue
        row.update(timing_fields(timing, key))
        pairs = dict(ratios(key))
        against = baseline(key)
        if against == key:
            row["baseline"] = row["provider"]
        elif against is not None:
            pairs = {versus: (key, against), **pairs}
        pairs = {prefix: pair for prefix, pair in pairs.items() if pair[0] in times and pair[1] in times}
        for prefix, (of, against) in pairs.items():
            row.update(ratio_fields(times[of], times[against], prefix, rows[against]["provider"]))
        compared[key] = pairs
        if fields is not None:
            row.update(fields(key, row, times))
    for key, pairs in compared.items():  # once every row knows whether it is noisy
        for prefix, (of, against) in pairs.items():
            rows[key][f"{prefix}_noise"] = noise_reasons([rows[of], rows[against]])
    if cfg.memory and memory is not None:
        chosen = [key for key in rows if key in ok and memory(key)]
        for i, key in enumerate(chosen):
            report_progress(f"peak memory {i + 1} of {len(chosen)}")
            call = _with_setup(ok[key])
            try:
                rows[key]["peak_mem_mb"] = peak_memory_mb(call, device)
            except Exception as exc:  # the profiler itself failing is reported, not fatal
                rows[key]["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if rss and device.type == "cpu" and (peak := peak_rss_mb(call)) is not None:
                rows[key]["peak_rss_mb"], rows[key]["peak_rss_call_mb"] = peak
    del fns, ok
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())
