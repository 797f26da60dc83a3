"""Residency: the live path over coremltools' compute-plan object graph (faked proxy), replay
from JSON, the gate, and the `anechain residency` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tests.fakes.coreml import (
    FakeCompiler,
    Op,
    PlanLoader,
    layer_ops,
    make_plan,
    write_compiled_metadata,
)

from anechain.cli import AnechainGroup
from anechain.cli.macos import COMMANDS
from anechain.config import ResidencySettings
from anechain.errors import PlatformError, ResidencyError
from anechain.residency import (
    ComputePlan,
    PlanOp,
    check_residency,
    count_plan,
    normalise_plan,
    read_live_plan,
    read_saved_plan,
    residency_report,
    save_plan,
)


@pytest.fixture
def compiled(tmp_path: Path) -> Path:
    """An .mlmodelc folder to point the live path at (the fake plan does not read it)."""
    path = tmp_path / "s0.mlmodelc"
    write_compiled_metadata(path, {}, {})
    return path


def live(ops: list[Op], compiled: Path, **settings: object):
    loader = PlanLoader(make_plan(ops))
    report = check_residency(compiled, ResidencySettings(**settings), load_plan=loader)
    assert loader.calls == [(str(compiled), "cpu_and_ne")]
    return report


def test_all_ane_passes(compiled):
    report = live(layer_ops("l0") + layer_ops("l1"), compiled)
    c = report.counts
    assert report.status == "checked" and report.passed is True and report.failures == ()
    assert (c.conv_total, c.conv_ane, c.compute_non_ane) == (8, 8, 0)
    assert c.ops_total == 18 and c.compute_total == 14
    assert c.by_device == {"ane": 14, "cpu": 0, "gpu": 0}
    assert report.ane_cost_share == pytest.approx(1.0)
    assert report.non_ane_ops == ()


def test_conv_on_cpu_fails(compiled):
    report = live(layer_ops("l0") + layer_ops("l1", conv_device="cpu"), compiled)
    c = report.counts
    assert report.passed is False
    assert (c.conv_total, c.conv_ane) == (8, 7)
    assert c.compute_non_ane == 1
    assert any("1 of 8 conv ops" in f for f in report.failures)
    [off] = report.non_ane_ops
    assert (off.type, off.name, off.preferred, off.supported) == (
        "conv",
        "l1_qkv_proj",
        "cpu",
        ("ane", "cpu"),
    )
    # Cost-weighted: the CPU conv carries 0.3 of the 2 x 1.0 total estimated cost.
    assert report.ane_cost_share == pytest.approx(1.7 / 2.0)


def test_non_conv_on_gpu_fails_compute_non_ane(compiled):
    ops = layer_ops("l0")
    ops[4] = Op("softmax", "l0_attn", preferred="gpu", supported=("gpu", "cpu"))
    report = live(ops, compiled)
    c = report.counts
    assert (c.conv_total, c.conv_ane) == (4, 4)
    assert c.compute_non_ane == 1 and c.by_device["gpu"] == 1
    assert report.passed is False
    assert report.failures == (
        "1 compute ops prefer another device than the ANE (allowed: 0, strict)",
    )
    assert [op.name for op in report.non_ane_ops] == ["l0_attn"]


def test_lenient_gate_allows_some_non_conv_ops_but_never_convs(compiled):
    ops = layer_ops("l0", other_device="cpu")
    assert live(ops, compiled, strict=False, max_compute_non_ane=1).passed is True
    assert live(ops, compiled, strict=True, max_compute_non_ane=1).passed is False
    convs_off = layer_ops("l0", conv_device="cpu")
    assert live(convs_off, compiled, strict=False, max_compute_non_ane=5).passed is False


def test_ops_without_usage_are_not_compute(compiled):
    ops = [Op("const", f"w{i}", preferred=None) for i in range(5)] + [Op("conv", "proj")]
    c = live(ops, compiled).counts
    assert c.ops_total == 6 and c.compute_total == 1 and c.compute_non_ane == 0
    assert c.conv_ane == c.conv_total == 1


def test_conv_without_usage_counts_as_off_the_ane(compiled):
    report = live([Op("conv", "proj", preferred=None)], compiled)
    assert (report.counts.conv_total, report.counts.conv_ane) == (1, 0)
    assert report.passed is False
    assert [op.name for op in report.non_ane_ops] == ["proj"]


def test_plan_without_compute_fails(compiled):
    report = live([Op("const", "w", preferred=None)], compiled)
    assert report.passed is False and "no compute ops" in report.failures[0]


def test_nested_blocks_are_walked(compiled):
    inner_then = [Op("conv", "then_conv", preferred="cpu", cost=0.2)]
    inner_else = [
        Op("add", "else_add", cost=0.1),
        Op("while_loop", "loop", blocks=[[Op("mul", "deep_mul", preferred="gpu")]]),
    ]
    ops = [
        Op("const", "c", preferred=None),
        Op("cond", "branch", blocks=[inner_then, inner_else]),
        Op("conv", "top_conv", cost=0.5),
    ]
    loader = PlanLoader(make_plan(ops))
    plan = read_live_plan(compiled, load_plan=loader)
    assert [(op.name, op.depth) for op in plan.ops] == [
        ("c", 0),
        ("branch", 0),
        ("then_conv", 1),
        ("else_add", 1),
        ("loop", 1),
        ("deep_mul", 2),
        ("top_conv", 0),
    ]
    c = count_plan(plan)
    assert (c.conv_total, c.conv_ane) == (2, 1)
    assert c.compute_non_ane == 2 and c.by_device == {"ane": 4, "cpu": 1, "gpu": 1}
    # Every op, nested ones included, was asked for its device usage.
    assert loader.plan.__proxy__.usage_queries == 7


def test_normalise_reads_devices_costs_and_outputs():
    plan = normalise_plan(
        make_plan([Op("conv", "q", preferred="ane", supported=("ane", "gpu", "cpu"), cost=0.25)]),
        model="m.mlmodelc",
    )
    assert plan.ops == (PlanOp("conv", ("q",), "ane", ("ane", "gpu", "cpu"), 0.25, 0),)
    assert plan.model == "m.mlmodelc" and plan.function == "main"


def test_missing_function_and_non_program_are_errors():
    with pytest.raises(ResidencyError, match=r"no function 'main_x' \(has: main, other\)"):
        normalise_plan(make_plan([], other=[Op("conv", "x")]), function="main_x")
    plan = make_plan([])
    plan.__proxy__.model_structure = plan.__proxy__.model_structure.__class__(
        neuralnetwork=None, program=None, pipeline=None
    )
    with pytest.raises(ResidencyError, match="not an ML Program"):
        normalise_plan(plan)


def test_unknown_device_class_is_an_error():
    plan = make_plan([Op("conv", "x")])
    proxy = plan.__proxy__
    op = proxy.model_structure.program.functions["main"].block.operations[0]
    usage = proxy._usage[id(op)]
    proxy._usage[id(op)] = usage.__class__(
        preferred_compute_device=object(), supported_compute_devices=[]
    )
    with pytest.raises(ResidencyError, match="unknown device object"):
        normalise_plan(plan)


def test_replay_gives_identical_counts(compiled, tmp_path):
    ops = layer_ops("l0") + layer_ops("l1", conv_device="cpu")
    ops.append(Op("cond", "branch", blocks=[[Op("mul", "inner", preferred="gpu", cost=0.05)]]))
    saved = tmp_path / "plans" / "s0.plan.json"
    live_report = check_residency(
        compiled, load_plan=PlanLoader(make_plan(ops)), save_plan_to=saved
    )
    replayed = check_residency(None, plan_file=saved)
    assert replayed.counts == live_report.counts
    assert replayed.failures == live_report.failures
    assert replayed.non_ane_ops == live_report.non_ane_ops
    assert replayed.ane_cost_share == live_report.ane_cost_share is not None
    assert replayed.plan_source == f"replay:{saved}" and live_report.plan_source == "live"
    assert read_saved_plan(saved) == read_live_plan(compiled, load_plan=PlanLoader(make_plan(ops)))
    assert not list(saved.parent.glob("*.partial"))  # written atomically, nothing left over


def test_replayed_plan_must_belong_to_the_model(tmp_path):
    pkg = tmp_path / "a.mlpackage"
    pkg.mkdir()
    (pkg / "x").write_text("one")
    plan = ComputePlan((PlanOp("conv", ("q",), "ane", ("ane",)),), package_sha256="0" * 64)
    saved = save_plan(plan, tmp_path / "p.json")
    with pytest.raises(ResidencyError, match="different package"):
        check_residency(pkg, plan_file=saved)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not readable JSON"),
        ('{"schema": "other/1", "ops": []}', "not an anechain compute plan"),
        (
            '{"schema": "anechain.compute-plan/1", "ops": [{"type": "conv", "preferred": "npu"}]}',
            "unknown device 'npu'",
        ),
        ('{"schema": "anechain.compute-plan/1"}', "malformed"),
    ],
)
def test_bad_saved_plans(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ResidencyError, match=match):
        read_saved_plan(path)


def test_report_only_shows_counts_without_a_verdict(compiled):
    loader = PlanLoader(make_plan(layer_ops("l0", conv_device="cpu")))
    report = check_residency(compiled, load_plan=loader, report_only=True)
    assert report.status == "report_only" and report.passed is None
    assert report.counts.conv_ane == 3 and report.failures  # what strict would have said
    d = report.to_dict()
    assert d["status"] == "report_only" and d["passed"] is None
    assert d["counts"]["conv_total"] == 4 and d["non_ane_ops"][0]["name"] == "l0_qkv_proj"
    # Validation reports and manifests carry `counts` as integers only.
    assert all(type(v) is int for v in d["counts"].values())
    json.dumps(d)


def test_cost_share_needs_costs(compiled):
    report = live([Op("conv", "a"), Op("add", "b", preferred="cpu")], compiled)
    assert report.ane_cost_share is None and report.to_dict()["ane_cost_share"] is None


@pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")
def test_not_checked_off_macos_without_a_plan(compiled):
    report = check_residency(compiled)
    assert report.status == "not_checked" and report.counts is None and report.passed is None
    assert report.to_dict()["counts"] is None
    with pytest.raises(PlatformError, match="macOS 14.4"):
        read_live_plan(compiled)


def test_not_checked_report_has_no_counts():
    assert residency_report(None).to_dict()["status"] == "not_checked"


def test_live_from_a_package_compiles_it_first(tmp_path):
    from anechain.fsutil import sha256_tree

    pkg = tmp_path / "s0.mlpackage"
    (pkg / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"spec")
    fake = FakeCompiler()
    loader = PlanLoader(make_plan(layer_ops()))
    plan = read_live_plan(pkg, load_plan=loader, compiler=fake.compiler)
    assert len(fake.calls) == 1 and loader.calls[0][0].endswith("s0.mlmodelc")
    assert not Path(loader.calls[0][0]).exists()  # the temporary compile is gone
    assert plan.package_sha256 == sha256_tree(pkg)


# --- CLI ---------------------------------------------------------------------------------------


@click.group(cls=AnechainGroup)
def cli() -> None:
    """The real error boundary with only this module's commands."""


