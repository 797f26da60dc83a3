"""Matching a plan with its program: strictly for replayed plans, leniently for live ones.

A plan replayed from a file or a capture bundle must be the program's ops exactly
(`program.check_plan_matches_program`): nothing on disk may claim the compiler changed things.

A plan read live from a package anechain just compiled is what the Core ML compiler made of
that program, and the compiler may rename, fuse, add or drop ops. Such a plan is matched
leniently, and every difference is listed in the report (`OpMatch`):
- ops matched by kind and name take their class from the program;
- the other plan ops are paired, in order, with the program's unmatched ops of the same kind
  (`renamed`), or are `added`; the program's leftover ops are `removed`;
- a renamed or added op is classed from the plan alone (`infer_class`): its operator type
  and the dtypes of the variables it binds. Core ML's `MLModelStructureProgramValueType`
  carries no dtype (coremltools builds it empty), so dtypes come from the program's variables
  the op reads and flow along the plan. An op whose dtype cannot be told is `compute`: it
  then has to be on the Neural Engine, so a lenient match can never hide fp16 work as
  plumbing.

What the compiler may not do (ResidencyError): drop a conv (a conv the plan lacks is a conv
whose device nobody knows), or drop fp16 compute beyond view-only ops (`VIEW_OPS`) without
adding any compute op the work could have been fused into. Added convs are counted and gated
like the rest, and CI (scripts/check_residency.py) holds conv_total to 4 x layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from anechain.errors import ResidencyError
from anechain.residency.plan import ComputePlan, PlanOp
from anechain.residency.program import (
    _FLOAT_DTYPES,
    COMPUTE,
    CONST,
    INDEX,
    STATE,
    STATE_OPS,
    Program,
    check_plan_matches_program,
    classify_plan,
)

STRICT, LENIENT = "strict", "lenient"
# Ops that only re-view a tensor; a compiler may fold them into their neighbours' layouts.
VIEW_OPS = frozenset({"identity", "reshape", "expand_dims", "squeeze"})
# Ops whose result is integer or boolean whatever their inputs (argmax indices, comparisons).
INT_RESULT_OPS = frozenset(
    {
        "reduce_argmax",
        "reduce_argmin",
        "argsort",
        "shape",
        "non_zero",
        "equal",
        "not_equal",
        "less",
        "less_equal",
        "greater",
        "greater_equal",
        "logical_and",
        "logical_or",
        "logical_not",
        "logical_xor",
    }
)
# Where a plan op's class came from.
FROM_PROGRAM, FROM_PLAN, ASSUMED = "program", "plan", "assumed"
CONST_VALUE = "CONST"  # the dtype recorded for the output of a constant the program lacks


@dataclass(frozen=True)
class OpChange:
    """One op the compiler changed: `name` is the plan's (the program's, for `removed`)."""

    type: str
    name: str
    op_class: str
    source: str  # program | plan | assumed (compute, the plan says too little)
    was: str = ""  # renamed: the program's name

    def to_dict(self) -> dict[str, str]:
        out = {"type": self.type, "name": self.name, "class": self.op_class, "source": self.source}
        if self.was:
            out["was"] = self.was
        return out


@dataclass(frozen=True)
class OpMatch:
    """How a function's plan matched its program."""

    mode: str = STRICT  # strict | lenient
    exact: int = 0  # non-const ops matched by kind and name
    renamed: tuple[OpChange, ...] = ()
    added: tuple[OpChange, ...] = ()
    removed: tuple[OpChange, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.renamed or self.added or self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "exact": self.exact,
            "renamed": [c.to_dict() for c in self.renamed],
            "added": [c.to_dict() for c in self.added],
            "removed": [c.to_dict() for c in self.removed],
        }


def _is_const(kind: str) -> bool:
    return kind == "const" or kind.startswith("constexpr_")


