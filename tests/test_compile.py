"""Compiling packages: atomic write, up-to-date skip, overwrite, compiler errors, refusal off
macOS, and the `anechain compile` command."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tests.fakes.coreml import FakeCompiler

import anechain.compile as compile_mod
from anechain.cli import AnechainGroup
from anechain.cli.macos import COMMANDS
from anechain.compile import (
    Compiler,
    compile_package,
    compiled_path_for,
    is_up_to_date,
    read_sidecar,
    sidecar_path,
)
from anechain.errors import CompileError, PackageError, PlatformError
from anechain.fsutil import sha256_tree

off_macos = pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")


def make_package(path: Path, content: str = "weights v1") -> Path:
    """A structurally complete .mlpackage (check_package accepts it); the fake compiler does
    not read the spec."""
    data = path / "Data" / "com.apple.CoreML"
    (data / "weights").mkdir(parents=True)
    (data / "model.mlmodel").write_bytes(b"spec")
    (data / "weights" / "weight.bin").write_text(content)
    (path / "Manifest.json").write_text(
        json.dumps(
            {
                "itemInfoEntries": {
                    "a": {"path": "com.apple.CoreML/model.mlmodel"},
                    "b": {"path": "com.apple.CoreML/weights"},
                }
            }
        )
    )
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_compile_writes_atomically_with_a_sidecar(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    fake = FakeCompiler()
    out = tmp_path / "build"
    result = compile_package(pkg, out, compiler=fake.compiler)
    assert result.compiled == out / "s0.mlmodelc" and not result.skipped
    assert (result.compiled / "model.mil").read_text().startswith("compiled from s0.mlpackage")
    # The compiler wrote into a temporary folder beside the destination, then it was renamed.
    [(_, written_to)] = fake.calls
    assert written_to.parent.parent == out and written_to != result.compiled
    assert not written_to.exists()
    assert leftovers(out) == []
    side = read_sidecar(result.compiled)
    assert side["source_sha256"] == sha256_tree(pkg) == result.source_sha256
    assert side["compiler"] == "fake" and sidecar_path(result.compiled).name == (
        "s0.mlmodelc.source.json"
    )


def test_up_to_date_is_skipped_and_changes_recompile(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    fake = FakeCompiler()
    first = compile_package(pkg, None, compiler=fake.compiler)
    assert first.compiled == tmp_path / "s0.mlmodelc"
    second = compile_package(pkg, None, compiler=fake.compiler)
    assert second.skipped and len(fake.calls) == 1
    assert "call 1" in (second.compiled / "model.mil").read_text()

    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_text("weights v2")
    assert not is_up_to_date(first.compiled, sha256_tree(pkg))
    third = compile_package(pkg, None, compiler=fake.compiler)
    assert not third.skipped and len(fake.calls) == 2
    assert "call 2" in (third.compiled / "model.mil").read_text()
    assert read_sidecar(third.compiled)["source_sha256"] == sha256_tree(pkg)


def test_overwrite_recompiles_an_up_to_date_model(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    fake = FakeCompiler()
    compile_package(pkg, None, compiler=fake.compiler)
    result = compile_package(pkg, None, overwrite=True, compiler=fake.compiler)
    assert not result.skipped and len(fake.calls) == 2
    assert "call 2" in (result.compiled / "model.mil").read_text()


def test_missing_or_foreign_sidecar_recompiles(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    fake = FakeCompiler()
    result = compile_package(pkg, None, compiler=fake.compiler)
    sidecar_path(result.compiled).write_text('{"schema": "something-else", "source_sha256": "x"}')
    assert not compile_package(pkg, None, compiler=fake.compiler).skipped
    sidecar_path(result.compiled).unlink()
    assert not compile_package(pkg, None, compiler=fake.compiler).skipped
    assert len(fake.calls) == 3


def test_compiler_failure_keeps_the_old_model_and_forgets_it_is_current(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    compile_package(pkg, None, compiler=FakeCompiler().compiler)
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_text("weights v2")
    with pytest.raises(CompileError, match="fake compiler failed: bad op") as info:
        compile_package(pkg, None, compiler=FakeCompiler(fail_with="bad op").compiler)
    assert info.value.stderr == "bad op"
    compiled = tmp_path / "s0.mlmodelc"
    assert "call 1" in (compiled / "model.mil").read_text()  # never half-replaced
    assert read_sidecar(compiled) is None
    assert leftovers(tmp_path) == []
    # With the sidecar gone, the next run recompiles even for the old package content.
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_text("weights v1")
    assert not compile_package(pkg, None, compiler=FakeCompiler().compiler).skipped


def test_compiler_that_writes_nothing_is_an_error(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    with pytest.raises(CompileError, match="wrote no s0.mlmodelc"):
        compile_package(pkg, None, compiler=FakeCompiler(write_nothing=True).compiler)
    assert not (tmp_path / "s0.mlmodelc").exists() and leftovers(tmp_path) == []


def test_corrupt_package_is_refused_before_compiling(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    (pkg / "Manifest.json").unlink()
    fake = FakeCompiler()
    with pytest.raises(PackageError, match="Manifest.json is missing"):
        compile_package(pkg, None, compiler=fake.compiler)
    assert fake.calls == []


def test_compiled_path_for():
    assert compiled_path_for(Path("a/b/s0.mlpackage")) == Path("a/b/s0.mlmodelc")
    assert compiled_path_for(Path("a/s0.mlpackage"), Path("out")) == Path("out/s0.mlmodelc")


@off_macos
def test_refuses_off_macos_without_a_compiler(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    with pytest.raises(PlatformError, match=r"needs macOS 15\+ with Core ML; this machine runs"):
        compile_package(pkg, None)
    assert not (tmp_path / "s0.mlmodelc").exists()


# --- the xcrun path, with a stand-in `xcrun` on PATH ------------------------------------------


def fake_xcrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "xcrun"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


XCRUN_OK = """
[ "$1" = "--find" ] && { echo /usr/bin/coremlcompiler; exit 0; }
# xcrun coremlcompiler compile PKG OUTDIR -> OUTDIR/<stem>.mlmodelc
name=$(basename "$3" .mlpackage)
mkdir -p "$4/$name.mlmodelc" && echo "from $3" > "$4/$name.mlmodelc/model.mil"
"""

XCRUN_FAIL = """
[ "$1" = "--find" ] && { echo /usr/bin/coremlcompiler; exit 0; }
echo "coremlcompiler: note: preparing" >&2
echo "coremlcompiler: error: Unsupported op 'foo' in main" >&2
exit 3
"""


def test_xcrun_compile(tmp_path, monkeypatch):
    fake_xcrun(tmp_path, monkeypatch, XCRUN_OK)
    assert compile_mod._has_xcrun_coremlcompiler()
    pkg = make_package(tmp_path / "s0.mlpackage")
    xcrun = Compiler("xcrun coremlcompiler", compile_mod._xcrun_compile)
    result = compile_package(pkg, tmp_path / "out", compiler=xcrun)
    assert (result.compiled / "model.mil").read_text().strip().endswith("s0.mlpackage")
    assert leftovers(tmp_path / "out") == []


def test_xcrun_failure_carries_the_compiler_message(tmp_path, monkeypatch):
    fake_xcrun(tmp_path, monkeypatch, XCRUN_FAIL)
    pkg = make_package(tmp_path / "s0.mlpackage")
    xcrun = Compiler("xcrun coremlcompiler", compile_mod._xcrun_compile)
    with pytest.raises(CompileError) as info:
        compile_package(pkg, None, compiler=xcrun)
    assert "(exit 3): coremlcompiler: error: Unsupported op 'foo' in main" in str(info.value)
    assert "preparing" in info.value.stderr and "Unsupported op" in info.value.stderr
    assert not (tmp_path / "s0.mlmodelc").exists() and leftovers(tmp_path) == []


def test_no_xcrun_means_no_coremlcompiler(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not compile_mod._has_xcrun_coremlcompiler()


# --- CLI ---------------------------------------------------------------------------------------


@click.group(cls=AnechainGroup)
def cli() -> None:
    """The real error boundary with only this module's commands."""


