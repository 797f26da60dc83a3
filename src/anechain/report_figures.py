"""The report page's figures: matplotlib's own SVG backend, inline-ready SVG text.

Only the object API (`Figure` + `FigureCanvasSVG`): no pyplot, so no global figure state and
no GUI or Agg backend is chosen. Text stays text (`svg.fonttype: none`), small and
searchable in the page; output is byte-identical for the same data (fixed hash salt per
figure, no date), so a page can be compared across runs.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
from matplotlib import lines, patches, ticker
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

FP16_MAX = 65504.0
# The largest fp16 below 2**15: where the ANE's matmul saturates (issue 19: "about 32752").
ANE_MATMUL_SATURATION = 32752.0

PASS, FAIL, MUTED = "#2e7d32", "#c62828", "#9e9e9e"
SERIES = ("#1f5fa8", "#e07b00", "#6a3d9a", "#00897b", "#b8860b", "#ad1457")
_STYLE = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#777777",
    "axes.titlesize": 10.0,
    "axes.titleweight": "bold",
    "legend.frameon": False,
    "legend.fontsize": 8.0,
}


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an inline <svg> element (no XML prolog, no fixed size: it scales).

    `name` salts the ids matplotlib generates (clip paths), so two figures in one page
    never share an id, and the same figure gives the same bytes every time."""
    buf = io.StringIO()
    with matplotlib.rc_context({**_STYLE, "svg.hashsalt": f"anechain-{name}"}):
        FigureCanvasSVG(fig)
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    svg = text[text.index("<svg") :]
    head, rest = svg.split(">", 1)
    # Drop the fixed width/height (pt): the viewBox keeps the aspect, CSS sets the width.
    attrs = [a for a in head.split("\n") if not a.strip().startswith(("width=", "height="))]
    return _own_ids(
        f'{" ".join(a.strip() for a in attrs)} role="img" aria-label="{name}">{rest}', name
    )


def _own_ids(svg: str, name: str) -> str:
    """Every id of the SVG (matplotlib numbers them per figure: figure_1, axes_1, ...) and
    every reference to one prefixed with `name`: ids must be unique in the page."""
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", name) + "-"
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
    return re.sub(
        r'(url\(#|href="#)([^")]+)',
        lambda m: m.group(1) + prefix + m.group(2) if m.group(2) in ids else m.group(0),
        svg,
    )


