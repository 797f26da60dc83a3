"""Counting a compute plan by op class, and the residency gate.

Counts are by the class of each op in the package's program (see `residency.program`): fp16
compute must be on the Neural Engine (strict: all of it); plumbing (int32 index ops, state
read/write) is bounded by its own share; every conv must be on the ANE.

Each function of a package (`decode` and `prefill`) is counted and gated on its own; the
package passes only if every function does. The package's `counts` are the sums over its
functions (for a one-function package, that function's counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from anechain.config import ResidencySettings
from anechain.residency.match import OpMatch
from anechain.residency.plan import ComputePlan, PackagePlan, PlanOp
from anechain.residency.program import COMPUTE, CONST, INDEX, PLUMBING, STATE

STATUS_CHECKED = "checked"
STATUS_REPORT_ONLY = "report_only"
STATUS_NOT_CHECKED = "not_checked"
USAGE_REPORTED, USAGE_NOT_REPORTED = "reported", "not_reported"
NOT_REPORTED = "not reported by Core ML"
# MLComputePlan.load_from_path plans with a configuration naming no function; whether Core ML
# then answers for another function's ops (prefill) is unknown, so silence is a finding.
NOT_REPORTED_FAILURE = (
    f"device usage {NOT_REPORTED} for any op of this function: its residency is unproven"
)


@dataclass(frozen=True)
class ResidencyCounts:
    """Integer counts only: this is the `counts` object of validation reports and manifests."""

    ops_total: int  # every op in the plan, including those that do no compute (const)
    compute_total: int  # fp16 compute ops (class `compute`) with a device usage
    compute_ane: int  # ... preferring the Neural Engine
    compute_cpu: int
    compute_gpu: int
    compute_non_ane: int  # fp16 compute ops preferring another device than the ANE
    conv_total: int
    conv_ane: int  # conv ops that prefer the ANE
    plumbing_total: int  # int32 index and state ops with a device usage
    plumbing_non_ane: int  # ... preferring another device than the ANE
    index_ops: int
    state_ops: int

    @property
    def by_device(self) -> dict[str, int]:
        return {"ane": self.compute_ane, "cpu": self.compute_cpu, "gpu": self.compute_gpu}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def total(cls, counts: Sequence[ResidencyCounts]) -> ResidencyCounts:
        return cls(**{f.name: sum(getattr(c, f.name) for c in counts) for f in fields(cls)})


@dataclass(frozen=True)
class ClassifiedOp:
    op: PlanOp
    op_class: str  # const | state | index | compute


def classified(plan: ComputePlan, classes: dict[str, str]) -> list[ClassifiedOp]:
    return [ClassifiedOp(op, classes[op.name]) for op in plan.ops]


def count_plan(ops: list[ClassifiedOp]) -> ResidencyCounts:
    compute = [c.op for c in ops if c.op_class == COMPUTE and c.op.computes]
    plumbing = [c.op for c in ops if c.op_class in PLUMBING and c.op.computes]
    convs = [c.op for c in ops if c.op.is_conv]
    return ResidencyCounts(
        ops_total=len(ops),
        compute_total=len(compute),
        compute_ane=sum(op.preferred == "ane" for op in compute),
        compute_cpu=sum(op.preferred == "cpu" for op in compute),
        compute_gpu=sum(op.preferred == "gpu" for op in compute),
        compute_non_ane=sum(op.preferred != "ane" for op in compute),
        conv_total=len(convs),
        conv_ane=sum(op.preferred == "ane" for op in convs),
        plumbing_total=len(plumbing),
        plumbing_non_ane=sum(op.preferred != "ane" for op in plumbing),
        index_ops=sum(c.op_class == INDEX for c in ops),
        state_ops=sum(c.op_class == STATE for c in ops),
    )


def ane_cost_share(plan: ComputePlan | PackagePlan) -> float | None:
    """Share of the estimated cost (over compute ops that have one) planned for the ANE."""
    costed = [(op.cost, op.preferred) for op in plan.ops if op.computes and op.cost is not None]
    total = sum(cost for cost, _ in costed)
    if total <= 0:
        return None
    return sum(cost for cost, device in costed if device == "ane") / total


def plumbing_share(ops: list[ClassifiedOp]) -> tuple[float, str]:
    """(share, basis): plumbing off the ANE as a share of the plan's estimated cost, or of its
    op count when some op that computes has no cost."""
    working = [c for c in ops if c.op.computes]
    off = [c for c in working if c.op_class in PLUMBING and c.op.preferred != "ane"]
    if not working:
        return 0.0, "op count"
    if all(c.op.cost is not None for c in working):
        total = sum(c.op.cost or 0.0 for c in working)
        if total > 0:
            return sum(c.op.cost or 0.0 for c in off) / total, "estimated cost"
    return len(off) / len(working), "op count"


def off_ane_compute(ops: list[ClassifiedOp]) -> list[PlanOp]:
    """fp16 compute ops that prefer another device, and convs Core ML would not place."""
    return [
        c.op
        for c in ops
        if (c.op_class == COMPUTE and c.op.computes and c.op.preferred != "ane")
        or (c.op.is_conv and not c.op.computes)
    ]


def gate_failures(
    counts: ResidencyCounts, share: float, basis: str, settings: ResidencySettings
) -> list[str]:
    """Why the plan fails the gate (empty: it passes)."""
    failures = []
    if counts.compute_total == 0:
        failures.append("the plan has no fp16 compute ops; is this the right model?")
    if counts.conv_ane < counts.conv_total:
        failures.append(
            f"{counts.conv_total - counts.conv_ane} of {counts.conv_total} conv ops "
            "are not placed on the ANE"
        )
    limit = 0 if settings.strict else settings.max_compute_non_ane
    if counts.compute_non_ane > limit:
        failures.append(
            f"{counts.compute_non_ane} fp16 compute ops prefer another device than the ANE "
            f"(allowed: {limit}{', strict' if settings.strict else ''})"
        )
    if share > settings.max_plumbing_share:
        failures.append(
            f"plumbing off the ANE ({counts.plumbing_non_ane} int32 index/state ops) is "
            f"{100 * share:.1f}% of the plan by {basis} "
            f"(allowed: {100 * settings.max_plumbing_share:.1f}%)"
        )
    return failures


def _op_row(op: PlanOp, op_class: str | None = None) -> dict[str, Any]:
    row = {
        "type": op.type,
        "name": op.name,
        "preferred": op.preferred,
        "supported": list(op.supported),
        "cost": op.cost,
    }
    if op_class is not None:
        row["class"] = op_class
    return row


@dataclass(frozen=True)
class ResidencyReport:
    """Counts of a plan and the gate's verdict; the `residency` object of a validation report."""

    status: str  # checked | report_only | not_checked
    counts: ResidencyCounts | None
    passed: bool | None  # None unless status is checked
    failures: tuple[str, ...] = ()  # what the gate failed on (or would have, in report_only)
    non_ane_ops: tuple[PlanOp, ...] = ()  # fp16 compute off the ANE
    plumbing_ops: tuple[ClassifiedOp, ...] = ()  # every plumbing op that computes
    plumbing_share: float = 0.0  # plumbing off the ANE, share of the plan (see basis)
    plumbing_basis: str = ""  # "estimated cost" | "op count"
    plan_source: str = ""  # "live" | "replay:<file>" | "capture:<file>" | ""
    reason: str = ""  # why not checked / not enforced
    settings: ResidencySettings = field(default_factory=ResidencySettings)
    ane_cost_share: float | None = None  # estimated-cost-weighted share planned for the ANE
    function: str = ""  # the function this report counts ("" for a whole package)
    functions: tuple[ResidencyReport, ...] = ()  # a package's per-function reports
    usage: str = USAGE_REPORTED  # not_reported: Core ML gave no op of the function a device
    plan_ops: tuple[int, int] = (0, 0)  # (ops, convs) in the plan: known even without usage
    match: OpMatch = field(default_factory=OpMatch)  # how the plan matched the program

    @property
    def unreported(self) -> tuple[str, ...]:
        """The functions whose device usage Core ML did not report."""
        parts = self.functions or (self,)
        return tuple(f.function for f in parts if f.usage == USAGE_NOT_REPORTED)

    def to_dict(self) -> dict[str, Any]:
        out = self._dict()
        if self.functions:
            out["functions"] = {
                f.function: {k: v for k, v in f._dict().items() if k in _FUNCTION_KEYS}
                for f in self.functions
            }
        return out

    def _dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "counts": None if self.counts is None else self.counts.to_dict(),
            "passed": self.passed,
            "failures": list(self.failures),
            "non_ane_ops": [_op_row(op) for op in self.non_ane_ops],
            "plumbing": {
                "ops": [_op_row(c.op, c.op_class) for c in self.plumbing_ops],
                "share_off_ane": round(self.plumbing_share, 6),
                "basis": self.plumbing_basis,
            },
            "ane_cost_share": None
            if self.ane_cost_share is None
            else round(self.ane_cost_share, 6),
            "plan_source": self.plan_source,
            "reason": self.reason,
            "usage": self.usage,
            "unreported_functions": list(self.unreported),
            "plan_ops": {"ops_total": self.plan_ops[0], "conv_total": self.plan_ops[1]},
            "match": self.match.to_dict(),
            "gate": {
                "strict": self.settings.strict,
                "max_compute_non_ane": self.settings.max_compute_non_ane,
                "max_plumbing_share": self.settings.max_plumbing_share,
            },
        }


