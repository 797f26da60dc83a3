"""Residency: which device Core ML's compute plan puts each op on, and whether the shard passes.

Two sources, one code path. On macOS 14.4+ the plan is read live with coremltools'
`MLComputePlan` and normalised into a `ComputePlan` (a JSON-serialisable list of `PlanOp`);
anywhere else a saved plan is replayed from JSON. Counting and the gate only ever see the
normalised plan, so a replayed plan gives exactly the counts of the live one.

A plan is what Core ML intends to do, not proof of what ran; hosted macOS CI runners have no
Neural Engine, so there the counts are shown but the gate is not enforced (`report_only`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anechain.config import ResidencySettings
from anechain.errors import ConfigError, ResidencyError
from anechain.fsutil import sha256_tree
from anechain.jsonio import atomic_write_json
from anechain.platform import is_macos, macos_version, require_macos

log = logging.getLogger(__name__)

PLAN_SCHEMA = "anechain.compute-plan/1"
DEVICES = ("ane", "cpu", "gpu")
CONV_TYPES = frozenset({"conv"})
# MLComputePlan exists from macOS 14.4.
MIN_MACOS = (14, 4)
COMPUTE_UNITS = ("cpu_and_ne", "all", "cpu_and_gpu", "cpu_only")

STATUS_CHECKED = "checked"
STATUS_REPORT_ONLY = "report_only"
STATUS_NOT_CHECKED = "not_checked"

# (compiled model path, compute units name) -> a coremltools MLComputePlan (or look-alike).
PlanLoader = Callable[[str, str], Any]


@dataclass(frozen=True)
class PlanOp:
    """One ML Program operation of the plan. `preferred` is None for ops that do no compute."""

    type: str
    outputs: tuple[str, ...]
    preferred: str | None
    supported: tuple[str, ...] = ()
    cost: float | None = None
    depth: int = 0  # 0: the function's own block; 1+: nested (control flow) blocks

    @property
    def name(self) -> str:
        return self.outputs[0] if self.outputs else ""

    @property
    def computes(self) -> bool:
        return self.preferred is not None

    @property
    def is_conv(self) -> bool:
        # Tolerate an opset-qualified name ("ios18.conv") as well as the plain one.
        return self.type.rsplit(".", 1)[-1] in CONV_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "outputs": list(self.outputs),
            "preferred": self.preferred,
            "supported": list(self.supported),
            "cost": self.cost,
            "depth": self.depth,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanOp:
        preferred = d["preferred"]
        supported = tuple(d.get("supported", ()))
        for dev in (*([preferred] if preferred is not None else []), *supported):
            if dev not in DEVICES:
                raise ValueError(f"unknown device {dev!r}")
        cost = d.get("cost")
        return cls(
            type=str(d["type"]),
            outputs=tuple(str(o) for o in d.get("outputs", ())),
            preferred=preferred,
            supported=supported,
            cost=None if cost is None else float(cost),
            depth=int(d.get("depth", 0)),
        )


@dataclass(frozen=True)
class ComputePlan:
    """A normalised compute plan: every op of one function, in program order, nested ops after
    their parent."""

    ops: tuple[PlanOp, ...]
    compute_units: str = "cpu_and_ne"
    function: str = "main"
    model: str = ""  # the path the plan was read from
    package_sha256: str | None = None  # sha256_tree of the source .mlpackage, when known

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "package_sha256": self.package_sha256,
            "compute_units": self.compute_units,
            "function": self.function,
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> ComputePlan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResidencyError(
                f"{where} is not an anechain compute plan "
                f"(schema {found!r}, expected {PLAN_SCHEMA!r})"
            )
        try:
            return cls(
                ops=tuple(PlanOp.from_dict(op) for op in data["ops"]),
                compute_units=str(data.get("compute_units", "cpu_and_ne")),
                function=str(data.get("function", "main")),
                model=str(data.get("model", "")),
                package_sha256=data.get("package_sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResidencyError(f"{where} is malformed: {exc}") from None


def save_plan(plan: ComputePlan, path: str | Path) -> Path:
    """Write the plan as JSON, atomically."""
    path = Path(path)
    atomic_write_json(path, plan.to_dict(), indent=1)
    return path


def read_saved_plan(path: str | Path) -> ComputePlan:
    """Load a plan written by `save_plan` (any OS)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResidencyError(f"compute plan {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ResidencyError(f"compute plan {path} is not readable JSON ({exc})") from None
    return ComputePlan.from_dict(data, where=str(path))


# --- live plans (coremltools' MLComputePlan) ------------------------------------------------


def device_name(device: Any) -> str:
    """'ane', 'cpu' or 'gpu' for one of coremltools' MLComputeDevice objects."""
    from coremltools.models.compute_device import (
        MLCPUComputeDevice,
        MLGPUComputeDevice,
        MLNeuralEngineComputeDevice,
    )

    if isinstance(device, MLNeuralEngineComputeDevice):
        return "ane"
    if isinstance(device, MLCPUComputeDevice):
        return "cpu"
    if isinstance(device, MLGPUComputeDevice):
        return "gpu"
    raise ResidencyError(f"the compute plan names an unknown device {type(device).__name__}")


def normalise_plan(
    ct_plan: Any,
    *,
    function: str = "main",
    compute_units: str = "cpu_and_ne",
    model: str = "",
    package_sha256: str | None = None,
) -> ComputePlan:
    """Walk a coremltools MLComputePlan's ML Program (nested blocks included) into a ComputePlan."""
    program = ct_plan.model_structure.program
    if program is None:
        raise ResidencyError(f"{model or 'the model'} is not an ML Program; no op-level plan")
    if function not in program.functions:
        raise ResidencyError(
            f"{model or 'the model'} has no function {function!r} "
            f"(has: {', '.join(sorted(program.functions))})"
        )
    ops: list[PlanOp] = []

    def walk(block: Any, depth: int) -> None:
        for op in block.operations:
            usage = ct_plan.get_compute_device_usage_for_mlprogram_operation(op)
            cost = ct_plan.get_estimated_cost_for_mlprogram_operation(op)
            if usage is None:
                preferred, supported = None, ()
            else:
                preferred = device_name(usage.preferred_compute_device)
                supported = tuple(device_name(d) for d in usage.supported_compute_devices)
            ops.append(
                PlanOp(
                    type=op.operator_name,
                    outputs=tuple(o.name for o in op.outputs),
                    preferred=preferred,
                    supported=supported,
                    cost=None if cost is None else float(cost.weight),
                    depth=depth,
                )
            )
            for inner in op.blocks:
                walk(inner, depth + 1)

    walk(program.functions[function].block, 0)
    return ComputePlan(tuple(ops), compute_units, function, model, package_sha256)


def _compute_unit(name: str) -> Any:
    import coremltools as ct

    if name not in COMPUTE_UNITS:
        raise ConfigError(f"unknown compute units {name!r}; choose from {', '.join(COMPUTE_UNITS)}")
    return ct.ComputeUnit[name.upper()]


def _coremltools_load_plan(compiled: str, compute_units: str) -> Any:
    from coremltools.models.compute_plan import MLComputePlan

    return MLComputePlan.load_from_path(path=compiled, compute_units=_compute_unit(compute_units))


def live_plan_available() -> bool:
    version = macos_version()
    return is_macos() and version is not None and version >= MIN_MACOS


def read_live_plan(
    model: str | Path,
    compute_units: str = "cpu_and_ne",
    *,
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
) -> ComputePlan:
    """Ask Core ML for the compute plan of a .mlmodelc (an .mlpackage is compiled to a temporary
    folder first). `load_plan` replaces coremltools' loader (tests); `compiler` is passed to
    `anechain.compile`."""
    from anechain.compile import compile_to, read_sidecar

    model = Path(model)
    if compute_units not in COMPUTE_UNITS:
        raise ConfigError(
            f"unknown compute units {compute_units!r}; choose from {', '.join(COMPUTE_UNITS)}"
        )
    if load_plan is None:
        require_macos("reading a Core ML compute plan", MIN_MACOS)
        load_plan = _coremltools_load_plan
    if not model.exists():
        raise ResidencyError(f"{model} does not exist")

    def load(compiled: Path, package_sha: str | None) -> ComputePlan:
        try:
            ct_plan = load_plan(str(compiled), compute_units)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ResidencyError(f"Core ML could not plan {compiled}: {exc}") from None
        return normalise_plan(
            ct_plan, compute_units=compute_units, model=str(model), package_sha256=package_sha
        )

    if model.suffix == ".mlmodelc":
        recorded = read_sidecar(model) or {}
        return load(model, recorded.get("source_sha256"))
    if model.suffix != ".mlpackage":
        raise ResidencyError(f"{model} is neither an .mlmodelc nor an .mlpackage")
    with tempfile.TemporaryDirectory(prefix="anechain-plan-") as tmp:
        compiled = Path(tmp) / (model.stem + ".mlmodelc")
        compile_to(model, compiled, compiler)
        return load(compiled, sha256_tree(model))


def check_plan_matches(plan: ComputePlan, model: str | Path) -> None:
    """Refuse a saved plan that was made for a different package than `model`.

    The comparison uses the source package's sha256 (recorded in the plan, and for an .mlmodelc
    in its compile sidecar); when either side does not know it, the check is skipped with a
    warning.
    """
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


# --- counting and the gate (normalised plans only) -------------------------------------------


@dataclass(frozen=True)
class ResidencyCounts:
    """Integer counts only: this is the `counts` object of validation reports and manifests."""

    ops_total: int  # every op in the plan, including those that do no compute (const)
    compute_total: int  # ops with a device usage
    compute_ane: int  # ... preferring the Neural Engine
    compute_cpu: int
    compute_gpu: int
    compute_non_ane: int  # ops with a device usage that prefer another device than the ANE
    conv_total: int
    conv_ane: int  # conv ops that prefer the ANE

    @property
    def by_device(self) -> dict[str, int]:
        return {"ane": self.compute_ane, "cpu": self.compute_cpu, "gpu": self.compute_gpu}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_plan(plan: ComputePlan) -> ResidencyCounts:
    compute = [op for op in plan.ops if op.computes]
    convs = [op for op in plan.ops if op.is_conv]
    return ResidencyCounts(
        ops_total=len(plan.ops),
        compute_total=len(compute),
        compute_ane=sum(op.preferred == "ane" for op in compute),
        compute_cpu=sum(op.preferred == "cpu" for op in compute),
        compute_gpu=sum(op.preferred == "gpu" for op in compute),
        compute_non_ane=sum(op.preferred != "ane" for op in compute),
        conv_total=len(convs),
        conv_ane=sum(op.preferred == "ane" for op in convs),
    )


def ane_cost_share(plan: ComputePlan) -> float | None:
    """Share of the estimated cost (over compute ops that have one) planned for the ANE."""
    costed = [(op.cost, op.preferred) for op in plan.ops if op.computes and op.cost is not None]
    total = sum(cost for cost, _ in costed)
    if total <= 0:
        return None
    return sum(cost for cost, device in costed if device == "ane") / total


def non_ane_ops(plan: ComputePlan) -> list[PlanOp]:
    """Compute ops that prefer another device, and convs that Core ML would not place at all."""
    return [
        op
        for op in plan.ops
        if (op.computes and op.preferred != "ane") or (op.is_conv and not op.computes)
    ]


def gate_failures(counts: ResidencyCounts, settings: ResidencySettings) -> list[str]:
    """Why the plan fails the gate (empty: it passes).

    Every conv must prefer the ANE. Other compute ops off the ANE are allowed up to
    `max_compute_non_ane` only when `strict` is off; strict allows none.
    """
    failures = []
    if counts.compute_total == 0:
        failures.append("the plan has no compute ops; is this the right model?")
    if counts.conv_ane < counts.conv_total:
        failures.append(
            f"{counts.conv_total - counts.conv_ane} of {counts.conv_total} conv ops "
            "are not placed on the ANE"
        )
    limit = 0 if settings.strict else settings.max_compute_non_ane
    if counts.compute_non_ane > limit:
        failures.append(
            f"{counts.compute_non_ane} compute ops prefer another device than the ANE "
            f"(allowed: {limit}{', strict' if settings.strict else ''})"
        )
    return failures


@dataclass(frozen=True)
class ResidencyReport:
    """Counts of a plan and the gate's verdict; the `residency` object of a validation report."""

    status: str  # checked | report_only | not_checked
    counts: ResidencyCounts | None
    passed: bool | None  # None unless status is checked
    failures: tuple[str, ...] = ()  # what the gate failed on (or would have, in report_only)
    non_ane_ops: tuple[PlanOp, ...] = ()
    plan_source: str = ""  # "live" | "replay:<file>" | ""
    reason: str = ""  # why not checked / not enforced
    settings: ResidencySettings = field(default_factory=ResidencySettings)
    ane_cost_share: float | None = None  # estimated-cost-weighted share planned for the ANE

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "counts": None if self.counts is None else self.counts.to_dict(),
            "passed": self.passed,
            "failures": list(self.failures),
            "non_ane_ops": [
                {
                    "type": op.type,
                    "name": op.name,
                    "preferred": op.preferred,
                    "supported": list(op.supported),
                }
                for op in self.non_ane_ops
            ],
            "ane_cost_share": None
            if self.ane_cost_share is None
            else round(self.ane_cost_share, 6),
            "plan_source": self.plan_source,
            "reason": self.reason,
            "gate": {
                "strict": self.settings.strict,
                "max_compute_non_ane": self.settings.max_compute_non_ane,
            },
        }


