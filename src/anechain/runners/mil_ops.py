"""The MIL ops the `mil` runner executes: one numpy function per op type, in `OPS`.

Each function computes in float32 from its inputs; the runner rounds the outputs to the
dtypes the program declares (fp16 emulation). Semantics follow coremltools' op definitions
(coremltools/converters/mil/mil/ops/defs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anechain.errors import RunnerError


@dataclass
class Step:
    """One runtime op, with everything that does not depend on the inputs resolved."""

    fn: OpFn
    name: str
    op_type: str
    inputs: dict[str, str | tuple[str, ...]]  # MIL input name -> env key(s)
    outputs: tuple[str, ...]
    out_dtypes: tuple[np.dtype[Any], ...]
    out_shapes: tuple[tuple[int, ...] | None, ...]  # None where the program's is symbolic
    layer: int
    track: bool  # False for state views (see mil._STATE_VIEW_OPS): no per-op diagnostics
    measure: bool  # False for mask-derived values (see mil._MASK_INPUTS): not in layer_max_abs
    extra: dict[str, Any] = field(default_factory=dict)  # load-time data (conv matrix)


@dataclass(frozen=True)
class StateRef:
    """What a state input holds in the environment: the state's name, not its value."""

    name: str


OpFn = Callable[[Step, dict[str, Any], dict[str, np.ndarray]], Any]


def _num(x: Any) -> Any:
    """Float inputs as float32 (fp16 compute emulation); ints and bools unchanged."""
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _bools(x: Any, rank: int) -> list[bool]:
    return [False] * rank if x is None else [bool(v) for v in np.asarray(x).reshape(-1)]


# --- elementwise ---------------------------------------------------------------------------


