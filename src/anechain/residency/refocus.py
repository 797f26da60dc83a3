"""A function's live plan read from a copy of its package whose default function it is.

`MLComputePlan.load_from_path` takes no function name: coremltools' bridge plans with a
configuration whose `functionName` is nil, that is the default function (`decode`). If Core
ML then gives the ops of another function (`prefill`) no device usage, that function is
planned again from a copy of the package whose `defaultFunctionName` names it: the same
program and weights (hard links where the file system allows), one more compile. A function
still unreported after that stays "not reported by Core ML" and fails the gate.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from anechain.residency.plan import (
    ComputePlan,
    PackagePlan,
    PlanLoader,
    _coremltools_load_plan,
    normalise_plan,
)


def unreported_functions(plan: PackagePlan) -> tuple[str, ...]:
    """Functions none of whose non-constant ops has a device usage."""
    return tuple(
        p.function
        for p in plan.plans
        if not any(
            op.computes
            for op in p.ops
            if not (op.type == "const" or op.type.startswith("constexpr_"))
        )
    )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_with_default(package: Path, dest: Path, function: str) -> Path:
    """`package` copied to `dest` with `function` as its default function (the spec file is
    written anew; everything else is linked or copied)."""
    from anechain.package import _MODEL_REL, load_spec

    spec = load_spec(package)
    shutil.copytree(package, dest, copy_function=_link_or_copy)
    spec.description.defaultFunctionName = function
    model = dest / _MODEL_REL
    model.unlink()  # a hard link: writing through it would change the original
    model.write_bytes(spec.SerializeToString())
    return dest


def plan_as_default(
    package: Path,
    function: str,
    compute_units: str,
    *,
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
    package_sha256: str | None = None,
) -> ComputePlan:
    """The live plan of `function`, from a compiled copy of `package` whose default it is."""
    from anechain.compile import compile_to

    with tempfile.TemporaryDirectory(prefix="anechain-plan-") as tmp:
        copy = copy_with_default(package, Path(tmp) / package.name, function)
        compiled = Path(tmp) / (package.stem + ".mlmodelc")
        compile_to(copy, compiled, compiler)
        ct_plan = (load_plan or _coremltools_load_plan)(str(compiled), compute_units)
        return normalise_plan(
            ct_plan,
            function=function,
            compute_units=compute_units,
            model=f"{package} ({function} as the default function)",
            package_sha256=package_sha256,
        )


def refocus_unreported(
    plan: PackagePlan,
    package: Path,
    *,
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
) -> tuple[PackagePlan, tuple[str, ...]]:
    """(the plan with each unreported function planned as a default, the functions replanned)."""
    from anechain.package import load_spec

    default = load_spec(package).description.defaultFunctionName
    redo = [f for f in unreported_functions(plan) if f != default and len(plan.plans) > 1]
    if not redo:
        return plan, ()
    plans = tuple(
        plan_as_default(
            package,
            p.function,
            plan.compute_units,
            load_plan=load_plan,
            compiler=compiler,
            package_sha256=plan.package_sha256,
        )
        if p.function in redo
        else p
        for p in plan.plans
    )
    return PackagePlan(plans, plan.compute_units, plan.model, plan.package_sha256), tuple(redo)
