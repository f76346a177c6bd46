"""What registers cost a ViT encoder: none, trained, test-time, recursive test-time, and the baselines.

For each encoder (ViT-B/16 at 256 px and So400M/14 at 224 px, SigLIP layout: 256 patch
tokens, no CLS) one forward pass (``forward_features``, inference mode) per provider:

- ``plain`` (the baseline): the encoder as it is;
- ``extra_token``: the encoder with one zero token appended and nothing redirected: what
  one more token costs by itself (on a CPU, GEMM tiling makes 257 rows cost more than
  256/257 of 256 rows), the floor test-time registers are measured against;
- ``trained_registers``: the same encoder with 4 trained register tokens (DINOv2's
  layout: ``reg_tokens=4``), 4 more tokens;
- ``ttr``: one test-time register, one round of register neurons, redirected by the
  fused ``ttr_activation`` in the selected layers' MLPs;
- ``ttr_recursive``: one test-time register, the neurons of two rounds (DSR's recursive
  test-time registers);
- ``ttr_hooks``, ``ttr_recursive_hooks``: the same interventions done the released
  way, Python forward hooks editing the MLP activation in several passes;
- ``outlier_key_mask``: the masking baseline (keys whose norm exceeds 100 are not
  attended; the norms come from the fused norm pass).

And the MLP activation alone (shape ``<encoder>:mlp_act``, the block with the most
register neurons, [B, tokens, hidden]): ``act_gelu`` (``F.gelu`` over the patches, the
baseline), ``act_gelu_extra_token`` (``F.gelu`` over patches + one token),
``act_ttr_fused`` (``ttr_activation`` over patches + the register) and ``act_ttr_hooks``
(``F.gelu`` then the released hook's edits).

The neuron sets follow the released SigLIP2 ones in size and spread (ViT-B: 50 neurons
in blocks 1-5, 2/3/10/16/19, then 22 more in blocks 6-11; So400M: 50 in blocks 0-9,
28 of them in block 9, then 22 more in blocks 14-26: 72 in 15 blocks), with random
indices: the weights are random too, and the latency does not depend on which neurons
they are.

Measurement: every provider is warmed up until two successive times agree within 5%;
then the repeats are interleaved (one call of each provider per round, in a shuffled
order), so that drift hits all alike. Each row gives the median and p20/p80 time; the
overhead against ``plain`` is the median of the per-round ratios, with their p20/p80;
a row whose p20-p80 of ratios contains 1 is "within noise".
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dsr_kernels.benchmark.common import environment, format_table, interleaved_times, ratio_summary, summarize
from dsr_kernels.models import create_model, flops
from dsr_kernels.models.vit import TestTimeRegisterSettings
from dsr_kernels.registers import (
    apply_outlier_key_mask,
    apply_test_time_registers,
    apply_test_time_registers_with_hooks,
)

BASELINE = "plain"
MODES = ("fwd",)
PROVIDERS = (
    "plain",
    "extra_token",
    "trained_registers",
    "ttr",
    "ttr_recursive",
    "ttr_hooks",
    "ttr_recursive_hooks",
    "outlier_key_mask",
)
# Neurons per block: (round 1, round 2) in the released SigLIP2 sets' sizes and spread.
NEURON_LAYOUT = {
    "vit_base_patch16_siglip_256": (
        {1: 2, 2: 3, 3: 10, 4: 16, 5: 19},
        {6: 4, 7: 4, 8: 4, 9: 4, 10: 3, 11: 3},
    ),
    "vit_so400m_patch14_siglip_224": (
        {0: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 3, 7: 2, 8: 2, 9: 28},
        {14: 3, 17: 3, 20: 3, 24: 4, 25: 4, 26: 5},
    ),
}
MASK_THRESHOLD = 100.0


@dataclass(frozen=True)
class EncoderShape:
    name: str  # a create_model name with a NEURON_LAYOUT entry
    B: int


def default_shapes(device: torch.device) -> list[EncoderShape]:
    batch = 64 if device.type == "cuda" else 1
    return [EncoderShape("vit_base_patch16_siglip_256", batch), EncoderShape("vit_so400m_patch14_siglip_224", batch)]


def available_providers(device: torch.device) -> list[str]:
    return list(PROVIDERS)


def neuron_sets(name: str, width: int, seed: int = 0) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(round 1, rounds 1 and 2 merged) as {block: [neurons]}, random indices in the released sizes."""
    g = torch.Generator().manual_seed(seed)
    first, second = NEURON_LAYOUT[name]
    round1 = {layer: torch.randperm(width, generator=g)[:n].tolist() for layer, n in first.items()}
    merged = dict(round1)
    for layer, n in second.items():
        merged[layer] = torch.randperm(width, generator=g)[:n].tolist()
    return round1, merged


