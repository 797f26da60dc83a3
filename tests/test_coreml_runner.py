"""The Core ML runner: input checks from the model's own description, state handling, refusal
off macOS (fakes for CompiledMLModel); and, on macOS, the real compile -> plan -> predict."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.fakes.coreml_model import (
    FakeCompiler,
    ModelProxy,
    compiled_model,
    mil_loader,
    toy_shard_model,
)

from anechain.config import LayerRange
from anechain.contract import read_package_metadata
from anechain.errors import ConfigError, PlatformError, RunnerError
from anechain.package import load_spec
from anechain.runners.coreml import CoreMLRunner, FeatureSpec, features_from_spec

SHARD = LayerRange(0, 3)


@pytest.fixture
def shard(tiny_shards) -> Path:
    return tiny_shards[SHARD]


def contract_inputs(package: Path, position: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    contract = read_package_metadata(package).contract
    rng = np.random.default_rng(seed)
    out = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in contract.inputs}
    out["position"] = np.array([position], dtype=np.int32)
    return out


def fake_runner(package: Path, **kwargs) -> tuple[CoreMLRunner, ModelProxy, list]:
    contract = read_package_metadata(package).contract
    inputs = {t.name: (tuple(t.shape), t.dtype) for t in contract.inputs}
    model = toy_shard_model({s.name: s.shape for s in contract.states}, inputs)
    loads: list[tuple[str, str]] = []

    def load_model(compiled: str, units: str):
        loads.append((compiled, units))
        return model

    runner = CoreMLRunner(package, load_model=load_model, **kwargs)
    return runner, model._proxy, loads


def test_features_from_the_package_spec_match_the_contract(shard):
    inputs, outputs, states = features_from_spec(load_spec(shard))
    contract = read_package_metadata(shard).contract
    assert inputs == [FeatureSpec(t.name, t.shape, np.dtype(t.dtype)) for t in contract.inputs]
    assert outputs == [FeatureSpec(t.name, t.shape, np.dtype(t.dtype)) for t in contract.outputs]
    assert states == [FeatureSpec(t.name, t.shape, np.dtype(t.dtype)) for t in contract.states]


def test_runner_over_a_package_steps_and_keeps_state(shard):
    fake = FakeCompiler()
    runner, model, loads = fake_runner(shard, compiler=fake.compiler)
    assert runner.name == "coreml"
    assert runner.first_nonfinite is None and runner.layer_max_abs == []
    [(compiled, units)] = loads
    assert units == "cpu_and_ne" and compiled.endswith("layers_0_3.mlmodelc")
    assert len(fake.calls) == 1 and Path(compiled).is_dir()

    inputs = contract_inputs(shard, position=0)
    out = runner.step(inputs)
    assert inputs["hidden_states"].dtype == np.float16  # the caller's dict is left alone
    assert out["output_hidden_states"].dtype == np.float16  # as the model declares
    np.testing.assert_array_equal(out["output_hidden_states"], inputs["hidden_states"] * 2)
    runner.step(contract_inputs(shard, position=1))
    key = runner.read_state("key_cache")
    assert key.dtype == np.float16  # as declared, though Core ML hands back fp32
    assert (key[:, :, 0, :] == 1).all() and (key[:, :, 1, :] == 2).all()
    assert (key[:, :, 2:, :] == 0).all()

    runner.reset()
    assert (runner.read_state("value_cache") == 0).all()
    assert model.states_made == 2 and model.predicts == 2

    with pytest.raises(RunnerError, match="no state 'kv'"):
        runner.read_state("kv")
    # The temporary compile goes away with the runner.
    del runner
    gc.collect()
    assert not Path(compiled).exists()


def test_write_state_hands_core_ml_an_array_it_converts(shard, capsys):
    """The fp16 KV cache is written as fp32, which Core ML casts into the fp16 state
    (mm:714-724); an fp16 array would be refused (Array.mm:10-30)."""
    runner, model, _ = fake_runner(shard, compiler=FakeCompiler().compiler)
    shape = runner.read_state("key_cache").shape
    fill = np.random.default_rng(1).standard_normal(shape).astype(np.float16)
    runner.write_state("key_cache", fill)
    np.testing.assert_array_equal(runner.read_state("key_cache"), fill)
    assert "not convertible" not in capsys.readouterr().out
    with pytest.raises(RunnerError, match=r"state 'key_cache' has shape \(3, 2, 64, 16\); cannot"):
        runner.write_state("key_cache", fill[:, :, :2])
    with pytest.raises(RunnerError, match="no state 'kv'"):
        runner.write_state("kv", fill)


def test_a_late_window_runs_through_the_bridge_rules(shard, tiny_checkpoint, tiny_config):
    """Decode validation's late window writes the states (validate.py); through a real
    CompiledMLModel whose native side follows the bridge."""
    from anechain.validate import run_golden

    assert tiny_config.validation.late_steps > 0
    meta = read_package_metadata(shard)
    runner = CoreMLRunner(shard, load_model=mil_loader(shard), compiler=FakeCompiler().compiler)
    golden, gates = run_golden(runner, meta, tiny_checkpoint, tiny_config.validation)
    assert "late" in golden.windows
    assert all(g.passed for g in gates), [g for g in gates if not g.passed]


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda d: d.update(hidden_states=d["hidden_states"].astype(np.float32)),
            "input 'hidden_states' has dtype float32, the model expects float16",
        ),
        (
            lambda d: d.update(position=d["position"].astype(np.int64)),
            "input 'position' has dtype int64, the model expects int32",
        ),
        (
            lambda d: d.update(cos=d["cos"].reshape(1, 1, -1)),
            r"input 'cos' has shape \(1, 1, 12\), the model expects \(1, 1, 1, 12\)",
        ),
        (lambda d: d.pop("attention_mask"), r"missing \['attention_mask'\], unknown none"),
        (lambda d: d.update(extra=np.zeros(1)), r"missing none, unknown \['extra'\]"),
        (lambda d: d.update(sin=[0.0] * 12), "input 'sin' must be a numpy array"),
    ],
)
def test_inputs_are_checked_before_predict(shard, change, match):
    runner, model, _ = fake_runner(shard, compiler=FakeCompiler().compiler)
    inputs = contract_inputs(shard)
    change(inputs)
    with pytest.raises(RunnerError, match=match):
        runner.step(inputs)
    assert model.predicts == 0


def test_a_compiled_model_is_described_by_the_package_it_was_compiled_from(shard, tmp_path):
    from anechain.compile import compile_package

    compiled = compile_package(shard, tmp_path, compiler=FakeCompiler().compiler).compiled
    # The fake compiler's metadata.json has no top-level schemas (Core ML's layout is not
    # documented): the runner never reads it.
    [entry] = json.loads((compiled / "metadata.json").read_text())
    assert "inputSchema" not in entry and "stateSchema" not in entry
    runner = CoreMLRunner(compiled, "cpu_only", load_model=mil_loader(shard))
    assert runner.inputs == features_from_spec(load_spec(shard))[0]
    assert runner.state_names == ["key_cache", "value_cache"]
    out = runner.step(contract_inputs(shard, position=3))
    assert out["output_hidden_states"].dtype == np.float16  # as the package declares
    assert runner.read_state("key_cache")[:, :, 3].any()
    with pytest.raises(RunnerError, match="dtype float32, the model expects float16"):
        bad = contract_inputs(shard)
        runner.step({**bad, "hidden_states": bad["hidden_states"].astype(np.float32)})
    assert compiled.is_dir()  # a given .mlmodelc is the caller's, not removed


def test_a_compiled_model_without_its_package_is_refused_in_one_line(shard, tmp_path):
    import shutil

    from anechain.compile import compile_package, sidecar_path

    def load(path, units):
        raise AssertionError("never loaded")

    package = tmp_path / shard.name
    shutil.copytree(shard, package)
    compiled = compile_package(package, tmp_path, compiler=FakeCompiler().compiler).compiled
    (package / "Manifest.json").write_text((package / "Manifest.json").read_text() + " ")
    with pytest.raises(RunnerError) as changed:
        CoreMLRunner(compiled, load_model=load)
    assert str(changed.value) == (
        f"{compiled} was compiled from {package.resolve()}, which has changed since; "
        "compile it again"
    )
    shutil.rmtree(package)
    with pytest.raises(
        RunnerError, match=r"compiled from .*layers_0_3.mlpackage, which is missing"
    ):
        CoreMLRunner(compiled, load_model=load)
    sidecar_path(compiled).unlink()
    with pytest.raises(RunnerError) as no_sidecar:
        CoreMLRunner(compiled, load_model=load)
    assert "\n" not in str(no_sidecar.value)
    assert str(no_sidecar.value).startswith(f"{compiled}: no layers_0_3.mlmodelc.source.json")
    with pytest.raises(RunnerError, match="does not exist"):
        CoreMLRunner(tmp_path / "gone.mlmodelc", load_model=load)


def test_a_package_and_a_compiled_model_of_another_are_refused(tiny_shards, tmp_path):
    from anechain.compile import compile_package

    def load(*args):
        raise AssertionError("never loaded")

    shard, other = tiny_shards[SHARD], tiny_shards[LayerRange(3, 5)]
    compiled = compile_package(shard, tmp_path, compiler=FakeCompiler().compiler)
    with pytest.raises(RunnerError) as info:
        CoreMLRunner(other, compiled=compiled.compiled, load_model=load)
    assert str(info.value) == (
        f"{compiled.compiled} was not compiled from {other} (its compile record names another "
        "package); compile it again"
    )
    with pytest.raises(RunnerError, match="not compiled from"):
        CoreMLRunner(shard, compiled=compiled.compiled, load_model=load, package_sha256="0" * 64)
    model = toy_shard_model({"key_cache": (3, 2, 64, 16), "value_cache": (3, 2, 64, 16)})
    runner = CoreMLRunner(
        shard, compiled=compiled.compiled, load_model=lambda *a: model, package_sha256=None
    )
    assert runner.compiled == compiled.compiled


def test_bad_arguments(tmp_path, shard):
    with pytest.raises(ConfigError, match="unknown compute units 'npu'"):
        CoreMLRunner(shard, "npu", load_model=lambda path, units: None)
    with pytest.raises(RunnerError, match="neither an .mlpackage nor an .mlmodelc"):
        CoreMLRunner(tmp_path / "model.onnx", load_model=lambda path, units: None)

    def broken(path: str, units: str) -> None:
        raise Exception("Error compiling model: unsupported op")

    with pytest.raises(RunnerError, match="Core ML could not load .*unsupported op"):
        CoreMLRunner(shard, load_model=broken, compiler=FakeCompiler().compiler)


@pytest.mark.skipif(sys.platform == "darwin", reason="off-macOS behaviour")
def test_refuses_off_macos(shard):
    with pytest.raises(PlatformError) as info:
        CoreMLRunner(shard)
    assert str(info.value) == (
        f"running a shard with Core ML (stateful predict) needs macOS 15+ "
        f"with Core ML; this machine runs {sys.platform}"
    )


def test_open_runner_builds_a_coreml_runner(shard):
    from anechain.runners import open_runner

    model = toy_shard_model({"key_cache": (3, 2, 64, 16), "value_cache": (3, 2, 64, 16)})
    runner = open_runner(
        "coreml", shard, load_model=lambda p, u: model, compiler=FakeCompiler().compiler
    )
    assert isinstance(runner, CoreMLRunner)


# --- real Core ML (macOS 15+) --------------------------------------------------------------------


@pytest.mark.macos
def test_real_compile_plan_and_predict(shard, tiny_checkpoint, tmp_path):
    from anechain.compile import compile_package
    from anechain.residency import check_residency, expected_live_status
    from anechain.rope import RopeParameters, step_inputs
    from anechain.runners.mil import MILRunner

    result = compile_package(shard, tmp_path)
    assert result.compiled.is_dir() and not result.skipped
    assert compile_package(shard, tmp_path).skipped

    # The live plan matches the package's program (else ResidencyError) and is classed by it.
    report = check_residency(result.compiled)
    assert report.status == expected_live_status(".mlmodelc")
    assert report.counts.conv_total == 4 * SHARD.num_layers
    assert report.counts.compute_total > report.counts.conv_total

    arch = tiny_checkpoint.architecture
    context = read_package_metadata(shard).context_length
    rope = RopeParameters.from_hf_config(tiny_checkpoint.hf_config)
    rng = np.random.default_rng(0)
    # CPU_ONLY computes in fp32; compare with the fp16 MIL reference loosely.
    coreml = CoreMLRunner(result.compiled, "cpu_only")
    assert coreml.state_names == ["key_cache", "value_cache"]  # from the sidecar's package
    reference = MILRunner(shard)
    for p in range(3):
        inputs = step_inputs(rope, rng.standard_normal(arch.hidden_size), p, context)
        got = coreml.step(inputs)["output_hidden_states"].astype(np.float32).ravel()
        want = reference.step(inputs)["output_hidden_states"].astype(np.float32).ravel()
        assert np.isfinite(got).all()
        cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cosine > 0.999, (p, cosine)
    key = coreml.read_state("key_cache")
    assert key.dtype == np.float16
    assert key.shape == (SHARD.num_layers, arch.num_key_value_heads, context, arch.head_dim)
    assert np.abs(key[:, :, :3]).sum() > 0 and (key[:, :, 3:] == 0).all()
    coreml.reset()
    assert (coreml.read_state("key_cache") == 0).all()

    # From the package too (compiled to a temporary folder), on the Neural Engine if present.
    from_package = CoreMLRunner(shard, "cpu_and_ne")
    out = from_package.step(step_inputs(rope, rng.standard_normal(arch.hidden_size), 0, context))
    assert np.isfinite(out["output_hidden_states"]).all()


@pytest.mark.macos
def test_real_core_ml_runs_a_late_window(shard, tiny_checkpoint, tiny_config):
    """The late window writes the KV states through Core ML's MLState (an fp16 array there
    was a crash: "value type not convertible")."""
    from anechain.validate import run_golden

    meta = read_package_metadata(shard)
    runner = CoreMLRunner(shard, "cpu_and_ne")
    golden, gates = run_golden(runner, meta, tiny_checkpoint, tiny_config.validation)
    assert "late" in golden.windows
    assert all(g.passed for g in gates), [g for g in gates if not g.passed]


@pytest.mark.ane
def test_strict_residency_on_the_neural_engine(shard):
    """On a Mac whose Core ML lists a Neural Engine, a tiny shard passes the strict gate."""
    from anechain.residency import check_residency

    report = check_residency(shard)
    assert report.status == "checked" and report.passed is True, report.failures


def stateless_head(inputs: dict) -> tuple[ModelProxy, object]:
    """A compiled head: `make_state` gives an empty state rather than refusing (so it cannot
    tell a stateless model), chunk outputs."""

    def run(function, feeds, buffers):
        assert buffers == {}  # predicted without a state
        h = feeds["hidden_states"].reshape(-1)
        return {"chunk_max": h[:2].reshape(1, 2), "chunk_argmax": np.array([[1, 0]], np.int32)}

    proxy = ModelProxy("head.mlmodelc", "", (inputs, {}, {}), run)
    return proxy, compiled_model(proxy)


@pytest.mark.parametrize("kind", ["mlpackage", "mlmodelc"])
def test_the_stateless_head_runs_without_a_state(tmp_path, tiny_checkpoint, tiny_config, kind):
    from anechain.compile import compile_package
    from anechain.export import export_head

    package = tmp_path / "head.mlpackage"
    export_head(tiny_checkpoint, package, tiny_config.export)
    compiler = FakeCompiler().compiler
    path = package
    if kind == "mlmodelc":
        path = compile_package(package, tmp_path / "c", compiler=compiler).compiled
    h = 64
    proxy, model = stateless_head({"hidden_states": ((1, h, 1, 1), np.float16)})
    runner = CoreMLRunner(path, load_model=lambda p, u: model, compiler=compiler)
    x = {"hidden_states": np.arange(h, dtype=np.float16).reshape(1, h, 1, 1)}
    out = runner.step(x)
    runner.reset()
    assert runner.step(x)["chunk_argmax"].tolist() == [[1, 0]]
    assert out["chunk_max"].dtype == np.float16
    # The description says there is no state: none is made.
    assert proxy.states_made == 0
    with pytest.raises(RunnerError, match="no state 'key_cache'"):
        runner.read_state("key_cache")
