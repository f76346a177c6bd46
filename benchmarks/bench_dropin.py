"""The dropin section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_dropin.py --benchmark-json=dropin.json   # rows in extra_info
    python benchmarks/bench_dropin.py [bench options]  # = dsr-kernels bench --section dropin

Providers, shapes and what each row means: ``dsr_kernels.benchmark.dropin``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("dropin"), ids=lambda c: c.label)
def test_dropin(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "dropin", *sys.argv[1:]]))
