"""`anechain plan`: the topology search (pure, injected validator), its limits, the cached
real validator on the tiny checkpoint with the MIL runner, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from anechain.artifacts import CACHE_FILE
from anechain.config import LayerRange, load_preset
from anechain.export import export_shard
from anechain.manifest import load_manifest, verify_manifest
from anechain.plan import (
    PlanError,
    PlanLimits,
    RangeResult,
    estimate_shard_bytes,
    initial_partition,
    layers_per_shard_limit,
    plan_topology,
    search_topology,
    split_range,
)
from anechain.residency import expected_live_status
from anechain.validate import validate_shard


def R(text: str) -> LayerRange:
    return LayerRange.parse(text)


def Rs(*texts: str) -> tuple[LayerRange, ...]:
    return tuple(map(R, texts))


class FailingPairs:
    """A monotone fake validator: a range holding both layers of a pair fails, and reports
    the pair's second layer as where NaN first appeared (or no layer, hint=False)."""

    def __init__(self, *pairs: tuple[int, int], hint: bool = True) -> None:
        self.pairs, self.hint = pairs, hint
        self.calls: list[LayerRange] = []

    def fails(self, r: LayerRange) -> tuple[int, int] | None:
        return next((p for p in self.pairs if r.start <= p[0] and p[1] < r.end), None)

    def __call__(self, r: LayerRange) -> RangeResult:
        self.calls.append(r)
        pair = self.fails(r)
        if pair is None:
            return RangeResult(True)
        return RangeResult(False, ("finite",), pair[1] if self.hint else None, "NaN")


def _tilings(n: int, k: int, start: int = 0):
    if start == n:
        yield ()
        return
    for end in range(start + 1, min(n, start + k) + 1):
        for rest in _tilings(n, k, end):
            yield (LayerRange(start, end), *rest)


def _optimum(n: int, k: int, passes) -> tuple[int, int]:
    """(shards, largest shard) of the best all-passing tiling, by brute force."""
    return min(
        (len(t), max(r.num_layers for r in t)) for t in _tilings(n, k) if all(map(passes, t))
    )


# ---- the search, with an injected validator ---------------------------------------------


def test_failure_between_two_layers_is_split_there_with_the_fewest_shards():
    # Like [24,32) failing while [24,30) and [30,32) passed: any range holding 5 and 6 fails.
    validator = FailingPairs((5, 6))
    result = search_topology(12, 4, validator)
    assert result.initial == Rs("0:4", "4:8", "8:12")
    # Splitting puts the failing layer 6 at the start of the right half ...
    assert result.first_passing == Rs("0:4", "4:6", "6:8", "8:12")
    # ... and re-balancing keeps 4 shards (3 would need 4:8) with the largest of 3 layers.
    assert result.topology == Rs("0:3", "3:6", "6:9", "9:12")
    assert len(validator.calls) == len(set(validator.calls)) == 9
    decisions = {str(a.layers): a.decision for a in result.attempts}
    assert decisions["4:8"] == "split into 4:6 + 6:8"
    assert decisions["0:4"] == "not used" and decisions["3:6"] == "chosen"

    without = search_topology(12, 4, FailingPairs((5, 6)), rebalance=False)
    assert without.topology == Rs("0:4", "4:6", "6:8", "8:12")


def test_phi4_like_tail_failure_finds_the_hand_made_topology_cheaply():
    validator = FailingPairs((29, 30))
    result = search_topology(32, 8, validator)
    assert result.topology == Rs("0:8", "8:16", "16:24", "24:30", "30:32")
    # 4 initial + 2 halves + one re-balance candidate that fails on its first (riskiest) range.
    assert len(validator.calls) == 7


def test_rebalancing_merges_pieces_across_the_initial_cuts():
    validator = FailingPairs((1, 2), (3, 4))
    result = search_topology(6, 3, validator)
    assert len(result.first_passing) == 4  # splitting alone: 0:2 2:3 3:4 4:6
    assert result.topology == Rs("0:2", "2:4", "4:6")


