"""The report page: one self-contained HTML file per shard (`validate shard --html`), per
model (`build`) and per plan (`plan`).

Inline SVG figures (report_figures.py), inline CSS, no script, no network: the file opens
anywhere and shows the same thing. Everything drawn comes from validation reports' JSON
(`ValidationReport.to_dict()`, gates recomputed); windows and metrics are rendered by the
names the report gives them, so a window or metric added to the report shows without a
change here. Every text from a report is escaped.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anechain import report_figures as figs
from anechain.fsutil import atomic_write_text
from anechain.report import GATE_SETS, PREFILL_GATES

# Section names every page has (data-section attributes; the browser test checks them).
SHARD_SECTIONS = ("gates", "activations", "errors", "delta-cosine", "next-token-kl", "residency")
MODEL_SECTIONS = ("topology", "activations", "delta-cosine", "next-token-kl", "shards")

# The per-step figures the error panels draw, by the names the report's steps carry.
STEP_METRICS = ("rel_rmse", "rel_max_abs")
_KL = re.compile(r"(^|_)kl($|_)", re.IGNORECASE)
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;
color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
h3{font-size:15px;margin:18px 0 6px}
section.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 18px;
margin:14px 0}
.meta{color:#5a6272;font-size:13px}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff;
font-size:13px}
.pass{background:#2e7d32}.fail{background:#c62828}.other{background:#757575}
.failure{border-left:4px solid #c62828;background:#fdecea;padding:8px 12px;margin:8px 0}
.note{color:#5a6272;font-style:italic}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e6e8ec;padding:3px 10px;text-align:left;white-space:nowrap}
td.wrap{white-space:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{color:#c62828;font-weight:600}
svg{width:100%;height:auto;display:block}
nav a{margin-right:12px}
.cols{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
h4{margin:6px 0 2px;font-size:13px;color:#5a6272}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A figure for a table: 6 significant digits; non-finite (null) shown as such."""
    if value is None:
        return "non-finite"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}" if math.isfinite(value) else "non-finite"


