"""Section 1 of the bench: does every backend that can run here give the reference's answer?

For each op (attention, norm_modulate, ttr_activation) and each of its backends on the
device: small random inputs of awkward sizes (37 tokens, head dim 72, 5 registers), the
backend's output against the float64 reference, with the tolerance the tests use: at
most twice the error of the same computation done eagerly at the run's dtype, plus a
small atol. A backend that cannot run here is listed with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsr_kernels.backends import OPS, explain
from dsr_kernels.benchmark import report
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table

_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _attention(dtype, device, g) -> tuple[Callable[[str], object], Callable[[torch.dtype], object]]:
    from dsr_kernels.ops.attention import attention
    from dsr_kernels.reference.attention import attention_ref

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    tensors = rand(2, 3, 37, 72), rand(2, 3, 37, 72), rand(2, 3, 37, 72), rand(3, 5, 72), rand(3, 5, 72)

    def inputs():
        q, k, v, rk, rv = (t.to(device=device, dtype=dtype) for t in tensors)
        return (q, k, v), {"kv_registers": (rk, rv)}

    def run(backend):
        args, kwargs = inputs()
        out, stats = attention(*args, **kwargs, return_stats=True, backend=backend)
        return out, stats.lse, stats.register_share

    def ref(compute):
        args, kwargs = inputs()
        out, stats = attention_ref(*args, **kwargs, compute_dtype=compute)
        return out, stats.lse, stats.register_share

    return run, ref


def _norm_modulate(dtype, device, g):
    from dsr_kernels.ops.norm_modulate import norm_modulate
    from dsr_kernels.reference.norm_modulate import norm_modulate_ref

    def rand(*s, std=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    x, shift, scale, regs = rand(2, 37, 80), rand(2, 80, std=0.1), rand(2, 80, std=0.1), rand(3, 80)

    def run(backend):
        r = norm_modulate(x, shift, scale, registers=regs, return_norms=True, backend=backend)
        return r.out, r.residual, r.norms

    def ref(compute):
        r = norm_modulate_ref(x, shift, scale, registers=regs, return_norms=True, compute_dtype=compute)
        return r.out, r.residual, r.norms

    return run, ref


def _ttr_activation(dtype, device, g):
    from dsr_kernels.ops.ttr_activation import ttr_activation
    from dsr_kernels.reference.ttr_activation import ttr_activation_ref

    h = (torch.randn(2, 38, 96, generator=g, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    neurons = torch.tensor([3, 17, 50], device=device)

    def run(backend):
        return (ttr_activation(h, neurons, num_prefix_tokens=1, backend=backend),)

    def ref(compute):
        return (ttr_activation_ref(h, neurons, num_prefix_tokens=1, compute_dtype=compute),)

    return run, ref


_BUILDERS = {"attention": _attention, "norm_modulate": _norm_modulate, "ttr_activation": _ttr_activation}
assert set(_BUILDERS) == set(OPS), "every op with backends needs a self-check"


def _max_error(outs, ref) -> float:
    return max(float((o.double() - r.double()).abs().max()) for o, r in zip(outs, ref, strict=True))


def check_op(op: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per backend of ``op``: pass / FAIL / unavailable (with the reason)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    run, ref = _BUILDERS[op](dtype, device, g)
    exact = ref(torch.float64)
    eager_error = _max_error(ref(dtype), exact)
    tol = 2 * eager_error + _ATOL.get(dtype, 1e-5)
    for backend, reason in explain(op, device, dtype).items():
        row = {
            "section": "selfcheck",
            "shape": op,
            "op": op,
            "provider": backend,
            "dtype": str(dtype).replace("torch.", ""),
        }
        if reason != "available":
            rows.append({**row, "status": "unavailable", "reason": reason})
            continue
        try:
            err = _max_error(run(backend), exact)
        except Exception as exc:  # a backend that says it is available and then fails is a failure
            rows.append({**row, "status": "FAIL", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
            continue
        rows.append(
            {
                **row,
                "status": "pass" if err <= tol else "FAIL",
                "max_error": err,
                "eager_error": eager_error,
                "tolerance": tol,
            }
        )
    return rows


class SelfCheckSection(Section):
    """Each available backend of each op against the float64 reference, before anything is timed."""

    def providers(self, device: torch.device) -> list[str]:
        return []  # not chosen by --providers: the self-check runs every backend of every op

    def all_providers(self) -> list[str]:
        return []

    def shape_names(self) -> list[str]:
        return list(OPS)

    def cases(self, cfg: BenchConfig) -> list[Case]:
        # every op, unless --shapes names some of them (other sections' shape names leave it whole)
        ops = [op for op in OPS if op in (self.my_shapes(cfg) or OPS)]
        return [
            Case("selfcheck", f"self-check {op}", lambda op=op: check_op(op, cfg.device, cfg.dtype), 1.0) for op in ops
        ]

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        display = [
            {
                "op": r["op"],
                "backend": r["provider"],
                "result": r["status"],
                "max error": f"{r['max_error']:.2e}" if "max_error" in r else "",
                "tolerance": f"{r['tolerance']:.2e}" if "tolerance" in r else "",
                "why not / error": r.get("reason") or r.get("error") or "",
            }
            for r in rows
        ]
        title = (
            f"self-check ({env.get('dtype')}): each backend against the float64 reference; tolerance = 2x the error "
            "of the eager computation at this dtype + atol"
        )
        return report.table(title, display)

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        passed = [f"{r['op']}[{r['provider']}]" for r in rows if r.get("status") == "pass"]
        failed = [f"{r['op']}[{r['provider']}]" for r in rows if r.get("status") == "FAIL"]
        missing = sum(1 for r in rows if r.get("status") == "unavailable")
        line = f"Self-check: {len(passed)} backends match the reference"
        line += f"; {len(failed)} FAILED: {', '.join(failed)}" if failed else ""
        line += f"; {missing} not available here (reasons in the table)." if missing else "."
        return [line]


SECTION = SelfCheckSection(name="selfcheck", title="self-check against the reference", baseline="reference")
