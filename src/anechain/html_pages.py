"""A shard's report page and its sections (html_report.py holds the page primitives and
what is read from a report; html_model.py the model and plan pages that embed these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anechain import report_figures as figs
from anechain.fsutil import human_size
from anechain.html_report import (
    NEXT_TOKEN_COLUMNS,
    badge,
    esc,
    fmt,
    gate_bounds,
    kl_values,
    layer_deltas,
    layer_peaks,
    next_token_rows,
    next_token_series,
    note,
    page,
    section,
    shard_name,
    step_series,
    table,
    window_rows,
)

_STATUS = {"checked": "checked", "report_only": "report only", "not_checked": "not checked"}


# ---- one shard ----------------------------------------------------------------------------


def failure_box(report: Mapping[str, Any]) -> str:
    failed = [g for g in report.get("gates", []) if not g.get("passed")]
    res = report.get("residency") or {}
    lines = [f"gates: {', '.join(g['name'] for g in failed)}"] if failed else []
    if res.get("passed") is False:
        lines.append("residency: " + ("; ".join(res.get("failures") or []) or "failed"))
    first = (report.get("golden") or {}).get("first_nonfinite")
    if first:
        where = f" in layer {first['layer']}" if first.get("layer") is not None else ""
        op = f" at op {first['op']} ({first.get('op_type')})" if first.get("op") else ""
        lines.append(f"first non-finite value: step {first.get('step')}{where}{op}")
    if not lines:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f'<div class="failure"><strong>Failed</strong><ul>{items}</ul></div>'


def gates_section(report: Mapping[str, Any], anchor: str) -> str:
    """Every gate, grouped by the run it judges (side by side: a long list is hard to read)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for g in report.get("gates", []):
        name = str(g["name"])
        run = (
            "decode after prefill"
            if name.startswith("prefill_decode_")
            else "prefill"
            if name.startswith("prefill_")
            else "decode"
        )
        groups.setdefault(run, []).append(g)
    tables = []
    for run, gates in groups.items():
        rows = [
            [
                g["name"],
                g.get("value"),
                f"{g.get('op')} {fmt(g.get('bound'))}",
                _pf(g.get("passed")),
            ]
            for g in gates
        ]
        bad = [not g.get("passed") for g in gates]
        headers = ["gate", "value", "bound", "result"]
        tables.append(f"<div><h4>{esc(run)}</h4>{table(headers, rows, bad)}</div>")
    return section("gates", "Gates", f'<div class="cols">{"".join(tables)}</div>', anchor)


def _pf(passed: Any) -> str:
    return "pass" if passed is True else "FAIL" if passed is False else "-"


def activations_section(
    peaks: Mapping[int, float | None],
    anchor: str,
    name: str,
    colors: Mapping[int, str] | None = None,
) -> str:
    if not peaks:
        body = note(
            "not measured: the runner exposes no per-layer activations (the mil runner does)"
        )
    else:
        svg = figs.to_svg(figs.activation_figure(peaks, colors), f"{name}-activations")
        worst = max((v for v in peaks.values() if v is not None), default=None)
        nonfinite = [k for k, v in peaks.items() if v is None]
        headroom = (
            f"largest: {fmt(worst)}, headroom to the fp16 limit {figs.FP16_MAX / worst:.3g}x"
            if worst
            else ""
        )
        if worst and worst >= figs.ANE_MATMUL_SATURATION:
            headroom += ", above the ANE matmul saturation"

        extra = f"; non-finite in layer(s) {', '.join(map(str, nonfinite))}" if nonfinite else ""
        body = svg + f'<p class="meta">{esc(headroom + extra)}</p>'
    return section("activations", "Largest |activation| per layer", body, anchor)


