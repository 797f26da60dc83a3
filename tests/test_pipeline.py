"""Closing the loop: head, embedding, generate over the manifest, and `anechain build`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from anechain.build import run_build
from anechain.cli import cli
from anechain.contract import read_package_metadata
from anechain.export import program_op_counts
from anechain.head import reduce_chunks
from anechain.manifest import load_manifest, verify_manifest
from anechain.package import load_program
from anechain.residency import expected_live_status
from anechain.runtime import transformers_greedy


def test_build_passes_end_to_end(tiny_build):
    result, _ = tiny_build
    assert result.passed
    names = [a.name for a in result.artifacts]
    assert names == ["0:3", "3:5", "5:6", "head", "embedding"]
    assert all(a.report.verdict == "pass" for a in result.artifacts if a.report)
    assert not any(a.reused for a in result.artifacts)
    checks = verify_manifest(result.manifest)
    assert sum(c.name == "sha256" for c in checks) == 5  # 3 shards, head, embedding
    m = load_manifest(result.manifest)
    assert m.head is not None and m.embedding is not None
    assert m.embedding.shape == (512, 64) and m.rope.precomputed is not None


def test_build_residency_follows_the_machine(tiny_build):
    """Not checked off macOS, counted without a gate on a Mac without a Neural Engine,
    checked (and passed) on one: the predicate the code itself applies."""
    result, _ = tiny_build
    reports = [a.report for a in result.artifacts if a.report is not None]
    assert len(reports) == 4
    for report in reports:
        assert report.residency["status"] == expected_live_status()


def test_generate_matches_transformers_greedy_exactly(tiny_build, tiny_checkpoint_dir):
    """INT8 shards, the config's default prompt: the same 16 tokens as transformers (fp32).

    On this flat random model INT8 rounding flips near-ties for some prompts (see the fp16
    test below and the teacher-forced check); the default prompt has no such tie.
    """
    result, _ = tiny_build
    prompt = result.generation.prompt
    assert len(prompt) == 8
    run = CliRunner().invoke(
        cli,
        [
            "generate",
            "--manifest",
            str(result.manifest),
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "16",
            "--backend",
            "mil",
            "--profile",
        ],
    )
    assert run.exit_code == 0, run.output
    tokens = [int(t) for t in run.stdout.strip().split(",")]
    assert len(tokens) == 16
    assert tokens == transformers_greedy(tiny_checkpoint_dir, prompt, 16)
    assert "tok/s" in run.stderr and "head predict+reduce" in run.stderr
    # The build's own check agreed too.
    assert result.generation.exact and result.generation.passed


def test_fp16_chain_matches_transformers_on_several_prompts(
    tiny_checkpoint_dir, tiny_config, tmp_path
):
    """Without INT8 rounding, the chain itself (embedding, states, RoPE, head, reduce) gives
    transformers' tokens for every prompt tried."""
    import dataclasses

    config = dataclasses.replace(
        tiny_config, export=dataclasses.replace(tiny_config.export, quantization="none")
    )
    result = run_build(
        config, tmp_path / "fp16", tiny_checkpoint_dir, backend="mil", cache_dir=tmp_path / "c"
    )
    assert result.passed
    from anechain.runtime import ManifestRuntime

    runtime = ManifestRuntime(result.manifest, backend="mil")
    for seed in (0, 1, 2):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(0, 512, size=8)]
        assert runtime.generate(prompt, 16).tokens == transformers_greedy(
            tiny_checkpoint_dir, prompt, 16
        ), f"prompt seed {seed}"


def test_generation_check_catches_a_broken_chain(tiny_build, tiny_config, monkeypatch):
    """Feeding every step the RoPE of position 0 (a plausible runtime bug) fails the check."""
    import anechain.build as build
    import anechain.runtime as runtime

    result, _ = tiny_build
    real = runtime.step_inputs
    monkeypatch.setattr(
        runtime,
        "step_inputs",
        lambda rope, h, p, n: {
            **real(rope, h, p, n),
            **{k: v for k, v in real(rope, h, 0, n).items() if k in ("cos", "sin")},
        },
    )
    check = build._check_generation(
        tiny_config, result.manifest, result.checkpoint, 512, "mil", lambda m: None
    )
    assert not check.passed and check.agreement < 0.9


