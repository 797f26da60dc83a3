"""`generate` with prefill on the mil runner: the same tokens as decode-only generation and,
with fp16 weights, as transformers' greedy generation; the profile reports both phases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

import anechain.runtime as runtime_module
from anechain.build import run_build
from anechain.cli import cli
from anechain.manifest import load_manifest
from anechain.manifest_render import render_manifest
from anechain.runtime import ManifestRuntime, transformers_greedy


@pytest.fixture(scope="module")
def fp16_build(tmp_path_factory, tiny_config, tiny_checkpoint_dir):
    """The tiny pipeline with fp16 weights and the preset's prefill (T = 4)."""
    config = dataclasses.replace(
        tiny_config, export=dataclasses.replace(tiny_config.export, quantization="none")
    )
    out = tmp_path_factory.mktemp("fp16-prefill")
    result = run_build(config, out, tiny_checkpoint_dir, backend="mil", cache_dir=out / "cache")
    assert result.passed
    return result


def prompt(seed: int, n: int = 10) -> list[int]:  # 10 = 4 + 4 + 2: three chunks, one partial
    return [int(t) for t in np.random.default_rng(seed).integers(0, 512, size=n)]


def test_manifest_records_and_shows_the_functions(fp16_build):
    m = load_manifest(fp16_build.manifest)
    assert [s.functions for s in m.shards] == [{"decode": 1, "prefill": 4}] * 3
    assert "decode+prefill(T=4)" in render_manifest(m)


def test_prefill_generation_equals_decode_only_and_transformers(
    fp16_build, tiny_checkpoint_dir, monkeypatch
):
    with_prefill = ManifestRuntime(fp16_build.manifest, backend="mil")
    decode_only = ManifestRuntime(fp16_build.manifest, backend="mil", prefill=False)
    assert with_prefill.prefill_tokens == 4 and decode_only.prefill_tokens == 0
    calls = []
    real = runtime_module.chunk_inputs
    monkeypatch.setattr(runtime_module, "chunk_inputs", lambda *a: calls.append(a[2:4]) or real(*a))
    for seed in (0, 1):
        p = prompt(seed)
        got = with_prefill.generate(p, 8)
        assert got.profile.prefill_tokens == 10
        assert got.tokens == decode_only.generate(p, 8).tokens
        assert got.tokens == transformers_greedy(tiny_checkpoint_dir, p, 8), f"seed {seed}"
    # Each of the 3 shards saw chunks at 0, 4 and 8 (partial), for each prompt.
    assert calls == [(offset, 4) for offset in (0, 4, 8) for _ in range(3)] * 2


def test_a_broken_prefill_changes_the_tokens(fp16_build, monkeypatch):
    """The comparison above can fail: prefill chunks written one position too late."""
    real = runtime_module.chunk_inputs
    monkeypatch.setattr(
        runtime_module,
        "chunk_inputs",
        lambda rope, h, offset, t, n: real(rope, h, offset + 1, t, n),
    )
    runtime = ManifestRuntime(fp16_build.manifest, backend="mil")
    decode_only = ManifestRuntime(fp16_build.manifest, backend="mil", prefill=False)
    differ = [
        runtime.generate(prompt(s), 8).tokens != decode_only.generate(prompt(s), 8).tokens
        for s in (0, 1, 2)
    ]
    assert any(differ)


def test_generate_cli_profiles_prefill_and_decode(fp16_build):
    ids = ",".join(map(str, prompt(3)))
    args = ["generate", "--manifest", str(fp16_build.manifest), "--prompt-ids", ids]
    args += ["--max-new-tokens", "4", "--backend", "mil", "--profile"]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    assert "prompt 10 tokens (10 by prefill, T=4)" in run.stderr
    assert "time to first token" in run.stderr and "decode" in run.stderr
    off = CliRunner().invoke(cli, [*args, "--no-prefill"])
    assert off.exit_code == 0 and off.stdout == run.stdout
    assert "prompt 10 tokens (0 by prefill, T=-)" in off.stderr


def test_manifest_refuses_forged_prefill_reports(fp16_build, tmp_path):
    """A report naming a prefill function without its validation, or with malformed
    functions, does not enter a manifest."""
    import json

    from anechain.errors import ManifestError
    from anechain.manifest_build import build_manifest

    out = fp16_build.out_dir
    report = json.loads((out / "layers_0_3.report.json").read_text())
    others = [out / "layers_3_5.report.json", out / "layers_5_6.report.json"]
    for change, message in (
        ({"prefill": None}, "names a prefill function but has no prefill validation"),
        ({"functions": {"decode": 1, "prefill": "4"}}, "'functions' is not name -> tokens"),
    ):
        forged = out / "layers_0_3.forged.json"
        forged.write_text(json.dumps({**report, **change}))
        with pytest.raises(ManifestError, match=message):
            build_manifest([forged, *others], out / "forged-manifest.json", overwrite=True)
    forged.write_text(json.dumps(report))  # unchanged: accepted
    m = build_manifest([forged, *others], out / "forged-manifest.json", overwrite=True)
    assert m.shards[0].prefill_tokens == 4
