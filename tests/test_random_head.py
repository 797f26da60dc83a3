"""The trained-like random checkpoint's next-token distributions are a real model's.

Measured on the calibration sequence at the final layer (hidden 576, the sensitivity band's
architecture): mean entropy, median margin / logit std and median p(top1) within the band
around SmolLM2-135M's (sensitivity.REAL_NEXT_TOKEN); the old head (row norms spread by 1.5),
whose few huge rows win every position by tens of logits, must not be.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.random_checkpoint import OLD_HEAD, TRAINED_HEAD, HeadShape
from anechain.sensitivity import (
    REAL_NEXT_TOKEN,
    NextTokenStatistics,
    calibration_ids,
    format_next_token,
    mid_architecture,
    next_token_statistics,
    next_token_violations,
)

TOKENS = 128


def _stats(tmp_path: Path, head: HeadShape) -> NextTokenStatistics:
    out = write_random_checkpoint(tmp_path / "ckpt", mid_architecture(), seed=0, head=head)
    checkpoint = Checkpoint(out)
    return next_token_statistics(checkpoint, calibration_ids(checkpoint, TOKENS))


def test_trained_head_is_in_the_real_band(tmp_path: Path) -> None:
    stats = _stats(tmp_path, TRAINED_HEAD)
    assert next_token_violations(stats) == [], format_next_token(stats)


def test_the_band_rejects_the_old_head(tmp_path: Path) -> None:
    stats = _stats(tmp_path, OLD_HEAD)
    # Sure of every token, winners far ahead: wrong on every statistic.
    assert len(next_token_violations(stats)) == 3, format_next_token(stats)


@pytest.mark.parametrize(
    ("change", "inside"),
    [
        ({}, True),
        ({"entropy_mean": 1.70 * 1.9}, True),
        ({"entropy_mean": 1.70 / 2.5}, False),
        ({"margin_over_std_median": 0.68 * 2.5}, False),
        ({"margin_over_std_median": 0.68 / 2.5}, False),
        ({"top1_probability_median": 0.99}, False),
    ],
)
def test_band_is_two_sided(change: dict[str, float], inside: bool) -> None:
    # Too flat is outside too: near-uniform predictions make every flip cheap.
    stats = dataclasses.replace(REAL_NEXT_TOKEN, **change)
    assert (next_token_violations(stats) == []) is inside
