"""A deep stack holds every position's state as a real model's does.

Over 32 layers (hidden 576), the trained-like random checkpoint's states must not run away
(one position's state growing far past the others' at a layer chance decides), and a small
error on the states after layer 8 must come out of the last layer no more amplified at any
position than the real SmolLM2-135M's (sensitivity.REAL_AMPLIFICATION): the random model
before its shared units were made stable did both, and failed a correct 32-layer shard's
next-token gate on one position.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.sensitivity import (
    REAL_AMPLIFICATION,
    DepthLayer,
    amplification,
    amplification_violations,
    depth_profile,
    load_layers,
    mid_architecture,
    prose_text,
    random_ids,
    runaway_violations,
    text_ids,
)

LAYERS = 32
TOKENS = 512


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    arch = mid_architecture(num_hidden_layers=LAYERS)
    return Checkpoint(write_random_checkpoint(tmp_path_factory.mktemp("deep") / "ckpt", arch))


def test_no_state_runs_away_in_32_layers(deep: Checkpoint) -> None:
    profile = depth_profile(deep, random_ids(deep, TOKENS), LAYERS)
    assert runaway_violations(profile, LAYERS // 4) == []
    # The shared part stays a part: every layer's states still differ from each other.
    assert all(0.2 < p.mean_share < 0.97 for p in profile[2:]), profile


def test_an_error_is_no_more_amplified_than_by_real_weights(deep: Checkpoint) -> None:
    measured = amplification(deep, random_ids(deep, TOKENS), 8, LAYERS)
    assert amplification_violations(measured) == [], measured


def test_the_real_model_holds_its_states(smollm2_checkpoint_dir: Path) -> None:
    real = Checkpoint(smollm2_checkpoint_dir)
    layers = real.architecture.num_hidden_layers
    ids = text_ids(real, prose_text(), TOKENS)
    model = load_layers(real, layers)
    assert runaway_violations(depth_profile(real, ids, layers, model=model), layers // 2) == []
    mean, largest = amplification(real, ids, 7, layers, model=model)
    # The constant the random model is held to, measured again.
    assert mean == pytest.approx(REAL_AMPLIFICATION[0], rel=0.1)
    assert largest == pytest.approx(REAL_AMPLIFICATION[1], rel=0.1)


def test_the_checks_reject_a_state_running_away() -> None:
    held = [DepthLayer(i, 0.5, 1.3, 0) for i in range(LAYERS + 1)]
    runaway = [*held[:20], DepthLayer(20, 0.5, 9.3, 15), *held[21:]]
    assert runaway_violations(held, 8) == []
    assert runaway_violations(runaway, 8) == [
        "layer 20: a state at 9.3x the median rms (15 above 3x)"
    ]
    assert runaway_violations(runaway, 21) == []  # before `after`: early massive tokens
    # The old generator's figures (hidden 576, 32 layers, noise after layer 8).
    assert amplification_violations((0.99, 35.4)) == [
        "largest amplification 35.4 is 10.1x the real model's 3.5 (at most 2x)"
    ]


def test_amplification_through_no_layer_is_the_noise(deep: Checkpoint) -> None:
    # Noise on the last layer's states comes out as it went in: relative error 1 on average.
    mean, largest = amplification(deep, random_ids(deep, 64), LAYERS, LAYERS)
    assert mean == pytest.approx(1.0, rel=0.05)
    assert 1.0 < largest < 1.3
