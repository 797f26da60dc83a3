"""Residency reports as table rows (the CLI prints them; `capture` summarises with them).

A two-function package (decode + prefill) shows each function's counts, then the package's
sums; each function is gated on its own.
"""

from __future__ import annotations

from anechain.residency.gate import NOT_REPORTED, STATUS_REPORT_ONLY, ResidencyReport
from anechain.residency.match import OpChange


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _counts_rows(report: ResidencyReport, prefix: str = "") -> list[list[str]]:
    c = report.counts
    if c is None:  # Core ML gave no device usage: structure only, never zeros
        return [
            [f"{prefix}device usage", NOT_REPORTED],
            [f"{prefix}conv ops in the plan", str(report.plan_ops[1])],
        ]
    return [
        [f"{prefix}conv on ANE", f"{c.conv_ane}/{c.conv_total}"],
        [f"{prefix}fp16 compute on ANE", f"{c.compute_ane}/{c.compute_total}"],
        [f"{prefix}fp16 compute off ANE", str(c.compute_non_ane)],
        [f"{prefix}plumbing off ANE", f"{c.plumbing_non_ane}/{c.plumbing_total}"],
        [f"{prefix}  int32 index / state ops", f"{c.index_ops} / {c.state_ops}"],
        [f"{prefix}  share of plan ({report.plumbing_basis})", _pct(report.plumbing_share)],
    ]


def several_functions(report: ResidencyReport) -> bool:
    return len(report.functions) > 1


def _names(changes: tuple[OpChange, ...]) -> str:
    shown = [f"{c.was} -> {c.name}" if c.was else c.name for c in changes[:4]]
    more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
    return ", ".join(shown) + more


def _match_rows(report: ResidencyReport, prefix: str = "") -> list[list[str]]:
    """What the compiler changed (a live plan matched leniently); nothing when it matched."""
    m = report.match
    rows = [[f"{prefix}plan vs program", f"{m.mode}: {m.exact} ops matched by name"]]
    for kind, changes in (("renamed", m.renamed), ("added", m.added), ("removed", m.removed)):
        if changes:
            rows.append([f"{prefix}  compiler {kind}", f"{len(changes)}: {_names(changes)}"])
    return rows if m.changed else []


def summary_rows(report: ResidencyReport) -> list[list[str]]:
    rows: list[list[str]] = []
    if several_functions(report):
        names = [f.function for f in report.functions]
        rows.append(["functions (each gated)", ", ".join(names)])
        for f in report.functions:
            rows += _counts_rows(f, f"{f.function}: ") + _match_rows(f, f"{f.function}: ")
        if report.counts is not None:
            # Sums of the functions Core ML reported; the others are named, never summed as 0.
            label = "package: " if not report.unreported else "package (reported only): "
            rows += _counts_rows(report, label)
            rows[-1][0] = f"{label}  largest function share"
        if report.unreported:
            rows.append(["package: usage " + NOT_REPORTED, ", ".join(report.unreported)])
    else:
        rows += _counts_rows(report) + _match_rows(report)
    c = report.counts
    if c is None:
        return rows
    return rows + [
        # Every function's ops are in the plan, reported or not.
        ["ops (incl. const)", str(report.plan_ops[0] if report.unreported else c.ops_total)],
        ["compute by device", ", ".join(f"{d} {n}" for d, n in c.by_device.items())],
        ["ANE share of est. cost", _pct(report.ane_cost_share)],
    ]


CHANGE_HEADERS = ["compiler change", "type", "name", "class (from)"]


def change_rows(report: ResidencyReport) -> list[list[str]]:
    """One row per op the compiler renamed, added or removed, per function."""
    return [
        [
            kind,
            c.type,
            prefix + (f"{c.was} -> {c.name}" if c.was else c.name),
            f"{c.op_class} ({c.source})",
        ]
        for prefix, r in _by_function(report)
        for kind, changes in (
            ("renamed", r.match.renamed),
            ("added", r.match.added),
            ("removed", r.match.removed),
        )
        for c in changes
    ]


NON_ANE_HEADERS = ["fp16 op off ANE", "name", "preferred", "supported"]
PLUMBING_HEADERS = ["plumbing op", "class", "name", "preferred", "est. cost"]


def _by_function(report: ResidencyReport) -> list[tuple[str, ResidencyReport]]:
    """(name shown with each op, report): the function's name when there are several."""
    if several_functions(report):
        return [(f"{f.function}: ", f) for f in report.functions]
    return [("", report)]


def non_ane_rows(report: ResidencyReport) -> list[list[str]]:
    return [
        [op.type, prefix + op.name, op.preferred or "-", ",".join(op.supported) or "-"]
        for prefix, r in _by_function(report)
        for op in r.non_ane_ops
    ]


def plumbing_rows(report: ResidencyReport) -> list[list[str]]:
    return [
        [
            c.op.type,
            c.op_class,
            prefix + c.op.name,
            c.op.preferred or "-",
            "-" if c.op.cost is None else f"{c.op.cost:.4g}",
        ]
        for prefix, r in _by_function(report)
        for c in r.plumbing_ops
    ]


def verdict_lines(report: ResidencyReport) -> list[str]:
    if report.status == STATUS_REPORT_ONLY:
        verdict = "would pass" if not report.failures else "would FAIL"
        head = [f"gate not enforced ({report.reason or 'report only'}): {verdict}"]
    else:
        head = ["residency: PASS" if report.passed else "residency: FAIL"]
    return head + [f"  - {reason}" for reason in report.failures]