def infer_class(
    op: PlanOp, dtypes: dict[str, str], state_dtype: str | None = None
) -> tuple[str, str, str | None]:
    """(class, source, output dtype or None) of a plan op, from its operator type and the dtypes
    of the variables it binds (`dtypes`, name -> dtype); unknown dtypes make it `compute`.
    `state_dtype`: what every `read_state` of the program yields, when they all agree."""
    if _is_const(op.type):
        return CONST, FROM_PLAN, None
    if op.type in STATE_OPS:
        return STATE, FROM_PLAN, state_dtype if op.type == "read_state" else None
    if op.type in INT_RESULT_OPS:
        return INDEX, FROM_PLAN, "INT32"
    # A constant the plan renamed is an operand whose dtype follows the op's (MIL's type
    # rules); the op is classed by its other operands.
    names = [n for _, bound in op.inputs for n in bound if n != "<value>"]
    known = [d for d in (dtypes.get(n) for n in names) if d != CONST_VALUE]
    if not known or None in known:
        return COMPUTE, ASSUMED, None
    tensors = [d for d in known if d != "STATE"]
    if tensors and not set(tensors) & _FLOAT_DTYPES:
        # Integer in, integer out (a cast from an integer is index too, its result unknown).
        return INDEX, FROM_PLAN, None if op.type == "cast" else "INT32"
    if op.type == "cast":  # fp16 -> int32 or -> fp32: the target dtype is a constant
        return COMPUTE, ASSUMED, None
    return COMPUTE, FROM_PLAN, "FLOAT16"


def match_plan(
    plan: ComputePlan, program: Program, *, lenient: bool = False, where: str = ""
) -> tuple[dict[str, str], OpMatch]:
    """(plan op name -> class, how the plan matched). Strict unless `lenient` (live plans)."""
    if not lenient:
        check_plan_matches_program(plan, program, where)
        exact = sum(not _is_const(op.type) for op in plan.ops)
        return classify_plan(plan, program), OpMatch(STRICT, exact)
    by_name = program.by_name()
    dtypes = program.dtypes()
    matched: set[str] = set()
    pending: set[int] = set()  # ids of plan ops the program lacks by kind and name
    classes: dict[str, str] = {}
    for op in plan.ops:
        prog = by_name.get(op.name)
        if prog is not None and prog.type == op.type and op.name not in matched:
            matched.add(op.name)
            classes[op.name] = prog.op_class
        else:
            pending.add(id(op))
    # Pair the rest with the program's unmatched ops of the same kind, in order.
    unmatched: dict[str, list[Any]] = defaultdict(list)
    for prog in program.ops:
        if prog.name not in matched and not _is_const(prog.type):
            unmatched[prog.type].append(prog)
    # Every read_state of a function reads one of its states; if they all yield one dtype
    # (fp16 KV caches), a read_state the program lacks yields it too.
    read = {d for p in program.ops if p.type == "read_state" for d in p.dtypes}
    state_dtype = read.pop() if len(read) == 1 else None
    renamed, added = [], []
    for op in plan.ops:  # in plan order, so inferred dtypes reach the ops that read them
        if id(op) not in pending:
            continue
        op_class, source, out = infer_class(op, dtypes, state_dtype)
        classes[op.name] = op_class
        if op_class == CONST:
            out = CONST_VALUE
        for name in op.outputs:
            if out is None:
                dtypes.pop(name, None)
            else:
                dtypes[name] = out
        if _is_const(op.type):
            continue
        was = unmatched[op.type].pop(0).name if unmatched[op.type] else ""
        change = OpChange(op.type, op.name, op_class, source, was)
        (renamed if was else added).append(change)
    removed = tuple(
        OpChange(p.type, p.name, p.op_class, FROM_PROGRAM) for ps in unmatched.values() for p in ps
    )
    _check_removed(removed, added, where)
    exact = sum(not _is_const(op.type) for op in plan.ops if id(op) not in pending)
    return classes, OpMatch(LENIENT, exact, tuple(renamed), tuple(added), removed)


def _check_removed(removed: tuple[OpChange, ...], added: list[OpChange], where: str) -> None:
    """ResidencyError if the plan lacks work the program does (see the module docstring)."""
    at = f" of {where}" if where else ""
    convs = [c.name for c in removed if c.type == "conv"]
    if convs:
        raise ResidencyError(
            f"the compute plan{at} lacks {len(convs)} conv op(s) of the program "
            f"({', '.join(convs[:3])}): their device is unknown, so residency is unproven"
        )
    dropped = [c.name for c in removed if c.op_class == COMPUTE and c.type not in VIEW_OPS]
    if dropped and not any(c.op_class == COMPUTE for c in added):
        raise ResidencyError(
            f"the compute plan{at} lacks {len(dropped)} fp16 compute op(s) of the program "
            f"({', '.join(dropped[:3])}) and adds none they could be fused into"
        )
