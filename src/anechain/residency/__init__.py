"""Residency: which device Core ML's compute plan puts each op on, and whether the shard passes.

Two sources, one code path. On macOS 14.4+ the plan is read live with coremltools'
`MLComputePlan` and normalised into a `ComputePlan` (`residency.plan`); anywhere else a saved
plan (or a captured bundle, `anechain.capture`) is replayed from JSON. Either way the plan
is matched with the package's own program (`residency.program`), which also says what class
of work each op does; counting and the gate (`residency.gate`) only ever see a matched,
classified plan.

A package has one program function (`main`) or two (`decode` and `prefill`, sharing weights
and states); one plan load covers all of them. Each function's plan is matched with that
function's program and gated on its own, and the package passes only if every function does:
a plan lacking a function of the package is refused, so prefill's convs are never left out.

A plan read live from a package anechain compiled is matched leniently (the compiler may
rename, fuse, add or drop ops; `residency.match` lists each change and classes the ops the
program lacks from the plan itself); a replayed plan must match exactly. A function whose ops
Core ML gives no device usage is "not reported by Core ML": no counts, and it fails the gate.

A plan is what Core ML intends to do, not proof of what ran. A Mac whose Core ML lists no
Neural Engine (hosted CI runners are such virtual machines) gets the counts without the gate
(`report_only`); off macOS residency is `not_checked`, never passed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anechain.config import ResidencySettings
from anechain.errors import PlatformError, ResidencyError
from anechain.fsutil import sha256_tree
from anechain.platform import has_neural_engine, macos_at_least
from anechain.residency.gate import (
    STATUS_CHECKED,
    STATUS_NOT_CHECKED,
    STATUS_REPORT_ONLY,
    ClassifiedOp,
    ResidencyCounts,
    ResidencyReport,
    ane_cost_share,
    not_checked,
    package_report,
    residency_report,
)
from anechain.residency.match import LENIENT, STRICT, OpChange, OpMatch, match_plan
from anechain.residency.plan import (
    COMPUTE_UNITS,
    MIN_MACOS,
    PLAN_SCHEMA,
    ComputePlan,
    PackagePlan,
    PlanLoader,
    PlanOp,
    live_plan_available,
    load_live_plan,
    normalise_plan,
    normalise_plans,
    op_name,
    op_type,
    read_live_plan,
    read_saved_plan,
    save_plan,
)
from anechain.residency.program import (
    Program,
    ProgramOp,
    check_plan_functions,
    check_plan_matches_program,
    classify_plan,
    program_from_spec,
    programs_from_spec,
    read_program,
    read_programs,
)
from anechain.residency.refocus import refocus_unreported, unreported_functions

__all__ = [
    "COMPUTE_UNITS",
    "LENIENT",
    "STRICT",
    "OpChange",
    "OpMatch",
    "match_plan",
    "MIN_MACOS",
    "PLAN_SCHEMA",
    "STATUS_CHECKED",
    "STATUS_NOT_CHECKED",
    "STATUS_REPORT_ONLY",
    "ClassifiedOp",
    "ComputePlan",
    "PackagePlan",
    "PlanLoader",
    "PlanOp",
    "Program",
    "ProgramOp",
    "ResidencyCounts",
    "ResidencyReport",
    "ane_cost_share",
    "check_plan_functions",
    "check_plan_matches",
    "check_plan_matches_program",
    "check_residency",
    "classify_plan",
    "expected_live_status",
    "live_plan_available",
    "live_reason",
    "load_live_plan",
    "normalise_plan",
    "normalise_plans",
    "op_name",
    "op_type",
    "program_from_spec",
    "programs_from_spec",
    "read_live_plan",
    "read_program",
    "read_programs",
    "read_saved_plan",
    "refocus_unreported",
    "unreported_functions",
    "package_report",
    "report_for_plan",
    "save_plan",
]

log = logging.getLogger(__name__)

# Units whose plan says something about the Neural Engine.
ANE_UNITS = ("cpu_and_ne", "all")
# A package is compiled before it is planned; stateful programs need the macOS 15 compiler.
COMPILE_MIN_MACOS = (15,)
NO_ANE_REASON = "this Mac's Core ML lists no Neural Engine: counts shown, gate not enforced"


def expected_live_status(model_kind: str = ".mlpackage", ane_present: bool | None = None) -> str:
    """The status `check_residency` gives a model without a saved plan on this machine; tests
    compute their expectations with it."""
    need = COMPILE_MIN_MACOS if model_kind == ".mlpackage" else MIN_MACOS
    if not macos_at_least(need):
        return STATUS_NOT_CHECKED
    ane = has_neural_engine() if ane_present is None else ane_present
    return STATUS_CHECKED if ane else STATUS_REPORT_ONLY


def live_reason(ane: bool, replanned: tuple[str, ...]) -> str:
    """Why a live plan's verdict is what it is: no Neural Engine here (report only), and the
    functions planned as the default of a copy."""
    parts = [] if ane else [NO_ANE_REASON]
    if replanned:
        parts.append(
            f"{', '.join(replanned)} planned as the default function of a copy "
            "(Core ML reported no usage for it otherwise)"
        )
    return "; ".join(parts)


def check_plan_matches(plan: PackagePlan, model: str | Path) -> None:
    """Refuse a saved plan made for another package than `model` (by the source package's
    sha256, recorded in the plan and, for an .mlmodelc, in its compile sidecar)."""
    from anechain.compile import read_sidecar

    model = Path(model)
    if model.suffix == ".mlpackage":
        sha: str | None = sha256_tree(model)
    else:
        sha = (read_sidecar(model) or {}).get("source_sha256")
    if plan.package_sha256 is None or sha is None:
        log.warning("cannot tell whether the saved plan belongs to %s (no package digest)", model)
        return
    if plan.package_sha256 != sha:
        raise ResidencyError(
            f"the saved plan was made for a different package than {model} "
            f"(package sha256 {plan.package_sha256[:12]} vs {sha[:12]})"
        )


def source_package(model: Path) -> Path:
    """The .mlpackage whose program describes `model` (itself, or an .mlmodelc's recorded
    source, which must still have the recorded digest)."""
    from anechain.compile import read_sidecar

    if model.suffix == ".mlpackage":
        return model
    recorded = read_sidecar(model) or {}
    package = recorded.get("package")
    if not package or not Path(package).is_dir():
        raise ResidencyError(
            f"{model} has no readable source package (compile sidecar names {package!r}); "
            "residency classes ops by the package's program: pass the .mlpackage"
        )
    if sha256_tree(Path(package)) != recorded.get("source_sha256"):
        raise ResidencyError(f"{package} changed since {model} was compiled from it; recompile")
    return Path(package)


def report_for_plan(
    plan: PackagePlan,
    programs: Sequence[Program],
    settings: ResidencySettings | None = None,
    *,
    report_only: bool = False,
    plan_source: str = "",
    reason: str = "",
    where: str = "",
    lenient: bool = False,
) -> ResidencyReport:
    """Match each function's plan with that function's program, class its ops, count and gate
    it; the package report combines them. The one path for live, saved and captured plans.

    `lenient` only for a plan read live from a package anechain compiled (`residency.match`):
    a replayed plan (file, capture) must be the program's ops exactly."""
    if plan.compute_units not in ANE_UNITS:
        raise ResidencyError(
            f"the compute plan{f' of {where}' if where else ''} was made for "
            f"{plan.compute_units}, which excludes the Neural Engine; it proves no residency"
        )
    if not programs:
        raise ResidencyError(f"the program{f' of {where}' if where else ''} has no function")
    check_plan_functions(plan.functions, [p.function for p in programs], where)
    reports = []
    several = len(programs) > 1
    for program in sorted(programs, key=lambda p: p.function):
        fn_plan = plan.function(program.function)
        fn_where = f"{where}, function {program.function!r}" if several else where
        classes, match = match_plan(fn_plan, program, lenient=lenient, where=fn_where)
        reports.append(
            residency_report(
                fn_plan,
                classes,
                settings,
                report_only=report_only,
                plan_source=plan_source,
                reason=reason,
                match=match,
            )
        )
    return package_report(plan, reports)


