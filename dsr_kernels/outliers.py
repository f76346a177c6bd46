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

Video models (:mod:`dsr_kernels.models.video`) also declare where their tokens sit
(:class:`VideoLayout`: frames, positions, registers), and the same statistics are then
aggregated per frame and per spatial position (:class:`FrameRecord`,
:meth:`OutlierReport.frame_table`, :meth:`OutlierReport.plot_frames`).
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


ARRANGEMENTS = ("full", "spatial", "temporal")


@dataclass(frozen=True)
class VideoLayout:
    """Where the tokens of a video model's residual stream [B, P + T * S, D] sit.

    P = ``len(prefix_frames)`` prefix tokens come first (registers; ``prefix_frames[i]``
    is the frame of prefix token i, -1 for a global register), then ``frames`` frames of
    S slots each: the frame's ``frame_registers`` registers, then its ``height`` x ``width``
    patches, row-major. An attention call covers the stream in one of three arrangements
    (:meth:`sequences`): "full" (one sequence), "spatial" (one per frame) or "temporal"
    (one per slot, across the frames); in the last two the P prefix tokens are every
    sequence's kv registers.
    """

    frames: int
    height: int
    width: int
    frame_registers: int = 0
    prefix_frames: tuple[int, ...] = ()

    @property
    def slots(self) -> int:
        """S: the slots of one frame (its registers and patches)."""
        return self.frame_registers + self.height * self.width

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_frames) + self.frames * self.slots

    def token_frame(self) -> Tensor:
        """[N] long: the frame of each token of the stream (-1: a global register)."""
        prefix = torch.tensor(self.prefix_frames, dtype=torch.long)
        return torch.cat([prefix, torch.arange(self.frames).repeat_interleave(self.slots)])

    def token_position(self) -> Tensor:
        """[N] long: row * width + col of each patch token, -1 for the registers."""
        slot = torch.arange(self.slots) - self.frame_registers
        slots = torch.where(slot >= 0, slot, -1).repeat(self.frames)
        return torch.cat([torch.full((len(self.prefix_frames),), -1, dtype=torch.long), slots])

    def sequences(self, arrangement: str) -> tuple[Tensor, Tensor]:
        """(queries [G, L], keys [G, R_kv + L]): the stream index of each query and key of an
        attention call with batch B * G (sample b, sequence g at b * G + g)."""
        P, T, S = len(self.prefix_frames), self.frames, self.slots
        grid = P + torch.arange(T * S).view(T, S)  # [T, S]
        if arrangement == "full":
            queries = torch.arange(self.num_tokens)[None]
            return queries, queries
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"VideoLayout.sequences(): arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
        queries = grid if arrangement == "spatial" else grid.T.contiguous()
        kv = torch.arange(P)[None].expand(queries.shape[0], P)
        return queries, torch.cat([kv, queries], dim=1)


@dataclass
class FrameRecord:
    """Per-frame statistics of one video layer during one tag (:meth:`OutlierReport.frame_records`).

    Outliers are the layer's (the rule of :func:`collect` over each sample's whole stream,
    registers included), placed at their frame and position. The key mass is AttentionStats
    key_mass summed over samples, heads, queries and calls, as a share of the total: the
    attention each patch key (frame, position) and the registers receive. ``register_share``
    averages the register share of each frame's patch-token queries. None: not measured.
    """

    layer: str
    tag: str
    frames: int
    height: int
    width: int
    outlier_count: Tensor | None = None  # [T, h, w] int64: norm outliers at each frame and position
    register_outliers: int | None = None  # norm outliers among the registers
    norm_max: Tensor | None = None  # [T]: the largest patch-token norm of each frame
    key_mass: Tensor | None = None  # [T, h, w]: share of the attention mass each patch key receives
    register_key_mass: float | None = None  # share of the attention mass the registers receive
    register_share: Tensor | None = None  # [T]: mean register share of each frame's patch queries

    @property
    def outliers_per_frame(self) -> Tensor | None:
        """[T] outlier tokens in each frame."""
        return None if self.outlier_count is None else self.outlier_count.sum((1, 2))

    @property
    def key_mass_per_frame(self) -> Tensor | None:
        """[T] share of the attention mass each frame's patch keys receive."""
        return None if self.key_mass is None else self.key_mass.sum((1, 2))

    @property
    def key_mass_per_position(self) -> Tensor | None:
        """[h, w] share of the attention mass the keys at each spatial position receive (all frames)."""
        return None if self.key_mass is None else self.key_mass.sum(0)

    def outlier_locations(self) -> list[tuple[int, int, int, int]]:
        """(frame, row, col, count) of every place that held an outlier, the most frequent first."""
        if self.outlier_count is None:
            return []
        where = self.outlier_count.nonzero().tolist()
        found = [(f, r, c, int(self.outlier_count[f, r, c])) for f, r, c in where]
        return sorted(found, key=lambda x: (-x[3], x[:3]))


