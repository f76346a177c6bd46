"""What diffusion registers cost a whole model: latency next to FLOPs, fused vs eager.

For each model, providers ``fused`` (the package's ops) and ``eager`` (the baseline: the
same model on eager PyTorch: LayerNorm / RMSNorm, modulate, torch.cat,
F.scaled_dot_product_attention), each at every register count R, all built up front
with the same weights; modes ``fwd`` (a forward pass in inference mode) and ``train``
(forward, flow or epsilon loss, backward). One case is one model and mode with every
provider x R interleaved, so each row's two ratios are paired by round: the latency
overhead over the same provider at R = 0, next to the analytic FLOP overhead, and the
speed-up of fused over eager at the same R.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import REGISTERS, BenchConfig, Case, Section, compute_seconds, estimate_s
from dsr_kernels.diffusion import FlowMatching, GaussianDiffusion
from dsr_kernels.models import create_model, flops
from dsr_kernels.models.dit import DiT, SiT

BASELINE = "eager"
MODES = ("fwd", "train")
PROVIDERS = (BASELINE, "fused")


@dataclass(frozen=True)
class ModelShape:
    name: str  # the model name given to create_model
    B: int


def all_shapes(device: torch.device) -> list[ModelShape]:
    if device.type == "cuda":
        return [
            ModelShape("LightningDiT-XL/1", 64),
            ModelShape("DiT-XL/2", 64),
            ModelShape("DiTDH-XL/1", 64),
            ModelShape("JiT-H/16", 32),
            ModelShape("LightningDiT-S/1", 64),
            ModelShape("DiT-S/2", 64),
        ]
    return [
        ModelShape("LightningDiT-S/1", 2),
        ModelShape("DiT-S/2", 2),
        ModelShape("LightningDiT-B/1", 2),
        ModelShape("DiT-B/2", 2),
    ]


# Per preset and device: {model: (register counts, modes)}.
_PRESETS = {
    ("quick", "cpu"): {"LightningDiT-S/1": ((0, 36), ("fwd",))},
    ("default", "cpu"): {"LightningDiT-S/1": ((0, 16, 36, 64), ("fwd",)), "DiT-S/2": ((0, 36), ("fwd",))},
    ("quick", "cuda"): {"LightningDiT-XL/1": ((0, 36), ("fwd",))},
    ("default", "cuda"): {"LightningDiT-XL/1": (REGISTERS, ("fwd", "train")), "DiT-XL/2": ((0, 36), ("fwd",))},
}


def _step(model, objective, x, y, train: bool):
    if train:
        loss = objective.loss(model, x, y)
        loss.backward()
        return loss
    with torch.inference_mode():
        return model(x, torch.rand(x.shape[0], device=x.device), y)


class ModelsSection(Section):
    """Whole denoisers with and without diffusion registers: measured latency overhead next to FLOPs."""

    def providers(self, device: torch.device) -> list[str]:
        return list(PROVIDERS)

    def shapes(self, device: torch.device) -> list[ModelShape]:
        return all_shapes(device)

    def shape_names(self) -> list[str]:
        """Any image denoiser create_model knows (the defaults first; the video denoisers are
        the ``video`` section's: they take [B, C, T, H, W] latents)."""
        from dsr_kernels.models import list_models

        defaults = super().shape_names()
        video = ("Latte-", "VideoDiT-")
        return defaults + [m for m in list_models() if "/" in m and m not in defaults and not m.startswith(video)]

    def uses_registers(self) -> bool:
        return True

    def cases(self, cfg: BenchConfig) -> list[Case]:
        shapes = {s.name: s for s in all_shapes(cfg.device)}
        if cfg.preset == "full":
            preset = {name: (REGISTERS, MODES) for name in shapes}
        else:
            preset = _PRESETS[(cfg.preset, "cuda" if cfg.device.type == "cuda" else "cpu")]
        if self.selects_nothing(cfg):
            return []
        names = self.my_shapes(cfg) or list(preset)
        self.notes = []
        if cfg.shapes is None and cfg.preset != "full":
            left = [n for n in shapes if n not in preset]
            self.notes.append(f"models {', '.join(left)} and the train mode of every model run with --full")
        providers = self.my_providers(cfg)
        cases = []
        for name in names:
            shape = shapes.get(name) or ModelShape(name, 64 if cfg.device.type == "cuda" else 2)
            registers, modes = preset.get(name, (REGISTERS, ("fwd",)))
            registers, modes = tuple(cfg.registers or registers), self.my_modes(cfg) or modes
            for mode in modes:
                cases.append(
                    Case(
                        "models",
                        f"models {name} {mode} R={','.join(map(str, registers))}",
                        lambda shape=shape, mode=mode, registers=registers: _measure(
                            shape, mode, registers, providers, cfg
                        ),
                        estimate_s(
                            cfg, _round_seconds(cfg, shape, registers, providers, mode), budget_s=2 * cfg.budget_s
                        ),
                    )
                )
        return cases

    def cells(self, r: dict) -> dict[str, str]:
        return {
            "model": f"{r['shape']} (B {r.get('B')})",
            "mode": r.get("mode", ""),
            "R": str(r.get("R", "")),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            "GFLOPs": f"{r['gflops']:.1f}" if r.get("gflops") else "",
            "FLOPs vs R=0": report.flop_overhead_cell(r),
            "latency vs R=0": report.overhead_cell(r, "latency_overhead"),
            f"x faster than {BASELINE}": report.speedup_cell(r),
        }

    def table_title(self, rows: list[dict], env: dict) -> str:
        return (
            f"models ({env.get('dtype')}): median ms [p20, p80]; overheads against the same provider at R=0, "
            f"speed-up against the {BASELINE} model at the same R (>1: faster)"
        )

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        lines = []
        ok = [r for r in rows if "median_ms" in r]
        for name, mode in dict.fromkeys((r["shape"], r["mode"]) for r in ok):
            sel = [r for r in ok if (r["shape"], r["mode"]) == (name, mode)]
            Rs = sorted({r["R"] for r in sel if r["R"]})
            if not Rs:
                continue
            R = 36 if 36 in Rs else max(Rs)
            fused = next((r for r in sel if r["provider"] == "fused" and r["R"] == R), None)
            if fused and fused.get("latency_overhead_pct") is not None:
                what = f"{name} {mode}, fused: {R} registers add {fused['flop_overhead_pct']:.1f}% FLOPs"
                lines.append(report.latency_cost_line(what, fused, env))
            if fused and fused.get("speedup") is not None:
                sentence = report.faster_sentence("the fused model", fused, "the eager model")
                lines.append(f"{name} {mode}, R={R}: {sentence}.")
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        ok = [r for r in rows if "median_ms" in r]
        panels = []
        for name, mode in dict.fromkeys((r["shape"], r["mode"]) for r in ok):
            sel = [r for r in ok if (r["shape"], r["mode"]) == (name, mode)]
            if len({r["R"] for r in sel}) < 2:
                continue
            series = {}
            for p in dict.fromkeys(r["provider"] for r in sel):
                line = plots.sweep([r for r in sel if r["provider"] == p], "latency_overhead")
                if line is not None:
                    series[f"{p} latency"] = line
            ref = sorted({r["R"]: r for r in sel}.values(), key=lambda r: r["R"])
            panels.append(
                {
                    "title": f"{name} {mode}",
                    "xlabel": "registers R",
                    "ylabel": "% over R=0",
                    "series": series,
                    "reference": ("FLOPs", [r["R"] for r in ref], [r["flop_overhead_pct"] for r in ref]),
                }
            )
        if not panels:
            return []
        return [
            plots.lines(
                folder / "models-overhead.png",
                panels[:4],
                suptitle=plots.title("models", "register overhead: latency vs FLOPs", env),
            )
        ]


def _round_seconds(cfg, shape: ModelShape, registers, providers, mode: str) -> float:
    total = 0.0
    for R in registers:
        try:
            with torch.device("meta"):
                count = flops(create_model(shape.name, num_registers=R), batch_size=shape.B).flops
        except Exception:  # the case itself reports it
            count = 0
        total += compute_seconds(cfg, count * (3 if mode == "train" else 1)) * len(providers)
    return total


def _measure(shape: ModelShape, mode: str, registers, providers, cfg: BenchConfig) -> list[dict]:
    """Every provider at every R on one model and mode, interleaved; the same weights at each R."""
    device, dtype = cfg.device, cfg.dtype
    train = mode == "train"
    rows = {
        (p, R): {"section": "models", "shape": shape.name, "B": shape.B, "R": R, "provider": p, "mode": mode,
                 "dtype": str(dtype).replace("torch.", "")}
        for R in registers
        for p in providers
    }  # fmt: skip
    weights, gflops = {}, {}
    g = torch.Generator(device="cpu").manual_seed(0)

    def build(key):
        p, R = key
        with torch.device(device):  # initialise on the device: XL models take seconds on a CPU
            model = create_model(shape.name, num_registers=R, backend="eager" if p == "eager" else "auto")
        if R in weights:  # the same weights for both providers at this R
            model.load_state_dict(weights[R])
        else:
            weights[R] = model.state_dict()
        model.train(train)
        gflops[R] = rows[key]["gflops"] = flops(model, batch_size=shape.B).flops / 1e9
        is_eps_model = isinstance(model, DiT) and not isinstance(model, SiT)
        objective = GaussianDiffusion() if is_eps_model else FlowMatching()
        x = torch.randn(shape.B, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
        y = torch.randint(0, 1000, (shape.B,), generator=g).to(device)

        def fn():
            with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
                return _step(model, objective, x, y, train)

        return fn

    def fields(key, row, times) -> dict:
        return {"flop_overhead_pct": 100.0 * (gflops[key[1]] / gflops[0] - 1)} if gflops.get(0) else {}

    return measure(
        rows,
        build,
        cfg,
        baseline=lambda key: (BASELINE, key[1]),
        ratios=lambda key: {"latency_overhead": (key, (key[0], 0))} if key[1] else {},
        fields=fields,
        budget_s=2 * cfg.budget_s,
    )


SECTION = ModelsSection(
    name="models", title="diffusion transformers with registers", baseline=BASELINE, mode_names=MODES
)
