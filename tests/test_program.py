"""The MIL Builder path: INT8 rounding against coremltools itself, reproducible packages,
per-layer output names, one tensor read at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anechain.config import LayerRange
from anechain.contract import read_package_metadata
from anechain.export import LAYER_OUTPUTS_KEY, LayerSpec, export_shard
from anechain.fsutil import sha256_tree
from anechain.package import load_program
from anechain.weights import quantize_int8


def _coremltools_int8(w16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What `linear_quantize_weights(linear_symmetric, int8, per_channel)` stores for a conv."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import compute_qparams_by_dtype

    w = w16.reshape(*w16.shape, 1, 1)
    data, scale, _ = compute_qparams_by_dtype(w, types.int8, "LINEAR_SYMMETRIC", [1, 0, 0, 0])
    return data, scale


def _hard_weights() -> np.ndarray:
    """fp16 rows that discriminate between roundings: ties, tiny and huge rows, subnormals."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(64) * 10.0 ** rng.integers(-4, 3) for _ in range(60)]
    ties = np.arange(-127, 128, dtype=np.float64)[:64] + 0.5  # k + 0.5 steps of max/127
    rows.append(np.concatenate([[127.0], ties[:63]]) / 127.0 * 3.0)
    rows.append(np.full(64, 6e-8))  # subnormal fp16 row
    rows.append(np.linspace(-40000.0, 40000.0, 64))  # 2 * max overflows fp16: scale inf
    rows.append(rng.standard_normal(64) * 1e-3 + 1000.0)
    return np.stack(rows).astype(np.float16)


def test_int8_matches_coremltools_bit_for_bit():
    w16 = _hard_weights()
    ref_data, ref_scale = _coremltools_int8(w16)
    for source in (torch.from_numpy(w16), torch.from_numpy(w16).to(torch.bfloat16)):
        got = quantize_int8(source)
        want_data, want_scale = (
            (ref_data, ref_scale)
            if source.dtype == torch.float16
            else _coremltools_int8(source.to(torch.float16).numpy())
        )
        assert got.data.dtype == np.int8 and got.scale.dtype == np.float16
        assert got.data.shape == (w16.shape[0], w16.shape[1], 1, 1)
        np.testing.assert_array_equal(got.data, want_data)
        np.testing.assert_array_equal(got.scale.reshape(-1), want_scale.reshape(-1))


def test_int8_check_rejects_other_roundings():
    """The data above tells a fp32 (unrounded) quotient and round-half-away apart."""
    w16 = _hard_weights()
    ref_data, _ = _coremltools_int8(w16)
    q = quantize_int8(torch.from_numpy(w16))
    scale = q.scale.reshape(-1, 1).astype(np.float32)
    w = w16.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        fp32_quotient = np.nan_to_num(np.clip(np.round(w / scale), -127, 127)).astype(np.int8)
        half_away = np.nan_to_num(
            np.clip(np.trunc(w / scale + np.copysign(0.5, w)), -127, 127)
        ).astype(np.int8)
    for wrong in (fp32_quotient, half_away):
        assert not np.array_equal(wrong.reshape(ref_data.shape), ref_data)