for _command in COMMANDS:
    cli.add_command(_command)


@off_macos
def test_cli_refuses_off_macos_in_one_line(tmp_path):
    pkg = make_package(tmp_path / "s0.mlpackage")
    result = CliRunner().invoke(cli, ["compile", str(pkg)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: compiling a Core ML package (.mlpackage -> .mlmodelc) needs macOS 15+ with "
        f"Core ML; this machine runs {sys.platform}"
    ]
    assert result.stdout == ""


def test_cli_compiles_then_skips(tmp_path, monkeypatch):
    fake = FakeCompiler()
    monkeypatch.setattr(compile_mod, "default_compiler", lambda: fake.compiler)
    pkgs = [make_package(tmp_path / f"s{i}.mlpackage") for i in range(2)]
    args = ["compile", *map(str, pkgs), "--out", str(tmp_path / "c")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.count("mlmodelc  compiled") == 2 and "s1.mlmodelc" in first.stdout
    assert "[1/2]" in first.stderr and "[1/2]" not in first.stdout
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and second.stdout.count("up to date") == 2
    assert len(fake.calls) == 2
    third = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert third.exit_code == 0 and len(fake.calls) == 4


def test_cli_usage_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_mod, "default_compiler", lambda: FakeCompiler().compiler)
    a = make_package(tmp_path / "a" / "s0.mlpackage")
    b = make_package(tmp_path / "b" / "s0.mlpackage")
    result = CliRunner().invoke(cli, ["compile", str(a), str(b), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "would both compile to" in result.output
    result = CliRunner().invoke(cli, ["compile", str(tmp_path / "missing.mlpackage")])
    assert result.exit_code == 2
    result = CliRunner().invoke(cli, ["compile"])
    assert result.exit_code == 2
    not_pkg = tmp_path / "x.mlmodel"
    not_pkg.mkdir()
    result = CliRunner().invoke(cli, ["compile", str(not_pkg)])
    assert result.exit_code == 2 and "not an .mlpackage" in result.output


# --- one compile per package: the plan and the Core ML runner share it ---------------------


class MacWithANE:
    """This process as a Mac with a Neural Engine for the residency code: Core ML's plan of a
    compiled model comes from its package's protobuf (coremltools' MLComputePlan over a
    stand-in proxy). The package is the compiled model's sidecar's, else `package`."""

    def __init__(self) -> None:
        self.planned: list[str] = []
        self.package: Path | None = None

    def load_plan(self, compiled: str, units: str):
        from tests.fakes.coreml import plan_for_package

        from anechain.compile import read_sidecar

        self.planned.append(compiled)
        recorded = read_sidecar(Path(compiled))
        return plan_for_package(Path(recorded["package"]) if recorded else self.package)


@pytest.fixture
def a_mac(monkeypatch) -> MacWithANE:
    import anechain.residency as residency
    import anechain.residency.plan as residency_plan

    mac = MacWithANE()
    monkeypatch.setattr(residency, "macos_at_least", lambda minimum: True)
    monkeypatch.setattr(residency, "has_neural_engine", lambda: True)
    monkeypatch.setattr(residency_plan, "require_macos", lambda *args: None)
    monkeypatch.setattr(residency_plan, "_coremltools_load_plan", mac.load_plan)
    return mac


def test_validate_compiles_once_for_the_plan_and_the_runner(
    a_mac, tiny_shards, tiny_checkpoint, tiny_config, tmp_path
):
    from tests.fakes.coreml import mil_compiled_model

    from anechain.config import LayerRange
    from anechain.validate import validate_shard

    pkg = a_mac.package = tiny_shards[LayerRange(5, 6)]
    fake = FakeCompiler()
    report = validate_shard(
        pkg,
        tiny_checkpoint,
        tiny_config.validation,
        backend="coreml",
        cache_dir=tmp_path / "cache",
        runner_options={
            "load_model": lambda compiled, units: mil_compiled_model(pkg),
            "compiler": fake.compiler,
        },
    ).to_dict()
    assert len(fake.calls) == 1  # the runner's compile serves the plan too
    [planned] = a_mac.planned
    assert planned.endswith("layers_5_6.mlmodelc") and "anechain-coreml-" in planned
    assert report["residency"]["status"] == "checked" and report["verdict"] == "pass"


def test_build_compiles_each_package_once(
    a_mac, monkeypatch, tiny_checkpoint_dir, tiny_config, tmp_path
):
    import dataclasses

    import anechain.build as build
    import anechain.compile as compile_mod

    fake = FakeCompiler()
    monkeypatch.setattr(build, "is_macos", lambda: True)
    monkeypatch.setattr(compile_mod, "default_compiler", lambda: fake.compiler)
    config = dataclasses.replace(
        tiny_config, export=dataclasses.replace(tiny_config.export, topology=("0:3", "3:6"))
    )
    out = tmp_path / "b"
    result = build.run_build(
        config, out, tiny_checkpoint_dir, backend="mil", cache_dir=tmp_path / "c"
    )
    assert result.passed and result.compiled
    assert len(fake.calls) == 3  # two shards and the head, once each
    # The plans were read from the build's own compiled models (with their sidecars).
    names = ["head.mlmodelc", "layers_0_3.mlmodelc", "layers_3_6.mlmodelc"]
    assert sorted(a_mac.planned) == [str(out / n) for n in names]

    # Generation from that manifest on Core ML runs each compiled model described by the
    # package the manifest names beside it (decode and prefill), never its metadata.json.
    from tests.fakes.coreml_model import mil_loader

    import anechain.runtime as runtime_module
    from anechain.runtime import ManifestRuntime

    opened: list[tuple[str, str, str | None]] = []
    real_open = runtime_module.open_runner

    def open_runner(backend, package, **options):
        if backend == "mil":
            return real_open(backend, package, **options)
        opened.append((Path(package).name, Path(options["compiled"]).name, options.get("function")))
        return real_open(backend, package, load_model=mil_loader(Path(package)), **options)

    monkeypatch.setattr(runtime_module, "open_runner", open_runner)
    on_core_ml = ManifestRuntime(result.manifest, backend="coreml")
    assert on_core_ml.prefill_tokens == 4
    assert set(opened) == {
        ("head.mlpackage", "head.mlmodelc", None),
        ("layers_0_3.mlpackage", "layers_0_3.mlmodelc", None),
        ("layers_0_3.mlpackage", "layers_0_3.mlmodelc", "prefill"),
        ("layers_3_6.mlpackage", "layers_3_6.mlmodelc", None),
        ("layers_3_6.mlpackage", "layers_3_6.mlmodelc", "prefill"),
    }
    prompt = [5, 17, 3, 99, 240, 7]
    want = ManifestRuntime(result.manifest, backend="mil").generate(prompt, 6).tokens
    assert on_core_ml.generate(prompt, 6).tokens == want
