"""What coremltools' Objective-C++ bridge accepts as an array, in one place.

Every array the Core ML runner hands to Core ML (predict inputs, state writes) goes through
here first, so a dtype the bridge cannot convert is a RunnerError naming the array, not the
bridge's bare "value type not convertible" after it has printed the whole array to stdout.

Sources, coremltools 9.0 (`coremlpython/`, tag 9.0):
- CoreMLPythonArray.mm:10-30 `PybindCompatibleArray dataTypeOf:` maps int32, float32 and
  float64 to an MLMultiArray type and throws for anything else; int8 only in a build with
  the macOS 26 SDK, which Python cannot see, so int8 is refused here (no model of ours
  takes an int8 array).
- CoreMLPythonArray.mm:55 wraps `array.mutable_data()`: a read-only array throws too.
- CoreMLPythonUtils.mm:397-409 `convertValueToObjC` turns either into "value type not
  convertible".
- models/_compiled_model.py:229-231 (`predict`) casts fp16 arrays to fp32 in Python before
  the bridge; models/model.py:226-247 (`MLState.write_state`) passes the value unconverted.
- CoreMLPython.mm:714-724 `State::writeState` converts, then `transferToMultiArray:`
  into the state's buffer, which up- or down-casts (MLMultiArray.h, macOS 15+): an fp16
  state is written from fp32.
"""

from __future__ import annotations

import numpy as np

from anechain.errors import RunnerError

# CoreMLPythonArray.mm:16-27 (int8 at :19-22 needs the macOS 26 SDK; refused, see above).
BRIDGE_DTYPES = (np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.float64))
# _compiled_model.py:229-231: predict itself casts these to fp32 before the bridge.
PREDICT_CASTS = {np.dtype(np.float16): np.dtype(np.float32)}


def check_array(what: str, value: object) -> None:
    """RunnerError unless the bridge can turn `value` into an MLMultiArray as it is."""
    if not isinstance(value, np.ndarray):
        raise RunnerError(f"{what} must be a numpy array, got {type(value).__name__}")
    if value.dtype not in BRIDGE_DTYPES:
        accepted = ", ".join(d.name for d in BRIDGE_DTYPES)
        raise RunnerError(
            f"{what} has dtype {value.dtype}; coremltools' bridge takes only {accepted}"
        )
    if not value.flags.writeable:
        raise RunnerError(f"{what} is read-only; coremltools' bridge needs a writable array")


def predict_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of `inputs` as predict hands them to the bridge (fp16 cast to fp32, as
    coremltools does), each checked; the caller's dict and arrays are left alone."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray) and value.dtype in PREDICT_CASTS:
            value = value.astype(PREDICT_CASTS[value.dtype])
        if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
            # The bridge divides each stride by the item size into a size_t
            # (CoreMLPythonArray.mm): a reversed view's negative stride would wrap.
            value = np.ascontiguousarray(value)
        check_array(f"input {name!r}", value)
        out[name] = value
    return out


def state_value(name: str, value: np.ndarray, declared: np.dtype) -> np.ndarray:
    """`value` for `MLState.write_state`: contiguous, in the declared dtype if the bridge
    takes it, else fp32 (an fp16 state), which Core ML casts into the state's buffer."""
    wire = np.dtype(declared)
    if wire not in BRIDGE_DTYPES:
        wire = np.dtype(np.float32) if wire.kind == "f" else wire
    out = np.array(value, dtype=wire, order="C", copy=True)  # writable, never the caller's
    check_array(f"state {name!r}", out)
    return out
