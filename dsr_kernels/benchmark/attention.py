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

Modes: ``fwd``, ``bwd`` (backward of a retained graph), ``full`` (both). Each row has the
median and p20/p80 time, achieved TFLOP/s (4 B H N (N + R) D forward, 2.5x that
backward), peak memory, and the speed-up over ``torch_sdpa_cat`` from the same run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsr_kernels.benchmark.common import environment, format_table, run_suite
from dsr_kernels.ops.attention import attention

BASELINE = "torch_sdpa_cat"
MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class AttentionShape:
    name: str
    B: int
    H: int
    N: int
    D: int
    R: int

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.B * self.H * self.N * (self.N + self.R) * self.D
        return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def default_shapes(device: torch.device) -> list[AttentionShape]:
    """DSR's DiT-XL (256 tokens + 36 registers, head dim 72), DiT-B, and long sequences."""
    gpu = device.type == "cuda"
    batch = 256 if gpu else 8
    shapes = [
        AttentionShape("dsr-dit-xl", batch, 16, 256, 72, 36),
        AttentionShape("dit-b", batch, 12, 256, 64, 36),
        AttentionShape("n1024", 32 if gpu else 1, 16, 1024, 64, 36),
        AttentionShape("n4096", 4 if gpu else 1, 16, 4096, 64, 36),
    ]
    if gpu:
        shapes.append(AttentionShape("n4096-d128", 4, 16, 4096, 128, 36))
    return shapes


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


def make_inputs(shape: AttentionShape, device: torch.device, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    B, H, N, D, R = shape.B, shape.H, shape.N, shape.D, shape.R
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
    if name == "dsr":
        return lambda: attention(q, k, v, kv_registers=(rk, rv))
    if name == "dsr_stats":
        return lambda: attention(q, k, v, kv_registers=(rk, rv), return_stats=True)[0]
    if name == "dsr_pad":
        from dsr_kernels.triton import attention as triton_attention

        def padded():
            saved, triton_attention.HEAD_SPLIT = triton_attention.HEAD_SPLIT, "pad"
            try:
                return attention(q, k, v, kv_registers=(rk, rv), backend="triton")
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
        return lambda: torch.autograd.grad(fwd(), inputs, dout)
    out = fwd()
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[AttentionShape] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    memory: bool = True,
    budget_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    """Measures every provider x mode x shape; returns (environment, rows)."""
    rows = run_suite(
        op="attention",
        device=device,
        dtype=dtype,
        shapes=list(shapes or default_shapes(device)),
        providers=list(providers or available_providers(device)),
        modes=modes,
        baseline=BASELINE,
        make_inputs=make_inputs,
        mode_fn=mode_fn,
        work=lambda shape, mode: {"flops": shape.flops(mode)},
        memory=memory,
        budget_s=budget_s,
        log=log,
        columns=_COLUMNS,
    )
    return environment(device), rows


_COLUMNS = (
    "shape",
    "mode",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "tflops",
    "peak_mem_mb",
    "speedup_vs_baseline",
    "error",
)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as measured ratios of medians and peaks (reported, never asserted)."""
    by = {(r["shape"], r["mode"], r["provider"]): r for r in rows if "median_ms" in r}
    lines = []
    for (shape, mode, provider), r in sorted(by.items()):
        if provider != "dsr_stats" or mode == "bwd":  # statistics do not change the backward
            continue
        parts = [f"{shape} {mode}: dsr_stats time / "]
        for other in ("eager_stats", BASELINE, "dsr"):
            o = by.get((shape, mode, other))
            if o:
                parts.append(f"{other} {r['median_ms'] / o['median_ms']:.2f}x;")
        eager = by.get((shape, mode, "eager_stats"))
        if eager and r.get("peak_mem_mb") and eager.get("peak_mem_mb"):
            parts.append(f"peak memory eager_stats / dsr_stats {eager['peak_mem_mb'] / r['peak_mem_mb']:.1f}x")
        lines.append(" ".join(parts))
    return lines


def print_report(env: dict, rows: list[dict], log: Callable[[str], None] = print) -> None:
    log(
        f"\nattention on {env['device_name']} ({env['device']}), torch {env['torch']}, triton {env['triton']}, "
        f"{env['date']}"
    )
    log(format_table(rows, _COLUMNS))
    log("")
    for line in targets(rows):
        log(line)
