"""norm_modulate benchmarks: pytest-benchmark, or a script that writes JSON/CSV.

    pytest benchmarks/bench_norm.py
    python benchmarks/bench_norm.py [dsr-kernels bench options]

Providers and shapes are those of ``dsr_kernels.benchmark.norm_modulate``: the eager
sequence (LayerNorm/RMSNorm, modulate, torch.cat, vector_norm) against the fused op, at
DiT-XL's register_start block (B = 32 on CPU, N = 256, D = 1152, R = 36).
"""

import sys

import pytest
import torch

from dsr_kernels.benchmark import norm_modulate as bench


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.available_providers(torch.device("cuda")))
@pytest.mark.parametrize("shape", bench.default_shapes(_device()), ids=lambda s: s.name)
def test_norm_modulate(benchmark, shape, provider, mode):
    device = _device()
    if provider not in bench.available_providers(device):
        pytest.skip(f"{provider} runs on CUDA only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fn = bench.mode_fn(provider, mode, bench.make_inputs(shape, device, dtype, requires_grad=mode != "fwd"))

    def timed():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        shape=shape.name,
        provider=provider,
        mode=mode,
        bytes=shape.bytes_moved(mode, torch.empty(0, dtype=dtype).element_size()),
    )
    benchmark(timed)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--op", "norm_modulate", *sys.argv[1:]]))
