"""The package's own program, as Core ML sees it, and what class of work each op does.

A compute plan carries op kinds, names and devices but no dtypes; the saved ML Program (the
protobuf inside the .mlpackage, which is what the Core ML compiler reads: `coreml_update_state`
is already split into `write_state` + `read_state` there) carries the dtypes. Plan ops are
mapped to program ops by name; a replayed plan whose ops differ from the program is refused
(a live plan is matched leniently, `residency.match`).

Op classes:
- `const`: constants and weight decompression (`constexpr_*`), no run-time compute;
- `state`: `read_state` / `write_state`, the KV cache I/O;
- `index`: integer (or boolean) results (`position + 1`, the int32 concats that build
  `slice_update` begin/end, `reduce_argmax`), and casts from an integer: the Neural Engine
  computes fp16 only, so Core ML places these on the CPU;
- `compute`: everything else, fp16 tensor work (conv, matmul, softmax, elementwise,
  reductions, the KV `slice_update`), which must run on the Neural Engine.
`state` and `index` are the plumbing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anechain.errors import ResidencyError
from anechain.residency.plan import ComputePlan, op_name, op_type

CONST, STATE, INDEX, COMPUTE = "const", "state", "index", "compute"
PLUMBING = (STATE, INDEX)
STATE_OPS = frozenset({"read_state", "write_state", "coreml_update_state"})
_FLOAT_DTYPES = frozenset({"FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16"})


@dataclass(frozen=True)
class ProgramOp:
    type: str  # normalised by op_type
    name: str  # op_name, as for plan ops
    outputs: tuple[str, ...]
    dtypes: tuple[str, ...]  # of the outputs: "FLOAT16", "INT32", ...
    input_dtypes: tuple[str, ...] = ()  # of the bound variables that are tensors
    depth: int = 0

    @property
    def op_class(self) -> str:
        return classify(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "outputs": list(self.outputs),
            "dtypes": list(self.dtypes),
            "input_dtypes": list(self.input_dtypes),
            "depth": self.depth,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProgramOp:
        return cls(
            type=op_type(str(d["type"])),
            name=str(d["name"]),
            outputs=tuple(map(str, d["outputs"])),
            dtypes=tuple(map(str, d["dtypes"])),
            input_dtypes=tuple(map(str, d.get("input_dtypes", ()))),
            depth=int(d.get("depth", 0)),
        )


def classify(op: ProgramOp) -> str:
    """const | state | index | compute (see the module docstring)."""
    if op.type == "const" or op.type.startswith("constexpr_"):
        return CONST
    if op.type in STATE_OPS:
        return STATE
    if op.dtypes and not all(d in _FLOAT_DTYPES for d in op.dtypes):
        return INDEX
    if op.type == "cast" and op.input_dtypes and not set(op.input_dtypes) & _FLOAT_DTYPES:
        return INDEX
    return COMPUTE


@dataclass(frozen=True)
class Program:
    """The ops of one function of a package's ML Program, in order, nested ops after their
    parent."""

    function: str
    ops: tuple[ProgramOp, ...]
    inputs: tuple[tuple[str, str], ...] = ()  # the function's inputs: (name, dtype or STATE)

    def by_name(self) -> dict[str, ProgramOp]:
        return {op.name: op for op in self.ops}

    def dtypes(self) -> dict[str, str]:
        """Variable name -> dtype: the function's inputs and every op's outputs."""
        out = dict(self.inputs)
        for op in self.ops:
            out.update(zip(op.outputs, op.dtypes, strict=False))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "inputs": dict(self.inputs),
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "program") -> Program:
        try:
            inputs = tuple((str(k), str(v)) for k, v in dict(data.get("inputs", {})).items())
            return cls(
                str(data["function"]), tuple(ProgramOp.from_dict(o) for o in data["ops"]), inputs
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResidencyError(f"{where} is malformed: {exc}") from None


def _dtype_name(value_type: Any) -> str | None:
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    if kind == "tensorType":
        return MIL_pb2.DataType.Name(value_type.tensorType.dataType)
    if kind == "stateType":
        return "STATE"
    return None


def program_from_spec(spec: Any, function: str | None = None) -> Program:
    """The ops of `function` in a package's protobuf spec (no weights are read); by default
    the package's default function (`main`, or `decode` beside `prefill`)."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise ResidencyError("the model is not an ML Program; no op-level residency")
    function = function or spec.description.defaultFunctionName or "main"
    functions = spec.mlProgram.functions
    if function not in functions:
        raise ResidencyError(
            f"the program has no function {function!r} (has: {', '.join(sorted(functions))})"
        )
    fn = functions[function]
    dtypes: dict[str, str | None] = {i.name: _dtype_name(i.type) for i in fn.inputs}
    ops: list[ProgramOp] = []

    def walk(block: Any, depth: int) -> None:
        for inner_input in block.inputs:
            dtypes[inner_input.name] = _dtype_name(inner_input.type)
        for op in block.operations:
            bound = {
                k: [a.name if a.WhichOneof("binding") == "name" else "<value>" for a in v.arguments]
                for k, v in op.inputs.items()
            }
            kind = op_type(op.type)
            outputs = tuple(o.name for o in op.outputs)
            out_dtypes = tuple(_dtype_name(o.type) or "OTHER" for o in op.outputs)
            in_dtypes = tuple(
                d for names in bound.values() for n in names if (d := dtypes.get(n)) is not None
            )
            dtypes.update(zip(outputs, out_dtypes, strict=True))
            name = op_name(kind, outputs, bound)
            ops.append(ProgramOp(kind, name, outputs, out_dtypes, in_dtypes, depth))
            for inner in op.blocks:
                walk(inner, depth + 1)

    inputs = tuple((i.name, _dtype_name(i.type) or "OTHER") for i in fn.inputs)
    walk(fn.block_specializations[fn.opset], 0)
    return Program(function, tuple(ops), inputs)


