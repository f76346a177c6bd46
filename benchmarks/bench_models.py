"""Whole-model benchmarks: latency of each model with R registers next to the FLOP overhead.

    python benchmarks/bench_models.py [--shapes LightningDiT-S/1] [--budget 2]   # JSON + CSV rows
    pytest benchmarks/bench_models.py                                          # pytest-benchmark

See ``dsr_kernels.benchmark.models``: providers fused / eager (plain PyTorch),
modes fwd / train, R in 0, 4, 16, 36, 64; CPU runs the S models at batch 2, CUDA the
XL models (bf16 autocast).
"""

import sys

import pytest
import torch

from dsr_kernels.benchmark import models as bench
from dsr_kernels.diffusion import FlowMatching
from dsr_kernels.models import create_model


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.available_providers(_device()))
@pytest.mark.parametrize("registers", bench.REGISTERS)
@pytest.mark.parametrize(
    "shape", [s for s in bench.default_shapes(_device()) if "LightningDiT" in s.name], ids=lambda s: s.name
)
def test_model(benchmark, shape, registers, provider, mode):
    device = _device()
    model = create_model(shape.name, num_registers=registers, backend="eager" if provider == "eager" else "auto").to(
        device
    )
    model.train(mode == "train")
    x = torch.randn(shape.B, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.randint(0, 1000, (shape.B,), device=device)
    objective = FlowMatching()

    def step():
        if mode == "train":
            objective.loss(model, x, y).backward()
        else:
            with torch.inference_mode():
                model(x, torch.rand(shape.B, device=device), y)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(model=shape.name, registers=registers, provider=provider, mode=mode)
    benchmark(step)


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--op", "models", *sys.argv[1:]]))
