"""Quantization reports: what int8 and fp8 would do to each layer's activations, with and without registers.

    rep = dsr_kernels.quant.report(model, batch)  # one forward pass, hooks only
    print(rep.table())
    cmp = dsr_kernels.quant.compare(rep_plain, rep_registers, labels=("plain", "registers"))
    print(cmp.table()); cmp.plot("quant.png")

For every ``nn.Linear`` the report takes its input (and, for models with a ``blocks``
list, the residual stream entering each block), and for every
:class:`~dsr_kernels.RegisterAttention` its q and k as the attention kernel multiplies
them (after ``q_norm`` / ``k_norm`` and RoPE), and gives per tensor (:class:`QuantRow`):

- ``absmax`` and ``absmax / p99.9`` (the 99.9th percentile of |x|, nearest rank): how far
  the largest value stands out from the bulk;
- ``kurtosis``: E[x^4] / E[x^2]^2 about zero (3 for a Gaussian), as
  :class:`dsr_kernels.outliers.LayerRecord`;
- the SQNR, 10 log10(sum x^2 / sum (x - q(x))^2) in dB, of four fake-quantisation round
  trips: int8 per tensor (s = max|x| / 127, q = clamp(round(x / s), -127, 127) s, as
  :func:`dsr_kernels.outliers.int8_sqnr_db`), int8 per token (the same with one scale
  per row: a token of a linear input, a (token, head) of q or k), and fp8 e4m3 / e5m2 per
  tensor (s = max|x| / the format's largest finite value, 448 / 57344, then a cast
  through ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``); and, for int8 per tensor, the
  median token's own SQNR under that one scale (``int8_tensor_median_db``): the global
  SQNR is an energy ratio that the few largest tokens dominate, so a tensor whose outlier
  tokens set the scale can score well while its typical token loses most of its bits;
- for attention only: the SQNR of the attention *output* softmax(q k^T s) v when q and k
  are int8 per token (SageAttention's first step; v and the softmax exact, float64),
  against the exact output, without and with k's mean over the keys subtracted first
  (SageAttention's smoothing: exact for the softmax, which is shift-invariant per query).
  kv registers join the keys; masks and sinks are not applied.

Everything is computed in one forward pass under ``torch.no_grad`` by hooks (forward
pre-hooks on the linears, forward hooks on the qkv projections): the model's files are
not touched. The report holds one float32 copy of every linear input of that pass until
it is reduced, so give it a small batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from dsr_kernels.modules.attention import RegisterAttention
from dsr_kernels.rope import apply_rope

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
PERCENTILE = 0.999

# ----------------------------------------------------------------------------- the round trips


def sqnr_db(x: Tensor, xq: Tensor) -> float:
    """10 log10(sum x^2 / sum (x - xq)^2) in dB, in float64; inf when xq == x (all zeros included)."""
    x, xq = x.detach().double(), xq.detach().double()
    noise = (x - xq).square().sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(x.square().sum() / noise))


def median_row_sqnr_db(x: Tensor, xq: Tensor) -> float:
    """The median over rows (tokens) of each row's SQNR, x and xq [rows, features]: what the
    typical token keeps when a few large ones set the scale (the global SQNR, weighted by
    energy, is dominated by those few). All-zero rows are left out."""
    x, xq = x.detach().double(), xq.detach().double()
    signal, noise = x.square().sum(-1), (x - xq).square().sum(-1)
    keep = signal > 0
    if not keep.any():
        return math.inf
    db = 10 * torch.log10(signal[keep] / noise[keep])  # noise 0: inf
    return float(db.median())


def int8_per_tensor(x: Tensor) -> Tensor:
    """Symmetric int8 round trip with one scale: s = max|x| / 127, clamp(round(x / s), -127, 127) s (float32)."""
    x = x.detach().float()
    s = x.abs().amax() / 127.0
    if s == 0:
        return x.clone()
    return torch.clamp(torch.round(x / s), -127, 127) * s


def int8_per_token(x: Tensor) -> Tensor:
    """Symmetric int8 round trip with one scale per row (the last dimension shares it), float32."""
    x = x.detach().float()
    s = x.abs().amax(dim=-1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row stays zero
    return torch.clamp(torch.round(x / s), -127, 127) * s


def fp8_per_tensor(x: Tensor, fmt: str) -> Tensor:
    """fp8 round trip with one scale: s = max|x| / max finite of ``fmt`` ("e4m3" or "e5m2"), through torch's dtype."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8_per_tensor(): 'fmt' must be one of {tuple(FP8_FORMATS)}, got {fmt!r}")
    dtype = FP8_FORMATS[fmt]
    x = x.detach().float()
    amax = x.abs().amax()
    if amax == 0:
        return x.clone()
    s = amax / torch.finfo(dtype).max
    return (x / s).to(dtype).float() * s