@pytest.mark.parametrize(
    "n, k, pairs, hint",
    [
        (12, 4, [(5, 6)], True),
        (12, 4, [(5, 6)], False),
        (12, 4, [(0, 1), (10, 11)], True),
        (10, 3, [(2, 3), (6, 7)], True),
        (10, 3, [(2, 3), (3, 4), (8, 9)], False),
        (9, 9, [(4, 5)], True),
        (7, 2, [(1, 2), (2, 3), (3, 4), (4, 5)], True),
    ],
)
def test_result_is_optimal_against_brute_force(n, k, pairs, hint):
    validator = FailingPairs(*pairs, hint=hint)
    result = search_topology(n, k, validator)
    t = result.topology
    assert [r.start for r in t] == [0, *(r.end for r in t[:-1])] and t[-1].end == n
    assert all(validator.fails(r) is None and r.num_layers <= k for r in t)
    best = _optimum(n, k, lambda r: validator.fails(r) is None)
    assert (len(t), max(r.num_layers for r in t)) == best
    assert len(validator.calls) == len(set(validator.calls))


def test_a_layer_failing_alone_ends_the_plan_naming_it():
    def validate(r: LayerRange) -> RangeResult:
        if r.start <= 4 < r.end:
            return RangeResult(False, ("finite", "cosine"), 4, "first non-finite value in layer 4")
        return RangeResult(True)

    with pytest.raises(PlanError) as info:
        search_topology(6, 3, validate)
    message = str(info.value)
    assert "layer 4 fails on its own" in message
    assert "first non-finite value in layer 4" in message and "\n" not in message
    tried = {str(a.layers): a.decision for a in info.value.attempts}
    assert tried["3:6"] == "split into 3:4 + 4:6" and tried["4:5"] == "fails alone"
    # The half holding the failing layer is tried first, so the plan fails fast.
    assert "5:6" not in tried


def test_split_range():
    assert split_range(R("24:32"), 30) == Rs("24:30", "30:32")
    assert split_range(R("4:6"), 4) == Rs("4:5", "5:6")  # failing first layer: isolate it
    assert split_range(R("0:7"), None) == Rs("0:4", "4:7")  # no hint: bisect
    assert split_range(R("0:4"), 9) == Rs("0:2", "2:4")  # a hint outside the range: bisect


# ---- limits ------------------------------------------------------------------------------


def test_size_estimate_matches_the_real_phi4_shard():
    arch = load_preset("phi-4-mini").architecture
    assert estimate_shard_bytes(arch, 8, "int8") == pytest.approx(806e6, rel=0.002)
    fp16 = estimate_shard_bytes(arch, 8, "none")
    assert 1.99 < fp16 / estimate_shard_bytes(arch, 8, "int8") < 2.0


def test_limits_give_the_starting_partition():
    arch = load_preset("phi-4-mini").architecture

    def start(limits: PlanLimits, quantization: str = "int8") -> list[int]:
        most = layers_per_shard_limit(arch, limits, quantization)
        return [r.num_layers for r in initial_partition(arch.num_hidden_layers, most)]

    assert start(PlanLimits(size_budget_bytes=2_000_000_000)) == [16, 16]  # 19 layers fit
    assert start(PlanLimits(8, 2_000_000_000)) == [8, 8, 8, 8]
    assert start(PlanLimits(7)) == [7, 7, 6, 6, 6]
    assert start(PlanLimits(size_budget_bytes=700_000_000)) == [6, 6, 5, 5, 5, 5]
    assert start(PlanLimits(size_budget_bytes=2_000_000_000), "none") == [8, 8, 8, 8]  # 9 fit
    assert start(PlanLimits(size_budget_bytes=None)) == [32]
    # The default budget follows documented limits (iOS: ~1 GB per file): 9 layers fit.
    assert PlanLimits().size_budget_bytes == 1_000_000_000
    assert start(PlanLimits()) == [8, 8, 8, 8]
    with pytest.raises(PlanError, match="one decoder layer needs about 100.7 MB"):
        layers_per_shard_limit(arch, PlanLimits(size_budget_bytes=50_000_000), "int8")