_WRAP = ' class="wrap"'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], bad: Sequence[bool] = ()) -> str:
    flags = list(bad)
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="bad"' if i < len(flags) and flags[i] else ""
        cells = "".join(
            f'<td class="num">{esc(fmt(c))}</td>'
            if isinstance(c, int | float) or c is None
            # Short cells stay on one line; long text (a list of gates) wraps.
            else f"<td{_WRAP if len(str(c)) > 40 else ''}>{esc(c)}</td>"
            for c in row
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def section(name: str, title: str, body: str, anchor: str = "") -> str:
    return (
        f'<section class="card" data-section="{esc(name)}" id="{esc(anchor + name)}">'
        f"<h3>{esc(title)}</h3>{body}</section>"
    )


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def badge(verdict: str | None) -> str:
    cls = verdict if verdict in ("pass", "fail") else "other"
    return f'<span class="badge {cls}">{esc((verdict or "not validated").upper())}</span>'


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No script, no fetch, no external style: nothing leaves the file.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_page(path: str | Path, text: str) -> Path:
    """Write a page atomically (whole or not at all)."""
    atomic_write_text(path, text)
    return Path(path)


# ---- what the reports hold ------------------------------------------------------------------


def gate_bounds(report: Mapping[str, Any]) -> dict[str, float]:
    """metric name -> the bound its gate applied (decode's gates; prefill's share bounds)."""
    applied = {g["name"]: g["bound"] for g in report.get("gates", [])}
    out = {}
    for spec in (*GATE_SETS.get(report.get("kind", ""), ()), *PREFILL_GATES):
        if spec.name in applied and spec.metric not in out:
            out[spec.metric] = applied[spec.name]
    for name, bound in applied.items():  # gates the specs here do not know (e.g. a KL)
        if _KL.search(name):
            out.setdefault(name, bound)
    return out


def step_series(report: Mapping[str, Any]) -> list[figs.Series]:
    """Every window's per-step error figures: decode's windows by the name each step
    carries, then prefill's positions by function (prefill, then decode after it)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in report.get("golden", {}).get("per_step", []):
        # The head's steps carry no window: one run of decode steps.
        groups.setdefault(str(row.get("window", "decode")), []).append(row)
    for row in (report.get("prefill") or {}).get("per_position", []):
        fn = str(row.get("function", "prefill"))
        name = "prefill" if fn == "prefill" else f"{fn} after prefill"
        groups.setdefault(name, []).append(row)
    # The long window: the runtime's prompt through the shard's own cache, then decode.
    for row in (report.get("long") or {}).get("per_position", []):
        groups.setdefault("long", []).append(row)
    series = []
    for name, rows in groups.items():
        keys = [m for m in STEP_METRICS if any(m in r for r in rows)]
        keys += sorted({k for r in rows for k in r if _KL.search(k)})
        if not keys:  # e.g. the head's steps: tokens, shown as a table
            continue
        x = [int(r.get("step", r.get("position", i))) for i, r in enumerate(rows)]
        series.append(figs.Series(name, x, {k: [r.get(k) for r in rows] for k in keys}))
    return series


def window_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Each window's whole-run figures, every metric the report has for it."""
    windows: dict[str, Mapping[str, Any]] = dict(report.get("golden", {}).get("windows") or {})
    prefill = report.get("prefill") or {}
    if prefill.get("metrics"):
        windows["prefill"] = prefill["metrics"]
    if prefill.get("decode_metrics"):
        windows["prefill then decode"] = prefill["decode_metrics"]
    long = report.get("long") or {}
    if long.get("metrics"):
        windows["long"] = long["metrics"]
    metrics = sorted({k for w in windows.values() for k in w})
    return ["window", *metrics], [
        [name, *(w.get(k) for k in metrics)] for name, w in windows.items()
    ]


NEXT_TOKEN_COLUMNS = [
    "window",
    "positions",
    "KL mean",
    "KL worst",
    "top-1",
    "flips",
    "worst flip margin",
]


def next_token_rows(report: Mapping[str, Any], label: str = "") -> list[list[Any]]:
    """The next-token verdict (nexttoken.py) per window, then over every position."""
    verdict = report.get("golden", {}).get("next_token") or {}

    def row(name: str, m: Mapping[str, Any]) -> list[Any]:
        return [
            f"{label}{name}",
            m.get("positions"),
            m.get("kl_mean"),
            m.get("kl_worst"),
            m.get("top1_agreement"),
            len(m.get("flips") or []),
            m.get("worst_flip_margin"),
        ]

    rows = [row(name, m) for name, m in (verdict.get("windows") or {}).items()]
    if verdict.get("metrics"):
        rows.append(row("all", verdict["metrics"]))
    return rows


def next_token_series(report: Mapping[str, Any]) -> list[figs.Series]:
    """Per-position KL(reference || shard) of the next-token verdict, one panel per window."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in (report.get("golden", {}).get("next_token") or {}).get("per_position", []):
        groups.setdefault(str(r.get("window")), []).append(r)
    return [
        figs.Series(name, [int(r["position"]) for r in rows], {"kl": [r.get("kl") for r in rows]})
        for name, rows in groups.items()
    ]


def kl_values(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Every next-token KL figure the report holds, where it is: [(place, value)]."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                here = f"{where}.{k}" if where else str(k)
                if _KL.search(str(k)) and not isinstance(v, Mapping | list):
                    found.append((here, v))
                else:
                    walk(v, here)

    golden = report.get("golden", {})
    walk({"metrics": golden.get("metrics"), "windows": golden.get("windows")}, "golden")
    for k, v in report.items():
        if _KL.search(str(k)):
            walk({k: v}, "")
    return found


def layer_peaks(report: Mapping[str, Any]) -> dict[int, float | None]:
    return {int(k): v for k, v in (report.get("golden", {}).get("layer_max_abs") or {}).items()}


def layer_deltas(report: Mapping[str, Any]) -> dict[int, float | None]:
    return {
        int(m["layer"]): m.get("delta_cosine")
        for m in report.get("golden", {}).get("layers") or []
        if "layer" in m
    }


def shard_name(report: Mapping[str, Any]) -> str:
    return str(report.get("layers") or report.get("kind") or "?")


def anchor_of(name: str) -> str:
    return "shard-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + "-"


@dataclass(frozen=True)
class Entry:
    """One artifact on a model page: its report's JSON, or None (not validated)."""

    name: str  # "0:3", "head", "embedding"
    file: str
    size_bytes: int | None
    report: Mapping[str, Any] | None = None
    note: str = ""  # "reused", "cached", ...

    @property
    def verdict(self) -> str | None:
        return None if self.report is None else str(self.report.get("verdict"))
