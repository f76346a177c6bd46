"""The distributed section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_distributed.py --benchmark-json=distributed.json   # rows in extra_info
    python benchmarks/bench_distributed.py [bench options]  # = dsr-kernels bench --section distributed

Providers, shapes and what each row means: ``dsr_kernels.benchmark.distributed``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("distributed"), ids=lambda c: c.label)
def test_distributed(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "distributed", *sys.argv[1:]]))
