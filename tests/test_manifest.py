"""The runtime manifest: build from validation reports, load, verify, show, and the CLI.

Shards are fake `.mlpackage` folders (a Manifest.json and some bytes) with reports written by
anechain.report's own class (tests/fakes/reports.py); build never loads a Core ML model.
Forged reports are those files edited as a user with an editor would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from tests.fakes.reports import (
    TINY,
    edit_json,
    fake_package,
    make_head,
    make_shard,
    make_shards,
)

from anechain.cli.manifest import COMMANDS, manifest_group
from anechain.config import Architecture, LayerRange, ValidationSettings
from anechain.contract import MASK_VALUE, layer_contract
from anechain.errors import ManifestError, ReportError
from anechain.fsutil import sha256_tree
from anechain.manifest import Manifest, load_manifest, manifest_schema, verify_manifest
from anechain.manifest_build import build_manifest
from anechain.manifest_render import render_manifest
from anechain.shards import ShardRecord, coverage_problems, topology_problems

DATA = Path(__file__).parent / "data"

PHI4 = {
    **TINY,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "vocab_size": 200064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
}
PHI4_RANGES = ["0:8", "8:16", "16:24", "24:30", "30:32"]


# ---- build: valid topologies ----------------------------------------------------------------


def test_build_phi4_asymmetric_topology_in_any_order(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, PHI4_RANGES, arch=PHI4, context=2048)
    m = build_manifest(list(reversed(reports)), tmp_path / "manifest.json")

    assert [str(s.layers) for s in m.shards] == PHI4_RANGES
    assert m.model.num_hidden_layers == 32 and m.context_length == 2048
    assert m.model.checkpoint_fingerprint == "ckpt-a"
    assert m.shards[3].states[0].shape == (6, 8, 2048, 128)
    assert m.rope.rotary_dim == 96 and m.rope.precomputed is None
    assert (m.mask.attended_value, m.mask.masked_value) == (0.0, MASK_VALUE) == (0.0, -30000.0)
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    data = json.loads(text)
    assert data["schema_version"] == 2
    assert [s["package"]["path"] for s in data["shards"]][:2] == [
        "layers_0_8.mlpackage",
        "layers_8_16.mlpackage",
    ]
    assert data["shards"][0]["package"]["sha256"] == sha256_tree(tmp_path / "layers_0_8.mlpackage")
    assert data["shards"][0]["validation"]["residency"]["status"] == "checked"
    assert set(data["versions"]) >= {"anechain", "coremltools", "torch", "transformers"}
    assert data["created"].endswith("Z")


def fake_compile(package: Path) -> Path:
    """A .mlmodelc beside the package with the sidecar `anechain compile` writes."""
    from anechain.compile import SIDECAR_SCHEMA, sidecar_path

    compiled = package.with_suffix(".mlmodelc")
    compiled.mkdir()
    (compiled / "model.mil").write_text("program")
    sidecar_path(compiled).write_text(
        json.dumps({"schema": SIDECAR_SCHEMA, "source_sha256": sha256_tree(package)})
    )
    return compiled


def test_a_compiled_model_not_made_from_the_package_is_refused(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    stale = tmp_path / "layers_0_3.mlmodelc"
    stale.mkdir()
    (stale / "model.mil").write_text("from some other package")
    with pytest.raises(ManifestError, match="layers_0_3.mlmodelc was not compiled from"):
        build_manifest(reports, tmp_path / "m.json")


def test_build_small_topology_from_packages_with_compiled_model(tmp_path: Path) -> None:
    make_shard(tmp_path, "0:3", residency="not_checked")
    make_shard(tmp_path, "3:5", residency="report_only")
    compiled = fake_compile(tmp_path / "layers_3_5.mlpackage")
    packages = [tmp_path / "layers_3_5.mlpackage", tmp_path / "layers_0_3.mlpackage"]
    m = build_manifest(packages, tmp_path / "manifest.json", rope={"inv_freq_short": [1.0]})

    assert [str(s.layers) for s in m.shards] == ["0:3", "3:5"]
    assert m.shards[0].compiled is None
    assert m.shards[1].compiled is not None
    assert m.shards[1].compiled.path == "layers_3_5.mlmodelc"
    assert m.shards[1].compiled.sha256 == sha256_tree(compiled)
    assert [s.validation.residency.status for s in m.shards] == ["not_checked", "report_only"]
    assert m.rope.precomputed == {"inv_freq_short": [1.0]}


def test_shards_in_a_subfolder_get_relative_paths(tmp_path: Path) -> None:
    reports = make_shards(tmp_path / "shards", ["0:2", "2:5"])
    m = build_manifest(reports, tmp_path / "manifest.json")
    assert [s.package.path for s in m.shards] == [
        "shards/layers_0_2.mlpackage",
        "shards/layers_2_5.mlpackage",
    ]


def test_report_paths_relative_to_cwd_or_absolute_are_found(tmp_path: Path) -> None:
    """`anechain validate shard` writes the package path as given on its command line."""
    reports = make_shards(tmp_path / "artifacts", ["0:3", "3:5"])
    edit_json(reports[0], lambda d: d["package"].update(path="artifacts/layers_0_3.mlpackage"))
    absolute = str(tmp_path / "artifacts" / "layers_3_5.mlpackage")
    edit_json(reports[1], lambda d: d["package"].update(path=absolute))
    m = build_manifest(reports, tmp_path / "artifacts" / "manifest.json")
    assert [s.package.path for s in m.shards] == ["layers_0_3.mlpackage", "layers_3_5.mlpackage"]


def test_build_refuses_report_of_another_package(tmp_path: Path) -> None:
    make_shards(tmp_path, ["0:3", "3:5"])
    edit_json(
        tmp_path / "layers_3_5.report.json",
        lambda d: d["package"].update(path="layers_0_3.mlpackage"),
    )
    with pytest.raises(ManifestError, match="describes layers_0_3.mlpackage, not layers_3_5"):
        build_manifest([tmp_path / "layers_3_5.mlpackage"], tmp_path / "manifest.json")


def test_golden_manifest_v2(tmp_path: Path) -> None:
    """The JSON format is stable: a fixed set of fake shards gives tests/data/manifest_v2.json."""
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    build_manifest(reports, tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["created"] = "2026-01-01T00:00:00Z"
    data["versions"] = {
        "anechain": "0.1.0",
        "coremltools": "9.0",
        "torch": "2.13.0",
        "transformers": "5.24.0",
    }
    golden = json.loads((DATA / "manifest_v2.json").read_text())
    assert data == golden
    jsonschema.Draft202012Validator(manifest_schema()).validate(golden)


# ---- build: refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        (
            ["0:2", "3:5"],
            "layers 2:3 are in no shard (gap between layers_0_2.mlpackage (0:2) "
            "and layers_3_5.mlpackage (3:5))",
        ),
        (
            ["0:3", "2:5"],
            "layers_0_3.mlpackage (0:3) and layers_2_5.mlpackage (2:5) overlap at layers 2:3",
        ),
        (["1:5"], "layers 0:1 are in no shard"),
        (["0:4"], "layers 4:5 are in no shard (the last, layers_0_4.mlpackage (0:4), ends at 4"),
    ],
)
def test_build_refuses_bad_coverage(tmp_path: Path, ranges: list[str], message: str) -> None:
    reports = make_shards(tmp_path, ranges)
    with pytest.raises(ManifestError, match="shards do not chain") as err:
        build_manifest(reports, tmp_path / "manifest.json")
    assert message in str(err.value)
    assert not (tmp_path / "manifest.json").exists()


def test_build_refuses_duplicate_range(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    reports.append(make_shard(tmp_path, "3:5", name="copy_3_5"))
    with pytest.raises(
        ManifestError,
        match=r"copy_3_5.mlpackage and layers_3_5.mlpackage both "
        r"hold layers 3:5 \(duplicate range\)",
    ):
        build_manifest(reports, tmp_path / "manifest.json")


def test_build_refuses_the_same_shard_twice(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    with pytest.raises(ManifestError, match=r"layers_0_3.mlpackage \(0:3\) is given twice"):
        build_manifest([*reports, tmp_path / "layers_0_3.mlpackage"], tmp_path / "m.json")


def test_build_refuses_shard_from_another_checkpoint(tmp_path: Path) -> None:
    reports = [make_shard(tmp_path, "0:3"), make_shard(tmp_path, "3:5", fingerprint="ckpt-b")]
    with pytest.raises(
        ManifestError,
        match=r"layers_3_5.mlpackage \(3:5\) is from another "
        r"checkpoint than layers_0_3.mlpackage \(0:3\)",
    ):
        build_manifest(reports, tmp_path / "manifest.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["states"][0].update(name="k_cache"), "another I/O contract"),
        (lambda c: c["inputs"][0].update(dtype="float32"), "inputs.hidden_states.dtype"),
    ],
)
def test_build_refuses_contract_mismatch(tmp_path: Path, change: Any, message: str) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    edit_json(reports[1], lambda r: change(r["contract"]))
    with pytest.raises(ManifestError, match=message) as err:
        build_manifest(reports, tmp_path / "manifest.json")
    assert "layers_3_5.mlpackage (3:5)" in str(err.value)


def test_build_refuses_other_context_length(tmp_path: Path) -> None:
    reports = [make_shard(tmp_path, "0:3"), make_shard(tmp_path, "3:5", context=128)]
    with pytest.raises(
        ManifestError,
        match=r"layers_3_5.mlpackage \(3:5\) has context length "
        r"128, layers_0_3.mlpackage \(0:3\) has 64",
    ):
        build_manifest(reports, tmp_path / "manifest.json")


def test_build_refuses_contract_disagreeing_with_architecture(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    for r in reports:
        edit_json(r, lambda d: d["architecture"].update(partial_rotary_factor=0.5))
    with pytest.raises(ManifestError, match="does not match its architecture"):
        build_manifest(reports, tmp_path / "manifest.json")


def test_build_refuses_failed_gate_naming_it(tmp_path: Path) -> None:
    reports = [
        make_shard(tmp_path, "0:3"),
        make_shard(tmp_path, "3:5", metrics={"delta_cosine": 0.5}),
    ]
    with pytest.raises(ManifestError) as err:
        build_manifest(reports, tmp_path / "manifest.json")
    assert str(err.value).startswith(
        "shard layers_3_5.mlpackage (3:5) failed validation: delta_cosine 0.5 < 0.9"
    )


# ---- forged reports, through the CLI: evidence, not votes ------------------------------------


def _gate(name: str) -> Any:
    """An edit to the named gate of a report's JSON."""

    def at(data: dict[str, Any]) -> dict[str, Any]:
        return next(g for g in data["gates"] if g["name"] == name)

    return at


