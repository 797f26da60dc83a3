"""Captured ground truth: bundles written by the capture code itself (Core ML's objects are
coremltools' own classes over proxies that run the MIL interpreter; the plan is built from
each package's protobuf), replayed through the same residency and golden code, and refused
when they say what they do not show. Every bundle under tests/data/captures/ (captured on a
real Mac with `anechain capture`) is replayed the same way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tests.fakes.coreml import (
    DefaultFunctionCoreML,
    FakeCompiler,
    PlanLoader,
    anemll_placement,
    mil_compiled_model,
    plan_for_package,
)

from anechain.capture import (
    CaptureError,
    CaptureSeams,
    capture_package,
    decode_array,
    encode_array,
    read_bundle,
    verify_random_recipe,
)
from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.config import LayerRange, load_preset
from anechain.errors import ResidencyError
from anechain.replay import replay_bundle

CAPTURES = Path(__file__).parent / "data" / "captures"
MAC = {
    "system": "darwin",
    "machine": "arm64",
    "chip": "fake Apple silicon (tests)",
    "macos": "15.1",
    "coremltools": "9.0",
    "neural_engine_cores": 16,
}


def seams(package: Path, place=anemll_placement, machine=MAC, **proxy) -> CaptureSeams:
    return CaptureSeams(
        load_model=lambda compiled, units: mil_compiled_model(package, **proxy),
        load_plan=PlanLoader(plan_for_package(package, place)),
        compiler=FakeCompiler().compiler,
        machine=machine,
    )


@pytest.fixture(scope="module")
def head_package(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    from anechain.export import export_head

    path = tmp_path_factory.mktemp("head") / "head.mlpackage"
    export_head(tiny_checkpoint, path, tiny_config.export)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_shards, head_package, tiny_checkpoint, tiny_config):
    out = tmp_path_factory.mktemp("captures")
    recipe = verify_random_recipe(tiny_checkpoint, "tiny", 0)
    made = {}
    for name, pkg in (("5:6", tiny_shards[LayerRange(5, 6)]), ("head", head_package)):
        made[name] = capture_package(
            pkg, tiny_checkpoint, tiny_config, out, random_recipe=recipe, seams=seams(pkg)
        )
    return made


def forged(bundle: Path, tmp_path: Path, change) -> Path:
    data = json.loads(bundle.read_text())
    change(data)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / bundle.name
    path.write_text(json.dumps(data))
    return path


def test_arrays_round_trip_exactly():
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4) / 7
    for x in (a, a.astype(np.int32), np.zeros((3, 2, 64, 16), np.float16)):
        y = decode_array(encode_array(x))
        assert y.dtype == x.dtype and np.array_equal(y, x)
    with pytest.raises(CaptureError, match="unreadable"):
        decode_array({"dtype": "float16", "shape": [2], "zlib_base64": "bm90IHpsaWI="})


def test_a_bundle_holds_what_the_mac_did(bundles):
    data = read_bundle(bundles["5:6"])
    assert data["machine"] == MAC
    assert data["plan"]["compute_units"] == "cpu_and_ne"
    assert set(data["plan"]["functions"]) == {"main"} == {p["function"] for p in data["programs"]}
    ops = data["plan"]["functions"]["main"]
    assert all(op["cost"] is not None for op in ops if op["preferred"])
    assert set(data["runs"]) == {"cpu_and_ne", "cpu_only"}
    assert len(data["inputs"]) == len(data["runs"]["cpu_and_ne"]["outputs"]) == 16
    key = decode_array(data["runs"]["cpu_and_ne"]["states"]["key_cache"])
    assert key.dtype == np.float16 and key.shape == (1, 2, 64, 16)
    assert data["checkpoint"]["random"] == {"preset": "tiny", "seed": 0, "style": "trained"}
    # The compiled metadata.json as the compiler wrote it (here the fake's), kept verbatim.
    assert data["compiled_metadata"][0]["functions"][0]["name"] == "main"
    assert bundles["5:6"].stat().st_size < 200_000  # tiny model only


def test_a_capture_replays_through_the_same_code(bundles, tiny_checkpoint):
    shard = replay_bundle(bundles["5:6"], tiny_checkpoint)
    assert shard.residency.status == "checked" and shard.residency.passed is True
    assert shard.residency.counts.index_ops == 3 == shard.residency.counts.plumbing_non_ane
    assert shard.golden["cpu_and_ne"]["passed"] and shard.golden["cpu_only"]["passed"]
    assert shard.verdict == "pass"
    head = replay_bundle(bundles["head"], tiny_checkpoint)
    # The trained-like tiny model has one near-tie in its calibration (0.07 logit std apart):
    # INT8 flips it, within the margin gate.
    assert head.verdict == "pass" and head.golden["cpu_and_ne"]["metrics"]["top1_agreement"] >= 0.9


def test_a_mac_without_a_neural_engine_captures_counts_without_a_verdict(
    tiny_shards, tiny_checkpoint, tiny_config, tmp_path
):
    pkg = tiny_shards[LayerRange(5, 6)]
    no_ane = {**MAC, "neural_engine_cores": 0}
    path = capture_package(
        pkg, tiny_checkpoint, tiny_config, tmp_path, seams=seams(pkg, machine=no_ane)
    )
    replay = replay_bundle(path, tiny_checkpoint)
    assert replay.residency.status == "report_only" and replay.residency.passed is None
    assert replay.verdict == "unproven"  # its golden passes, but nothing ran on an ANE
    # A bundle from that machine claiming a checked, passed residency is refused.
    claim = forged(path, tmp_path / "f", lambda d: d["residency"].update(status="checked"))
    with pytest.raises(CaptureError, match="residency status 'checked'"):
        replay_bundle(claim, tiny_checkpoint)


def test_a_plan_not_matching_the_program_is_refused(bundles, tiny_checkpoint, tmp_path):
    def drop_convs(d):
        ops = d["plan"]["functions"]["main"]
        d["plan"]["functions"]["main"] = [op for op in ops if op["type"] != "conv"]

    with pytest.raises(ResidencyError, match="0 conv in the plan vs 4"):
        replay_bundle(forged(bundles["5:6"], tmp_path, drop_convs), tiny_checkpoint)


def test_nan_outputs_fail_the_golden_check(tiny_shards, tiny_checkpoint, tiny_config, tmp_path):
    pkg = tiny_shards[LayerRange(5, 6)]
    path = capture_package(
        pkg, tiny_checkpoint, tiny_config, tmp_path, seams=seams(pkg, nan_at_step=3)
    )
    replay = replay_bundle(path, tiny_checkpoint)  # an honest capture of a failing shard
    assert replay.verdict == "fail"
    assert replay.golden["cpu_and_ne"]["gates"]["finite"] is False


def test_nan_injected_into_a_passing_capture_is_refused(bundles, tiny_checkpoint, tmp_path):
    def inject(d):
        step = d["runs"]["cpu_and_ne"]["outputs"][5]
        out = decode_array(step["output_hidden_states"])
        out.flat[7] = np.nan
        step["output_hidden_states"] = encode_array(out)

    with pytest.raises(CaptureError, match="the bundle says cpu_and_ne gates"):
        replay_bundle(forged(bundles["5:6"], tmp_path, inject), tiny_checkpoint)


def test_a_cpu_only_capture_claiming_residency_is_refused(bundles, tiny_checkpoint, tmp_path):
    only_cpu = forged(bundles["5:6"], tmp_path, lambda d: d["runs"].pop("cpu_and_ne"))
    with pytest.raises(CaptureError, match="no CPU_AND_NE run"):
        replay_bundle(only_cpu, tiny_checkpoint)
    cpu_plan = forged(
        bundles["5:6"], tmp_path / "p", lambda d: d["plan"].update(compute_units="cpu_only")
    )
    with pytest.raises(ResidencyError, match="excludes the Neural Engine"):
        replay_bundle(cpu_plan, tiny_checkpoint)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d["residency"].update(passed=False), "residency passed"),
        (lambda d: d["residency"]["counts"].update(conv_ane=3), "residency counts"),
        (
            lambda d: d["residency"]["functions"]["main"]["counts"].update(conv_ane=3),
            "per-function residency",
        ),
        (lambda d: d["runs"]["cpu_only"]["golden"].update(passed=False), "cpu_only golden"),
        (lambda d: d["plan"].update(package_sha256="0" * 64), "another package"),
        (lambda d: d["checkpoint"].update(fingerprint="x"), "another checkpoint"),
        (
            lambda d: d["inputs"][2].update(position=encode_array(np.array([9], np.int32))),
            "differs",
        ),
        (lambda d: d["runs"]["cpu_and_ne"]["outputs"].pop(), "asks for step 15"),
        (lambda d: d.pop("compiled_metadata"), "metadata.json is unreadable"),
        (lambda d: d.update(compiled_metadata=[7]), "metadata.json is unreadable"),
        (lambda d: d.update(schema="other/1"), "not an anechain capture"),
    ],
)
def test_bundles_that_say_what_they_do_not_show_are_refused(
    bundles, tiny_checkpoint, tmp_path, change, match
):
    with pytest.raises(CaptureError, match=match):
        replay_bundle(forged(bundles["5:6"], tmp_path, change), tiny_checkpoint)


def test_core_ml_s_metadata_layout_is_kept_not_interpreted(bundles, tiny_checkpoint, tmp_path):
    """The compiled metadata.json's layout is Core ML's and undocumented: any layout of JSON
    objects replays (the fake compiler's per-function one, or the single-function one)."""
    [entry] = read_bundle(bundles["5:6"])["compiled_metadata"]
    assert "inputSchema" not in entry and [f["name"] for f in entry["functions"]] == ["main"]
    single = {"inputSchema": [{"name": "hidden_states", "shape": "[1, 64, 1, 1]"}]}
    other = forged(bundles["5:6"], tmp_path, lambda d: d.update(compiled_metadata=[single]))
    assert replay_bundle(other, tiny_checkpoint).verdict == "pass"


def test_states_must_be_written_where_the_run_wrote(bundles, tiny_checkpoint, tmp_path):
    def shift(d):
        states = d["runs"]["cpu_only"]["states"]
        key = decode_array(states["key_cache"])
        key[:, :, 20, :] = 1  # a write past the 16 steps
        states["key_cache"] = encode_array(key)

    # The golden run's kv_unwritten gate (recomputed from the states) catches it first.
    with pytest.raises(CaptureError, match=r"not written at exactly 0..15|'kv_unwritten': False"):
        replay_bundle(forged(bundles["5:6"], tmp_path, shift), tiny_checkpoint)


def test_the_random_recipe_is_checked(tiny_checkpoint):
    with pytest.raises(CaptureError, match="not the random tiny checkpoint of seed 1"):
        verify_random_recipe(tiny_checkpoint, "tiny", 1)


# --- bundles captured on real Macs --------------------------------------------------------


@pytest.fixture(scope="module")
def remade_checkpoints(tmp_path_factory):
    made: dict[tuple[str, int], Checkpoint] = {}

    def get(recipe: dict) -> Checkpoint:
        key = (recipe["preset"], recipe["seed"])
        if key not in made:
            out = tmp_path_factory.mktemp("remade") / "ckpt"
            arch = load_preset(recipe["preset"]).architecture
            made[key] = Checkpoint(write_random_checkpoint(out, arch, seed=recipe["seed"]))
        return made[key]

    return get


@pytest.mark.parametrize("bundle", sorted(CAPTURES.glob("*.capture.json")), ids=lambda p: p.name)
def test_every_captured_bundle_replays(bundle, remade_checkpoints, tmp_path):
    data = read_bundle(bundle)
    recipe = data["checkpoint"]["random"]
    assert recipe is not None, f"{bundle.name}: capture with --random-preset/--random-seed"
    replay = replay_bundle(bundle, remade_checkpoints(recipe), cache_dir=tmp_path)
    assert replay.golden["cpu_and_ne"]["passed"], replay.golden["cpu_and_ne"]["gates"]
    if data["machine"].get("neural_engine_cores"):
        assert replay.residency.status == "checked"


def test_cli_capture_usage_and_platform(tiny_shards, tiny_checkpoint_dir, tmp_path):
    from click.testing import CliRunner

    from anechain.cli import cli
    from anechain.platform import macos_at_least

    pkg = str(tiny_shards[LayerRange(5, 6)])
    base = ["capture", pkg, "--model", str(tiny_checkpoint_dir), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, [*base, "--random-preset", "tiny"])
    assert result.exit_code == 2 and "together" in result.output
    if not macos_at_least((15,)):
        result = CliRunner().invoke(cli, base)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "capturing Core ML results needs macOS 15+" in result.output


@pytest.fixture(scope="module")
def two_fn_bundle(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    """A capture of layer 5 exported with its prefill function beside decode."""
    from anechain.export import LayerSpec, export_shard

    out = tmp_path_factory.mktemp("two_fn_capture")
    spec = LayerSpec(LayerRange(5, 6), out / "layers_5_6.mlpackage")
    pkg = export_shard(tiny_checkpoint, spec, tiny_config.export).path
    return capture_package(pkg, tiny_checkpoint, tiny_config, out, seams=seams(pkg))


def test_a_two_function_capture_carries_and_gates_both_functions(
    two_fn_bundle, tiny_checkpoint, tmp_path
):
    data = read_bundle(two_fn_bundle)
    assert sorted(data["plan"]["functions"]) == ["decode", "prefill"]
    assert [p["function"] for p in data["programs"]] == ["decode", "prefill"]
    replay = replay_bundle(two_fn_bundle, tiny_checkpoint)
    assert replay.residency.passed is True
    assert [f.counts.conv_total for f in replay.residency.functions] == [4, 4]

    def prefill_convs_on_the_cpu(d):
        for op in d["plan"]["functions"]["prefill"]:
            if op["type"] == "conv":
                op["preferred"] = "cpu"

    # The recorded verdict no longer matches what the plan shows ...
    with pytest.raises(CaptureError, match="residency passed"):
        replay_bundle(forged(two_fn_bundle, tmp_path, prefill_convs_on_the_cpu), tiny_checkpoint)
    # ... and a bundle whose plan lacks the prefill function is refused.
    dropped = forged(two_fn_bundle, tmp_path / "d", lambda d: d["plan"]["functions"].pop("prefill"))
    with pytest.raises(ResidencyError, match="lacks function 'prefill'"):
        replay_bundle(dropped, tiny_checkpoint)


def test_a_two_function_capture_plans_each_function_as_core_ml_reports_it(
    tmp_path, tiny_checkpoint, tiny_config
):
    """Core ML's plan of a compiled model reports its default function only (the bridge plans
    with no function name): the capture plans prefill as the default of a copy, as
    `anechain residency` does, instead of recording it as unreported."""
    from anechain.export import LayerSpec, export_shard

    spec = LayerSpec(LayerRange(5, 6), tmp_path / "layers_5_6.mlpackage")
    pkg = export_shard(tiny_checkpoint, spec, tiny_config.export).path
    core_ml = DefaultFunctionCoreML()
    core_ml_seams = dataclasses.replace(
        seams(pkg), load_plan=core_ml.load_plan, compiler=core_ml.compiler
    )
    bundle = capture_package(
        pkg, tiny_checkpoint, tiny_config, tmp_path / "out", seams=core_ml_seams
    )
    data = read_bundle(bundle)
    assert core_ml.defaults == ["decode", "prefill"]  # the package, then its prefill copy
    assert data["residency"]["passed"] is True
    assert "prefill planned as the default function of a copy" in data["residency"]["reason"]
    prefill = [op for op in data["plan"]["functions"]["prefill"] if op["type"] == "conv"]
    assert len(prefill) == 4 and all(op["preferred"] == "ane" for op in prefill)
    assert replay_bundle(bundle, tiny_checkpoint).residency.passed is True
