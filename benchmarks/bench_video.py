"""The video section of ``dsr-kernels bench`` under pytest-benchmark (see conftest.py).

    pytest benchmarks/bench_video.py --benchmark-json=video.json   # rows in extra_info
    python benchmarks/bench_video.py [bench options]  # = dsr-kernels bench --section video

Providers, shapes, models and what each row means: ``dsr_kernels.benchmark.video``.
"""

import sys

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize("case", section_cases("video"), ids=lambda c: c.label)
def test_video(bench_case, case):
    bench_case(case)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--section", "video", *sys.argv[1:]]))
