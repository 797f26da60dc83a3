"""The Core ML runner: input checks from the model's own description, state handling, refusal
off macOS (fakes for CompiledMLModel); and, on macOS, the real compile -> plan -> predict."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.fakes.coreml import (
    FakeCompiledModel,
    FakeCompiler,
    FakeState,
    write_compiled_metadata,
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


def fake_runner(package: Path, **kwargs) -> tuple[CoreMLRunner, FakeCompiledModel, list]:
    contract = read_package_metadata(package).contract
    model = FakeCompiledModel({s.name: s.shape for s in contract.states})
    loads: list[tuple[str, str]] = []

    def load_model(compiled: str, units: str) -> FakeCompiledModel:
        loads.append((compiled, units))
        return model

    runner = CoreMLRunner(package, load_model=load_model, **kwargs)
    return runner, model, loads


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


def test_runner_over_a_compiled_model_reads_its_metadata(tmp_path):
    compiled = tmp_path / "s0.mlmodelc"
    write_compiled_metadata(
        compiled,
        {"hidden_states": ((1, 8, 1, 1), "Float16"), "position": ((1,), "Int32")},
        {"output_hidden_states": ((1, 8, 1, 1), "Float16")},
        {"key_cache": ((1, 1, 4, 2), "Float16")},
    )
    model = FakeCompiledModel({"key_cache": (1, 1, 4, 2)})
    runner = CoreMLRunner(compiled, "cpu_only", load_model=lambda path, units: model)
    good = {"hidden_states": np.ones((1, 8, 1, 1), np.float16), "position": np.array([3], np.int32)}
    out = runner.step(good)
    assert out["output_hidden_states"].dtype == np.float16
    assert (runner.read_state("key_cache")[:, :, 3] == 4).all()
    with pytest.raises(RunnerError, match="dtype float32, the model expects float16"):
        runner.step({**good, "hidden_states": np.ones((1, 8, 1, 1), np.float32)})
    assert compiled.is_dir()  # a given .mlmodelc is the caller's, not removed


def test_compiled_model_without_metadata_is_refused(tmp_path):
    compiled = tmp_path / "s0.mlmodelc"
    compiled.mkdir()
    with pytest.raises(RunnerError, match="no metadata.json"):
        CoreMLRunner(compiled, load_model=lambda path, units: None)


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

    model = FakeCompiledModel({"key_cache": (3, 2, 64, 16), "value_cache": (3, 2, 64, 16)})
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
    assert coreml.state_names == ["key_cache", "value_cache"]  # from the compiled schema
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


@pytest.mark.ane
def test_strict_residency_on_the_neural_engine(shard):
    """On a Mac whose Core ML lists a Neural Engine, a tiny shard passes the strict gate."""
    from anechain.residency import check_residency

    report = check_residency(shard)
    assert report.status == "checked" and report.passed is True, report.failures


class FakeStatelessHead:
    """Like CompiledMLModel of the head: make_state gives an empty state rather than refusing
    (so it cannot tell a stateless model), chunk outputs."""

    def __init__(self) -> None:
        self.states_asked = 0

    def make_state(self):
        self.states_asked += 1
        return FakeState({})

    def predict(self, data, state=None):
        assert state is None
        h = np.asarray(data["hidden_states"], dtype=np.float32).reshape(-1)
        return {"chunk_max": h[:2].reshape(1, 2), "chunk_argmax": np.array([[1, 0]], np.int32)}


@pytest.mark.parametrize("kind", ["mlpackage", "mlmodelc"])
def test_the_stateless_head_runs_without_a_state(tmp_path, tiny_checkpoint, tiny_config, kind):
    if kind == "mlpackage":
        from anechain.export import export_head

        path = tmp_path / "head.mlpackage"
        export_head(tiny_checkpoint, path, tiny_config.export)
        compiler = FakeCompiler().compiler
        h = 64
    else:
        path = tmp_path / "head.mlmodelc"
        write_compiled_metadata(
            path,
            {"hidden_states": ((1, 4, 1, 1), "Float16")},
            {"chunk_max": ((1, 2), "Float16"), "chunk_argmax": ((1, 2), "Int32")},
        )
        compiler = None
        h = 4
    model = FakeStatelessHead()
    runner = CoreMLRunner(path, load_model=lambda p, u: model, compiler=compiler)
    x = {"hidden_states": np.arange(h, dtype=np.float16).reshape(1, h, 1, 1)}
    out = runner.step(x)
    runner.reset()
    assert runner.step(x)["chunk_argmax"].tolist() == [[1, 0]]
    assert out["chunk_max"].dtype == np.float16
    # The description says there is no state (spec, or no stateSchema): none is made.
    assert model.states_asked == 0
    with pytest.raises(RunnerError, match="no state 'key_cache'"):
        runner.read_state("key_cache")
