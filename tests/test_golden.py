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


def _count_layers_run(monkeypatch) -> list[int]:
    """The reference layers computed from now on, in order."""
    import anechain.golden as golden

    ran: list[int] = []
    real_trace = golden._LayerRunner.trace
    monkeypatch.setattr(
        golden._LayerRunner,
        "trace",
        lambda self, i, h, **kw: ran.append(i) or real_trace(self, i, h, **kw),
    )
    return ran


def test_cache_is_reused_and_extended(tiny_checkpoint, tmp_path, monkeypatch):
    tokens = [1, 2, 3, 4]
    first = np.asarray(reference_boundaries(tiny_checkpoint, tokens, 3, cache_dir=tmp_path))
    ran = _count_layers_run(monkeypatch)
    again = reference_boundaries(tiny_checkpoint, tokens, 2, cache_dir=tmp_path)
    assert ran == [] and np.array_equal(again, first[:3])
    longer = reference_boundaries(tiny_checkpoint, tokens, 5, cache_dir=tmp_path)
    assert ran == [3, 4]  # only the layers not cached yet
    assert np.array_equal(np.asarray(longer)[:4], first)
    (folder,) = (tmp_path / "golden").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"h{i:03d}.npy" for i in range(6)] + [f"k{i:03d}.npy" for i in range(5)] + [
        f"v{i:03d}.npy" for i in range(5)
    ]


def test_the_reference_is_read_back_memory_mapped_a_layer_at_a_time(tiny_checkpoint, tmp_path):
    tokens = [1, 2, 3, 4]
    ref = reference(tiny_checkpoint, tokens, 4, cache_dir=tmp_path)
    layer = ref.boundaries[2]
    assert isinstance(layer, np.memmap) and not layer.flags.writeable
    assert isinstance(ref.keys[1:3], type(ref.keys)) and ref.keys[1:3].shape == (2, 2, 4, 16)
    np.testing.assert_array_equal(ref.values[1:3][:, :, :2], np.asarray(ref.values)[1:3, :, :2])


def test_a_damaged_layer_file_recomputes_from_that_layer(tiny_checkpoint, tmp_path, monkeypatch):
    tokens = [1, 2, 3, 4]
    good = np.asarray(reference_boundaries(tiny_checkpoint, tokens, 4, cache_dir=tmp_path))
    (folder,) = (tmp_path / "golden").iterdir()
    damaged = folder / "k002.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated
    ran = _count_layers_run(monkeypatch)
    again = reference_boundaries(tiny_checkpoint, tokens, 4, cache_dir=tmp_path)
    assert ran == [2, 3]
    np.testing.assert_array_equal(np.asarray(again), good)


def test_sdpa_and_eager_reference_paths_agree(tiny_checkpoint):
    """The reference runs transformers' SDPA path (no (H, S, S) matrix); the eager path (kept
    for attention probabilities) must give the same layer output and KV."""
    from anechain.golden import _embed, _LayerRunner

    tokens = list(range(1, 13))
    runner = _LayerRunner(tiny_checkpoint, len(tokens))
    hidden = _embed(tiny_checkpoint, tokens)
    sdpa, eager = runner.trace(0, hidden, probs=False), runner.trace(0, hidden, probs=True)
    assert sdpa.probs is None and eager.probs.shape == (4, 12, 12)
    np.testing.assert_allclose(sdpa.hidden, eager.hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sdpa.keys, eager.keys, rtol=1e-6, atol=1e-6)


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
