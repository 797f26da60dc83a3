"""Pure-numpy comparison metrics.

Any NaN/Inf in the actual values is counted, never averaged away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Actual vs expected: cosine, RMSE, max_abs error, and the count of non-finite actuals."""

    cosine: float
    rmse: float
    max_abs: float
    nonfinite: int
    count: int

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def to_dict(self) -> dict[str, float | int]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def compare(actual: np.ndarray, expected: np.ndarray) -> Comparison:
    """Metrics in float64. With any non-finite actual value, the metrics are NaN."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {e.shape}")
    nonfinite = int(a.size - np.count_nonzero(np.isfinite(a)))
    if nonfinite:
        nan = float("nan")
        return Comparison(nan, nan, nan, nonfinite, int(a.size))
    diff = a - e
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        cosine = 1.0
    elif na == 0 or ne == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, e) / (na * ne))
    return Comparison(
        cosine=cosine,
        rmse=float(np.sqrt(np.mean(diff * diff))) if a.size else 0.0,
        max_abs=float(np.max(np.abs(diff))) if a.size else 0.0,
        nonfinite=0,
        count=int(a.size),
    )


@dataclass(frozen=True)
class ShardComparison:
    """A shard's output and its layer delta (output - input), both against the reference.

    The skip connection keeps the output cosine near 1 even when a layer's contribution is
    lost; the delta cosine is not fooled.
    """

    output: Comparison
    delta: Comparison

    def to_dict(self) -> dict[str, float | int | None]:
        out = self.output.to_dict()
        d = self.delta.to_dict()
        return {
            "cosine": out["cosine"],
            "rmse": out["rmse"],
            "max_abs": out["max_abs"],
            "delta_cosine": d["cosine"],
            "delta_rmse": d["rmse"],
            "delta_max_abs": d["max_abs"],
            "nonfinite": self.output.nonfinite,
        }


def compare_shard(
    actual_in: np.ndarray,
    actual_out: np.ndarray,
    expected_in: np.ndarray,
    expected_out: np.ndarray,
) -> ShardComparison:
    """Output vs expected output, and delta (out - in) vs expected delta.

    `actual_in` is what the shard was fed (the reference input rounded to fp16), so the
    rounding of the input is not counted as the shard's error.
    """
    a_in, a_out, e_in, e_out = (
        np.asarray(x, dtype=np.float64) for x in (actual_in, actual_out, expected_in, expected_out)
    )
    return ShardComparison(
        output=compare(a_out, e_out),
        delta=compare(a_out - a_in, e_out - e_in),
    )


def compare_cache(
    actual: np.ndarray, expected: np.ndarray, written: np.ndarray
) -> tuple[list[Comparison], float]:
    """A KV cache state against the reference's, per layer.

    actual, expected: (layers, kv_heads, context, head_dim); written: (context,) bool, the
    positions the decode wrote (or the host filled). Returns each layer's comparison over
    the written positions, and the largest |value| at the unwritten ones (which must be 0).
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"cache shape mismatch: {a.shape} vs {e.shape}")
    per_layer = [compare(a[k][:, written], e[k][:, written]) for k in range(a.shape[0])]
    rest = a[:, :, ~written]
    unwritten = float(np.max(np.abs(rest))) if rest.size else 0.0
    return per_layer, unwritten
