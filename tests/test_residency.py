"""Residency: plans of the real tiny shards (coremltools' MLComputePlan over a faked proxy,
built from each package's own protobuf), op classes from the program, the plan/program match,
replay, the gate, and the `anechain residency` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tests.fakes.coreml import (
    FakeCompiler,
    Op,
    PlanLoader,
    anemll_placement,
    make_plan,
    plan_for_package,
    plan_ops_for_package,
)

from anechain.cli import AnechainGroup
from anechain.cli.macos import COMMANDS
from anechain.compile import compile_package, read_sidecar, sidecar_path
from anechain.config import LayerRange, ResidencySettings
from anechain.errors import PlatformError, ResidencyError
from anechain.fsutil import sha256_tree
from anechain.platform import macos_at_least
from anechain.residency import (
    ComputePlan,
    PlanOp,
    check_residency,
    expected_live_status,
    normalise_plan,
    normalise_plans,
    read_live_plan,
    read_program,
    read_saved_plan,
    report_for_plan,
    save_plan,
)

S03 = LayerRange(0, 3)


@pytest.fixture
def shard(tiny_shards) -> Path:
    return tiny_shards[S03]


def placing(**by_type: str):
    """ANEMLL's placement, with some op types moved to another device."""

    def place(op):
        device = anemll_placement(op)
        return by_type.get(op.type, device) if device is not None else None

    return place


def live(pkg: Path, place=anemll_placement, ane: bool = True, place_in=None, **settings):
    """Residency read live; `place_in` places one function's ops on their own."""
    loader = PlanLoader(plan_for_package(pkg, place, **(place_in or {})))
    report = check_residency(
        pkg,
        ResidencySettings(**settings),
        load_plan=loader,
        compiler=FakeCompiler().compiler,
        ane_present=ane,
    )
    assert len(loader.calls) == 1 and loader.calls[0][1] == "cpu_and_ne"
    return report


def test_a_real_shard_with_int32_index_ops_on_the_cpu_passes_strict(shard):
    report = live(shard)
    c = report.counts
    assert report.status == "checked" and report.passed is True, report.failures
    assert (c.conv_total, c.conv_ane, c.compute_non_ane) == (12, 12, 0)
    # Per layer: position + 1 is shared; two int32 concats build slice_update's begin/end.
    assert c.index_ops == c.plumbing_non_ane == 1 + 2 * 3
    # Per layer a read and a write of each cache (and a read-back where the value is used).
    assert c.state_ops == sum(op.op_class == "state" for op in read_program(shard).ops) >= 3 * 4
    index = [p.op for p in report.plumbing_ops if p.op_class == "index"]
    assert {op.type for op in index} == {"add", "concat"}
    assert all(op.preferred == "cpu" for op in index)
    assert 0 < report.plumbing_share < 0.05 and report.plumbing_basis == "estimated cost"


def test_the_head_reports_its_argmax_plumbing(tiny_build_head):
    report = live(tiny_build_head)
    assert report.passed is True
    kinds = sorted(p.op.type for p in report.plumbing_ops)
    assert kinds == ["concat"] + ["reduce_argmax"] * 4  # int32 outputs, on the CPU


