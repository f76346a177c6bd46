"""norm_modulate against the eager sequence it replaces, and against a plain copy.

Providers (x [B, N, D], shift/scale [B, D], R registers [R, D], the register_start block
of DSR: registers inserted, token norms returned):

- ``eager`` (the baseline): LayerNorm / RMSNorm, modulate, ``torch.cat`` of the
  registers, ``torch.linalg.vector_norm``: what a DiT block does without this package;
- ``dsr``: ``dsr_kernels.norm_modulate(..., registers=..., return_norms=True)`` with the
  default backend (the compiled kernels);
- ``dsr_triton`` on CUDA: the same with ``backend="triton"``;
- ``copy`` on CUDA: one device-to-device copy moving as many bytes as the fused op must
  read and write: the floor a memory-bound kernel is measured against.

Rows report GB/s of those bytes (inputs read once, outputs written once) next to time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import KERNEL_MODES, BenchConfig, Case, Section, compute_seconds, estimate_s
from dsr_kernels.ops.norm_modulate import norm_modulate

BASELINE = "eager"
MODES = KERNEL_MODES


@dataclass(frozen=True)
class NormShape:
    """x [B, N, D], shift and scale [B, D], R registers [R, D]; LayerNorm or RMSNorm."""

    name: str
    B: int
    N: int
    D: int
    R: int
    kind: str = "layernorm"

    def bytes_moved(self, mode: str, itemsize: int) -> float:
        """Fewest bytes: read x, registers, shift, scale; write out, residual (and norms)."""
        T = self.N + self.R
        fwd = itemsize * (self.B * self.N * self.D + self.R * self.D + 2 * self.B * self.D) + itemsize * (
            2 * self.B * T * self.D
        )
        # backward: read x, registers, dout, dresidual (and params); write dx, dregisters.
        bwd = itemsize * (self.B * self.N * self.D + self.R * self.D + 2 * self.B * T * self.D) + itemsize * (
            self.B * self.N * self.D + self.R * self.D
        )
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def default_shapes(device: torch.device) -> list[NormShape]:
    """DiT-XL's register_start block (B = 8 on CPU, 256 on GPU; N = 256, D = 1152, R = 36)."""
    batch = 256 if device.type == "cuda" else 8
    return [
        NormShape("dit-xl-layernorm", batch, 256, 1152, 36),
        NormShape("lightningdit-xl-rmsnorm", batch, 256, 1152, 36, kind="rmsnorm"),
    ]


def all_shapes(device: torch.device) -> list[NormShape]:
    """The default shapes, and (with --full or --shapes) the CPU kernel's target shape at batch 32."""
    return default_shapes(device) + [NormShape("dit-xl-layernorm-b32", 32, 256, 1152, 36)]


def available_providers(device: torch.device) -> list[str]:
    return [BASELINE, "dsr"] + (["dsr_triton", "copy"] if device.type == "cuda" else [])


def make_inputs(shape: NormShape, device: torch.device, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s, std=1.0):
        t = torch.randn(*s, generator=g) * std
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    weight = rand(shape.D) if shape.kind == "rmsnorm" else None
    return (
        shape,
        rand(shape.B, shape.N, shape.D),
        rand(shape.B, shape.D, std=0.1),
        rand(shape.B, shape.D, std=0.1),
        rand(shape.R, shape.D),
        weight,
    )


def _eager(shape: NormShape, x, shift, scale, registers, weight):
    h = torch.cat([registers.expand(x.shape[0], -1, -1), x], dim=1)
    if shape.kind == "layernorm":
        y = F.layer_norm(h, (shape.D,), eps=1e-6)
    else:
        y = F.rms_norm(h, (shape.D,), weight=weight, eps=1e-6)
    out = y * (1 + scale[:, None]) + shift[:, None]
    norms = torch.linalg.vector_norm(h.detach().float(), dim=-1)
    return out, h, norms


def provider_fn(name: str, inputs) -> Callable[[], tuple]:
    shape, x, shift, scale, registers, weight = inputs
    if name == BASELINE:
        return lambda: _eager(shape, x, shift, scale, registers, weight)[:2]
    if name in ("dsr", "dsr_triton"):
        backend = "triton" if name == "dsr_triton" else "auto"

        def fused():
            res = norm_modulate(
                x,
                shift,
                scale,
                weight=weight,
                kind=shape.kind,
                registers=registers,
                return_norms=True,
                backend=backend,
            )
            return res.out, res.residual

        return fused
    raise ValueError(f"unknown provider {name!r}; expected one of {available_providers(torch.device('cuda'))}")


