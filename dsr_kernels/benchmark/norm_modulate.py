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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsr_kernels.benchmark.common import environment, format_table, run_suite
from dsr_kernels.ops.norm_modulate import norm_modulate

BASELINE = "eager"
MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class NormShape:
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
    """DiT-XL's register_start block (B = 32 on CPU, 256 on GPU; N = 256, D = 1152, R = 36)."""
    batch = 256 if device.type == "cuda" else 32
    return [
        NormShape("dit-xl-layernorm", batch, 256, 1152, 36),
        NormShape("lightningdit-xl-rmsnorm", batch, 256, 1152, 36, kind="rmsnorm"),
    ]


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


_COLUMNS = (
    "shape",
    "mode",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gb_per_s",
    "peak_mem_mb",
    "speedup_vs_baseline",
    "error",
)


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[NormShape] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    memory: bool = True,
    budget_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    rows = run_suite(
        op="norm_modulate",
        device=device,
        dtype=dtype,
        shapes=list(shapes or default_shapes(device)),
        providers=list(providers or available_providers(device)),
        modes=modes,
        baseline=BASELINE,
        make_inputs=make_inputs,
        mode_fn=mode_fn,
        work=lambda shape, mode: {"bytes": shape.bytes_moved(mode, torch.empty(0, dtype=dtype).element_size())},
        memory=memory,
        budget_s=budget_s,
        log=log,
        columns=_COLUMNS,
    )
    return environment(device), rows


def targets(rows: list[dict]) -> list[str]:
    """Measured ratios for the issue's targets (reported, never asserted)."""
    by = {(r["shape"], r["mode"], r["provider"]): r for r in rows if "median_ms" in r}
    lines = []
    for (shape, mode, provider), r in sorted(by.items()):
        if provider != "dsr":
            continue
        parts = [f"{shape} {mode}: dsr is {r.get('speedup_vs_baseline') or 0:.2f}x faster than eager"]
        copy = by.get((shape, mode, "copy"))
        if copy:
            parts.append(f"and takes {r['median_ms'] / copy['median_ms']:.2f}x the time of a copy of its bytes")
        lines.append(" ".join(parts))
    return lines


def print_report(env: dict, rows: list[dict], log: Callable[[str], None] = print) -> None:
    log(f"\nnorm_modulate on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}")
    log(format_table(rows, _COLUMNS))
    log("")
    for line in targets(rows):
        log(line)
