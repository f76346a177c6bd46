"""Outlier statistics: find outlier tokens and record, per layer, what they do.

    with dsr_kernels.outliers.collect(model) as report:
        model(x)
    print(report.table())
    report.plot("norms.png")

``collect`` gathers records from every module of ``model`` built on the package's ops
(:class:`~dsr_kernels.NormModulate`, :class:`~dsr_kernels.RegisterAttention` and the
blocks built from them), reusing what the kernels produce anyway: token norms, max |x|
and sum x^4 per token come out of the norm kernel's pass; key_mass, register share and
entropy out of the attention kernel. The one exception is the int8 SQNR: a per-tensor
int8 scale needs the tensor's max before anything can be rounded, so it costs one
read-only pass over the activation (``sqnr=False`` skips it).

A layer's record merges what its modules report: a module named ``blocks.3.attn``
reports to layer ``blocks.3``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dsr_kernels.types import AttentionStats


class Outliers(NamedTuple):
    """``mask`` has the shape of the norms; ``indices`` [K, norms.dim()] as torch.nonzero."""

    mask: Tensor
    indices: Tensor


def find_outliers(
    norms: Tensor, *, threshold: float | None = None, ratio: float | None = None, top_k: int | None = None
) -> Outliers:
    """Outlier tokens by norm, per image (last dimension = tokens of one image).

    Exactly one rule:
        threshold: norm > threshold (absolute; 150 is DINOv2's convention);
        ratio: norm > ratio * median norm of the image;
        top_k: the k largest norms of each image.
    """
    if not isinstance(norms, Tensor) or norms.dim() == 0:
        raise ValueError(f"find_outliers(): 'norms' must be a tensor [..., N], got {type(norms).__name__}")
    given = [name for name, v in (("threshold", threshold), ("ratio", ratio), ("top_k", top_k)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"find_outliers(): give exactly one of threshold, ratio, top_k; got {given or 'none'}")
    if threshold is not None:
        mask = norms > threshold
    elif ratio is not None:
        if not ratio > 0:
            raise ValueError(f"find_outliers(): 'ratio' must be > 0, got {ratio}")
        mask = norms > ratio * norms.float().median(dim=-1, keepdim=True).values
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= norms.shape[-1]:
            raise ValueError(f"find_outliers(): 'top_k' must be an int in [0, N={norms.shape[-1]}], got {top_k!r}")
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask.scatter_(-1, norms.topk(top_k, dim=-1).indices, True)
    return Outliers(mask, mask.nonzero())


def int8_sqnr_db(x: Tensor) -> float:
    """SQNR in dB of a symmetric per-tensor int8 round trip: 10 log10(sum x^2 / sum (x - q(x))^2).

    q(x) = clamp(round(x / s), -127, 127) * s with s = max |x| / 127. inf for a tensor
    that int8 represents exactly (all zeros included).
    """
    x = x.detach().float()
    amax = x.abs().max()
    if amax == 0:
        return math.inf
    s = amax / 127.0
    noise = (x - torch.clamp(torch.round(x / s), -127, 127) * s).square().sum()
    return math.inf if noise == 0 else float(10 * torch.log10(x.square().sum() / noise))


@dataclass
class LayerRecord:
    """What one layer's modules reported during one tag (e.g. one noise level).

    Token norms are those of the norm input (the residual stream, registers included);
    attention statistics average over samples, heads and queries of every call. A
    statistic that nothing measured is None ("not measured" in :meth:`OutlierReport.table`):
    the token-norm columns of a layer whose norm is not the package's (a patched timm ViT
    reports attention only), the attention columns of a layer without attention, the
    SQNR with ``sqnr=False``. NaN is a measured value that is undefined (rms 0).
    """

    layer: str
    tag: str = ""
    tokens: int | None = None  # token norms seen (summed over calls)
    norm_max: float | None = None
    norm_median: float | None = None
    norm_p99: float | None = None
    outlier_count: int | None = None
    outlier_fraction: float | None = None
    outlier_attention: float | None = None  # share of attention the outlier tokens receive (keys)
    top1pct_key_share: float | None = None  # share of attention taken by the top 1% of keys
    register_share: float | None = None
    entropy: float | None = None
    absmax_over_rms: float | None = None  # max |x| / rms(x) over the layer's activations
    kurtosis: float | None = None  # E[x^4] / E[x^2]^2 about zero (3 for a Gaussian)
    int8_sqnr_db: float | None = None


@dataclass
class _Accumulator:
    norms: list[Tensor] = field(default_factory=list)
    pending_outliers: Tensor | None = None  # [B, T] mask of the last norms, for the attention
    sum2: float = 0.0
    sum4: float = 0.0
    absmax: float = 0.0
    count: int = 0
    signal: float = 0.0
    noise: float = 0.0
    attn: dict[str, list[float]] = field(default_factory=dict)

    def add_attn(self, name: str, value: float) -> None:
        self.attn.setdefault(name, []).append(value)


class OutlierReport:
    """Records gathered by :func:`collect`; ``table()`` and ``plot(path)`` render them."""

    def __init__(self, *, threshold: float | None, ratio: float | None, top_k: int | None, sqnr: bool) -> None:
        self.rule = dict(threshold=threshold, ratio=ratio, top_k=top_k)
        self.sqnr = sqnr
        self.tag = ""
        self._acc: dict[tuple[str, str], _Accumulator] = {}

    def set_tag(self, tag: str) -> None:
        """Start a new group of records (e.g. the next noise level); plots draw one line per tag."""
        self.tag = str(tag)

    # -- called by the modules -------------------------------------------------------

    def _get(self, layer: str) -> _Accumulator:
        return self._acc.setdefault((self.tag, layer), _Accumulator())

    def record_norms(self, layer: str, norms: Tensor, moments: Tensor | None, h: Tensor) -> None:
        """norms [B, T]; moments [B, T, 2] (max |h|, sum h^4) of h, the normed activation [B, T, D]."""
        acc = self._get(layer)
        norms = norms.detach().float()
        acc.norms.append(norms.flatten().cpu())
        acc.pending_outliers = find_outliers(norms, **self.rule).mask
        if moments is not None:
            acc.sum2 += float(norms.square().sum())
            acc.sum4 += float(moments[..., 1].double().sum())
            acc.absmax = max(acc.absmax, float(moments[..., 0].max()))
            acc.count += h.numel()
        if self.sqnr:
            x = h.detach().float()
            amax = x.abs().max()
            if amax > 0:
                s = amax / 127.0
                acc.signal += float(x.square().sum())
                acc.noise += float((x - torch.clamp(torch.round(x / s), -127, 127) * s).square().sum())

    def record_attention(self, layer: str, stats: AttentionStats, num_kv_registers: int) -> None:
        acc = self._get(layer)
        key_mass = stats.key_mass.detach().float()  # [B, H, R + Nk]
        total = key_mass.sum(-1)  # [B, H]
        k = max(1, math.ceil(0.01 * key_mass.shape[-1]))
        acc.add_attn("top1pct_key_share", float((key_mass.topk(k, dim=-1).values.sum(-1) / total).mean()))
        acc.add_attn("register_share", float(stats.register_share.mean()))
        acc.add_attn("entropy", float(stats.entropy.mean()))
        mask = acc.pending_outliers
        token_mass = key_mass[..., num_kv_registers:]
        if mask is not None and mask.shape == (token_mass.shape[0], token_mass.shape[-1]):
            share = (token_mass * mask[:, None, :].to(token_mass.device)).sum(-1) / total
            acc.add_attn("outlier_attention", float(share.mean()))

    # -- rendering -----------------------------------------------------------------

    def records(self) -> list[LayerRecord]:
        out = []
        for (tag, layer), acc in self._acc.items():
            rec = LayerRecord(layer=layer, tag=tag)
            if acc.norms:
                norms = torch.cat(acc.norms)
                rec.tokens = norms.numel()
                rec.norm_max = float(norms.max())
                rec.norm_median = float(norms.median())
                rec.norm_p99 = float(torch.quantile(norms, 0.99)) if norms.numel() > 1 else float(norms[0])
                mask = torch.cat([find_outliers(n.view(1, -1), **self.rule).mask.flatten() for n in acc.norms])
                rec.outlier_count = int(mask.sum())
                rec.outlier_fraction = rec.outlier_count / rec.tokens
            if acc.count:
                rms = math.sqrt(acc.sum2 / acc.count)
                rec.absmax_over_rms = acc.absmax / rms if rms > 0 else math.nan
                rec.kurtosis = (acc.sum4 / acc.count) / (acc.sum2 / acc.count) ** 2 if acc.sum2 > 0 else math.nan
            if self.sqnr and acc.norms:  # exact (no rounding noise): inf, as int8_sqnr_db
                rec.int8_sqnr_db = 10 * math.log10(acc.signal / acc.noise) if acc.noise > 0 else math.inf
            for name, values in acc.attn.items():
                setattr(rec, name, sum(values) / len(values))
            out.append(rec)
        return out

    def table(self) -> str:
        """One row per record, one column per :class:`LayerRecord` field ("not measured" for None)."""
        cols = [f.name for f in fields(LayerRecord)]
        rows = [[_fmt(getattr(r, c)) for c in cols] for r in self.records()]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Token norm (max, median) and top-1% key share by layer, one line per tag; a panel only
        for what was measured (a patched timm ViT has no token norms)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        layers = list(dict.fromkeys(r.layer for r in records))
        tags = list(dict.fromkeys(r.tag for r in records))
        # (title, y label, [(statistic, line style, label suffix)]), a panel only where something was measured
        panels = [
            (
                "token norm",
                "norm of the norm's input tokens",
                [("norm_max", "-", " max"), ("norm_median", "--", " median")],
            ),
            ("attention share of the top 1% of keys", "share of the attention mass", [("top1pct_key_share", "-", "")]),
        ]
        panels = [(t, y, lines) for t, y, lines in panels if any(getattr(r, lines[0][0]) is not None for r in records)]
        if not panels:
            raise ValueError("OutlierReport.plot(): nothing to plot: no token norm and no attention was recorded")
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (title, ylabel, lines) in zip(axes[0], panels, strict=True):
            for i, tag in enumerate(tags):
                by_layer = {r.layer: r for r in records if r.tag == tag}
                for name, style, suffix in lines:
                    ys = [getattr(by_layer[ly], name) if ly in by_layer else None for ly in layers]
                    ys = [math.nan if y is None else y for y in ys]  # a gap where not measured
                    marker = "o" if style == "-" else None
                    label = f"{tag or 'all'}{suffix}"
                    ax.plot(range(len(layers)), ys, linestyle=style, marker=marker, color=f"C{i % 10}", label=label)
            ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(v) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


_ATTR = "_dsr_outlier_layer"


def active_layer(module: nn.Module) -> tuple[OutlierReport, str] | None:
    """(report, layer name) while :func:`collect` records ``module``, else None.

    The state is an attribute that ``collect`` sets on each module of the model (not a
    global or context variable), which torch.compile traces as a plain attribute read.
    """
    return getattr(module, _ATTR, None)


@contextlib.contextmanager
def collect(
    model: nn.Module,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    top_k: int | None = None,
    sqnr: bool = True,
) -> Iterator[OutlierReport]:
    """Records outlier statistics from every package-built module of ``model``.

    Outliers are the tokens whose norm exceeds ``threshold``, or ``ratio`` x the median
    norm of their image, or the ``top_k`` largest of each image: give at most one rule;
    the default is ``ratio=4``. Recording reads statistics back to the host, so run the
    model eagerly inside (under torch.compile it graph-breaks there).
    """
    if threshold is None and ratio is None and top_k is None:
        ratio = 4.0
    given = [n for n, v in (("threshold", threshold), ("ratio", ratio), ("top_k", top_k)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"collect(): give at most one of threshold, ratio, top_k; got {given}")
    report = OutlierReport(threshold=threshold, ratio=ratio, top_k=top_k, sqnr=sqnr)
    modules = list(model.named_modules())
    for name, module in modules:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        setattr(module, _ATTR, (report, parent or type(model).__name__))
    try:
        yield report
    finally:
        for _, module in modules:
            if hasattr(module, _ATTR):
                delattr(module, _ATTR)