def _cosine_half_nan_7(d: dict[str, Any]) -> None:
    # What an editor would do: the figures changed, every pass flag left as it was.
    d["golden"]["metrics"].update(cosine=0.5, nonfinite=7)
    _gate("cosine")(d)["value"] = 0.5
    _gate("finite")(d)["value"] = 7


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (lambda d: d.update(gates=[]), "lacks the mandatory layers gate(s) finite, cosine, "),
        (_cosine_half_nan_7, "failed validation: finite 7 > 0, cosine 0.5 < 0.998"),
        (
            lambda d: d["golden"]["metrics"].update(cosine=0.5),
            "is inconsistent: gate cosine has value 0.9995 but golden.metrics.cosine is 0.5",
        ),
        (
            lambda d: _gate("rmse")(d).update(bound=0.5),
            "gate rmse was applied with bound <= 0.5, looser than the required <= 0.2 "
            "(max_rel_rmse)",
        ),
        (
            lambda d: _gate("cosine")(d).update(op="<="),
            "has gate cosine with comparison '<='; it is '>='",
        ),
        (
            lambda d: d["gates"].remove(_gate("delta_cosine")(d)),
            "lacks the mandatory layers gate(s) delta_cosine",
        ),
        (lambda d: d["gates"].append(_gate("rmse")(d)), "lists gate rmse twice"),
        (
            lambda d: d["package"].update(sha256="0" * 64),
            "changed after validation: sha256",
        ),
        (lambda d: d.update(schema="anechain.validation-report/1"), "validate the shard again"),
        (
            lambda d: d["residency"]["counts"].update(conv_ane=4, compute_ane=17, compute_cpu=3),
            "failed validation: residency",
        ),
        (
            lambda d: d["residency"]["gate"].update(strict=False, max_compute_non_ane=99),
            "residency was judged with {'max_compute_non_ane': 99, 'max_plumbing_share': 0.05, "
            "'strict': False}, looser than",
        ),
        (
            lambda d: d["residency"]["plumbing"].update(share_off_ane=0.3),
            "failed validation: residency",
        ),
    ],
    ids=[
        "gates-emptied",
        "cosine-0.5-nonfinite-7",
        "metric-edited-gate-left",
        "bound-loosened",
        "op-flipped",
        "mandatory-gate-missing",
        "gate-twice",
        "other-package-sha",
        "old-schema",
        "residency-counts-off-ane-flag-left-true",
        "residency-gate-loosened",
        "residency-plumbing-share-raised",
    ],
)
def test_cli_refuses_forged_layer_report(tmp_path: Path, forge: Any, message: str) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    edit_json(reports[1], forge)
    out = tmp_path / "manifest.json"
    args = ["build", *(f"--report={r}" for r in reports), "-o", str(out)]
    result = CliRunner().invoke(manifest_group, args)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert message in result.output
    assert "layers_3_5" in result.output  # names the report or the shard
    assert not out.exists()


