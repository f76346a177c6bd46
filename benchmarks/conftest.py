"""pytest-benchmark over the sections of ``dsr-kernels bench``: the same cases, timing helper and rows.

Each test runs one case of a section (one shape and mode, measured by
:func:`dsr_kernels.benchmark.measure.measure`: every provider's repeats interleaved)
once. pytest-benchmark's own statistics are then the wall time of the whole case; the
per-provider medians, p20/p80, speed-ups and noise flags are the case's rows, in
``extra_info["rows"]`` of ``--benchmark-json``, in the schema of ``results.json``.
"""

from __future__ import annotations

import pytest

from dsr_kernels.benchmark.section import Case


def run_case(benchmark, case: Case) -> list[dict]:
    """Runs the case once under pytest-benchmark and checks its rows: each measured or with its error."""
    rows = benchmark.pedantic(case.run, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    assert rows, f"{case.label} produced no rows"
    for row in rows:
        if "median_ms" in row:
            assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        elif row.get("section") != "selfcheck":
            assert row.get("error"), f"a row without a time must carry its error: {row}"
    return rows


@pytest.fixture
def bench_case(benchmark):
    return lambda case: run_case(benchmark, case)
