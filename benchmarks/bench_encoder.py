"""The encoder section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_encoder.py --benchmark-json=encoder.json   # rows in extra_info
    python benchmarks/bench_encoder.py [bench options]  # = dsr-kernels bench --section encoder

Providers, shapes and what each row means: ``dsr_kernels.benchmark.encoder``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("encoder"), ids=lambda c: c.label)
def test_encoder(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "encoder", *sys.argv[1:]]))