@pytest.fixture(scope="module")
def tiny_build_head(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    from anechain.export import export_head

    path = tmp_path_factory.mktemp("head") / "head.mlpackage"
    export_head(tiny_checkpoint, path, tiny_config.export)
    return path


def test_fp16_compute_off_the_ane_fails_and_is_listed(shard):
    report = live(shard, placing(softmax="gpu"))
    assert report.passed is False
    assert report.counts.compute_non_ane == 3 and report.counts.compute_gpu == 3
    assert [op.type for op in report.non_ane_ops] == ["softmax"] * 3
    assert report.failures == (
        "3 fp16 compute ops prefer another device than the ANE (allowed: 0, strict)",
    )


def test_the_kv_write_off_the_ane_is_fp16_compute(shard):
    report = live(shard, placing(slice_update="cpu"))
    assert report.passed is False and report.counts.compute_non_ane == 6


def test_a_conv_off_the_ane_fails(shard):
    report = live(shard, placing(conv="cpu"))
    assert report.passed is False
    assert (report.counts.conv_total, report.counts.conv_ane) == (12, 0)
    assert any("12 of 12 conv ops" in f for f in report.failures)


def test_plumbing_is_bounded_by_its_own_share(shard):
    # State reads and writes on the CPU too: within 5 % of the estimated cost here ...
    assert live(shard, placing(read_state="cpu", write_state="cpu")).passed is True
    # ... and refused under a tighter bound, with the share named.
    report = live(shard, placing(read_state="cpu"), max_plumbing_share=0.01)
    assert report.passed is False
    assert (
        "plumbing off the ANE" in report.failures[0] and "by estimated cost" in report.failures[0]
    )
    assert live(shard, max_plumbing_share=0.0).passed is False  # the index ops alone


def test_plumbing_share_by_op_count_without_costs(shard):
    ops = [dataclasses.replace(op, cost=None) for op in plan_ops_for_package(shard)]
    report = check_residency(
        shard,
        load_plan=PlanLoader(make_plan(ops)),
        compiler=FakeCompiler().compiler,
        ane_present=True,
    )
    assert report.plumbing_basis == "op count"
    c = report.counts
    assert report.plumbing_share == pytest.approx(
        c.plumbing_non_ane / (c.compute_total + c.plumbing_total)
    )


def test_lenient_gate_allows_some_fp16_ops_but_never_convs(shard):
    assert live(shard, placing(softmax="cpu"), strict=False, max_compute_non_ane=3).passed
    assert not live(shard, placing(softmax="cpu"), strict=True, max_compute_non_ane=3).passed
    assert not live(shard, placing(conv="cpu"), strict=False, max_compute_non_ane=100).passed


def test_a_mac_without_a_neural_engine_counts_without_gating(shard):
    report = live(shard, placing(conv="cpu"), ane=False)
    assert report.status == "report_only" and report.passed is None
    assert report.failures and "no Neural Engine" in report.reason


def test_names_are_normalised_once(shard):
    plan = read_live_plan(
        shard, load_plan=PlanLoader(plan_for_package(shard)), compiler=FakeCompiler().compiler
    )
    assert not [op for op in plan.ops if "." in op.type]  # "ios18.conv" -> "conv"
    writes = [op for op in plan.ops if op.type == "write_state"]
    assert len(writes) == 6 and all(op.outputs == () for op in writes)
    assert all(op.name.startswith("write_state(data=") for op in writes)
    assert len({op.name for op in plan.ops}) == len(plan.ops)  # every op has its own name
    program_names = {op.name for op in read_program(shard).ops}
    assert {op.name for op in writes} <= program_names


# --- a plan must match the program -------------------------------------------------------


def saved(tmp_path: Path, pkg: Path, place=anemll_placement, name="plan.json", **place_in) -> Path:
    plan = normalise_plans(
        plan_for_package(pkg, place, **place_in), package_sha256=sha256_tree(pkg)
    )
    return save_plan(plan, tmp_path / name)


def ops_of(data: dict, function: str = "main") -> list:
    return data["functions"][function]


def edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_a_replayed_plan_gives_the_live_counts(shard, tmp_path):
    path = tmp_path / "p.json"
    live_report = check_residency(
        shard,
        load_plan=PlanLoader(plan_for_package(shard, placing(softmax="cpu"))),
        compiler=FakeCompiler().compiler,
        ane_present=True,
        save_plan_to=path,
    )
    replayed = check_residency(shard, plan_file=path)
    assert replayed.counts == live_report.counts and replayed.failures == live_report.failures
    assert replayed.plumbing_ops == live_report.plumbing_ops
    assert replayed.plan_source == f"replay:{path}" and live_report.plan_source == "live"


def test_a_hand_edited_plan_with_fewer_convs_is_refused(shard, tmp_path):
    path = saved(tmp_path, shard, placing(conv="cpu"))

    def keep_four_convs(data):
        convs = [op for op in ops_of(data) if op["type"] == "conv"]
        data["functions"]["main"] = [op for op in ops_of(data) if op not in convs[4:]]
        for op in convs[:4]:
            op["preferred"] = "ane"

    edit(path, keep_four_convs)
    with pytest.raises(ResidencyError, match="4 conv in the plan vs 12"):
        check_residency(shard, plan_file=path)


def test_renamed_outputs_are_refused(shard, tmp_path):
    def rename(data):
        op = next(op for op in ops_of(data) if op["type"] == "softmax")
        op["outputs"] = ["renamed"]
        op["name"] = "renamed"

    path = edit(saved(tmp_path, shard), rename)
    with pytest.raises(ResidencyError, match=r"only in the plan: \['renamed'\]"):
        check_residency(shard, plan_file=path)


def test_a_plan_of_another_package_is_refused(tiny_shards, shard, tmp_path):
    other = saved(tmp_path, tiny_shards[LayerRange(3, 5)])
    with pytest.raises(ResidencyError, match="different package"):
        check_residency(shard, plan_file=other)
    # Without the digest the program still tells them apart.
    edit(other, lambda d: d.update(package_sha256=None))
    with pytest.raises(ResidencyError, match="does not match the program"):
        check_residency(shard, plan_file=other)


def test_a_plan_for_units_without_the_ane_proves_nothing(shard, tmp_path):
    path = edit(saved(tmp_path, shard), lambda d: d.update(compute_units="cpu_only"))
    with pytest.raises(ResidencyError, match="excludes the Neural Engine"):
        check_residency(shard, plan_file=path)


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


def _first_costed(data: dict) -> dict:
    return next(op for op in ops_of(data) if op["cost"] is not None)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(package_sha256=12345), "package_sha256 12345 is not a sha256"),
        (lambda d: d.update(package_sha256="abc"), "package_sha256 'abc' is not a sha256"),
        (lambda d: _first_costed(d).update(cost=float("nan")), "has cost nan"),
        (lambda d: _first_costed(d).update(cost=-0.5), "has cost -0.5"),
        (lambda d: _first_costed(d).update(depth=-1), "has depth -1"),
    ],
)
def test_a_saved_plan_with_bad_fields_is_refused_in_one_line(shard, tmp_path, change, match):
    """A hand-edited plan must not pass the gate (a negative cost makes the ANE cost share
    meaningless) nor crash later on a field read as a string."""
    good = saved(tmp_path, shard)
    assert check_residency(shard, plan_file=good).passed
    bad = edit(saved(tmp_path, shard, name="bad.json"), change)
    with pytest.raises(ResidencyError, match=match):
        check_residency(shard, plan_file=bad)
    result = CliRunner().invoke(cli, ["residency", str(shard), "--compute-plan", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("Error: ") and "malformed" in last and "Error" not in result.stdout


def test_a_compiled_model_is_classed_by_its_recorded_package(shard, tmp_path):
    result = compile_package(shard, tmp_path, compiler=FakeCompiler().compiler)
    assert read_sidecar(result.compiled)["package"] == str(shard.resolve())
    report = check_residency(
        result.compiled, load_plan=PlanLoader(plan_for_package(shard)), ane_present=True
    )
    assert report.passed is True and report.counts.conv_total == 12
    sidecar_path(result.compiled).unlink()
    with pytest.raises(ResidencyError, match="pass the .mlpackage"):
        check_residency(result.compiled, load_plan=PlanLoader(plan_for_package(shard)))


# --- normalising coremltools' object graph -------------------------------------------------


def test_nested_blocks_are_walked():
    inner_then = [Op("ios18.conv", "then_conv", preferred="cpu", cost=0.2)]
    inner_else = [
        Op("ios18.add", "else_add", cost=0.1),
        Op("ios18.while_loop", "loop", blocks=[[Op("ios18.mul", "deep_mul", preferred="gpu")]]),
    ]
    ops = [
        Op("ios18.const", "c", preferred=None),
        Op("ios18.cond", "branch", blocks=[inner_then, inner_else]),
        Op("ios18.conv", "top_conv", cost=0.5),
    ]
    ct_plan = make_plan(ops)
    plan = normalise_plan(ct_plan)
    assert [(op.type, op.name, op.depth) for op in plan.ops] == [
        ("const", "c", 0),
        ("cond", "branch", 0),
        ("conv", "then_conv", 1),
        ("add", "else_add", 1),
        ("while_loop", "loop", 1),
        ("mul", "deep_mul", 2),
        ("conv", "top_conv", 0),
    ]
    assert ct_plan.__proxy__.usage_queries == 7


def test_normalise_reads_devices_costs_and_outputs():
    plan = normalise_plan(
        make_plan([Op("conv", "q", preferred="ane", supported=("ane", "gpu", "cpu"), cost=0.25)]),
        model="m.mlmodelc",
    )
    assert plan.ops == (PlanOp("conv", ("q",), "ane", ("ane", "gpu", "cpu"), 0.25, 0),)


def test_missing_function_non_program_and_unknown_device_are_errors():
    with pytest.raises(ResidencyError, match=r"no function 'main_x' \(has: main, other\)"):
        normalise_plan(make_plan([], other=[Op("conv", "x")]), function="main_x")
    plan = make_plan([])
    plan.__proxy__.model_structure = plan.__proxy__.model_structure.__class__(
        neuralnetwork=None, program=None, pipeline=None
    )
    with pytest.raises(ResidencyError, match="not an ML Program"):
        normalise_plan(plan)
    plan = make_plan([Op("conv", "x")])
    proxy = plan.__proxy__
    op = proxy.model_structure.program.functions["main"].block.operations[0]
    proxy._usage[id(op)] = proxy._usage[id(op)].__class__(
        preferred_compute_device=None, supported_compute_devices=[]
    )  # what the bridge gives for a device class coremltools does not know
    with pytest.raises(ResidencyError, match=r"device this coremltools does not know \(NoneType\)"):
        normalise_plan(plan)


def test_off_macos_without_a_plan_is_not_checked(shard):
    report = check_residency(shard)
    assert report.status == expected_live_status()
    if not macos_at_least((15,)):
        assert report.counts is None and report.passed is None and "needs macOS" in report.reason
        with pytest.raises(PlatformError, match="macOS 14.4"):
            read_live_plan(shard)


def test_replay_needs_the_package():
    with pytest.raises(ResidencyError, match="give the package"):
        check_residency(None, plan_file="p.json")
    with pytest.raises(ResidencyError, match="neither an .mlmodelc nor an .mlpackage"):
        check_residency(Path("x.onnx"))
    plan = ComputePlan((PlanOp("conv", ("q",), "ane"),))
    assert plan.ops[0].name == "q"


# --- CLI ---------------------------------------------------------------------------------------


@click.group(cls=AnechainGroup)
def cli() -> None:
    """The real error boundary with only this module's commands."""


for _command in COMMANDS:
    cli.add_command(_command)


def test_cli_replay_pass_lists_the_plumbing(shard, tmp_path):
    path = saved(tmp_path, shard)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli, ["residency", str(shard), "--compute-plan", str(path), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "conv on ANE" in result.stdout and "12/12" in result.stdout
    assert "plumbing op" in result.stdout and "concat" in result.stdout
    assert "ios18." not in result.stdout
    assert "residency: PASS" in result.stdout
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["plumbing"]["ops"]
    assert all(type(v) is int for v in data["counts"].values())


def test_cli_replay_fail_lists_off_ane_ops(shard, tmp_path):
    path = saved(tmp_path, shard, placing(softmax="cpu"))
    result = CliRunner().invoke(cli, ["residency", str(shard), "--compute-plan", str(path)])
    assert result.exit_code == 1
    assert "residency: FAIL" in result.stdout and "fp16 op off ANE" in result.stdout
    report_only = CliRunner().invoke(
        cli, ["residency", str(shard), "--compute-plan", str(path), "--report-only"]
    )
    assert report_only.exit_code == 0 and "would FAIL" in report_only.stdout


def test_cli_usage_errors(tmp_path, shard):
    result = CliRunner().invoke(cli, ["residency"])
    assert result.exit_code == 2 and "PKG_OR_COMPILED" in result.output
    other = tmp_path / "x.bin"
    other.mkdir()
    result = CliRunner().invoke(cli, ["residency", str(other)])
    assert result.exit_code == 2 and "neither an .mlmodelc nor an .mlpackage" in result.output
    bad = edit(saved(tmp_path, shard), lambda d: ops_of(d).pop())
    result = CliRunner().invoke(cli, ["residency", str(shard), "--compute-plan", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output


@pytest.mark.skipif(macos_at_least((15,)), reason="off-macOS behaviour")
def test_cli_live_refuses_off_macos(shard):
    result = CliRunner().invoke(cli, ["residency", str(shard)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: reading a Core ML compute plan needs macOS 15+")
    assert "Traceback" not in result.output


def test_macos_14_gives_not_checked_rather_than_a_platform_error(shard, monkeypatch):
    """macOS 14.4-14.x has MLComputePlan but not the macOS 15 compiler stateful packages need."""
    import anechain.compile as compile_mod
    import anechain.residency as residency

    monkeypatch.setattr(residency, "macos_at_least", lambda minimum: (14, 5) >= minimum)
    report = check_residency(shard)
    assert report.status == "not_checked" and "needs macOS 15+" in report.reason

    def old_compiler(what, minimum=(15,)):
        raise PlatformError(f"{what} needs macOS 15+; this machine runs macOS 14.5")

    # Even when the plan is reachable, a refusing compiler is "not checked", not a crash.
    monkeypatch.setattr(compile_mod, "require_macos", old_compiler)
    report = check_residency(shard, load_plan=PlanLoader(plan_for_package(shard)))
    assert report.status == "not_checked" and "this machine runs macOS 14.5" in report.reason


# --- two-function packages: decode and prefill are each planned, matched and gated -------------


@pytest.fixture(scope="module")
def two_fn(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    """Layer 0 of the tiny preset exported with its prefill function (T = 4) beside decode."""
    from anechain.export import LayerSpec, export_shard

    assert tiny_config.export.prefill_tokens > 0
    spec = LayerSpec(LayerRange(0, 1), tmp_path_factory.mktemp("two_fn") / "l0.mlpackage")
    return export_shard(tiny_checkpoint, spec, tiny_config.export).path


def test_both_functions_of_a_two_function_package_are_counted_and_gated(two_fn):
    report = live(two_fn)  # one plan load (asserted in `live`) gives both functions
    assert report.status == "checked" and report.passed is True, report.failures
    assert [f.function for f in report.functions] == ["decode", "prefill"]
    for f in report.functions:
        assert f.passed is True
        assert (f.counts.conv_total, f.counts.conv_ane, f.counts.compute_non_ane) == (4, 4, 0)
        assert f.counts.index_ops > 0 and f.counts.compute_total > 0
    # The package's counts are the sums over its functions.
    assert (report.counts.conv_total, report.counts.conv_ane) == (8, 8)
    prefill_program = read_program(two_fn, "prefill")
    assert report.functions[1].counts.ops_total == len(prefill_program.ops)
    data = report.to_dict()
    assert data["functions"]["prefill"]["counts"]["conv_total"] == 4
    assert data["functions"]["decode"]["passed"] is True


def test_a_prefill_conv_on_the_cpu_fails_the_package_naming_the_function(two_fn):
    report = live(two_fn, place_in={"prefill": placing(conv="cpu")})
    assert report.passed is False
    decode, prefill = report.functions
    assert decode.passed is True and prefill.passed is False
    assert (prefill.counts.conv_total, prefill.counts.conv_ane) == (4, 0)
    assert report.failures and all(f.startswith("prefill: ") for f in report.failures)
    assert "prefill: 4 of 4 conv ops are not placed on the ANE" in report.failures
    # One prefill softmax off the ANE is caught too, while decode's placement is good.
    report = live(two_fn, place_in={"prefill": placing(softmax="gpu")})
    assert report.passed is False and report.functions[0].passed is True
    assert report.failures == (
        "prefill: 1 fp16 compute ops prefer another device than the ANE (allowed: 0, strict)",
    )


def test_a_saved_plan_lacking_the_prefill_function_is_refused(two_fn, tmp_path):
    path = edit(saved(tmp_path, two_fn), lambda d: d["functions"].pop("prefill"))
    with pytest.raises(ResidencyError, match="lacks function 'prefill' of the package"):
        check_residency(two_fn, plan_file=path)
    # ... and so is a one-function plan (the old format) of its decode function.
    full = read_saved_plan(saved(tmp_path, two_fn, name="full.json"))
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(full.function("decode").to_dict()))
    assert json.loads(old.read_text())["schema"] == "anechain.compute-plan/1"
    with pytest.raises(ResidencyError, match="lacks function 'prefill'"):
        check_residency(two_fn, plan_file=old)
    # A plan with a function the package lacks is refused as well.
    extra = edit(
        saved(tmp_path, two_fn, name="x.json"),
        lambda d: d["functions"].update(other=d["functions"]["decode"]),
    )
    with pytest.raises(ResidencyError, match="has function 'other' the package lacks"):
        check_residency(two_fn, plan_file=extra)


def test_a_plan_with_decode_and_prefill_ops_swapped_is_refused(two_fn, tmp_path):
    # A prefill conv off the ANE hidden under decode's name would otherwise pass prefill.
    path = saved(tmp_path, two_fn, prefill=placing(conv="cpu"))

    def swap(d):
        f = d["functions"]
        f["decode"], f["prefill"] = f["prefill"], f["decode"]

    edit(path, swap)
    with pytest.raises(ResidencyError, match="does not match the program of .*function 'decode'"):
        check_residency(two_fn, plan_file=path)


def test_a_good_two_function_plan_replays_with_both_functions_shown(two_fn, tmp_path):
    path = saved(tmp_path, two_fn)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli, ["residency", str(two_fn), "--compute-plan", str(path), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = {" ".join(line.split()) for line in result.stdout.splitlines()}
    assert "functions (each gated) decode, prefill" in rows
    for label in (
        "decode: conv on ANE 4/4",
        "prefill: conv on ANE 4/4",
        "package: conv on ANE 8/8",
    ):
        assert label in rows, (label, result.stdout)
    assert "prefill: " in result.stdout  # plumbing rows name their function
    assert "residency: PASS" in result.stdout
    data = json.loads(out.read_text())
    assert {k: v["counts"]["conv_total"] for k, v in data["functions"].items()} == {
        "decode": 4,
        "prefill": 4,
    }
    assert data["counts"]["conv_total"] == 8 and data["passed"] is True
    bad = saved(tmp_path, two_fn, name="bad.json", prefill=placing(conv="cpu"))
    result = CliRunner().invoke(cli, ["residency", str(two_fn), "--compute-plan", str(bad)])
    assert result.exit_code == 1 and "prefill: 4 of 4 conv ops" in result.stdout


def test_a_decode_only_package_keeps_its_one_function_main(shard, tmp_path):
    report = live(shard)
    assert [f.function for f in report.functions] == ["main"]
    assert report.counts == report.functions[0].counts and report.failures == ()
    # A one-function plan saved in the old format still replays, with the same counts.
    old = tmp_path / "v1.json"
    plan = normalise_plan(plan_for_package(shard), package_sha256=sha256_tree(shard))
    save_plan(plan, old)
    assert json.loads(old.read_text())["schema"] == "anechain.compute-plan/1"
    replayed = check_residency(shard, plan_file=old)
    assert replayed.counts == report.counts and replayed.passed is True
    failing = live(shard, placing(conv="cpu"))
    assert failing.failures[0].startswith("12 of 12 conv ops")  # no function prefix


def test_normalise_plans_reads_every_function():
    plan = normalise_plans(
        make_plan([Op("conv", "a")], prefill=[Op("conv", "b", preferred="cpu")]),
        model="m.mlmodelc",
    )
    assert plan.functions == ("main", "prefill")
    assert [op.name for op in plan.function("prefill").ops] == ["b"]
    assert plan.function("prefill").ops[0].preferred == "cpu"
    with pytest.raises(ResidencyError, match="no function 'decode'"):
        plan.function("decode")
    empty = make_plan([])
    empty.__proxy__.model_structure = empty.__proxy__.model_structure.__class__(
        neuralnetwork=None, program=None, pipeline=None
    )
    with pytest.raises(ResidencyError, match="not an ML Program"):
        normalise_plans(empty)
    with pytest.raises(ResidencyError, match="has no function"):
        report_for_plan(normalise_plans(make_plan([Op("conv", "a")])), [])
