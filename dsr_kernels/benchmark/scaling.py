"""What R diffusion registers cost as the model grows, from S to past XL: FLOPs next to latency.

Models (every one at 256 tokens): DiT-{S,B,L,XL}/2 on 32 x 32 x 4 SD-VAE latents,
LightningDiT-{S,B,L,XL}/1 on 16 x 16 x 768 RAE latents, and two configs past XL of each
family, with XL's head dim (72):

- ``DiT-2B/2`` / ``LightningDiT-2B/1``: hidden 1728, depth 36, 24 heads (1.95B parameters);
- ``DiT-4B/2`` / ``LightningDiT-4B/1``: hidden 2304, depth 42, 32 heads (4.03B parameters).

Registers from block 4 (S, B) or 8 (24 blocks or more), DSR's choice. R sweeps
{0, 4, 16, 36, 64, 121, 256}: 121 stands in for 128, which the models reject (DSR's
registers lie on a sqrt(R) x sqrt(R) sin-cos grid, so R is a perfect square).

Rows:

- provider ``flops``: the analytic FLOP count (:func:`dsr_kernels.models.flops`) of every
  model at every R, batch 1 forward, and its overhead over R = 0 (one case, no timing);
- provider ``fused`` (the package's ops; ``eager``, the same model on plain PyTorch, when
  asked for with ``--providers``): the latency of a batch-1 forward in inference mode.
  One case is one model with every R interleaved, so that the latency overhead over R = 0
  is paired by round; the row carries the FLOP overhead next to it. Every R shares the
  R = 0 model's weights (one copy in memory: the 4B model's take 16 GB in float32), so the
  rows differ only by the registers.

On a CPU the default measures the latency of S and B (L, XL, 2B and 4B with ``--full``);
a GPU measures every size. A model whose weights do not fit the free memory is a row with
that error.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table, compute_seconds, error_row, estimate_s
from dsr_kernels.models import create_model, flops

REGISTERS = (0, 4, 16, 36, 64, 121, 256)
PROVIDERS = ("fused", "eager")
ANALYTIC = "flops"
MODES = ("fwd",)
PAST_XL = {"2B": dict(hidden_size=1728, depth=36, num_heads=24), "4B": dict(hidden_size=2304, depth=42, num_heads=32)}


@dataclass(frozen=True)
class ScalingModel:
    """One model of the sweep: a create_model name and the configuration it overrides."""

    name: str  # "DiT-S/2", "LightningDiT-4B/1"
    base: str  # the create_model name it is built from
    family: str  # "DiT", "LightningDiT"
    size: str  # "S", "B", "L", "XL", "2B", "4B"
    overrides: tuple[tuple[str, object], ...] = ()

    def create(self, R: int, **kwargs) -> nn.Module:
        return create_model(self.base, **{**dict(self.overrides), "num_registers": R, **kwargs})


def _sweep() -> dict[str, ScalingModel]:
    models = {}
    for family, patch in (("DiT", 2), ("LightningDiT", 1)):
        for size in ("S", "B", "L", "XL", *PAST_XL):
            name = f"{family}-{size}/{patch}"
            base = f"{family}-XL/{patch}" if size in PAST_XL else name
            models[name] = ScalingModel(name, base, family, size, tuple(PAST_XL.get(size, {}).items()))
    return models


# The models the section knows (tests replace it with tiny ones).
SIZES: dict[str, ScalingModel] = _sweep()
_SMALL = ("DiT-S/2", "LightningDiT-S/1")
_BASE = ("DiT-B/2", "LightningDiT-B/1")
# Per preset and device: {model: register counts} whose latency is measured (None: every model).
PRESETS: dict[tuple[str, str], dict[str, tuple[int, ...]] | None] = {
    ("quick", "cpu"): {name: (0, 16, 64) for name in _SMALL},
    ("default", "cpu"): {**{name: REGISTERS for name in _SMALL}, **{name: (0, 16, 64, 256) for name in _BASE}},
    ("quick", "cuda"): {name: (0, 16, 64, 256) for name in ("DiT-S/2", "DiT-XL/2", "LightningDiT-XL/1")},
    ("default", "cuda"): None,
}


@functools.lru_cache(maxsize=256)
def _describe(model: ScalingModel, R: int) -> dict:
    """The model at R registers, built without memory: its forward FLOPs at batch 1, parameters,
    configuration and where its registers start."""
    with torch.device("meta"):
        m = model.create(R)
    return {
        "flops": flops(m).flops, "params": sum(p.numel() for p in m.parameters()), "hidden": m.hidden_size,
        "depth": m.depth, "heads": m.num_heads, "tokens": m.x_embedder.num_patches,
        "register_start": m.register_start if R else None,
    }  # fmt: skip


def analytic_row(model: ScalingModel, R: int) -> dict:
    """The FLOP count of ``model`` at R registers and its overhead over R = 0."""
    at, base = _describe(model, R), _describe(model, 0)
    return {
        "section": "scaling", "shape": model.name, "family": model.family, "size": model.size,
        "params_m": at["params"] / 1e6, "hidden": at["hidden"], "depth": at["depth"], "heads": at["heads"],
        "tokens": at["tokens"], "register_start": at["register_start"], "B": 1, "R": R, "provider": ANALYTIC,
        "mode": "fwd", "gflops": at["flops"] / 1e9, "flop_overhead_pct": 100.0 * (at["flops"] / base["flops"] - 1),
    }  # fmt: skip


class ScalingSection(Section):
    """FLOP and latency overhead of R registers for DiT / LightningDiT from S to 4B parameters."""

    def providers(self, device: torch.device) -> list[str]:
        return list(PROVIDERS)

    def my_providers(self, cfg: BenchConfig) -> list[str]:
        """``fused`` unless ``--providers`` names others."""
        if cfg.providers is None:
            return ["fused"]
        return [p for p in cfg.providers if p in PROVIDERS]

    def shapes(self, device: torch.device) -> list[ScalingModel]:
        return list(SIZES.values())

    def uses_registers(self) -> bool:
        return True

    def plan(self, cfg: BenchConfig) -> dict[str, tuple[int, ...]]:
        """{model: register counts} whose latency this run measures."""
        if cfg.preset == "full":
            timed = None
        else:
            timed = PRESETS[(cfg.preset, "cuda" if cfg.device.type == "cuda" else "cpu")]
        names = self.my_shapes(cfg) or (list(SIZES) if timed is None else list(timed))
        self.notes = []
        if cfg.shapes is None and timed is not None:
            left = [n for n in SIZES if n not in timed]
            if left:
                self.notes.append(f"the latency of {', '.join(left)} is measured with --full (their FLOPs are above)")
        return {n: tuple(cfg.registers or (timed or {}).get(n, REGISTERS)) for n in names}

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        plan = self.plan(cfg)
        analytic = list(SIZES) if cfg.shapes is None else list(plan)
        registers = tuple(cfg.registers or REGISTERS)
        cases = [
            Case(
                "scaling",
                f"scaling FLOPs (analytic) of {len(analytic)} models, R={','.join(map(str, registers))}",
                lambda: [_analytic(SIZES[n], R) for n in analytic for R in registers],
                0.5 + 0.05 * len(analytic) * len(registers),
            )
        ]
        providers = self.my_providers(cfg)
        for name, Rs in plan.items():
            model = SIZES[name]
            round_s = sum(compute_seconds(cfg, _flops_or_0(model, R)) for R in Rs) * len(providers)
            cases.append(
                Case(
                    "scaling",
                    f"scaling {name} fwd R={','.join(map(str, Rs))}",
                    lambda model=model, Rs=Rs: _measure(model, Rs, providers, cfg),
                    estimate_s(cfg, round_s, budget_s=2 * cfg.budget_s),
                )
            )
        return cases

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        out = []
        counted = [r for r in rows if r["provider"] == ANALYTIC and "gflops" in r]
        if counted:
            Rs = sorted({r["R"] for r in counted if r["R"]})
            display = []
            for name in dict.fromkeys(r["shape"] for r in counted):
                by_R = {r["R"]: r for r in counted if r["shape"] == name}
                first = next(iter(by_R.values()))
                params = first["params_m"]
                cells = {
                    "model": name,
                    "params": f"{params / 1e3:.2f}B" if params >= 1e3 else f"{params:.0f}M",
                    "hidden / depth / heads": f"{first['hidden']} / {first['depth']} / {first['heads']}",
                    "GFLOPs at R=0": f"{by_R[0]['gflops']:.1f}" if 0 in by_R else "",
                }  # fmt: skip
                cells.update({f"R={R}": f"+{by_R[R]['flop_overhead_pct']:.1f}%" if R in by_R else "" for R in Rs})
                display.append(cells)
            out += report.table(
                f"scaling: FLOPs that R registers add over R=0 (analytic, batch 1 forward, {first['tokens']} tokens; "
                "registers from block 4, or 8 in models of 24 blocks or more)",
                display,
            )
        timed = [r for r in rows if r["provider"] != ANALYTIC]
        if timed:
            out += report.table(
                f"scaling: latency of a batch-1 forward ({env.get('dtype')}), median ms [p20, p80]; overheads "
                "against the same provider at R=0",
                [{**self.cells(r), "note": report.noise_cell(r)} for r in timed],
            )
        return out

    def cells(self, r: dict) -> dict[str, str]:
        cells = {
            "model": r["shape"],
            "R": str(r.get("R", "")),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            "GFLOPs": f"{r['gflops']:.1f}" if r.get("gflops") else "",
            "FLOPs vs R=0": report.flop_overhead_cell(r),
            "latency vs R=0": report.overhead_cell(r, "latency_overhead"),
        }
        if r.get("speedup") is not None or r.get("baseline"):
            cells["x faster than eager"] = report.speedup_cell(r)
        return cells

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        lines = []
        counted = [r for r in rows if r["provider"] == ANALYTIC and "gflops" in r]
        for family in dict.fromkeys(r["family"] for r in counted):
            mine = [r for r in counted if r["family"] == family and r["R"]]
            if not mine:
                continue
            Rs = {r["R"] for r in mine}
            R = 64 if 64 in Rs else max(Rs)
            parts = [f"{r['size']} +{r['flop_overhead_pct']:.1f}%" for r in mine if r["R"] == R]
            lines.append(f"scaling, {family}: {R} registers add FLOPs (batch 1 forward): {', '.join(parts)}.")
        timed = [r for r in rows if r["provider"] == "fused" and "median_ms" in r]
        for name in dict.fromkeys(r["shape"] for r in timed):
            sel = {r["R"]: r for r in timed if r["shape"] == name}
            Rs = [R for R in sel if R and sel[R].get("latency_overhead_pct") is not None]
            if not Rs:
                continue
            R = 64 if 64 in Rs else max(Rs)
            row = sel[R]
            what = f"scaling {name}, batch 1 fwd: {R} registers add {row['flop_overhead_pct']:.1f}% FLOPs"
            lines.append(report.latency_cost_line(what, row, env))
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        panels = []
        for family in dict.fromkeys(r.get("family") for r in rows):
            counted = [r for r in rows if r["provider"] == ANALYTIC and r.get("family") == family and "gflops" in r]
            timed = [r for r in rows if r["provider"] == "fused" and r.get("family") == family and "median_ms" in r]
            flop_series, latency_series = {}, {}
            for size in dict.fromkeys(r["size"] for r in counted):
                rs = sorted((r for r in counted if r["size"] == size), key=lambda r: r["R"])
                flop_series[size] = ([r["R"] for r in rs], [r["flop_overhead_pct"] for r in rs], None, None)
            for size in dict.fromkeys(r["size"] for r in timed):
                line = plots.sweep([r for r in timed if r["size"] == size], "latency_overhead")
                if line is not None:
                    latency_series[size] = line
            for what, series in (("FLOPs (analytic)", flop_series), ("latency (fused, measured)", latency_series)):
                if series:
                    panels.append(
                        {"title": f"{family}: {what}", "xlabel": "registers R", "ylabel": "% over R=0",
                         "series": series}
                    )  # fmt: skip
        if not panels:
            return []
        suptitle = plots.title("scaling", "register overhead vs R, one curve per model size (batch 1 forward)", env)
        return [plots.lines(folder / "scaling-overhead.png", panels, suptitle=suptitle)]


def _analytic(model: ScalingModel, R: int) -> dict:
    try:
        return analytic_row(model, R)
    except Exception as exc:  # a register count the model rejects: a row with the reason
        return error_row(exc, section="scaling", shape=model.name, family=model.family, size=model.size,
                         R=R, provider=ANALYTIC, mode="fwd")  # fmt: skip


def _flops_or_0(model: ScalingModel, R: int) -> float:
    try:
        return _describe(model, R)["flops"]
    except Exception:  # the case reports it
        return 0.0


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shared(model: ScalingModel, R: int, backend: str, device: torch.device, tensors: dict) -> nn.Module:
    """The model at R registers without memory of its own: every tensor it shares with ``tensors``
    (by name) is that tensor; its own (the registers, their RoPE rows) come from a one-block
    model of the same width."""
    with torch.device("meta"):
        m = model.create(R, backend=backend)
    state = m.state_dict()
    missing = [k for k in state if k not in tensors or tensors[k].shape != state[k].shape]
    if missing:
        with torch.device(device):
            own = model.create(R, backend=backend, depth=1, register_start=0).state_dict()
        tensors = {**tensors, **{k: own[k] for k in missing if k in own}}
    m.load_state_dict({k: tensors[k] for k in state}, assign=True)
    left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{model.name} at R={R}: tensors {left[:3]} are not shared nor built")
    return m.eval()


def _measure(model: ScalingModel, registers, providers, cfg: BenchConfig) -> list[dict]:
    """Every provider at every R on one model, interleaved; every R shares the same weights."""
    device, dtype = cfg.device, cfg.dtype
    rows = {(p, R): {"section": "scaling", "shape": model.name, "family": model.family, "size": model.size,
                     "B": 1, "R": R, "provider": p, "mode": "fwd", "dtype": str(dtype).replace("torch.", "")}
            for R in registers for p in providers}  # fmt: skip
    built: dict[tuple[str, int], nn.Module] = {}
    g = torch.Generator(device="cpu").manual_seed(0)

    def model_at(p: str, R: int) -> nn.Module:
        """fused at R = 0: the one copy of the weights; fused at R: shares them; eager at R: shares fused's."""
        if (p, R) in built:
            return built[(p, R)]
        if (p, R) == ("fused", 0):
            need, free = 4 * _describe(model, 0)["params"], _free_bytes(device)
            if free is not None and need > 0.8 * free:
                raise MemoryError(
                    f"{model.name}'s float32 weights take {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"
                )
            with torch.device(device):
                m = model.create(0).eval()
        else:
            source = model_at("fused", 0 if p == "fused" else R)
            m = _shared(model, R, "eager" if p == "eager" else "auto", device, dict(source.state_dict()))
        built[(p, R)] = m
        return m

    def build(key):
        m = model_at(*key)
        count = flops(m).flops
        rows[key].update(gflops=count / 1e9, flop_overhead_pct=100.0 * (count / _describe(model, 0)["flops"] - 1))
        x = torch.randn(1, m.in_channels, m.input_size, m.input_size, generator=g).to(device)
        t, y = torch.rand(1, generator=g).to(device), torch.randint(0, 1000, (1,), generator=g).to(device)

        def fn():
            with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
                return m(x, t, y)

        return fn

    both = "eager" in providers and "fused" in providers
    out = measure(
        rows,
        build,
        cfg,
        baseline=lambda key: ("eager", key[1]) if both else None,
        ratios=lambda key: {"latency_overhead": (key, (key[0], 0))} if key[1] else {},
        budget_s=2 * cfg.budget_s,
        context=torch.inference_mode,
    )
    built.clear()
    return out


SECTION = ScalingSection(
    name="scaling",
    title="register overhead from S to 4B parameters: FLOPs and latency",
    mode_names=MODES,
    main_job=False,
)
