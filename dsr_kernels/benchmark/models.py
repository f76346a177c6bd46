"""What diffusion registers cost a whole model: latency next to FLOPs, fused vs eager.

For each model and register count R (0, 4, 16, 36, 64), providers ``fused`` (the
package's ops) and ``eager`` (the same model on eager PyTorch: LayerNorm / RMSNorm,
modulate, torch.cat, F.scaled_dot_product_attention), modes ``fwd`` (a forward pass in
inference mode) and ``train`` (forward, flow or epsilon loss, backward). Each row carries
the model's analytic FLOPs, its FLOP overhead over R = 0 and its measured latency
overhead over R = 0 with the same provider and mode: the claim under test is that the
latency overhead of registers stays within 1.2x of their FLOP overhead (the insertion and
the statistics themselves cost nothing extra), and that fused beats eager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dsr_kernels.benchmark.common import environment, format_table, measure_ms, summarize
from dsr_kernels.diffusion import FlowMatching, GaussianDiffusion
from dsr_kernels.models import create_model, flops
from dsr_kernels.models.dit import DiT, SiT

BASELINE = "eager"
MODES = ("fwd", "train")
REGISTERS = (0, 4, 16, 36, 64)


@dataclass(frozen=True)
class ModelShape:
    name: str  # the model name given to create_model
    B: int


def default_shapes(device: torch.device) -> list[ModelShape]:
    if device.type == "cuda":
        return [
            ModelShape("LightningDiT-XL/1", 64),
            ModelShape("DiT-XL/2", 64),
            ModelShape("DiTDH-XL/1", 64),
            ModelShape("JiT-H/16", 32),
        ]
    return [ModelShape("LightningDiT-S/1", 2), ModelShape("DiT-S/2", 2)]


def available_providers(device: torch.device) -> list[str]:
    return [BASELINE, "fused"]


def _step(model, objective, x, y, train: bool):
    if train:
        loss = objective.loss(model, x, y)
        loss.backward()
        return loss
    with torch.inference_mode():
        return model(x, torch.rand(x.shape[0], device=x.device), y)


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[ModelShape] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    registers: Sequence[int] = REGISTERS,
    memory: bool = False,
    budget_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    """Rows for every model x R x provider x mode (bf16 autocast on CUDA, float32 on CPU).

    ``memory`` is accepted for the common CLI and ignored: whole-model peaks are not measured.
    """
    shapes = list(shapes or default_shapes(device))
    providers = list(providers or available_providers(device))
    rows: list[dict] = []
    for shape in shapes:
        base: dict[tuple[str, str], float] = {}
        base_flops = None
        for R in registers:
            for provider in providers:
                backend = "eager" if provider == "eager" else "auto"
                try:
                    with torch.device(device):  # initialise on the device: XL models take seconds on a CPU
                        model = create_model(shape.name, num_registers=R, backend=backend)
                except Exception as exc:
                    rows.append(
                        {
                            "op": "models",
                            "shape": shape.name,
                            "R": R,
                            "provider": provider,
                            "error": f"{type(exc).__name__}: {exc}"[:300],
                        }
                    )
                    continue
                count = flops(model, batch_size=shape.B)
                base_flops = count.flops if R == 0 else base_flops
                is_eps_model = isinstance(model, DiT) and not isinstance(model, SiT)
                objective = GaussianDiffusion() if is_eps_model else FlowMatching()
                x = torch.randn(shape.B, model.in_channels, model.input_size, model.input_size, device=device)
                y = torch.randint(0, 1000, (shape.B,), device=device)
                for mode in modes:
                    row = {
                        "op": "models",
                        "shape": shape.name,
                        "B": shape.B,
                        "R": R,
                        "provider": provider,
                        "mode": mode,
                        "dtype": str(dtype).replace("torch.", ""),
                        "gflops": count.flops / 1e9,
                    }
                    model.train(mode == "train")

                    def fn(model=model, objective=objective, mode=mode, x=x, y=y):
                        ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
                        with ctx:
                            return _step(model, objective, x, y, mode == "train")

                    try:
                        row.update(summarize(measure_ms(fn, device, budget_s=budget_s, warmup=1, min_reps=5)))
                        if R == 0:
                            base[(provider, mode)] = row["median_ms"]
                        if (provider, mode) in base and base_flops:
                            row["latency_overhead"] = row["median_ms"] / base[(provider, mode)]
                            row["flop_overhead"] = count.flops / base_flops
                            row["overhead_ratio"] = (row["latency_overhead"] - 1) / max(row["flop_overhead"] - 1, 1e-12)
                    except Exception as exc:  # reported, not hidden
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append(row)
                    log(format_table([row], _COLUMNS).splitlines()[1])
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    _fill_speedups(rows)
    return environment(device), rows


def _fill_speedups(rows: list[dict]) -> None:
    ref = {
        (r["shape"], r["R"], r["mode"]): r["median_ms"]
        for r in rows
        if r.get("provider") == BASELINE and "median_ms" in r
    }
    for r in rows:
        key = (r["shape"], r.get("R"), r.get("mode"))
        if "median_ms" in r and key in ref:
            r["speedup_vs_baseline"] = ref[key] / r["median_ms"]


_COLUMNS = (
    "shape",
    "R",
    "mode",
    "provider",
    "median_ms",
    "gflops",
    "flop_overhead",
    "latency_overhead",
    "speedup_vs_baseline",
    "error",
)


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("provider") == "fused" and r.get("R") and "latency_overhead" in r:
            lines.append(
                f"{r['shape']} R={r['R']} {r['mode']}: registers add {100 * (r['flop_overhead'] - 1):.1f}% FLOPs and "
                f"{100 * (r['latency_overhead'] - 1):.1f}% latency (fused); fused is "
                f"{r.get('speedup_vs_baseline') or 0:.2f}x the eager model's speed"
            )
    return lines


def print_report(env: dict, rows: list[dict], log: Callable[[str], None] = print) -> None:
    log(f"\nmodels on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}")
    log(format_table(rows, _COLUMNS))
    log("")
    for line in targets(rows):
        log(line)