def _attention64(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T scale) v in float64, one image at a time (bounded memory). [B, H, N, d]."""
    return torch.stack(
        [torch.softmax(qi @ ki.transpose(-1, -2) * scale, dim=-1) @ vi for qi, ki, vi in zip(q, k, v, strict=True)]
    )


def attention_int8_sqnr(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, smooth_k: bool = False
) -> tuple[float, float]:
    """(signal, noise) sums of the attention output with q, k int8 per token against the exact one.

    q [B, H, Nq, d], k and v [B, H, Nk, d]; ``smooth_k`` subtracts k's mean over the keys
    (per image, head and channel) before quantising. SQNR = 10 log10(signal / noise).
    """
    q, k, v = q.double(), k.double(), v.double()
    ref = _attention64(q, k, v, scale)
    if smooth_k:
        k = k - k.mean(dim=-2, keepdim=True)
    out = _attention64(int8_per_token(q).double(), int8_per_token(k).double(), v, scale)
    return float(ref.square().sum()), float((ref - out).square().sum())


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# ----------------------------------------------------------------------------- rows and reports


@dataclass
class QuantRow:
    """One tensor of one layer. ``layer``: the module's name; ``tensor``: "input" (a linear's
    input), "q" or "k" (an attention's), "residual" (the residual stream entering block
    ``blocks.i`` of a model with a ``blocks`` ModuleList: not a GEMM input, but where
    outlier tokens live). SQNRs in dB; the ``attn_*`` fields only on q / k
    rows (the same pair of values on both), None elsewhere."""

    layer: str
    tensor: str
    rows: int  # tokens (x heads for q, k) seen
    absmax: float
    absmax_over_p999: float
    kurtosis: float
    int8_tensor_db: float
    int8_tensor_median_db: float  # the median row's own SQNR under the one per-tensor scale
    int8_token_db: float
    fp8_e4m3_db: float
    fp8_e5m2_db: float
    attn_int8_db: float | None = None
    attn_int8_smooth_k_db: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.layer, self.tensor


METRICS = {  # field: (title, short)
    "absmax_over_p999": ("absmax / p99.9", "amax/p999"),
    "kurtosis": ("kurtosis", "kurt"),
    "int8_tensor_db": ("int8 per tensor SQNR (dB)", "i8 tensor"),
    "int8_tensor_median_db": ("int8 per tensor, median token's SQNR (dB)", "i8 tensor med"),
    "int8_token_db": ("int8 per token SQNR (dB)", "i8 token"),
    "fp8_e4m3_db": ("fp8 e4m3 per tensor SQNR (dB)", "e4m3"),
    "fp8_e5m2_db": ("fp8 e5m2 per tensor SQNR (dB)", "e5m2"),
    "attn_int8_db": ("attention output SQNR, q k int8 per token (dB)", "attn i8"),
    "attn_int8_smooth_k_db": ("the same, k mean subtracted (dB)", "attn i8 smooth"),
}


def tensor_row(layer: str, tensor: str, x: Tensor) -> QuantRow:
    """The statistics of one activation: x [rows, features] (per-token scales along features)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    xq = int8_per_tensor(x)
    a = x.abs().flatten()
    amax = float(a.max()) if a.numel() else 0.0
    rank = max(1, math.ceil(PERCENTILE * a.numel()))
    p999 = float(a.kthvalue(rank).values) if a.numel() else 0.0
    m2 = float(x.double().square().mean())
    m4 = float(x.double().pow(4).mean())
    return QuantRow(
        layer=layer,
        tensor=tensor,
        rows=x.shape[0],
        absmax=amax,
        absmax_over_p999=amax / p999 if p999 > 0 else (math.nan if amax == 0 else math.inf),
        kurtosis=m4 / m2**2 if m2 > 0 else math.nan,
        int8_tensor_db=sqnr_db(x, xq),
        int8_tensor_median_db=median_row_sqnr_db(x, xq),
        int8_token_db=sqnr_db(x, int8_per_token(x)),
        fp8_e4m3_db=sqnr_db(x, fp8_per_tensor(x, "e4m3")),
        fp8_e5m2_db=sqnr_db(x, fp8_per_tensor(x, "e5m2")),
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if v == math.inf else ("nan" if math.isnan(v) else f"{v:.2f}")
    return str(v)


def json_safe(v: Any) -> Any:
    """inf / nan as the strings "inf", "-inf", "nan" (strict JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _check_path(fn: str, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"{fn}: argument 'path' must be in a writable folder, got {path!r}")
    return path


@dataclass
class QuantReport:
    """Per-tensor rows of one model on one batch (:func:`report`), in the model's module order."""

    rows: list[QuantRow]
    label: str = ""

    def row(self, layer: str, tensor: str = "input") -> QuantRow:
        for r in self.rows:
            if r.key == (layer, tensor):
                return r
        raise KeyError(f"QuantReport: no row for layer {layer!r}, tensor {tensor!r}")

    def to_dicts(self) -> list[dict[str, Any]]:
        return [{"label": self.label, **asdict(r)} for r in self.rows]

    def table(self) -> str:
        cols = ["layer", "tensor", "rows", "absmax", *METRICS]
        head = ["layer", "tensor", "rows", "absmax", *(METRICS[m][1] for m in METRICS)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(getattr(r, c)) for c in cols) + " |")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> str:
        path = _check_path("QuantReport.write_csv()", path)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["label", *(x.name for x in fields(QuantRow))])
            w.writeheader()
            w.writerows(self.to_dicts())
        return path

    def plot(self, path: str | os.PathLike) -> str:
        """One panel per statistic, the layers along x (see :meth:`QuantComparison.plot`)."""
        return QuantComparison(self, None).plot(path)


