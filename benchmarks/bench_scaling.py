"""The scaling section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_scaling.py --benchmark-json=scaling.json   # rows in extra_info
    python benchmarks/bench_scaling.py [bench options]  # = dsr-kernels bench --section scaling

Models, register counts and what each row means: ``dsr_kernels.benchmark.scaling``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases

CASES = section_cases("scaling")
ANALYTIC = [c for c in CASES if c.label.startswith("scaling FLOPs")]  # counted, not timed


@pytest.mark.parametrize("case", [c for c in CASES if c not in ANALYTIC], ids=lambda c: c.label)
def test_scaling(bench_case, case):
    bench_case(case)


@pytest.mark.parametrize("case", ANALYTIC, ids=lambda c: c.label)
def test_scaling_flops(benchmark, case):
    rows = benchmark.pedantic(case.run, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    assert rows and all("flop_overhead_pct" in r or r.get("error") for r in rows)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "scaling", *sys.argv[1:]]))