@dataclass
class _FrameAccumulator:
    layout: VideoLayout
    outliers: Tensor | None = None  # [T, h * w]
    register_outliers: int = 0
    norm_max: Tensor | None = None  # [T]
    key_mass: Tensor | None = None  # [T, h * w] float64
    register_key_mass: float = 0.0
    total_mass: float = 0.0
    share_sum: Tensor | None = None  # [T]
    share_count: int = 0

    def add_norms(self, norms: Tensor, mask: Tensor) -> None:
        """norms, mask [B, N] over the stream."""
        lay = self.layout
        patch = lay.token_position() >= 0
        T, hw = lay.frames, lay.height * lay.width
        outliers = mask.cpu()[:, patch].view(-1, T, hw).sum(0)
        norm_max = norms.cpu()[:, patch].view(-1, T, hw).amax((0, 2))
        self.outliers = outliers if self.outliers is None else self.outliers + outliers
        self.norm_max = norm_max if self.norm_max is None else torch.maximum(self.norm_max, norm_max)
        self.register_outliers += int(mask.cpu()[:, ~patch].sum())

    def add_attention(self, stats: AttentionStats, arrangement: str, mask: Tensor | None) -> float | None:
        """Adds one call's key mass and register share; returns the share of the attention
        the outlier tokens of ``mask`` ([B, N]) receive, or None."""
        lay = self.layout
        queries, keys = lay.sequences(arrangement)
        G, N = queries.shape[0], lay.num_tokens
        key_mass = stats.key_mass.detach().double().sum(1).cpu()  # [B * G, R_kv + L]
        if key_mass.shape[-1] != keys.shape[-1] or key_mass.shape[0] % G:
            return None  # not this layout's call
        B = key_mass.shape[0] // G
        mass = torch.zeros(B, N, dtype=torch.float64).index_add_(1, keys.flatten(), key_mass.view(B, -1))
        share = stats.register_share.detach().double().mean(1).cpu().reshape(B, -1)  # [B, G * L]
        shares = torch.zeros(B, N, dtype=torch.float64).index_add_(1, queries.flatten(), share)
        patch = lay.token_position() >= 0
        T, hw = lay.frames, lay.height * lay.width
        total = key_mass.view(B, -1).sum(-1)  # [B]
        patch_mass = mass[:, patch].view(B, T, hw).sum(0)
        self.key_mass = patch_mass if self.key_mass is None else self.key_mass + patch_mass
        self.register_key_mass += float(mass[:, ~patch].sum())
        self.total_mass += float(total.sum())
        share_sum = shares[:, patch].view(B, T, hw).sum((0, 2))
        self.share_sum = share_sum if self.share_sum is None else self.share_sum + share_sum
        self.share_count += B * hw
        if mask is None or mask.shape != (B, N):
            return None
        return float(((mass * mask.cpu()).sum(-1) / total).mean())

    def record(self, layer: str, tag: str) -> FrameRecord:
        lay = self.layout
        shape = (lay.frames, lay.height, lay.width)
        rec = FrameRecord(layer, tag, *shape)
        if self.outliers is not None:
            rec.outlier_count = self.outliers.view(shape).long()
            rec.register_outliers = self.register_outliers
            rec.norm_max = self.norm_max.float()
        if self.key_mass is not None:
            total = self.total_mass if self.total_mass > 0 else math.nan
            rec.key_mass = (self.key_mass / total).view(shape).float()
            rec.register_key_mass = self.register_key_mass / total
            rec.register_share = (self.share_sum / self.share_count).float()
        return rec


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
    frames: _FrameAccumulator | None = None  # video layers: per frame and position

    def add_attn(self, name: str, value: float) -> None:
        self.attn.setdefault(name, []).append(value)