def mode_fn(name: str, mode: str, inputs) -> Callable[[], object]:
    shape, x = inputs[0], inputs[1]
    if name == "copy":
        numel = int(shape.bytes_moved(mode, x.element_size()) // 2 // x.element_size())
        src = torch.empty(numel, dtype=x.dtype, device=x.device).normal_()
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    fwd = provider_fn(name, inputs)
    wrt = [t for t in inputs[1:] if t is not None]
    if mode == "fwd":
        return fwd
    out, residual = fwd()
    dout, dres = torch.randn_like(out), torch.randn_like(residual)
    if mode == "full":

        def full():
            o, r = fwd()
            return torch.autograd.grad((o, r), wrt, (dout, dres))

        return full
    return lambda: torch.autograd.grad((out, residual), wrt, (dout, dres), retain_graph=True)


class NormModulateSection(Section):
    """norm_modulate (norm + adaLN modulate + register insertion + token norms) vs the eager sequence."""

    def providers(self, device: torch.device) -> list[str]:
        return available_providers(device)

    def all_providers(self) -> list[str]:
        return available_providers(torch.device("cuda"))

    def shapes(self, device: torch.device) -> list[NormShape]:
        return all_shapes(device)

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        pool = all_shapes(cfg.device) if cfg.shapes is not None or cfg.preset == "full" else default_shapes(cfg.device)
        shapes = [s for s in pool if cfg.shapes is None or s.name in cfg.shapes]
        if cfg.shapes is None and cfg.preset == "quick":
            shapes = shapes[:1]
        modes = self.my_modes(cfg) or {"quick": ("fwd",), "default": ("fwd", "full"), "full": MODES}[cfg.preset]
        providers = self.my_providers(cfg)
        self.notes = (
            [] if cfg.preset == "full" or cfg.modes else [f"modes other than {', '.join(modes)} run with --full"]
        )
        return [
            Case(
                "norm_modulate",
                f"norm_modulate {shape.name} {mode}",
                lambda shape=shape, mode=mode: _measure(shape, mode, providers, cfg),
                estimate_s(
                    cfg, len(providers) * compute_seconds(cfg, nbytes=2 * shape.bytes_moved(mode, 4)), memory=cfg.memory
                ),
            )
            for shape in shapes
            for mode in modes
        ]

    def cells(self, r: dict) -> dict[str, str]:
        return {
            "shape": f"{r['shape']}",
            "mode": r.get("mode", ""),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            f"x faster than {BASELINE}": report.speedup_cell(r),
            "GB/s": report.num(r.get("gb_per_s")),
            "peak MiB": report.num(r.get("peak_mem_mb")),
        }

    def table_title(self, rows: list[dict], env: dict) -> str:
        dims = "; ".join(
            dict.fromkeys(
                f"{r['shape']} = B {r.get('B')}, N {r.get('N')}, D {r.get('D')}, R {r.get('R')}" for r in rows
            )
        )
        return (
            f"norm_modulate ({env.get('dtype')}; {dims}): median ms [p20, p80]; speed-up against {BASELINE} "
            "(LayerNorm / RMSNorm, modulate, torch.cat, vector_norm; >1: faster)"
        )

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        return [
            f"norm_modulate {r['shape']} {r['mode']} on {report.where(env)}: "
            f"{report.faster_sentence(r['provider'], r, BASELINE)}."
            for r in rows
            if r.get("speedup") is not None
        ]

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        ok = [r for r in rows if r.get("speedup") is not None]
        if not ok:
            return []
        suptitle = plots.title("norm_modulate", f"fused vs {BASELINE} (>1: faster)", env)
        return [
            plots.row_bars(
                folder / "norm_modulate-speedup.png", ok, ylabel=f"x faster than {BASELINE}", suptitle=suptitle
            )
        ]


def _measure(shape: NormShape, mode: str, providers, cfg: BenchConfig) -> list[dict]:
    inputs = make_inputs(shape, cfg.device, cfg.dtype, requires_grad=mode != "fwd")
    dims = {"B": shape.B, "N": shape.N, "D": shape.D, "R": shape.R, "dtype": str(cfg.dtype).replace("torch.", "")}
    rows = {
        p: {"section": "norm_modulate", "shape": shape.name, **dims, "provider": p, "mode": mode} for p in providers
    }
    moved = shape.bytes_moved(mode, inputs[1].element_size())
    return measure(
        rows,
        lambda p: mode_fn(p, mode, inputs),
        cfg,
        baseline=lambda p: BASELINE,
        fields=lambda p, row, times: {"gb_per_s": moved / (row["median_ms"] * 1e-3) / 1e9},
        memory=lambda p: True,
    )


SECTION = NormModulateSection(name="norm_modulate", title="norm_modulate", baseline=BASELINE, mode_names=MODES)