def test_int8_out_of_fp16_range_and_zero_rows():
    w = torch.zeros(3, 8, dtype=torch.float32)
    w[1] = torch.linspace(-1e5, 1e5, 8)  # beyond fp16: quantized in fp32
    w[2] = torch.linspace(-1.0, 1.0, 8)
    q = quantize_int8(w)
    assert np.all(q.data[0] == 0) and q.scale[0] == 0  # zero row: no NaN cast to int8
    deq = q.data.reshape(3, 8).astype(np.float32) * q.scale.reshape(3, 1).astype(np.float32)
    np.testing.assert_allclose(deq[1], w[1].numpy(), rtol=0.01, atol=1e5 / 127)
    assert np.abs(q.data[1]).max() == 127
    with pytest.raises(Exception, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


def test_export_is_reproducible_across_processes(tiny_checkpoint, tiny_config, tmp_path):
    """Byte-identical packages, also from another process with another hash seed."""
    layers = LayerRange(5, 6)
    a = export_shard(
        tiny_checkpoint, LayerSpec(layers, tmp_path / "a.mlpackage"), tiny_config.export
    )
    b = export_shard(
        tiny_checkpoint, LayerSpec(layers, tmp_path / "b.mlpackage"), tiny_config.export
    )
    code = (
        "import sys; from pathlib import Path; from anechain.checkpoint import Checkpoint;"
        "from anechain.config import LayerRange, load_preset;"
        "from anechain.export import LayerSpec, export_shard;"
        "export_shard(Checkpoint(sys.argv[1]), LayerSpec(LayerRange(5, 6), Path(sys.argv[2])),"
        " load_preset('tiny').export)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    c = tmp_path / "c.mlpackage"
    subprocess.run(
        [sys.executable, "-c", code, str(tiny_checkpoint.path), str(c)],
        check=True,
        env=env,
        capture_output=True,
    )
    digests = {sha256_tree(p) for p in (a.path, b.path, c)}
    assert len(digests) == 1
    manifest = json.loads((a.path / "Manifest.json").read_text())
    assert len(manifest["itemInfoEntries"]) == 2
    # A different range is a different package (the digest sees the content).
    other = export_shard(
        tiny_checkpoint, LayerSpec(LayerRange(4, 5), tmp_path / "d.mlpackage"), tiny_config.export
    )
    assert sha256_tree(other.path) not in digests


@pytest.mark.parametrize("layers", [LayerRange(0, 3), LayerRange(5, 6)])
def test_layer_outputs_metadata_names_each_layers_output(tiny_shards, layers):
    path = tiny_shards[layers]
    names = json.loads(read_package_metadata(path).extra[LAYER_OUTPUTS_KEY])
    assert len(names) == layers.num_layers
    assert names[-1] == "output_hidden_states"
    _, prog = load_program(path)
    ops = list(prog.functions["main"].operations)
    producer = {v.name: (i, op) for i, op in enumerate(ops) for v in op.outputs}
    positions = []
    for k, name in enumerate(names):
        i, op = producer[name]
        positions.append(i)
        # The residual add that follows layer k's down_proj conv.
        assert op.op_type == "add"
        assert any(
            v.op is not None and v.op.op_type == "conv" and v.op.name == f"layers_{k}_mlp_down"
            for v in op.inputs.values()
        )
    assert positions == sorted(positions)


def test_projection_tensors_are_streamed(tiny_checkpoint, tiny_config, tmp_path):
    """At most three of the range's 12 projection tensors alive at once (two quantizing,
    one just read): the range is never held in bf16 or fp32."""
    import gc
    import weakref

    from anechain import export as export_mod

    alive: list[weakref.ref] = []
    peak = [0]
    real = export_mod.iter_tensors

    def tracking(checkpoint, names):
        for name, tensor in real(checkpoint, names):
            gc.collect()
            live = sum(r() is not None for r in alive)
            peak[0] = max(peak[0], live)
            if tensor.ndim == 2:
                alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    original = export_mod.iter_tensors
    export_mod.iter_tensors = tracking
    try:
        export_shard(
            tiny_checkpoint,
            LayerSpec(LayerRange(0, 3), tmp_path / "s.mlpackage"),
            tiny_config.export,
        )
    finally:
        export_mod.iter_tensors = original
    assert len(alive) == 12
    assert peak[0] <= 3


def test_iter_tensor_check_sees_a_held_tensor():
    """The tracker above does see a tensor someone keeps (so its 0 means something)."""
    import gc
    import weakref

    kept = [torch.zeros(2, 2)]
    ref = weakref.ref(kept[0])
    gc.collect()
    assert ref() is not None
    del kept
    gc.collect()
    assert ref() is None


def test_head_streams_chunks_and_matches_whole_matrix_quantization(tiny_checkpoint):
    """Chunked reading + per-chunk quantization == quantizing the whole LM head at once."""
    from anechain.head import head_tensor_names
    from anechain.weights import read_head_weights

    names = list(head_tensor_names(tiny_checkpoint))
    weights = read_head_weights(tiny_checkpoint, names, 128, "int8")
    whole = quantize_int8(tiny_checkpoint.read_tensors([names[1]])[names[1]])
    data = np.concatenate([c.quantized.data for c in weights.chunks])
    scale = np.concatenate([c.quantized.scale for c in weights.chunks])
    np.testing.assert_array_equal(data, whole.data)
    np.testing.assert_array_equal(scale, whole.scale)
    assert [c.out_channels for c in weights.chunks] == [128] * 4


def test_read_rows_reads_only_those_rows(tiny_checkpoint):
    name = "model.embed_tokens.weight"
    full = tiny_checkpoint.read_tensors([name])[name]
    assert torch.equal(tiny_checkpoint.read_rows(name, 100, 228), full[100:228])
    assert tiny_checkpoint.tensor_shape(name) == tuple(full.shape)


def test_embedding_table_written_in_blocks(tiny_checkpoint, tmp_path):
    from anechain.export import export_embedding

    result = export_embedding(tiny_checkpoint, tmp_path / "e.npy")
    table = np.load(result.path)
    name = "model.embed_tokens.weight"
    want = tiny_checkpoint.read_tensors([name])[name].to(torch.float16).numpy()
    assert table.dtype == np.float16 and np.array_equal(table, want)


def test_tokens_parameter_builds_a_prefill_function(tiny_checkpoint, tiny_config):
    """T = 4 tokens: activations (1, C, 1, T), KV written at position .. position + T."""
    from coremltools.converters.mil import mil

    from anechain.contract import IOContract, TensorSpec, layer_contract
    from anechain.export import iter_tensors
    from anechain.program import LayerIO, emit_layers
    from anechain.weights import read_range_weights

    arch = tiny_checkpoint.architecture
    ctx, t = tiny_config.export.context_length, 4
    decode = layer_contract(arch, ctx, 1)
    inputs = tuple(
        TensorSpec(s.name, s.shape[:-2] + (t, s.shape[-1]), s.dtype)
        if s.name in ("cos", "sin", "attention_mask")
        else TensorSpec(s.name, (1, arch.hidden_size, 1, t), s.dtype)
        if s.name == "hidden_states"
        else s
        for s in decode.inputs
    )
    contract = IOContract(inputs, decode.outputs, decode.states)
    layers = LayerRange(2, 3)
    tensors = iter_tensors(tiny_checkpoint, tiny_checkpoint.layer_tensor_names(layers))
    weights = read_range_weights(tensors, layers, "int8")
    prog = mil.Program()
    with mil.Function(LayerIO.placeholders(contract), opset_version=_ios18()) as func:
        io = LayerIO(**func.inputs)
        outs = emit_layers(io, weights, arch, ctx, tokens=t)
        func.set_outputs(outs)
        prog.add_function("main", func)
    assert tuple(outs[-1].shape) == (1, arch.hidden_size, 1, t)
    ops = list(prog.functions["main"].operations)
    assert sum(op.op_type == "conv" for op in ops) == 4
    writes = [op for op in ops if op.op_type == "slice_update"]
    assert len(writes) == 2 and all(tuple(op.update.shape) == (1, 2, t, 16) for op in writes)
    assert prog.functions["main"].inputs["cos"].shape == (1, 1, t, arch.rotary_dim)


def _ios18():
    import coremltools as ct

    return ct.target.iOS18


def test_one_weight_feeds_two_functions_with_one_blob(tiny_checkpoint):
    """Weight consts carry their name as weight_id: emitted twice, serialized once."""
    from coremltools.converters.mil.mil import Function, types

    from anechain.weights import Weight

    w = Weight.from_tensor("layers_0_x_weight", torch.randn(8, 4), "int8")
    ids = []
    for _ in range(2):
        with Function({"x": _placeholder(types)}, opset_version=_ios18()):
            var = w.emit()
            ids.append([v.op.weight_id for v in var.op.inputs.values()])
    assert ids[0] == ids[1] == ["layers_0_x_weight_data", "layers_0_x_weight_scale"]


def _placeholder(types):
    from coremltools.converters.mil import Builder as mb

    return mb.placeholder(shape=(1, 4, 1, 1), dtype=types.fp16)


def test_package_path_is_not_in_the_package(tiny_shards):
    """Nothing machine- or time-dependent: no temp path or timestamp in the model spec."""
    path = next(iter(tiny_shards.values()))
    blob = (path / "Data/com.apple.CoreML/model.mlmodel").read_bytes()
    assert b"/tmp" not in blob and str(Path.home()).encode() not in blob
    assert b"2026-" not in blob


def test_export_never_traces_or_runs_the_quantization_pass(
    tiny_checkpoint, tiny_config, tmp_path, monkeypatch
):
    """plan and build export through export_shard/export_head: no torch.jit, no INT8 pass."""
    import coremltools.optimize.coreml as cto

    from anechain import export as export_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("the traced path was used")

    monkeypatch.setattr(torch.jit, "trace", forbidden)
    monkeypatch.setattr(cto, "linear_quantize_weights", forbidden)
    export_mod.export_shard(
        tiny_checkpoint, LayerSpec(LayerRange(5, 6), tmp_path / "s.mlpackage"), tiny_config.export
    )
    export_mod.export_head(tiny_checkpoint, tmp_path / "h.mlpackage", tiny_config.export)
    # The guard is live: the traced path trips it.
    from anechain._traced import export_shard_traced

    with pytest.raises(AssertionError, match="traced path"):
        export_shard_traced(
            tiny_checkpoint,
            LayerSpec(LayerRange(5, 6), tmp_path / "t.mlpackage"),
            tiny_config.export,
        )


def test_weight_arrays_flatten_to_a_view_with_the_same_bytes():
    """coremltools flattens each weight before writing it; ours hands it a view, not a copy."""
    from anechain.weights import _FlatView

    a = np.arange(24, dtype=np.int8).reshape(6, 4, 1, 1).view(_FlatView)
    flat = a.flatten()
    assert np.shares_memory(flat, a) and np.array_equal(flat, np.asarray(a).ravel())
    f_order = a.flatten("F")  # any other order is numpy's copy
    assert not np.shares_memory(f_order, a)
    assert np.array_equal(f_order, np.asarray(a).flatten("F"))


def _assert_within_ulps(got: np.ndarray, want: np.ndarray, ulps: int) -> None:
    """fp16 arrays equal within `ulps` fp16 ulps of the expected array's largest magnitude.

    A value that ends a sum of larger terms (the residual stream) carries the rounding of
    those terms, so the unit is the ulp at the array's scale, not at each value (measured
    here: at most 1 such ulp, in about a sixth of the first chunk's values; the second
    chunk exact)."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float16
    tolerance = ulps * float(np.spacing(np.abs(want).max()))
    diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
    assert np.all(diff <= tolerance), f"max {float(diff.max())} beyond {ulps} ulps ({tolerance})"


def _prefill_inputs(rope, hidden: np.ndarray, start: int, context: int) -> dict[str, np.ndarray]:
    """T-token inputs for positions start .. start + T - 1 (hidden: (T, C))."""
    from anechain.rope import step_inputs

    steps = [step_inputs(rope, h, start + t, context) for t, h in enumerate(hidden)]
    return {
        "hidden_states": np.concatenate([s["hidden_states"] for s in steps], axis=3),
        "position": steps[0]["position"],
        "cos": np.concatenate([s["cos"] for s in steps], axis=2),
        "sin": np.concatenate([s["sin"] for s in steps], axis=2),
        "attention_mask": np.concatenate([s["attention_mask"] for s in steps], axis=2),
    }


def test_t_token_layers_compute_what_t_decode_steps_do(tiny_checkpoint, tiny_config, tmp_path):
    """The T = 4 emission (prefill) from the same weights: its outputs and KV states equal
    four decode steps within 2 fp16 ulps (the runner's fp32 sums run in another order for a
    (C, T) GEMM than for T GEMVs, so an fp16 rounding can land one ulp apart)."""
    from coremltools.converters.mil import mil

    from anechain.contract import IOContract, TensorSpec, layer_contract
    from anechain.export import iter_tensors
    from anechain.program import LayerIO, emit_layers, layer_program, to_mlmodel
    from anechain.rope import RopeParameters, step_inputs
    from anechain.runners.mil import MILRunner
    from anechain.weights import read_range_weights

    arch = tiny_checkpoint.architecture
    ctx, t, layers = tiny_config.export.context_length, 4, LayerRange(3, 5)
    names = tiny_checkpoint.layer_tensor_names(layers)
    weights = read_range_weights(iter_tensors(tiny_checkpoint, names), layers, "int8")
    decode = layer_contract(arch, ctx, layers.num_layers)
    shaped = {
        "hidden_states": (1, arch.hidden_size, 1, t),
        "cos": (1, 1, t, arch.rotary_dim),
        "sin": (1, 1, t, arch.rotary_dim),
        "attention_mask": (1, 1, t, ctx),
    }
    inputs = tuple(TensorSpec(s.name, shaped.get(s.name, s.shape), s.dtype) for s in decode.inputs)
    prefill_contract = IOContract(inputs, decode.outputs, decode.states)
    prog = mil.Program()
    with mil.Function(LayerIO.placeholders(prefill_contract), opset_version=_ios18()) as func:
        outs = emit_layers(LayerIO(**func.inputs), weights, arch, ctx, tokens=t)
        func.set_outputs([outs[-1]])
        prog.add_function("main", func)
    to_mlmodel(prog, tmp_path / "prefill.mlpackage")
    decode_prog, _ = layer_program(decode, weights, arch, ctx)
    to_mlmodel(decode_prog, tmp_path / "decode.mlpackage")

    rope = RopeParameters.from_hf_config(tiny_checkpoint.hf_config)
    hidden = np.random.default_rng(5).standard_normal((2 * t, arch.hidden_size)) * 2.0
    one = MILRunner(tmp_path / "decode.mlpackage")
    many = MILRunner(tmp_path / "prefill.mlpackage")
    one.reset()
    many.reset()
    # Two chunks: positions 0..3, then 4..7 (the second reads what the first wrote).
    for chunk in range(2):
        rows = hidden[chunk * t : (chunk + 1) * t]
        want = [
            one.step(step_inputs(rope, h, chunk * t + i, ctx))["output_hidden_states"]
            for i, h in enumerate(rows)
        ]
        got = many.step(_prefill_inputs(rope, rows, chunk * t, ctx))["output_hidden_states"]
        assert got.shape == (1, arch.hidden_size, 1, t)
        _assert_within_ulps(got, np.concatenate(want, axis=3), 2)
    for name in ("key_cache", "value_cache"):
        written = many.read_state(name)
        assert np.count_nonzero(written[:, :, : 2 * t]) and not np.any(written[:, :, 2 * t :])
        _assert_within_ulps(written, one.read_state(name), 2)

    # The comparison sees a wrong prefill: every token attending to the whole chunk.
    many.reset()
    leaky = _prefill_inputs(rope, hidden[:t], 0, ctx)
    leaky["attention_mask"][..., :t] = 0
    got = many.step(leaky)["output_hidden_states"]
    one.reset()
    want = [
        one.step(step_inputs(rope, h, i, ctx))["output_hidden_states"]
        for i, h in enumerate(hidden[:t])
    ]
    with pytest.raises(AssertionError, match="ulps"):
        _assert_within_ulps(got, np.concatenate(want, axis=3), 2)
