from __future__ import annotations

import json

import pytest
import torch

from anechain.checkpoint import Checkpoint, copy_checkpoint, write_random_checkpoint
from anechain.config import LayerRange
from anechain.errors import CheckpointError


def test_random_checkpoint_has_the_real_format(tiny_checkpoint_dir, tiny_config):
    files = sorted(p.name for p in tiny_checkpoint_dir.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tiny_checkpoint_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((tiny_checkpoint_dir / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "longrope"
    assert len(config["rope_scaling"]["short_factor"]) == tiny_config.architecture.rotary_dim // 2
    ckpt = Checkpoint(tiny_checkpoint_dir)
    assert ckpt.architecture == tiny_config.architecture
    t = ckpt.read_tensors(["model.layers.0.self_attn.qkv_proj.weight"])
    assert t["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.bfloat16


def test_transformers_loads_it_and_hidden_states_grow(tiny_checkpoint_dir):
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(
        str(tiny_checkpoint_dir), local_files_only=True, dtype=torch.float32
    )
    with torch.no_grad():
        out = model(torch.arange(16)[None] * 7, output_hidden_states=True)
    # hidden_states[-1] is after the final norm: look at the residual stream before it.
    peaks = [h.abs().max().item() for h in out.hidden_states[:-1]]
    assert peaks[0] < 0.5  # embeddings are small
    rms = [h.pow(2).mean().sqrt().item() for h in out.hidden_states[:-1]]
    # ...and the residual stream grows through the layers.
    assert all(b > a for a, b in zip(rms, rms[1:], strict=False))
    assert peaks[-1] > 2 * peaks[1] > 0


def test_fingerprints(tiny_checkpoint, tiny_checkpoint_dir, tiny_config, tmp_path):
    names = tiny_checkpoint.layer_tensor_names(LayerRange(3, 5))
    assert len(names) == 12
    assert tiny_checkpoint.weights_fingerprint(names) != tiny_checkpoint.weights_fingerprint(
        tiny_checkpoint.layer_tensor_names(LayerRange(0, 2))
    )
    other = Checkpoint(write_random_checkpoint(tmp_path / "s1", tiny_config.architecture, seed=1))
    assert other.fingerprint != tiny_checkpoint.fingerprint
    assert other.weights_fingerprint(names) != tiny_checkpoint.weights_fingerprint(names)
    same = Checkpoint(copy_checkpoint(tiny_checkpoint_dir, tmp_path / "copy"))
    assert same.fingerprint == tiny_checkpoint.fingerprint


def test_refusals(tmp_path, tiny_checkpoint_dir, tiny_config):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path / "empty")
    llama = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        Checkpoint(llama)
    with pytest.raises(CheckpointError, match="already exists"):
        write_random_checkpoint(tiny_checkpoint_dir, tiny_config.architecture)
    ckpt = Checkpoint(tiny_checkpoint_dir)
    with pytest.raises(CheckpointError, match="no tensor"):
        ckpt.read_tensors(["model.layers.99.mlp.down_proj.weight"])
