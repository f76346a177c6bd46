"""Encoder benchmarks: what trained, test-time and recursive test-time registers cost a ViT.

    python benchmarks/bench_encoder.py [--shapes vit_base_patch16_siglip_256] [--budget 2]   # JSON + CSV rows
    pytest benchmarks/bench_encoder.py                                                       # pytest-benchmark

See ``dsr_kernels.benchmark.encoder``: providers plain (the baseline), trained_registers,
ttr, ttr_recursive, ttr_hooks and ttr_recursive_hooks (the released way: Python hooks),
outlier_key_mask; ViT-B/16-256 and So400M/14-224 (SigLIP layout), batch 1 on CPU and 64
on CUDA (bfloat16). The script interleaves the providers' repeats and reports the
overhead against plain with its p20-p80 spread; pytest-benchmark times each alone.
"""

import sys

import pytest
import torch

from dsr_kernels.benchmark import encoder as bench
from dsr_kernels.models import create_model
from dsr_kernels.registers import (
    apply_outlier_key_mask,
    apply_test_time_registers,
    apply_test_time_registers_with_hooks,
)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("shape", bench.default_shapes(_device())[:1], ids=lambda s: s.name)
def test_encoder(benchmark, shape, provider):
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra = dict(reg_tokens=4, no_embed_class=True) if provider == "trained_registers" else {}
    with torch.device(device):
        model = create_model(shape.name, **extra).eval().to(dtype)
    round1, merged = bench.neuron_sets(shape.name, model.mlp_hidden)
    apply = {
        "ttr": lambda: apply_test_time_registers(model, round1),
        "ttr_recursive": lambda: apply_test_time_registers(model, merged),
        "ttr_hooks": lambda: apply_test_time_registers_with_hooks(model, round1),
        "ttr_recursive_hooks": lambda: apply_test_time_registers_with_hooks(model, merged),
        "outlier_key_mask": lambda: apply_outlier_key_mask(model, bench.MASK_THRESHOLD),
    }.get(provider)
    handle = apply() if apply else None
    x = torch.randn(shape.B, 3, model.img_size, model.img_size, device=device, dtype=dtype)

    def step():
        with torch.inference_mode():
            model.forward_features(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=shape.name, provider=provider, tokens=model.patch_embed.num_patches)
    benchmark(step)
    if handle is not None:
        handle.remove()


if __name__ == "__main__":
    from dsr_kernels.cli import main

    sys.exit(main(["bench", "--op", "encoder", *sys.argv[1:]]))
