"""The real trained SmolLM2-135M through anechain: one `build` of configs/smollm2.yaml (INT8,
three 10-layer shards with prefill, the head, the embedding, the manifest, generation against
transformers' Phi3ForCausalLM over the same imported folder), shared by the file; its
reports and manifest are what the tests judge. A seeded bug in a shard built from the same
weights must be rejected. The figures are in scripts/bench_real.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from anechain.build import run_build
from anechain.checkpoint import Checkpoint
from anechain.cli import cli
from anechain.config import Config, LayerRange, load_config
from anechain.manifest import load_manifest, verify_manifest
from anechain.report import gate_specs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"


def _config() -> Config:
    # Context 128 instead of 256: the late window's cache prefix halves; the chat prompt
    # (37 tokens) and 16 new ones fit.
    config = load_config(CONFIG)
    return dataclasses.replace(
        config, export=dataclasses.replace(config.export, context_length=128)
    )


@pytest.fixture(scope="module")
def smollm2_build(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint_dir: Path):
    out = tmp_path_factory.mktemp("smollm2-build")
    cache = tmp_path_factory.mktemp("smollm2-golden")
    return run_build(_config(), out, smollm2_checkpoint_dir, backend="mil", cache_dir=cache)


def test_every_shard_and_the_head_pass_every_gate(smollm2_build) -> None:
    result = smollm2_build
    names = [a.name for a in result.artifacts]
    assert names == ["0:10", "10:20", "20:30", "head", "embedding"]
    for a in result.artifacts:
        if a.report is None:
            continue
        gates = {g.name: g for g in a.report.gates}
        # Every mandatory gate of the package's kind was applied (whatever the set grows to).
        assert {s.name for s in gate_specs(a.report.kind, a.report.meta.functions)} <= set(gates)
        failed = [g.describe() for g in gates.values() if not g.passed]
        assert failed == [], f"{a.name}: {failed}"
        assert a.report.verdict == "pass"
    layers = [a.report for a in result.artifacts[:3]]
    assert all(r.prefill is not None for r in layers)  # prefill_tokens 16: two functions
    head = result.artifacts[3].report
    assert head.golden.metrics["top1_agreement"] >= 0.99


def test_manifest_is_built_and_verifies(smollm2_build, error_line) -> None:
    result = smollm2_build
    checks = verify_manifest(result.manifest)
    m = load_manifest(result.manifest)
    # 3 shards, the head, the embedding and every tokenizer file copied beside the manifest.
    assert m.tokenizer is not None and len(m.tokenizer.files) >= 2
    assert sum(c.name == "sha256" for c in checks) == 5 + len(m.tokenizer.files)
    assert [str(s.layers) for s in m.shards] == ["0:10", "10:20", "20:30"]
    assert m.model.architecture.num_hidden_layers == 30
    assert m.embedding is not None and m.embedding.shape == (49152, 576)
    run = CliRunner().invoke(cli, ["manifest", "verify", str(result.manifest)])
    assert run.exit_code == 0, run.output


def test_generation_agrees_with_transformers(smollm2_build, smollm2_checkpoint_dir) -> None:
    """The chat prompt through the folder's tokenizer; the chain answers the question, and
    teacher-forced over every prompt and generated position it picks transformers' token
    except at near-ties."""
    from transformers import AutoTokenizer

    g = smollm2_build.generation
    assert g is not None and g.passed, g.to_dict() if g else None
    assert g.prompt_text is not None and "capital of France" in g.prompt_text
    assert "<|im_start|>assistant" in g.prompt_text  # the chat template was applied
    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint_dir))
    assert "Paris" in tok.decode(g.tokens)
    assert len(g.prompt) + len(g.tokens) >= 48  # enough positions that one tie cannot decide
    assert g.agreement >= g.min_agreement and g.max_flip_margin <= g.bound
    assert all(f["margin"] <= g.bound for f in g.flips)


def test_generate_command_continues_text_as_transformers(
    smollm2_build, smollm2_checkpoint_dir: Path
) -> None:
    """`anechain generate --prompt TEXT` over the manifest (its own copy of the tokenizer):
    transformers' greedy tokens for the same ids, streamed as text."""
    from transformers import AutoTokenizer

    from anechain.runtime import transformers_greedy

    text = "The capital of France is"
    run = CliRunner().invoke(
        cli,
        [
            "generate",
            "--manifest",
            str(smollm2_build.manifest),
            "--prompt",
            text,
            "--max-new-tokens",
            "4",
            "--backend",
            "mil",
        ],
    )
    assert run.exit_code == 0, run.output
    tokens = [int(t) for t in run.stderr.split("new: ")[1].split(";")[0].split(",")]
    ids = AutoTokenizer.from_pretrained(str(smollm2_checkpoint_dir)).encode(text)
    assert tokens == transformers_greedy(smollm2_checkpoint_dir, ids, 4)
    assert run.stdout.strip().startswith("Paris")