def read_program(package: str | Path, function: str | None = None) -> Program:
    """The program of an .mlpackage (the spec only; weights stay on disk)."""
    from anechain.package import load_spec

    return program_from_spec(load_spec(package), function)


def programs_from_spec(spec: Any) -> tuple[Program, ...]:
    """Every function of a package's program (`main`, or `decode` and `prefill`), by name."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise ResidencyError("the model is not an ML Program; no op-level residency")
    return tuple(program_from_spec(spec, name) for name in sorted(spec.mlProgram.functions))


def read_programs(package: str | Path) -> tuple[Program, ...]:
    """Every function's program of an .mlpackage (the spec only; weights stay on disk)."""
    from anechain.package import load_spec

    return programs_from_spec(load_spec(package))


def check_plan_functions(planned: Any, programmed: Any, where: str = "") -> None:
    """ResidencyError unless the plan has exactly the package's functions: a plan that lacks
    one (prefill) would leave that function's ops ungated."""
    planned, programmed = set(planned), set(programmed)
    if planned == programmed:
        return
    where = f" of {where}" if where else ""
    missing, extra = sorted(programmed - planned), sorted(planned - programmed)
    detail = "; ".join(
        part
        for part in (
            f"it lacks function {', '.join(map(repr, missing))} of the package" if missing else "",
            f"it has function {', '.join(map(repr, extra))} the package lacks" if extra else "",
        )
        if part
    )
    raise ResidencyError(f"the compute plan does not match the program{where}: {detail}")


def _signature(ops: Any) -> Counter[tuple[str, str, tuple[str, ...]]]:
    # Constants may be folded or dropped by the compiler; the work it plans may not.
    return Counter(
        (op.type, op.name, tuple(op.outputs))
        for op in ops
        if not (op.type == "const" or op.type.startswith("constexpr_"))
    )


def check_plan_matches_program(plan: ComputePlan, program: Program, where: str = "") -> None:
    """ResidencyError unless the plan's ops (kind, name, outputs) are the program's ops.

    Constants are left out of the comparison; every other op must appear in both, as often.
    """
    planned, programmed = _signature(plan.ops), _signature(program.ops)
    if planned == programmed:
        return
    where = f" of {where}" if where else ""
    in_plan = Counter(k for (k, _, _), n in planned.items() for _ in range(n))
    in_prog = Counter(k for (k, _, _), n in programmed.items() for _ in range(n))
    differ = sorted(k for k in in_plan.keys() | in_prog.keys() if in_plan[k] != in_prog[k])
    if differ:
        detail = ", ".join(f"{in_plan[k]} {k} in the plan vs {in_prog[k]}" for k in differ[:4])
    else:
        only_plan = sorted(name for (_, name, _) in planned - programmed)[:3]
        only_prog = sorted(name for (_, name, _) in programmed - planned)[:3]
        detail = f"ops named only in the plan: {only_plan}, only in the program: {only_prog}"
    raise ResidencyError(f"the compute plan does not match the program{where}: {detail}")


def classify_plan(plan: ComputePlan, program: Program) -> dict[str, str]:
    """Plan op name -> op class, from the program (the plan must match it)."""
    by_name = program.by_name()
    out = {}
    for op in plan.ops:
        prog_op = by_name.get(op.name)
        # Only constants may be missing from the program (check_plan_matches_program).
        out[op.name] = prog_op.op_class if prog_op is not None else CONST
    return out
