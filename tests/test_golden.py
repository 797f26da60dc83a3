"""The golden reference: transformers' own Phi3 layers, streamed one at a time, cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anechain.config import ValidationSettings
from anechain.errors import ConfigError
from anechain.golden import calibration_tokens, reference_boundaries


def test_streamed_layers_equal_the_full_transformers_model(tiny_checkpoint, tmp_path):
    from transformers import Phi3ForCausalLM

    tokens = calibration_tokens(ValidationSettings(steps=12), 512)
    bounds = reference_boundaries(tiny_checkpoint, tokens, 6, cache_dir=tmp_path)
    assert bounds.shape == (7, 12, 64) and bounds.dtype == np.float32
    model = Phi3ForCausalLM.from_pretrained(
        str(tiny_checkpoint.path), local_files_only=True, dtype=torch.float32
    )
    with torch.no_grad():
        hidden = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    for i in range(6):  # hidden[6] is after the final norm: never a layer boundary
        np.testing.assert_allclose(bounds[i], hidden[i][0].numpy(), rtol=1e-4, atol=1e-4)


def test_cache_is_reused_and_extended(tiny_checkpoint, tmp_path, monkeypatch):
    import anechain.golden as golden

    tokens = [1, 2, 3, 4]
    first = reference_boundaries(tiny_checkpoint, tokens, 3, cache_dir=tmp_path)
    ran: list[int] = []
    real_run = golden._LayerRunner.run
    monkeypatch.setattr(
        golden._LayerRunner, "run", lambda self, i, h: ran.append(i) or real_run(self, i, h)
    )
    again = reference_boundaries(tiny_checkpoint, tokens, 2, cache_dir=tmp_path)
    assert ran == [] and np.array_equal(again, first[:3])
    longer = reference_boundaries(tiny_checkpoint, tokens, 5, cache_dir=tmp_path)
    assert ran == [3, 4]  # only the layers not cached yet
    assert np.array_equal(longer[:4], first)
    cached = list((tmp_path / "golden").glob("*.npz"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as data:
        assert data["boundaries"].shape[0] == 6


def test_calibration_tokens():
    s = ValidationSettings(steps=4, calibration_seed=3)
    assert calibration_tokens(s, 100) == calibration_tokens(s, 100)
    assert calibration_tokens(ValidationSettings(steps=2, calibration_tokens=(5, 6, 7)), 10) == [
        5,
        6,
    ]
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        calibration_tokens(ValidationSettings(steps=1, calibration_tokens=(50,)), 10)
    with pytest.raises(ConfigError, match="need as many"):
        calibration_tokens(ValidationSettings(steps=3, calibration_tokens=(1,)), 10)
