"""The norm_modulate section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_norm_modulate.py --benchmark-json=norm_modulate.json   # rows in extra_info
    python benchmarks/bench_norm_modulate.py [bench options]  # = dsr-kernels bench --section norm_modulate

Providers, shapes and what each row means: ``dsr_kernels.benchmark.norm_modulate``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("norm_modulate"), ids=lambda c: c.label)
def test_norm_modulate(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "norm_modulate", *sys.argv[1:]]))