def residency_report(
    plan: ComputePlan | None,
    settings: ResidencySettings | None = None,
    *,
    report_only: bool = False,
    plan_source: str = "",
    reason: str = "",
) -> ResidencyReport:
    """Count a normalised plan and apply the gate (unless `report_only`); None: not checked."""
    settings = settings or ResidencySettings()
    if plan is None:
        return ResidencyReport(
            STATUS_NOT_CHECKED,
            None,
            None,
            reason=reason or f"needs macOS {'.'.join(map(str, MIN_MACOS))}+ or a saved plan",
            settings=settings,
        )
    counts = count_plan(plan)
    failures = tuple(gate_failures(counts, settings))
    return ResidencyReport(
        status=STATUS_REPORT_ONLY if report_only else STATUS_CHECKED,
        counts=counts,
        passed=None if report_only else not failures,
        failures=failures,
        non_ane_ops=tuple(non_ane_ops(plan)),
        plan_source=plan_source,
        reason=reason or ("gate not enforced (report only)" if report_only else ""),
        settings=settings,
        ane_cost_share=ane_cost_share(plan),
    )


def check_residency(
    model: str | Path | None,
    settings: ResidencySettings | None = None,
    *,
    plan_file: str | Path | None = None,
    save_plan_to: str | Path | None = None,
    report_only: bool = False,
    compute_units: str = "cpu_and_ne",
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
) -> ResidencyReport:
    """Residency of `model` (.mlmodelc or .mlpackage): replayed from `plan_file` if given, else
    live on macOS 14.4+, else `not_checked`. The plan is saved to `save_plan_to` when given."""
    if plan_file is not None:
        plan = read_saved_plan(plan_file)
        if model is not None:
            check_plan_matches(plan, model)
        source = f"replay:{plan_file}"
    elif model is None:
        raise ResidencyError("nothing to check: give a model or a saved compute plan")
    elif load_plan is not None or live_plan_available():
        plan = read_live_plan(model, compute_units, load_plan=load_plan, compiler=compiler)
        source = "live"
    else:
        return residency_report(None, settings)
    if save_plan_to is not None:
        save_plan(plan, save_plan_to)
    return residency_report(plan, settings, report_only=report_only, plan_source=source)
