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


def compare_shard_rows(
    actual_in: np.ndarray,
    actual_out: np.ndarray,
    expected_in: np.ndarray,
    expected_out: np.ndarray,
) -> list[dict[str, float | int | None]]:
    """Each row (a step) of (N, C) arrays compared on its own, as
    `[compare_shard(actual_in[i], ..., expected_out[i]).to_dict() for i in range(N)]` gives
    it, the same values (tests/test_metrics.py), at array speed: per-step figures of a long
    window (2048 steps of 3072 channels: a Python loop of compare_shard took seconds)."""
    arrays = [np.asarray(x) for x in (actual_in, actual_out, expected_in, expected_out)]
    shapes = [x.shape for x in arrays]
    if len(set(shapes)) > 1 or len(shapes[0]) != 2 or not shapes[0][1]:  # compare_shard: C > 0
        raise ValueError(f"compare_shard_rows takes four (N, C > 0) arrays alike, not {shapes}")
    rows, width = shapes[0]
    work = _Work(min(rows, _ROWS_AT_ONCE) * width)
    figures: dict[str, list[np.ndarray]] = {}
    with np.errstate(all="ignore"):  # non-finite values make the figures, not warnings
        for i in range(0, rows, _ROWS_AT_ONCE):
            # float64 in C order: a row's sums then run along it as over the row alone.
            block = [work.copy(k, x[i : i + _ROWS_AT_ONCE]) for k, x in enumerate(arrays)]
            for k, v in _shard_rows(*block, work).items():
                figures.setdefault(k, []).append(v)
    columns = [[_json_number(x) for x in np.concatenate(v).tolist()] for v in figures.values()]
    return [dict(zip(figures, values, strict=True)) for values in zip(*columns, strict=True)]


# Rows compared at once: a block's float64 work arrays stay in the CPU's cache (32 x 3072 x
# 8 bytes: 0.8 MB each), not a pass through memory each.
_ROWS_AT_ONCE = 32


