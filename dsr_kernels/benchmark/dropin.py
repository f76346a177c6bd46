"""What the drop-in surfaces cost on top of the op, and the fused attention inside diffusers.

Shapes:

- ``dsr-dit-xl`` (DSR's DiT-XL attention: B 2 on CPU / 64 on GPU, H 16, N 256, D 72): the
  same q, k, v through ``dsr_kernels.attention`` (the baseline), the
  ``scaled_dot_product_attention`` drop-in and the ``flash_attn_func`` drop-in (on
  [B, N, H, D] views of the same memory). Target: each drop-in at most 1.05x the op.
- ``diffusers-dit-xl-4l`` (default) and ``diffusers-dit-xl`` (``--full``): diffusers'
  ``DiTTransformer2DModel`` at DiT-XL/2's width (16 heads of 72, 256 tokens of a 32 x 32
  latent) with 4 or all 28 layers, random weights, batch 1 on CPU / 32 on GPU:
  ``diffusers_native`` (its default attention processors, PyTorch's SDPA: the baseline)
  against ``diffusers_dsr`` (the same model after ``dsr_kernels.patch``, no registers).
  Target: at most 1.05x. Needs diffusers; without it the case says so.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from dsr_kernels.benchmark import plots, report
from dsr_kernels.benchmark.measure import measure
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, compute_seconds, estimate_s

OP_BASELINE = "attention"
MODEL_BASELINE = "diffusers_native"
OP_PROVIDERS = (OP_BASELINE, "sdpa_dropin", "flash_dropin")
MODEL_PROVIDERS = (MODEL_BASELINE, "diffusers_dsr")
MODES = ("fwd", "full")


@dataclass(frozen=True)
class DropinShape:
    name: str
    B: int
    H: int
    N: int
    D: int
    layers: int = 0  # > 0: a diffusers DiT of that depth

    @property
    def is_model(self) -> bool:
        return self.layers > 0

    def describe(self) -> str:
        what = f"B {self.B}, H {self.H}, N {self.N}, D {self.D}"
        return what + (f", diffusers DiT, {self.layers} layers" if self.is_model else "")


def all_shapes(device: torch.device) -> list[DropinShape]:
    gpu = device.type == "cuda"
    return [
        DropinShape("dsr-dit-xl", 64 if gpu else 2, 16, 256, 72),
        DropinShape("diffusers-dit-xl-4l", 32 if gpu else 1, 16, 256, 72, layers=4),
        DropinShape("diffusers-dit-xl", 32 if gpu else 1, 16, 256, 72, layers=28),
    ]


def _op_fns(shape: DropinShape, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    import dsr_kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape.B, shape.N, shape.H, shape.D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)
    )  # [B, H, N, D] views of [B, N, H, D] memory, as a qkv projection gives them
    if mode == "full":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    calls = {
        OP_BASELINE: lambda: dsr_kernels.attention(q, k, v),
        "sdpa_dropin": lambda: dsr_kernels.scaled_dot_product_attention(q, k, v),
        "flash_dropin": lambda: dsr_kernels.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    }
    if mode == "fwd":
        return calls
    dout = torch.randn(shape.B, shape.N, shape.H, shape.D, generator=g).to(device, dtype)

    def full(fn, transposed):
        return lambda: torch.autograd.grad(fn(), (q, k, v), dout if transposed else dout.transpose(1, 2))

    return {name: full(fn, name == "flash_dropin") for name, fn in calls.items()}


def _model_fns(shape: DropinShape, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import DiTTransformer2DModel

    import dsr_kernels

    torch.manual_seed(0)
    native = DiTTransformer2DModel(
        num_attention_heads=shape.H, attention_head_dim=shape.D, in_channels=4, num_layers=shape.layers,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    ).to(device)  # fmt: skip
    if dtype != torch.float32:  # (diffusers warns about any .to(dtype), float32 included)
        native = native.to(dtype)
    fused = copy.deepcopy(native)
    dsr_kernels.patch(fused)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.B, 4, 32, 32, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (shape.B,), generator=g).to(device)
    y = torch.randint(0, 1000, (shape.B,), generator=g).to(device)
    models = {MODEL_BASELINE: native.eval(), "diffusers_dsr": fused.eval()}

    def fn(model):
        if mode == "fwd":

            def forward():
                with torch.no_grad():
                    return model(x, timestep=t, class_labels=y).sample

            return forward
        params = [p for p in model.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(model(x, timestep=t, class_labels=y).sample.square().mean(), params)

    return {name: fn(m) for name, m in models.items()}


def _measure(shape: DropinShape, mode: str, providers: list[str], cfg: BenchConfig) -> list[dict]:
    baseline = MODEL_BASELINE if shape.is_model else OP_BASELINE
    base = dict(section="dropin", shape=shape.name, B=shape.B, H=shape.H, N=shape.N, D=shape.D, mode=mode,
                layers=shape.layers, dtype=str(cfg.dtype).replace("torch.", ""))  # fmt: skip
    # every provider's callable is built at once (one model, patched and not); a failure is each row's error
    build_all = functools.cache(lambda: (_model_fns if shape.is_model else _op_fns)(shape, mode, cfg.device, cfg.dtype))
    rows = {p: dict(base, provider=p) for p in providers}
    return measure(rows, lambda p: build_all()[p], cfg, baseline=lambda p: baseline, memory=lambda p: True)


class DropinSection(Section):
    """The drop-ins' overhead over the op, and the fused attention in a diffusers DiT."""

    def providers(self, device: torch.device) -> list[str]:
        return list(OP_PROVIDERS + MODEL_PROVIDERS)

    def shapes(self, device: torch.device) -> list[DropinShape]:
        return all_shapes(device)

    def my_providers(self, cfg: BenchConfig) -> list[str]:
        mine = self.providers(cfg.device)
        chosen = mine if cfg.providers is None else [p for p in cfg.providers if p in mine]
        for baseline, group in ((OP_BASELINE, OP_PROVIDERS), (MODEL_BASELINE, MODEL_PROVIDERS)):
            if any(p in group for p in chosen) and baseline not in chosen:
                chosen = [baseline, *chosen]
        return chosen

    def cases(self, cfg: BenchConfig) -> list[Case]:
        if self.selects_nothing(cfg):
            return []
        shapes = all_shapes(cfg.device)
        if cfg.shapes is not None:
            shapes = [s for s in shapes if s.name in cfg.shapes]
        else:
            keep = {"quick": ("dsr-dit-xl",), "default": ("dsr-dit-xl", "diffusers-dit-xl-4l")}
            shapes = [s for s in shapes if cfg.preset == "full" and s.name != "diffusers-dit-xl-4l"
                      or s.name in keep.get(cfg.preset, ())]  # fmt: skip
        modes = self.my_modes(cfg) or {"quick": ("fwd",), "default": ("fwd",), "full": MODES}[cfg.preset]
        self.notes = [] if cfg.preset == "full" or cfg.modes else ["fwd+bwd and the 28-layer DiT run with --full"]
        chosen = self.my_providers(cfg)
        cases = []
        for shape in shapes:
            providers = [p for p in chosen if p in (MODEL_PROVIDERS if shape.is_model else OP_PROVIDERS)]
            if not providers:
                continue
            if shape.is_model and importlib.util.find_spec("diffusers") is None:
                self.notes.append(f"{shape.name}: skipped, diffusers is not installed (pip install diffusers)")
                continue
            flops = 4 * shape.B * shape.H * shape.N * shape.N * shape.D
            if shape.is_model:
                flops = shape.layers * shape.B * shape.N * 24 * (shape.H * shape.D) ** 2
            for mode in modes:
                est = estimate_s(cfg, len(providers) * compute_seconds(cfg, flops=flops * (3 if mode == "full" else 1)))
                cases.append(
                    Case("dropin", f"dropin {shape.name} {mode}",
                         lambda shape=shape, mode=mode, p=providers: _measure(shape, mode, p, cfg), est)
                )  # fmt: skip
        return cases

    def cells(self, r: dict) -> dict[str, str]:
        return {
            "shape": r["shape"],
            "mode": r.get("mode", ""),
            "provider": r["provider"],
            "ms [p20, p80]": report.ms_cell(r),
            "x faster than baseline": report.speedup_cell(r),
            "baseline": r.get("baseline", ""),
        }

    def table_title(self, rows: list[dict], env: dict) -> str:
        shapes = all_shapes(torch.device(env.get("device", "cpu")))
        dims = "; ".join(f"{s.name} = {s.describe()}" for s in shapes if any(r["shape"] == s.name for r in rows))
        return (
            f"drop-ins ({env.get('dtype')}; {dims}): median ms [p20, p80]; speed-up against {OP_BASELINE} "
            f"(the op) or {MODEL_BASELINE} (diffusers' own attention) (>1: faster; target >= 0.95x)"
        )

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        out = []
        for r in rows:
            if r.get("speedup") is None:
                continue
            baseline = MODEL_BASELINE if r["provider"] in MODEL_PROVIDERS else OP_BASELINE
            sentence = report.faster_sentence(r["provider"], r, baseline)
            out.append(f"dropin {r['shape']} {r['mode']} on {report.where(env)}: {sentence}.")
        return out

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        ok = [r for r in rows if r.get("speedup") is not None]
        if not ok:
            return []
        drawn = []  # the title says what the bars are: the diffusers rows need diffusers
        if any(r["provider"] in OP_PROVIDERS for r in ok):
            drawn.append("drop-ins vs the op")
        if any(r["provider"] in MODEL_PROVIDERS for r in ok):
            drawn.append("diffusers dsr vs native")
        suptitle = plots.title("dropin", f"{'; '.join(drawn)} (>1: faster)", env)
        return [
            plots.row_bars(folder / "dropin-speedup.png", ok, ylabel="x faster than the baseline", suptitle=suptitle)
        ]


SECTION = DropinSection(name="dropin", title="drop-ins", baseline=OP_BASELINE, mode_names=MODES)