def test_second_build_reuses_everything(tiny_build, tiny_config, tiny_checkpoint_dir, monkeypatch):
    import anechain.build as build

    result, cache = tiny_build
    calls = []
    monkeypatch.setattr(build, "export_shard", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(build, "validate_shard", lambda *a, **k: calls.append(a))
    again = run_build(
        tiny_config, result.out_dir, tiny_checkpoint_dir, backend="mil", cache_dir=cache
    )
    assert calls == [] and again.passed
    assert all(a.reused for a in again.artifacts)


def test_a_changed_shard_is_rebuilt_not_reused(
    tiny_build, tiny_config, tiny_checkpoint_dir, tmp_path
):
    result, cache = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    weights = out / "layers_3_5.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = run_build(tiny_config, out, tiny_checkpoint_dir, backend="mil", cache_dir=cache)
    reused = {a.name: a.reused for a in again.artifacts}
    assert reused == {"0:3": True, "3:5": False, "5:6": True, "head": True, "embedding": True}
    assert again.passed


def test_generate_refuses_an_altered_shard(tiny_build, tmp_path):
    result, _ = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    weights = out / "layers_0_3.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    run = CliRunner().invoke(
        cli,
        [
            "generate",
            "--manifest",
            str(out / "manifest.json"),
            "--prompt-ids",
            "1,2,3",
            "--backend",
            "mil",
        ],
    )
    assert run.exit_code == 1
    assert "layers_0_3.mlpackage" in run.output and "changed since" in run.output
    assert "Traceback" not in run.output


def test_generate_usage_errors(tiny_build):
    result, _ = tiny_build
    m = str(result.manifest)
    for args, message in (
        ([], "exactly one of --prompt-ids and --prompt"),
        (["--prompt-ids", "1,x"], "not a comma-separated list"),
        (["--prompt", "hi"], "lists no tokenizer"),
    ):
        run = CliRunner().invoke(cli, ["generate", "--manifest", m, *args])
        assert run.exit_code == 2 and message in run.output
    run = CliRunner().invoke(
        cli,
        [
            "generate",
            "--manifest",
            m,
            "--prompt-ids",
            "1",
            "--max-new-tokens",
            "100",
            "--backend",
            "mil",
        ],
    )
    assert run.exit_code == 1 and "exceed the shards' context of 64" in run.output