def test_report_round_trip_recomputes_and_ignores_stored_flags(tmp_path: Path) -> None:
    from anechain.report import ValidationReport
    from anechain.report_read import read_report

    path = make_shard(tmp_path, "0:3", metrics={"delta_cosine": 0.5})
    _, report = read_report(path)
    assert report.verdict == "fail" and report.failed_gates() == ["delta_cosine"]
    assert ValidationReport.from_dict(report.to_dict(), path) == report
    # Flags claiming a pass change nothing: they are never read.
    edit_json(
        path, lambda d: (d.update(verdict="pass"), _gate("delta_cosine")(d).update(passed=True))
    )
    assert read_report(path)[1].failures() == "delta_cosine 0.5 < 0.9"


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (
            lambda d: d["gates"].remove(_gate("top1_agreement")(d)),
            "lacks the mandatory head gate(s) top1_agreement",
        ),
        (
            lambda d: (
                d["golden"]["metrics"].update(top1_agreement=0.2),
                _gate("top1_agreement")(d).update(value=0.2),
            ),
            "failed validation: top1_agreement 0.2 < 0.9",
        ),
    ],
    ids=["top1-removed", "top1-lowered"],
)
def test_cli_refuses_forged_head_report(tmp_path: Path, forge: Any, message: str) -> None:
    reports = [*make_shards(tmp_path, ["0:3", "3:5"]), make_head(tmp_path)]
    args = ["build", *map(str, reports), "-o", str(tmp_path / "m.json")]
    assert CliRunner().invoke(manifest_group, args).exit_code == 0  # unforged, it builds
    edit_json(reports[2], forge)
    result = CliRunner().invoke(manifest_group, [*args, "--overwrite"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and message in result.output
    assert "head" in result.output


def _prefill_off_the_ane(d: dict[str, Any]) -> None:
    # Per-function residency, as residency.package_report writes it: the package's summed
    # counts and its `passed` say pass, the prefill function's own counts do not.
    r = d["residency"]
    decode = {"counts": dict(r["counts"]), "plumbing": dict(r["plumbing"]), "passed": True}
    prefill = {**decode, "counts": {**r["counts"], "conv_ane": r["counts"]["conv_ane"] - 2}}
    r["functions"] = {"decode": decode, "prefill": prefill}


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (
            lambda d: d["gates"].remove(_gate("prefill_kv_keys_cosine")(d)),
            "lacks the mandatory layers gate(s) prefill_kv_keys_cosine",
        ),
        (
            lambda d: (
                d["prefill"]["kv"]["keys"].update(cosine=0.5),
                _gate("prefill_kv_keys_cosine")(d).update(value=0.5),
            ),
            "failed validation: prefill_kv_keys_cosine 0.5 < 0.998",
        ),
        (
            lambda d: d["prefill"]["kv"]["values"].update(nonfinite=3),
            "gate prefill_kv_finite has value 0.0 but prefill.kv.keys.nonfinite + "
            "prefill.kv.values.nonfinite is 3.0",
        ),
        (lambda d: d.update(prefill=None), "names a prefill function but has no prefill"),
        (_prefill_off_the_ane, "failed validation: residency"),
    ],
    ids=[
        "kv-gate-removed",
        "kv-cosine-lowered",
        "kv-nonfinite-hidden",
        "prefill-dropped",
        "prefill-conv-off-ane-package-flag-true",
    ],
)
def test_cli_refuses_forged_prefill_report(tmp_path: Path, forge: Any, message: str) -> None:
    reports = [make_shard(tmp_path, "0:3", prefill_tokens=4), make_shard(tmp_path, "3:5")]
    args = ["build", *map(str, reports), "-o", str(tmp_path / "m.json")]
    assert CliRunner().invoke(manifest_group, args).exit_code == 0  # unforged, it builds
    assert load_manifest(tmp_path / "m.json").shards[0].prefill_tokens == 4
    edit_json(reports[0], forge)
    result = CliRunner().invoke(manifest_group, [*args, "--overwrite"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and message in result.output


def test_cli_refuses_reports_validated_with_looser_gates_than_the_config(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    config = tmp_path / "strict.yaml"
    text = Path("configs/tiny.yaml").read_text().replace("min_cosine: 0.998", "min_cosine: 0.9999")
    config.write_text(text)
    out = tmp_path / "m.json"
    args = ["build", *map(str, reports), "-o", str(out)]
    result = CliRunner().invoke(manifest_group, [*args, "--config", str(config)])
    assert result.exit_code == 1
    assert "gate cosine was applied with bound >= 0.998, looser than the required >= 0.9999" in (
        result.output
    )
    assert not out.exists()
    # With the shipped config the same reports build, and the manifest records its bounds.
    result = CliRunner().invoke(manifest_group, [*args, "--config", "configs/tiny.yaml"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).gates["min_cosine"] == 0.998
    shown = CliRunner().invoke(manifest_group, ["show", str(out)]).output
    assert "cosine >= 0.998" in shown and "rmse (rel_rmse) <= 0.2" in shown


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["shards"][1]["validation"]["gates"][1].update(bound=0.5),
            "3:5: gate cosine bound 0.5 is looser than >= 0.998",
        ),
        (
            lambda d: d["gates"].update(min_cosine=0.99999),
            "0:3: gate cosine bound 0.998 is looser than >= 0.99999",
        ),
        (
            lambda d: d["shards"][0]["validation"]["gates"].pop(4),
            "0:3: gate max_abs is missing",
        ),
    ],
)
def test_verify_recomputes_gates(built: Path, edit: Any, message: str) -> None:
    edit_json(built, edit)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        verify_manifest(built)


def test_build_refuses_package_never_validated(tmp_path: Path) -> None:
    make_shard(tmp_path, "0:3")
    fake_package(tmp_path, "layers_3_5", b"never validated")
    with pytest.raises(
        ManifestError,
        match=r"shard layers_3_5.mlpackage was never validated: "
        r"no report at .*layers_3_5.report.json",
    ):
        build_manifest(
            [tmp_path / "layers_0_3.mlpackage", tmp_path / "layers_3_5.mlpackage"],
            tmp_path / "manifest.json",
        )


def test_build_refuses_report_without_architecture(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    edit_json(reports[0], lambda d: d.pop("architecture"))
    with pytest.raises(ManifestError, match="is malformed: it has no 'architecture'"):
        build_manifest(reports, tmp_path / "manifest.json")


def test_build_refuses_package_changed_after_validation(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    (tmp_path / "layers_3_5.mlpackage" / "Manifest.json").write_text("{}")
    with pytest.raises(
        ManifestError,
        match=r"shard layers_3_5.mlpackage \(3:5\) changed after "
        r"validation",
    ):
        build_manifest(reports, tmp_path / "manifest.json")


def test_build_refuses_existing_output_unless_overwrite(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    out = tmp_path / "manifest.json"
    out.write_text("old")
    with pytest.raises(ManifestError, match="already exists; pass --overwrite"):
        build_manifest(reports, out)
    assert out.read_text() == "old"
    build_manifest(reports, out, overwrite=True)
    assert json.loads(out.read_text())["schema_version"] == 2


def test_build_refuses_shards_outside_the_manifest_folder(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    with pytest.raises(ManifestError, match="is outside the manifest's folder"):
        build_manifest(reports, tmp_path / "sub" / "manifest.json")  # would need '..'


def test_build_refuses_absolute_package_path_outside(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    make_shards(elsewhere, ["0:3"])
    (tmp_path / "out").mkdir()
    report = make_shard(tmp_path / "out", "3:5")
    moved = tmp_path / "out" / "layers_0_3.report.json"
    shutil.copy(elsewhere / "layers_0_3.report.json", moved)
    edit_json(moved, lambda d: d["package"].update(path=str(elsewhere / "layers_0_3.mlpackage")))
    with pytest.raises(
        ManifestError,
        match=r"layers_0_3.mlpackage \(0:3\) package .* is "
        r"outside the manifest's folder",
    ):
        build_manifest([moved, report], tmp_path / "out" / "manifest.json")


def test_build_refuses_symlink_resolving_outside(tmp_path: Path) -> None:
    make_shards(tmp_path / "elsewhere", ["0:3"])
    out = tmp_path / "out"
    reports = make_shards(out, ["3:5"])
    (out / "layers_0_3.mlpackage").symlink_to(tmp_path / "elsewhere" / "layers_0_3.mlpackage")
    shutil.copy(tmp_path / "elsewhere" / "layers_0_3.report.json", out)
    with pytest.raises(ManifestError, match="symlink resolving outside the manifest's folder"):
        build_manifest([out / "layers_0_3.mlpackage", *reports], out / "manifest.json")


# ---- load and verify ------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path: Path) -> Path:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    fake_compile(tmp_path / "layers_0_3.mlpackage")
    out = tmp_path / "manifest.json"
    build_manifest(reports, out)
    return out


def test_round_trip_build_load_verify(built: Path) -> None:
    m = load_manifest(built)
    assert isinstance(m, Manifest)
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert m.to_json() == built.read_text()
    checks = verify_manifest(built)
    names = [c.name for c in checks]
    assert names[:4] == ["schema", "paths", "coverage", "contract"]
    assert sorted(c.detail for c in checks if c.name == "sha256") == [
        "layers_0_3.mlmodelc",
        "layers_0_3.mlpackage",
        "layers_3_5.mlpackage",
    ]


@pytest.mark.parametrize(
    "target", ["layers_3_5.mlpackage/Manifest.json", "layers_0_3.mlmodelc/model.mil"]
)
def test_verify_catches_file_altered_after_build(built: Path, target: str) -> None:
    (built.parent / target).write_text("tampered")
    with pytest.raises(ManifestError, match="changed since the manifest was built"):
        verify_manifest(built)


def test_verify_catches_missing_file(built: Path) -> None:
    shutil.rmtree(built.parent / "layers_3_5.mlpackage")
    with pytest.raises(ManifestError, match=r"layers_3_5.mlpackage \(3:5\) is missing"):
        verify_manifest(built)


def test_verify_recomputes_coverage(built: Path) -> None:
    edit_json(built, lambda d: d["shards"].pop())
    with pytest.raises(
        ManifestError,
        match=r"layers 3:5 are in no shard \(the last, "
        r"layers_0_3.mlpackage \(0:3\), ends at 3 of 5\)",
    ):
        verify_manifest(built)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../layers_0_3.mlpackage", r"escapes the manifest's folder \('..'\)"),
        ("sub/../../x.mlpackage", r"escapes the manifest's folder \('..'\)"),
        ("/etc/passwd", "must be relative to the manifest"),
        ("C:/shards/x.mlpackage", "must be relative to the manifest"),
    ],
)
def test_load_refuses_paths_leaving_the_folder(built: Path, path: str, message: str) -> None:
    edit_json(built, lambda d: d["shards"][0]["package"].update(path=path))
    with pytest.raises(ManifestError, match=message):
        load_manifest(built)


def test_load_refuses_symlink_resolving_outside(built: Path, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside.mlpackage"
    outside.mkdir()
    (built.parent / "link.mlpackage").symlink_to(outside)
    edit_json(built, lambda d: d["shards"][0]["package"].update(path="link.mlpackage"))
    with pytest.raises(ManifestError, match="resolves outside the manifest's folder"):
        load_manifest(built)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d.pop("rope"), "top level"),
        (lambda d: d["shards"][0].update(start="0"), "shards/0/start"),
        (
            lambda d: d["shards"][0]["validation"].update(verdict="fail"),
            "shards/0/validation/verdict",
        ),
        (
            lambda d: d["shards"][1]["validation"]["gates"][0].update(passed=False),
            "shards/1/validation/gates/0/passed",
        ),
        (lambda d: d["shards"][0]["package"].update(sha256="abc"), "shards/0/package/sha256"),
        (lambda d: d.update(extra=1), "top level"),
    ],
)
def test_load_refuses_manifest_failing_the_schema(built: Path, edit: Any, where: str) -> None:
    edit_json(built, edit)
    with pytest.raises(ManifestError, match="does not match the manifest schema at") as err:
        load_manifest(built)
    assert f"schema at {where}:" in str(err.value)
    assert "\n" not in str(err.value)


def test_load_refuses_other_schema_version_and_bad_json(built: Path) -> None:
    edit_json(built, lambda d: d.update(schema_version=1))
    with pytest.raises(ManifestError, match="has schema_version 1; this anechain reads 2"):
        load_manifest(built)
    built.write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        load_manifest(built)


def test_shipped_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(manifest_schema())


def test_render_shows_topology(built: Path) -> None:
    m = load_manifest(built)
    text = render_manifest(m, built)
    lines = text.splitlines()
    row_0 = next(line for line in lines if line.startswith("0:3 "))
    assert "layers_0_3.mlpackage" in row_0 and "21/21 pass" in row_0 and "checked" in row_0
    # Sizes in the unit that fits (a fake package of a few bytes is not "0.0 MB").
    assert f"  {m.shards[0].package.size_bytes} B  " in row_0 and "0.99950" in row_0
    assert "residency checked for every shard" in lines[-1]


def test_render_flags_unchecked_residency(tmp_path: Path) -> None:
    reports = [make_shard(tmp_path, "0:3"), make_shard(tmp_path, "3:5", residency="not_checked")]
    m = build_manifest(reports, tmp_path / "manifest.json")
    text = render_manifest(m)
    assert "NOT CHECKED" in next(line for line in text.splitlines() if line.startswith("3:5 "))
    assert "not checked on the ANE for 1 of 2 shard(s): 3:5" in text


# ---- pure topology checks -------------------------------------------------------------------


def record(layers: str, fingerprint: str = "a", n: int = 5, context: int = 64) -> ShardRecord:
    rng = LayerRange.parse(layers)
    contract = layer_contract(
        Architecture(**{**TINY, "num_hidden_layers": n}), context, rng.num_layers
    )
    return ShardRecord(f"s{layers}", rng, n, fingerprint, contract, context)


def test_topology_problems_pure() -> None:
    assert topology_problems([record("3:5"), record("0:3")]) == []
    assert topology_problems([]) == ["no shards given"]
    problems = topology_problems([record("0:3"), record("3:5", fingerprint="b")])
    assert problems == [
        "s3:5 (3:5) is from another checkpoint than s0:3 (0:3) (fingerprint b vs a)"
    ]
    nested = coverage_problems(
        [("a", LayerRange(0, 4)), ("b", LayerRange(1, 2)), ("c", LayerRange(4, 5))], 5
    )
    assert nested == ["a (0:4) and b (1:2) overlap at layers 1:2"]  # no gap reported at 2:4
    assert coverage_problems([("a", LayerRange(0, 6))], 5) == [
        "a (0:6) ends past the model's 5 decoder layers"
    ]


def test_topology_refuses_states_not_matching_range() -> None:
    good, short = record("0:3"), record("3:4")
    wrong = ShardRecord("s3:5", LayerRange(3, 5), 5, "a", short.contract, 64)
    assert topology_problems([good, wrong]) == [
        "s3:5 (3:5) has state key_cache for 1 layers, its range holds 2",
        "s3:5 (3:5) has state value_cache for 1 layers, its range holds 2",
    ]


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_module_exports_the_group() -> None:
    assert COMMANDS == [manifest_group]
    assert set(manifest_group.commands) == {"build", "verify", "show"}


def test_cli_build_verify_show(tmp_path: Path) -> None:
    make_shards(tmp_path, ["0:3", "3:5"])
    out = tmp_path / "manifest.json"
    runner = CliRunner()
    result = runner.invoke(
        manifest_group,
        [
            "build",
            str(tmp_path / "layers_3_5.mlpackage"),
            "--report",
            str(tmp_path / "layers_0_3.report.json"),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: 2 shards (0:3, 3:5)")

    result = runner.invoke(manifest_group, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output == f"OK {out}: 2 shards cover 0:5, 2 files match their sha256\n"

    result = runner.invoke(manifest_group, ["show", str(out)])
    assert result.exit_code == 0, result.output
    assert "0:3" in result.output and "NOT CHECKED" not in result.output


def test_cli_build_refusal_is_one_line_exit_1(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:2", "3:5"])
    args = ["build", *(f"--report={r}" for r in reports), "-o", str(tmp_path / "m.json")]
    result = CliRunner().invoke(manifest_group, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: shards do not chain: layers 2:3 are in no shard")
    assert result.output.count("\n") == 1


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    out = tmp_path / "manifest.json"
    out.write_text("{}")
    runner = CliRunner()
    result = runner.invoke(manifest_group, ["build", str(reports[0]), "-o", str(out)])
    assert result.exit_code == 2
    assert "already exists; pass --overwrite to replace it" in result.output
    result = runner.invoke(manifest_group, ["build", "-o", str(out), "--overwrite"])
    assert result.exit_code == 2 and "give shard packages or --report files" in result.output
    result = runner.invoke(manifest_group, ["build", str(reports[0])])
    assert result.exit_code == 2 and "Missing option '-o'" in result.output
    result = runner.invoke(manifest_group, ["verify", str(tmp_path / "nope.json")])
    assert result.exit_code == 2


def test_cli_verify_names_first_problem_exit_1(tmp_path: Path) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    out = tmp_path / "manifest.json"
    build_manifest(reports, out)
    (tmp_path / "layers_0_3.mlpackage" / "Manifest.json").write_text("tampered")
    result = CliRunner().invoke(manifest_group, ["verify", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: manifest {out}: layers_0_3.mlpackage (0:3) changed")
    assert result.output.count("\n") == 1


def test_cli_help_states_report_convention_and_examples() -> None:
    result = CliRunner().invoke(manifest_group, ["build", "--help"])
    assert result.exit_code == 0
    assert "NAME.report.json" in result.output and "NAME.mlpackage" in result.output
    assert "anechain manifest build artifacts/layers_*.mlpackage" in result.output


@pytest.mark.parametrize(
    ("windows", "settings", "message"),
    [
        ((4, 4), {}, "requires 16 early decode steps, the report has 4"),
        ((16, 0), {}, "requires 4 late decode steps, the report has 0"),
        ((16, 2), {"late_steps": 3}, "requires 3 late decode steps, the report has 2"),
    ],
)
def test_build_refuses_reports_that_ran_fewer_steps_than_the_config(
    tmp_path: Path, windows: tuple[int, int], settings: dict, message: str
) -> None:
    """`validate shard --steps 4` passes its gates over 4 steps; a manifest for a config
    that asks for 16 must not take it as proof."""
    short = make_shards(tmp_path / "short", ["0:3", "3:5"], windows=windows)
    with pytest.raises(ReportError, match=message):
        build_manifest(short, tmp_path / "m.json", validation=ValidationSettings(**settings))
    assert not (tmp_path / "m.json").exists()
    # What the config asks for, or a config asking for no more, builds.
    build_manifest(
        short,
        tmp_path / "m.json",
        validation=ValidationSettings(steps=windows[0], late_steps=windows[1]),
    )
    full = make_shards(tmp_path / "full", ["0:3", "3:5"])
    build_manifest(full, tmp_path / "full.json", validation=ValidationSettings(**settings))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (np.zeros((128, 64), np.float16), None),
        (np.zeros((128, 64), np.float32), "is float32 (128, 64); the model needs float16"),
        (np.zeros((127, 64), np.float16), "is float16 (127, 64); the model needs float16"),
        (np.array([{"a": 1}] * 3, dtype=object), "holds Python objects, not numbers"),
    ],
)
def test_build_checks_the_embedding_table_as_generate_does(
    tmp_path: Path, table: np.ndarray, message: str | None
) -> None:
    reports = make_shards(tmp_path, ["0:3", "3:5"])
    path = tmp_path / "embedding.npy"
    np.save(path, table, allow_pickle=table.dtype == object)
    if message is None:
        m = build_manifest(reports, tmp_path / "m.json", embedding=path)
        assert m.embedding is not None and m.embedding.shape == (128, 64)
        return
    with pytest.raises(ManifestError) as refused:
        build_manifest(reports, tmp_path / "m.json", embedding=path)
    assert message in str(refused.value)
    assert not (tmp_path / "m.json").exists()