# ---- real runs: tiny checkpoint, MIL runner ----------------------------------------------


class Counting:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[1].layers if hasattr(args[1], "layers") else Path(args[0]).name)
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def golden_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plan-golden-cache")


def _plan(checkpoint, root: Path, config, golden_cache: Path, **kwargs):
    return plan_topology(
        checkpoint,
        root / "plan",
        config.export,
        config.validation,
        PlanLimits(max_layers_per_shard=3),
        backend="mil",
        cache_dir=golden_cache,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory, tiny_checkpoint, tiny_config, golden_cache):
    root = tmp_path_factory.mktemp("tiny-plan")
    exports = Counting(export_shard)
    outcome = _plan(tiny_checkpoint, root, tiny_config, golden_cache, export_fn=exports)
    return outcome, exports.calls, root


@pytest.fixture(scope="module")
def overflow_plan(tmp_path_factory, overflow_checkpoint, tiny_config, golden_cache):
    root = tmp_path_factory.mktemp("overflow-plan")
    with pytest.raises(PlanError) as info:
        _plan(overflow_checkpoint, root, tiny_config, golden_cache)
    return info.value, root


def test_tiny_plan_passes_and_writes_a_verified_manifest(tiny_plan, tiny_config):
    outcome, exports, root = tiny_plan
    assert outcome.search.topology == Rs("0:3", "3:6")
    assert exports == list(Rs("0:3", "3:6"))
    assert all(a.result.passed and a.decision == "chosen" for a in outcome.search.attempts)
    assert outcome.manifest_path == root / "plan" / "manifest.json"
    checks = verify_manifest(outcome.manifest_path)
    assert {c.name for c in checks} >= {"coverage", "sha256"}
    m = load_manifest(outcome.manifest_path)
    assert [(s.start, s.end) for s in m.shards] == [(0, 3), (3, 6)]
    assert [s.package.path for s in m.shards] == ["layers_0_3.mlpackage", "layers_3_6.mlpackage"]
    report = json.loads((root / "plan" / "layers_3_6.report.json").read_text())
    assert report["package"]["path"] == "layers_3_6.mlpackage" and report["verdict"] == "pass"
    # The size estimate is the package's weight file, give or take blob alignment.
    weights = root / "plan" / "layers_0_3.mlpackage" / "Data/com.apple.CoreML/weights/weight.bin"
    estimate = estimate_shard_bytes(load_preset("tiny").architecture, 3, "int8")
    assert estimate <= weights.stat().st_size <= 1.05 * estimate