# What a package report says about each of its functions (the rest is the package's).
_FUNCTION_KEYS = (
    "counts",
    "passed",
    "failures",
    "non_ane_ops",
    "plumbing",
    "ane_cost_share",
    "usage",
    "plan_ops",
    "match",
)


def not_checked(settings: ResidencySettings, reason: str) -> ResidencyReport:
    return ResidencyReport(STATUS_NOT_CHECKED, None, None, reason=reason, settings=settings)


def residency_report(
    plan: ComputePlan,
    classes: dict[str, str],
    settings: ResidencySettings | None = None,
    *,
    report_only: bool = False,
    plan_source: str = "",
    reason: str = "",
    match: OpMatch | None = None,
) -> ResidencyReport:
    """Count a plan whose ops are classified (`classes`: op name -> class) and apply the gate
    (unless `report_only`). A plan in which Core ML gave no op that is not a constant a
    device usage has no counts: it fails the gate (would fail, in report_only)."""
    settings = settings or ResidencySettings()
    ops = classified(plan, classes)
    counts: ResidencyCounts | None = count_plan(ops)
    share, basis = plumbing_share(ops)
    reported = any(c.op.computes for c in ops if c.op_class != CONST)
    if reported:
        failures = tuple(gate_failures(counts, share, basis, settings))
    else:  # never zero counts as if measured
        counts, share, basis, failures = None, 0.0, "", (NOT_REPORTED_FAILURE,)
    return ResidencyReport(
        status=STATUS_REPORT_ONLY if report_only else STATUS_CHECKED,
        counts=counts,
        passed=None if report_only else not failures,
        failures=failures,
        non_ane_ops=tuple(off_ane_compute(ops)) if reported else (),
        plumbing_ops=tuple(c for c in ops if c.op_class in PLUMBING and c.op.computes),
        plumbing_share=share,
        plumbing_basis=basis,
        plan_source=plan_source,
        reason=reason or ("gate not enforced (report only)" if report_only else ""),
        settings=settings,
        ane_cost_share=ane_cost_share(plan),
        function=plan.function,
        usage=USAGE_REPORTED if reported else USAGE_NOT_REPORTED,
        plan_ops=(len(ops), sum(c.op.is_conv for c in ops)),
        match=match or OpMatch(),
    )


