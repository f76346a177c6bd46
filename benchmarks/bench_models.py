"""The models section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_models.py --benchmark-json=models.json   # rows in extra_info
    python benchmarks/bench_models.py [bench options]  # = dsr-kernels bench --section models

Providers, shapes and what each row means: ``dsr_kernels.benchmark.models``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("models"), ids=lambda c: c.label)
def test_models(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "models", *sys.argv[1:]]))