def errors_section(report: Mapping[str, Any], anchor: str, name: str) -> str:
    series = step_series(report)
    parts = []
    if series:
        fig = figs.step_figure(series, gate_bounds(report))
        parts.append(figs.to_svg(fig, f"{name}-errors"))
    elif report.get("kind") != "head":
        parts.append(note("no per-step errors in this report"))
    headers, rows = window_rows(report)
    if rows:
        parts.append("<h3>Per window, all steps together</h3>" + table(headers, rows))
    if report.get("kind") == "head":
        steps = (report.get("golden") or {}).get("per_step") or []
        flips = [s for s in steps if s.get("token") != s.get("expected")]
        parts.append(
            f'<p class="meta">top-1 tokens: {len(steps) - len(flips)}/{len(steps)} as '
            f"transformers' ({len(flips)} flipped)</p>"
        )
        if flips:
            parts.append(
                table(
                    ["step", "token", "transformers", "margin (logit std)"],
                    [
                        [s.get("step"), s.get("token"), s.get("expected"), s.get("margin")]
                        for s in flips
                    ],
                )
            )
    return section("errors", "Per-step errors", "".join(parts), anchor)


def delta_section(
    deltas: Mapping[int, float | None], bound: float | None, anchor: str, name: str
) -> str:
    if not deltas:
        body = note("not measured: the runner exposes no per-layer outputs (the mil runner does)")
    else:
        svg = figs.to_svg(figs.delta_figure(deltas, bound), f"{name}-delta")
        bad = [
            k for k, v in sorted(deltas.items()) if v is None or (bound is not None and v < bound)
        ]
        finite = {k: v for k, v in deltas.items() if v is not None}
        text = ""
        if finite:
            worst = min(finite, key=lambda k: finite[k])
            text = f"lowest: layer {worst}, {fmt(finite[worst])}"
        if bad:
            text += f"; below the gate or non-finite: layer(s) {', '.join(map(str, bad))}"
        body = svg + f'<p class="meta">{esc(text.lstrip("; "))}</p>'

    return section("delta-cosine", "Per-layer delta cosine", body, anchor)


def kl_section(
    found: Sequence[tuple[str, Any]],
    anchor: str,
    rows: Sequence[Sequence[Any]] = (),
    report: Mapping[str, Any] | None = None,
    name: str = "",
) -> str:
    """The next-token verdict: per-position KL by window (a shard's page), the figures per
    window or shard, the flips; any other KL figure the report holds by where it is."""
    parts = []
    series = next_token_series(report) if report is not None else []
    if series:
        worst = _gate_bound(report, "next_token_kl_worst")
        bounds = {} if worst is None else {"kl": worst}
        parts.append(figs.to_svg(figs.step_figure(series, bounds), f"{name}-kl"))
    if rows:
        parts.append(table(NEXT_TOKEN_COLUMNS, [list(r) for r in rows]))
    flips = ((report or {}).get("golden", {}).get("next_token") or {}).get("metrics", {})
    flips = flips.get("flips") or []
    if flips:
        parts.append(
            table(
                ["window", "position", "reference token", "shard's token", "reference margin"],
                [
                    [f["window"], f["position"], f["expected"], f["token"], f["margin"]]
                    for f in flips
                ],
            )
        )
    others = [f for f in found if not f[0].startswith("golden.next_token")]
    if others:
        parts.append(table(["where", "KL"], [list(f) for f in others]))
    body = "".join(parts) or note("not measured")
    return section("next-token-kl", "Next-token KL", body, anchor)


def _gate_bound(report: Mapping[str, Any] | None, gate: str) -> float | None:
    return next((g["bound"] for g in (report or {}).get("gates", []) if g["name"] == gate), None)


