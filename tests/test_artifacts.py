"""The one artifact cache `build` and `plan` share: what invalidates an artifact or a verdict,
what reuses it, and a corrupt cache file (a miss, never a traceback).

Keys are computed on the tiny checkpoint; packages are fake folders with reports written by
anechain.report's class, so nothing is exported here (the pipeline and plan tests reuse real
packages through the same module)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tests.fakes.reports import edit_json, fake_package, layer_report

from anechain.artifacts import CACHE_FILE, ArtifactCache, InputKeys, VerdictInputs
from anechain.checkpoint import Checkpoint
from anechain.config import Config, LayerRange, ResidencySettings

R = LayerRange(0, 3)


def how(config: Config, **changes: object) -> VerdictInputs:
    base = VerdictInputs(config.validation, "mil", ResidencySettings(), False, "not_checked")
    return dataclasses.replace(base, **changes)


def stricter(config: Config, **gates: float):
    g = dataclasses.replace(config.validation.gates, **gates)
    return dataclasses.replace(config.validation, gates=g)


def test_export_key_changes_with_checkpoint_settings_and_range_only(
    tiny_checkpoint: Checkpoint, overflow_checkpoint: Checkpoint, tiny_config: Config
) -> None:
    keys = InputKeys(tiny_checkpoint)
    export = tiny_config.export
    key = keys.export_key("layers", R, export)
    assert keys.export_key("layers", R, export) == key  # unchanged: reused
    assert InputKeys(Checkpoint(tiny_checkpoint.path)).export_key("layers", R, export) == key
    # The topology list is the plan's output, not an input of one shard.
    assert keys.export_key("layers", R, dataclasses.replace(export, topology=("0:6",))) == key
    changed = {
        "quantization": keys.export_key(
            "layers", R, dataclasses.replace(export, quantization="none")
        ),
        "context": keys.export_key("layers", R, dataclasses.replace(export, context_length=128)),
        "range": keys.export_key("layers", LayerRange(0, 2), export),
        "checkpoint": InputKeys(overflow_checkpoint).export_key("layers", R, export),
        "head": keys.export_key("head", None, export),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed)


def test_verdict_key_changes_with_gates_backend_residency_package_and_reference(
    tiny_checkpoint: Checkpoint, overflow_checkpoint: Checkpoint, tiny_config: Config
) -> None:
    keys = InputKeys(tiny_checkpoint)
    base = how(tiny_config)
    key = keys.verdict_key("sha-a", R, base)
    assert keys.verdict_key("sha-a", R, how(tiny_config)) == key
    changed = {
        "gate": keys.verdict_key(
            "sha-a", R, how(tiny_config, validation=stricter(tiny_config, min_cosine=0.999))
        ),
        "steps": keys.verdict_key(
            "sha-a",
            R,
            how(tiny_config, validation=dataclasses.replace(tiny_config.validation, steps=8)),
        ),
        "backend": keys.verdict_key("sha-a", R, how(tiny_config, backend="coreml")),
        "residency": keys.verdict_key(
            "sha-a", R, how(tiny_config, residency=ResidencySettings(strict=False))
        ),
        "report_only": keys.verdict_key("sha-a", R, how(tiny_config, residency_report_only=True)),
        "live": keys.verdict_key("sha-a", R, how(tiny_config, residency_live="checked")),
        "package": keys.verdict_key("sha-b", R, base),
        "checkpoint": InputKeys(overflow_checkpoint).verdict_key("sha-a", R, base),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed)


def test_the_reference_of_a_later_range_depends_on_the_layers_before_it(
    tiny_checkpoint: Checkpoint, overflow_checkpoint: Checkpoint, tiny_config: Config
) -> None:
    """overflow_checkpoint differs in layer 4 only: the export of 5:6 holds the same weights,
    but its reference input comes out of layer 4, so its verdict must not be reused."""
    a, b = InputKeys(tiny_checkpoint), InputKeys(overflow_checkpoint)
    late = LayerRange(5, 6)
    assert a._holds("layers", late) == b._holds("layers", late)
    assert a.verdict_key("sha", late, how(tiny_config)) != b.verdict_key(
        "sha", late, how(tiny_config)
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    pkg = fake_package(tmp_path, "layers_0_3", b"weights")
    layer_report(pkg, "0:3").write(tmp_path / "layers_0_3.report.json")
    return tmp_path


def test_cache_reuses_an_unchanged_artifact_and_its_verdict(folder: Path) -> None:
    pkg = folder / "layers_0_3.mlpackage"
    cache = ArtifactCache(folder)
    assert not cache.found and cache.exported(pkg, "k") is None
    sha = cache.record_export(pkg, "k")
    cache.record_verdict(pkg, "v")
    again = ArtifactCache(folder)  # as a later run reads it
    assert again.found and again.knows(pkg)
    assert again.exported(pkg, "k") == sha
    verdict = again.verdict(pkg, "v")
    assert verdict is not None and verdict.report is not None
    assert verdict.report.verdict == "pass" and verdict.report.package_sha256 == sha
    # Other inputs, or another verdict key: a miss.
    assert again.exported(pkg, "other") is None and again.verdict(pkg, "other") is None


def test_a_changed_artifact_or_a_forged_report_is_not_reused(folder: Path) -> None:
    pkg = folder / "layers_0_3.mlpackage"
    cache = ArtifactCache(folder)
    cache.record_export(pkg, "k")
    cache.record_verdict(pkg, "v")
    edit_json(folder / "layers_0_3.report.json", lambda d: d["gates"].pop())
    assert cache.verdict(pkg, "v") is None  # read like manifest build reads it
    (pkg / "Manifest.json").write_text("{}")
    assert cache.exported(pkg, "k") is None
    # Re-exporting replaces the entry: the old verdict no longer stands.
    cache.record_export(pkg, "k")
    assert cache.verdict(pkg, "v") is None


def test_failures_are_cached_under_their_inputs(folder: Path) -> None:
    pkg = folder / "layers_0_3.mlpackage"
    cache = ArtifactCache(folder)
    cache.record_export_failure(pkg, "k", "export failed: out of memory")
    assert ArtifactCache(folder).export_failure(pkg, "k") == "export failed: out of memory"
    assert ArtifactCache(folder).export_failure(pkg, "other") is None
    cache.record_export(pkg, "k")
    cache.record_verdict(pkg, "v", failure="compile failed: ANECompilerService")
    verdict = ArtifactCache(folder).verdict(pkg, "v")
    assert verdict is not None and verdict.failure == "compile failed: ANECompilerService"
    cache.record_verdict(pkg, "v")  # validated after all
    verdict = ArtifactCache(folder).verdict(pkg, "v")
    assert verdict is not None and verdict.failure is None and verdict.report is not None


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"schema": "anechain.plan-cache/1", "entries": {}}',
        '{"schema": "anechain.artifact-cache/1", "entries": []}',
        "\udcff",
    ],
    ids=["truncated", "list", "other-schema", "entries-not-a-map", "not-utf8"],
)
def test_a_corrupt_cache_file_is_a_miss(folder: Path, text: str) -> None:
    pkg = folder / "layers_0_3.mlpackage"
    ArtifactCache(folder).record_export(pkg, "k")
    path = folder / CACHE_FILE
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    said: list[str] = []
    cache = ArtifactCache(folder, said.append)
    assert cache.found and cache.entries == {}
    assert cache.exported(pkg, "k") is None and cache.verdict(pkg, "v") is None
    assert said == [f"{path} is unreadable: everything in {folder} is made again"]
    cache.record_export(pkg, "k")  # and the next record repairs it
    assert json.loads(path.read_text())["entries"]["layers_0_3.mlpackage"]["export_key"] == "k"