for _command in COMMANDS:
    cli.add_command(_command)


def saved_plan(tmp_path: Path, ops: list[Op]) -> Path:
    plan = normalise_plan(make_plan(ops))
    return save_plan(plan, tmp_path / "plan.json")


def test_cli_replay_pass(tmp_path):
    path = saved_plan(tmp_path, layer_ops())
    out = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["residency", "--compute-plan", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "conv on ANE" in result.stdout and "4/4" in result.stdout
    assert "residency: PASS" in result.stdout
    assert json.loads(out.read_text())["passed"] is True


def test_cli_replay_fail_lists_non_ane_ops(tmp_path):
    path = saved_plan(tmp_path, layer_ops(conv_device="cpu"))
    result = CliRunner().invoke(cli, ["residency", "--compute-plan", str(path)])
    assert result.exit_code == 1
    assert "residency: FAIL" in result.stdout
    assert "l0_qkv_proj" in result.stdout and "3/4" in result.stdout


def test_cli_report_only_does_not_fail(tmp_path):
    path = saved_plan(tmp_path, layer_ops(conv_device="cpu"))
    result = CliRunner().invoke(cli, ["residency", "--compute-plan", str(path), "--report-only"])
    assert result.exit_code == 0
    assert "would FAIL" in result.stdout


def test_cli_usage_errors(tmp_path):
    result = CliRunner().invoke(cli, ["residency"])
    assert result.exit_code == 2 and "--compute-plan" in result.output
    other = tmp_path / "x.bin"
    other.mkdir()
    result = CliRunner().invoke(cli, ["residency", str(other)])
    assert result.exit_code == 2 and "neither an .mlmodelc nor an .mlpackage" in result.output


@pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")
def test_cli_live_refuses_off_macos(compiled):
    result = CliRunner().invoke(cli, ["residency", str(compiled)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: reading a Core ML compute plan needs macOS 14.4+")
    assert "Traceback" not in result.output
