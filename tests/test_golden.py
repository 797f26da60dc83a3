"""The golden reference: transformers' own Phi3 layers, streamed one at a time, cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anechain.config import ValidationSettings
from anechain.errors import ConfigError
from anechain.golden import calibration_tokens, reference, reference_boundaries


def test_streamed_layers_equal_the_full_transformers_model(tiny_checkpoint, tmp_path):
    from transformers import Phi3ForCausalLM

    tokens = calibration_tokens(ValidationSettings(steps=12), tiny_checkpoint)
    assert tokens[0] == 511  # BOS first: where trained-like models' massive activations are
    ref = reference(tiny_checkpoint, tokens, 6, cache_dir=tmp_path)
    bounds = ref.boundaries
    assert bounds.shape == (7, 12, 64) and bounds.dtype == np.float32
    assert ref.keys.shape == ref.values.shape == (6, 2, 12, 16)
    model = Phi3ForCausalLM.from_pretrained(
        str(tiny_checkpoint.path), local_files_only=True, dtype=torch.float32
    )
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=True, use_cache=True)
    hidden = out.hidden_states
    for i in range(6):  # hidden[6] is after the final norm: never a layer boundary
        np.testing.assert_allclose(bounds[i], hidden[i][0].numpy(), rtol=1e-4, atol=1e-3)
        # The KV reference is transformers' own cache (post-RoPE keys).
        layer = out.past_key_values.layers[i]
        np.testing.assert_allclose(ref.keys[i], layer.keys[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ref.values[i], layer.values[0].numpy(), rtol=1e-4, atol=1e-4)


def test_cache_is_reused_and_extended(tiny_checkpoint, tmp_path, monkeypatch):
    import anechain.golden as golden

    tokens = [1, 2, 3, 4]
    first = reference_boundaries(tiny_checkpoint, tokens, 3, cache_dir=tmp_path)
    ran: list[int] = []
    real_trace = golden._LayerRunner.trace
    monkeypatch.setattr(
        golden._LayerRunner, "trace", lambda self, i, h: ran.append(i) or real_trace(self, i, h)
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


def test_calibration_tokens(tiny_checkpoint):
    s = ValidationSettings(steps=4, calibration_seed=3)
    ck = tiny_checkpoint
    assert calibration_tokens(s, ck) == calibration_tokens(s, ck)
    assert calibration_tokens(s, ck)[0] == 511  # no tokenizer: BOS + seeded ids
    assert calibration_tokens(s, ck) != calibration_tokens(ValidationSettings(steps=4), ck)
    longer = calibration_tokens(s, ck, 10)
    assert longer[:4] == calibration_tokens(s, ck) and len(longer) == 10
    explicit = ValidationSettings(steps=2, calibration_tokens=(5, 6, 7))
    assert calibration_tokens(explicit, ck) == [5, 6]
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        calibration_tokens(ValidationSettings(steps=1, calibration_tokens=(5000,)), ck)
    with pytest.raises(ConfigError, match="need as many"):
        calibration_tokens(ValidationSettings(steps=3, calibration_tokens=(1,)), ck)


def test_calibration_from_the_checkpoints_tokenizer(tiny_checkpoint_dir, tmp_path):
    """With a tokenizer in the folder: BOS + the fixed text, never a download."""
    from tests.conftest import save_offline_tokenizer
    from transformers import AutoTokenizer

    from anechain.checkpoint import Checkpoint, copy_checkpoint
    from anechain.golden import CALIBRATION_TEXT

    folder = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "with-tokenizer")
    save_offline_tokenizer(folder, 512)
    ckpt = Checkpoint(folder)
    settings = ValidationSettings(steps=16)
    tokens = calibration_tokens(settings, ckpt)
    ids = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        CALIBRATION_TEXT, add_special_tokens=False
    )["input_ids"]
    assert tokens == [511, *ids[:15]]  # the checkpoint's BOS, then the text
    assert tokens != calibration_tokens(settings, Checkpoint(tiny_checkpoint_dir))
    # Longer than the text: repeated (the late window's prefix), still BOS first.
    long = calibration_tokens(settings, ckpt, 3 * len(ids))
    assert long[: 1 + len(ids)] == [511, *ids] and long[1 + len(ids)] == 511
    # Explicit ids still win over the text.
    explicit = ValidationSettings(steps=2, calibration_tokens=(5, 6))
    assert calibration_tokens(explicit, ckpt) == [5, 6]
