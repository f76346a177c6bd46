"""What registers and statistics cost in attention, measured against PyTorch in one run.

Providers (each on the same inputs: q, k, v [B, H, N, D] and R registers [H, R, D]):

- ``dsr``: ``dsr_kernels.attention(q, k, v, kv_registers=(rk, rv))``;
- ``dsr_stats``: the same with ``return_stats=True`` (lse, entropy, register_share,
  key_mass);
- ``torch_sdpa_cat`` (the baseline): registers concatenated to K/V with ``torch.cat``,
  then ``F.scaled_dot_product_attention`` with PyTorch's own kernel choice;
- ``eager_stats``: ``torch_sdpa_cat`` plus the statistics computed the way users do
  today: the materialised softmax and its column sums;
- on CUDA also ``sdpa_flash_cat``, ``sdpa_cudnn_cat``, ``sdpa_efficient_cat`` (one SDPA
  backend forced each), ``dsr_pad`` (head dims padded to a power of two instead of
  split), and ``flash_attn_cat`` when flash-attn is importable.

Modes: ``fwd``, ``bwd`` (backward of a retained graph), ``full`` (both). One case is
one shape and mode: every provider at every register count R, their repeats
interleaved, so that both ratios a row carries are paired by round: the speed-up over
``torch_sdpa_cat`` at the same R, and the latency overhead over the same provider at
R = 0 (next to the FLOP overhead R / N). Rows also give achieved TFLOP/s
(4 B H N (N + R) D forward, 2.5x that backward) and peak memory (measured at one R):
tensor memory, and on the CPU the process's resident peak with what the call added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import (
    KERNEL_MODES,
    REGISTERS,
    BenchConfig,
    Case,
    Section,
    Table,
    compute_seconds,
    estimate_s,
)
from dsr_kernels.ops.attention import attention

BASELINE = "torch_sdpa_cat"
MODES = KERNEL_MODES
MS_KEYS = ("median_ms", "p20_ms", "p80_ms")


@dataclass(frozen=True)
class AttentionShape:
    """q, k, v [B, H, N, D]; the registers' count R is swept per case."""

    name: str
    B: int
    H: int
    N: int
    D: int

    def flops(self, mode: str, R: int) -> float:
        fwd = 4.0 * self.B * self.H * self.N * (self.N + R) * self.D
        return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]

    def describe(self) -> str:
        return f"B {self.B}, H {self.H}, N {self.N}, D {self.D}"


SHAPE_NAMES = (
    "dsr-dit-xl",
    "dsr-dit-xl-b8",
    "dit-b",
    "n1024",
    "n4096",
    "n4096-h8",
    "dsr-dit-xl-d80",
    "n4096-d128",
    "n70000-d4",
)
# Providers that materialise [B, H, N, R + N] probabilities leave shapes where that
# would take more than this (the row would measure the swap, or an out-of-memory error).
MATERIALISE_LIMIT_BYTES = 2 * 2**30


def all_shapes(device: torch.device) -> list[AttentionShape]:
    """DSR's DiT-XL (256 tokens, head dim 72), DiT-B, long sequences, and head dims 80 / 128.

    Batch sizes: large enough to fill a GPU, small enough that a CPU case takes seconds.
    """
    gpu = device.type == "cuda"
    return [
        AttentionShape("dsr-dit-xl", 256 if gpu else 2, 16, 256, 72),
        AttentionShape("dsr-dit-xl-b8", 8, 16, 256, 72),  # the CPU kernel's targets at DSR's shape (issue 9)
        AttentionShape("dit-b", 256 if gpu else 2, 12, 256, 64),
        AttentionShape("n1024", 32 if gpu else 1, 16, 1024, 64),
        AttentionShape("n4096", 4 if gpu else 1, 16, 4096, 64),
        AttentionShape("n4096-h8", 4 if gpu else 1, 8, 4096, 64),  # the CPU kernel's targets (issue 9)
        AttentionShape("dsr-dit-xl-d80", 256 if gpu else 2, 16, 256, 80),
        AttentionShape("n4096-d128", 4 if gpu else 1, 16, 4096, 128),
        # The statistics' memory at a length where N x N is out of reach (issue 15): with
        # R = 0 and D = 4 the attention's own memory is small, so any O(N^2) buffer shows.
        AttentionShape("n70000-d4", 1, 2, 70000, 4),
    ]