def test_generation_check_rejects_a_broken_chain_on_the_real_model(smollm2_build, monkeypatch):
    """Every step fed position 0's RoPE: the chain still runs, and the check fails."""
    import anechain.build as build
    import anechain.runtime as runtime

    result = smollm2_build
    real = runtime.step_inputs
    monkeypatch.setattr(
        runtime,
        "step_inputs",
        lambda rope, h, p, n: {
            **real(rope, h, p, n),
            **{k: v for k, v in real(rope, h, 0, n).items() if k in ("cos", "sin")},
        },
    )
    config = _config()  # 4 new tokens are enough to see it, and quicker
    config = dataclasses.replace(config, build=dataclasses.replace(config.build, max_new_tokens=4))
    check = build._check_generation(
        config, result.manifest, result.checkpoint, 49152, "mil", lambda m: None
    )
    assert not check.passed and check.max_flip_margin > check.bound


@pytest.mark.parametrize("mutant", [None, "neighbour", "qk_gguf"])
def test_a_shard_with_a_seeded_bug_is_rejected(
    mutant: str | None, smollm2_checkpoint_dir: Path, tmp_path: Path
) -> None:
    """Two layers of the real model (10:12) exported from altered weights, validated against
    the real ones with the default gates (decode only, to keep it short); unaltered, the same
    shard passes."""
    from contextlib import nullcontext

    from tests.real_mutants import seeded

    from anechain.export import LayerSpec, export_shard
    from anechain.validate import validate_shard

    config = _config()
    ckpt = Checkpoint(smollm2_checkpoint_dir)
    settings = dataclasses.replace(config.export, prefill_tokens=0)
    spec = LayerSpec(LayerRange(10, 12), tmp_path / "layers_10_12.mlpackage")
    with seeded(mutant, ckpt, layer=10) if mutant else nullcontext():
        export_shard(ckpt, spec, settings)
    report = validate_shard(spec.path, ckpt, config.validation, backend="mil")
    failed = report.failed_gates()
    if mutant is None:
        assert failed == [], report.failures()
    else:
        # Output cosine alone misses both (measured 0.9998+: the massive channels dominate
        # it); the relative error and the KV cache do not.
        assert {"rmse", "kv_cosine"} <= set(failed), report.failures()


# --- the generation check's prompt ------------------------------------------------------


def test_build_prompt_follows_the_checkpoint_folder(
    tiny_config: Config, tiny_checkpoint_dir: Path, smollm2_checkpoint_dir: Path, tmp_path: Path
) -> None:
    """Explicit ids first; else the text through the folder's tokenizer (its chat template
    when it has one); else ids drawn with the seed. A tokenizer that does not fit the model
    is refused."""
    import shutil

    from tests.conftest import save_offline_tokenizer
    from transformers import AutoTokenizer

    from anechain.build import generation_prompt
    from anechain.checkpoint import copy_checkpoint
    from anechain.errors import CheckpointError

    ids, text = generation_prompt(tiny_config, tiny_checkpoint_dir, 512)
    assert len(ids) == 8 and text is None and all(0 <= t < 512 for t in ids)
    explicit = dataclasses.replace(
        tiny_config, build=dataclasses.replace(tiny_config.build, prompt_tokens=(5, 6, 7))
    )
    assert generation_prompt(explicit, tiny_checkpoint_dir, 512) == ([5, 6, 7], None)

    plain = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "plain")
    save_offline_tokenizer(plain, 512)
    config = dataclasses.replace(
        tiny_config, build=dataclasses.replace(tiny_config.build, prompt="The quick brown fox")
    )
    ids, text = generation_prompt(config, plain, 512)
    assert text == "The quick brown fox"
    assert ids == AutoTokenizer.from_pretrained(str(plain))(text)["input_ids"]

    ids, text = generation_prompt(tiny_config, smollm2_checkpoint_dir, 49152)
    assert text is not None and "<|im_start|>user\nWhat is the capital of France?" in text
    assert text.endswith("<|im_start|>assistant\n")
    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint_dir))
    assert tok.decode(ids) == text

    mismatched = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "mismatched")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_checkpoint_dir / name, mismatched / name)
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        generation_prompt(tiny_config, mismatched, 512)
