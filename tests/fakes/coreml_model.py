"""Fakes of a compiled Core ML model, its states and the compiler, as coremltools' bridge has
them: real `CompiledMLModel` and `MLState` objects over stand-ins for their native proxies.

The stand-ins follow coremltools 9.0's Objective-C++ bridge (`coremlpython/`, tag 9.0) as
its source reads, never what our code expects; each rule cites the line it comes from.
"mm" is CoreMLPython.mm, "Utils.mm" CoreMLPythonUtils.mm, "Array.mm" CoreMLPythonArray.mm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from coremltools import ComputeUnit
from coremltools.models import CompiledMLModel

from anechain.compile import Compiler
from anechain.errors import CompileError

# --- the bridge's array conversion --------------------------------------------------------------


class NotAMultiArray:
    """What Utils.mm:364-395 makes of a Python scalar, string, dict or list: a feature value
    that is not a multi-array."""


def convert_value(value: Any, macos26_sdk: bool = False) -> Any:
    """Utils.mm:362-410 `convertValueToObjC` for the values we hand it: the numpy array the
    MLMultiArray wraps, a NotAMultiArray, or RuntimeError("value type not convertible")."""
    if isinstance(value, int | float | str | bytes | dict | list | tuple):
        return NotAMultiArray()  # Utils.mm:364-395 (int64, double, string, dict, sequence)
    # Utils.mm:397-401 -> :167-175 (a 0-d array: "no shape, can't be an array", :170-172).
    if isinstance(value, np.ndarray) and value.ndim > 0:
        kind, size = value.dtype.kind, value.dtype.itemsize
        accepted = (
            (kind == "i" and size == 4)  # Array.mm:16-17 Int32
            or (kind == "i" and size == 1 and macos26_sdk)  # Array.mm:19-23 Int8, macOS 26 SDK
            or (kind == "f" and size in (4, 8))  # Array.mm:24-27 Float32, Double
        )
        # Array.mm:41-50 divides each byte stride into a size_t: a negative one wraps and
        # Core ML reads far outside the array. It raises nothing there; the fake refuses.
        if accepted and any(s < 0 for s in value.strides):
            raise RuntimeError("negative stride: the MLMultiArray would read out of bounds")
        # Array.mm:55 `array.mutable_data()` throws for a read-only array.
        if accepted and value.flags.writeable:
            return value
    # Utils.mm:398-400 swallows the throw (Array.mm:30), then :407-409.
    print("Error: value type not convertible:")
    print(value)
    raise RuntimeError("value type not convertible")


def transfer(source: np.ndarray, buffer: np.ndarray) -> None:
    """`transferToMultiArray:` (MLMultiArray.h, macOS 15+): "Numeric data will be up or down
    casted as needed", into the destination's layout. Apple does not say what a shape
    mismatch does (its example transfers equal shapes): refused here."""
    if source.shape != buffer.shape:
        raise RuntimeError(f"cannot transfer a {source.shape} multi-array into {buffer.shape}")
    buffer[...] = source.astype(buffer.dtype)


def to_python(value: np.ndarray) -> np.ndarray:
    """Utils.mm:443-452: an fp16 multi-array comes back as fp32 (py::array has no fp16)."""
    return value.astype(np.float32) if value.dtype == np.float16 else value.copy()


# --- the native state -------------------------------------------------------------------------


class StateProxy:
    """Core ML's MLState behind coremltools' real `MLState`: the buffers of a model's states
    in their declared dtypes, zeroed when made (`newState`), and the model that made them."""

    def __init__(self, owner: str, states: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        self.owner = owner
        self.buffers = {n: np.zeros(shape, dtype) for n, (shape, dtype) in states.items()}
        self.writes = 0

    def _buffer(self, name: str) -> np.ndarray:
        if name not in self.buffers:
            # mm:698/722 `getMultiArrayForStateNamed:` raises; mm:701-703/725-727 pass on the
            # NSException's reason (its wording is Core ML's, not stated in the bridge).
            raise RuntimeError(f"no state named {name!r}")
        return self.buffers[name]

    def read_state(self, name: str) -> np.ndarray:  # mm:693-712
        return to_python(self._buffer(name))

    def write_state(self, name: str, value: Any) -> None:  # mm:714-736
        converted = convert_value(value)  # mm:717, before the state is looked at
        if isinstance(converted, NotAMultiArray):  # mm:718-720
            raise RuntimeError("Failed to write state, only multi-array value is supported")
        transfer(converted, self._buffer(name))  # mm:722-724
        self.writes += 1


# --- the native model -------------------------------------------------------------------------

# (feature name -> (shape, dtype)) for inputs, outputs and states of one function.
Schema = tuple[dict[str, tuple[tuple[int, ...], Any]], ...]


class ModelProxy:
    """Core ML's MLModel behind coremltools' real `CompiledMLModel`, for one function of a
    model (mm:487-495: an empty `function_name` leaves `functionName` nil, the default
    function). `run(function, feeds, buffers)` computes; this class applies the bridge's
    rules around it."""

    def __init__(
        self,
        model: str,
        function: str,
        schema: tuple[dict | None, dict, dict],
        run: Callable[[str, dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, Any]],
    ) -> None:
        self.model, self.function = model, function
        self.inputs, self.outputs, self.states = schema
        self.run = run
        self.predicts = 0
        self.states_made = 0

    def newState(self) -> StateProxy:  # noqa: N802 (mm:1077, Core ML's name)
        self.states_made += 1
        return StateProxy(self.model, self.states)

    def predict(self, data: dict[str, Any], state: StateProxy | None) -> dict[str, Any]:
        # mm:539 `dictToFeatures` converts every value (Utils.mm:52-56), extra ones included.
        arrays = {k: convert_value(v) for k, v in data.items()}
        if state is not None and state.owner != self.model:
            # mm:550-552 hands the state to Core ML unchecked, across functions too (the
            # audit, #5); MLModel.h wants one made by this model's newState(). A state of
            # another model is refused here (what Core ML does with it is not stated).
            raise RuntimeError(f"a state made by {state.owner}, not by {self.model}")
        if self.inputs is None:  # a toy model: takes what it is given
            feeds = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
        else:
            feeds = self._feeds(arrays)
        out = self.run(self.function, feeds, {} if state is None else state.buffers)
        self.predicts += 1
        return {k: to_python(np.asarray(v)) for k, v in out.items()}  # Utils.mm:68-80

    def _feeds(self, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, (shape, dtype) in self.inputs.items():
            if name not in arrays or isinstance(arrays[name], NotAMultiArray):
                raise RuntimeError(f"required input feature {name!r} not passed")
            value = arrays[name]
            if value.shape != shape:
                raise RuntimeError(f"{name!r} has shape {value.shape}; the model takes {shape}")
            # Core ML casts a multi-array to the input's type: coremltools counts on it, sending
            # fp16 inputs as fp32 (_compiled_model.py:229-231).
            feeds[name] = value.astype(dtype)
        return feeds


def compiled_model(proxy: ModelProxy, compute_units: str = "cpu_and_ne") -> CompiledMLModel:
    """A real coremltools `CompiledMLModel` over `proxy` (its `predict` casts fp16 inputs to
    fp32 and unwraps `MLState`s, _compiled_model.py:227-231; `make_state` wraps `newState`)."""
    model = object.__new__(CompiledMLModel)  # __init__ insists on the native proxy type
    model.compute_unit = ComputeUnit[compute_units.upper()]
    model.function_name = proxy.function
    model.path_or_asset = proxy.model
    model.optimization_hints = None
    model._proxy = proxy
    return model


# ArrayFeatureType.ArrayDataType names (FeatureTypes.proto) as numpy dtypes.
_PROTO_DTYPES = {
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "DOUBLE": np.float64,
    "INT32": np.int32,
    "INT8": np.int8,
}


def _schema(package: Path, function: str | None) -> tuple[str, Schema]:
    """(function name, its inputs, outputs and states) read from the package's protobuf
    description here, not through the runner's own reader (which the fake must not trust)."""
    from coremltools.models.utils import load_spec

    spec = load_spec(str(package))
    desc = spec.description
    name = function or desc.defaultFunctionName or "main"
    if len(desc.functions):
        [desc] = [f for f in desc.functions if f.name == name]

    def arrays(features: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
        out = {}
        for f in features:
            kind = f.type.WhichOneof("Type")
            arr = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
            dtype = _PROTO_DTYPES[arr.ArrayDataType.Name(arr.dataType)]
            out[f.name] = (tuple(int(d) for d in arr.shape), np.dtype(dtype))
        return out

    return name, (arrays(desc.input), arrays(desc.output), arrays(desc.state))


# --- a toy shard (no program run) -------------------------------------------------------------


def toy_shard_model(
    states: dict[str, tuple[int, ...]],
    inputs: dict[str, tuple[tuple[int, ...], Any]] | None = None,
    function: str = "",
    model: str = "toy.mlmodelc",
) -> CompiledMLModel:
    """A compiled shard (of one function of `model`) that writes position+1 into every state
    at the given position and answers `hidden_states * 2`. `inputs` (default: whatever is
    given) are checked and cast as Core ML does."""

    def run(fn: str, feeds: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> dict:
        assert buffers, "a stateful shard predicted without a state"
        p = int(feeds["position"].ravel()[0])
        for value in buffers.values():
            value[:, :, p, :] = p + 1
        return {"output_hidden_states": feeds["hidden_states"] * 2}

    schema = (inputs, {}, {n: (s, np.float16) for n, s in states.items()})
    return compiled_model(ModelProxy(model, function, schema, run))


# --- a model run by the MIL interpreter -------------------------------------------------------


def mil_compiled_model(
    package: Path,
    function_name: str = "",
    compute_units: str = "cpu_and_ne",
    nan_at_step: int | None = None,
) -> CompiledMLModel:
    """A real `CompiledMLModel` of one function of `package`, computed by the MIL
    interpreter; states made by any function of the package work in every function."""
    from anechain.runners.mil import MILRunner

    name, schema = _schema(package, function_name or None)
    runner = MILRunner(package, track_activations=False, function=name)

    def run(fn: str, feeds: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> dict:
        runner._state_values = buffers  # this state's buffers, updated in place
        out = runner.step(feeds)
        if nan_at_step is not None and proxy.predicts == nan_at_step:
            for v in out.values():
                if v.dtype.kind == "f":
                    v.flat[0] = np.nan
        return out

    proxy = ModelProxy(str(Path(package).resolve()), function_name, schema, run)
    return compiled_model(proxy, compute_units)


def mil_loader(package: Path, **options: Any) -> Callable[..., CompiledMLModel]:
    """The runner's `load_model` seam: (compiled, units[, function]) -> mil_compiled_model."""

    def load(compiled: str, units: str, function: str | None = None) -> CompiledMLModel:
        return mil_compiled_model(package, function or "", units, **options)

    return load


# --- compiler -----------------------------------------------------------------------------------


class FakeCompiler:
    """Writes an .mlmodelc folder (model.mil + metadata.json) and counts its calls.

    The metadata.json is deliberately NOT the layout anechain once assumed (top-level
    `inputSchema`/`outputSchema`/`stateSchema` of the default function): Core ML does not
    document it, so here it holds per-function schemas only, and tests show nothing reads it.
    """

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
        functions = []
        try:
            from anechain.package import load_spec

            names = [f.name for f in load_spec(package).description.functions] or ["main"]
            for fn in names:
                functions.append({"name": fn, **_function_schema(package, fn)})
        except Exception:  # a stand-in package without a real spec
            pass
        (dest / "metadata.json").write_text(json.dumps([{"functions": functions}]))

    @property
    def compiler(self) -> Compiler:
        return Compiler("fake", self.run)


def _function_schema(package: Path, function: str) -> dict[str, Any]:
    _, (inputs, outputs, states) = _schema(package, None if function == "main" else function)

    def entries(d: dict[str, tuple[tuple[int, ...], Any]], kind: str) -> list[dict[str, Any]]:
        return [
            {"name": n, "type": kind, "dataType": np.dtype(t).name, "shape": list(s)}
            for n, (s, t) in d.items()
        ]

    return {
        "inputs": entries(inputs, "MultiArray"),
        "outputs": entries(outputs, "MultiArray"),
        "states": entries(states, "State"),
    }