def package_report(plan: PackagePlan, reports: Sequence[ResidencyReport]) -> ResidencyReport:
    """One report for a package from its functions' reports: counts summed, failures named by
    function (when there are several), passed only if every function passes. The plumbing
    share shown is the largest of the functions' (each is gated on its own)."""
    first = reports[0]
    several = len(reports) > 1
    failures = tuple(
        f"{r.function}: {msg}" if several else msg for r in reports for msg in r.failures
    )
    worst = max(reports, key=lambda r: r.plumbing_share)
    measured = [r.counts for r in reports if r.counts is not None]
    return ResidencyReport(
        status=first.status,
        counts=ResidencyCounts.total(measured) if measured else None,
        passed=None if first.passed is None else all(r.passed for r in reports),
        failures=failures,
        non_ane_ops=tuple(op for r in reports for op in r.non_ane_ops),
        plumbing_ops=tuple(c for r in reports for c in r.plumbing_ops),
        plumbing_share=worst.plumbing_share,
        plumbing_basis=worst.plumbing_basis,
        plan_source=first.plan_source,
        reason=first.reason,
        settings=first.settings,
        ane_cost_share=ane_cost_share(plan),  # over every function's ops
        functions=tuple(reports),
        usage=USAGE_REPORTED if measured else USAGE_NOT_REPORTED,
        plan_ops=(sum(r.plan_ops[0] for r in reports), sum(r.plan_ops[1] for r in reports)),
        match=OpMatch(  # every function's changes; each function's report says whose
            first.match.mode,
            sum(r.match.exact for r in reports),
            tuple(c for r in reports for c in r.match.renamed),
            tuple(c for r in reports for c in r.match.added),
            tuple(c for r in reports for c in r.match.removed),
        ),
    )