def test_cache_prevents_rebuilding_and_rebuilds_what_changed(
    tiny_plan, tiny_checkpoint, tiny_config, golden_cache, tmp_path
):
    import dataclasses

    _, _, source = tiny_plan
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    exports, validations = Counting(export_shard), Counting(validate_shard)

    def again(config=tiny_config, **kwargs):
        exports.calls.clear(), validations.calls.clear()
        return _plan(
            tiny_checkpoint,
            root,
            config,
            golden_cache,
            overwrite=True,  # the manifest exists
            export_fn=exports,
            validate_fn=validations,
            **kwargs,
        )

    # A re-run reuses every package and every report.
    outcome = again()
    assert outcome.search.topology == Rs("0:3", "3:6")
    assert exports.calls == [] and validations.calls == []
    assert all(a.result.reused for a in outcome.search.attempts)
    verify_manifest(outcome.manifest_path)

    # Other gates: the packages stay, the validations run again.
    stricter = dataclasses.replace(
        tiny_config,
        validation=dataclasses.replace(
            tiny_config.validation,
            gates=dataclasses.replace(tiny_config.validation.gates, min_cosine=0.99),
        ),
    )
    again(stricter)
    assert exports.calls == [] and len(validations.calls) == 2

    # An entry made from other inputs, and a package changed on disk, are both rebuilt.
    index_path = root / "plan" / CACHE_FILE
    index = json.loads(index_path.read_text())
    index["entries"]["layers_0_3.mlpackage"]["export_key"] = "made-with-other-settings"
    index_path.write_text(json.dumps(index))
    (root / "plan" / "layers_3_6.mlpackage" / "Manifest.json").write_text("{}")
    outcome = again(stricter)
    assert exports.calls == list(Rs("0:3", "3:6")) and len(validations.calls) == 2
    verify_manifest(outcome.manifest_path)

    # A forged report is not reused: validated again (the cache reads it like manifest build).
    report = root / "plan" / "layers_0_3.report.json"
    data = json.loads(report.read_text())
    data["gates"] = []
    report.write_text(json.dumps(data))
    again(stricter)
    assert exports.calls == [] and validations.calls == ["layers_0_3.mlpackage"]

    # A corrupt cache file is a miss, not a traceback: everything is made again.
    index_path.write_text('{"schema": "anechain.artifact-cache/1", "entries": [')
    outcome = again(stricter)
    assert exports.calls == list(Rs("0:3", "3:6")) and len(validations.calls) == 2
    verify_manifest(outcome.manifest_path)


def test_files_the_cache_does_not_know_are_refused(
    tiny_plan, tiny_checkpoint, tiny_config, tmp_path
):
    _, _, source = tiny_plan
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    (root / "plan" / CACHE_FILE).unlink()
    (root / "plan" / "manifest.json").unlink()
    with pytest.raises(PlanError, match="layers_0_3.mlpackage was not made by this plan"):
        _plan(tiny_checkpoint, root, tiny_config, None)


def test_export_failures_count_as_failed_ranges_and_are_cached(
    tiny_checkpoint, tiny_config, tmp_path
):
    from anechain.errors import ExportError

    exports: list[LayerRange] = []

    def failing_export(checkpoint, spec, settings, overwrite=False, progress=None):
        exports.append(spec.layers)
        raise ExportError(f"[{spec.layers}] conversion failed: out of memory")

    for _ in range(2):
        with pytest.raises(PlanError) as info:
            _plan(tiny_checkpoint, tmp_path, tiny_config, None, export_fn=failing_export)
        assert "layer 0 fails on its own (export failed: [0:1] conversion failed" in str(info.value)
    # Bisected without a failing layer to point at; the second run exported nothing.
    assert exports == list(Rs("0:3", "0:2", "0:1"))


def test_overflowing_layer_fails_the_plan_naming_it(overflow_plan):
    error, root = overflow_plan
    message = str(error)
    assert "layer 4 fails on its own" in message and "\n" not in message
    assert "finite" in message and "in layer 4" in message
    tried = [str(a.layers) for a in error.attempts]
    assert tried == ["0:3", "3:6", "4:6", "4:5"]
    assert not (root / "plan" / "manifest.json").exists()


# ---- command line -------------------------------------------------------------------------


@pytest.fixture
def cli():
    """The group with `plan` in it (registered by anechain.cli once the lead adds it)."""
    from anechain.cli import cli as group
    from anechain.cli.plan import plan

    added = "plan" not in group.commands
    if added:
        group.add_command(plan)
    yield group
    if added:
        del group.commands["plan"]


def _args(checkpoint: Path, root: Path, golden_cache: Path, *extra: str) -> list[str]:
    return [
        "plan",
        "--model",
        str(checkpoint),
        "--config",
        "configs/tiny.yaml",
        "--backend",
        "mil",
        "--max-layers-per-shard",
        "3",
        "--report-dir",
        str(root / "plan"),
        "--cache-dir",
        str(golden_cache),
        *extra,
    ]


