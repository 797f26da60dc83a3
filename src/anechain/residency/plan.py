"""Compute plans: coremltools' live `MLComputePlan` normalised into a JSON-serialisable
`PackagePlan` (one `ComputePlan` per function of the model), and its saved form.

One `MLComputePlan.load_from_path` covers every function of a multifunction model: coremltools
builds `model_structure.program.functions` from Core ML's `MLModelStructureProgram.functions`
(every function, by name; see coremlpython/CoreMLPython.mm), and device usage and cost are
asked per operation object, whichever function it belongs to.

Core ML names operators with their opset (`ios18.conv`) and gives output-less ops
(`write_state`) no name; `op_type` and `op_name` normalise both, here only, so plans, programs
and reports all speak the same names.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anechain.errors import ConfigError, ResidencyError
from anechain.fsutil import sha256_tree
from anechain.jsonio import atomic_write_json
from anechain.platform import macos_at_least, require_macos

PLAN_SCHEMA = "anechain.compute-plan/2"  # every function of the model
PLAN_SCHEMA_V1 = "anechain.compute-plan/1"  # one function (decode-only packages: `main`)
DEVICES = ("ane", "cpu", "gpu")
# MLComputePlan exists from macOS 14.4.
MIN_MACOS = (14, 4)
COMPUTE_UNITS = ("cpu_and_ne", "all", "cpu_and_gpu", "cpu_only")

# (compiled model path, compute units name) -> a coremltools MLComputePlan (or look-alike).
PlanLoader = Callable[[str, str], Any]


def op_type(operator_name: str) -> str:
    """`ios18.conv`, `Ios16.einsum`, `conv` -> `conv`: the opset is not part of the op's kind."""
    return operator_name.rsplit(".", 1)[-1].lower()


def op_name(kind: str, outputs: Sequence[str], inputs: Mapping[str, Sequence[str]]) -> str:
    """An op's name: its first output; for an op without outputs (`write_state`), its kind
    and input bindings (`write_state(data=v_1, input=key_cache)`), which are unique."""
    if outputs:
        return outputs[0]
    args = ", ".join(f"{k}={'|'.join(v)}" for k, v in sorted(inputs.items()))
    return f"{kind}({args})"


@dataclass(frozen=True)
class PlanOp:
    """One ML Program operation of the plan. `preferred` is None for ops that do no compute."""

    type: str  # normalised by op_type
    outputs: tuple[str, ...]
    preferred: str | None
    supported: tuple[str, ...] = ()
    cost: float | None = None
    depth: int = 0  # 0: the function's own block; 1+: nested (control flow) blocks
    name: str = ""  # op_name; defaults to the first output
    # Input name -> bound variable names ('<value>' for a constant), as the live plan shows
    # them: evidence for classing an op the program lacks (residency.match). Not saved: a
    # saved plan must match its program exactly, so it never needs them.
    inputs: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", op_name(self.type, self.outputs, {}))

    @property
    def computes(self) -> bool:
        return self.preferred is not None

    @property
    def is_conv(self) -> bool:
        return self.type == "conv"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
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
        if cost is not None:
            cost = float(cost)
            # Core ML's estimated cost is a share of the program's work (MLComputePlanCost
            # .weight, 0..1); a NaN or negative one would make the ANE cost share meaningless.
            if not math.isfinite(cost) or cost < 0:
                raise ValueError(f"op {d.get('name') or d['type']!r} has cost {cost!r}")
        depth = int(d.get("depth", 0))
        if depth < 0:
            raise ValueError(f"op {d.get('name') or d['type']!r} has depth {depth}")
        return cls(
            type=op_type(str(d["type"])),
            outputs=tuple(str(o) for o in d.get("outputs", ())),
            preferred=preferred,
            supported=supported,
            cost=cost,
            depth=depth,
            name=str(d.get("name", "")),
        )