class _Work:
    """Work arrays for a block, reused block after block: malloc maps a new 0.8 MB array
    afresh and each of its pages faults in, which cost 3-4x the arithmetic (measured).

    Float arrays 0-3: the block's inputs; 4-5: deltas; 6-8: _compare_rows's; 6-7 also
    _bulk_channels_per_row's. Flag arrays 0: _compare_rows's; 1: the kept channels; 2: the
    bulk's rows' kept channels.
    """

    def __init__(self, size: int) -> None:
        self._floats = np.empty((9, size))
        self._flags = np.empty((3, size), dtype=bool)

    def floats(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._floats[i, : math.prod(shape)].reshape(shape)

    def flags(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._flags[i, : math.prod(shape)].reshape(shape)

    def copy(self, i: int, x: np.ndarray) -> np.ndarray:
        """x as float64 in float array i."""
        out = self.floats(i, x.shape)
        np.copyto(out, x)
        return out


def _shard_rows(
    a_in: np.ndarray, a_out: np.ndarray, e_in: np.ndarray, e_out: np.ndarray, work: _Work
) -> dict[str, np.ndarray]:
    """ShardComparison.to_dict's figures, each an (N,) array, of (N, C) C-order float64."""
    out = _compare_rows(a_out, e_out, work)
    delta = _compare_rows(
        np.subtract(a_out, a_in, out=work.floats(4, a_in.shape)),
        np.subtract(e_out, e_in, out=work.floats(5, a_in.shape)),
        work,
    )
    keep = _bulk_channels_per_row(e_out, work)  # (N, C)
    massive = keep.shape[1] - keep.sum(axis=1)  # (N,)
    # The bulk is the output where no channel is massive; elsewhere, the rows with as many
    # massive channels (whichever) are compared at once, each row's kept channels in a row.
    bulk = {k: out[k].copy() for k in ("cosine", "rel_rmse")}
    for count in np.unique(massive[massive > 0]).tolist():
        rows = np.flatnonzero(massive == count)
        # The kept channels of these rows, row after row (no copy of the rows first: x[rows]
        # allocates a block, each of its pages a fault).
        chosen = np.logical_and(keep, (massive == count)[:, None], out=work.flags(2, keep.shape))
        a, e = (x[chosen].reshape(len(rows), -1) for x in (a_out, e_out))  # C order
        part = _compare_rows(a, e, work)
        for k, v in bulk.items():
            v[rows] = part[k]
    return {  # to_dict's keys, in its order
        "bulk_cosine": bulk["cosine"],
        "bulk_rel_rmse": bulk["rel_rmse"],
        "massive_channels": massive,
        "cosine": out["cosine"],
        "rmse": out["rmse"],
        "max_abs": out["max_abs"],
        "rel_rmse": out["rel_rmse"],
        "rel_max_abs": out["rel_max_abs"],
        "delta_cosine": delta["cosine"],
        "delta_rmse": delta["rmse"],
        "delta_max_abs": delta["max_abs"],
        "nonfinite": out["nonfinite"],
    }


def _json_number(x: float | int) -> float | int | None:
    """As Comparison.to_dict writes a figure: a non-finite float is None."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _compare_rows(actual: np.ndarray, expected: np.ndarray, work: _Work) -> dict[str, np.ndarray]:
    """`compare(actual[i], expected[i])` of every row of (M, K) C-order float64 arrays, K > 0,
    as (M,) arrays of its fields. The same operations row by row: dot products through BLAS's
    ddot as np.dot (np.vecdot), sums along the row as numpy does them for one row."""
    a, e = actual, expected
    d, t, u = (work.floats(i, a.shape) for i in (6, 7, 8))
    flags = work.flags(0, a.shape)
    nonfinite = a.shape[1] - np.isfinite(a, out=flags).sum(axis=1)  # (M,)
    np.subtract(a, e, out=d)
    na, ne = np.sqrt(np.vecdot(a, a)), np.sqrt(np.vecdot(e, e))
    cosine = np.where(
        (na == 0) & (ne == 0),
        1.0,
        np.where((na == 0) | (ne == 0), 0.0, np.vecdot(a, e) / (na * ne)),
    )
    rmse = np.sqrt(np.mean(np.multiply(d, d, out=t), axis=1))
    max_abs = np.max(np.abs(d, out=u), axis=1)
    # _relative_errors of one row: the median row's RMS is the row's own, s = RMS(e).
    scale = np.sqrt(np.mean(np.multiply(e, e, out=t), axis=1))
    rel_rmse = np.where(scale > 0, rmse / scale, np.where(rmse > 0, np.inf, 0.0))
    room = np.add(scale[:, None], np.abs(e, out=t), out=t)
    rel_abs = np.divide(u, room, out=u)  # |d| / room
    odd = np.logical_not(np.greater(room, 0, out=flags), out=flags)
    if odd.any():  # zero or NaN room: _relative_errors's np.where (slow over all) here
        rel_abs[odd] = np.where(d[odd] != 0, np.inf, 0.0)
    fields = {
        "cosine": cosine,
        "rmse": rmse,
        "max_abs": max_abs,
        "rel_rmse": rel_rmse,
        "rel_max_abs": np.max(rel_abs, axis=1),
    }
    bad = nonfinite > 0  # a non-finite actual: every figure NaN
    for v in fields.values():
        v[bad] = np.nan
    return {**fields, "nonfinite": nonfinite}


def _bulk_channels_per_row(expected: np.ndarray, work: _Work) -> np.ndarray:
    """(N, C) bool: `bulk_channels(expected[i])` of every row of (N, C) float64 (one row: a
    channel's RMS is sqrt(e * e), its peak |e|)."""
    shape = expected.shape
    rms = np.multiply(expected, expected, out=work.floats(6, shape))
    np.sqrt(rms, out=rms)
    scale = _median_rows(rms, work.floats(7, shape))[:, None]  # (N, 1)
    peak = np.abs(expected, out=rms)
    massive = np.greater(peak, MASSIVE_RATIO * scale, out=work.flags(1, shape))
    return np.logical_or(np.logical_not(massive, out=massive), ~(scale > 0), out=massive)


def _median_rows(x: np.ndarray, part: np.ndarray) -> np.ndarray:
    """(N,): np.median of each row of (N, C), the same bits: the mean of the middle two (or
    the middle one), NaN with any NaN. One partition point, the other the max below it:
    np.median(x, axis=1) partitions at three points, 10x slower. `part`: work, as x."""
    half = x.shape[1] // 2
    nan = np.isnan(x).any(axis=1)
    np.copyto(part, x)
    part.partition(half, axis=1)
    middle = part[:, half]
    if not x.shape[1] % 2:
        middle = (np.max(part[:, :half], axis=1) + middle) / 2
    return np.where(nan, np.nan, middle)


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
