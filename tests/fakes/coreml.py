"""Fakes for the macOS-only Core ML calls, built from coremltools' own classes.

The compute plan is a real `MLComputePlan` whose proxy (the part that needs Core ML) is
replaced; its model structure is made of coremltools' real `MLModelStructure*` dataclasses and
its devices subclass coremltools' real device classes, so `isinstance` checks and attribute
names are exactly those of coremltools 9. What Core ML itself decides is modelled as what it
may do, not as what anechain expects: the compiler may rename, fuse or drop ops
(`CompilerEdits`), and a function other than the default may get no device usage
(`plan_for_package(unreported=...)`); tests run under each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coremltools.models.compute_device import (
    MLCPUComputeDevice,
    MLGPUComputeDevice,
    MLNeuralEngineComputeDevice,
)
from coremltools.models.compute_plan import (
    MLComputePlan,
    MLComputePlanCost,
    MLComputePlanDeviceUsage,
    MLModelStructure,
    MLModelStructureProgram,
    MLModelStructureProgramArgument,
    MLModelStructureProgramBinding,
    MLModelStructureProgramBlock,
    MLModelStructureProgramFunction,
    MLModelStructureProgramNamedValueType,
    MLModelStructureProgramOperation,
    MLModelStructureProgramValue,
    MLModelStructureProgramValueType,
)
from tests.fakes.coreml_model import (  # the compiler, compiled models and states
    FakeCompiler,
    mil_compiled_model,
    mil_loader,
    toy_shard_model,
)

from anechain.compile import Compiler

# Re-exported for the tests that import them from here.
__all__ = ["FakeCompiler", "mil_compiled_model", "mil_loader", "toy_shard_model"]

# --- devices ----------------------------------------------------------------------------------


class FakeNeuralEngine(MLNeuralEngineComputeDevice):
    def __init__(self) -> None:  # the real one needs a Core ML proxy
        self.__proxy__ = None


class FakeCPU(MLCPUComputeDevice):
    def __init__(self) -> None:
        self.__proxy__ = None


class FakeGPU(MLGPUComputeDevice):
    def __init__(self) -> None:
        self.__proxy__ = None


DEVICES = {"ane": FakeNeuralEngine, "cpu": FakeCPU, "gpu": FakeGPU}


# --- compute plans -----------------------------------------------------------------------------


@dataclass
class Op:
    """What a test says about one op; `preferred=None` means Core ML reports no device usage.

    `name=""` makes an op without outputs (as `write_state`); `inputs` are its bindings.
    """

    type: str
    name: str
    preferred: str | None = "ane"
    supported: Sequence[str] = ("ane", "cpu")
    cost: float | None = None
    blocks: Sequence[Sequence[Op]] = field(default_factory=list)
    inputs: dict[str, Sequence[str]] = field(default_factory=dict)


class FakeComputePlanProxy:
    """Stands in for coremltools' `_MLComputePlanProxy`: answers per op object.

    `unreported` functions get no device usage and no cost for any op (`None`, which
    coremltools documents as "the usage couldn't be determined"): what Core ML may answer for
    the ops of a function other than the default one, since `MLComputePlan.load_from_path`
    builds its configuration without a function name (mac-bridge-audit #2)."""

    def __init__(self, functions: dict[str, Sequence[Op]], unreported: Sequence[str] = ()) -> None:
        self._usage: dict[int, MLComputePlanDeviceUsage | None] = {}
        self._cost: dict[int, MLComputePlanCost | None] = {}
        self._keep: list[Any] = []  # keeps ops alive so their ids stay unique
        self.usage_queries = 0
        assert set(unreported) <= set(functions), f"no function {set(unreported)}"
        program = MLModelStructureProgram(
            functions={
                name: MLModelStructureProgramFunction(
                    inputs=[], block=self._block(_silenced(ops) if name in unreported else ops)
                )
                for name, ops in functions.items()
            }
        )
        self.model_structure = MLModelStructure(neuralnetwork=None, program=program, pipeline=None)

    def _block(self, ops: Sequence[Op]) -> MLModelStructureProgramBlock:
        built = [self._op(o) for o in ops]
        names = [b.outputs[0].name for b in built[-1:] if b.outputs]
        return MLModelStructureProgramBlock(inputs=[], operations=built, output_names=names)

    def _op(self, o: Op) -> MLModelStructureProgramOperation:
        op = MLModelStructureProgramOperation(
            inputs={
                k: MLModelStructureProgramArgument(
                    bindings=[
                        MLModelStructureProgramBinding(name=n, value=None)
                        if n != "<value>"
                        else MLModelStructureProgramBinding(
                            name=None, value=MLModelStructureProgramValue()
                        )
                        for n in names
                    ]
                )
                for k, names in o.inputs.items()
            },
            operator_name=o.type,
            outputs=[
                MLModelStructureProgramNamedValueType(
                    name=o.name, type=MLModelStructureProgramValueType()
                )
            ]
            if o.name
            else [],
            blocks=[self._block(b) for b in o.blocks],
            __proxy__=None,
        )
        self._keep.append(op)
        if o.preferred is None:
            self._usage[id(op)] = None
        else:
            self._usage[id(op)] = MLComputePlanDeviceUsage(
                preferred_compute_device=DEVICES[o.preferred](),
                supported_compute_devices=[DEVICES[d]() for d in o.supported],
            )
        self._cost[id(op)] = None if o.cost is None else MLComputePlanCost(weight=o.cost)
        return op

    def get_compute_device_usage_for_mlprogram_operation(self, operation: Any) -> Any:
        self.usage_queries += 1
        return self._usage[id(operation)]

    def get_estimated_cost_for_mlprogram_operation(self, operation: Any) -> Any:
        return self._cost[id(operation)]


def _silenced(ops: Sequence[Op]) -> list[Op]:
    """The same ops with no device usage and no cost (nested blocks too)."""
    return [
        replace(o, preferred=None, cost=None, blocks=[_silenced(b) for b in o.blocks]) for o in ops
    ]


def make_plan(main: Sequence[Op], **other_functions: Sequence[Op]) -> MLComputePlan:
    """A real coremltools MLComputePlan over a fake proxy."""
    plan = object.__new__(MLComputePlan)  # __init__ insists on the native proxy type
    plan.__proxy__ = FakeComputePlanProxy({"main": main, **other_functions})
    return plan


class PlanLoader:
    """A `load_plan` seam that returns a fixed plan and records how it was asked."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.calls: list[tuple[str, str]] = []

    def __call__(self, compiled: str, compute_units: str) -> Any:
        self.calls.append((compiled, compute_units))
        return self.plan


def _int_output(op: Any) -> bool:
    from coremltools.proto import MIL_pb2

    floats = {MIL_pb2.FLOAT16, MIL_pb2.FLOAT32, MIL_pb2.FLOAT64, MIL_pb2.BFLOAT16}
    return any(
        o.type.WhichOneof("type") == "tensorType" and o.type.tensorType.dataType not in floats
        for o in op.outputs
    )


def anemll_placement(op: Any) -> str | None:
    """Where ANEMLL's published profile of stateful models puts an op: integer results on the
    CPU (it shows integer casts and `select` there), everything else, `slice_update` and
    the state reads/writes included, on the ANE; constants have no device usage."""
    if op.type == "const" or op.type.startswith("constexpr_"):
        return None
    return "cpu" if _int_output(op) else "ane"


def plan_ops_for_package(
    package: Path,
    place: Any = anemll_placement,
    opset: str = "ios18",
    function: str = "main",
) -> list[Op]:
    """The ops Core ML's plan of `package` shows, read from the package's own protobuf (what the
    compiler reads): opset-qualified names, `write_state` without outputs, the bindings.
    `place(proto_op) -> device | None` chooses each op's preferred device."""
    from anechain.package import load_spec

    fn = load_spec(package).mlProgram.functions[function]

    def ops_of(block: Any) -> list[Op]:
        out = []
        for op in block.operations:
            device = place(op)
            bound = {
                k: [a.name if a.WhichOneof("binding") == "name" else "<value>" for a in v.arguments]
                for k, v in op.inputs.items()
            }
            out.append(
                Op(
                    f"{opset}.{op.type}",
                    op.outputs[0].name if op.outputs else "",
                    preferred=device,
                    supported=("ane", "cpu") if device == "ane" else ("cpu",),
                    cost=None if device is None else (0.05 if op.type == "conv" else 0.002),
                    blocks=[ops_of(b) for b in op.blocks],
                    inputs=bound,
                )
            )
        return out

    return ops_of(fn.block_specializations[fn.opset])


@dataclass(frozen=True)
class CompilerEdits:
    """What the Core ML compiler may make of a program before `MLModelStructure` shows it:
    Core ML reads the structure from the compiled model and promises no mirror of the source
    program (mac-bridge-audit #3). Each edit keeps the program's dataflow: readers of a
    renamed, dropped or fused op read its replacement.

    - `rename(name) -> name` for the outputs of ops of the kinds in `rename_types` (empty:
      every kind), constants included;
    - `drop`: ops of these kinds (view-only: `reshape`, `expand_dims`) or names removed,
      readers rewired to the op's `x`;
    - `fuse`: `(first, second)` pairs; an op of kind `second` right after the `first` it
      reads become one op `first_second` (an op the program lacks).
    """

    rename: Any = None
    rename_types: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()
    fuse: tuple[tuple[str, str], ...] = ()

    def apply(self, ops: list[Op]) -> list[Op]:
        alias: dict[str, str] = {}  # program variable -> the plan's
        return self._block(ops, alias)

    def _block(self, ops: list[Op], alias: dict[str, str]) -> list[Op]:
        out: list[Op] = []
        i = 0
        while i < len(ops):
            op = ops[i]
            kind = op.type.rsplit(".", 1)[-1]
            inputs = {k: [alias.get(n, n) for n in v] for k, v in op.inputs.items()}
            if (kind in self.drop or op.name in self.drop) and op.name and inputs.get("x"):
                alias[op.name] = inputs["x"][0]
                i += 1
                continue
            nxt = ops[i + 1] if i + 1 < len(ops) else None
            if (
                nxt is not None
                and (kind, nxt.type.rsplit(".", 1)[-1]) in self.fuse
                and op.name in {n for v in nxt.inputs.values() for n in v}
            ):
                second = {
                    k: [alias.get(n, n) for n in v if n != op.name] for k, v in nxt.inputs.items()
                }
                fused_inputs = {**{f"a_{k}": v for k, v in inputs.items()}}
                fused_inputs.update({f"b_{k}": v for k, v in second.items() if v})
                opset = op.type.rsplit(".", 1)[0] + "." if "." in op.type else ""
                fused_kind = f"{opset}{kind}_{nxt.type.rsplit('.', 1)[-1]}"
                out.append(replace(nxt, type=fused_kind, inputs=fused_inputs))
                i += 2
                continue
            name = op.name
            if (
                name
                and self.rename is not None
                and (not self.rename_types or kind in self.rename_types)
            ):
                name = self.rename(name)
                alias[op.name] = name
            blocks = [self._block(list(b), alias) for b in op.blocks]
            out.append(replace(op, name=name, inputs=inputs, blocks=blocks))
            i += 1
        return out


# The compiler differences a test can ask for (each legitimate).
RENAMED = CompilerEdits(rename=lambda n: f"{n}_cast_fp16")
VIEWS_DROPPED = CompilerEdits(drop=frozenset({"reshape", "expand_dims"}))
SILU_MUL_FUSED = CompilerEdits(fuse=(("silu", "mul"),))


def plan_for_package(
    package: Path,
    place: Any = anemll_placement,
    *,
    edits: CompilerEdits | None = None,
    unreported: Sequence[str] = (),
    **place_in: Any,
) -> MLComputePlan:
    """A real coremltools MLComputePlan of `package`, devices chosen by `place` (or, for the
    function named, by `place_in[function]`): one plan function per program function
    (`main`, or `decode` and `prefill`), as Core ML's. `edits` changes the program as a
    compiler may; `unreported` functions get no device usage (FakeComputePlanProxy)."""
    from anechain.package import load_spec

    functions = sorted(load_spec(package).mlProgram.functions)
    unknown = set(place_in) - set(functions)
    assert not unknown, f"{package} has no function {unknown}"
    plan = object.__new__(MLComputePlan)  # __init__ insists on the native proxy type
    ops = {f: plan_ops_for_package(package, place_in.get(f, place), function=f) for f in functions}
    if edits is not None:
        ops = {f: edits.apply(o) for f, o in ops.items()}
    plan.__proxy__ = FakeComputePlanProxy(ops, unreported)
    return plan


class DefaultFunctionCoreML:
    """Core ML as it may behave: the plan of a compiled model gives device usage for the ops of
    its default function only (the bridge plans with no function name). `compiler` compiles
    with FakeCompiler and records, in the fake .mlmodelc, the package it came from;
    `load_plan` plans that package with every other function unreported."""

    SOURCE = "fake-source-package.txt"

    def __init__(self, place: Any = anemll_placement, edits: CompilerEdits | None = None):
        self.fake = FakeCompiler()
        self.place, self.edits = place, edits
        self.defaults: list[str] = []  # the default function of each plan load

    def _run(self, package: Path, dest: Path) -> None:
        self.fake.run(package, dest)
        (dest / self.SOURCE).write_text(str(Path(package).resolve()))

    @property
    def compiler(self) -> Compiler:
        return Compiler("fake", self._run)

    def load_plan(self, compiled: str, compute_units: str) -> MLComputePlan:
        from anechain.package import load_spec

        package = Path((Path(compiled) / self.SOURCE).read_text())
        spec = load_spec(package)
        default = spec.description.defaultFunctionName or "main"
        self.defaults.append(default)
        others = [f for f in spec.mlProgram.functions if f != default]
        return plan_for_package(package, self.place, edits=self.edits, unreported=others)


def layer_ops(prefix: str = "l0", conv_device: str = "ane", other_device: str = "ane") -> list[Op]:
    """A decoder layer's shape: const weights (no usage), 4 convs, a handful of elementwise ops."""
    return [
        Op("const", f"{prefix}_qkv_weight", preferred=None),
        Op("constexpr_blockwise_shift_scale", f"{prefix}_qkv_w_dequant", preferred=None),
        Op("rsqrt", f"{prefix}_norm", preferred=other_device, cost=0.01),
        Op("conv", f"{prefix}_qkv_proj", preferred=conv_device, cost=0.3),
        Op("softmax", f"{prefix}_attn", cost=0.02),
        Op("conv", f"{prefix}_o_proj", cost=0.1),
        Op("conv", f"{prefix}_gate_up_proj", cost=0.35),
        Op("silu", f"{prefix}_act", cost=0.02),
        Op("conv", f"{prefix}_down_proj", cost=0.2),
    ]
