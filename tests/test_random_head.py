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
import torch

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


def _stats(tmp_path: Path, head: HeadShape, tied: bool = True) -> NextTokenStatistics:
    arch = mid_architecture(tie_word_embeddings=tied)
    out = write_random_checkpoint(tmp_path / "ckpt", arch, seed=0, head=head)
    checkpoint = Checkpoint(out)
    return next_token_statistics(checkpoint, calibration_ids(checkpoint, TOKENS))


def test_trained_head_is_in_the_real_band(tmp_path: Path) -> None:
    stats = _stats(tmp_path, TRAINED_HEAD)
    assert next_token_violations(stats) == [], format_next_token(stats)


def test_an_untied_head_is_in_the_real_band_and_leaves_the_input_rows(tmp_path: Path) -> None:
    """Untied (Phi-3-mini's form), the head's own rows take the shape; the embedding, which
    is only the input then, stays the old generator's row for row."""
    stats = _stats(tmp_path, TRAINED_HEAD, tied=False)
    assert next_token_violations(stats) == [], format_next_token(stats)
    arch = mid_architecture(tie_word_embeddings=False, num_hidden_layers=1)
    name = "model.embed_tokens.weight"
    rows = {
        h: Checkpoint(
            write_random_checkpoint(tmp_path / f"one-{h.spread}", arch, seed=0, head=h)
        ).read_tensors([name])[name]
        for h in (TRAINED_HEAD, OLD_HEAD)
    }
    assert torch.equal(rows[TRAINED_HEAD], rows[OLD_HEAD])
    old = _stats(tmp_path / "old", OLD_HEAD, tied=False)  # its rows spread by 1.5
    assert next_token_violations(old), format_next_token(old)


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
