"""The model's report pages: `build`'s and `plan`'s, the topology and model-wide per-layer
figures, then every shard's sections (html_pages.py) under its own anchor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anechain import report_figures as figs
from anechain.fsutil import human_size
from anechain.html_pages import activations_section, delta_section, kl_section, shard_body
from anechain.html_report import (
    Entry,
    anchor_of,
    badge,
    esc,
    kl_values,
    layer_deltas,
    layer_peaks,
    next_token_rows,
    page,
    section,
    table,
)

# ---- a model: build and plan --------------------------------------------------------------


def _merged(entries: Sequence[Entry], what: Any, worst: Any) -> dict[int, float | None]:
    """Per layer across shards; where shards overlap (a plan's tries) the worst value, a
    non-finite one (None) first."""
    out: dict[int, float | None] = {}
    for e in entries:
        if e.report is None or e.report.get("kind") != "layers":
            continue
        for k, v in what(e.report).items():
            if k not in out:
                out[k] = v
            elif out[k] is not None:
                out[k] = None if v is None else worst(out[k], v)
    return out


def model_page(
    title: str,
    entries: Sequence[Entry],
    num_layers: int,
    summary: str = "",
    extra: str = "",
) -> str:
    """An index page: the topology, model-wide per-layer figures, then every shard's
    sections, each under its own anchor. `summary`/`extra` are HTML (already escaped)."""
    layered = [e for e in entries if e.report is not None and e.report.get("layers")]
    segments = []
    for e in layered:
        start, end = (int(x) for x in str(e.report["layers"]).split(":"))  # type: ignore[index]
        size = human_size(e.size_bytes) if e.size_bytes is not None else "?"
        segments.append(figs.Segment(start, end, e.name, size, e.verdict or "-"))
    verdicts = [e.verdict for e in entries if e.report is not None]
    overall = "pass" if verdicts and all(v == "pass" for v in verdicts) else "fail"
    nav = "".join(
        f'<a href="#{esc(anchor_of(e.name).rstrip("-"))}">{esc(e.name)}</a>'
        for e in entries
        if e.report is not None
    )
    rows = [
        [
            e.name,
            e.file,
            human_size(e.size_bytes) if e.size_bytes is not None else "-",
            e.verdict or "-",
            e.note,
        ]
        for e in entries
    ]
    body = [
        f"<h1>{esc(title)} {badge(overall)}</h1>",
        summary,
        f"<nav>{nav}</nav>",
        section(
            "topology",
            "Topology",
            (
                figs.to_svg(figs.topology_figure(segments, num_layers), "topology")
                if segments
                else ""
            )
            + table(
                ["artifact", "file", "size", "verdict", ""],
                rows,
                [e.verdict == "fail" for e in entries],
            ),
        ),
        activations_section(
            _merged(entries, layer_peaks, max), "", "model", _shard_colors(layered)
        ),
        delta_section(_merged(entries, layer_deltas, min), _delta_bound(entries), "", "model"),
        kl_section(
            [(f"{e.name}: {w}", v) for e in entries if e.report for w, v in kl_values(e.report)],
            "",
            [r for e in entries if e.report for r in next_token_rows(e.report, f"{e.name}: ")],
        ),
        extra,
    ]
    shards = "".join(
        shard_body(e.report, anchor_of(e.name), per_layer=False)
        for e in entries
        if e.report is not None
    )
    body.append(f'<section data-section="shards" id="shards"><h2>Shards</h2>{shards}</section>')
    return page(title, "".join(body))


def _shard_colors(entries: Sequence[Entry]) -> dict[int, str]:
    """Layer -> a colour alternating by shard, so the shards show in per-layer figures."""
    out = {}
    for i, e in enumerate(entries):
        start, end = (int(x) for x in str(e.report["layers"]).split(":"))  # type: ignore[index]
        out.update({k: ("#1f5fa8", "#6fa8dc")[i % 2] for k in range(start, end)})
    return out


def _delta_bound(entries: Sequence[Entry]) -> float | None:
    for e in entries:
        for g in (e.report or {}).get("gates", []):
            if g["name"] == "layer_delta_cosine":
                return float(g["bound"])
    return None


def build_page(result: Any) -> str:
    """`build`'s index page (a build.BuildResult)."""
    entries = [
        Entry(
            a.name,
            a.path.name,
            a.size_bytes,
            a.report.to_dict() if a.report is not None else None,
            "reused" if a.reused else "built",
        )
        for a in result.artifacts
    ]
    num_layers = max(
        (e.report.get("num_hidden_layers") or 0 for e in entries if e.report), default=0
    )
    lines = [f"checkpoint {result.checkpoint}"]
    lines.append(
        f"manifest {result.manifest.name}" if result.manifest else "no manifest: a shard failed"
    )
    lines += [c.describe() for c in (result.generation, result.chain) if c is not None]
    summary = "".join(f'<p class="meta">{esc(line)}</p>' for line in lines)
    return model_page(f"anechain build: {result.out_dir.name}", entries, num_layers, summary)


def plan_page(outcome: Any, num_layers: int) -> str:
    """`plan`'s page (a plan.PlanOutcome): the chosen topology, every range tried."""
    from anechain.report_read import read_report

    entries = []
    for r, path in zip(outcome.search.topology, outcome.reports, strict=True):
        _, report = read_report(path)
        entries.append(Entry(str(r), report.package.name, report.size_bytes, report.to_dict()))
    attempts = _attempts_section(outcome.search.attempts)
    summary = f'<p class="meta">manifest {esc(outcome.manifest_path.name)}</p>'
    return model_page("anechain plan", entries, num_layers, summary, attempts)


def plan_failure_page(error: Any, num_layers: int) -> str:
    """`plan`'s page when no topology passes (a search.PlanError): every range tried, with
    the reports of those validated, the failing ones first in the eye."""
    from anechain.report_read import read_report

    entries, seen = [], set()
    for a in error.attempts:
        path = a.result.report
        if path is None or a.layers in seen or not path.is_file():
            continue
        seen.add(a.layers)
        _, report = read_report(path)
        entries.append(
            Entry(str(a.layers), report.package.name, report.size_bytes, report.to_dict())
        )
    summary = f'<div class="failure"><strong>{esc(error)}</strong></div>'
    return model_page(
        "anechain plan: no topology passes",
        entries,
        num_layers,
        summary,
        _attempts_section(error.attempts),
    )


def _attempts_section(attempts: Sequence[Any]) -> str:
    rows, bad = [], []
    for n, a in enumerate(attempts, start=1):
        res = a.result
        verdict = "pass" if res.passed else "FAIL " + ", ".join(res.failed_gates)
        size = human_size(res.size_bytes) if res.size_bytes is not None else "-"
        rows.append([n, str(a.layers), size, a.phase, res.residency or "-", verdict, a.decision])
        bad.append(not res.passed)
    headers = ["#", "layers", "size", "phase", "residency", "result", "decision"]
    return section("attempts", f"Ranges tried ({len(rows)})", table(headers, rows, bad))
