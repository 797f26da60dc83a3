"""Fakes for the macOS-only Core ML calls, built from coremltools' own classes.

The compute plan is a real `MLComputePlan` whose proxy (the part that needs Core ML) is
replaced; its model structure is made of coremltools' real `MLModelStructure*` dataclasses and
its devices subclass coremltools' real device classes, so `isinstance` checks and attribute
names are exactly those of coremltools 9.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    MLModelStructureProgramBlock,
    MLModelStructureProgramFunction,
    MLModelStructureProgramNamedValueType,
    MLModelStructureProgramOperation,
    MLModelStructureProgramValueType,
)

from anechain.compile import Compiler
from anechain.errors import CompileError

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
    """What a test says about one op; `preferred=None` means Core ML reports no device usage."""

    type: str
    name: str
    preferred: str | None = "ane"
    supported: Sequence[str] = ("ane", "cpu")
    cost: float | None = None
    blocks: Sequence[Sequence[Op]] = field(default_factory=list)


class FakeComputePlanProxy:
    """Stands in for coremltools' `_MLComputePlanProxy`: answers per op object."""

    def __init__(self, functions: dict[str, Sequence[Op]]) -> None:
        self._usage: dict[int, MLComputePlanDeviceUsage | None] = {}
        self._cost: dict[int, MLComputePlanCost | None] = {}
        self._keep: list[Any] = []  # keeps ops alive so their ids stay unique
        self.usage_queries = 0
        program = MLModelStructureProgram(
            functions={
                name: MLModelStructureProgramFunction(inputs=[], block=self._block(ops))
                for name, ops in functions.items()
            }
        )
        self.model_structure = MLModelStructure(neuralnetwork=None, program=program, pipeline=None)

    def _block(self, ops: Sequence[Op]) -> MLModelStructureProgramBlock:
        built = [self._op(o) for o in ops]
        names = [b.outputs[0].name for b in built[-1:]]
        return MLModelStructureProgramBlock(inputs=[], operations=built, output_names=names)

    def _op(self, o: Op) -> MLModelStructureProgramOperation:
        op = MLModelStructureProgramOperation(
            inputs={},
            operator_name=o.type,
            outputs=[
                MLModelStructureProgramNamedValueType(
                    name=o.name, type=MLModelStructureProgramValueType()
                )
            ],
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


# --- compiler -----------------------------------------------------------------------------------


class FakeCompiler:
    """Writes a plausible .mlmodelc (model.mil + metadata.json) and counts its calls."""

    def __init__(self, fail_with: str | None = None, write_nothing: bool = False) -> None:
        self.calls: list[tuple[Path, Path]] = []
        self.fail_with = fail_with
        self.write_nothing = write_nothing

    def run(self, package: Path, dest: Path) -> None:
        self.calls.append((package, dest))
        if self.fail_with is not None:
            raise CompileError(f"fake compiler failed: {self.fail_with}", stderr=self.fail_with)
        if self.write_nothing:
            return
        dest.mkdir()
        (dest / "model.mil").write_text(f"compiled from {package.name} call {len(self.calls)}\n")
        (dest / "metadata.json").write_text(json.dumps([{"inputSchema": [], "outputSchema": []}]))

    @property
    def compiler(self) -> Compiler:
        return Compiler("fake", self.run)


def write_compiled_metadata(
    compiled: Path,
    inputs: dict[str, tuple[tuple[int, ...], str]],
    outputs: dict[str, tuple[tuple[int, ...], str]],
) -> None:
    """A metadata.json in the Core ML compiler's format (shape as a string, CamelCase dtype)."""

    def schema(d: dict[str, tuple[tuple[int, ...], str]]) -> list[dict[str, str]]:
        return [
            {
                "name": n,
                "type": "MultiArray",
                "dataType": t,
                "shape": json.dumps(list(s)),
                "hasShapeFlexibility": "0",
                "isOptional": "0",
            }
            for n, (s, t) in d.items()
        ]

    compiled.mkdir(parents=True, exist_ok=True)
    (compiled / "metadata.json").write_text(
        json.dumps([{"inputSchema": schema(inputs), "outputSchema": schema(outputs)}])
    )


# --- compiled model (CompiledMLModel look-alike) ------------------------------------------------


class FakeState:
    """Like coremltools' MLState: `read_state(name)`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.values = {n: np.zeros(s, dtype=np.float16) for n, s in shapes.items()}

    def read_state(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise RuntimeError(f"no state named {name}")
        return self.values[name].copy()


class FakeCompiledModel:
    """Like CompiledMLModel: `make_state()`, `predict(data, state=)`.

    Behaves like a shard: writes position+1 into both caches at the given position and returns
    `hidden_states * 2` as float32 (as Core ML hands back fp16 outputs). Like the real
    `predict`, it converts fp16 arrays in the dict it is given to fp32 in place.
    """

    def __init__(self, state_shapes: dict[str, tuple[int, ...]]) -> None:
        self.state_shapes = state_shapes
        self.predicts = 0
        self.states_made = 0

    def make_state(self) -> FakeState:
        self.states_made += 1
        return FakeState(self.state_shapes)

    def predict(self, data: dict[str, Any], state: FakeState | None = None) -> dict[str, Any]:
        for k, v in data.items():
            if isinstance(v, np.ndarray) and v.dtype == np.float16:
                data[k] = v.astype(np.float32)
        assert state is not None
        self.predicts += 1
        p = int(data["position"][0])
        for value in state.values.values():
            value[:, :, p, :] = p + 1
        return {"output_hidden_states": (data["hidden_states"] * 2).astype(np.float32)}
