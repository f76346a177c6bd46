"""The attention section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_attention.py --benchmark-json=attention.json   # rows in extra_info
    python benchmarks/bench_attention.py [bench options]  # = dsr-kernels bench --section attention

Providers, shapes and what each row means: ``dsr_kernels.benchmark.attention``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("attention"), ids=lambda c: c.label)
def test_attention(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "attention", *sys.argv[1:]]))