def test_head_package(tiny_build, tiny_config):
    result, _ = tiny_build
    head = result.out_dir / "head.mlpackage"
    meta = read_package_metadata(head)
    assert meta.kind == "head" and meta.layers is None
    _, prog = load_program(head)
    counts = program_op_counts(prog)
    chunks = -(-512 // tiny_config.export.head_chunk_rows)
    assert counts["conv"] == chunks == counts["constexpr_blockwise_shift_scale"]
    assert counts["reduce_argmax"] == chunks
    for op in prog.functions["main"].operations:
        if op.op_type == "conv":
            assert op.outputs[0].shape[1] <= 16384
    assert [o.shape for o in meta.contract.outputs] == [(1, chunks), (1, chunks)]
    report = json.loads((result.out_dir / "head.report.json").read_text())
    assert report["kind"] == "head" and report["verdict"] == "pass"
    assert {g["name"] for g in report["gates"]} == {
        "finite",
        "top1_agreement",
        "top1_margin",
        "logit_cosine",
    }


def test_real_model_head_is_13_chunks():
    import torch

    from anechain.config import load_preset
    from anechain.model import LMHeadModel

    config = load_preset("phi-4-mini")
    with torch.device("meta"):
        head = LMHeadModel(config.architecture, config.export.head_chunk_rows)
    sizes = [c.out_channels for c in head.chunks]
    assert len(sizes) == 13 and max(sizes) == 16384 and sum(sizes) == 200064


def test_reduce_chunks():
    assert reduce_chunks(np.array([[0.5, 2.0, 1.0]]), np.array([[3, 7, 1]]), 10) == 17
    assert reduce_chunks(np.array([2.0, 2.0]), np.array([4, 9]), 8) == 4  # first chunk wins


def test_build_cli_fails_on_a_failed_gate(tmp_path, tiny_checkpoint_dir, overflow_checkpoint):
    run = CliRunner().invoke(
        cli,
        [
            "build",
            "--config",
            "configs/tiny.yaml",
            "--model",
            str(overflow_checkpoint.path),
            "--out",
            str(tmp_path / "o"),
            "--backend",
            "mil",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
    )
    assert run.exit_code == 1
    assert "FAIL" in run.stdout and "build: FAIL" in run.stdout
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_manifest_guards_head_and_embedding(tiny_build, tmp_path):
    from anechain.errors import ManifestError

    result, _ = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    manifest = out / "manifest.json"
    table = np.load(out / "embedding.npy")
    table[3, 5] += 1
    np.save(out / "embedding.npy", table)
    with pytest.raises(ManifestError, match=r"embedding.npy \(embedding\) changed since"):
        verify_manifest(manifest)
    data = json.loads(manifest.read_text())
    data["head"]["package"]["path"] = "../elsewhere/head.mlpackage"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="head.package"):
        load_manifest(manifest)


def test_changed_gates_or_a_corrupt_report_force_revalidation(
    tiny_build, tiny_config, tiny_checkpoint_dir, tmp_path
):
    import dataclasses

    import anechain.build as build

    result, cache = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    strict = dataclasses.replace(
        tiny_config,
        validation=dataclasses.replace(
            tiny_config.validation,
            gates=dataclasses.replace(tiny_config.validation.gates, min_cosine=0.99999),
        ),
    )
    again = build.run_build(strict, out, tiny_checkpoint_dir, backend="mil", cache_dir=cache)
    # Nothing re-exported, everything re-validated, and the stricter gate now fails 0:3.
    assert [a.reused for a in again.artifacts] == [False] * 4 + [True]
    assert not again.passed and again.artifacts[0].report.verdict == "fail"

    (out / "layers_3_5.report.json").write_text("{")
    fixed = build.run_build(tiny_config, out, tiny_checkpoint_dir, backend="mil", cache_dir=cache)
    assert fixed.passed
    assert {a.name: a.reused for a in fixed.artifacts}["3:5"] is False


def test_a_corrupt_build_cache_is_a_miss_not_a_traceback(
    tiny_build, tiny_config, tiny_checkpoint_dir, tmp_path, monkeypatch
):
    """The cache file cut short: the build says so and makes the first package again."""
    import anechain.build as build
    from anechain.artifacts import CACHE_FILE

    result, cache = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    (out / CACHE_FILE).write_text((out / CACHE_FILE).read_text()[:40])

    class Exported(Exception):
        pass

    def export(checkpoint, spec, settings, **kwargs):
        raise Exported(str(spec.layers))

    monkeypatch.setattr(build, "export_shard", export)
    said: list[str] = []
    with pytest.raises(Exported, match="0:3"):
        run_build(
            tiny_config,
            out,
            tiny_checkpoint_dir,
            backend="mil",
            cache_dir=cache,
            progress=said.append,
        )
    assert said[0] == f"{out / CACHE_FILE} is unreadable: everything in {out} is made again"


def test_build_shows_the_chains_next_token_figure(tiny_build, tiny_config, monkeypatch):
    """Every shard's outputs chained from the embedding, then the reference's norm and head:
    the whole-model KL budget, in the summary; a broken chain (RoPE of position 0 at every
    step) exceeds it and fails the build."""
    import dataclasses

    import anechain.build as build
    import anechain.runtime as runtime
    from anechain.checkpoint import Checkpoint
    from anechain.cli.run import render_build

    result, cache = tiny_build
    chain = result.chain
    assert chain is not None and chain.passed
    assert chain.verdict["positions"] == tiny_config.validation.steps
    assert 0 <= chain.verdict["kl_mean"] <= chain.verdict["kl_worst"] <= chain.max_kl_worst
    assert "chain next-token: KL mean" in render_build(result)
    real = runtime.step_inputs
    monkeypatch.setattr(
        runtime,
        "step_inputs",
        lambda rope, h, p, n: {
            **real(rope, h, p, n),
            **{k: v for k, v in real(rope, h, 0, n).items() if k in ("cos", "sin")},
        },
    )
    broken = build.check_chain(
        tiny_config, result.manifest, Checkpoint(result.checkpoint), "mil", cache, lambda m: None
    )
    assert not broken.passed and broken.verdict["kl_mean"] > chain.max_kl_mean
    assert not dataclasses.replace(result, chain=broken).passed
    lines = render_build(dataclasses.replace(result, chain=broken)).splitlines()
    assert lines[-1] == "build: FAIL"
    assert any(line.startswith("chain next-token") and line.endswith("FAIL") for line in lines)
