"""ttr_activation alone under pytest-benchmark: the MLP activation case of the encoder section.

    pytest benchmarks/bench_ttr_activation.py --benchmark-json=ttr_activation.json

At the ViT-B encoder block with the most register neurons ([B, 256 patches (+ 1
register), 3072]): ``act_gelu`` (``F.gelu`` over the patches, the baseline),
``act_gelu_extra_token`` (one token more), ``act_ttr_fused`` (``ttr_activation``) and
``act_ttr_hooks`` (``F.gelu`` then the released hook's index edits), interleaved; the
rows (in extra_info) give each one's overhead over ``act_gelu`` and over one extra token.
"""

import os

import pytest

from dsr_kernels.benchmark.run import section_cases


@pytest.mark.parametrize(
    "case",
    # --quick leaves the activation case out of the encoder section; here it is the point
    [
        c
        for c in section_cases("encoder", "full" if os.environ.get("DSR_BENCH_PRESET") == "full" else "default")
        if "MLP activation" in c.label
    ],
    ids=lambda c: c.label,
)
def test_ttr_activation(bench_case, case):
    rows = bench_case(case)
    assert {r["provider"] for r in rows} == {"act_gelu", "act_gelu_extra_token", "act_ttr_fused", "act_ttr_hooks"}
