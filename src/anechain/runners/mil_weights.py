"""Conv weights as the `mil` runner holds them: compact, expanded a block of rows at a time.

As float32 (out, in) matrices, an 8-layer INT8 Phi-4-mini shard's weights take 3.2 GB, four
times its blob. Instead an INT8 weight with one scale per output channel keeps the program's
own int8 array and its scales, and an fp16 weight its fp16 array (1 or 2 bytes a weight);
`ConvWeight.matmul` expands one block of rows to float32 just before multiplying it, so no
full float32 matrix ever exists. The expanded values are exactly the float32 matrix of
coremltools' materialized value (tests/test_mil_weights.py checks it bit for bit). Any
other weight keeps that float32 matrix.

The expansion and the block products run in torch: numpy's float16 casts are not vectorized
(4 ns a value here against torch's 0.3 ns), and one thread pool for the whole loop avoids
handing each block between OpenBLAS' threads and torch's (see mil_ops._matmul).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Weights expanded per block: 4 MB of float32, cache-resident while it is multiplied
# (a full-size shard's decode convs took 0.67 / 0.42 / 0.30 / 0.36 s with blocks of
# 2^18 / 2^19 / 2^20 / 2^21 values).
_BLOCK_ELEMENTS = 1 << 20

_QUANTIZED = (np.dtype(np.int8), np.dtype(np.uint8))
_SCALES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(frozen=True, eq=False)
class ConvWeight:
    """A 1x1 conv weight as an (out, in) matrix: `data` int8/uint8 with `scale` (out,),
    row r being data[r] * scale[r] rounded to the scale's dtype (coremltools' dequantization);
    or `data` float16; or `data` float32 (the dense matrix, multiplied as is)."""

    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def dense(self) -> np.ndarray:
        """The float32 (out, in) matrix (the runner itself never builds it)."""
        if self.data.dtype == np.float32:
            return self.data
        out = np.empty(self.shape, np.float32)
        for r, block in self._blocks():
            out[r : r + len(block)] = block.numpy()
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """float32 self @ x for x (in, P) or (N, in, P); accumulation in float32."""
        if self.data.dtype == np.float32:
            return np.matmul(self.data, x)
        if x.ndim == 3:  # fold the batch into the columns: one pass over the weight
            n, cols = x.shape[0], x.shape[2]
            flat = self.matmul(np.transpose(x, (1, 0, 2)).reshape(x.shape[1], n * cols))
            return np.transpose(flat.reshape(-1, n, cols), (1, 0, 2))
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        out = torch.empty((self.shape[0], xt.shape[1]), dtype=torch.float32)
        for r, block in self._blocks():
            torch.mm(block, xt, out=out[r : r + len(block)])
        return out.numpy()

    def _blocks(self) -> Iterator[tuple[int, Any]]:
        """(first row, float32 tensor of the rows from there), block by block; each block
        is overwritten by the next."""
        import torch

        rows, cols = self.shape
        step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
        data = tensor_view(self.data)
        scale = None if self.scale is None else torch.from_numpy(self.scale.astype(np.float32))
        block = torch.empty((min(step, rows), cols), dtype=torch.float32)
        fp16 = self.scale is not None and self.scale.dtype == np.float16
        half = torch.empty(block.shape, dtype=torch.float16) if fp16 else None
        for r in range(0, rows, step):
            n = min(step, rows - r)
            b = block[:n]
            if scale is None:  # fp16 weights: exact in float32
                b.copy_(data[r : r + n])
            else:
                # data x scale is exact in float32 (8 + 11 significant bits for an fp16
                # scale), so one rounding to fp16 gives numpy's fp16 product, as
                # coremltools computes it; an fp32 scale is numpy's one fp32 rounding.
                # (Same-dtype ops: torch's mixed int8 x float mul is not vectorized, nor is
                # its fp16 mul: 0.55 ns a value against 0.2 for these four passes.)
                b.copy_(data[r : r + n])
                b.mul_(scale[r : r + n, None])
                if half is not None:
                    h = half[:n]
                    h.copy_(b)
                    b.copy_(h)
            yield r, b

    def same_values(self, other: ConvWeight) -> bool:
        """Bit for bit the same weight (NaNs and signed zeros included)."""
        return _same_bits(self.data, other.data) and (
            _same_bits(self.scale, other.scale)
            if self.scale is not None and other.scale is not None
            else self.scale is None and other.scale is None
        )


def tensor_view(a: np.ndarray) -> Any:
    """A zero-copy tensor of `a`, which is only read (torch warns about a read-only one)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_uint = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(as_uint), b.view(as_uint)))


def _matrix(a: np.ndarray) -> np.ndarray:
    """(out, in, 1, ..., 1) -> (out, in): a view of the program's array where it can be."""
    return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]))


def compact_weight(op: Any) -> ConvWeight | None:
    """The conv weight a const or constexpr op produces, held compactly; None where only
    the float32 matrix of its materialized value is exact (the caller builds that)."""
    if op.op_type == "const":
        value = op.outputs[0].val
        if isinstance(value, np.ndarray) and value.dtype == np.float16 and value.ndim >= 2:
            return ConvWeight(_matrix(value))
        return None
    if op.op_type != "constexpr_blockwise_shift_scale":
        return None
    data, scale = op.data.val, op.scale.val
    offset = None if op.offset is None else op.offset.val
    if not (isinstance(data, np.ndarray) and data.dtype in _QUANTIZED and data.ndim >= 2):
        return None
    if not (isinstance(scale, np.ndarray) and scale.dtype in _SCALES):
        return None
    # One scale per output channel: scale (out, 1, ..., 1), i.e. block size 1 along out and
    # the whole row along every other axis.
    if scale.shape != (data.shape[0],) + (1,) * (data.ndim - 1):
        return None
    if offset is not None:
        # A zero offset changes no value, unless it changes the output dtype (an fp32
        # offset makes coremltools compute an fp16-scaled weight in fp32).
        offset = np.asarray(offset)
        if np.any(offset != 0) or np.result_type(scale.dtype, offset.dtype) != scale.dtype:
            return None
    return ConvWeight(_matrix(data), scale.reshape(-1))


class WeightPool:
    """Weights already held (another function's), found by value, not by name."""

    def __init__(self, weights: Iterable[ConvWeight] = ()) -> None:
        self._by_key: dict[tuple[Any, ...], list[ConvWeight]] = {}
        for w in weights:
            self._by_key.setdefault(_fingerprint(w), []).append(w)

    def find(self, weight: ConvWeight) -> ConvWeight:
        """A held weight equal to `weight` bit for bit, or `weight` itself."""
        for held in self._by_key.get(_fingerprint(weight), []):
            if held.same_values(weight):
                return held
        return weight


def _fingerprint(w: ConvWeight) -> tuple[Any, ...]:
    """Cheap to compute, equal for equal weights: narrows the full comparison."""
    edge = (w.data[0].tobytes(), w.data[-1].tobytes()) if w.data.size else ()
    scale = None if w.scale is None else (w.scale.dtype.str, hash(w.scale.tobytes()))
    return (w.data.dtype.str, w.data.shape, scale, hash(edge))