class OutlierReport:
    """Records gathered by :func:`collect`; ``table()`` and ``plot(path)`` render them."""

    def __init__(self, *, threshold: float | None, ratio: float | None, top_k: int | None, sqnr: bool) -> None:
        self.rule = dict(threshold=threshold, ratio=ratio, top_k=top_k)
        self.sqnr = sqnr
        self.tag = ""
        self._acc: dict[tuple[str, str], _Accumulator] = {}
        self._video: dict[str, tuple[VideoLayout, str]] = {}  # layer: (layout, arrangement), set_video_layout

    def set_tag(self, tag: str) -> None:
        """Start a new group of records (e.g. the next noise level); plots draw one line per tag."""
        self.tag = str(tag)

    # -- called by the modules -------------------------------------------------------

    def _get(self, layer: str) -> _Accumulator:
        return self._acc.setdefault((self.tag, layer), _Accumulator())

    def _frames(self, acc: _Accumulator, layer: str) -> tuple[_FrameAccumulator, str] | None:
        """The layer's per-frame accumulator and attention arrangement; None for a layer that is not a video's."""
        if layer not in self._video:
            return None
        layout, arrangement = self._video[layer]
        if acc.frames is None or acc.frames.layout != layout:
            acc.frames = _FrameAccumulator(layout)
        return acc.frames, arrangement

    def record_norms(self, layer: str, norms: Tensor, moments: Tensor | None, h: Tensor) -> None:
        """norms [B, T]; moments [B, T, 2] (max |h|, sum h^4) of h, the normed activation [B, T, D]."""
        acc = self._get(layer)
        norms = norms.detach().float()
        acc.norms.append(norms.flatten().cpu())
        acc.pending_outliers = find_outliers(norms, **self.rule).mask
        video = self._frames(acc, layer)
        if video is not None and norms.dim() == 2 and norms.shape[-1] == video[0].layout.num_tokens:
            video[0].add_norms(norms, acc.pending_outliers)
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
            mask = None  # measured: the video path below only adds the per-frame statistics
        video = self._frames(acc, layer)
        if video is not None:
            share = video[0].add_attention(stats, video[1], mask)
            if share is not None:  # a spatial or temporal call: the stream's outliers mapped to its keys
                acc.add_attn("outlier_attention", share)

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

    # -- per frame (video models) --------------------------------------------------

    def frame_records(self) -> list[FrameRecord]:
        """One :class:`FrameRecord` per (tag, video layer), in the order they were recorded."""
        return [acc.frames.record(layer, tag) for (tag, layer), acc in self._acc.items() if acc.frames is not None]

    def frame_table(self, *, top: int = 3) -> str:
        """One row per video layer and tag: where the outliers are (frame:count, and the ``top``
        (frame, row, col) places), the key mass and register share per frame."""
        cols = ["layer", "tag", "outliers", "by frame", "top places", "key mass per frame", "reg mass", "reg share"]
        rows = []
        for r in self.frame_records():
            if r.outlier_count is None:
                outliers = by_frame = places = "not measured"
            else:
                per_frame = r.outliers_per_frame.tolist()
                outliers = f"{sum(per_frame)} (+{r.register_outliers} reg)"
                by_frame = " ".join(f"{f}:{n}" for f, n in enumerate(per_frame) if n) or "-"
                places = " ".join(f"({f},{y},{x})x{n}" for f, y, x, n in r.outlier_locations()[:top]) or "-"
            if r.key_mass is None:
                mass = reg_mass = reg_share = "not measured"
            else:
                mass = " ".join(f"{m:.3f}" for m in r.key_mass_per_frame.tolist())
                reg_mass, reg_share = _fmt(r.register_key_mass), _fmt(float(r.register_share.mean()))
            rows.append([r.layer, r.tag or "-", outliers, by_frame, places, mass, reg_mass, reg_share])
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def plot_frames(self, path: str) -> str:
        """Frames x layers heatmaps, one row of panels per tag: the norm outliers in each frame,
        and the share of the attention mass each frame's keys receive."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.frame_records()
        if not records:
            raise ValueError("OutlierReport.plot_frames(): no video layer was recorded (see VideoLayout)")
        tags = list(dict.fromkeys(r.tag for r in records))
        layers = list(dict.fromkeys(r.layer for r in records))
        frames = max(r.frames for r in records)
        panels = [
            ("norm outliers per frame", "outliers_per_frame", "outlier tokens"),
            ("attention mass per frame (keys)", "key_mass_per_frame", "share of the attention mass"),
        ]
        fig, axes = plt.subplots(
            len(tags), 2, figsize=(12, 0.4 * len(layers) * len(tags) + 2.5 * len(tags)), squeeze=False
        )
        for row, tag in zip(axes, tags, strict=True):
            by_layer = {r.layer: r for r in records if r.tag == tag}
            for ax, (title, stat, label) in zip(row, panels, strict=True):
                grid = torch.full((len(layers), frames), math.nan)
                for i, layer in enumerate(layers):
                    values = getattr(by_layer[layer], stat) if layer in by_layer else None
                    if values is not None:
                        grid[i, : values.numel()] = values.float()
                image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
                fig.colorbar(image, ax=ax, label=label)
                ax.set_yticks(range(len(layers)), layers, fontsize=7)
                ax.set_xticks(range(frames))
                ax.set_xlabel("frame")
                ax.set_ylabel("layer")
                ax.set_title(f"{title}{f' ({tag})' if tag else ''}")
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


# The attribute collect() sets on each attention module it records: (report, layer name).
LAYER_ATTRIBUTE = "_dsr_outlier_layer"


def outlier_rule(fn: str, threshold: float | None, ratio: float | None, top_k: int | None) -> tuple:
    """(threshold, ratio, top_k) with at most one given; none given: ``ratio=4`` (the default rule)."""
    if threshold is None and ratio is None and top_k is None:
        ratio = 4.0
    given = [n for n, v in (("threshold", threshold), ("ratio", ratio), ("top_k", top_k)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"{fn}(): give at most one of threshold, ratio, top_k; got {given}")
    return threshold, ratio, top_k


@contextlib.contextmanager
def recording_into(model: nn.Module, report: OutlierReport) -> Iterator[OutlierReport]:
    """Within the block, every module of ``model`` records into ``report`` (as its layer:
    the module's parent's name); the attribute is removed on leaving, errors included."""
    modules = list(model.named_modules())
    for name, module in modules:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        setattr(module, LAYER_ATTRIBUTE, (report, parent or type(model).__name__))
    try:
        yield report
    finally:
        for _, module in modules:
            if hasattr(module, LAYER_ATTRIBUTE):
                delattr(module, LAYER_ATTRIBUTE)


def active_layer(module: nn.Module) -> tuple[OutlierReport, str] | None:
    """(report, layer name) while :func:`collect` records ``module``, else None.

    The state is an attribute that ``collect`` sets on each module of the model (not a
    global or context variable), which torch.compile traces as a plain attribute read.
    """
    return getattr(module, LAYER_ATTRIBUTE, None)


def set_video_layout(module: nn.Module, layout: VideoLayout, arrangement: str = "full") -> None:
    """Declares where the tokens of ``module``'s layer sit in a video, and how its attention
    covers them (``arrangement``: "full", "spatial" or "temporal", see :class:`VideoLayout`);
    the layer's norms and attention statistics are then also recorded per frame and position.
    The video models call it before each block; a no-op outside :func:`collect`.
    """
    recording = active_layer(module)
    if recording is not None:
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"set_video_layout(): arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
        report, layer = recording
        report._video[layer] = (layout, arrangement)


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
    threshold, ratio, top_k = outlier_rule("collect", threshold, ratio, top_k)
    report = OutlierReport(threshold=threshold, ratio=ratio, top_k=top_k, sqnr=sqnr)
    with recording_into(model, report):
        yield report


# -- in training: the key mass from the backward -----------------------------------------


class TrainingStatistics(OutlierReport):
    """What :func:`record_training_statistics` gathers over a training step.

    The attention layers ask for ``key_mass_in_backward``: lse, entropy and register share
    come from the forward, and the key mass from the backward's dK/dV pass, which fills
    each call's ``stats.key_mass`` in place when ``loss.backward()`` runs (NaN until then).
    The records of :class:`OutlierReport` (``records()``, ``table()``, ``plot()``) are
    therefore computed when asked for, after the backward; :meth:`attention` gives the raw
    :class:`~dsr_kernels.types.AttentionStats` of each call.
    """

    key_mass_in_backward = True  # read by RegisterAttention

    def __init__(self, **rule) -> None:
        super().__init__(**rule)
        # (tag, layer, stats, num_kv_registers, the layer's outlier mask at the call)
        self._calls: list[tuple[str, str, AttentionStats, int, Tensor | None]] = []
        self._summarised = 0  # the calls already added to the records

    def record_attention(self, layer: str, stats: AttentionStats, num_kv_registers: int) -> None:
        pending = self._get(layer).pending_outliers
        self._calls.append((self.tag, layer, stats, num_kv_registers, pending))

    def attention(self) -> dict[str, list[AttentionStats]]:
        """Each layer's statistics, one entry per attention call, in call order."""
        out: dict[str, list[AttentionStats]] = {}
        for _, layer, stats, _, _ in self._calls:
            out.setdefault(layer, []).append(stats)
        return out

    def pending(self) -> list[str]:
        """The layers whose key mass the backward has not filled yet (all NaN)."""
        return list(dict.fromkeys(c[1] for c in self._calls if c[2].key_mass.isnan().all()))

    def records(self) -> list[LayerRecord]:
        waiting = self.pending()
        if waiting:
            raise RuntimeError(
                f"TrainingStatistics.records(): the backward has not run for layers {waiting}: "
                "call loss.backward() before reading the key-mass statistics"
            )
        tag = self.tag
        for call_tag, layer, stats, num_kv_registers, mask in self._calls[self._summarised :]:
            self.tag = call_tag
            acc = self._get(layer)
            acc.pending_outliers, latest = mask, acc.pending_outliers
            super().record_attention(layer, stats, num_kv_registers)
            acc.pending_outliers = latest
        self.tag, self._summarised = tag, len(self._calls)
        return super().records()


