"""Attention benchmarks: pytest-benchmark, or a script that writes JSON/CSV.

    pytest benchmarks/bench_attention.py                      # pytest-benchmark table
    pytest benchmarks/bench_attention.py --benchmark-json=b.json
    python benchmarks/bench_attention.py [dsr-kernels bench options]   # JSON + CSV rows

Providers, modes and shapes are those of ``dsr_kernels.benchmark.attention`` (the
same code ``dsr-kernels bench`` runs): dsr, dsr_stats, torch_sdpa_cat (baseline),
eager_stats, and on CUDA the forced SDPA backends and flash_attn when importable.
"""

import sys

import pytest
import torch

from dsr_kernels.benchmark import attention as bench


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shapes():
    # The CPU run leaves out N=4096 (a minute per provider); `dsr-kernels bench` has it.
    device = _device()
    return [s for s in bench.default_shapes(device) if device.type == "cuda" or s.N < 4096]


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.available_providers(torch.device("cuda")))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: s.name)
def test_attention(benchmark, shape, provider, mode):
    device = _device()
    if provider not in bench.available_providers(device):
        pytest.skip(f"{provider} runs on CUDA only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fn = bench.mode_fn(provider, mode, bench.make_inputs(shape, device, dtype, requires_grad=mode != "fwd"))
    try:
        fn()
    except Exception as exc:  # e.g. an SDPA backend that refuses this head dim
        pytest.skip(f"{provider} cannot run {shape.name}: {type(exc).__name__}: {exc}")

    def timed():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=shape.name, provider=provider, mode=mode, flops=shape.flops(mode))
    benchmark(timed)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--op", "attention", *sys.argv[1:]]))
