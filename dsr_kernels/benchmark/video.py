"""Video in the bench: attention at video lengths, and video DiTs with and without registers.

Two parts, each one case per shape:

- **attention alone** at N = 16,384 and 32,768 tokens, head dims 64 and 128 (B 1; 16 heads
  on a GPU, 1 on a CPU), with R = 16 kv registers: ``dsr`` (the fused op), ``dsr_stats``
  (the same with all four statistics) and ``torch_sdpa_cat`` (the baseline: the registers
  ``torch.cat``-ed to K/V, then SDPA), the providers of the attention section
  (:mod:`dsr_kernels.benchmark.attention`), forward only, interleaved. Rows give the
  speed-up over ``torch_sdpa_cat``, the statistics' overhead over ``dsr``, TFLOP/s, and
  peak memory: tensor memory, and on a CPU the process's resident peak with what the call
  added (the C++ kernel's own buffers included). On a CPU float32 (and bfloat16 too with
  ``--full``), on a GPU the run's dtype (bfloat16).
- **video models** (:mod:`dsr_kernels.models.video`): Latte-style (spatial and temporal
  blocks) and VideoDiT (full 3-D attention, 3-D RoPE in the kernel), at 4,096 tokens (16
  latent frames of 16 x 16 patches) and 16,384 (16 x 32 x 32), without registers and with
  R = 16 registers, global (one set for the video) and per frame; provider ``fused``,
  a batch-1 forward in inference mode, every variant of one model interleaved and sharing
  its weights, so that each row's latency overhead over R = 0 is paired by round; the
  analytic FLOP overhead next to it. S on a CPU, XL on a GPU.

On a CPU the default runs the attention at N = 16,384, D = 64 in float32, Latte-S/2 at
4,096 tokens (global and per-frame registers) and VideoDiT-S/2 at 4,096 tokens (global);
``--full`` every shape (16,384-token models take about a minute per forward on 2 cores).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.attention import AttentionShape, make_inputs, provider_fn
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table, compute_seconds, estimate_s
from dsr_kernels.models import create_model, flops

BASELINE = "torch_sdpa_cat"
ATTENTION_PROVIDERS = ("dsr", "dsr_stats", BASELINE)
MODEL_PROVIDERS = ("fused",)
PLACEMENTS = ("global", "per_frame")
MODES = ("fwd",)
REGISTERS = (16,)
# Latent grids: (frames, latent side) with patch 2; tokens = frames * (side / 2)^2.
GRIDS = {4096: (16, 32), 16384: (16, 64)}


def attention_shapes(device: torch.device) -> list[AttentionShape]:
    H = 16 if device.type == "cuda" else 1
    return [AttentionShape(f"video-n{N}-d{D}", 1, H, N, D) for N in (16384, 32768) for D in (64, 128)]


@dataclass(frozen=True)
class VideoModelShape:
    """A video model by name at a token count (batch 1)."""

    name: str  # "Latte-S/2-4096"
    model: str  # the create_model name
    tokens: int
    overrides: tuple[tuple[str, object], ...] = ()  # more create_model arguments

    def create(self, R: int, placement: str) -> nn.Module:
        frames, side = GRIDS[self.tokens]
        regs = dict(num_registers=R, register_placement=placement) if R else {}
        return create_model(self.model, **{"num_frames": frames, "input_size": side, **dict(self.overrides), **regs})


def model_shapes(device: torch.device) -> list[VideoModelShape]:
    size = "XL" if device.type == "cuda" else "S"
    return [
        VideoModelShape(f"{family}-{size}/2-{tokens}", f"{family}-{size}/2", tokens)
        for tokens in GRIDS
        for family in ("Latte", "VideoDiT")
    ]


# Per preset and device: the attention shapes, and {model: (register counts, placements)}; None: every shape.
ATTENTION_PRESETS = {
    ("quick", "cpu"): ["video-n16384-d64"],
    ("default", "cpu"): ["video-n16384-d64"],
    ("quick", "cuda"): ["video-n16384-d64", "video-n32768-d128"],
    ("default", "cuda"): None,
}
MODEL_PRESETS = {
    ("quick", "cpu"): {"Latte-S/2-4096": (REGISTERS, ("global",))},
    ("default", "cpu"): {"Latte-S/2-4096": (REGISTERS, PLACEMENTS), "VideoDiT-S/2-4096": (REGISTERS, ("global",))},
    ("quick", "cuda"): {"Latte-XL/2-16384": (REGISTERS, PLACEMENTS), "VideoDiT-XL/2-16384": (REGISTERS, PLACEMENTS)},
    ("default", "cuda"): None,
}


class VideoSection(Section):
    """Attention at 16k-32k tokens (dsr, with and without statistics, against SDPA) and video DiTs with registers."""

    def providers(self, device: torch.device) -> list[str]:
        return [*ATTENTION_PROVIDERS, *MODEL_PROVIDERS]

    def shapes(self, device: torch.device) -> list:
        return [*attention_shapes(device), *model_shapes(device)]

    def uses_registers(self) -> bool:
        return True

    def plan(self, cfg: BenchConfig) -> tuple[list[AttentionShape], list[tuple[VideoModelShape, tuple, tuple]]]:
        """(attention shapes, [(model, register counts, placements)]) this run measures."""
        where = (cfg.preset, "cuda" if cfg.device.type == "cuda" else "cpu")
        attn_all = {s.name: s for s in attention_shapes(cfg.device)}
        models_all = {s.name: s for s in model_shapes(cfg.device)}
        attn_names = None if cfg.preset == "full" else ATTENTION_PRESETS[where]
        model_plan = None if cfg.preset == "full" else MODEL_PRESETS[where]
        chosen = self.my_shapes(cfg)
        self.notes = []
        if chosen is None:
            attn = list(attn_all) if attn_names is None else attn_names
            models = list(models_all) if model_plan is None else list(model_plan)
            left = [n for n in [*attn_all, *models_all] if n not in attn and n not in models]
            if left:
                self.notes.append(f"shapes {', '.join(left)} run with --full (or --shapes)")
        else:
            attn = [n for n in chosen if n in attn_all]
            models = [n for n in chosen if n in models_all]
        plan = []
        for name in models:
            registers, placements = (model_plan or {}).get(name, (REGISTERS, PLACEMENTS))
            plan.append((models_all[name], tuple(r for r in cfg.registers or registers if r), placements))
        return [attn_all[n] for n in attn], plan

    def dtypes(self, cfg: BenchConfig) -> list[torch.dtype]:
        """The attention's dtypes: the run's; on a CPU with --full float32 and bfloat16 too."""
        if cfg.device.type == "cpu" and cfg.preset == "full":
            return list(dict.fromkeys([cfg.dtype, torch.float32, torch.bfloat16]))
        return [cfg.dtype]

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        attn, models = self.plan(cfg)
        chosen = self.my_providers(cfg)
        attn_providers = [p for p in ATTENTION_PROVIDERS if p in chosen]
        if attn_providers and BASELINE not in attn_providers:
            attn_providers.insert(0, BASELINE)
        registers = tuple(cfg.registers or REGISTERS)
        cases = []
        for shape in attn if attn_providers else []:
            for dtype in self.dtypes(cfg):
                dname = str(dtype).replace("torch.", "")
                round_s = sum(compute_seconds(cfg, shape.flops("fwd", R)) for R in registers) * len(attn_providers)
                cases.append(
                    Case(
                        "video",
                        f"video attention {shape.name} {dname} R={','.join(map(str, registers))}",
                        lambda shape=shape, dtype=dtype: _measure_attention(
                            shape, dtype, registers, attn_providers, cfg
                        ),
                        estimate_s(cfg, round_s, memory=cfg.memory) + (3 * round_s if cfg.memory else 0),
                    )
                )
        if "fused" in chosen:
            for shape, Rs, placements in models:
                variants = [(0, "none")] + [(R, p) for R in Rs for p in placements]
                round_s = len(variants) * compute_seconds(cfg, _flops_or_0(shape))
                label = ", ".join(f"{p} R={R}" for R, p in variants[1:])
                cases.append(
                    Case(
                        "video",
                        f"video model {shape.name} fwd: none, {label}",
                        lambda shape=shape, variants=variants: _measure_model(shape, variants, cfg),
                        estimate_s(cfg, round_s),
                    )
                )
        return cases

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        attn = [r for r in rows if r.get("part") == "attention"]
        models = [r for r in rows if r.get("part") == "model"]
        out = []
        if attn:
            out += report.table(
                f"video attention, fwd ({'; '.join(dict.fromkeys(r['dims'] for r in attn))}): median ms [p20, p80]; "
                f"speed-up against {BASELINE} at the same R and dtype (>1: faster); peak memory of one call",
                [
                    {
                        "shape": r["shape"],
                        "dtype": r.get("dtype", ""),
                        "R": str(r.get("R", "")),
                        "provider": r["provider"],
                        "ms [p20, p80]": report.ms_cell(r),
                        f"x faster than {BASELINE}": report.speedup_cell(r),
                        "statistics vs dsr": report.overhead_cell(r, "stats_overhead"),
                        "TFLOP/s": report.num(r.get("tflops")),
                        "peak MiB": report.num(r.get("peak_mem_mb")),
                        "peak RSS MiB (+call)": report.rss_cell(r),
                        "note": report.noise_cell(r),
                    }
                    for r in attn
                ],
            )
        if models:
            out += report.table(
                f"video models, batch 1 fwd ({env.get('dtype')}): median ms [p20, p80]; overheads against the "
                "same model without registers",
                [
                    {
                        "model": r["shape"],
                        "tokens": str(r.get("tokens", "")),
                        "registers": _variant(r),
                        "ms [p20, p80]": report.ms_cell(r),
                        "GFLOPs": f"{r['gflops']:.0f}" if r.get("gflops") else "",
                        "FLOPs vs R=0": f"+{r['flop_overhead_pct']:.2f}%"
                        if r.get("R") and "flop_overhead_pct" in r
                        else "",
                        "latency vs R=0": report.overhead_cell(r, "latency_overhead"),
                        "note": report.noise_cell(r),
                    }
                    for r in models
                ],
            )
        return out

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        lines = []
        attn = [r for r in rows if r.get("part") == "attention" and "median_ms" in r]
        for shape, dtype, R in dict.fromkeys((r["shape"], r["dtype"], r["R"]) for r in attn):
            by = {r["provider"]: r for r in attn if (r["shape"], r["dtype"], r["R"]) == (shape, dtype, R)}
            head = f"video attention {shape} {dtype}, R={R}"
            for p in ("dsr", "dsr_stats"):
                if p in by and by[p].get("speedup") is not None:
                    lines.append(f"{head}: {report.faster_sentence(p, by[p], BASELINE)}.")
            if all(by.get(p, {}).get("peak_rss_call_mb") is not None for p in ATTENTION_PROVIDERS):
                added = ", ".join(f"{p} +{by[p]['peak_rss_call_mb']:.1f}" for p in ATTENTION_PROVIDERS)
                lines.append(f"{head}: what one call adds to the process's resident peak, MiB: {added}.")
            elif all(by.get(p, {}).get("peak_mem_mb") is not None for p in ATTENTION_PROVIDERS):
                added = ", ".join(f"{p} {by[p]['peak_mem_mb']:.1f}" for p in ATTENTION_PROVIDERS)
                lines.append(f"{head}: peak tensor memory of one call, MiB: {added}.")
        models = [r for r in rows if r.get("part") == "model" and "median_ms" in r and r.get("R")]
        for r in models:
            if r.get("latency_overhead_pct") is None:
                continue
            what = f"video {r['shape']}, {_variant(r)} registers add {r['flop_overhead_pct']:.2f}% FLOPs"
            lines.append(report.latency_cost_line(what, r, env))
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        out = []
        attn = [r for r in rows if r.get("part") == "attention" and r.get("speedup") is not None]
        compared = [r for r in attn if r["provider"] != BASELINE]
        if compared:
            out.append(
                plots.row_bars(
                    folder / "video-attention.png",
                    compared,
                    group=lambda r: f"{r['shape']} {r['dtype']} R={r['R']}",
                    ylabel=f"x faster than {BASELINE}",
                    suptitle=plots.title("video attention", f"dsr vs SDPA (>1: faster than {BASELINE})", env),
                )
            )
        models = [r for r in rows if r.get("part") == "model" and r.get("latency_overhead_pct") is not None]
        if models:
            groups = [f"{r['shape']} {_variant(r)}" for r in models]
            series = {
                "FLOPs": [(r["flop_overhead_pct"], None, None) for r in models],
                "latency": [
                    (r["latency_overhead_pct"], r["latency_overhead_p20_pct"], r["latency_overhead_p80_pct"])
                    for r in models
                ],
            }
            suptitle = plots.title("video models", "register overhead over R=0: latency against FLOPs", env)
            out.append(plots.bars(folder / "video-models.png", groups, series, ylabel="% over R=0",
                                  suptitle=suptitle, reference=0.0))  # fmt: skip
        return out


def _variant(row: dict) -> str:
    return "none" if not row.get("R") else f"{row['placement']} {row['R']}"


def _measure_attention(shape: AttentionShape, dtype: torch.dtype, registers, providers, cfg: BenchConfig) -> list[dict]:
    """Every provider at every R on one shape and dtype, interleaved, with peak memory."""
    rows, inputs = {}, {}
    for R in registers:
        inputs[R] = make_inputs(shape, cfg.device, dtype, requires_grad=False, R=R)
        for p in providers:
            rows[(p, R)] = {
                "section": "video", "part": "attention", "shape": shape.name, "dims": shape.describe(),
                "B": shape.B, "H": shape.H, "N": shape.N, "D": shape.D, "R": R,
                "dtype": str(dtype).replace("torch.", ""), "provider": p, "mode": "fwd",
                "flop_overhead_pct": 100.0 * R / shape.N,
            }  # fmt: skip

    def ratios(key) -> dict:
        p, R = key
        return {"stats_overhead": (key, ("dsr", R))} if p == "dsr_stats" and "dsr" in providers else {}

    return measure(
        rows,
        lambda key: provider_fn(key[0], inputs[key[1]]),
        cfg,
        baseline=lambda key: (BASELINE, key[1]),
        ratios=ratios,
        fields=lambda key, row, times: {"tflops": shape.flops("fwd", key[1]) / (row["median_ms"] * 1e-3) / 1e12},
        memory=lambda key: True,
        rss=True,
        context=torch.no_grad,
        seed=hash((shape.name, str(dtype))) & 0xFFFF,
    )


def _flops_or_0(shape: VideoModelShape) -> float:
    try:
        with torch.device("meta"):
            return flops(shape.create(0, "global")).flops
    except Exception:  # the case reports it
        return 0.0


def _measure_model(shape: VideoModelShape, variants, cfg: BenchConfig) -> list[dict]:
    """The model without registers and each (R, placement), interleaved; the same block weights."""
    device, dtype = cfg.device, cfg.dtype
    rows = {
        (R, placement): {
            "section": "video", "part": "model", "shape": shape.name, "model": shape.model, "tokens": shape.tokens,
            "B": 1, "R": R, "placement": placement, "provider": "fused", "mode": "fwd",
            "dtype": str(dtype).replace("torch.", ""),
        }
        for R, placement in variants
    }  # fmt: skip
    state: dict = {}
    gflops: dict = {}
    g = torch.Generator(device="cpu").manual_seed(0)

    def build(key):
        R, placement = key
        with torch.device(device):
            m = shape.create(R, "global" if placement == "none" else placement)
        own = m.state_dict()
        if not state:
            state.update(own)
        else:  # the weights of the model without registers wherever the shapes agree
            shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            m.load_state_dict({**own, **shared}, assign=True)
        m.eval()
        gflops[key] = rows[key]["gflops"] = flops(m).flops / 1e9
        if (0, "none") in gflops:
            rows[key]["flop_overhead_pct"] = 100.0 * (gflops[key] / gflops[(0, "none")] - 1)
        T, (H, W) = m.num_frames, m.input_size
        x = torch.randn(1, m.in_channels, T, H, W, generator=g).to(device)
        t, y = torch.rand(1, generator=g).to(device), torch.randint(0, 1000, (1,), generator=g).to(device)

        def fn():
            with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
                return m(x, t, y)

        return fn

    return measure(
        rows,
        build,
        cfg,
        ratios=lambda key: {"latency_overhead": (key, (0, "none"))} if key[0] else {},
        context=torch.inference_mode,
        seed=hash(shape.name) & 0xFFFF,
    )


SECTION = VideoSection(
    name="video",
    title="video: attention at 16k-32k tokens against SDPA, video DiTs with registers",
    mode_names=MODES,
    main_job=False,
)