@contextlib.contextmanager
def record_training_statistics(
    model: nn.Module,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    top_k: int | None = None,
    sqnr: bool = True,
) -> Iterator[TrainingStatistics]:
    """:func:`collect` for a training step: every statistic, with no launch of its own for the key mass.

    Inside, the attention layers return lse, entropy and register share from the forward
    and leave the key mass to the backward (``key_mass_in_backward``: the dK/dV pass sums
    the probabilities it recomputes, deterministically, no [N, N] matrix)::

        with record_training_statistics(model) as stats:
            loss = loss_fn(model(x, t, y))
            loss.backward()
        print(stats.table())

    Run the step eagerly (the key mass is written in place by the eager backward). A layer
    run without gradients computes its key mass in the forward. Outlier rule as :func:`collect`.
    """
    threshold, ratio, top_k = outlier_rule("record_training_statistics", threshold, ratio, top_k)
    report = TrainingStatistics(threshold=threshold, ratio=ratio, top_k=top_k, sqnr=sqnr)
    with recording_into(model, report):
        yield report


# -- register utilisation: how many of its registers a model uses ----------------------


class RegisterUtilisation(NamedTuple):
    """What :func:`register_utilisation` read from one batch, one entry per layer that has registers.

    - ``layers``: the layer names, as :func:`collect` names them (``blocks.3``);
    - ``num_registers`` [L] int64: each layer's registers (its kv registers, then its
      in-sequence ones);
    - ``mass`` [L, R_max] float32: the attention mass each register receives: its
      probability averaged over samples, heads and queries, so that a layer's row sums to
      its register share; NaN past a layer's own register count;
    - ``share`` [L]: the layer's register share (``mass`` summed over its registers);
    - ``effective`` [L]: the effective number of registers in use, exp of the entropy of the
      layer's mass normalised over its registers: 1 when one register takes all of it, R
      when all R take the same; NaN where the registers receive no mass at all.
    """

    layers: list[str]
    num_registers: Tensor
    mass: Tensor
    share: Tensor
    effective: Tensor

    def table(self, top: int = 3) -> str:
        """One line per layer: registers, register share, effective count, and the ``top``
        registers by mass with their part of the layer's register mass."""
        rows = []
        for i, layer in enumerate(self.layers):
            mass = self.mass[i, : int(self.num_registers[i])]
            total = float(mass.sum())
            order = mass.argsort(descending=True)[:top].tolist()
            tops = ", ".join(f"r{j} {float(mass[j]) / total:.2f}" for j in order) if total > 0 else "none"
            rows.append([layer, str(int(self.num_registers[i])), _fmt(float(self.share[i])),
                         _fmt(float(self.effective[i])), tops])  # fmt: skip
        cols = ["layer", "registers", "share", "effective", f"top {top} (part of the register mass)"]
        widths = [max([len(c)] + [len(r[k]) for r in rows]) for k, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)


