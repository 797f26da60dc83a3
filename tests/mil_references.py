"""What the `mil` runner's ops must compute, for tests/test_mil_ops.py.

`Case`: one instance of an op (runtime tensors, const attributes, and, where coremltools'
value inference is missing or incomplete, an independent reference). The references here
are the ops' documented semantics in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Constexpr:
    """An INT8 weight as `constexpr_blockwise_shift_scale` (what INT8 shards carry)."""

    data: np.ndarray  # int8
    scale: np.ndarray  # fp16, same rank; data.shape[i] is a multiple of scale.shape[i]
    offset: np.ndarray | None = None  # int8, scale's shape

    def var(self) -> Any:
        from coremltools.converters.mil import Builder as mb

        kw = {} if self.offset is None else {"offset": self.offset}
        return mb.constexpr_blockwise_shift_scale(data=self.data, scale=self.scale, **kw)

    def value(self) -> np.ndarray:
        """The documented dequantization, (data - offset) * scale with scale repeated per
        block, in the scale's dtype (the op's output dtype)."""
        scale, offset = self.scale.astype(np.float64), self.offset
        offset = np.zeros_like(scale) if offset is None else offset.astype(np.float64)
        for axis, (n, s) in enumerate(zip(self.data.shape, scale.shape, strict=True)):
            scale = np.repeat(scale, n // s, axis=axis)
            offset = np.repeat(offset, n // s, axis=axis)
        value = (self.data.astype(np.float64) - offset) * scale
        return value.astype(self.scale.dtype).astype(np.float64)


@dataclass
class Case:
    op: str
    inputs: dict[str, Any]  # runtime tensors (a list of them for concat's `values`)
    attrs: dict[str, Any] = field(default_factory=dict)  # consts
    reference: Callable[..., Any] | None = None  # documented semantics, when coremltools has none
    ulps: int = 0  # 0: exact; 1: ops whose summation order may differ
    terms: int = 0  # terms summed per output element (float32 accumulation bound)
    relative: bool = False  # the bound scales with the output, not with the op on |inputs|

    def __str__(self) -> str:
        shapes = {
            k: [a.shape for a in v] if isinstance(v, list) else (v.shape, v.dtype.name)
            for k, v in self.inputs.items()
        }
        attrs = {
            k: np.asarray(v).tolist() if not isinstance(v, Constexpr) else "constexpr"
            for k, v in self.attrs.items()
        }
        return f"{self.op}{shapes} {attrs}"


def silu_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / (1 + np.exp(-x))


def conv_reference(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    strides: Any = None,
    pad_type: str = "valid",
    pad: Any = None,
    dilations: Any = None,
    groups: int = 1,
) -> np.ndarray:
    """MIL conv as documented, in float64: explicit padding, then a sum over every tap."""
    x, w = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    spatial = x.ndim - 2
    strides = [1] * spatial if strides is None else [int(s) for s in np.ravel(strides)]
    dil = [1] * spatial if dilations is None else [int(d) for d in np.ravel(dilations)]
    kernel = w.shape[2:]
    pads = []
    for i in range(spatial):
        if pad_type == "custom":
            pads.append((int(pad[2 * i]), int(pad[2 * i + 1])))
        elif pad_type in ("same", "same_lower"):
            dk = (kernel[i] - 1) * dil[i] + 1
            total = max(
                (-(-x.shape[2 + i] // strides[i]) - 1) * strides[i] + dk - x.shape[2 + i], 0
            )
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        else:
            pads.append((0, 0))
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    out_spatial = [
        (x.shape[2 + i] - (kernel[i] - 1) * dil[i] - 1) // strides[i] + 1 for i in range(spatial)
    ]
    n, c_out, per_group = x.shape[0], w.shape[0], w.shape[1]
    out = np.zeros((n, c_out, *out_spatial))
    for o in range(c_out):
        g = o // (c_out // groups)
        for tap in np.ndindex(*kernel):
            window = tuple(
                slice(
                    tap[i] * dil[i],
                    tap[i] * dil[i] + (out_spatial[i] - 1) * strides[i] + 1,
                    strides[i],
                )
                for i in range(spatial)
            )
            xs = x[(slice(None), slice(g * per_group, (g + 1) * per_group), *window)]
            out[:, o] += np.tensordot(w[o][(slice(None), *tap)], xs, axes=([0], [1]))
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, *([1] * spatial))
    return out


def conv_weight_reference(x: np.ndarray, weight: Any, **attrs: Any) -> np.ndarray:
    w = weight.value() if isinstance(weight, Constexpr) else weight
    return conv_reference(x, w, **attrs)


def interleave_reference(values: list[np.ndarray], axis: int, interleave: bool = False) -> Any:
    """concat's documented interleave: output[i::n] = values[i] along axis."""
    if not interleave:
        return np.concatenate(values, axis=axis)
    n, ax = len(values), axis % values[0].ndim
    shape = list(values[0].shape)
    shape[ax] *= n
    out = np.empty(shape, values[0].dtype)
    for i, v in enumerate(values):
        out[(slice(None),) * ax + (slice(i, None, n),)] = v
    return out
