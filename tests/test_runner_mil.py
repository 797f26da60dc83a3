"""The MIL runner: a saved shard, interpreted in numpy, against the torch module it came from.

The shards here are made in the test (trace -> convert -> INT8 -> save), from a tiny
2-layer LayerRangeModel with random weights, so they do not depend on `anechain.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anechain._traced import _layer_output_names
from anechain.config import Architecture, LayerRange, load_preset
from anechain.contract import MASK_VALUE, layer_contract
from anechain.errors import RunnerError
from anechain.model import LayerRangeModel
from anechain.package import load_program
from anechain.runners.mil import MILRunner

CONTEXT = 64
LAYERS = LayerRange(0, 2)
STEPS = 16


@pytest.fixture(scope="module")
def arch() -> Architecture:
    return load_preset("tiny").architecture


def _random_model(arch: Architecture, seed: int) -> LayerRangeModel:
    model = LayerRangeModel(arch, LAYERS, CONTEXT).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:  # gains near 1, not exactly 1 (so the mul stays)
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model


def _export(model: LayerRangeModel, path: Path, int8: bool) -> Path:
    """The exporter's path: jit.trace -> ct.convert (fp16, states) -> INT8 convs -> save."""
    import coremltools as ct
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
    )

    contract = layer_contract(model.arch, CONTEXT, LAYERS.num_layers)
    example = tuple(
        torch.zeros(s.shape, dtype=torch.int32 if s.dtype == "int32" else torch.float32)
        for s in contract.inputs
    )
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    mlmodel = ct.convert(
        traced,
        inputs=[
            ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype).type)
            for s in contract.inputs
        ],
        outputs=[ct.TensorType(name="output_hidden_states", dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=s.shape, dtype=np.float16), name=s.name)
            for s in contract.states
        ],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    if int8:
        op_config = OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
        mlmodel = linear_quantize_weights(
            mlmodel, OptimizationConfig(op_type_configs={"conv": op_config})
        )
    # What the exporter records: each layer's output var (the runner's layer attribution).
    names = _layer_output_names(mlmodel, model.range.num_layers)
    mlmodel.user_defined_metadata["anechain.layer_outputs"] = json.dumps(names)
    mlmodel.save(str(path))
    return path


def _with_exported_weights(model: LayerRangeModel, package: Path) -> LayerRangeModel:
    """Set the torch module's weights to the package's (dequantized INT8, fp16 gains)."""
    _, prog = load_program(package)
    weights = {
        op.name: op.materialized_val_inference()
        for op in prog.functions["main"].operations
        if op.op_type == "constexpr_blockwise_shift_scale"
    }
    quantized = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.replace(".", "_") + "_"
            match = [v for k, v in weights.items() if k.startswith(key)]
            if match:
                param.copy_(torch.from_numpy(match[0].astype(np.float32)).reshape(param.shape))
                quantized += 1
            else:  # stored as fp16 consts
                param.copy_(param.half().float())
    assert quantized == 4 * LAYERS.num_layers
    return model