def materialises(provider: str) -> bool:
    return provider == "eager_stats"


def available_providers(device: torch.device) -> list[str]:
    providers = ["dsr", "dsr_stats", BASELINE, "eager_stats"]
    if device.type == "cuda":
        providers += ["sdpa_flash_cat", "sdpa_cudnn_cat", "sdpa_efficient_cat", "dsr_pad"]
        try:
            import flash_attn  # noqa: F401

            providers.append("flash_attn_cat")
        except Exception:
            pass
    return providers


def make_inputs(shape: AttentionShape, device: torch.device, dtype: torch.dtype, requires_grad: bool, R: int = 36):
    """(q, k, v [B, H, N, D], register keys, values [H, R, D])."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    return rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(H, R, D), rand(H, R, D)


def _cat_registers(k, v, rk, rv):
    B = k.shape[0]
    return torch.cat([rk.expand(B, -1, -1, -1), k], dim=2), torch.cat([rv.expand(B, -1, -1, -1), v], dim=2)


def _eager_stats(q, k_cat, R: int):
    """What users compute today to read attention statistics: the full softmax."""
    with torch.no_grad():
        s = (q @ k_cat.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None])
        entropy = -torch.special.xlogy(p, p).sum(-1)
        return lse, entropy, p[..., :R].sum(-1), p.sum(-2)


def provider_fn(name: str, inputs) -> Callable[[], torch.Tensor]:
    """A forward closure returning the attention output [B, H, N, D]."""
    q, k, v, rk, rv = inputs
    regs = (rk, rv) if rk.shape[1] else None
    if name == "dsr":
        return lambda: attention(q, k, v, kv_registers=regs)
    if name == "dsr_stats":
        return lambda: attention(q, k, v, kv_registers=regs, return_stats=True)[0]
    if name == "dsr_pad":
        from dsr_kernels.triton import attention as triton_attention

        def padded():
            saved, triton_attention.HEAD_SPLIT = triton_attention.HEAD_SPLIT, "pad"
            try:
                return attention(q, k, v, kv_registers=regs, backend="triton")
            finally:
                triton_attention.HEAD_SPLIT = saved

        return padded
    if name == "eager_stats":

        def eager():
            k_cat, v_cat = _cat_registers(k, v, rk, rv)
            out = F.scaled_dot_product_attention(q, k_cat, v_cat)
            _eager_stats(q, k_cat, rk.shape[1])
            return out

        return eager
    if name == "flash_attn_cat":
        from flash_attn import flash_attn_func

        def flash():
            k_cat, v_cat = _cat_registers(k, v, rk, rv)
            out = flash_attn_func(q.transpose(1, 2), k_cat.transpose(1, 2), v_cat.transpose(1, 2))
            return out.transpose(1, 2)

        return flash
    sdpa_backends = {
        BASELINE: None,
        "sdpa_flash_cat": "FLASH_ATTENTION",
        "sdpa_cudnn_cat": "CUDNN_ATTENTION",
        "sdpa_efficient_cat": "EFFICIENT_ATTENTION",
    }
    if name in sdpa_backends:
        forced = sdpa_backends[name]

        def sdpa():
            ctx = contextlib.nullcontext()
            if forced is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                ctx = sdpa_kernel(getattr(SDPBackend, forced))
            with ctx:
                k_cat, v_cat = _cat_registers(k, v, rk, rv)
                return F.scaled_dot_product_attention(q, k_cat, v_cat)

        return sdpa
    raise ValueError(f"unknown provider {name!r}; expected one of {available_providers(torch.device('cuda'))}")


def mode_fn(name: str, mode: str, inputs) -> Callable[[], object]:
    fwd = provider_fn(name, inputs)
    if mode == "fwd":
        return lambda: fwd()
    dout = torch.randn_like(inputs[0])
    if mode == "full":
        return lambda: torch.autograd.grad(fwd(), inputs, dout, allow_unused=True)
    out = fwd()
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True, allow_unused=True)


# n70000-d4 (a forward takes ~10 s on 2 cores) measures memory: one R, forward only.
LONG_SHAPE = ((0,), ("fwd",))
# Per preset and device: {shape: (register counts, modes)}.
_PRESETS = {
    ("quick", "cpu"): {"dsr-dit-xl": ((0, 36), ("fwd",))},
    ("default", "cpu"): {"dsr-dit-xl": (REGISTERS, ("fwd", "full")), "n1024": ((0, 36), ("fwd",))},
    ("quick", "cuda"): {"dsr-dit-xl": ((0, 36), ("fwd", "full"))},
    ("default", "cuda"): {name: (REGISTERS, ("fwd", "full")) for name in ("dsr-dit-xl", "n1024", "n4096")},
}


class AttentionSection(Section):
    """Register overhead across R, fused vs torch.cat + SDPA vs eager statistics, fwd and fwd+bwd."""

    def providers(self, device: torch.device) -> list[str]:
        return available_providers(device)

    def all_providers(self) -> list[str]:
        return list(dict.fromkeys(available_providers(torch.device("cuda")) + ["flash_attn_cat"]))

    def shapes(self, device: torch.device) -> list[AttentionShape]:
        return all_shapes(device)

    def uses_registers(self) -> bool:
        return True

    def plan(self, cfg: BenchConfig) -> list[tuple[AttentionShape, tuple[int, ...], tuple[str, ...]]]:
        shapes = {s.name: s for s in all_shapes(cfg.device)}
        if cfg.preset == "full":
            preset = {name: (REGISTERS, MODES) for name in SHAPE_NAMES}
            preset["n70000-d4"] = LONG_SHAPE
        else:
            preset = _PRESETS[(cfg.preset, "cuda" if cfg.device.type == "cuda" else "cpu")]
        names = self.my_shapes(cfg) or list(preset)
        self.notes = []
        if cfg.shapes is None and cfg.preset != "full":
            left = [n for n in SHAPE_NAMES if n not in preset]
            self.notes.append(f"shapes {', '.join(left)} run with --full (or --shapes)")
        out = []
        for name in names:
            registers, modes = preset.get(name, LONG_SHAPE if name == "n70000-d4" else (REGISTERS, ("fwd", "full")))
            out.append((shapes[name], tuple(cfg.registers or registers), self.my_modes(cfg) or modes))
        return out

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        cases = []
        for shape, registers, modes in self.plan(cfg):
            probs = 4 * shape.B * shape.H * shape.N * (shape.N + max(registers))
            providers = [p for p in self.my_providers(cfg) if not (materialises(p) and probs > MATERIALISE_LIMIT_BYTES)]
            if len(providers) < len(self.my_providers(cfg)):
                self.notes.append(
                    f"{shape.name}: eager_stats not run (its probabilities would take {probs / 2**30:.0f} GiB)"
                )
            for mode in modes:
                round_s = sum(compute_seconds(cfg, 2 * shape.flops(mode, R)) for R in registers) * len(providers)
                cases.append(
                    Case(
                        "attention",
                        f"attention {shape.name} {mode} R={','.join(map(str, registers))}",
                        lambda shape=shape, mode=mode, registers=registers, providers=providers: _measure(
                            shape, mode, registers, providers, cfg
                        ),
                        estimate_s(cfg, round_s, memory=cfg.memory),
                    )
                )
        return cases

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        """One table per mode."""
        tables = []
        for mode in MODES:
            tables += super().tables([r for r in rows if r.get("mode") == mode], env)
        return tables

    def cells(self, r: dict) -> dict[str, str]:
        return {
            "shape": r["shape"],
            "R": str(r.get("R", "")),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            f"x faster than {BASELINE}": report.speedup_cell(r),
            "latency vs R=0": report.overhead_cell(r, "register_overhead"),
            "FLOPs vs R=0": report.flop_overhead_cell(r),
            "TFLOP/s": report.num(r.get("tflops")),
            "peak MiB": report.num(r.get("peak_mem_mb")),
            "peak RSS MiB (+call)": report.rss_cell(r),
        }

    def table_title(self, rows: list[dict], env: dict) -> str:
        dims = "; ".join(f"{k} = {v}" for k, v in dict.fromkeys((r["shape"], r.get("dims")) for r in rows))
        return (
            f"attention, {rows[0]['mode']} ({env.get('dtype')}; {dims}): median ms [p20, p80]; speed-up against "
            f"{BASELINE} at the same R (>1: faster); latency overhead against the same provider at R=0"
        )

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        lines = []
        by = {(r["shape"], r.get("mode"), r["provider"], r.get("R")): r for r in rows if "median_ms" in r}
        for shape, mode in dict.fromkeys((r["shape"], r.get("mode")) for r in rows if "median_ms" in r):
            Rs = sorted({k[3] for k in by if k[:2] == (shape, mode)})
            R = 36 if 36 in Rs else max(Rs)
            dsr = by.get((shape, mode, "dsr", R))
            head = f"attention {shape} {mode}"
            if dsr and dsr.get("register_overhead_pct") is not None and R:
                lines.append(
                    f"{head}: {R} registers add {dsr['flop_overhead_pct']:.1f}% FLOPs; the latency they add to dsr "
                    f"on {report.where(env)}: {report.overhead_clause(dsr, 'register_overhead')}."
                )
            if dsr and dsr.get("speedup") is not None:
                lines.append(f"{head}, R={R}: {report.faster_sentence('dsr', dsr, BASELINE)}.")
            stats, eager = by.get((shape, mode, "dsr_stats", R)), by.get((shape, mode, "eager_stats", R))
            if stats and dsr and stats.get("peak_rss_mb") and dsr.get("peak_rss_mb"):
                lines.append(
                    f"{head}, R={R}: the call's resident peak grows by {stats['peak_rss_call_mb']:.1f} MiB with "
                    f"statistics, {dsr['peak_rss_call_mb']:.1f} MiB without (the process's peak: "
                    f"{stats['peak_rss_mb']:.0f} against {dsr['peak_rss_mb']:.0f} MiB, "
                    f"{stats['peak_rss_mb'] / dsr['peak_rss_mb']:.3f}x)."
                )
            if stats and stats.get("vs_eager_stats_speedup") is not None:
                mem = ""
                if eager and stats.get("peak_mem_mb") and eager.get("peak_mem_mb"):
                    mem = f", with {eager['peak_mem_mb'] / stats['peak_mem_mb']:.1f}x less peak memory"
                sentence = report.faster_sentence("dsr_stats", stats, "eager_stats", "vs_eager_stats_speedup")
                lines.append(f"{head}, R={R}: with statistics, {sentence}{mem}.")
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        ok = [r for r in rows if "median_ms" in r]
        out = []
        sweeps = [
            (shape, mode)
            for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in ok)
            if len({r["R"] for r in ok if (r["shape"], r["mode"]) == (shape, mode)}) > 2
        ]
        if sweeps:
            panels = []
            for shape, mode in sweeps[:2]:
                sel = [r for r in ok if (r["shape"], r["mode"]) == (shape, mode)]
                lat, ovh = {}, {}
                for p in dict.fromkeys(r["provider"] for r in sel):
                    pr = sorted((r for r in sel if r["provider"] == p), key=lambda r: r["R"])
                    lat[p] = tuple([r[k] for r in pr] for k in ("R", *MS_KEYS))
                    if (line := plots.sweep(pr, "register_overhead")) is not None:
                        ovh[p] = line
                ref = sorted(sel, key=lambda r: r["R"])
                panels.append(
                    {"title": f"{shape} {mode}: latency", "xlabel": "registers R", "ylabel": "ms", "series": lat}
                )
                panels.append(
                    {
                        "title": f"{shape} {mode}: overhead vs R=0",
                        "xlabel": "registers R",
                        "ylabel": "%",
                        "series": ovh,
                        "reference": ("FLOPs", [r["R"] for r in ref], [r["flop_overhead_pct"] for r in ref]),
                    }
                )
            suptitle = plots.title("attention", "latency and overhead vs registers", env)
            out.append(plots.lines(folder / "attention-registers.png", panels, suptitle=suptitle))
        per_n = [
            r for r in ok if r["mode"] == "fwd" and r["R"] == 36 and r["shape"] in ("dsr-dit-xl", "n1024", "n4096")
        ]
        if len({r["N"] for r in per_n}) > 1:
            series = {}  # one line per provider and head dim: only points of the same D are joined
            for p, D in dict.fromkeys((r["provider"], r["D"]) for r in per_n):
                rs = sorted((r for r in per_n if (r["provider"], r["D"]) == (p, D)), key=lambda r: r["N"])
                series[f"{p}, D {D}"] = ([r["N"] for r in rs], *([r[k] / r["B"] for r in rs] for k in MS_KEYS))
            panel = {
                "title": "fwd, R=36, per sample; one line per head dim D",
                "xlabel": "tokens N",
                "ylabel": "ms per sample",
                "series": series,
                "logx": True,
                "logy": True,
            }
            suptitle = plots.title("attention", "latency vs sequence length", env)
            out.append(plots.lines(folder / "attention-seqlen.png", [panel], suptitle=suptitle))
        compared = [r for r in ok if r["R"] in (0, 36) and r["provider"] != BASELINE]
        if compared:
            out.append(
                plots.row_bars(
                    folder / "attention-speedup.png",
                    compared,
                    group=lambda r: f"{r['shape']} {r['mode']} R={r['R']}",
                    ylabel=f"x faster than {BASELINE}",
                    suptitle=plots.title("attention", f"fused vs baselines (>1: faster than {BASELINE})", env),
                )
            )
        return out


def _measure(shape: AttentionShape, mode: str, registers, providers, cfg: BenchConfig) -> list[dict]:
    """Every provider at every R on one shape and mode, interleaved."""
    rows, inputs = {}, {}
    for R in registers:
        inputs[R] = make_inputs(shape, cfg.device, cfg.dtype, requires_grad=mode != "fwd", R=R)
        for p in providers:
            rows[(p, R)] = {
                "section": "attention",
                "shape": shape.name,
                "dims": shape.describe(),
                "B": shape.B,
                "H": shape.H,
                "N": shape.N,
                "D": shape.D,
                "R": R,
                "dtype": str(cfg.dtype).replace("torch.", ""),
                "provider": p,
                "mode": mode,
                "flop_overhead_pct": 100.0 * R / shape.N,
            }

    def ratios(key) -> dict:
        p, R = key
        out = {"register_overhead": (key, (p, 0))} if R else {}
        if p == "dsr_stats":  # statistics both ways, paired
            out["vs_eager_stats_speedup"] = (key, ("eager_stats", R))
        return out

    mem_R = 36 if 36 in registers else max(registers)
    return measure(
        rows,
        lambda key: mode_fn(key[0], mode, inputs[key[1]]),
        cfg,
        baseline=lambda key: (BASELINE, key[1]),
        ratios=ratios,
        fields=lambda key, row, times: {"tflops": shape.flops(mode, key[1]) / (row["median_ms"] * 1e-3) / 1e12},
        memory=lambda key: key[1] == mem_R,
        rss=True,
        seed=hash((shape.name, mode)) & 0xFFFF,
    )


SECTION = AttentionSection(name="attention", title="attention with R registers", baseline=BASELINE, mode_names=MODES)
