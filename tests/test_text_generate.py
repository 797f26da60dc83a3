"""Text in, text out: `generate --prompt/--chat` through the tokenizer the manifest lists.

The model is the real SmolLM2-135M-Instruct cut to its first two decoder layers (the real
embedding, final norm, tied head and tokenizer): a whole model a manifest covers, built in
seconds, whose greedy answer transformers computes on the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from anechain.cli import cli
from anechain.config import load_config
from anechain.tokenizer import TOKENIZER_FOLDER

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2
QUESTION = "What is the capital of France?"


def _cut(src: Path, dst: Path, layers: int) -> Path:
    """`src` with only decoder layers [0, layers): config, weights, tokenizer files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    keep = {}
    for weights in sorted(src.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                parts = name.split(".")
                if parts[:2] == ["model", "layers"] and int(parts[2]) >= layers:
                    continue
                keep[name] = f.get_tensor(name)
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json",) and not f.name.startswith("model"):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def smol_cut(tmp_path_factory, smollm2_checkpoint_dir: Path) -> Path:
    return _cut(smollm2_checkpoint_dir, tmp_path_factory.mktemp("smolcut") / "ckpt", LAYERS)


@pytest.fixture(scope="module")
def smol_config(smol_cut: Path):
    from anechain.checkpoint import Checkpoint

    config = load_config(ROOT / "configs" / "smollm2.yaml")
    return dataclasses.replace(
        config,
        architecture=Checkpoint(smol_cut).architecture,
        export=dataclasses.replace(
            config.export, topology=(f"0:{LAYERS}",), context_length=64, prefill_tokens=8
        ),
        validation=dataclasses.replace(config.validation, steps=8),
    )


@pytest.fixture(scope="module")
def smol_build(tmp_path_factory, smol_cut: Path, smol_config):
    from anechain.build import run_build

    out = tmp_path_factory.mktemp("smolbuild")
    cache = tmp_path_factory.mktemp("smolgolden")
    result = run_build(smol_config, out, smol_cut, backend="mil", cache_dir=cache)
    assert result.passed and result.manifest is not None
    return result


def _generate(manifest: Path, *args: str):
    return CliRunner().invoke(
        cli, ["generate", "--manifest", str(manifest), "--backend", "mil", *args]
    )


def _chat_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_build_lists_and_hashes_the_tokenizer(smol_build, smol_cut: Path) -> None:
    from anechain.manifest import load_manifest, verify_manifest

    m = load_manifest(smol_build.manifest)
    assert m.tokenizer is not None
    names = sorted(Path(f.path).name for f in m.tokenizer.files)
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert all(f.path.startswith(f"{TOKENIZER_FOLDER}/") for f in m.tokenizer.files)
    for f in m.tokenizer.files:
        assert (smol_build.manifest.parent / f.path).read_bytes() == (
            smol_cut / Path(f.path).name
        ).read_bytes()
    # config.json's eos_token_id 2 (<|im_end|>), which is also the tokenizer's eos.
    assert m.tokenizer.eos_token_ids == (2,)
    hashed = [c.detail for c in verify_manifest(smol_build.manifest) if c.name == "sha256"]
    assert {f.path for f in m.tokenizer.files} <= set(hashed)


def test_chat_streams_transformers_greedy_answer(smol_build, smol_cut: Path) -> None:
    from transformers import AutoTokenizer

    from anechain.runtime import transformers_greedy

    n = 12
    run = _generate(smol_build.manifest, "--chat", "--prompt", QUESTION, "--max-new-tokens", str(n))
    assert run.exit_code == 0, run.output
    text = run.stdout.removesuffix("\n")
    reference = transformers_greedy(smol_cut, _chat_ids(smol_cut), n)
    tok = AutoTokenizer.from_pretrained(str(smol_cut))
    new = [int(t) for t in run.stderr.split("new: ")[1].split(";")[0].split(",")]
    assert new == reference[: len(new)]
    assert text == tok.decode(new, skip_special_tokens=True)
    assert text.strip()  # the answer is text, not ids


def test_streaming_prints_each_piece_as_it_comes(smol_cut: Path) -> None:
    """Multi-byte characters split over byte tokens print whole, each once, in order."""
    from transformers import AutoTokenizer

    from anechain.tokenizer import text_streamer

    tok = AutoTokenizer.from_pretrained(str(smol_cut))
    sentence = "Paris — café naïve 東京 🙂 done."
    ids = tok.encode(sentence)
    pieces: list[str] = []
    stream = text_streamer(tok, pieces.append)
    for t in ids:
        stream(t)
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    assert len(pieces) > 3  # streamed, not printed once at the end


def test_generation_stops_at_eos(smol_build, smol_cut: Path, tmp_path: Path) -> None:
    """eos_token_id as a list (as Phi-3's config has): generation stops after the first
    eos the model emits, here the third greedy token made an eos."""
    from anechain.runtime import transformers_greedy

    ids = _chat_ids(smol_cut)
    reference = transformers_greedy(smol_cut, ids, 6)
    third = reference[2]
    assert third not in reference[:2]
    folder = tmp_path / "eos-ckpt"
    shutil.copytree(smol_cut, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [2, third]
    (folder / "config.json").write_text(json.dumps(config))
    out = smol_build.manifest.parent
    manifest = out / "manifest_eos.json"
    # The config the build validated with (smol_config: 8 steps); smollm2.yaml asks for 16.
    built_with = tmp_path / "smol.yaml"
    text = (ROOT / "configs" / "smollm2.yaml").read_text()
    assert "  steps: 16\n" in text
    built_with.write_text(text.replace("  steps: 16\n", "  steps: 8\n"))
    run = CliRunner().invoke(
        cli,
        [
            "manifest",
            "build",
            *(str(p) for p in sorted(out.glob("*.mlpackage"))),
            "--embedding",
            str(out / "embedding.npy"),
            "--tokenizer",
            str(folder),
            "--config",
            str(built_with),
            "-o",
            str(manifest),
        ],
    )
    assert run.exit_code == 0, run.output
    assert "tokenizer (3 files)" in run.stdout
    run = _generate(manifest, "--chat", "--prompt", QUESTION, "--max-new-tokens", "6")
    assert run.exit_code == 0, run.output
    assert f"new: {','.join(map(str, reference[:3]))};" in run.stderr
    assert "stopped at eos" in run.stderr
    # Without the eos the same run goes on to the limit (the stop is what ended it).
    run = _generate(smol_build.manifest, "--chat", "--prompt", QUESTION, "--max-new-tokens", "6")
    assert f"new: {','.join(map(str, reference))};" in run.stderr


def test_edited_tokenizer_is_refused(smol_build, tmp_path: Path, error_line) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(smol_build.manifest.parent, copy)
    manifest = copy / smol_build.manifest.name
    config = copy / TOKENIZER_FOLDER / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|im_end|>", "<|endoftext|>", 1))
    run = CliRunner().invoke(cli, ["manifest", "verify", str(manifest)])
    line = error_line(run, 1)
    assert "tokenizer/tokenizer_config.json (tokenizer) changed since" in line
    run = _generate(manifest, "--prompt", "Hi")
    assert "tokenizer/tokenizer_config.json (tokenizer) changed since" in error_line(run, 1)
    # Removed outright: missing, named.
    (copy / TOKENIZER_FOLDER / "tokenizer.json").unlink()
    run = CliRunner().invoke(cli, ["manifest", "verify", str(manifest)])
    assert "tokenizer/tokenizer.json (tokenizer) is missing" in error_line(run, 1)


def test_prompt_needs_a_listed_tokenizer(tiny_build, error_line) -> None:
    """The tiny random checkpoint has no tokenizer: --prompt is a usage error saying so,
    before anything runs; --prompt-ids still works."""
    result, _ = tiny_build
    run = _generate(result.manifest, "--prompt", "hi")
    assert "lists no tokenizer" in error_line(run, 2)
    run = _generate(result.manifest, "--prompt-ids", "1,2", "--chat")
    assert "--chat applies to --prompt" in error_line(run, 2)
    run = _generate(result.manifest, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert run.exit_code == 0 and len(run.stdout.strip().split(",")) == 2


def test_another_models_tokenizer_is_refused_before_anything_is_written(
    tiny_build, smol_cut: Path, tmp_path: Path, error_line
) -> None:
    """SmolLM2's tokenizer (49152 tokens) for the tiny model (512): its prompts would index
    rows the embedding does not have. The model's own tokenizer (the smol build) passes."""
    result, _ = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    manifest = out / "manifest_tok.json"
    run = CliRunner().invoke(
        cli,
        [
            "manifest", "build", *(str(p) for p in sorted(out.glob("*.mlpackage"))),
            "--embedding", str(out / "embedding.npy"), "--tokenizer", str(smol_cut),
            "--config", str(ROOT / "configs" / "tiny.yaml"), "-o", str(manifest),
        ],
    )  # fmt: skip
    line = error_line(run, 1)
    assert "has 49152 tokens but the model's vocabulary has 512" in line
    assert not manifest.exists() and not (out / TOKENIZER_FOLDER).exists()