def _step_inputs(arch: Architecture, p: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    rot = arch.rotary_dim
    inv_freq = arch.rope_theta ** (-np.arange(0, rot, 2) / rot)
    angles = np.concatenate([p * inv_freq, p * inv_freq]).reshape(1, 1, 1, rot)
    mask = np.full((1, 1, 1, CONTEXT), MASK_VALUE, np.float16)
    mask[..., : p + 1] = 0
    return {
        "hidden_states": rng.standard_normal((1, arch.hidden_size, 1, 1)).astype(np.float16),
        "position": np.array([p], np.int32),
        "cos": np.cos(angles).astype(np.float16),
        "sin": np.sin(angles).astype(np.float16),
        "attention_mask": mask,
    }


def _torch_step(model: LayerRangeModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    args = [
        torch.from_numpy(a) if a.dtype == np.int32 else torch.from_numpy(a.astype(np.float32))
        for a in inputs.values()
    ]
    with torch.no_grad():
        return model(*args).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def int8_shard(arch: Architecture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mil") / "tiny_int8.mlpackage"
    return _export(_random_model(arch, seed=0), out, int8=True)


@pytest.fixture(scope="module")
def decode(arch: Architecture, int8_shard: Path) -> dict[str, Any]:
    """16 decode steps through the runner and through torch, with the same inputs."""
    runner = MILRunner(int8_shard)
    reference = _with_exported_weights(_random_model(arch, seed=0), int8_shard)
    rng = np.random.default_rng(0)
    steps = []
    for p in range(STEPS):
        inputs = _step_inputs(arch, p, rng)
        out = runner.step(inputs)["output_hidden_states"]
        steps.append(
            {
                "input": inputs["hidden_states"],
                "out": out,
                "ref": _torch_step(reference, inputs),
                "first_nonfinite": runner.first_nonfinite,
                "layer_max_abs": list(runner.layer_max_abs),
            }
        )
    return {"runner": runner, "reference": reference, "steps": steps}


def test_runner_describes_the_shard(int8_shard: Path, arch: Architecture) -> None:
    runner = MILRunner(int8_shard)
    contract = layer_contract(arch, CONTEXT, LAYERS.num_layers)
    assert runner.name == "mil"
    assert runner.inputs == contract.inputs
    assert runner.outputs == contract.outputs
    assert runner.states == contract.states
    assert runner.num_layers == LAYERS.num_layers
    # Each projection is attributed to the layer whose recorded output it precedes.
    _, prog = load_program(int8_shard)
    convs = [op.name for op in prog.functions["main"].operations if op.op_type == "conv"]
    assert [runner.op_layers[name] for name in convs] == [0] * 4 + [1] * 4


def test_matches_torch_step_by_step(decode: dict[str, Any]) -> None:
    for p, s in enumerate(decode["steps"]):
        assert s["out"].dtype == np.float16 and s["out"].shape == s["ref"].shape
        assert _cosine(s["out"], s["ref"]) >= 0.999, p
        # The residual dominates the output; the layers' own contribution must match too.
        delta, ref_delta = s["out"] - s["input"], s["ref"] - s["input"]
        assert _cosine(delta, ref_delta) >= 0.999, p


def test_kv_state_matches_torch_buffers(decode: dict[str, Any]) -> None:
    runner, reference = decode["runner"], decode["reference"]
    for name in ("key_cache", "value_cache"):
        got = runner.read_state(name)
        want = getattr(reference, name).numpy()
        assert got.dtype == np.float16 and got.shape == want.shape
        written = got[:, :, :STEPS].astype(np.float32)
        assert _cosine(written, want[:, :, :STEPS]) >= 0.999
        np.testing.assert_allclose(written, want[:, :, :STEPS], atol=5e-3)
        assert not got[:, :, STEPS:].any()  # nothing written past the last position


def test_diagnostics_of_a_healthy_run(decode: dict[str, Any]) -> None:
    for s in decode["steps"]:
        assert s["first_nonfinite"] is None
        peaks = s["layer_max_abs"]
        assert len(peaks) == LAYERS.num_layers
        # Real activations (a few units), not the mask's -30000.
        assert all(0.5 < v < 100 for v in peaks), peaks


def test_reset_zeroes_states_and_replays(arch: Architecture, int8_shard: Path) -> None:
    runner = MILRunner(int8_shard, track_activations=False)
    inputs = _step_inputs(arch, 0, np.random.default_rng(1))
    first = runner.step(inputs)["output_hidden_states"]
    assert runner.read_state("key_cache").any()
    assert runner.first_nonfinite is None and runner.layer_max_abs == []
    runner.step(_step_inputs(arch, 1, np.random.default_rng(2)))
    runner.reset()
    assert not runner.read_state("key_cache").any()
    assert not runner.read_state("value_cache").any()
    np.testing.assert_array_equal(runner.step(inputs)["output_hidden_states"], first)


def test_inputs_are_checked(arch: Architecture, int8_shard: Path) -> None:
    runner = MILRunner(int8_shard)
    good = _step_inputs(arch, 0, np.random.default_rng(0))
    with pytest.raises(RunnerError, match="missing input 'cos'"):
        runner.step({k: v for k, v in good.items() if k != "cos"})
    with pytest.raises(RunnerError, match=r"input 'hidden_states' has shape \(1, 64\)"):
        runner.step({**good, "hidden_states": good["hidden_states"].reshape(1, 64)})
    with pytest.raises(RunnerError, match="unknown input 'bogus'"):
        runner.step({**good, "bogus": good["cos"]})
    with pytest.raises(RunnerError, match="'position' has dtype float32"):
        runner.step({**good, "position": np.array([0.0], np.float32)})
    with pytest.raises(RunnerError, match="no state 'cache'"):
        runner.read_state("cache")
    # A position outside the context is a RunnerError, not a silent empty write.
    with pytest.raises(RunnerError, match="slice_update"):
        runner.step({**good, "position": np.array([CONTEXT], np.int32)})


def test_nonfinite_is_located(arch: Architecture, tmp_path: Path) -> None:
    model = _random_model(arch, seed=1)
    with torch.no_grad():  # layer 1's MLP overflows fp16: |gate * up| ~ 1e5 > 65504
        model.layers[1].mlp.gate_up_proj.weight.mul_(1000.0)
    package = _export(model, tmp_path / "overflow.mlpackage", int8=False)  # fp16 weights
    runner = MILRunner(package)
    out = runner.step(_step_inputs(arch, 0, np.random.default_rng(0)))
    assert not np.isfinite(out["output_hidden_states"]).all()
    found = runner.first_nonfinite
    assert found is not None and found["layer"] == 1, found
    assert found["op_type"] in ("conv", "mul", "silu"), found
    _, prog = load_program(package)
    assert found["op"] in {op.name for op in prog.functions["main"].operations}
    assert len(runner.layer_max_abs) == 2
    assert runner.layer_max_abs[0] < 100 < runner.layer_max_abs[1]

    good = _step_inputs(arch, 1, np.random.default_rng(0))
    good["hidden_states"][0, 3] = np.nan
    runner.step(good)
    assert runner.first_nonfinite == {"op": "hidden_states", "op_type": "input", "layer": 0}


def _mil_package(build: Any, path: Path, **input_specs: Any) -> Path:
    """Save a program built with the MIL builder, without graph passes (ops stay as built)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    prog = mb.program(input_specs=list(input_specs.values()), opset_version=ct.target.iOS18)(build)
    mlmodel = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    mlmodel.save(str(path))
    return path


def test_unknown_op_is_refused_by_name(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    def build(x: Any) -> Any:
        return mb.erf(x=mb.add(x=x, y=np.float16(1.0)), name="my_erf")

    spec = mb.TensorSpec(shape=(1, 4), dtype=types.fp16)
    package = _mil_package(build, tmp_path / "erf.mlpackage", x=spec)
    with pytest.raises(RunnerError, match=r"op 'my_erf' has type 'erf'"):
        MILRunner(package)


def test_non_1x1_conv_is_refused(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    weight = np.ones((2, 3, 3, 3), np.float16)

    def build(x: Any) -> Any:
        return mb.conv(x=x, weight=weight, pad_type="same", name="conv3x3")

    spec = mb.TensorSpec(shape=(1, 3, 5, 5), dtype=types.fp16)
    package = _mil_package(build, tmp_path / "conv3.mlpackage", x=spec)
    with pytest.raises(RunnerError, match=r"conv op 'conv3x3'.*1x1"):
        MILRunner(package)


def test_runs_the_exporters_shards_in_a_chain(
    arch: Architecture, tiny_shards: dict[LayerRange, Path]
) -> None:
    """The packages `anechain.export` writes (the tiny preset's 3:2:1 topology) run and chain."""
    inputs = _step_inputs(arch, 0, np.random.default_rng(0))
    hidden = inputs["hidden_states"]
    for layers, path in sorted(tiny_shards.items()):
        runner = MILRunner(path)
        assert runner.num_layers == layers.num_layers
        assert runner.states[0].shape[0] == layers.num_layers
        context = runner.inputs[-1].shape[-1]
        mask = np.full((1, 1, 1, context), MASK_VALUE, np.float16)
        mask[..., 0] = 0
        out = runner.step({**inputs, "hidden_states": hidden, "attention_mask": mask})
        assert runner.first_nonfinite is None
        assert len(runner.layer_max_abs) == layers.num_layers
        assert not np.array_equal(out["output_hidden_states"], hidden)
        hidden = out["output_hidden_states"]
    assert np.isfinite(hidden).all()


def test_layers_come_from_the_exporters_record(int8_shard: Path, tmp_path: Path) -> None:
    """Layer outputs and op attribution follow `anechain.layer_outputs`; a record naming a
    var the program does not produce, or out of program order, is refused."""
    import coremltools as ct

    runner = MILRunner(int8_shard)
    contract_inputs = {s.name: np.zeros(s.shape, np.dtype(s.dtype)) for s in runner.inputs}
    contract_inputs["hidden_states"] = np.full(runner.inputs[0].shape, 0.5, np.float16)
    out = runner.step(contract_inputs)["output_hidden_states"]
    assert len(runner.layer_outputs) == 2
    np.testing.assert_array_equal(runner.layer_outputs[-1], out)  # the last layer's output
    assert not np.array_equal(runner.layer_outputs[0], runner.layer_outputs[1])

    model = ct.models.MLModel(str(int8_shard), skip_model_load=True)
    names = json.loads(model.user_defined_metadata["anechain.layer_outputs"])
    for bad, why in ((["nope", names[1]], "which no op produces"), (names[::-1], "order")):
        model.user_defined_metadata["anechain.layer_outputs"] = json.dumps(bad)
        path = tmp_path / f"bad{len(why)}.mlpackage"
        model.save(str(path))
        with pytest.raises(RunnerError, match=why):
            MILRunner(path)


def test_write_state_replaces_a_state(int8_shard: Path) -> None:
    runner = MILRunner(int8_shard)
    spec = runner.states[0]
    value = np.full(spec.shape, 0.25, np.float16)
    runner.write_state(spec.name, value)
    np.testing.assert_array_equal(runner.read_state(spec.name), value)
    value[:] = 0  # the runner holds its own copy
    assert runner.read_state(spec.name).max() == np.float16(0.25)
    with pytest.raises(RunnerError, match="cannot write"):
        runner.write_state(spec.name, np.zeros((1, 2), np.float16))
    with pytest.raises(RunnerError, match="no state"):
        runner.write_state("nope", value)
    runner.reset()
    assert runner.read_state(spec.name).max() == 0
