"""The trained-like random checkpoint is as robust to weight noise as a real model.

Its hidden states after 8 layers (hidden 576, SmolLM2-135M's width) must move under weight
noise and INT8 rounding within sensitivity.BAND of the real model's 1 - cosine, at early
and late positions; the old generator (attention peaked on random keys) must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.random_checkpoint import PEAKED
from anechain.sensitivity import (
    INT8,
    REAL_ONE_MINUS_COS,
    Curve,
    CurvePoint,
    band_violations,
    format_curve,
    mid_architecture,
    noise_curve,
    random_ids,
)

NOISES = (0.009, INT8)
TOKENS = 256


def _mid(tmp_path: Path, style: str) -> Checkpoint:
    arch = mid_architecture()
    return Checkpoint(write_random_checkpoint(tmp_path / style, arch, seed=0, style=style))


def _curve(checkpoint: Checkpoint) -> Curve:
    return noise_curve(checkpoint, random_ids(checkpoint, TOKENS), 8, NOISES)


def test_trained_random_checkpoint_stays_in_the_real_band(tmp_path: Path) -> None:
    curve = _curve(_mid(tmp_path, "trained"))
    assert band_violations(curve) == [], format_curve(curve)


def test_the_band_rejects_the_peaked_generator(tmp_path: Path) -> None:
    curve = _curve(_mid(tmp_path, PEAKED))
    violations = band_violations(curve)
    # Too fragile at every level, late positions most of all.
    assert any("late" in v for v in violations), format_curve(curve)
    assert len(violations) >= len(NOISES), violations


def _at(factor: float) -> Curve:
    points = tuple(
        CurvePoint(n, 1 - factor * e, 1 - factor * late, 1 - factor * late)
        for n, (e, late) in REAL_ONE_MINUS_COS.items()
    )
    return Curve("made up", 8, TOKENS, points)


@pytest.mark.parametrize(
    ("factor", "inside"), [(1.0, True), (5.0, True), (20.0, False), (0.05, False)]
)
def test_band_is_two_sided(factor: float, inside: bool) -> None:
    # Too robust is outside too: a model noise cannot move validates nothing.
    assert (band_violations(_at(factor)) == []) is inside


def test_full_rotary_without_scaling_gets_the_structure(tmp_path: Path) -> None:
    """A Phi-3 / Llama-like model (partial_rotary_factor 1.0, rope_scaling null): the sink
    goes in RoPE's slowest pair, and the model is as robust as the partial-rotary one."""
    arch = mid_architecture(partial_rotary_factor=1.0)
    out = write_random_checkpoint(tmp_path / "full", arch, seed=0, rope_scaling="none")
    checkpoint = Checkpoint(out)
    assert checkpoint.raw_config["rope_scaling"] is None
    assert checkpoint.architecture.partial_rotary_factor == 1.0
    curve = _curve(checkpoint)
    assert band_violations(curve) == [], format_curve(curve)
