from __future__ import annotations

import math

import numpy as np
import pytest

from anechain.config import Gates
from anechain.metrics import compare, compare_shard
from anechain.validate import apply_gates

rng = np.random.default_rng(0)
X = rng.standard_normal(256)


def test_identical():
    c = compare(X, X)
    assert c.cosine == pytest.approx(1.0) and c.rmse == 0 and c.max_abs == 0 and c.finite


def test_scaled_keeps_cosine_but_not_error():
    c = compare(2 * X, X)
    assert c.cosine == pytest.approx(1.0)
    assert c.rmse == pytest.approx(np.sqrt(np.mean(X**2)))
    assert c.max_abs == pytest.approx(np.abs(X).max())


def test_orthogonal_and_opposite():
    a = np.array([1.0, 0.0, 0.0])
    assert compare(a, np.array([0.0, 1.0, 0.0])).cosine == pytest.approx(0.0)
    assert compare(-X, X).cosine == pytest.approx(-1.0)
    assert compare(np.zeros(3), a).cosine == 0.0
    assert compare(np.zeros(3), np.zeros(3)).cosine == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_is_counted_never_averaged(bad):
    a = X.copy()
    a[[3, 7]] = bad
    c = compare(a, X)
    assert c.nonfinite == 2 and not c.finite
    assert math.isnan(c.cosine) and math.isnan(c.rmse)
    assert c.to_dict()["cosine"] is None  # JSON-safe


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(X, X[:-1])


def test_delta_catches_a_lost_layer_the_output_cosine_misses():
    """The measured fp16 failure: a layer's contribution vanished, the residual dominates."""
    residual = 300 * rng.standard_normal(3072)
    contribution = rng.standard_normal(3072)
    expected_out = residual + contribution
    lost = compare_shard(residual, residual, residual, expected_out)  # out == in
    assert lost.output.cosine > 0.99999
    assert lost.delta.cosine == 0.0
    gates = {g.name: g.passed for g in apply_gates(lost.to_dict(), Gates())}
    assert gates["cosine"] and not gates["delta_cosine"]


def test_gates_on_real_passing_figures_and_nan():
    """Defaults pass the real Phi-4-mini shards' worst figures and fail NaN."""
    worst_passing = {
        "cosine": 0.9984,
        "rmse": 0.131,
        "max_abs": 0.63,
        "delta_cosine": 0.95,
        "step_delta_cosine": 0.95,  # not measured on the real shards: the whole-run figure
        "delta_rmse": 0.131,
        "delta_max_abs": 0.63,
        "nonfinite": 0,
        # No real KV figure was measured: the output cosine stands in for it.
        "kv_cosine": 0.9984,
        "kv_unwritten_max_abs": 0.0,
    }
    assert all(g.passed for g in apply_gates(worst_passing, Gates()))
    # A report without the KV metrics fails their gates: they are not optional.
    bare = {k: v for k, v in worst_passing.items() if not k.startswith("kv_")}
    assert {g.name for g in apply_gates(bare, Gates()) if not g.passed} == {
        "kv_cosine",
        "kv_unwritten",
    }
    nan = {**worst_passing, "cosine": None, "rmse": None, "max_abs": None, "nonfinite": 4}
    failed = {g.name for g in apply_gates(nan, Gates()) if not g.passed}
    assert failed == {"finite", "cosine", "rmse", "max_abs"}
