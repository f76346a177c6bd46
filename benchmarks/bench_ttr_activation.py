"""ttr_activation benchmarks (pytest-benchmark): the MLP activation with test-time registers.

    pytest benchmarks/bench_ttr_activation.py

Providers, on a ViT-B MLP activation ([B, 256 patches (+ 1 register), 3072], the
released SigLIP2-B set's 19 neurons of block 5): ``gelu`` (``F.gelu`` over the patches,
the baseline), ``fused`` (``dsr_kernels.ttr_activation``, the backend "auto" picks) and
``hooks`` (``F.gelu`` then the released hook's index edits). The interleaved comparison
with p20-p80 spreads is in ``dsr-kernels bench --op encoder`` (rows ``<encoder>:mlp_act``).
"""

import pytest
import torch
import torch.nn.functional as F

from dsr_kernels.ops.ttr_activation import _resolve_backend, _ttr_activation
from dsr_kernels.registers.apply import _released_hook


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", ["gelu", "fused", "hooks"])
def test_ttr_activation(benchmark, provider):
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B = 64 if device.type == "cuda" else 1
    g = torch.Generator().manual_seed(0)
    neurons = torch.randperm(3072, generator=g)[:19].to(device)
    h = torch.randn(B, 256 + (provider != "gelu"), 3072, device=device, dtype=dtype)
    hook = _released_hook(neurons, 1, 0, "zero", "signed_max")
    backend = _resolve_backend("ttr_activation", "auto", h)
    kw = dict(
        num_registers=1, num_prefix_tokens=0, patch_values="zero", register_value="signed_max", approximate="none"
    )
    fn = {
        "gelu": lambda: F.gelu(h),
        # As the encoder calls it: neurons validated once, already on the device (no sync per call).
        "fused": lambda: _ttr_activation(h, neurons, backend=backend, **kw),
        "hooks": lambda: hook(None, None, F.gelu(h)),
    }[provider]

    def step():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(provider=provider, tokens=h.shape[1], neurons=19)
    benchmark(step)