def test_cli_help_has_examples(cli):
    result = CliRunner().invoke(cli, ["plan", "--help"])
    assert result.exit_code == 0
    for text in ("Examples:", "--max-layers-per-shard", "--size-budget", "--report-dir"):
        assert text in result.output
    # The default budget and the documented limits it follows.
    flat = " ".join(result.output.split())
    assert "default: 1000.0" in flat and "about 1 GB" in flat and "about 1.4 GB" in flat


def test_cli_prints_topology_manifest_and_table(
    cli, tiny_plan, tiny_checkpoint_dir, golden_cache, tmp_path
):
    _, _, source = tiny_plan
    root = tmp_path / "copy"
    shutil.copytree(source, root)  # the cache: nothing is exported or validated again
    args = _args(tiny_checkpoint_dir, root, golden_cache, "--overwrite")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "chosen topology: 0:3 3:6 (2 shards, 3/3 layers)" in out
    assert f"manifest: {root / 'plan' / 'manifest.json'}" in out
    assert "ranges tried (2):" in out and "decision" in out
    table = out.split("ranges tried (2):\n", 1)[1].splitlines()
    assert table[0].split() == [
        *("#", "layers", "est.", "size", "size", "phase", "work", "residency", "result")
    ] + ["decision"]
    rows = [line.split() for line in table[2:]]
    status = {"not_checked": "not checked", "report_only": "report only", "checked": "checked"}
    residency = status[expected_live_status()].split()
    # r[2:6]: the estimated and real sizes, e.g. "172.0 KB 213.6 KB"
    assert [r[:2] + r[6:] for r in rows] == [
        ["1", "0:3", "initial", "cached", *residency, "pass", "chosen"],
        ["2", "3:6", "initial", "cached", *residency, "pass", "chosen"],
    ]
    est = estimate_shard_bytes(load_preset("tiny").architecture, 3, "int8")
    assert rows[0][2] == f"{est / 1e3:.1f}"  # the estimate of every range considered
    assert "chosen: 0:3 3:6" in result.stderr  # the search's progress
    verify_manifest(root / "plan" / "manifest.json")


def test_cli_single_layer_failure_is_one_line_exit_1(
    cli, overflow_plan, overflow_checkpoint, golden_cache, tmp_path
):
    _, source = overflow_plan
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    result = CliRunner().invoke(cli, _args(overflow_checkpoint.path, root, golden_cache))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no topology passes: layer 4 fails on its own")
    assert result.stdout == ""


def test_cli_single_layer_failure_writes_its_page(
    cli, overflow_plan, overflow_checkpoint, golden_cache, tmp_path
):
    """What was tried and why it failed, as a report page beside the manifest it could not
    write."""
    from tests.html_page import Page

    _, source = overflow_plan
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    result = CliRunner().invoke(cli, _args(overflow_checkpoint.path, root, golden_cache))
    assert result.exit_code == 1 and not (root / "plan" / "manifest.json").exists()
    text = (root / "plan" / "manifest.html").read_text()
    page = Page(text)
    assert "no topology passes: layer 4 fails on its own" in text
    assert all(r in page.text("topology") for r in ("0:3", "3:6", "4:6", "4:5"))
    assert "fails alone" in page.text("attempts")
    assert 'id="shard-4-5-gates"' in text and text.count('data-verdict="fail"') == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-layers-per-shard", "0"], "--max-layers-per-shard"),
        (["--size-budget", "0.01"], "one decoder layer needs about"),
        (["--backend", "metal"], "--backend"),
        (["--output", "{tmp}/elsewhere/m.json"], "must be inside the manifest's folder"),
        (["--output", "{tmp}/exists.json"], "already exists; pass --overwrite"),
    ],
)
def test_cli_bad_options_exit_2(cli, tiny_checkpoint_dir, golden_cache, tmp_path, extra, message):
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    result = CliRunner().invoke(cli, _args(tiny_checkpoint_dir, tmp_path, golden_cache, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "plan").exists()  # refused before any work
