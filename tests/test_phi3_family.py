"""The Phi-3 family beside Phi-4-mini: presets, random checkpoints, each tiny form built.

Each architecture is read from its config.json as the real one is written: Phi-3's files
have no `partial_rotary_factor` (Phi3Config's default, 1.0, full rotary), Phi-3-mini-4k has
`rope_scaling: null`, the 128k models LongRoPE factors (`type` "longrope", first released
as "su"), and every Phi-3 an untied LM head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from anechain.checkpoint import Checkpoint, hf_config_dict
from anechain.cli import cli
from anechain.config import PRESETS, load_preset

FAMILY = ("phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini")


def _real_config(name: str, rope_type: str = "longrope") -> dict:
    """config.json of microsoft/Phi-3-mini-4k-instruct, -128k-instruct, Phi-3.5-mini-instruct:
    their keys and architecture values (the LongRoPE factors' values made up, 48 each)."""
    longrope = name != "phi-3-mini-4k"
    config = {
        "_name_or_path": f"{name}-instruct",
        "architectures": ["Phi3ForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        },
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072 if longrope else 4096,
        "model_type": "phi3",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + i / 4 for i in range(48)],
            "short_factor": [1.0 + i / 100 for i in range(48)],
            "type": rope_type,
        }
        if longrope
        else None,
        "rope_theta": 10000.0,
        "sliding_window": 262144 if longrope else 2047,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "attention_bias": False,
        "vocab_size": 32064,
    }
    return config


def _folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.mark.parametrize("name", FAMILY)
def test_real_config_reads_as_the_preset(tmp_path: Path, name: str) -> None:
    arch = Checkpoint(_folder(tmp_path, _real_config(name))).architecture
    assert arch == load_preset(name).architecture
    assert arch.partial_rotary_factor == 1.0 and arch.rotary_dim == arch.head_dim == 96
    assert not arch.tie_word_embeddings


def test_first_phi3_128k_release_su_reads_as_longrope(tmp_path: Path) -> None:
    """Phi-3-mini-128k's first config.json said "su": the same LongRoPE (transformers maps
    it), so the same architecture and the long factors used past 4096 positions."""
    from anechain.rope import RopeParameters

    ckpt = Checkpoint(_folder(tmp_path, _real_config("phi-3-mini-128k", rope_type="su")))
    assert ckpt.architecture == load_preset("phi-3-mini-128k").architecture
    rope = RopeParameters.from_hf_config(ckpt.hf_config)
    assert rope.inv_freq_long != rope.inv_freq_short
    assert rope.attention_scaling > 1.0


def test_4k_has_no_rope_scaling(tmp_path: Path) -> None:
    from anechain.rope import RopeParameters

    ckpt = Checkpoint(_folder(tmp_path, _real_config("phi-3-mini-4k")))
    rope = RopeParameters.from_hf_config(ckpt.hf_config)
    assert rope.inv_freq_long == rope.inv_freq_short and rope.attention_scaling == 1.0
    # The plain rope of full rotary: theta^(-2i/96).
    assert rope.inv_freq_short[1] == pytest.approx(10000.0 ** (-2 / 96), rel=1e-6)
    assert len(rope.inv_freq_short) == 48


@pytest.mark.parametrize("name", FAMILY)
def test_random_config_has_the_real_keys(name: str) -> None:
    """The random checkpoint's config.json: the real file's architecture keys and values
    (rope_scaling null / longrope, no partial_rotary_factor), the LongRoPE factors made up."""
    ours = hf_config_dict(load_preset(name).architecture)
    real = _real_config(name)
    skip = {"_name_or_path", "auto_map", "transformers_version"}  # provenance, not model
    assert set(ours) == set(real) - skip
    for key in ("max_position_embeddings", "original_max_position_embeddings", "vocab_size"):
        assert ours[key] == real[key]
    assert ours["tie_word_embeddings"] is False
    if real["rope_scaling"] is None:
        assert ours["rope_scaling"] is None
    else:
        assert ours["rope_scaling"]["type"] == "longrope"
        assert len(ours["rope_scaling"]["long_factor"]) == 48


def test_phi4_mini_config_keeps_partial_rotary() -> None:
    ours = hf_config_dict(load_preset("phi-4-mini").architecture)
    assert ours["partial_rotary_factor"] == 0.75 and ours["rope_scaling"]["type"] == "longrope"


@pytest.mark.parametrize("name", [f"tiny-{n}" for n in FAMILY])
def test_random_checkpoint_preset(tmp_path: Path, name: str) -> None:
    assert name in PRESETS
    out = tmp_path / name
    run = CliRunner().invoke(cli, ["random-checkpoint", str(out), "--preset", name])
    assert run.exit_code == 0, run.output
    ckpt = Checkpoint(out)
    assert ckpt.architecture == load_preset(name).architecture
    raw = json.loads((out / "config.json").read_text())
    assert "partial_rotary_factor" not in raw
    assert (raw["rope_scaling"] is None) == (name == "tiny-phi-3-mini-4k")
    assert "lm_head.weight" in ckpt.tensor_names()


@pytest.mark.parametrize("name", [f"tiny-{n}" for n in FAMILY])
def test_build_passes_on_tiny_form(tmp_path: Path, name: str) -> None:
    """The whole pipeline on each tiny form; the generation check against transformers'
    Phi3ForCausalLM (which uses lm_head.weight) and the head's fingerprint show the untied
    head was exported, not the embedding."""
    from anechain.build import run_build
    from anechain.contract import read_package_metadata

    config = load_preset(name)
    config = dataclasses.replace(config, build=dataclasses.replace(config.build, max_new_tokens=8))
    result = run_build(config, tmp_path / "out", backend="mil", cache_dir=tmp_path / "cache")
    assert result.passed, [(a.name, a.report.failed_gates()) for a in result.artifacts if a.report]
    assert result.generation is not None and result.generation.passed
    ckpt = Checkpoint(result.checkpoint)
    meta = read_package_metadata(tmp_path / "out" / "head.mlpackage")
    untied = ckpt.weights_fingerprint(["model.norm.weight", "lm_head.weight"])
    tied = ckpt.weights_fingerprint(["model.norm.weight", "model.embed_tokens.weight"])
    assert meta.weights_fingerprint == untied != tied