@dataclass
class QuantComparison:
    """Two reports of the same model in two configurations (``b`` may be None: one report alone)."""

    a: QuantReport
    b: QuantReport | None

    def keys(self) -> list[tuple[str, str]]:
        seen = [r.key for r in self.a.rows]
        if self.b is not None:
            seen += [r.key for r in self.b.rows if r.key not in set(seen)]
        return seen

    def _get(self, rep: QuantReport | None, key: tuple[str, str]) -> QuantRow | None:
        if rep is None:
            return None
        return next((r for r in rep.rows if r.key == key), None)

    def table(self, metrics: Sequence[str] = tuple(METRICS)) -> str:
        """One line per (layer, tensor): each statistic as ``a -> b``."""
        la, lb = self.a.label or "a", (self.b.label if self.b is not None else "") or "b"
        head = ["layer", "tensor", *(f"{METRICS[m][1]} ({la} -> {lb})" for m in metrics)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in self.keys():
            ra, rb = self._get(self.a, key), self._get(self.b, key)
            cells = [
                f"{_fmt(getattr(ra, m) if ra else None)} -> {_fmt(getattr(rb, m) if rb else None)}" for m in metrics
            ]
            lines.append("| " + " | ".join([*key, *cells]) + " |")
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, Any]]:
        return self.a.to_dicts() + (self.b.to_dicts() if self.b is not None else [])

    def write_json(self, path: str | os.PathLike) -> str:
        path = _check_path("QuantComparison.write_json()", path)
        with open(path, "w") as f:
            json.dump(json_safe(self.to_dicts()), f, indent=1)
        return path

    def plot(self, path: str | os.PathLike) -> str:
        """One panel per statistic, one point per (layer, tensor) along x, a line per configuration."""
        path = _check_path("plot()", path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = self.keys()
        xs = list(range(len(keys)))
        fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(8, 0.28 * len(keys)), 2.2 * len(METRICS)), sharex=True)
        for ax, (metric, (title, _)) in zip(axes, METRICS.items(), strict=True):
            for rep, style in ((self.a, "o-"), (self.b, "s--")):
                if rep is None:
                    continue
                ys = []
                for key in keys:
                    r = self._get(rep, key)
                    v = getattr(r, metric) if r is not None else None
                    ys.append(math.nan if v is None or not math.isfinite(v) else v)
                ax.plot(xs, ys, style, markersize=3, linewidth=1, label=rep.label or ("a" if rep is self.a else "b"))
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        axes[-1].set_xticks(xs)
        axes[-1].set_xticklabels([f"{layer}:{t}" for layer, t in keys], rotation=90, fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ----------------------------------------------------------------------------- collecting


def _as_call(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise TypeError(
        f"report(): argument 'batch' must be a tensor, a tuple of forward()'s arguments or a dict of them, "
        f"got {type(batch).__name__}"
    )


def _check(model: Any, batch: Any, fn: str) -> tuple[tuple, dict]:
    """Everything checkable before the forward pass: the model has something to report, the batch fits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, (nn.Linear, RegisterAttention)) for m in model.modules()):
        raise ValueError(f"{fn}: argument 'model' ({type(model).__name__}) has no nn.Linear and no attention to report")
    args, kwargs = _as_call(batch)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
    if not tensors:
        raise ValueError(f"{fn}: argument 'batch' holds no tensor")
    if any(t.dim() == 0 or t.shape[0] == 0 for t in tensors):
        raise ValueError(f"{fn}: argument 'batch' has an empty or 0-d tensor: {[list(t.shape) for t in tensors]}")
    # The package's models say what they take: a denoiser's check_input(x, t, y), an encoder's image check.
    name = type(model).__name__
    check = getattr(model, "check_input", None)
    if callable(check) and not kwargs:
        try:
            check(*args)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{fn}: argument 'batch' does not fit {name}: {e}") from e
    size, chans = getattr(model, "img_size", None), getattr(model, "in_chans", None)
    if isinstance(size, int) and isinstance(chans, int) and hasattr(model, "patch_embed") and not kwargs:
        x = args[0]
        if len(args) != 1 or not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (chans, size, size):
            raise ValueError(
                f"{fn}: argument 'batch' does not fit {name}: images [B, {chans}, {size}, {size}] expected, "
                f"got {[list(t.shape) for t in tensors]}"
            )
    return args, kwargs


def register_positions(model: nn.Module) -> dict[int, Tensor]:
    """{sequence length: indices of the register tokens in it} for the package's models.

    A ViT encoder's stream of P + N (+ test-time registers) tokens: its trained registers
    (after CLS) and its test-time registers (last); a denoiser's R + N tokens from block
    ``register_start`` on: the R diffusion registers (first). Other lengths have none.
    """
    out: dict[int, Tensor] = {}
    ttr = getattr(model, "num_test_time_registers", None)
    if ttr is not None and hasattr(model, "patch_embed"):
        cls = int(getattr(model, "cls_token", None) is not None)
        trained = int(getattr(model, "num_reg_tokens", 0))
        T = model.num_prefix_tokens + model.patch_embed.num_patches + ttr
        idx = list(range(cls, cls + trained)) + list(range(T - ttr, T))
        if idx:
            out[T] = torch.tensor(idx)
    R = getattr(model, "num_registers", 0)
    embedder = getattr(model, "x_embedder", None)
    if isinstance(R, int) and R and embedder is not None and hasattr(embedder, "num_patches"):
        out[R + embedder.num_patches] = torch.arange(R)
    return out


def _drop_tokens(x: Tensor, dim: int, positions: dict[int, Tensor]) -> Tensor:
    """x without the register tokens along ``dim`` (when its length is a known stream length)."""
    if x.dim() < dim + 2 or x.shape[dim] not in positions:  # a token dim followed by features
        return x
    keep = torch.ones(x.shape[dim], dtype=torch.bool)
    keep[positions[x.shape[dim]]] = False
    return x[(slice(None),) * dim + (keep.to(x.device),)]


class _Collector:
    def __init__(self, model: nn.Module, *, exclude_registers: bool = False) -> None:
        self.positions = register_positions(model) if exclude_registers else {}
        self.inputs: dict[str, list[Tensor]] = {}
        self.qk: dict[str, dict[str, list[Tensor]]] = {}
        self.attn_sums: dict[str, list[float]] = {}  # name: [signal, noise, signal_smooth, noise_smooth]
        self.rope: dict[str, Any] = {}
        self.handles: list[Any] = []
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, nn.ModuleList):  # the residual stream entering each block
            for i, block in enumerate(blocks):
                self.inputs[f"blocks.{i}"] = []
                self.handles.append(block.register_forward_pre_hook(self._linear_hook(f"blocks.{i}")))
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                self.inputs[name] = []
                self.handles.append(m.register_forward_pre_hook(self._linear_hook(name)))
            if isinstance(m, RegisterAttention):
                self.qk[name] = {"q": [], "k": []}
                self.attn_sums[name] = [0.0, 0.0, 0.0, 0.0]
                self.handles.append(m.register_forward_pre_hook(self._rope_hook(name), with_kwargs=True))
                self.handles.append(m.qkv.register_forward_hook(self._qkv_hook(name, m)))

    def _linear_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = _drop_tokens(args[0], 1, self.positions)  # [B, T, F]: token dim 1
            self.inputs[name].append(x.detach().float().reshape(-1, x.shape[-1]).clone())

        return hook

    def _rope_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.rope[name] = kwargs.get("rope")

        return hook

    def _qkv_hook(self, name: str, attn: RegisterAttention) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            B, N = out.shape[0], out.shape[1]
            q, k, v = out.detach().view(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
            q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, N, hd]
            rope = self.rope.pop(name, None)
            if rope is not None:  # as the kernel applies it (the tables cover the sequence)
                cos, sin = (t.float() for t in rope)
                q, k = apply_rope(q, cos, sin, "interleaved"), apply_rope(k, cos, sin, "interleaved")
            for t, x in (("q", q), ("k", k)):
                x = _drop_tokens(x, 2, self.positions)
                self.qk[name][t].append(x.reshape(-1, x.shape[-1]).clone())
            if attn.register_k is not None:
                rk, rv = (t.detach().float().expand(B, -1, -1, -1) for t in (attn.register_k, attn.register_v))
                k, v = torch.cat([rk, k], dim=2), torch.cat([rv, v], dim=2)
            sums = self.attn_sums[name]
            for i, smooth in enumerate((False, True)):
                s, n = attention_int8_sqnr(q, k, v, scale=attn.scale, smooth_k=smooth)
                sums[2 * i] += s
                sums[2 * i + 1] += n

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def rows(self, model: nn.Module) -> list[QuantRow]:
        out = []
        for name, _ in model.named_modules():
            if self.inputs.get(name):
                kind = "input" if isinstance(model.get_submodule(name), nn.Linear) else "residual"
                out.append(tensor_row(name, kind, torch.cat(self.inputs[name])))
            if name in self.qk and self.qk[name]["q"]:
                s = self.attn_sums[name]
                for t in ("q", "k"):
                    r = tensor_row(name, t, torch.cat(self.qk[name][t]))
                    r.attn_int8_db, r.attn_int8_smooth_k_db = _db(s[0], s[1]), _db(s[2], s[3])
                    out.append(r)
        return out


def report(
    model: nn.Module,
    batch: Any,
    *,
    label: str = "",
    exclude_registers: bool = False,
    forward: Callable[[nn.Module, tuple, dict], Any] | None = None,
) -> QuantReport:
    """Quantization statistics of every linear input and every attention's q and k, from one forward pass.

    Args:
        model: any ``nn.Module`` with an ``nn.Linear`` or a :class:`~dsr_kernels.RegisterAttention`
            (the package's ViT encoders and denoisers: every block's qkv, proj, MLP, adaLN,
            the embedders' MLPs and the final linear).
        batch: forward()'s arguments: one tensor (an encoder's images [B, C, H, W]), a tuple
            (a denoiser's (x [B, C, H, W], t [B], y [B])) or a dict of keyword arguments.
            The package's models check it before anything runs.
        label: the configuration's name in tables and plots ("plain", "registers").
        exclude_registers: leave the register tokens (:func:`register_positions`: trained and
            test-time registers of an encoder, diffusion registers of a denoiser) out of every
            activation's statistics, as a deployment that keeps those few tokens in high
            precision would (PrefixQuant's treatment of its prefix tokens). The attention
            output SQNR still covers every token: per-token scales already isolate them.
        forward: how to run the model, ``forward(model, args, kwargs)``; default ``model(*args, **kwargs)``.

    Returns:
        :class:`QuantReport` (rows in the model's module order; :meth:`QuantReport.table`,
        :meth:`QuantReport.plot`, :meth:`QuantReport.write_csv`).
    """
    args, kwargs = _check(model, batch, "report()")
    col = _Collector(model, exclude_registers=exclude_registers)
    try:
        with torch.no_grad():
            (forward or (lambda m, a, k: m(*a, **k)))(model, args, kwargs)
    finally:
        col.remove()
    return QuantReport(col.rows(model), label)


def compare(
    a: nn.Module | QuantReport,
    b: nn.Module | QuantReport,
    batch: Any = None,
    *,
    labels: tuple[str, str] = ("a", "b"),
    exclude_registers: bool = False,
    forward: Callable[[nn.Module, tuple, dict], Any] | None = None,
) -> QuantComparison:
    """Two configurations side by side: two models (run on the same ``batch``) or two reports
    (e.g. one encoder before and inside ``apply_test_time_registers``). ``labels`` name them."""
    if len(labels) != 2 or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"compare(): argument 'labels' must be two strings, got {labels!r}")
    for name, x in (("a", a), ("b", b)):
        if isinstance(x, QuantReport):
            continue
        if not isinstance(x, nn.Module):
            raise TypeError(
                f"compare(): argument '{name}' must be an nn.Module or a QuantReport, got {type(x).__name__}"
            )
        if batch is None:
            raise ValueError(f"compare(): argument 'batch' is needed to run model '{name}'")
        _check(x, batch, "compare()")
    reps = []
    for x, label in zip((a, b), labels, strict=True):
        rep = (
            x if isinstance(x, QuantReport) else report(x, batch, exclude_registers=exclude_registers, forward=forward)
        )
        reps.append(QuantReport(rep.rows, label))
    return QuantComparison(*reps)


def summary(rep: QuantReport, metric: str = "int8_tensor_db", tensors: Iterable[str] = ("input",)) -> float:
    """The mean of ``metric`` over the finite values of the rows of kind ``tensors``."""
    vals = [getattr(r, metric) for r in rep.rows if r.tensor in tuple(tensors)]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan
