"""The `coreml` runner: a compiled shard run by Core ML itself (macOS 15+, stateful predict).

Inputs are checked against the model's own description before each predict, so a wrong
shape or dtype is a RunnerError naming the input rather than an opaque framework failure.
Core ML cannot show intermediate values, so `first_nonfinite` and `layer_max_abs` stay empty;
the validator treats every runner alike.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anechain.errors import ConfigError, RunnerError
from anechain.platform import require_macos
from anechain.runners import bridge

COMPUTE_UNITS = ("cpu_and_ne", "all", "cpu_and_gpu", "cpu_only")
# Array data types by their protobuf enum *name* (ArrayFeatureType.ArrayDataType).
_ARRAY_DTYPES = {
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "DOUBLE": np.float64,
    "INT32": np.int32,
    "INT8": np.int8,
}

# (compiled path, compute units name) -> an object with predict(data, state=) and make_state();
# a third argument, when given, names the function of a multifunction model to load.
ModelLoader = Callable[..., Any]


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _dtype(type_name: str, where: str) -> np.dtype:
    try:
        return np.dtype(_ARRAY_DTYPES[type_name.upper()])
    except KeyError:
        raise RunnerError(f"{where}: unsupported array data type {type_name!r}") from None


def features_from_spec(
    spec: Any, function: str | None = None
) -> tuple[list[FeatureSpec], list[FeatureSpec], list[FeatureSpec]]:
    """(inputs, outputs, states) of a model spec (coremltools protobuf); for a multifunction
    model, of `function` (default: its default function)."""

    def arrays(descriptions: Any, kind: str) -> list[FeatureSpec]:
        out = []
        for d in descriptions:
            which = d.type.WhichOneof("Type")
            if which == "multiArrayType":
                arr = d.type.multiArrayType
            elif which == "stateType" and d.type.stateType.WhichOneof("Type") == "arrayType":
                arr = d.type.stateType.arrayType
            else:
                raise RunnerError(f"{kind} {d.name!r} is not a multi-array")
            type_name = arr.ArrayDataType.Name(arr.dataType)
            out.append(
                FeatureSpec(
                    d.name,
                    tuple(int(s) for s in arr.shape),
                    _dtype(type_name, f"{kind} {d.name!r}"),
                )
            )
        return out

    desc = spec.description
    if len(desc.functions):
        name = function or desc.defaultFunctionName
        found = [f for f in desc.functions if f.name == name]
        if not found:
            names = ", ".join(sorted(f.name for f in desc.functions))
            raise RunnerError(f"the model has no function {name!r} (it has {names})")
        desc = found[0]
    elif function not in (None, "main"):
        raise RunnerError(f"the model has one function, `main`, not {function!r}")
    return (
        arrays(desc.input, "input"),
        arrays(desc.output, "output"),
        arrays(desc.state, "state"),
    )


def check_inputs(expected: list[FeatureSpec], inputs: dict[str, np.ndarray]) -> None:
    """RunnerError unless `inputs` has exactly the expected names, shapes and dtypes."""
    names = {f.name for f in expected}
    missing = sorted(names - inputs.keys())
    unknown = sorted(inputs.keys() - names)
    if missing or unknown:
        raise RunnerError(
            f"inputs do not match the model: missing {missing or 'none'}, "
            f"unknown {unknown or 'none'} (expects {sorted(names)})"
        )
    for f in expected:
        value = inputs[f.name]
        if not isinstance(value, np.ndarray):
            raise RunnerError(f"input {f.name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != f.dtype:
            raise RunnerError(
                f"input {f.name!r} has dtype {value.dtype}, the model expects {f.dtype}"
            )
        if tuple(value.shape) != f.shape:
            raise RunnerError(
                f"input {f.name!r} has shape {tuple(value.shape)}, the model expects {f.shape}"
            )


def source_package(compiled: Path) -> Path:
    """The .mlpackage `compiled` was compiled from, as its compile sidecar records it, and
    unchanged since. Its spec is the compiled model's description: coremltools has no API
    that describes a compiled model, and the layout of the compiler's metadata.json (one
    entry per function or not, states or not) is not documented."""
    from anechain.compile import read_sidecar, sidecar_path
    from anechain.fsutil import sha256_tree

    recorded = read_sidecar(compiled)
    if recorded is None:
        raise RunnerError(
            f"{compiled}: no {sidecar_path(compiled).name} names the .mlpackage it was compiled "
            "from; give the package too (or compile it with `anechain compile`)"
        )
    package = Path(str(recorded.get("package", "")))
    if package.suffix != ".mlpackage" or not package.is_dir():
        raise RunnerError(f"{compiled} was compiled from {package}, which is missing")
    if sha256_tree(package) != recorded.get("source_sha256"):
        raise RunnerError(
            f"{compiled} was compiled from {package}, which has changed since; compile it again"
        )
    return package


def check_pairing(package: Path, compiled: Path, package_sha256: str | None = None) -> None:
    """RunnerError if `compiled`'s compile sidecar records another package than `package`
    (by sha256: `package_sha256` when the caller knows it, as a verified manifest does). A
    compiled model without a sidecar (a temporary compile) is paired by its caller."""
    from anechain.compile import read_sidecar
    from anechain.fsutil import sha256_tree

    recorded = read_sidecar(compiled)
    if recorded is None:
        return
    if recorded.get("source_sha256") != (package_sha256 or sha256_tree(package)):
        raise RunnerError(
            f"{compiled} was not compiled from {package} (its compile record names another "
            "package); compile it again"
        )


def _coremltools_load_model(compiled: str, compute_units: str, function: str | None = None) -> Any:
    import coremltools as ct

    return ct.models.CompiledMLModel(
        compiled, compute_units=ct.ComputeUnit[compute_units.upper()], function_name=function
    )


class CoreMLRunner:
    """ShardRunner over Core ML: `CompiledMLModel` + `make_state()` + `predict(state=)`.

    Takes an .mlpackage (compiled to a temporary folder removed with the runner, unless
    `compiled` is that package already compiled) or an .mlmodelc (its inputs, outputs and
    states are read from the package its compile sidecar names: `source_package`). The
    description is always the package's spec, for the function run: a stateless model (the
    head) is predicted without a state; Core ML would hand it an empty one rather than
    refuse. Every array handed to Core ML passes `bridge`'s checks first. `load_model` and
    `compiler` replace the Core ML calls (tests).
    `compiled` with a package must come from it (`check_pairing`; `package_sha256` spares
    hashing the package again).
    `function` picks a function of a multifunction model; `state_from` is a runner of another
    function of the same model whose state this one shares (Core ML states work across a
    model's functions: prefill fills the KV cache decode reads).
    """

    name = "coreml"

    def __init__(
        self,
        package_or_compiled: str | Path,
        compute_units: str = "cpu_and_ne",
        *,
        compiled: str | Path | None = None,
        load_model: ModelLoader | None = None,
        compiler: Any = None,
        function: str | None = None,
        state_from: CoreMLRunner | None = None,
        package_sha256: str | None = None,
    ) -> None:
        from anechain.compile import compile_to

        if compute_units not in COMPUTE_UNITS:
            raise ConfigError(
                f"unknown compute units {compute_units!r}; choose from {', '.join(COMPUTE_UNITS)}"
            )
        if load_model is None:
            require_macos("running a shard with Core ML (stateful predict)", (15,))
            load_model = _coremltools_load_model
        path = Path(package_or_compiled)
        self.path = path
        self.compute_units = compute_units
        # Core ML cannot show values inside the program.
        self.first_nonfinite: int | None = None
        self.layer_max_abs: list[float] = []

        if path.suffix == ".mlpackage":
            from anechain.package import load_spec

            inputs, outputs, states = features_from_spec(load_spec(path), function)
            if compiled is None and state_from is not None:  # the same package: compiled once
                compiled = state_from.compiled
            elif compiled is not None and state_from is None:
                check_pairing(path, Path(compiled), package_sha256)
            if compiled is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="anechain-coreml-"))
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
                compiled = self._tmp / (path.stem + ".mlmodelc")
                compile_to(path, compiled, compiler)
        elif path.suffix == ".mlmodelc":
            if not path.is_dir():
                raise RunnerError(f"{path} does not exist")
            from anechain.package import load_spec

            inputs, outputs, states = features_from_spec(load_spec(source_package(path)), function)
            compiled = path
        else:
            raise RunnerError(f"{path} is neither an .mlpackage nor an .mlmodelc")
        self.compiled = Path(compiled)
        self.inputs: list[FeatureSpec] = inputs
        self.outputs = outputs
        self.states = states
        self.state_names = [f.name for f in states]
        self.function = function
        load_args = (str(self.compiled), compute_units) + ((function,) if function else ())
        try:
            self._model = load_model(*load_args)
        except Exception as exc:  # Core ML surfaces load failures as bare Exceptions
            raise RunnerError(f"Core ML could not load {self.compiled}: {exc}") from None
        self._shares: CoreMLRunner | None = None
        if state_from is not None:
            if path.resolve() != state_from.path.resolve() or states != state_from.states:
                raise RunnerError(
                    f"{path} ({function}) cannot share the state of {state_from.path} "
                    f"({state_from.function}): another model or other states"
                )
            self._shares = state_from  # its state object, also after either resets
        else:
            self._state = self._new_state()

    def _new_state(self) -> Any:
        if not self.states:
            return None  # the head: stateless, predicted without a state
        try:
            return self._model.make_state()
        except Exception as exc:
            raise RunnerError(
                f"Core ML could not make a state for {self.compiled}: {exc}"
            ) from None

    @property
    def _state(self) -> Any:
        return self._shares._state if self._shares is not None else self._own_state

    @_state.setter
    def _state(self, value: Any) -> None:
        if self._shares is not None:
            self._shares._state = value
        else:
            self._own_state = value

    def reset(self) -> None:
        """A fresh state (Core ML's new states start zeroed), for every runner sharing it."""
        self._state = self._new_state()

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.inputs, inputs)
        feeds = bridge.predict_inputs(inputs)  # a copy: the caller's dict is left alone
        try:
            raw = self._model.predict(feeds, state=self._state)
        except Exception as exc:
            raise RunnerError(f"Core ML predict failed on {self.compiled}: {exc}") from None
        declared = {f.name: f.dtype for f in self.outputs}
        out = {}
        for name, value in raw.items():
            arr = np.asarray(value)
            # Core ML may hand fp16 outputs back as fp32; report them as the model declares.
            out[name] = arr.astype(declared[name], copy=False) if name in declared else arr
        return out

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace a state's value (an fp16 state is written from fp32: see bridge.py)."""
        declared = {f.name: f for f in self.states}
        if name not in declared:
            raise RunnerError(f"no state {name!r}; the model has {self.state_names}")
        spec = declared[name]
        if tuple(np.shape(value)) != spec.shape:
            raise RunnerError(
                f"state {name!r} has shape {spec.shape}; cannot write {tuple(np.shape(value))}"
            )
        wire = bridge.state_value(name, value, spec.dtype)
        try:
            self._state.write_state(name, wire)
        except Exception as exc:  # Core ML raises assorted errors for a bad state
            raise RunnerError(f"cannot write state {name!r}: {exc}") from None

    def read_state(self, name: str) -> np.ndarray:
        declared = {f.name: f for f in self.states}
        if name not in declared:
            raise RunnerError(f"no state {name!r}; the model has {self.state_names}")
        try:
            value = np.asarray(self._state.read_state(name))
        except RuntimeError as exc:
            raise RunnerError(f"cannot read state {name!r}: {exc}") from None
        # Core ML hands an fp16 state back as fp32; report it as the model declares.
        return value.astype(declared[name].dtype, copy=False)