def _model_sequence_registers(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{layer: (first token, count, groups)} of DSR's in-sequence registers in the package's
    denoisers: ``num_registers`` tokens at the end of the prefix (after JiT's class tokens)
    in every block from ``register_start`` on, and first in every block of DiT^DH's head;
    the video models say theirs (``sequence_registers()``: per-frame groups)."""
    if callable(getattr(model, "sequence_registers", None)):
        return dict(model.sequence_registers())
    R, blocks, counts = getattr(model, "num_registers", 0), getattr(model, "blocks", None), None
    if hasattr(model, "prefix_counts"):
        counts = model.prefix_counts()
    if not R or blocks is None or counts is None:
        return {}
    out = {}
    for i in range(len(blocks)):
        if i >= len(counts):  # DiT^DH's head
            out[f"blocks.{i}"] = (0, R, 1)
        elif i >= model.register_start:
            out[f"blocks.{i}"] = (counts[i] - R, R, 1)
    return out


class _RegisterMassRecorder(OutlierReport):
    """Records each layer's register key mass (and nothing else) for :func:`register_utilisation`."""

    def __init__(self, sequence_registers: dict[str, tuple[int, int, int]]) -> None:
        super().__init__(threshold=None, ratio=4.0, top_k=None, sqnr=False)
        self.sequence_registers = sequence_registers
        self.mass: dict[str, Tensor] = {}  # summed over calls, samples and heads, per query
        self.rows: dict[str, int] = {}  # (sample, head) pairs summed

    def record_norms(self, *args, **kwargs) -> None:
        pass

    def record_attention(self, layer: str, stats: AttentionStats, num_kv_registers: int = 0, *args, **kwargs) -> None:
        key_mass = stats.key_mass.detach().float()
        if key_mass.dim() != 3:
            raise ValueError(
                f"register_utilisation(): layer {layer!r} ran packed (varlen) attention; key_mass "
                f"[B, H, R + Nk] expected, got {list(key_mass.shape)}"
            )
        first, count, groups = self.sequence_registers.get(layer, (0, 0, 1))
        parts = [key_mass[..., :num_kv_registers]]
        if count:
            begin, end = num_kv_registers + first, num_kv_registers + first + count * groups
            if end > key_mass.shape[-1]:
                raise ValueError(
                    f"register_utilisation(): layer {layer!r} has {key_mass.shape[-1] - num_kv_registers} token "
                    f"keys, fewer than its in-sequence registers end at ({first} + {groups} x {count})"
                )
            # register j of every group (a video's per-frame registers: frame-major) is one register
            parts.append(key_mass[..., begin:end].unflatten(-1, (groups, count)).sum(-2))
        regs = torch.cat(parts, -1) / max(stats.lse.shape[-1], 1)  # [B, H, R]: mean probability per query
        if not regs.shape[-1]:
            return
        total = regs.sum((0, 1)).cpu()
        if layer in self.mass and self.mass[layer].shape != total.shape:
            raise ValueError(
                f"register_utilisation(): layer {layer!r} had {self.mass[layer].numel()} registers in one call "
                f"and {total.numel()} in another"
            )
        self.mass[layer] = self.mass.get(layer, 0) + total
        self.rows[layer] = self.rows.get(layer, 0) + regs.shape[0] * regs.shape[1]


def register_utilisation(
    model: nn.Module,
    batch,
    *,
    sequence_registers: dict[str, int | tuple[int, int]] | None = None,
) -> RegisterUtilisation:
    """Per layer, the attention mass each register receives, and the effective number of registers in use.

    Runs ``model`` once on ``batch`` (a tuple or list of positional arguments, a dict of
    keyword arguments, or one tensor) without gradients, and reads the ``key_mass`` the
    fused attention returns (no N x N matrix) in every package-built attention module
    (:class:`~dsr_kernels.RegisterAttention`, the blocks of the reference models, models
    patched by ``dsr_kernels.patch``). A layer's registers are its kv registers (the first
    keys) and its in-sequence registers: in the package's denoisers (DiT, SiT,
    LightningDiT, DiT^DH, JiT) the ``num_registers`` tokens of every block from
    ``register_start`` on; in the video models (Latte, VideoDiT) their global or per-frame
    registers, a frame's register j counted with every other frame's register j; in other
    models the ``sequence_registers`` given, ``{layer: count}`` (the first ``count`` tokens),
    ``{layer: (first token, count)}`` or ``{layer: (first token, count, groups)}`` (``groups``
    consecutive sets of ``count``, register j of each set summed as one), which also replace
    the model's own for the layers they name. Layers without registers are left out.

    ``effective = exp(-sum_j m_j log m_j)``, m the layer's register mass normalised over its
    registers: a trained model whose registers share the mass evenly uses all R; one whose
    mass sits on k of them reads about k, the R to choose for it.
    """
    layout = _model_sequence_registers(model)
    for layer, value in (sequence_registers or {}).items():
        spec = (0, value, 1) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
        spec += (1,) * (len(spec) == 2)
        if len(spec) != 3 or not all(isinstance(v, int) for v in spec) or min(spec[:2]) < 0 or spec[2] < 1:
            raise ValueError(
                f"register_utilisation(): sequence_registers[{layer!r}] must be a count >= 0, "
                f"(first >= 0, count >= 0) or (first >= 0, count >= 0, groups >= 1), got {value!r}"
            )
        layout[layer] = spec
    recorder = _RegisterMassRecorder(layout)
    modules = list(model.named_modules())
    for name, module in modules:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        setattr(module, LAYER_ATTRIBUTE, (recorder, parent or type(model).__name__))
    try:
        with torch.no_grad():
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for _, module in modules:
            if hasattr(module, LAYER_ATTRIBUTE):
                delattr(module, LAYER_ATTRIBUTE)
    if not recorder.mass:
        raise ValueError(
            f"register_utilisation(): no layer of {type(model).__name__} attended to registers: it has no "
            "package-built attention with kv registers, and no in-sequence registers (the model's "
            "num_registers, or sequence_registers={layer: count})"
        )
    layers = list(recorder.mass)
    counts = torch.tensor([recorder.mass[ly].numel() for ly in layers], dtype=torch.int64)
    mass = torch.full((len(layers), int(counts.max())), math.nan)
    for i, ly in enumerate(layers):
        mass[i, : counts[i]] = recorder.mass[ly] / recorder.rows[ly]
    share = mass.nan_to_num(0.0).sum(-1)
    p = mass.nan_to_num(0.0) / share[:, None]
    effective = torch.exp(-torch.special.xlogy(p, p).sum(-1))  # NaN where the share is 0
    return RegisterUtilisation(layers, counts, mass, share, effective)


def __getattr__(name: str):
    # Monitor lives in dsr_kernels.monitor, which builds on this module: imported on first use.
    if name in ("Monitor", "MonitorWriteError"):
        from dsr_kernels import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