def residency_section(report: Mapping[str, Any], anchor: str, name: str) -> str:
    res = report.get("residency") or {}
    status = str(res.get("status"))
    label = _STATUS.get(status, status)
    if status == "not_checked":  # never drawn as zeros: nothing was counted
        reason = res.get("reason") or ""
        body = f"<p><strong>not checked</strong>{esc(': ' + reason if reason else '')}</p>"
        return section("residency", "Residency", body, anchor)
    functions = res.get("functions") or {"/".join(report.get("functions") or {}) or "package": res}
    counts = {f: r["counts"] for f, r in functions.items() if r.get("counts")}
    rows, bad = [], []
    for f, r in functions.items():
        c = r.get("counts") or {}
        verdict = "report only" if status == "report_only" else _pf(r.get("passed"))
        rows.append(
            [
                f,
                f"{c.get('compute_ane', '?')}/{c.get('compute_total', '?')}",
                c.get("compute_cpu"),
                c.get("compute_gpu"),
                f"{c.get('conv_ane', '?')}/{c.get('conv_total', '?')}",
                f"{c.get('plumbing_non_ane', '?')}/{c.get('plumbing_total', '?')}",
                c.get("index_ops"),
                c.get("state_ops"),
                verdict,
            ]
        )
        bad.append(r.get("passed") is False and status == "checked")
    headers = [
        "function",
        "compute on ANE",
        "on CPU",
        "on GPU",
        "conv on ANE",
        "plumbing off ANE",
        "index ops",
        "state ops",
        "result",
    ]
    source = res.get("plan_source") or ""
    verdict = {True: ": pass", False: ": FAIL"}.get(res.get("passed"), "")
    head = f"<p><strong>{esc(label + verdict)}</strong>"
    head += esc(f" (plan: {source})") if source else ""
    if status == "report_only":
        head += esc(" - counted, not gated: this Mac's Core ML lists no Neural Engine")
    head += "</p>"
    svg = figs.to_svg(figs.residency_figure(counts), f"{name}-residency") if counts else ""
    fails = res.get("failures") or []
    fail_list = "<ul>" + "".join(f"<li>{esc(f)}</li>" for f in fails) + "</ul>" if fails else ""
    return section(
        "residency", "Residency", head + table(headers, rows, bad) + svg + fail_list, anchor
    )


def shard_body(report: Mapping[str, Any], anchor: str = "", per_layer: bool = True) -> str:
    """A shard's sections; `per_layer` False leaves the per-layer figures to the model page."""
    ident = anchor.rstrip("-") or "shard"
    pkg = dict(report.get("package") or {})
    pkg["path"] = Path(str(pkg.get("path", ""))).name
    verdict = str(report.get("verdict"))
    meta = (
        f"{esc(pkg['path'])} &middot; {esc(_what(report))} &middot; "
        f"{esc(human_size(pkg['size_bytes']) if 'size_bytes' in pkg else '?')} &middot; "
        f"backend {esc(report.get('backend'))} &middot; {esc(report.get('steps'))} steps"
        f" &middot; functions {esc(', '.join(report.get('functions') or {}))}"
    )
    parts = [
        f'<h2 id="{esc(ident)}">{esc(_title(report))} {badge(verdict)}</h2>',
        f'<p class="meta">{meta}</p>',
        failure_box(report),
        gates_section(report, anchor),
    ]
    delta_bound = next(
        (g["bound"] for g in report.get("gates", []) if g["name"] == "layer_delta_cosine"), None
    )
    if report.get("kind") == "layers" and per_layer:
        parts.append(activations_section(layer_peaks(report), anchor, ident))
    parts.append(errors_section(report, anchor, ident))
    if report.get("kind") == "layers" and per_layer:
        parts.append(delta_section(layer_deltas(report), delta_bound, anchor, ident))
    if per_layer:
        parts.append(kl_section(kl_values(report), anchor, next_token_rows(report), report, ident))
    parts.append(residency_section(report, anchor, ident))
    versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())
    parts.append(f'<p class="meta">{esc(report.get("created", ""))} &middot; {esc(versions)}</p>')
    return f'<div class="shard" data-verdict="{esc(verdict)}">{"".join(parts)}</div>'


def _title(report: Mapping[str, Any]) -> str:
    return f"layers {report['layers']}" if report.get("layers") else str(report.get("kind"))


def _what(report: Mapping[str, Any]) -> str:
    n = report.get("num_hidden_layers")
    if report.get("layers"):
        return f"decoder layers {report['layers']} of {n}"
    return f"final norm and LM head of a {n}-layer model"


def shard_page(report: Mapping[str, Any]) -> str:
    """The page of one validated package (a report's JSON, `ValidationReport.to_dict()`)."""
    title = f"anechain: {report.get('package', {}).get('path', shard_name(report))}"
    head = f"<h1>{esc(title)}</h1>"
    return page(title, head + shard_body(report))