def _finite(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


# ---- activation headroom ------------------------------------------------------------------


def activation_figure(
    peaks: Mapping[int, float | None], colors: Mapping[int, str] | None = None
) -> Figure:
    """Each layer's largest |activation| (log scale) under the fp16 limit and the ANE
    matmul saturation. A layer whose value is None (non-finite) reaches the top, in red."""
    layers = sorted(peaks)
    fig = _figure(8.5, 2.6)
    with matplotlib.rc_context(_STYLE):
        ax = fig.add_subplot()
        finite = [v for v in (_finite(peaks[k]) for k in layers) if v]
        top = max([FP16_MAX * 4, *(v * 2 for v in finite)])
        bottom = min([1.0, *(v / 3 for v in finite)])
        heights, bar_colors = [], []
        for k in layers:
            v = _finite(peaks[k])
            heights.append(top if v is None else max(v, bottom))
            over = v is None or v >= ANE_MATMUL_SATURATION
            bar_colors.append(FAIL if over else (colors or {}).get(k, SERIES[0]))
        ax.bar([str(k) for k in layers], heights, color=bar_colors, width=0.7)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.axhline(FP16_MAX, color=FAIL, linewidth=1.2, label="fp16 limit 65504")
        ax.axhline(
            ANE_MATMUL_SATURATION,
            color="#e07b00",
            linewidth=1.2,
            linestyle="--",
            label="ANE matmul saturation ~32752",
        )
        for i, k in enumerate(layers):
            if _finite(peaks[k]) is None:
                ax.text(i, bottom * 1.5, "NaN/Inf", rotation=90, ha="center", color="white")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("largest |activation|")
        ax.legend(loc="upper left", ncols=2)
    return fig


# ---- per-step errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One window's per-step figures: x (step or position), metric name -> values."""

    window: str
    x: list[int]
    values: dict[str, list[float | None]]


_LABELS = {
    "rel_rmse": "rel_rmse: the step's RMSE",
    "rel_max_abs": "rel_max_abs: worst element's |error|, scaled",
}


def step_figure(series: Sequence[Series], bounds: Mapping[str, float]) -> Figure:
    """One panel per window, every metric it has on a log scale, each gate's bound dashed."""
    n = len(series)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(8.5, 2.5 * rows + 0.3)
    metrics = sorted({m for s in series for m in s.values})
    color = {m: SERIES[i % len(SERIES)] for i, m in enumerate(metrics)}
    with matplotlib.rc_context(_STYLE):
        # One y scale for every window, so a worse window looks worse.
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
        nonfinite = False
        for ax, s in zip(axes.flat, series, strict=False):
            ax.set_xlim(min(s.x) - 0.6, max(s.x) + 0.6)
            for m, ys in s.values.items():
                pts = [(x, y) for x, y in zip(s.x, ys, strict=True) if _finite(y) is not None]
                pts = [(x, max(y, 1e-6)) for x, y in pts]  # an exact 0 has no log
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, color=color[m])
                if m in bounds:
                    ax.axhline(bounds[m], color=color[m], linestyle="--", linewidth=1)
            missing = {
                x
                for ys in s.values.values()
                for x, y in zip(s.x, ys, strict=True)
                if _finite(y) is None
            }
            for x in sorted(missing):  # a non-finite step is shown, never dropped silently
                ax.axvspan(x - 0.3, x + 0.3, color=FAIL, alpha=0.35, linewidth=0)
            nonfinite = nonfinite or bool(missing)
            ax.set_yscale("log")
            ax.set_title(f"{s.window} ({len(s.x)} steps)")
            ax.set_xlabel("position")
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        relative = all(m.startswith("rel_") for m in metrics)
        for row in axes:
            row[0].set_ylabel("error / RMS(reference)" if relative else "value")
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        handles = [
            lines.Line2D([], [], color=color[m], marker="o", markersize=3, label=_LABELS.get(m, m))
            for m in metrics
        ]
        handles.append(lines.Line2D([], [], color="#555555", linestyle="--", label="gate bound"))
        if nonfinite:
            handles.append(patches.Patch(color=FAIL, alpha=0.35, label="NaN/Inf at this step"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    return fig


# ---- per-layer delta cosine ---------------------------------------------------------------


def delta_figure(deltas: Mapping[int, float | None], bound: float | None) -> Figure:
    """1 - each layer's delta cosine (log scale: 0.9999 and 0.99 apart), the gate dashed."""
    layers = sorted(deltas)
    fig = _figure(8.5, 2.4)
    with matplotlib.rc_context(_STYLE):
        ax = fig.add_subplot()
        gaps = [_finite(deltas[k]) for k in layers]
        shown = [max(1 - g, 1e-7) if g is not None else 2.0 for g in gaps]
        failed = [g is None or (bound is not None and g < bound) for g in gaps]
        ax.bar(
            [str(k) for k in layers],
            shown,
            color=[FAIL if f else SERIES[2] for f in failed],
            width=0.7,
        )
        ax.set_yscale("log")
        ax.set_ylim(min([1e-5, *(s / 3 for s in shown)]), 3.0)
        if bound is not None:
            ax.axhline(
                1 - bound, color=FAIL, linestyle="--", linewidth=1.2, label=f"gate: >= {bound:g}"
            )
            ax.legend(loc="upper left")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("1 - delta cosine")
    return fig


# ---- residency ----------------------------------------------------------------------------


def residency_figure(counts: Mapping[str, Mapping[str, int]]) -> Figure:
    """Per function: fp16 compute ops by preferred device, and plumbing on/off the ANE."""
    names = list(counts)
    fig = _figure(8.5, 0.55 * 2 * len(names) + 1.0)
    with matplotlib.rc_context(_STYLE):
        ax = fig.add_subplot()
        ax.grid(axis="y", visible=False)
        labels, y = [], 0
        widest = max(
            max(c.get("compute_total", 0), c.get("plumbing_total", 0)) for c in counts.values()
        )
        parts = (
            ("compute on ANE", "compute_ane", PASS),
            ("compute on CPU", "compute_cpu", FAIL),
            ("compute on GPU", "compute_gpu", "#e07b00"),
            ("plumbing on ANE", "plumbing_on_ane", "#81c784"),
            ("plumbing off ANE", "plumbing_non_ane", MUTED),
        )
        for name in names:
            c = dict(counts[name])
            c["plumbing_on_ane"] = c.get("plumbing_total", 0) - c.get("plumbing_non_ane", 0)
            for row, keys in ((f"{name}: compute", parts[:3]), (f"{name}: plumbing", parts[3:])):
                left = 0
                for label, key, colour in keys:
                    n = int(c.get(key, 0))
                    if n:
                        ax.barh(y, n, left=left, color=colour, label=label, height=0.6)
                    if n >= 0.04 * widest:  # a count that fits in its bar
                        ax.text(left + n / 2, y, str(n), ha="center", va="center", color="white")
                    left += n
                labels.append(row)
                y += 1
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("ops (by preferred device)")
        seen: dict[str, object] = {}
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
        fig.legend(
            list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=len(seen)
        )
    return fig


# ---- topology -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One shard in the topology bar."""

    start: int
    end: int
    label: str  # "0:3"
    size: str  # "377 KB"
    verdict: str  # "pass" | "fail" | anything else (not validated)


def topology_figure(segments: Sequence[Segment], num_layers: int) -> Figure:
    """The model's layers as a bar, a segment per shard with its range, size and verdict.
    Overlapping segments (ranges a plan tried) go on rows of their own, in order."""
    rows: list[list[Segment]] = []
    for s in segments:
        row = next((r for r in rows if all(s.end <= o.start or o.end <= s.start for o in r)), None)
        if row is None:
            rows.append(row := [])
        row.append(s)
    fig = _figure(8.5, 1.2 + 0.75 * max(len(rows), 1))
    with matplotlib.rc_context(_STYLE):
        ax = fig.add_subplot()
        ax.grid(False)
        for y, row in enumerate(rows):
            for s in row:
                colour = PASS if s.verdict == "pass" else FAIL if s.verdict == "fail" else MUTED
                ax.barh(
                    y, s.end - s.start, left=s.start, color=colour, edgecolor="white", height=0.9
                )
                ax.text(
                    (s.start + s.end) / 2,
                    y,
                    f"{s.label}\n{s.size}\n{s.verdict}",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=8,
                )
        ax.set_xlim(0, max(num_layers, 1))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_yticks([])
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.spines["left"].set_visible(False)
    return fig
