"""Pure-numpy comparison metrics.

Any NaN/Inf in the actual values is counted, never averaged away. Besides absolute errors,
`rel_rmse` and `rel_max_abs` measure the error against the reference's own scale, step by
step: hidden states grow from ~1 to hundreds or thousands through a real model, so an
absolute bound cannot fit every layer (see DESIGN.md, "Gates that fit the model's scale").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Actual vs expected: cosine, RMSE, max_abs error, and the count of non-finite actuals.

    `rel_rmse` and `rel_max_abs` are scale-free figures of each row (a step: the last axis),
    the worst row reported (see `_relative_errors`). For a single row they are relative to
    that row alone; validation gates the figures of all steps compared at once.
    """

    cosine: float
    rmse: float
    max_abs: float
    nonfinite: int
    count: int
    rel_rmse: float = math.nan
    rel_max_abs: float = math.nan

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def to_dict(self) -> dict[str, float | int]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def compare(actual: np.ndarray, expected: np.ndarray) -> Comparison:
    """Metrics in float64 over all elements; the relative ones per row of the last axis
    (e.g. per step of (S, C) hidden states). With any non-finite actual value, the metrics
    are NaN."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {e.shape}")
    nonfinite = int(a.size - np.count_nonzero(np.isfinite(a)))
    if nonfinite:
        nan = float("nan")
        return Comparison(nan, nan, nan, nonfinite, int(a.size), nan, nan)
    diff = a - e
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        cosine = 1.0
    elif na == 0 or ne == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, e) / (na * ne))
    rel_rmse, rel_max_abs = _relative_errors(actual, expected)
    return Comparison(
        cosine=cosine,
        rmse=float(np.sqrt(np.mean(diff * diff))) if a.size else 0.0,
        max_abs=float(np.max(np.abs(diff))) if a.size else 0.0,
        nonfinite=0,
        count=int(a.size),
        rel_rmse=rel_rmse,
        rel_max_abs=rel_max_abs,
    )


def _relative_errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Per row r (a step) of the last axis, against the step's scale s_r, the worst row's:

    rel_rmse    = RMSE_r / s_r
    rel_max_abs = max_i |a_ri - e_ri| / (s_r + |e_ri|)

    s_r = max(RMS(e_r), the median row's RMS): a step is judged against its own size, but
    never a size below the sequence's typical one, since its error also comes through
    attention from the other steps. The second figure is numpy's allclose turned into a
    number (atol = rtol * s_r): an element may err in proportion to its own size (fp16
    rounding and INT8 error grow with the value, as in outlier channels) or to the step's.
    """
    e = np.asarray(expected, dtype=np.float64)
    width = e.shape[-1] if e.ndim else 1
    e = e.reshape(-1, width)
    d = np.asarray(actual, dtype=np.float64).reshape(-1, width) - e
    if not e.size:
        return 0.0, 0.0
    rms = np.sqrt(np.mean(e * e, axis=1, keepdims=True))  # (rows, 1)
    scale = np.maximum(rms, np.median(rms))
    rmse = np.sqrt(np.mean(d * d, axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        # A zero reference: no error is 0, any error is infinitely large.
        rel_rmse = np.where(scale > 0, rmse / scale, np.where(rmse > 0, np.inf, 0.0))
        room = scale + np.abs(e)
        rel_abs = np.where(room > 0, np.abs(d) / room, np.where(d != 0, np.inf, 0.0))
    return float(np.max(rel_rmse)), float(np.max(rel_abs))


@dataclass(frozen=True)
class ShardComparison:
    """A shard's output and its layer delta (output - input), both against the reference.

    The skip connection keeps the output cosine near 1 even when a layer's contribution is
    lost; the delta cosine is not fooled.
    """

    output: Comparison
    delta: Comparison
    bulk: Comparison | None = None  # the output without its massive channels
    massive_channels: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        out = self.output.to_dict()
        d = self.delta.to_dict()
        bulk = (self.bulk or self.output).to_dict()
        return {
            "bulk_cosine": bulk["cosine"],
            "bulk_rel_rmse": bulk["rel_rmse"],
            "massive_channels": self.massive_channels,
            "cosine": out["cosine"],
            "rmse": out["rmse"],
            "max_abs": out["max_abs"],
            "rel_rmse": out["rel_rmse"],
            "rel_max_abs": out["rel_max_abs"],
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
    keep = bulk_channels(e_out)
    rows = e_out.reshape(-1, e_out.shape[-1]) if e_out.ndim else e_out.reshape(1, 1)
    outs = a_out.reshape(rows.shape)
    return ShardComparison(
        output=compare(a_out, e_out),
        delta=compare(a_out - a_in, e_out - e_in),
        bulk=compare(outs[:, keep], rows[:, keep]),
        massive_channels=int(keep.size - np.count_nonzero(keep)),
    )


# A channel is massive when its largest |reference value| exceeds this many times the median
# channel's RMS: Phi-4-mini's few massive channels reach ~185 against an RMS of ~3 (~60x);
# ordinary channels of unequal sizes and heavy tails peak at up to ~18x over a run
# (tests/test_metrics.py).
MASSIVE_RATIO = 32.0


def bulk_channels(expected: np.ndarray) -> np.ndarray:
    """(C,) bool: the channels that are not massive in `expected` (rows of the last axis).

    Cosine and RMSE over all channels are dominated by the few massive ones, which carry
    most of the energy: a broken subspace of the rest hides behind them. The bulk figures
    (`bulk_cosine`, `bulk_rel_rmse`) leave them out.
    """
    e = np.asarray(expected, dtype=np.float64)
    e = e.reshape(-1, e.shape[-1]) if e.ndim else e.reshape(1, 1)
    if not e.size:
        return np.ones(e.shape[-1], dtype=bool)
    rms = np.sqrt(np.mean(e * e, axis=0))  # per channel over the rows
    peak = np.max(np.abs(e), axis=0)
    scale = np.median(rms)
    return ~(peak > MASSIVE_RATIO * scale) if scale > 0 else np.ones(e.shape[-1], dtype=bool)


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
