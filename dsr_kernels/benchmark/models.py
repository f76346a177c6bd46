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

import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dsr_kernels.benchmark import plots
from dsr_kernels.benchmark.common import overhead_fields, speedup_fields, time_interleaved, timing_fields
from dsr_kernels.benchmark.section import (
    REGISTERS,
    BenchConfig,
    Case,
    Section,
    Table,
    compute_seconds,
    error_row,
    estimate_s,
    faster_sentence,
    ms_cell,
    noise_cell,
    overhead_cell,
    overhead_sentence,
    probe,
    speedup_cell,
    where,
)
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


SHAPE_NAMES = tuple(dict.fromkeys(s.name for d in ("cpu", "cuda") for s in all_shapes(torch.device(d))))

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

    def __init__(self) -> None:
        super().__init__(
            name="models", title="diffusion transformers with registers", baseline=BASELINE, mode_names=MODES
        )

    def providers(self, device: torch.device) -> list[str]:
        return list(PROVIDERS)

    def shape_names(self) -> list[str]:
        """Any denoiser create_model knows (the defaults first)."""
        from dsr_kernels.models import list_models

        return list(SHAPE_NAMES) + [m for m in list_models() if "/" in m and m not in SHAPE_NAMES]

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

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        display = [
            {
                "model": f"{r['shape']} (B {r.get('B')})",
                "mode": r.get("mode", ""),
                "R": str(r.get("R", "")),
                "provider": r["provider"],
                "ms [p20, p80]": ms_cell(r),
                "GFLOPs": f"{r['gflops']:.1f}" if r.get("gflops") else "",
                "FLOPs vs R=0": f"+{r['flop_overhead_pct']:.1f}%" if r.get("R") and "flop_overhead_pct" in r else "",
                "latency vs R=0": overhead_cell(r, "latency_overhead"),
                f"x faster than {BASELINE}": speedup_cell(r),
                "note": noise_cell(r),
            }
            for r in rows
        ]
        title = (
            f"models ({env.get('dtype')}): median ms [p20, p80]; overheads against the same provider at R=0, "
            f"speed-up against the {BASELINE} model at the same R (>1: faster)"
        )
        return [Table(title, list(display[0]), display)] if display else []

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
                lines.append(
                    f"{R} registers add {fused['flop_overhead_pct']:.1f}% FLOPs and "
                    f"{overhead_sentence(fused, 'latency_overhead')} to {name} ({mode}, fused) on {where(env)}."
                )
            if fused and fused.get("speedup") is not None:
                lines.append(f"{name} {mode}, R={R}: {faster_sentence('the fused model', fused, 'the eager model')}.")
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
                pr = sorted((r for r in sel if r["provider"] == p), key=lambda r: r["R"])
                if not pr or pr[0]["R"] != 0:
                    continue
                series[f"{p} latency"] = (
                    [r["R"] for r in pr],
                    *(
                        [0.0 if r["R"] == 0 else r.get(f"latency_overhead{q}_pct") for r in pr]
                        for q in ("", "_p20", "_p80")
                    ),
                )
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
    device, dtype = cfg.device, cfg.dtype
    train = mode == "train"
    fns, rows, gflops = {}, {}, {}
    weights = None
    g = torch.Generator(device="cpu").manual_seed(0)
    for R in registers:
        for p in providers:
            key = (p, R)
            rows[key] = {
                "section": "models",
                "shape": shape.name,
                "B": shape.B,
                "R": R,
                "provider": p,
                "mode": mode,
                "dtype": str(dtype).replace("torch.", ""),
            }
            try:
                with torch.device(device):  # initialise on the device: XL models take seconds on a CPU
                    model = create_model(shape.name, num_registers=R, backend="eager" if p == "eager" else "auto")
                if weights is not None and R in weights:  # the same weights for both providers at this R
                    model.load_state_dict(weights[R])
                else:
                    weights = weights or {}
                    weights[R] = model.state_dict()
            except Exception as exc:
                rows[key] = error_row("models", exc, **rows[key])
                continue
            model.train(train)
            count = flops(model, batch_size=shape.B)
            gflops[R] = count.flops / 1e9
            rows[key]["gflops"] = gflops[R]
            is_eps_model = isinstance(model, DiT) and not isinstance(model, SiT)
            objective = GaussianDiffusion() if is_eps_model else FlowMatching()
            x = torch.randn(shape.B, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
            y = torch.randint(0, 1000, (shape.B,), generator=g).to(device)

            def fn(model=model, objective=objective, x=x, y=y):
                ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
                with ctx:
                    return _step(model, objective, x, y, train)

            fns[key] = fn
    ok, failed = probe(fns, device)
    for key, exc in failed.items():
        rows[key] = error_row("models", exc, **rows[key])
    timing = time_interleaved(ok, device, budget_s=2 * cfg.budget_s, rng=random.Random(0))
    base_flops = gflops.get(0)
    for (p, R), row in rows.items():
        if (p, R) not in timing.times:
            continue
        row.update(timing_fields(timing, (p, R)))
        if base_flops:
            row["flop_overhead_pct"] = 100.0 * (gflops[R] / base_flops - 1)
        if R and (p, 0) in timing.times:
            row.update(overhead_fields(timing.times[(p, R)], timing.times[(p, 0)], "latency_overhead"))
        if p == BASELINE:
            row["baseline"] = BASELINE
        elif (BASELINE, R) in timing.times:
            row.update(speedup_fields(timing.times[(p, R)], timing.times[(BASELINE, R)], BASELINE))
    del fns, ok
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


SECTION = ModelsSection()
