"""Live residency that survives the Core ML compiler, and functions Core ML gives no usage.

Plans are coremltools' own MLComputePlan over a fake proxy, built from the package's protobuf
and then changed as a compiler may (tests/fakes/coreml.py CompilerEdits): renamed ops, a fused
op, dropped view ops. Whether Core ML reports prefill's usage is unknown until a Mac answers
(mac-bridge-audit #2), so the two-function tests run under both behaviours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fakes.coreml import (
    RENAMED,
    SILU_MUL_FUSED,
    VIEWS_DROPPED,
    CompilerEdits,
    DefaultFunctionCoreML,
    FakeCompiler,
    PlanLoader,
    anemll_placement,
    plan_for_package,
)
from tests.fakes.reports import edit_json, make_shard

from anechain.config import LayerRange, ResidencySettings
from anechain.errors import ReportError, ResidencyError
from anechain.report_read import read_report
from anechain.residency import check_residency, read_programs, save_plan
from anechain.residency import render as r
from anechain.residency.match import infer_class
from anechain.residency.plan import PlanOp

SCRIPT = Path(__file__).parents[1] / "scripts" / "check_residency.py"
BOTH = CompilerEdits(rename=RENAMED.rename, drop=VIEWS_DROPPED.drop, fuse=SILU_MUL_FUSED.fuse)


@pytest.fixture(scope="module")
def two_fn(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    """Layer 0 of the tiny preset with its prefill function beside decode."""
    from anechain.export import LayerSpec, export_shard

    spec = LayerSpec(LayerRange(0, 1), tmp_path_factory.mktemp("live") / "l0.mlpackage")
    return export_shard(tiny_checkpoint, spec, tiny_config.export).path


# What Core ML may answer for prefill's ops, the plan being made for the default function:
# usage for every function; usage for the default function only (so prefill is planned again
# from a copy whose default it is); no usage for prefill even then.
ALL, DEFAULT_ONLY, NEVER = "reports-all", "default-only", "never-prefill"


def live(pkg, place=anemll_placement, *, ane=True, edits=None, coreml=ALL, **settings):
    if coreml == DEFAULT_ONLY:
        fake = DefaultFunctionCoreML(place, edits)
        loader, compiler = fake.load_plan, fake.compiler
    else:
        unreported = ("prefill",) if coreml == NEVER else ()
        loader = PlanLoader(plan_for_package(pkg, place, edits=edits, unreported=unreported))
        compiler = FakeCompiler().compiler
    return check_residency(
        pkg, ResidencySettings(**settings), load_plan=loader, compiler=compiler, ane_present=ane
    )


def placing(**by_type: str):
    def place(op):
        device = anemll_placement(op)
        return by_type.get(op.type, device) if device is not None else None

    return place


@pytest.fixture(params=[ALL, DEFAULT_ONLY, NEVER])
def coreml(request) -> str:
    return request.param


@pytest.mark.parametrize(
    "edits",
    [None, RENAMED, VIEWS_DROPPED, SILU_MUL_FUSED, BOTH],
    ids=["same", "renamed", "views", "fused", "all"],
)
def test_a_live_plan_the_compiler_changed_is_matched_and_gated(two_fn, edits, coreml):
    report = live(two_fn, edits=edits, coreml=coreml)
    decode, prefill = report.functions
    # decode, the default function, is always reported; every conv is still there and gated.
    assert decode.usage == "reported" and decode.passed is True, decode.failures
    assert (decode.counts.conv_total, decode.counts.conv_ane) == (4, 4)
    assert decode.counts.index_ops > 0  # int32 plumbing classed as such, even when renamed
    if coreml != NEVER:
        assert report.passed is True, report.failures
        assert prefill.counts.conv_total == 4
        replanned = "prefill planned as the default function of a copy" in report.reason
        assert replanned == (coreml == DEFAULT_ONLY)
    else:
        assert report.status == "checked" and report.passed is False
        assert prefill.counts is None and prefill.plan_ops[1] == 4
        assert report.failures == (
            "prefill: device usage not reported by Core ML for any op of this function: "
            "its residency is unproven",
        )
        assert report.counts == decode.counts  # the package sums only what was measured
        data = report.to_dict()
        assert data["functions"]["prefill"]["counts"] is None
        assert data["functions"]["prefill"]["usage"] == "not_reported"
        assert data["unreported_functions"] == ["prefill"]
        rows = dict(map(tuple, r.summary_rows(report)))
        assert rows["prefill: device usage"] == "not reported by Core ML"
        assert rows["package: usage not reported by Core ML"] == "prefill"
        assert "package: conv on ANE" not in rows  # the sums are labelled "reported only"
        assert prefill.non_ane_ops == ()  # no usage is not "off the ANE": it is unknown
    match = decode.match
    assert match.mode == "lenient"
    if edits is None:
        assert not match.changed and match.exact > 0
    if edits is RENAMED:
        programmed = [o for o in read_programs(two_fn)[0].ops if not o.type.startswith("const")]
        assert not match.added and not match.removed and match.exact == 0
        assert len(match.renamed) == len(programmed)
        assert {c.source for c in match.renamed} == {"plan"}  # every dtype was told by the plan
    if edits is VIEWS_DROPPED:
        assert {c.type for c in match.removed} == {"reshape"} and not match.added
    if edits is SILU_MUL_FUSED:
        assert [(c.type, c.op_class) for c in match.added] == [("silu_mul", "compute")]
        assert sorted(c.type for c in match.removed) == ["mul", "silu"]
    if edits is not None:
        labels = {row[0] for row in r.summary_rows(report)}
        kinds = {k for k in ("renamed", "added", "removed") if getattr(match, k)}
        assert {f"decode:   compiler {k}" for k in kinds} <= labels
        assert {row[0] for row in r.change_rows(report)} == kinds
        assert report.to_dict()["functions"]["decode"]["match"]["mode"] == "lenient"


def test_an_unreported_function_is_never_a_pass_in_report_only_mode_either(two_fn):
    report = live(two_fn, ane=False, coreml=NEVER)
    assert report.status == "report_only" and report.passed is None
    assert report.functions[1].counts is None
    assert r.verdict_lines(report)[0].endswith("would FAIL")
    assert any("not reported by Core ML" in f for f in report.failures)


def test_a_renamed_fp16_op_off_the_ane_still_fails(two_fn):
    report = live(two_fn, placing(softmax="cpu"), edits=RENAMED)
    assert report.passed is False
    assert {op.type for op in report.non_ane_ops} == {"softmax"}


def test_a_fused_op_whose_dtype_the_plan_cannot_tell_must_be_on_the_ane(two_fn):
    # The fused op reads a fp16 tensor: compute, so on the CPU it fails the strict gate.
    report = live(two_fn, placing(mul="cpu"), edits=SILU_MUL_FUSED)
    assert report.passed is False and "silu_mul" in {op.type for op in report.non_ane_ops}


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        (CompilerEdits(drop=frozenset({"layers_0_mlp_down"})), r"lacks 1 conv op\(s\) of"),
        (CompilerEdits(drop=frozenset({"silu"})), r"lacks 1 fp16 compute op\(s\).*adds none"),
    ],
    ids=["conv-dropped", "compute-dropped"],
)
def test_a_live_plan_lacking_work_of_the_program_is_refused(two_fn, edits, message):
    with pytest.raises(ResidencyError, match=message):
        live(two_fn, edits=edits)


def test_a_replayed_plan_with_the_compilers_changes_is_refused(two_fn, tmp_path):
    # The same plan that passes live is refused from a file: only a live plan is lenient.
    loader = PlanLoader(plan_for_package(two_fn, edits=RENAMED))
    saved = tmp_path / "plan.json"
    report = check_residency(
        two_fn,
        load_plan=loader,
        compiler=FakeCompiler().compiler,
        ane_present=True,
        save_plan_to=saved,
    )
    assert report.passed is True and report.functions[0].match.renamed
    with pytest.raises(ResidencyError, match="does not match the program"):
        check_residency(two_fn, plan_file=saved)


def test_infer_class_reads_operator_type_and_bound_dtypes():
    dtypes = {"pos": "INT32", "x": "FLOAT16", "k": "CONST", "cache": "STATE"}

    def op(kind, **inputs):
        return PlanOp(kind, ("out",), "cpu", inputs=tuple((k, tuple(v)) for k, v in inputs.items()))

    assert infer_class(op("add", x=["pos"], y=["k"]), dtypes)[:2] == ("index", "plan")
    assert infer_class(op("add", x=["x"], y=["<value>"]), dtypes)[:2] == ("compute", "plan")
    assert infer_class(op("reduce_argmax", x=["x"]), dtypes)[:2] == ("index", "plan")
    assert infer_class(op("cast", x=["x"]), dtypes)[:2] == ("compute", "assumed")
    assert infer_class(op("add", x=["unknown"]), dtypes)[:2] == ("compute", "assumed")
    assert infer_class(op("read_state", input=["cache"]), dtypes)[0] == "state"


# --- the report reader: replayed plans are strictly matched -----------------------------------


def test_a_report_claiming_a_lenient_match_for_a_replayed_plan_is_refused(tmp_path):
    path = make_shard(tmp_path, "0:3")
    read_report(path)  # as written: fine

    def forge(d):
        d["residency"]["plan_source"] = "replay:plan.json"
        d["residency"]["match"] = {
            "mode": "lenient",
            "exact": 3,
            "renamed": [{"type": "conv", "name": "a", "class": "compute", "source": "plan"}],
            "added": [],
            "removed": [],
        }

    edit_json(path, forge)
    with pytest.raises(ReportError, match="lenient plan/program match for a replayed plan"):
        read_report(path)


def test_a_report_with_an_unreported_function_does_not_pass_on_read(tmp_path):
    path = make_shard(tmp_path, "0:3")

    def unreported(d):
        res = d["residency"]
        part = {"counts": dict(res["counts"]), "plumbing": dict(res["plumbing"]), "passed": True}
        res["functions"] = {"decode": part, "prefill": {**part, "counts": None}}

    edit_json(path, unreported)
    _, report = read_report(path)
    assert report.residency["passed"] is False


# --- scripts/check_residency.py ----------------------------------------------------------------


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path), *args], capture_output=True, text=True
    )


def test_check_residency_script(two_fn, tmp_path, coreml):
    out = tmp_path / "residency.json"
    out.write_text(json.dumps(live(two_fn, edits=RENAMED, coreml=coreml).to_dict()))
    ok = run_script(out, "--layers", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "decode: conv_total 4 = 4 x 1" in ok.stdout
    strict = run_script(out, "--layers", "1", "--require-all")
    if coreml != NEVER:
        assert strict.returncode == 0, strict.stdout
    else:
        assert "prefill: note device usage not reported by Core ML" in ok.stdout
        assert strict.returncode == 1
        assert "prefill: FAIL device usage not reported by Core ML" in strict.stdout
    # Inputs the script must reject: the wrong layer count, a plan that lost a conv.
    wrong = run_script(out, "--layers", "2")
    assert wrong.returncode == 1 and "FAIL conv_total 4, expected 8" in wrong.stdout
    data = json.loads(out.read_text())
    data["functions"]["decode"]["counts"]["conv_total"] = 3
    out.write_text(json.dumps({"residency": data}))  # a validation report's shape
    lost = run_script(out, "--layers", "1")
    assert lost.returncode == 1 and "decode: FAIL conv_total 3" in lost.stdout
    out.write_text("{}")
    assert run_script(out, "--layers", "1").returncode == 2


def test_a_capture_lists_the_compilers_changes_and_its_replay_refuses_them(
    tiny_shards, tiny_checkpoint, tiny_config, tmp_path
):
    # Captured live, the plan is matched leniently and its changes are in the bundle; replayed,
    # the same plan must be the program's ops exactly, as any saved plan.
    from tests.fakes.coreml import mil_compiled_model

    from anechain.capture import CaptureSeams, capture_package, read_bundle
    from anechain.replay import replay_bundle

    pkg = tiny_shards[LayerRange(5, 6)]
    seams = CaptureSeams(
        load_model=lambda compiled, units: mil_compiled_model(pkg),
        load_plan=PlanLoader(plan_for_package(pkg, edits=RENAMED)),
        compiler=FakeCompiler().compiler,
        machine={"system": "darwin", "macos": "15.1", "neural_engine_cores": 16},
    )
    bundle = capture_package(pkg, tiny_checkpoint, tiny_config, tmp_path, seams=seams)
    residency = read_bundle(bundle)["residency"]
    assert residency["passed"] is True and residency["match"]["mode"] == "lenient"
    assert residency["functions"]["main"]["match"]["renamed"]
    with pytest.raises(ResidencyError, match="does not match the program"):
        replay_bundle(bundle, tiny_checkpoint)


def test_cli_an_unreported_prefill_fails_strict_and_would_fail_report_only(two_fn, tmp_path):
    import click
    from click.testing import CliRunner

    from anechain.cli import AnechainGroup
    from anechain.cli.macos import COMMANDS
    from anechain.fsutil import sha256_tree
    from anechain.residency import normalise_plans

    @click.group(cls=AnechainGroup)
    def cli() -> None:
        """The real error boundary with the macOS commands."""

    for command in COMMANDS:
        cli.add_command(command)
    ct_plan = plan_for_package(two_fn, unreported=("prefill",))
    plan = save_plan(
        normalise_plans(ct_plan, package_sha256=sha256_tree(two_fn)), tmp_path / "plan.json"
    )
    args = ["residency", str(two_fn), "--compute-plan", str(plan), "--json", str(tmp_path / "r")]
    strict = CliRunner().invoke(cli, args)
    assert strict.exit_code == 1, strict.output
    assert "prefill: device usage" in strict.stdout and "not reported by Core ML" in strict.stdout
    assert "residency: FAIL" in strict.stdout
    data = json.loads((tmp_path / "r").read_text())
    assert data["functions"]["prefill"]["counts"] is None and data["passed"] is False
    report_only = CliRunner().invoke(cli, [*args, "--report-only"])
    assert report_only.exit_code == 0 and "would FAIL" in report_only.stdout
    assert "not reported by Core ML" in report_only.stdout


def test_prefill_unreported_by_the_default_plan_is_planned_from_a_copy(two_fn, tiny_shards):
    from anechain.fsutil import sha256_tree

    before = sha256_tree(two_fn)
    fake = DefaultFunctionCoreML()
    report = check_residency(
        two_fn, load_plan=fake.load_plan, compiler=fake.compiler, ane_present=True
    )
    assert fake.defaults == ["decode", "prefill"]  # one more compile and plan, for prefill only
    assert report.passed is True and report.unreported == ()
    assert report.functions[1].counts.conv_ane == 4
    assert sha256_tree(two_fn) == before  # the copy's new spec never wrote through a link
    # A one-function package has nothing to replan.
    one = DefaultFunctionCoreML()
    shard = tiny_shards[LayerRange(0, 3)]
    check_residency(shard, load_plan=one.load_plan, compiler=one.compiler, ane_present=True)
    assert one.defaults == ["main"]
