"""The MIL ops the `mil` runner executes: one numpy function per op type, in `OPS`.

Each function computes in float32 from its inputs; the runner rounds the outputs to the
dtypes the program declares (fp16 emulation). Semantics follow coremltools' op definitions
(coremltools/converters/mil/mil/ops/defs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anechain.errors import RunnerError
from anechain.runners.mil_weights import ConvWeight, tensor_view


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
    extra: dict[str, Any] = field(default_factory=dict)  # load-time data (conv weight)


@dataclass(frozen=True)
class StateRef:
    """What a state input holds in the environment: the state's name, not its value."""

    name: str


OpFn = Callable[[Step, dict[str, Any], dict[str, np.ndarray]], Any]


def _num(x: Any) -> Any:
    """Float inputs as float32 (fp16 compute emulation); ints and bools unchanged."""
    a = np.asarray(x)
    return astype(a, np.dtype(np.float32)) if a.dtype.kind == "f" else a


def astype(a: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """`a.astype(dtype, copy=False)`, with float16 <-> float32 done by torch: numpy's casts
    are not vectorized (2-3 ns a value here against 0.3-0.4 ns) and are most of the runner's
    time outside the matrix products. Both round to nearest even: the same bits."""
    if a.dtype == dtype:
        return a
    pair = {a.dtype.char, dtype.char}
    if pair != {"e", "f"} or a.size < TORCH_MIN_SIZE:
        return a.astype(dtype)
    import torch

    target = torch.float16 if dtype.char == "e" else torch.float32
    return torch.from_numpy(np.ascontiguousarray(a)).to(target).numpy()


# Below this many values numpy is cheaper than a round trip through torch (casts, softmax,
# the runner's per-op peak |value|).
TORCH_MIN_SIZE = 4096


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
    # sigmoid from exp(-|x|) <= 1: no overflow, and no cancellation in the negative tail
    # (0.5 * (1 + tanh(x / 2)) is 0 below x = -17, where silu(x) is still an fp16 subnormal).
    e = np.exp(-np.abs(x))
    return x * np.where(x >= 0, np.float32(1.0), e) / (np.float32(1.0) + e)


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
    if x.dtype != np.float32 or x.size < TORCH_MIN_SIZE:
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)
    import torch

    # The same max-subtracted form in torch: a full-size prefill chunk's attention
    # probabilities took 0.1 s a chunk in numpy, a third of that here.
    return torch.softmax(tensor_view(np.ascontiguousarray(x)), dim=axis).numpy()


# --- linear algebra ------------------------------------------------------------------------


