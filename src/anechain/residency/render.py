"""Residency reports as table rows (the CLI prints them; `capture` summarises with them)."""

from __future__ import annotations

from anechain.residency.gate import STATUS_REPORT_ONLY, ResidencyReport


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_rows(report: ResidencyReport) -> list[list[str]]:
    c = report.counts
    assert c is not None  # checked or report_only always carry counts
    return [
        ["conv on ANE", f"{c.conv_ane}/{c.conv_total}"],
        ["fp16 compute on ANE", f"{c.compute_ane}/{c.compute_total}"],
        ["fp16 compute off ANE", str(c.compute_non_ane)],
        ["plumbing off ANE", f"{c.plumbing_non_ane}/{c.plumbing_total}"],
        ["  int32 index / state ops", f"{c.index_ops} / {c.state_ops}"],
        [f"  share of plan ({report.plumbing_basis})", _pct(report.plumbing_share)],
        ["ops (incl. const)", str(c.ops_total)],
        ["compute by device", ", ".join(f"{d} {n}" for d, n in c.by_device.items())],
        ["ANE share of est. cost", _pct(report.ane_cost_share)],
    ]


NON_ANE_HEADERS = ["fp16 op off ANE", "name", "preferred", "supported"]
PLUMBING_HEADERS = ["plumbing op", "class", "name", "preferred", "est. cost"]


def non_ane_rows(report: ResidencyReport) -> list[list[str]]:
    return [
        [op.type, op.name, op.preferred or "-", ",".join(op.supported) or "-"]
        for op in report.non_ane_ops
    ]


def plumbing_rows(report: ResidencyReport) -> list[list[str]]:
    return [
        [
            c.op.type,
            c.op_class,
            c.op.name,
            c.op.preferred or "-",
            "-" if c.op.cost is None else f"{c.op.cost:.4g}",
        ]
        for c in report.plumbing_ops
    ]


def verdict_lines(report: ResidencyReport) -> list[str]:
    if report.status == STATUS_REPORT_ONLY:
        verdict = "would pass" if not report.failures else "would FAIL"
        head = [f"gate not enforced ({report.reason or 'report only'}): {verdict}"]
    else:
        head = ["residency: PASS" if report.passed else "residency: FAIL"]
    return head + [f"  - {reason}" for reason in report.failures]
