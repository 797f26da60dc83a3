"""The report pages, from real reports of the tiny model: what each section shows, a failing
shard's page, the residency states, self-containment, and the commands that write them.
The headless-browser test is in test_html_browser.py."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.fakes.coreml import FakeCompiler, PlanLoader, anemll_placement, plan_for_package
from tests.html_page import Page

from anechain.cli import cli
from anechain.config import LayerRange, ResidencySettings
from anechain.export import LayerSpec, export_shard
from anechain.html_model import build_page
from anechain.html_pages import shard_page
from anechain.html_report import MODEL_SECTIONS, SHARD_SECTIONS
from anechain.residency import COMPILE_MIN_MACOS, check_residency, expected_live_status
from anechain.residency.gate import not_checked
from anechain.validate import validate_shard


def report_of(result, name: str) -> dict:
    return next(a for a in result.artifacts if a.name == name).report.to_dict()


@pytest.fixture(scope="module")
def failing_report(tmp_path_factory, overflow_checkpoint, tiny_config):
    """Layers 3:5 of the overflow checkpoint: layer 4 overflows fp16 (NaN from step 0)."""
    out = tmp_path_factory.mktemp("failing") / "layers_3_5.mlpackage"
    export = dataclasses.replace(tiny_config.export, prefill_tokens=0)
    export_shard(overflow_checkpoint, LayerSpec(LayerRange(3, 5), out), export)
    cache = tmp_path_factory.mktemp("failing-golden")
    return validate_shard(
        out, overflow_checkpoint, tiny_config.validation, backend="mil", cache_dir=cache
    )


def test_a_shard_page_shows_every_window_and_figure(tiny_build):
    result, _ = tiny_build
    report = report_of(result, "0:3")
    page = Page(shard_page(report))
    assert set(SHARD_SECTIONS) <= set(page.sections)
    peaks = report["golden"]["layer_max_abs"]
    assert f"largest: {max(peaks.values()):g}" in page.text("activations")
    assert "fp16 limit 65504" in page.text("activations")
    assert "ANE matmul saturation ~32752" in page.text("activations")
    # Every window the report has, each panel titled with its step count.
    errors = page.text("errors")
    for window, steps in (("early", 16), ("late", 4), ("prefill", 11)):
        assert f"{window} ({steps} steps)" in errors, errors
    assert "decode after prefill (5 steps)" in errors
    # The long window: its prompt and decode positions, and its whole-run row.
    long = report["long"]
    assert f"long ({len(long['per_position'])} steps)" in errors, errors
    assert re.search(r"<td>long</td>", shard_page(report))
    worst = min(m["delta_cosine"] for m in report["golden"]["layers"])
    assert f"{worst:.6g}" in page.text("delta-cosine")
    # The next-token verdict: per-position KL by window, its figures, and any flips.
    verdict = report["golden"]["next_token"]
    kl = page.text("next-token-kl")
    assert "not measured" not in kl
    for window, m in verdict["windows"].items():
        assert f"{window} ({m['positions']} steps)" in kl, kl
    assert f"{verdict['metrics']['kl_mean']:.6g}" in kl
    assert len(re.findall(r"<svg", shard_page(report).split('id="next-token-kl')[1])) >= 1
    missing = {**report, "golden": {k: v for k, v in report["golden"].items() if k != "next_token"}}
    assert Page(shard_page(missing)).text("next-token-kl") == "Next-token KL not measured"
    assert "verdict" not in page.sections and "Failed" not in page.text("gates")
    assert 'data-verdict="pass"' in shard_page(report)


def test_a_failing_shard_page_shows_the_failure(failing_report):
    report = failing_report.to_dict()
    assert report["verdict"] == "fail"
    text = shard_page(report)
    page = Page(text)
    assert 'data-verdict="fail"' in text and '<div class="failure">' in text
    first = report["golden"]["first_nonfinite"]
    assert f"first non-finite value: step {first['step']} in layer 4" in text
    assert "NaN/Inf at this step" in page.text("errors")  # non-finite steps are drawn
    # Layer 4 reached past the ANE's matmul saturation before it overflowed.
    assert report["golden"]["layer_max_abs"]["4"] >= 32752
    assert "above the ANE matmul saturation" in page.text("activations")
    assert re.search(r'<tr class="bad"><td>finite</td>', text)


def test_residency_states_are_shown_as_such(tiny_build, tiny_shards):
    result, _ = tiny_build
    report = report_of(result, "0:3")
    status = report["residency"]["status"]
    assert status == expected_live_status()
    # What a build off macOS writes (nothing counted), drawn on every machine: on a Mac the
    # build read a live plan, so the page is drawn from the report Linux gives.
    linux = not_checked(
        ResidencySettings(), f"needs macOS {'.'.join(map(str, COMPILE_MIN_MACOS))}+ or a saved plan"
    )
    if status == "not_checked":  # the stand-in is what Linux really writes
        assert report["residency"] == linux.to_dict()
    off_macos = linux.to_dict()
    page = Page(shard_page({**report, "residency": off_macos}))
    assert page.text("residency").startswith("Residency not checked : needs macOS")
    assert "conv on ANE" not in page.text("residency") and "0/0" not in page.text("residency")

    shard = tiny_shards[LayerRange(0, 3)]

    def residency(place, ane: bool) -> dict:
        return check_residency(
            shard,
            ResidencySettings(),
            load_plan=PlanLoader(plan_for_package(shard, place)),
            compiler=FakeCompiler().compiler,
            ane_present=ane,
        ).to_dict()

    checked = Page(shard_page({**report, "residency": residency(anemll_placement, True)}))
    text = checked.text("residency")
    assert text.startswith("Residency checked") and "12/12" in text and "pass" in text

    def softmax_on_gpu(op):
        return "gpu" if op.type == "softmax" else anemll_placement(op)

    failed = shard_page({**report, "residency": residency(softmax_on_gpu, True)})
    assert '<tr class="bad"><td>main</td>' in failed
    unchecked = Page(shard_page({**report, "residency": residency(softmax_on_gpu, False)}))
    text = unchecked.text("residency")
    assert text.startswith("Residency report only") and "counted, not gated" in text
    assert "FAIL" not in text and "12/12" in text


def test_windows_and_metrics_are_rendered_by_their_names(tiny_build):
    """A window or metric the report gains (any name, a KL figure anywhere) shows as it is."""
    result, _ = tiny_build
    report = report_of(result, "0:3")
    golden = report["golden"]
    late = [dict(s, window="extra", step=s["step"] + 100) for s in golden["per_step"][-4:]]
    windows = dict(golden["windows"], extra=golden["windows"]["late"])
    metrics = dict(golden["metrics"], next_token_kl=0.00123)
    grown = {**report, "golden": {**golden, "per_step": golden["per_step"] + late}}
    grown["golden"].update(windows=windows, metrics=metrics)
    page = Page(shard_page(grown))
    assert "extra (4 steps)" in page.text("errors")
    assert "golden.metrics.next_token_kl 0.00123" in page.text("next-token-kl")
    assert "not measured" not in page.text("next-token-kl")
    # The head's steps have tokens only (a table); a per-step KL there gets its panel.
    head = report_of(result, "head")
    assert "steps)" not in Page(shard_page(head)).text("errors")
    steps = [dict(s, next_token_kl=0.01) for s in head["golden"]["per_step"]]
    grown = {**head, "golden": {**head["golden"], "per_step": steps}}
    assert f"decode ({len(steps)} steps)" in Page(shard_page(grown)).text("errors")


def test_the_build_page_has_the_topology_and_every_shard(tiny_build):
    result, _ = tiny_build
    text = build_page(result)
    page = Page(text)
    assert set(MODEL_SECTIONS) <= set(page.sections)
    topology = page.text("topology")
    for name in ("0:3", "3:5", "5:6"):
        assert name in topology
    assert "embedding.npy" in topology and "head.mlpackage" in topology
    # Each shard's sections under its own anchor; every link lands on an id, ids unique.
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    targets = [link[1:] for link in page.links if link.startswith("#")]
    assert targets and all(t in page.ids for t in targets)
    for anchor in ("shard-0-3-errors", "shard-3-5-residency", "shard-head-gates"):
        assert anchor in page.ids
    # The model figure holds all six layers, from the three shards' reports.
    peaks = {}
    for name in ("0:3", "3:5", "5:6"):
        peaks.update(report_of(result, name)["golden"]["layer_max_abs"])
    assert sorted(map(int, peaks)) == list(range(6))
    assert f"largest: {max(peaks.values()):g}" in page.text("activations")
    # The whole chain's verdicts in the header, as the summary states them; each shard's
    # next-token figures in the model's KL table.
    assert result.chain is not None and html.escape(result.chain.describe()) in text
    assert html.escape(result.generation.describe()) in text
    kl = page.text("next-token-kl")
    assert all(f"{name}: all" in kl for name in ("0:3", "3:5", "5:6"))


def test_pages_are_self_contained_escaped_and_deterministic(tiny_build):
    result, _ = tiny_build
    report = report_of(result, "0:3")
    evil = dict(report, package=dict(report["package"], path="<script>alert(1)</script>.mlpackage"))
    text = shard_page(evil)
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = Page(text)
    assert not {"script", "link", "iframe", "img", "object"} & set(page.tags)
    # Nothing to fetch: every reference is to something in the page.
    assert not re.search(r"(src|href)=\"(?!#)", text) and not re.search(r"url\((?!#)", text)
    assert text.count("<svg") >= 3 and "<?xml" not in text
    assert shard_page(evil) == text  # same report, same bytes (no dates, fixed ids)


def test_figures_use_no_pyplot_and_no_agg():
    """matplotlib's SVG backend imports Agg's module (for rasterized artists); nothing may
    render with it, and pyplot's global state is never loaded."""
    code = (
        "import sys\n"
        "from matplotlib.backends import backend_agg\n"
        "def refuse(*a, **k): raise AssertionError('Agg renderer used')\n"
        "backend_agg.RendererAgg.__init__ = refuse\n"
        "from anechain import report_figures as f\n"
        "f.to_svg(f.activation_figure({0: 1.0, 1: None}), 'x')\n"
        "f.to_svg(f.step_figure([f.Series('w', [0, 1], {'rel_rmse': [0.1, None]})], {}), 'y')\n"
        "print(sorted(m for m in sys.modules if 'pyplot' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the commands ---------------------------------------------------------------------------


def test_validate_shard_writes_the_page_pass_and_fail(
    failing_report, tiny_build, tiny_checkpoint_dir, overflow_checkpoint, tmp_path
):
    result, cache = tiny_build
    build = tmp_path / "b"
    shutil.copytree(result.out_dir, build)
    page = tmp_path / "pages" / "ok.html"
    page.parent.mkdir()
    args = ["validate", "shard", str(build / "layers_5_6.mlpackage"), "--model"]
    args += [str(tiny_checkpoint_dir), "--config", "configs/tiny.yaml", "--backend", "mil"]
    run = CliRunner().invoke(cli, [*args, "--cache-dir", str(cache), "--html", str(page)])
    assert run.exit_code == 0, run.output
    assert f"report page: {page}" in run.stderr
    assert 'data-verdict="pass"' in page.read_text() and "layers 5:6" in page.read_text()

    bad = Path(failing_report.package)
    fail_page = tmp_path / "pages" / "fail.html"
    args = ["validate", "shard", str(bad), "--model", str(overflow_checkpoint.path)]
    args += ["--config", "configs/tiny.yaml", "--backend", "mil", "--steps", "4"]
    args += ["--report", str(tmp_path / "r.json"), "--html", str(fail_page)]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 1, run.output
    assert 'data-verdict="fail"' in fail_page.read_text()
    assert sorted(p.name for p in fail_page.parent.iterdir()) == ["fail.html", "ok.html"]


def test_build_writes_its_page_beside_the_manifest(tiny_build, tiny_checkpoint_dir, tmp_path):
    result, cache = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    args = ["build", "--model", str(tiny_checkpoint_dir), "--out", str(out), "--backend", "mil"]
    run = CliRunner().invoke(cli, [*args, "--cache-dir", str(cache)])
    assert run.exit_code == 0, run.output
    page = Page((out / "report.html").read_text())
    assert (out / "manifest.json").is_file() and "shard-5-6-gates" in page.ids
    assert set(MODEL_SECTIONS) <= set(page.sections)


def test_plan_writes_its_page(tiny_checkpoint_dir, tmp_path):
    args = ["plan", "--model", str(tiny_checkpoint_dir), "--config", "configs/tiny.yaml"]
    args += ["--backend", "mil", "--max-layers-per-shard", "3"]
    args += ["--report-dir", str(tmp_path / "plan"), "--cache-dir", str(tmp_path / "golden")]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    text = (tmp_path / "plan" / "manifest.html").read_text()
    page = Page(text)
    assert set(MODEL_SECTIONS) <= set(page.sections) and "attempts" in page.sections
    assert "Ranges tried (2)" in page.text("attempts") and "chosen" in page.text("attempts")
    assert "shard-0-3-errors" in page.ids and "shard-3-6-errors" in page.ids
    report = json.loads((tmp_path / "plan" / "layers_3_6.report.json").read_text())
    assert report["verdict"] == "pass"