def _matmul(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x, y = _num(a["x"]), _num(a["y"])
    if x.dtype != np.float32 or y.dtype != np.float32 or x.ndim < 2 or y.ndim < 2:
        if bool(a.get("transpose_x", False)) and x.ndim >= 2:
            x = np.swapaxes(x, -1, -2)
        if bool(a.get("transpose_y", False)) and y.ndim >= 2:
            y = np.swapaxes(y, -1, -2)
        return np.matmul(x, y)
    # Float products in torch, as the convs' (mil_weights): OpenBLAS' idle threads spin for
    # ~0.1 s after each numpy call and took a core from the convs' threads (a full-size
    # decode step's convs measured 0.3 s this way, 0.7-1.4 s after numpy matmuls). torch
    # takes a transposed operand as a view (BLAS' own transpose flag).
    import torch

    tx, ty = tensor_view(np.ascontiguousarray(x)), tensor_view(np.ascontiguousarray(y))
    if bool(a.get("transpose_x", False)):
        tx = tx.transpose(-1, -2)
    if bool(a.get("transpose_y", False)):
        ty = ty.transpose(-1, -2)
    # Grouped-query attention: queries (..., G, M, K) against keys (..., 1, K, N) shared by
    # the group. torch would copy the keys G times to broadcast them; folding the group into
    # the rows, (..., G*M, K) @ (..., K, N), is one product per key head.
    if (
        tx.ndim == ty.ndim >= 3
        and ty.shape[-3] == 1 < tx.shape[-3]
        and tx.shape[:-3] == ty.shape[:-3]
        and not bool(a.get("transpose_x", False))
    ):
        lead, g, m = tx.shape[:-3], tx.shape[-3], tx.shape[-2]
        folded = torch.matmul(tx.reshape(*lead, g * m, tx.shape[-1]), ty.squeeze(-3))
        return folded.reshape(*lead, g, m, folded.shape[-1]).numpy()
    return torch.matmul(tx, ty).numpy()


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """(out, in, 1, ..., 1) conv weight -> float32 (out, in), C-contiguous for BLAS."""
    return np.ascontiguousarray(weight.reshape(weight.shape[0], weight.shape[1]), np.float32)


def _conv(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    # Only 1x1, groups=1, zero padding reaches here (checked at load): a matrix product.
    w: ConvWeight | None = step.extra.get("weight")
    if w is None:  # weight computed at runtime
        w = ConvWeight(conv_matrix(_num(a["weight"])))
    x = _num(a["x"])  # (N, I, *spatial)
    strides = step.extra["strides"]
    if any(s != 1 for s in strides):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
    n, spatial = x.shape[0], x.shape[2:]
    cols = x.reshape(n, x.shape[1], -1)  # (N, I, P)
    out = w.matmul(cols[0])[None] if n == 1 else w.matmul(cols)  # GEMV for P == 1
    out = out.reshape(n, w.shape[0], *spatial)  # (N, O, *spatial)
    if "bias" in a:
        out = out + _num(a["bias"]).reshape(1, -1, *([1] * len(spatial)))
    return out


# --- tensor shape and indexing -------------------------------------------------------------


def _reshape(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    shape = ints(a["shape"])
    # MIL (iOS17 rule, a superset of iOS15's same-rank one): a 0 takes the input's dimension
    # aligned from the right, or 1 where the input has no dimension there.
    lead = len(shape) - x.ndim
    shape = [s if s != 0 else (x.shape[i - lead] if i >= lead else 1) for i, s in enumerate(shape)]
    return x.reshape(shape)


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
    """MIL slice semantics: numpy style; a masked begin/end is the axis' start/end; a
    squeezed axis picks begin (0 when begin is masked too, as coremltools does)."""
    rank = x.ndim
    begin, end = ints(a["begin"]), ints(a["end"])
    stride = [1] * rank if a.get("stride") is None else ints(a["stride"])
    begin_mask = _bools(a.get("begin_mask"), rank)
    end_mask = _bools(a.get("end_mask"), rank)
    squeeze_mask = _bools(a.get("squeeze_mask"), rank)
    slices = []
    for i in range(rank):
        if squeeze_mask[i]:
            b = 0 if begin_mask[i] else begin[i]
            b = b + x.shape[i] if b < 0 else b
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
    # Values are never mutated in place (arrays may be shared between vars), except a state
    # the plan found nothing else reads (mil._plan_in_place_updates).
    out = x if step.extra.get("in_place") and x.flags.writeable else x.copy()
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
    states[ref.name] = value.astype(states[ref.name].dtype, copy=False)
    return value


def _transpose(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    return np.transpose(np.asarray(a["x"]), ints(a["perm"]))


def _squeeze(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    axes = a.get("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(ints(axes)))


def _split(step: Step, a: dict[str, Any], states: dict[str, np.ndarray]) -> Any:
    x = np.asarray(a["x"])
    axis = int(a["axis"])
    if a.get("split_sizes") is not None:
        bounds = np.cumsum(ints(a["split_sizes"]))[:-1]
    else:  # equal parts
        bounds = np.arange(1, int(a["num_splits"])) * (x.shape[axis] // int(a["num_splits"]))
    return tuple(np.split(x, bounds, axis=axis))


# Op type -> implementation. `const` and `constexpr_*` ops are evaluated at load instead.
OPS: dict[str, OpFn] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "abs": _unary(np.abs),
    "sqrt": _unary(np.sqrt),
    "silu": _unary(_silu),
    "inverse": _inverse,
    "rsqrt": _rsqrt,
    "clip": _clip,
    "cast": _cast,
    "reduce_max": _reduce(np.max),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_argmax": _reduce_argmax,
    "softmax": _softmax,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "split": _split,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "read_state": _read_state,
    "coreml_update_state": _update_state,
}

_SLICE = ("x", "begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask")
_REDUCE = ("x", "axes", "keep_dims")

# The inputs each op's function implements. An op carrying any other input (an attribute a
# newer opset added, say) is refused at load rather than run without it. Inputs that set
# the output dtype (cast's dtype, reduce_argmax's output_dtype) are implemented by the
# runner's rounding to the declared dtype; the runner accepts only convs this computes
# (1x1, groups=1, no padding; dilations have no effect on a 1x1 kernel).
INPUTS: dict[str, frozenset[str]] = {
    name: frozenset(inputs)
    for name, inputs in {
        **{op: ("x", "y") for op in ("add", "sub", "mul", "real_div", "maximum", "minimum")},
        **{op: ("x",) for op in ("abs", "sqrt", "silu")},
        "inverse": ("x", "epsilon"),
        "rsqrt": ("x", "epsilon"),
        "clip": ("x", "alpha", "beta"),
        "cast": ("x", "dtype"),
        "reduce_max": _REDUCE,
        "reduce_mean": _REDUCE,
        "reduce_sum": _REDUCE,
        "reduce_argmax": ("x", "axis", "keep_dims", "output_dtype"),
        "softmax": ("x", "axis"),
        "matmul": ("x", "y", "transpose_x", "transpose_y"),
        "conv": ("x", "weight", "bias", "strides", "pad_type", "pad", "dilations", "groups"),
        "reshape": ("x", "shape"),
        "expand_dims": ("x", "axes"),
        "squeeze": ("x", "axes"),
        "transpose": ("x", "perm"),
        "split": ("x", "num_splits", "split_sizes", "axis"),
        "concat": ("values", "axis", "interleave"),
        "slice_by_index": _SLICE,
        "slice_update": (*_SLICE, "update"),
        "read_state": ("input",),
        "coreml_update_state": ("state", "value"),
    }.items()
}


def check_inputs(op_name: str, op_type: str, names: Iterable[str]) -> None:
    """RunnerError unless the runner implements every input an op of this type carries."""
    unknown = sorted(set(names) - INPUTS[op_type])
    if unknown:
        raise RunnerError(
            f"op {op_name!r} ({op_type}) has input {unknown[0]!r}, which the MIL runner "
            "does not implement"
        )