def check_residency(
    model: str | Path | None,
    settings: ResidencySettings | None = None,
    *,
    plan_file: str | Path | None = None,
    save_plan_to: str | Path | None = None,
    report_only: bool = False,
    compute_units: str = "cpu_and_ne",
    compiled: str | Path | None = None,
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
    ane_present: bool | None = None,
) -> ResidencyReport:
    """Residency of `model` (.mlpackage, or .mlmodelc with its compile sidecar): replayed from
    `plan_file` if given, else live on macOS, else `not_checked`.

    `compiled` is `model` already compiled (a package is otherwise compiled to a temporary
    folder). The plan is saved to `save_plan_to` when given. `load_plan`, `compiler` and
    `ane_present` replace Core ML and the hardware probe (tests).
    """
    settings = settings or ResidencySettings()
    if model is None:
        raise ResidencyError(
            "nothing to check: give the package (a saved plan is checked against its program)"
        )
    model = Path(model)
    if model.suffix not in (".mlpackage", ".mlmodelc"):
        raise ResidencyError(f"{model} is neither an .mlmodelc nor an .mlpackage")
    programs = read_programs(source_package(model))
    if plan_file is not None:
        plan = read_saved_plan(plan_file)
        check_plan_matches(plan, model)
        source = f"replay:{plan_file}"
        reason = ""
    else:
        need = COMPILE_MIN_MACOS if model.suffix == ".mlpackage" and compiled is None else MIN_MACOS
        if load_plan is None and not macos_at_least(need):
            return not_checked(settings, f"needs macOS {'.'.join(map(str, need))}+ or a saved plan")
        try:
            plan = _live_plan(model, compiled, compute_units, load_plan, compiler)
            plan, replanned = refocus_unreported(
                plan, source_package(model), load_plan=load_plan, compiler=compiler
            )
        except PlatformError as exc:  # e.g. the compiler needs a newer macOS than the plan
            return not_checked(settings, str(exc))
        source = "live"
        ane = has_neural_engine() if ane_present is None else ane_present
        reason = live_reason(ane, replanned)
        report_only = report_only or not ane
    lenient = plan_file is None  # a live plan of the package compiled here
    if save_plan_to is not None:
        save_plan(plan, save_plan_to)
    return report_for_plan(
        plan,
        programs,
        settings,
        report_only=report_only,
        plan_source=source,
        reason=reason,
        where=str(model),
        lenient=lenient,
    )


def _live_plan(
    model: Path,
    compiled: str | Path | None,
    compute_units: str,
    load_plan: PlanLoader | None,
    compiler: Any,
) -> PackagePlan:
    """The plan of every function of `model` (one load)."""
    if compiled is None:
        return read_live_plan(model, compute_units, load_plan=load_plan, compiler=compiler)
    sha = sha256_tree(model) if model.suffix == ".mlpackage" else None
    return load_live_plan(
        Path(compiled),
        compute_units,
        model=str(model),
        package_sha256=sha,
        load_plan=load_plan,
    )
