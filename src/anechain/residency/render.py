"""Residency reports as table rows (the CLI prints them; `capture` summarises with them).

A two-function package (decode + prefill) shows each function's counts, then the package's
sums; each function is gated on its own.
"""

from __future__ import annotations

from anechain.residency.gate import STATUS_REPORT_ONLY, ResidencyReport


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _counts_rows(report: ResidencyReport, prefix: str = "") -> list[list[str]]:
    c = report.counts
    assert c is not None  # checked or report_only always carry counts
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


def summary_rows(report: ResidencyReport) -> list[list[str]]:
    c = report.counts
    assert c is not None
    rows: list[list[str]] = []
    if several_functions(report):
        names = [f.function for f in report.functions]
        rows.append(["functions (each gated)", ", ".join(names)])
        for f in report.functions:
            rows += _counts_rows(f, f"{f.function}: ")
        rows += _counts_rows(report, "package: ")
        rows[-1][0] = "package:   largest function share"
    else:
        rows += _counts_rows(report)
    return rows + [
        ["ops (incl. const)", str(c.ops_total)],
        ["compute by device", ", ".join(f"{d} {n}" for d, n in c.by_device.items())],
        ["ANE share of est. cost", _pct(report.ane_cost_share)],
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