def _count(neurons: dict[int, list[int]]) -> int:
    return sum(len(v) for v in neurons.values())


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[EncoderShape] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    repeats: int | None = None,
    memory: bool = False,
    budget_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    """Rows for every encoder x provider. ``repeats``: interleaved rounds (default from ``budget_s``:
    about budget_s x 30 seconds of measurement per encoder). ``memory`` is ignored."""
    shapes = list(shapes or default_shapes(device))
    providers = list(providers or available_providers(device))
    if BASELINE not in providers:
        providers = [BASELINE] + providers
    rows: list[dict] = []
    for shape in shapes:
        rows += _encoder_rows(shape, device, dtype, providers, repeats, budget_s, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return environment(device), rows


def _encoder_rows(shape, device, dtype, providers, repeats, budget_s, log) -> list[dict]:
    """Every provider on one encoder, interleaved, then the MLP activation alone."""
    rows: list[dict] = []
    with torch.device(device):
        model = create_model(shape.name).eval()
        with_regs = create_model(shape.name, reg_tokens=4, no_embed_class=True).eval()
    with_regs.load_state_dict({**with_regs.state_dict(), **model.state_dict()})
    if dtype != torch.float32:
        model, with_regs = model.to(dtype), with_regs.to(dtype)
    round1, merged = neuron_sets(shape.name, model.mlp_hidden)
    x = torch.randn(shape.B, 3, model.img_size, model.img_size, device=device, dtype=dtype)
    tokens = model.patch_embed.num_patches

    def forward(m):
        with torch.inference_mode():
            return m.forward_features(x)

    # (model, how to switch it to the provider's state): the switch is not timed.
    appliers = {
        "plain": (model, nullcontext),
        "extra_token": (model, lambda: _extra_token(model)),
        "trained_registers": (with_regs, nullcontext),
        "ttr": (model, lambda: apply_test_time_registers(model, round1)),
        "ttr_recursive": (model, lambda: apply_test_time_registers(model, merged)),
        "ttr_hooks": (model, lambda: apply_test_time_registers_with_hooks(model, round1)),
        "ttr_recursive_hooks": (model, lambda: apply_test_time_registers_with_hooks(model, merged)),
        "outlier_key_mask": (model, lambda: apply_outlier_key_mask(model, MASK_THRESHOLD)),
    }
    extra_tokens = {"extra_token": 1, "trained_registers": 4}
    extra_tokens.update({name: 1 for name in ("ttr", "ttr_recursive", "ttr_hooks", "ttr_recursive_hooks")})
    neurons = {"ttr": round1, "ttr_hooks": round1, "ttr_recursive": merged, "ttr_recursive_hooks": merged}
    fns = {name: (appliers[name][1], lambda m=appliers[name][0]: forward(m)) for name in providers if name in appliers}
    for name in providers:
        if name not in appliers:
            rows.append({"op": "encoder", "shape": shape.name, "provider": name, "error": "unknown provider"})
    base_flops = flops(model, batch_size=shape.B).flops
    one_call_ms = _estimate_ms(fns[BASELINE][1], device)
    reps = repeats or max(5, min(40, int(budget_s * 30_000 / max(one_call_ms * len(fns), 1e-3))))
    log(
        f"{shape.name}: B={shape.B}, {len(fns)} providers x {reps} interleaved rounds "
        f"(about {one_call_ms * len(fns) * reps / 1e3:.0f} s)"
    )
    times, warm = interleaved_times(fns, device, repeats=reps, rng=random.Random(0))
    for name, ts in times.items():
        T = tokens + model.num_prefix_tokens + extra_tokens.get(name, 0)
        row = {
            "op": "encoder",
            "shape": shape.name,
            "B": shape.B,
            "dtype": str(dtype).replace("torch.", ""),
            "provider": name,
            "mode": "fwd",
            "tokens": T,
            "token_overhead_pct": 100.0 * (T / tokens - 1),
            "register_neurons": _count(neurons.get(name, {})),
            "warmup_calls": warm[name],
            **summarize(ts),
        }
        if name in neurons or name == "extra_token":
            with appliers[name][1]():
                row["flop_overhead_pct"] = 100.0 * (flops(model, batch_size=shape.B).flops / base_flops - 1)
        elif name == "trained_registers":
            row["flop_overhead_pct"] = 100.0 * (flops(with_regs, batch_size=shape.B).flops / base_flops - 1)
        else:
            row["flop_overhead_pct"] = 0.0
        row["spread_pct"] = 100.0 * (row["p80_ms"] - row["p20_ms"]) / row["median_ms"]
        if name != BASELINE:
            r = ratio_summary(ts, times[BASELINE])
            row["latency_overhead_pct"] = 100.0 * (r["median"] - 1)
            row["overhead_p20_pct"] = 100.0 * (r["p20"] - 1)
            row["overhead_p80_pct"] = 100.0 * (r["p80"] - 1)
            row["within_noise"] = r["p20"] <= 1.0 <= r["p80"]
        if name in neurons and "extra_token" in times:  # what the redirection adds to the token itself
            r = ratio_summary(ts, times["extra_token"])
            row["vs_extra_token_pct"] = 100.0 * (r["median"] - 1)
            row["vs_extra_token_p20_pct"] = 100.0 * (r["p20"] - 1)
            row["vs_extra_token_p80_pct"] = 100.0 * (r["p80"] - 1)
        hooks = {"ttr": "ttr_hooks", "ttr_recursive": "ttr_recursive_hooks"}.get(name)
        if hooks in times:  # the released way against the fused op, paired by round
            r = ratio_summary(times[hooks], ts)
            row["hooks_vs_fused_pct"] = 100.0 * (r["median"] - 1)
            row["hooks_vs_fused_p20_pct"] = 100.0 * (r["p20"] - 1)
            row["hooks_vs_fused_p80_pct"] = 100.0 * (r["p80"] - 1)
        rows.append(row)
        log(format_table([row], _COLUMNS).splitlines()[1])
    return rows + _activation_rows(shape, model, round1, device, dtype, reps, log)


def _activation_rows(shape, model, round1, device, dtype, reps, log) -> list[dict]:
    """The MLP activation alone, at the layer with the most register neurons: plain GELU over
    the patches, the fused op over patches + 1 register, and GELU + the released hook."""
    from dsr_kernels.ops.ttr_activation import _resolve_backend, _ttr_activation
    from dsr_kernels.registers.apply import _released_hook

    layer = max(round1, key=lambda k: len(round1[k]))
    idx = torch.tensor(round1[layer], device=device)
    N, F = model.patch_embed.num_patches + model.num_prefix_tokens, model.mlp_hidden
    h_plain = torch.randn(shape.B, N, F, device=device, dtype=dtype)
    h = torch.randn(shape.B, N + 1, F, device=device, dtype=dtype)
    backend = _resolve_backend("ttr_activation", "auto", h)
    hook = _released_hook(idx, 1, model.num_prefix_tokens, "zero", "signed_max")
    kw = dict(
        num_registers=1,
        num_prefix_tokens=model.num_prefix_tokens,
        patch_values="zero",
        register_value="signed_max",
        approximate="none",
    )
    fns = {
        "act_gelu": lambda: torch.nn.functional.gelu(h_plain),
        "act_gelu_extra_token": lambda: torch.nn.functional.gelu(h),
        "act_ttr_fused": lambda: _ttr_activation(h, idx, backend=backend, **kw),
        "act_ttr_hooks": lambda: hook(None, None, torch.nn.functional.gelu(h)),
    }
    with torch.inference_mode():  # as the encoder runs it (no autograd dispatch in the way)
        times, warm = interleaved_times(fns, device, repeats=max(20, 4 * reps), rng=random.Random(1))
    rows = []
    for name, ts in times.items():
        row = {
            "op": "encoder",
            "shape": f"{shape.name}:mlp_act",
            "B": shape.B,
            "dtype": str(dtype).replace("torch.", ""),
            "provider": name,
            "mode": "fwd",
            "tokens": N + (name != "act_gelu"),
            "token_overhead_pct": 100.0 * (1 / N if name != "act_gelu" else 0.0),
            "register_neurons": int(idx.numel()) if name.startswith("act_ttr") else 0,
            "backend": backend if name == "act_ttr_fused" else "aten",
            "warmup_calls": warm[name],
            **summarize(ts),
        }
        if name != "act_gelu":
            r = ratio_summary(ts, times["act_gelu"])
            row["latency_overhead_pct"] = 100.0 * (r["median"] - 1)
            row["overhead_p20_pct"] = 100.0 * (r["p20"] - 1)
            row["overhead_p80_pct"] = 100.0 * (r["p80"] - 1)
            row["within_noise"] = r["p20"] <= 1.0 <= r["p80"]
        if name in ("act_ttr_fused", "act_ttr_hooks"):
            r = ratio_summary(ts, times["act_gelu_extra_token"])
            row["vs_extra_token_pct"] = 100.0 * (r["median"] - 1)
            row["vs_extra_token_p20_pct"] = 100.0 * (r["p20"] - 1)
            row["vs_extra_token_p80_pct"] = 100.0 * (r["p80"] - 1)
        rows.append(row)
        log(format_table([row], _COLUMNS).splitlines()[1])
    return rows


@contextlib.contextmanager
def _extra_token(model):
    """One test-time register token, no neuron redirected."""
    model.set_test_time_registers(TestTimeRegisterSettings(num_registers=1), {})
    try:
        yield
    finally:
        model.set_test_time_registers(None)


def _estimate_ms(fn: Callable[[], object], device: torch.device) -> float:
    import time

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


_COLUMNS = (
    "shape",
    "provider",
    "tokens",
    "register_neurons",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "token_overhead_pct",
    "flop_overhead_pct",
    "latency_overhead_pct",
    "overhead_p20_pct",
    "overhead_p80_pct",
    "within_noise",
    "vs_extra_token_pct",
)


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if "latency_overhead_pct" not in r:
            continue
        span = f"[{r['overhead_p20_pct']:+.1f}%, {r['overhead_p80_pct']:+.1f}%]"
        verdict = "within noise" if r["within_noise"] else f"{r['latency_overhead_pct']:+.1f}%"
        lines.append(
            f"{r['shape']} {r['provider']}: {r['token_overhead_pct']:.2f}% more tokens, latency vs plain "
            f"{verdict} (per-round ratios p20-p80 {span})"
        )
    for r in rows:
        if "vs_extra_token_pct" in r:
            span = f"[{r['vs_extra_token_p20_pct']:+.1f}%, {r['vs_extra_token_p80_pct']:+.1f}%]"
            noise = r["vs_extra_token_p20_pct"] <= 0 <= r["vs_extra_token_p80_pct"]
            verdict = "within noise" if noise else f"{r['vs_extra_token_pct']:+.1f}%"
            lines.append(f"{r['shape']} {r['provider']} against one extra token alone: {verdict} (p20-p80 {span})")
    for r in rows:
        if "hooks_vs_fused_pct" in r:
            span = f"[{r['hooks_vs_fused_p20_pct']:+.1f}%, {r['hooks_vs_fused_p80_pct']:+.1f}%]"
            noise = r["hooks_vs_fused_p20_pct"] <= 0 <= r["hooks_vs_fused_p80_pct"]
            verdict = "within noise" if noise else f"{r['hooks_vs_fused_pct']:+.1f}%"
            lines.append(
                f"{r['shape']} {r['provider']}: the released hooks vs the fused op: {verdict} (p20-p80 {span})"
            )
    return lines


def print_report(env: dict, rows: list[dict], log: Callable[[str], None] = print) -> None:
    log(
        f"\nencoder on {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU threads), "
        f"torch {env['torch']}, {env['date']}; overheads against '{BASELINE}' in the same run"
    )
    log(format_table(rows, _COLUMNS))
    log("")
    for line in targets(rows):
        log(line)