@dataclass(frozen=True)
class ComputePlan:
    """A normalised compute plan of one function: its ops in program order, nested ops after
    their parent. Its own JSON form is the one-function schema (`anechain.compute-plan/1`)."""

    ops: tuple[PlanOp, ...]
    compute_units: str = "cpu_and_ne"
    function: str = "main"
    model: str = ""  # the path the plan was read from
    package_sha256: str | None = None  # sha256_tree of the source .mlpackage, when known

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA_V1,
            "model": self.model,
            "package_sha256": self.package_sha256,
            "compute_units": self.compute_units,
            "function": self.function,
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> ComputePlan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA_V1:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResidencyError(
                f"{where} is not an anechain compute plan "
                f"(schema {found!r}, expected {PLAN_SCHEMA_V1!r})"
            )
        try:
            units = str(data.get("compute_units", "cpu_and_ne"))
            if units not in COMPUTE_UNITS:
                raise ValueError(f"unknown compute units {units!r}")
            return cls(
                ops=tuple(PlanOp.from_dict(op) for op in data["ops"]),
                compute_units=units,
                function=str(data.get("function", "main")),
                model=str(data.get("model", "")),
                package_sha256=_sha256_field(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResidencyError(f"{where} is malformed: {exc}") from None


@dataclass(frozen=True)
class PackagePlan:
    """The compute plan of every function of one compiled model (`main`, or `decode` and
    `prefill`), in function-name order."""

    plans: tuple[ComputePlan, ...]
    compute_units: str = "cpu_and_ne"
    model: str = ""
    package_sha256: str | None = None

    @property
    def functions(self) -> tuple[str, ...]:
        return tuple(p.function for p in self.plans)

    def function(self, name: str) -> ComputePlan:
        for plan in self.plans:
            if plan.function == name:
                return plan
        raise ResidencyError(f"the compute plan has no function {name!r}")

    @property
    def ops(self) -> tuple[PlanOp, ...]:
        """Every function's ops, one function after the other."""
        return tuple(op for plan in self.plans for op in plan.ops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "package_sha256": self.package_sha256,
            "compute_units": self.compute_units,
            "functions": {p.function: [op.to_dict() for op in p.ops] for p in self.plans},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> PackagePlan:
        """A saved plan: this schema, or a one-function plan of `anechain.compute-plan/1`."""
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema == PLAN_SCHEMA_V1:
            one = ComputePlan.from_dict(data, where)
            return cls((one,), one.compute_units, one.model, one.package_sha256)
        if schema != PLAN_SCHEMA:
            found = schema if isinstance(data, dict) else type(data).__name__
            raise ResidencyError(
                f"{where} is not an anechain compute plan "
                f"(schema {found!r}, expected {PLAN_SCHEMA!r} or {PLAN_SCHEMA_V1!r})"
            )
        try:
            units = str(data.get("compute_units", "cpu_and_ne"))
            if units not in COMPUTE_UNITS:
                raise ValueError(f"unknown compute units {units!r}")
            functions = data["functions"]
            if not isinstance(functions, dict) or not functions:
                raise ValueError("no functions")
            model, sha = str(data.get("model", "")), _sha256_field(data)
            plans = tuple(
                ComputePlan(tuple(PlanOp.from_dict(op) for op in ops), units, str(name), model, sha)
                for name, ops in sorted(functions.items())
            )
            return cls(plans, units, model, sha)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResidencyError(f"{where} is malformed: {exc}") from None


def _sha256_field(data: dict[str, Any]) -> str | None:
    """The saved plan's package_sha256: None, or the 64 hex digits sha256_tree writes."""
    sha = data.get("package_sha256")
    if sha is not None and not (
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    ):
        raise ValueError(f"package_sha256 {sha!r} is not a sha256 hex digest")
    return sha


def save_plan(plan: PackagePlan, path: str | Path) -> Path:
    """Write the plan (every function) as JSON, atomically."""
    path = Path(path)
    atomic_write_json(path, plan.to_dict(), indent=1)
    return path


def read_saved_plan(path: str | Path) -> PackagePlan:
    """Load a plan written by `save_plan` (any OS)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResidencyError(f"compute plan {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ResidencyError(f"compute plan {path} is not readable JSON ({exc})") from None
    return PackagePlan.from_dict(data, where=str(path))


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
    # coremltools' bridge gives None for a device class it does not know (CoreMLPython.mm).
    raise ResidencyError(
        "the compute plan prefers a compute device this coremltools does not know "
        f"({type(device).__name__}); a newer coremltools may name it"
    )


def _bindings(op: Any) -> dict[str, list[str]]:
    """Input name -> bound variable names (constant values show as '<value>')."""
    return {
        k: [b.name if b.name is not None else "<value>" for b in arg.bindings]
        for k, arg in op.inputs.items()
    }


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
            kind = op_type(op.operator_name)
            outputs = tuple(o.name for o in op.outputs)
            bindings = _bindings(op)
            ops.append(
                PlanOp(
                    type=kind,
                    outputs=outputs,
                    preferred=preferred,
                    supported=supported,
                    cost=None if cost is None else float(cost.weight),
                    depth=depth,
                    name=op_name(kind, outputs, bindings),
                    inputs=tuple((k, tuple(v)) for k, v in sorted(bindings.items())),
                )
            )
            for inner in op.blocks:
                walk(inner, depth + 1)

    walk(program.functions[function].block, 0)
    return ComputePlan(tuple(ops), compute_units, function, model, package_sha256)


def normalise_plans(
    ct_plan: Any,
    *,
    compute_units: str = "cpu_and_ne",
    model: str = "",
    package_sha256: str | None = None,
) -> PackagePlan:
    """Every function of a coremltools MLComputePlan, each normalised by `normalise_plan`."""
    program = ct_plan.model_structure.program
    if program is None:
        raise ResidencyError(f"{model or 'the model'} is not an ML Program; no op-level plan")
    plans = tuple(
        normalise_plan(
            ct_plan,
            function=name,
            compute_units=compute_units,
            model=model,
            package_sha256=package_sha256,
        )
        for name in sorted(program.functions)
    )
    return PackagePlan(plans, compute_units, model, package_sha256)


def compute_unit(name: str) -> Any:
    """coremltools' ComputeUnit for one of COMPUTE_UNITS."""
    import coremltools as ct

    if name not in COMPUTE_UNITS:
        raise ConfigError(f"unknown compute units {name!r}; choose from {', '.join(COMPUTE_UNITS)}")
    return ct.ComputeUnit[name.upper()]


def _coremltools_load_plan(compiled: str, compute_units: str) -> Any:
    from coremltools.models.compute_plan import MLComputePlan

    return MLComputePlan.load_from_path(path=compiled, compute_units=compute_unit(compute_units))


def live_plan_available() -> bool:
    return macos_at_least(MIN_MACOS)


def load_live_plan(
    compiled: Path,
    compute_units: str = "cpu_and_ne",
    *,
    model: str = "",
    package_sha256: str | None = None,
    load_plan: PlanLoader | None = None,
) -> PackagePlan:
    """Ask Core ML for the compute plan of an already compiled model (every function: one
    load covers them all)."""
    if compute_units not in COMPUTE_UNITS:
        raise ConfigError(
            f"unknown compute units {compute_units!r}; choose from {', '.join(COMPUTE_UNITS)}"
        )
    if load_plan is None:
        require_macos("reading a Core ML compute plan", MIN_MACOS)
        load_plan = _coremltools_load_plan
    try:
        ct_plan = load_plan(str(compiled), compute_units)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ResidencyError(f"Core ML could not plan {compiled}: {exc}") from None
    return normalise_plans(
        ct_plan,
        compute_units=compute_units,
        model=model or str(compiled),
        package_sha256=package_sha256,
    )


def read_live_plan(
    model: str | Path,
    compute_units: str = "cpu_and_ne",
    *,
    load_plan: PlanLoader | None = None,
    compiler: Any = None,
) -> PackagePlan:
    """The compute plan of a .mlmodelc (an .mlpackage is compiled to a temporary folder
    first). `load_plan` replaces coremltools' loader (tests); `compiler` is passed to
    `anechain.compile`."""
    from anechain.compile import compile_to, read_sidecar

    model = Path(model)
    if load_plan is None:
        require_macos("reading a Core ML compute plan", MIN_MACOS)
    if not model.exists():
        raise ResidencyError(f"{model} does not exist")
    if model.suffix == ".mlmodelc":
        recorded = read_sidecar(model) or {}
        return load_live_plan(
            model,
            compute_units,
            package_sha256=recorded.get("source_sha256"),
            load_plan=load_plan,
        )
    if model.suffix != ".mlpackage":
        raise ResidencyError(f"{model} is neither an .mlmodelc nor an .mlpackage")
    with tempfile.TemporaryDirectory(prefix="anechain-plan-") as tmp:
        compiled = Path(tmp) / (model.stem + ".mlmodelc")
        compile_to(model, compiled, compiler)
        return load_live_plan(
            compiled,
            compute_units,
            model=str(model),
            package_sha256=sha256_tree(model),
            load_plan=load_plan,
        )