def _binary(fn: Callable[[Any, Any], Any]) -> OpFn:
    def run(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
        return fn(_num(a["x"]), _num(a["y"]))

    return run


def _unary(fn: Callable[[Any], Any]) -> OpFn:
    def run(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
        return fn(_num(a["x"]))

    return run


def _inverse(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # MIL: y = 1 / (x + epsilon), epsilon defaults to 1e-4 (the converter emits it for a / b).
    eps = np.float32(a.get("epsilon", 1e-4))
    return np.float32(1.0) / (_num(a["x"]) + eps)


def _rsqrt(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # MIL: y = 1 / sqrt(x + epsilon), epsilon defaults to 1e-12.
    eps = np.float32(a.get("epsilon", 1e-12))
    return np.float32(1.0) / np.sqrt(_num(a["x"]) + eps)


def _silu(x: np.ndarray) -> np.ndarray:
    # sigmoid via tanh: no exp overflow for large |x|.
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x)))


def _clip(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    return np.minimum(np.maximum(_num(a["x"]), _num(a["alpha"])), _num(a["beta"]))


def _cast(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # The target dtype is the output's declared dtype, applied when the result is stored.
    return _num(a["x"])


# --- reductions, activations ---------------------------------------------------------------


def _reduce(fn: Callable[..., Any]) -> OpFn:
    def run(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
        axes = a.get("axes")
        axis = None if axes is None else tuple(ints(axes))
        return fn(_num(a["x"]), axis=axis, keepdims=bool(a.get("keep_dims", False)))

    return run


def _reduce_argmax(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # MIL: the first index of the maximum along one axis (the LM head's per-chunk token).
    axis = int(a.get("axis", -1))
    out = np.argmax(_num(a["x"]), axis=axis)
    if bool(a.get("keep_dims", False)):
        out = np.expand_dims(out, axis)
    return out.astype(np.int32)


def _softmax(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = _num(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# --- linear algebra ------------------------------------------------------------------------


def _matmul(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x, y = _num(a["x"]), _num(a["y"])
    if bool(a.get("transpose_x", False)) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(a.get("transpose_y", False)) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    # Contiguous operands keep numpy on its BLAS path (a transposed view is ~50x slower).
    return np.matmul(np.ascontiguousarray(x), np.ascontiguousarray(y))


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """(out, in, 1, ..., 1) conv weight -> float32 (out, in), C-contiguous for BLAS."""
    return np.ascontiguousarray(weight.reshape(weight.shape[0], weight.shape[1]), np.float32)


def _conv(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # Only 1x1, groups=1, zero padding reaches here (checked at load): a matrix product.
    w = step.extra.get("matrix")
    if w is None:  # weight computed at runtime
        w = conv_matrix(_num(a["weight"]))
    x = _num(a["x"])  # (N, I, *spatial)
    strides = step.extra["strides"]
    if any(s != 1 for s in strides):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
    n, spatial = x.shape[0], x.shape[2:]
    cols = x.reshape(n, x.shape[1], -1)  # (N, I, P)
    if n == 1:
        out = (w @ cols[0])[None]  # GEMV for P == 1
    else:
        out = np.matmul(w, cols)
    out = out.reshape(n, w.shape[0], *spatial)  # (N, O, *spatial)
    if "bias" in a:
        out = out + _num(a["bias"]).reshape(1, -1, *([1] * len(spatial)))
    return out


# --- tensor shape and indexing -------------------------------------------------------------


def _reshape(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    shape = ints(a["shape"])
    if len(shape) == x.ndim:  # MIL: 0 inherits the input's dimension when ranks match
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    return np.transpose(np.asarray(a["x"]), ints(a["perm"]))


def _expand_dims(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    return np.expand_dims(np.asarray(a["x"]), tuple(ints(a["axes"])))


def _concat(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    values = [_num(v) for v in a["values"]]
    axis = int(a["axis"])
    if bool(a.get("interleave", False)):
        # Interleave equal-shaped inputs along `axis`: a0[0], a1[0], ..., a0[1], a1[1], ...
        ax = axis % values[0].ndim
        stacked = np.stack(values, axis=ax + 1)
        shape = list(values[0].shape)
        shape[ax] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _slices(x: np.ndarray, a: dict[str, Any]) -> tuple[tuple[slice, ...], list[int]]:
    """MIL slice semantics (numpy style; masks ignore begin/end; squeeze picks begin)."""
    rank = x.ndim
    begin, end = ints(a["begin"]), ints(a["end"])
    stride = [1] * rank if a.get("stride") is None else ints(a["stride"])
    begin_mask = _bools(a.get("begin_mask"), rank)
    end_mask = _bools(a.get("end_mask"), rank)
    squeeze_mask = _bools(a.get("squeeze_mask"), rank)
    slices = []
    for i in range(rank):
        if squeeze_mask[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            slices.append(slice(b, b + 1, 1))
            continue
        slices.append(
            slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i])
        )
    return tuple(slices), [i for i in range(rank) if squeeze_mask[i]]


def _slice_by_index(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    slices, squeeze = _slices(x, a)
    out = x[slices]
    return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


def _slice_update(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    slices, _ = _slices(x, a)
    out = x.copy()  # values are never mutated in place: arrays may be shared between vars
    region = out[slices]
    update = np.asarray(a["update"])
    if region.size != update.size:
        raise RunnerError(
            f"op {step.name} (slice_update): the slice has shape {region.shape} but the update "
            f"has {update.shape} (a write position outside the state?)"
        )
    out[slices] = update.reshape(region.shape)
    return out


# --- states --------------------------------------------------------------------------------


def _read_state(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    return states[a["input"].name]


def _update_state(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    value = np.asarray(a["value"])
    ref: StateRef = a["state"]
    if value.shape != states[ref.name].shape:
        raise RunnerError(
            f"op {step.name}: writes shape {value.shape} into state {ref.name!r} of shape "
            f"{states[ref.name].shape}"
        )
    states[ref.name] = value.astype(np.float16, copy=False)
    return value


# Op type -> implementation. `const` and `constexpr_*` ops are evaluated at load instead.
OPS: dict[str, OpFn] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "abs": _unary(np.abs),
    "silu": _unary(_silu),
    "inverse": _inverse,
    "rsqrt": _rsqrt,
    "clip": _clip,
    "cast": _cast,
    "reduce_max": _reduce(np.max),
    "reduce_mean": _reduce(np.mean),
    "reduce_argmax": _reduce_argmax,
    "softmax": _softmax,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "transpose": _transpose,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "read_state": _read_state,
    "coreml_update_state": _update_state,
}
