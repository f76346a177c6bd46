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

Measurement (:func:`dsr_kernels.benchmark.common.time_interleaved`): every provider is
warmed up until two successive times agree within 5%; then the repeats are interleaved
(one call of each provider per round, in a shuffled order), so that drift hits all
alike. Each row gives the median and p20/p80 time; the overhead against ``plain`` is
the median of the per-round ratios, with their p20/p80; a row whose p20-p80 of ratios
contains 1 is "within noise".
"""

from __future__ import annotations

import contextlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.common import ratio_of
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, compute_seconds, estimate_s
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
QUICK_PROVIDERS = ("plain", "extra_token", "trained_registers", "ttr", "ttr_recursive")


@dataclass(frozen=True)
class EncoderShape:
    name: str  # a create_model name with a NEURON_LAYOUT entry
    B: int


def all_shapes(device: torch.device) -> list[EncoderShape]:
    batch = 64 if device.type == "cuda" else 1
    return [EncoderShape("vit_base_patch16_siglip_256", batch), EncoderShape("vit_so400m_patch14_siglip_224", batch)]


def default_shapes(device: torch.device) -> list[EncoderShape]:
    """ViT-B on a CPU (So400M takes seconds per call there), both encoders on a GPU."""
    shapes = all_shapes(device)
    return shapes if device.type == "cuda" else shapes[:1]


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


class EncoderSection(Section):
    """ViT encoders: no, trained, test-time and recursive test-time registers; the hook and masking baselines."""

    def providers(self, device: torch.device) -> list[str]:
        return list(PROVIDERS)

    def shapes(self, device: torch.device) -> list[EncoderShape]:
        return all_shapes(device)

    def cases(self, cfg: BenchConfig) -> list[Case]:
        shapes = all_shapes(cfg.device) if cfg.preset == "full" else default_shapes(cfg.device)
        if self.selects_nothing(cfg):
            return []
        if cfg.shapes is not None:
            shapes = [s for s in all_shapes(cfg.device) if s.name in cfg.shapes]
        providers = self.my_providers(cfg)
        self.notes = []
        if cfg.shapes is None and len(shapes) < len(all_shapes(cfg.device)):
            self.notes.append("vit_so400m_patch14_siglip_224 runs with --full (or --shapes)")
        if cfg.providers is None and cfg.preset == "quick":
            providers = [p for p in providers if p in QUICK_PROVIDERS]
            self.notes.append(
                f"providers {', '.join(p for p in PROVIDERS if p not in QUICK_PROVIDERS)} run without --quick"
            )
        cases = []
        for shape in shapes:
            with torch.device("meta"):
                count = flops(create_model(shape.name), batch_size=shape.B).flops
            round_s = len(providers) * compute_seconds(cfg, count)
            cases.append(
                Case(
                    "encoder",
                    f"encoder {shape.name}",
                    lambda shape=shape: _encoder_rows(shape, providers, cfg),
                    estimate_s(cfg, round_s, budget_s=3 * cfg.budget_s),
                )
            )
            if cfg.preset != "quick" and any(p.startswith("ttr") for p in providers):
                cases.append(
                    Case(
                        "encoder",
                        f"encoder {shape.name} MLP activation alone",
                        lambda shape=shape: _activation_rows(shape, cfg),
                        estimate_s(cfg, 0.05),
                    )
                )
        return cases

    def cells(self, r: dict) -> dict[str, str]:
        return {
            "encoder": r["shape"],
            "provider": r["provider"],
            "tokens": str(r.get("tokens", "")),
            "neurons": str(r.get("register_neurons", "")),
            "ms [p20, p80]": report.ms_cell(r),
            "tokens vs plain": f"+{r['token_overhead_pct']:.2f}%" if r.get("token_overhead_pct") else "",
            "FLOPs vs plain": f"+{r['flop_overhead_pct']:.2f}%" if r.get("flop_overhead_pct") else "",
            "latency vs plain": report.overhead_cell(r, "latency_overhead"),
            "vs one extra token": report.overhead_cell(r, "vs_extra_token"),
        }

    def table_title(self, rows: list[dict], env: dict) -> str:
        return (
            f"encoder ({env.get('dtype')}, forward_features, inference mode): median ms [p20, p80]; overheads "
            f"against '{BASELINE}' (the act_* rows: against act_gelu) in the same run, p20-p80 of per-round ratios"
        )

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        names = {
            "trained_registers": "4 trained registers",
            "ttr": "test-time registers (1 token)",
            "ttr_recursive": "recursive test-time registers (1 token, 2 rounds of neurons)",
            "ttr_hooks": "test-time registers done with the released hooks",
            "ttr_recursive_hooks": "recursive test-time registers done with the released hooks",
            "outlier_key_mask": "masking outlier keys",
            "extra_token": "one extra token alone",
        }
        lines = []
        for r in rows:
            if r.get("latency_overhead_pct") is None or r["provider"] not in names:
                continue
            what = f"{r['shape']}, {names[r['provider']]}: {r['token_overhead_pct']:.2f}% more tokens"
            lines.append(report.latency_cost_line(what, r, env))
        for r in rows:
            if r.get("hooks_vs_fused_pct") is not None:
                clause = report.overhead_clause(r, "hooks_vs_fused")
                lines.append(f"{r['shape']}: the released hooks' latency over the fused {r['provider']}: {clause}.")
        return lines

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        ok = [r for r in rows if r.get("latency_overhead_pct") is not None and ":" not in r["shape"]]
        if not ok:
            return []
        # per encoder, a latency bar next to a tokens bar (no p20-p80: a count) for each provider
        bars = [(r, kind) for shape in dict.fromkeys(r["shape"] for r in ok) for kind in ("latency", "tokens")
                for r in ok if r["shape"] == shape]  # fmt: skip
        return [
            plots.row_bars(
                folder / "encoder-overhead.png",
                bars,
                group=lambda bar: bar[0]["provider"],
                series=lambda bar: f"{bar[0]['shape']} {bar[1]}",
                value=lambda bar: (
                    ratio_of(bar[0], "latency_overhead")
                    if bar[1] == "latency"
                    else (bar[0]["token_overhead_pct"], None, None)
                ),
                ylabel=f"% over {BASELINE}",
                reference=0.0,
                suptitle=plots.title("encoder", "register overhead: latency vs tokens", env),
            )
        ]


def _encoder_rows(shape: EncoderShape, providers, cfg: BenchConfig) -> list[dict]:
    """Every provider on one encoder, interleaved."""
    device, dtype = cfg.device, cfg.dtype
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
    base_flops = flops(model, batch_size=shape.B).flops
    rows = {}
    for name in providers:
        T = tokens + model.num_prefix_tokens + extra_tokens.get(name, 0)
        rows[name] = {
            "section": "encoder",
            "shape": shape.name,
            "B": shape.B,
            "dtype": str(dtype).replace("torch.", ""),
            "provider": name,
            "mode": "fwd",
            "tokens": T,
            "token_overhead_pct": 100.0 * (T / tokens - 1),
            "register_neurons": _count(neurons.get(name, {})),
        }

    def ratios(name) -> dict:
        out = {}
        if name in neurons:  # what the redirection adds to the token itself
            out["vs_extra_token"] = (name, "extra_token")
        hooks = {"ttr": "ttr_hooks", "ttr_recursive": "ttr_recursive_hooks"}.get(name)
        if hooks:  # the released way against the fused op, paired by round
            out["hooks_vs_fused"] = (hooks, name)
        return out

    def fields(name, row, times) -> dict:
        if name in neurons or name == "extra_token":
            with appliers[name][1]():
                return {"flop_overhead_pct": 100.0 * (flops(model, batch_size=shape.B).flops / base_flops - 1)}
        if name == "trained_registers":
            return {"flop_overhead_pct": 100.0 * (flops(with_regs, batch_size=shape.B).flops / base_flops - 1)}
        return {"flop_overhead_pct": 0.0}

    return measure(
        rows,
        lambda name: (appliers[name][1], lambda m=appliers[name][0]: forward(m)),
        cfg,
        baseline=lambda name: BASELINE,
        versus="latency_overhead",
        ratios=ratios,
        fields=fields,
        budget_s=3 * cfg.budget_s,
    )


def _activation_rows(shape: EncoderShape, cfg: BenchConfig) -> list[dict]:
    """The MLP activation alone, at the layer with the most register neurons: plain GELU over
    the patches, the fused op over patches + 1 register, and GELU + the released hook."""
    from dsr_kernels.backends import resolve
    from dsr_kernels.ops.ttr_activation import ttr_activation_op
    from dsr_kernels.registers.apply import released_hook

    device, dtype = cfg.device, cfg.dtype
    with torch.device("meta"):
        model = create_model(shape.name)
    round1, _ = neuron_sets(shape.name, model.mlp_hidden)
    layer = max(round1, key=lambda k: len(round1[k]))
    idx = torch.tensor(round1[layer], device=device)
    idx_host = idx.cpu()  # what dsr_kernels.ttr_activation passes the fused op: no device sync per call
    N, F = model.patch_embed.num_patches + model.num_prefix_tokens, model.mlp_hidden
    h_plain = torch.randn(shape.B, N, F, device=device, dtype=dtype)
    h = torch.randn(shape.B, N + 1, F, device=device, dtype=dtype)
    backend = resolve("ttr_activation", "auto", h)
    hook = released_hook(idx, 1, model.num_prefix_tokens, "zero", "signed_max")
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
        "act_ttr_fused": lambda: ttr_activation_op(h, idx_host, backend=backend, **kw),
        "act_ttr_hooks": lambda: hook(None, None, torch.nn.functional.gelu(h)),
    }
    rows = {
        name: {
            "section": "encoder",
            "shape": f"{shape.name}:mlp_act",
            "B": shape.B,
            "dtype": str(dtype).replace("torch.", ""),
            "provider": name,
            "mode": "fwd",
            "tokens": N + (name != "act_gelu"),
            "token_overhead_pct": 100.0 * (1 / N if name != "act_gelu" else 0.0),
            "register_neurons": int(idx.numel()) if name.startswith("act_ttr") else 0,
            "backend": backend if name == "act_ttr_fused" else "aten",
        }
        for name in fns
    }
    fused = ("act_ttr_fused", "act_ttr_hooks")
    return measure(
        rows,
        fns.__getitem__,
        cfg,
        baseline=lambda name: "act_gelu",
        versus="latency_overhead",
        ratios=lambda name: {"vs_extra_token": (name, "act_gelu_extra_token")} if name in fused else {},
        min_reps=20,
        seed=1,
        context=torch.inference_mode,  # as the encoder runs it (no autograd dispatch in the way)
    )


@contextlib.contextmanager
def _extra_token(model):
    """One test-time register token, no neuron redirected."""
    model.set_test_time_registers(TestTimeRegisterSettings(num_registers=1), {})
    try:
        yield
    finally:
        model.set_test_time_registers(None)


SECTION = EncoderSection(name="encoder", title="ViT encoders with registers", baseline=BASELINE, mode_names=MODES)
