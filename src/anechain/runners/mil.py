"""The `mil` runner: a numpy interpreter for a saved shard's ML Program, emulating fp16.

Core ML prediction needs macOS, so on every other OS we validate the exported artifact
itself: the program is read back from the .mlpackage (`anechain.package.load_program`) and
its `main` function is executed op by op.

Numerics emulate Core ML's FLOAT16 compute: each op computes in float32 from its (fp16)
inputs and its outputs are rounded to the dtype the program declares (fp16 outputs become
float16, int32 stays int32). Accumulation order differs from the Neural Engine, so results
agree to fp16 rounding, not bit for bit.

Everything that does not depend on the inputs happens once, at load: every op type is
checked against the registry (an unknown op is a RunnerError naming it), consts and
constexpr weights (INT8 `constexpr_blockwise_shift_scale`) are materialized, and conv
weights become (out, in) matrices so a 1x1 conv is one GEMV. INT8 weights with one scale per
output channel and fp16 weights stay in the program's own arrays, expanded to float32 a
block of rows at a time (`runners/mil_weights.py`); other weights become float32 matrices.
Only the runner's own function is read from the package (each function of a multifunction
shard holds the whole weight set), and the program object is dropped afterwards, so memory
holds about one copy of the weight blob.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from anechain.contract import TensorSpec
from anechain.errors import RunnerError
from anechain.runners.mil_ops import (
    OPS,
    TORCH_MIN_SIZE,
    StateRef,
    Step,
    astype,
    check_inputs,
    conv_matrix,
    ints,
)
from anechain.runners.mil_weights import ConvWeight, WeightPool, compact_weight

log = logging.getLogger(__name__)

# Package metadata naming each layer's output var, in order (written by the exporter).
LAYER_OUTPUTS_KEY = "anechain.layer_outputs"

# Ops whose output is (a view of) a state's content: cache-sized, and holding values that
# were already checked when they were computed, so the per-op diagnostics skip them.
_STATE_VIEW_OPS = frozenset({"slice_update", "slice_by_index", "reshape", "expand_dims"})

# Masked attention logits sit at MASK_VALUE (-30000) by design and would hide the real peak
# in `layer_max_abs`: values derived from these inputs are left out of it until a softmax.
_MASK_INPUTS = frozenset({"attention_mask"})
_MASK_SINKS = frozenset({"softmax"})


# Weights above which dropping the program is followed by a garbage collection.
_COLLECT_BYTES = 64 << 20


# Ops whose output is always a new array. Any other op's output may share its input's
# memory (a reshape or slice is a view; a cast to the same dtype is the input itself; an
# in-place slice_update is its input).
_FRESH_OPS = frozenset(
    {
        "add", "sub", "mul", "real_div", "maximum", "minimum", "abs", "sqrt", "silu",
        "inverse", "rsqrt", "clip", "reduce_max", "reduce_mean", "reduce_sum",
        "reduce_argmax", "softmax", "matmul", "conv", "concat",
    }
)  # fmt: skip


def _plan_in_place_updates(steps: list[Step]) -> None:
    """Mark the KV cache writes that may update the state's array in place.

    Each layer writes its new keys with slice_update -> coreml_update_state on the state's
    value (read_state's, or the previous layer's write, which returns what it stored); a
    copying slice_update copies the whole cache (every layer's slots) for each write, 0.2 s
    of a full-size prefill chunk. In place gives the same values when nothing reads the old
    array afterwards: this slice_update is the value's last reader, its output only writes
    that same state back, and no other value that may share the state's memory (a view of
    an earlier read) is read after this op.
    """

    def names(s: Step) -> list[str]:
        return [n for v in s.inputs.values() for n in ((v,) if isinstance(v, str) else v)]

    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        for name in s.outputs:
            producer[name] = i
        for name in names(s):
            readers.setdefault(name, []).append(i)

    shares: dict[str, set[str]] = {}  # var -> the states whose array it may share
    for s in steps:
        if s.op_type == "read_state":
            shares[s.outputs[0]] = {str(s.inputs["input"])}
        elif s.op_type == "coreml_update_state":  # returns the value it stored
            shares[s.outputs[0]] = {str(s.inputs["state"])} | shares.get(
                str(s.inputs["value"]), set()
            )
        elif s.op_type not in _FRESH_OPS:
            states = set().union(*(shares.get(n, set()) for n in names(s)))
            if states:
                shares.update({name: states for name in s.outputs})
    for i, s in enumerate(steps):
        if s.op_type != "slice_update":
            continue
        x = str(s.inputs["x"])
        src = producer.get(x)
        # x is the state's array: read, or what the previous write stored (the op returns it).
        if src is None or steps[src].op_type not in ("read_state", "coreml_update_state"):
            continue
        state = str(steps[src].inputs["input" if steps[src].op_type == "read_state" else "state"])
        if any(r > i for r in readers.get(x, [])) or shares.get(x) != {state}:
            continue
        users = readers.get(s.outputs[0], [])
        if len(users) != 1:
            continue
        write = steps[users[0]]
        if write.op_type != "coreml_update_state" or write.inputs.get("state") != state:
            continue
        live = [
            name for name, held in shares.items()
            if state in held and name != x and producer.get(name, -1) < i
            and any(r > i for r in readers.get(name, []))
        ]  # fmt: skip
        if not live:
            s.extra["in_place"] = True


def _layer_output_vars(spec: Any, path: Path) -> list[str]:
    """The exporter's record of each layer's output var, or [] for a package without it."""
    import json

    raw = dict(spec.description.metadata.userDefined).get(LAYER_OUTPUTS_KEY)
    if raw is None:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RunnerError(f"{path}: {LAYER_OUTPUTS_KEY} is not a JSON list of var names")
    return names


def _is_load_time(op_type: str) -> bool:
    return op_type == "const" or op_type.startswith("constexpr_")


def _np_dtype(builtin: Any) -> np.dtype[Any]:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


def _static_shape(var: Any) -> tuple[int, ...] | None:
    shape = tuple(var.shape)
    if all(isinstance(d, (int, np.integer)) for d in shape):
        return tuple(int(d) for d in shape)
    return None


def _max_abs(value: np.ndarray) -> float:
    """max |value|: NaN if any value is NaN, else inf if any is infinite. In torch: numpy's
    float16 reductions are not vectorized (3 ns a value here, 20x torch)."""
    if value.dtype.char not in "ef" or value.size < TORCH_MIN_SIZE:
        return float(np.max(np.abs(value)))
    import torch

    return float(torch.from_numpy(np.ascontiguousarray(value)).abs().max())


class _Diagnostics:
    """What a step's values say, kept apart from executing them: the first op (or input)
    that produced NaN/Inf, and the largest finite |value| per layer."""

    def __init__(self, num_layers: int) -> None:
        self.first: dict[str, Any] | None = None
        self.layer_max = [0.0] * num_layers

    def inputs(self, feeds: dict[str, np.ndarray]) -> None:
        for name, arr in feeds.items():
            if self.first is None and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                self.first = {"op": name, "op_type": "input", "layer": 0}

    def observe(self, s: Step, value: np.ndarray) -> None:
        if not s.track or value.dtype.kind != "f" or not value.size:
            return
        peak = _max_abs(value)
        if not np.isfinite(peak):
            if self.first is None:
                self.first = {"op": s.name, "op_type": s.op_type, "layer": s.layer}
            finite = value[np.isfinite(value)]
            peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        if s.measure:
            self.layer_max[s.layer] = max(self.layer_max[s.layer], peak)


class MILRunner:
    """ShardRunner over a saved .mlpackage's ML Program, in numpy (any OS).

    Options:
        track_activations: check every op's output after each step (default True). Off,
            `first_nonfinite` stays None and `layer_max_abs` empty: faster, no diagnostics.

    Attributes after each `step()`:
        first_nonfinite: None, or {"op": name, "op_type": type, "layer": k} for the first
            op (or input, with op_type "input") whose output held NaN or Inf in that step.
        layer_max_abs: the largest finite |value| of any op output per shard-relative layer
            in that step. State views (cache contents) and values carrying the attention
            mask's offset (up to the softmax) are left out.
        layer_outputs: each layer's output hidden state (1, C, 1, 1) in that step.

    Layers are what the exporter recorded: the package metadata `anechain.layer_outputs`
    lists each layer's output var in order; an op belongs to the first layer whose output
    it does not come after (ops after the last one belong to the last layer). Without that
    metadata the whole program is one layer and `layer_outputs` stays empty.

    Also: `inputs`, `outputs`, `states` (TensorSpecs of the function), `num_layers`, and
    `op_layers` (runtime op name -> shard-relative layer, the attribution used above).
    """

    name = "mil"

    def __init__(
        self,
        package_path: str | Path,
        *,
        track_activations: bool = True,
        function: str | None = None,
        state_from: MILRunner | None = None,
    ) -> None:
        """`function`: which function of a multifunction program (default: its default one);
        `state_from`: another runner of the same package whose states this one shares, as
        Core ML shares one state object across a model's functions."""
        from anechain.package import load_program, load_spec

        t0 = time.perf_counter()
        self.path = Path(package_path)
        self.track_activations = track_activations
        spec = load_spec(self.path)
        default = spec.description.defaultFunctionName or "main"
        self.function = function or default
        if spec.WhichOneof("Type") == "mlProgram":
            names = sorted(spec.mlProgram.functions)
            if self.function not in names:
                raise RunnerError(
                    f"{self.path}: the program has no {self.function!r} function "
                    f"(it has {', '.join(names)})"
                )
        # Only this function's weights are read: each function holds the whole weight set.
        spec, prog = load_program(self.path, self.function, spec)
        func = prog.functions[self.function]
        # The exporter records the layer outputs of the default (decode) function.
        self.layer_output_vars = (
            _layer_output_vars(spec, self.path) if self.function == default else []
        )
        ops = list(func.operations)
        self._check_supported(ops)

        self.inputs: tuple[TensorSpec, ...] = ()
        self.states: tuple[TensorSpec, ...] = ()
        self._state_refs: dict[str, StateRef] = {}
        self._read_io(func)

        self._consts: dict[str, Any] = {}
        self._weights: dict[str, ConvWeight] = {}  # conv weight var -> its (out, in) matrix
        # Functions of one package share weight blobs, but the loaded program holds each
        # function's own copy: reuse the other runner's weight where the values are equal
        # (compared, never assumed from the name), one copy in memory.
        pool = WeightPool(state_from._weights.values() if state_from is not None else ())
        self._materialize(ops, pool, {v.name for v in func.outputs})
        self._steps: list[Step] = []
        self.num_layers = 1
        self._plan(ops)
        _plan_in_place_updates(self._steps)
        self.op_layers: dict[str, int] = {s.name: s.layer for s in self._steps}
        self._output_vars = [v.name for v in func.outputs]
        self.outputs = tuple(
            TensorSpec(v.name, _static_shape(v) or (), _np_dtype(v.dtype).name)
            for v in func.outputs
        )
        # Drop the program. Its op/var graph is cyclic, so only the cycle collector frees the
        # arrays no weight kept (another function's, a shared weight's duplicate): collect
        # now where those are large (a full collection costs ~0.2 s in a process with torch).
        del prog, func, ops
        if sum(w.nbytes for w in self._weights.values()) > _COLLECT_BYTES:
            gc.collect()

        self._state_values: dict[str, np.ndarray] = {}
        self.first_nonfinite: dict[str, Any] | None = None
        self.layer_max_abs: list[float] = []
        self.layer_outputs: list[np.ndarray] = []
        if state_from is not None:
            if state_from.path.resolve() != self.path.resolve() or state_from.states != self.states:
                raise RunnerError(
                    f"{self.path} ({self.function}) cannot share the states of "
                    f"{state_from.path} ({state_from.function}): another program or other states"
                )
            self._state_values = state_from._state_values  # one dict, updated in place
        else:
            self.reset()
        log.debug(
            "loaded %s: %d ops, %d conv weights (%.1f MB), in %.1fs",
            self.path,
            len(self._steps),
            len(self._weights),
            sum(w.nbytes for w in self._weights.values()) / 1e6,
            time.perf_counter() - t0,
        )

    # --- load ------------------------------------------------------------------------------

    def _check_supported(self, ops: list[Any]) -> None:
        for op in ops:
            if getattr(op, "blocks", None):
                raise RunnerError(
                    f"{self.path}: op {op.name!r} ({op.op_type}) has nested blocks; the MIL "
                    "runner does not execute control flow"
                )
            if not _is_load_time(op.op_type) and op.op_type not in OPS:
                raise RunnerError(
                    f"{self.path}: op {op.name!r} has type {op.op_type!r}, which the MIL "
                    "runner does not implement"
                )
            if not _is_load_time(op.op_type):
                check_inputs(op.name, op.op_type, op.inputs)

    def _read_io(self, func: Any) -> None:
        from coremltools.converters.mil.mil import types

        inputs, states = [], []
        for name, var in func.inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                shape = tuple(int(d) for d in wrapped.get_shape())
                dtype = _np_dtype(wrapped.get_primitive()).name
                states.append(TensorSpec(name, shape, dtype))
                self._state_refs[var.name] = StateRef(name)
                continue
            shape = _static_shape(var)
            if shape is None:
                raise RunnerError(f"{self.path}: input {name!r} has a flexible shape {var.shape}")
            inputs.append(TensorSpec(name, shape, _np_dtype(var.dtype).name))
        self.inputs, self.states = tuple(inputs), tuple(states)

    def _materialize(self, ops: list[Any], pool: WeightPool, outputs: set[str]) -> None:
        """Evaluate consts and constexprs once. Conv weights are kept as `ConvWeight`s; other
        values only where a runtime op or the function's outputs read them (the int8 data
        and scales that feed a constexpr are load-time inputs only)."""
        for op in ops:
            if not _is_load_time(op.op_type):
                continue
            for var in op.outputs:
                children = list(var.child_ops)
                conv_uses = [
                    c for c in children if c.op_type == "conv" and c.inputs["weight"] is var
                ]
                value = None
                if conv_uses:
                    self._check_conv_weight(conv_uses[0], tuple(var.shape))
                    weight = compact_weight(op)
                    if weight is None:
                        value = self._value(op, var)
                        weight = ConvWeight(conv_matrix(np.asarray(value)))
                    self._weights[var.name] = pool.find(weight)
                read = [c for c in children if c not in conv_uses and not _is_load_time(c.op_type)]
                if read or not children or var.name in outputs:
                    value = self._value(op, var) if value is None else value
                    self._consts[var.name] = value if isinstance(value, str) else np.asarray(value)
                del value

    def _value(self, op: Any, var: Any) -> Any:
        try:
            value = var.val if op.op_type == "const" else op.materialized_val_inference()
        except Exception as exc:  # coremltools raises assorted errors here
            raise RunnerError(
                f"{self.path}: cannot materialize {op.op_type} op {op.name!r} ({exc})"
            ) from exc
        if value is None:
            raise RunnerError(f"{self.path}: {op.op_type} op {op.name!r} has no value")
        return value

    def _check_conv_weight(self, op: Any, shape: tuple[int, ...]) -> None:
        if len(shape) < 3 or any(int(k) != 1 for k in shape[2:]):
            raise RunnerError(
                f"{self.path}: conv op {op.name!r} has a {shape} weight; the MIL runner "
                "implements 1x1 convolutions only"
            )

    def _plan(self, ops: list[Any]) -> None:
        state_views: set[str] = set()
        masked: set[str] = set(_MASK_INPUTS)
        runtime_ops = [op for op in ops if not _is_load_time(op.op_type)]
        produced = {o.name: i for i, op in enumerate(runtime_ops) for o in op.outputs}
        missing = [v for v in self.layer_output_vars if v not in produced]
        if missing:
            raise RunnerError(
                f"{self.path}: {LAYER_OUTPUTS_KEY} names {missing[0]!r}, which no op produces"
            )
        ends = [produced[v] for v in self.layer_output_vars]
        if ends != sorted(ends):
            raise RunnerError(f"{self.path}: {LAYER_OUTPUTS_KEY} is not in program order")
        self.num_layers = max(len(ends), 1)
        raw_layers = [
            next((k for k, end in enumerate(ends) if i <= end), max(len(ends) - 1, 0))
            for i in range(len(runtime_ops))
        ]

        for op, layer in zip(runtime_ops, raw_layers, strict=True):
            inputs: dict[str, str | tuple[str, ...]] = {}
            for key, v in op.inputs.items():
                if isinstance(v, (list, tuple)):
                    inputs[key] = tuple(x.name for x in v)
                elif not (op.op_type == "conv" and key == "weight" and v.name in self._weights):
                    inputs[key] = v.name
            x = op.inputs.get("x")
            view = op.op_type in ("read_state", "coreml_update_state") or (
                op.op_type in _STATE_VIEW_OPS and x is not None and x.name in state_views
            )
            if view:
                state_views.update(o.name for o in op.outputs)
            in_names = {n for v in inputs.values() for n in ((v,) if isinstance(v, str) else v)}
            from_mask = op.op_type not in _MASK_SINKS and bool(in_names & masked)
            if from_mask:
                masked.update(o.name for o in op.outputs)
            extra: dict[str, Any] = {}
            if op.op_type == "conv":
                extra = self._conv_extra(op)
            self._steps.append(
                Step(
                    fn=OPS[op.op_type],
                    name=op.name,
                    op_type=op.op_type,
                    inputs=inputs,
                    outputs=tuple(o.name for o in op.outputs),
                    out_dtypes=tuple(_np_dtype(o.dtype) for o in op.outputs),
                    out_shapes=tuple(_static_shape(o) for o in op.outputs),
                    layer=layer,
                    track=not view,
                    measure=not view and not from_mask,
                    extra=extra,
                )
            )

    def _conv_extra(self, op: Any) -> dict[str, Any]:
        """Check a conv is one the runner computes (1x1, groups=1, no padding)."""

        def const(key: str, default: Any) -> Any:
            var = op.inputs.get(key)
            if var is None:
                return default
            if var.val is None:
                raise RunnerError(f"{self.path}: conv op {op.name!r} has a non-constant {key}")
            return var.val

        groups = int(const("groups", 1))
        pad_type = str(const("pad_type", "valid"))
        pad = ints(const("pad", [0]))
        strides = ints(const("strides", [1] * (op.inputs["x"].rank - 2)))
        weight = op.inputs["weight"]
        if weight.name not in self._weights:
            self._check_conv_weight(op, tuple(weight.shape))
        if groups != 1 or (pad_type == "custom" and any(pad)):
            raise RunnerError(
                f"{self.path}: conv op {op.name!r} has groups={groups}, pad_type={pad_type}, "
                f"pad={pad}; the MIL runner implements groups=1 without padding only"
            )
        return {"weight": self._weights.get(weight.name), "strides": strides}

    # --- run -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero every state (a fresh KV cache), for every runner sharing it."""
        self._state_values.clear()  # in place: runners created with state_from share it
        self._state_values.update(
            {s.name: np.zeros(s.shape, np.dtype(s.dtype)) for s in self.states}
        )

    def read_state(self, name: str) -> np.ndarray:
        """A copy of a state's current value."""
        if name not in self._state_values:
            known = ", ".join(self._state_values) or "none"
            raise RunnerError(f"{self.path}: no state {name!r} (states: {known})")
        return self._state_values[name].copy()

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace a state's value (e.g. a KV cache filled from the reference)."""
        if name not in self._state_values:
            known = ", ".join(self._state_values) or "none"
            raise RunnerError(f"{self.path}: no state {name!r} (states: {known})")
        current = self._state_values[name]
        value = np.asarray(value)
        if value.shape != current.shape:
            raise RunnerError(
                f"state {name!r} has shape {current.shape}; cannot write {value.shape}"
            )
        self._state_values[name] = value.astype(current.dtype, copy=True)

    def _feeds(self, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in given]
        if missing:
            raise RunnerError(f"missing input {missing[0]!r}; the shard takes {', '.join(names)}")
        extra = sorted(set(given) - set(names))
        if extra:
            raise RunnerError(f"unknown input {extra[0]!r}; the shard takes {', '.join(names)}")
        feeds = {}
        for spec in self.inputs:
            arr = np.asarray(given[spec.name])
            if arr.shape != spec.shape:
                raise RunnerError(
                    f"input {spec.name!r} has shape {arr.shape}, expected {spec.shape}"
                )
            if arr.dtype != np.dtype(spec.dtype):  # Core ML refuses a cast (fp32 for fp16)
                raise RunnerError(
                    f"input {spec.name!r} has dtype {arr.dtype} and shape {arr.shape}, the "
                    f"program declares {spec.dtype} {spec.shape}"
                )
            feeds[spec.name] = arr
        return feeds

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the program once; states are read and updated in place."""
        # Not stale if this step fails.
        self.first_nonfinite, self.layer_max_abs, self.layer_outputs = None, [], []
        feeds = self._feeds(inputs)
        env: dict[str, Any] = dict(self._consts)
        env.update(self._state_refs)
        env.update(feeds)
        states = self._state_values
        diag = _Diagnostics(self.num_layers) if self.track_activations else None
        if diag is not None:
            diag.inputs(feeds)

        # Overflow to inf is what fp16 does; numpy's warnings about it are expected here.
        with np.errstate(all="ignore"):
            for s in self._steps:
                for name, value in zip(s.outputs, self._execute(s, env, states), strict=True):
                    env[name] = value
                    if diag is not None:
                        diag.observe(s, value)

        # A state must not alias a caller's array or a view of one.
        for name, value in states.items():
            if not value.flags.owndata or any(value is f for f in feeds.values()):
                states[name] = value.copy()
        if diag is not None:
            self.first_nonfinite, self.layer_max_abs = diag.first, diag.layer_max
        self.layer_outputs = [np.array(env[v]) for v in self.layer_output_vars]
        return {name: np.array(env[name]) for name in self._output_vars}

    @staticmethod
    def _execute(s: Step, env: dict[str, Any], states: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One op: its outputs in their declared dtypes, shapes checked."""
        args = {
            k: env[v] if isinstance(v, str) else [env[n] for n in v] for k, v in s.inputs.items()
        }
        try:
            result = s.fn(s, args, states)
        except RunnerError:
            raise
        except Exception as exc:  # numpy shape/broadcast errors
            raise RunnerError(f"op {s.name} ({s.op_type}) failed: {exc}") from exc
        results = result if isinstance(result, tuple) else (result,)
        out = []
        for value, dtype, shape in zip(results, s.out_dtypes, s.out_shapes, strict=True):
            value = astype(np.asarray(value), dtype)
            if shape is not None and value.shape != shape:
                raise RunnerError(
                    f"op {s.name} ({s.op_type}) produced shape {value.shape}, "
                    f"the program declares {shape}"
                )
            out.append(value)
        return out
