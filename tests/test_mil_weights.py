"""The `mil` runner's compact conv weights (runners/mil_weights.py).

An INT8 weight with one scale per output channel is held as the program's int8 array and
its scales, an fp16 weight as its fp16 array, and expanded to float32 a block of rows at
a time. The expanded values are checked bit for bit against coremltools' own
materialization; every other weight falls back to today's float32 matrix; a runner with
compact weights computes what the dense runner computes (up to float32 summation order);
and the prefill runner shares the decode runner's weights exactly where the values are
equal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anechain.config import LayerRange
from anechain.export import LayerSpec, export_shard
from anechain.rope import RopeParameters, chunk_inputs, step_inputs
from anechain.runners import mil as mil_module
from anechain.runners import mil_weights
from anechain.runners.mil import MILRunner
from anechain.runners.mil_ops import conv_matrix
from anechain.runners.mil_weights import ConvWeight, WeightPool, compact_weight

RANGE = LayerRange(0, 2)


def _op(build: Any) -> Any:
    """The op that `build()` adds to a fresh iOS18 function (coremltools validates it)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Function

    with Function({}, opset_version=ct.target.iOS18):
        return build().op


def _quantized(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> Any:
    from coremltools.converters.mil import Builder as mb

    kw = {} if offset is None else {"offset": offset}
    return _op(lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, **kw))


def _const(value: np.ndarray) -> Any:
    from coremltools.converters.mil import Builder as mb

    return _op(lambda: mb.const(val=value))


def _coremltools_matrix(op: Any) -> np.ndarray:
    """Today's dense weight: the float32 matrix of coremltools' materialized value."""
    value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
    return conv_matrix(np.asarray(value))


def _fp16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Every finite fp16 (random bit patterns): subnormal, huge, negative, zero scales,
    so products round, underflow to subnormals and overflow to inf."""
    bits = rng.integers(0, 1 << 16, 4 * n).astype(np.uint16).view(np.float16)
    scale = bits[np.isfinite(bits)][:n].copy()
    scale[:3] = [0.0, -0.0, np.float16(0.01)]
    return scale


def _per_channel_cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(0)
    out, cols = 300, 24
    int8 = rng.integers(-128, 128, (out, cols, 1, 1)).astype(np.int8)
    int8[0, :2, 0, 0] = (-128, 127)
    uint8 = rng.integers(0, 256, (out, cols, 1, 1)).astype(np.uint8)
    fp16 = _fp16_scales(rng, out).reshape(out, 1, 1, 1)
    fp32 = (rng.standard_normal(out) * 10.0 ** rng.integers(-30, 30, out)).astype(np.float32)
    fp32 = fp32.reshape(out, 1, 1, 1)
    return [
        ("int8, fp16 scale", int8, fp16, None),
        ("uint8, fp16 scale", uint8, fp16, None),
        ("int8, fp32 scale", int8, fp32, None),
        ("int8, zero int8 offset", int8, fp16, np.zeros(fp16.shape, np.int8)),
        ("int8, zero fp16 offset", int8, fp16, np.zeros(fp16.shape, np.float16)),
        ("rank 3", int8[..., 0], fp16[..., 0], None),
    ]


@pytest.mark.parametrize("case", _per_channel_cases(), ids=lambda c: c[0])
def test_per_channel_weight_expands_to_coremltools_values_bit_for_bit(
    case: tuple[str, np.ndarray, np.ndarray, np.ndarray | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(data.astype(float32) * scale) rounded to the scale's dtype is coremltools' numpy
    arithmetic (scale * (data - offset) in the scale's dtype), bit for bit."""
    _, data, scale, offset = case
    monkeypatch.setattr(mil_weights, "_BLOCK_ELEMENTS", 7 * data.shape[1])  # several blocks
    op = _quantized(data, scale, offset)
    weight = compact_weight(op)
    assert weight is not None and weight.scale is not None
    assert weight.data.dtype == data.dtype and weight.shape == data.shape[:2]
    assert weight.nbytes == data.nbytes + scale.nbytes  # 1 byte a weight, plus the scales
    assert np.shares_memory(weight.data, op.data.val)  # the program's array, not a copy
    want = _coremltools_matrix(op)
    got = weight.dense()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert not np.isnan(want).any()  # (NaN payloads aside, the comparison is of bits)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fp16_weight_is_kept_in_fp16() -> None:
    rng = np.random.default_rng(1)
    value = rng.standard_normal((40, 16, 1, 1)).astype(np.float16)
    value[0, :3, 0, 0] = (-0.0, np.float16(6e-8), np.inf)
    op = _const(value)
    weight = compact_weight(op)
    assert weight is not None and weight.scale is None and weight.data.dtype == np.float16
    assert np.shares_memory(weight.data, op.outputs[0].val)
    want = _coremltools_matrix(op)
    np.testing.assert_array_equal(weight.dense().view(np.uint32), want.view(np.uint32))


def _fallback_ops() -> dict[str, Any]:
    """Weights the compact path must not take, each with what it would get wrong."""
    rng = np.random.default_rng(2)
    data = rng.integers(-127, 128, (12, 8, 1, 1)).astype(np.int8)
    per_row = rng.uniform(0.01, 0.02, (12, 1, 1, 1)).astype(np.float16)
    return {
        # Two scales per row (block size 4 < in): one scale per row would be wrong.
        "blockwise": _quantized(data, rng.uniform(0.01, 0.02, (12, 2, 1, 1)).astype(np.float16)),
        # One scale for several rows (block size 3 along out).
        "grouped rows": _quantized(data, rng.uniform(0.01, 0.02, (4, 1, 1, 1)).astype(np.float16)),
        "per tensor": _quantized(data, np.full((1, 1, 1, 1), 0.01, np.float16)),
        "offset": _quantized(data, per_row, rng.integers(-3, 4, per_row.shape).astype(np.int8)),
        # A zero fp32 offset makes coremltools compute the fp16-scaled weight in fp32.
        "zero fp32 offset": _quantized(data, per_row, np.zeros(per_row.shape, np.float32)),
    }


def test_other_weights_are_not_held_compactly() -> None:
    for name, op in _fallback_ops().items():
        assert compact_weight(op) is None, name
    fp32 = _const(np.ones((12, 8, 1, 1), np.float32))
    assert compact_weight(fp32) is None


def _save(prog: Any, path: Path) -> Path:
    from anechain.program import to_mlmodel

    to_mlmodel(prog).save(str(path))
    return path


def _conv_program(path: Path, weights: dict[str, dict[str, Any]], cols: int = 8) -> Path:
    """One function per entry of `weights` (function -> {conv name: weight builder}); each
    conv reads the input `x` (1, cols, 1, 2) and is an output; its weight is `<name>_weight`."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil import mil
    from coremltools.converters.mil.mil import Function, types

    prog = mil.Program()
    for fname, convs in weights.items():
        spec = {"x": mb.TensorSpec(shape=(1, cols, 1, 2), dtype=types.fp16)}
        with Function(spec, opset_version=ct.target.iOS18) as func:
            x = func.inputs["x"]
            outs = [mb.conv(x=x, weight=w(f"{n}_weight"), name=n) for n, w in convs.items()]
            func.set_outputs(outs)
            prog.add_function(fname, func)
    prog.default_function_name = next(iter(weights))
    prog.export_as_multifunction = len(weights) > 1
    return _save(prog, path)


def _builder(op_kind: str, **arrays: np.ndarray) -> Any:
    from coremltools.converters.mil import Builder as mb

    def build(name: str) -> Any:
        if op_kind == "const":
            return mb.const(val=arrays["val"], name=name)
        return mb.constexpr_blockwise_shift_scale(**arrays, name=name)

    return build


def test_fallback_weights_run_on_the_exact_dense_path(tmp_path: Path) -> None:
    """A weight that is not per channel keeps today's float32 matrix and product, bit for bit."""
    ops = _fallback_ops()
    convs = {}
    for name, op in ops.items():
        key = name.replace(" ", "_")
        if op.op_type == "const":
            convs[key] = _builder("const", val=op.outputs[0].val)
        else:
            arrays = {k: op.inputs[k].val for k in ("data", "scale", "offset") if k in op.inputs}
            convs[key] = _builder("constexpr", **arrays)
    rng = np.random.default_rng(3)
    data = rng.integers(-127, 128, (12, 8, 1, 1)).astype(np.int8)
    per_row = rng.uniform(0.01, 0.02, (12, 1, 1, 1)).astype(np.float16)
    convs["per_channel"] = _builder("constexpr", data=data, scale=per_row)
    package = _conv_program(tmp_path / "fallback.mlpackage", {"main": convs})

    runner = MILRunner(package, track_activations=False)
    x = rng.standard_normal((1, 8, 1, 2)).astype(np.float16)
    out = runner.step({"x": x})
    assert runner._weights["per_channel_weight"].data.dtype == np.int8
    for name, op in ops.items():
        key = name.replace(" ", "_")
        weight = runner._weights[f"{key}_weight"]
        assert weight.data.dtype == np.float32 and weight.scale is None, name
        want = _coremltools_matrix(op)
        np.testing.assert_array_equal(weight.data.view(np.uint32), want.view(np.uint32))
        product = (want @ x.astype(np.float32).reshape(8, 2)).astype(np.float16)
        np.testing.assert_array_equal(out[key].reshape(12, 2), product, err_msg=name)


# --- whole shards: compact against dense, both functions ------------------------------------


@pytest.fixture(scope="module", params=["int8", "none"])
def two_function_shard(request, tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    """Layers [0, 2) exported with decode and prefill functions, INT8 or fp16 weights."""
    settings = dataclasses.replace(tiny_config.export, prefill_tokens=4, quantization=request.param)
    path = tmp_path_factory.mktemp("compact") / f"layers_{request.param}.mlpackage"
    return export_shard(tiny_checkpoint, LayerSpec(RANGE, path), settings).path


def _runners(package: Path) -> tuple[MILRunner, MILRunner]:
    decode = MILRunner(package)
    return decode, MILRunner(package, function="prefill", state_from=decode)


def _run(decode: MILRunner, prefill: MILRunner, rope: RopeParameters) -> list[np.ndarray]:
    """Two prefill chunks (4 + 3 positions), then four decode steps; outputs, then states."""
    context = decode.inputs[-1].shape[-1]
    hidden = np.random.default_rng(4).standard_normal((11, decode.inputs[0].shape[1]))
    outs = []
    for offset, n in ((0, 4), (4, 3)):
        x = chunk_inputs(rope, hidden[offset : offset + n], offset, 4, context)
        outs.append(prefill.step(x)["output_hidden_states"])
    for p in range(7, 11):
        outs.append(decode.step(step_inputs(rope, hidden[p], p, context))["output_hidden_states"])
    return outs + [decode.read_state(s.name) for s in decode.states]


def test_compact_weights_compute_what_dense_weights_compute(
    two_function_shard: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both functions, several steps, KV states included. The weights are the same values;
    only float32 summation order differs, which can move an fp16 output by an ulp (then
    carried by later layers and steps, mixed across channels): the tolerance is 4 fp16 ulps
    of the output's largest value (4 * 2**-10 of max |want|), as a one-ulp difference in a
    large channel reaches small ones through the next layer's products."""
    rope = RopeParameters.from_hf_config(tiny_checkpoint.hf_config)
    monkeypatch.setattr(mil_weights, "_BLOCK_ELEMENTS", 1 << 12)  # several blocks a weight
    decode, prefill = _runners(two_function_shard)
    kinds = {w.data.dtype for w in decode._weights.values()}
    assert kinds == (
        {np.dtype(np.int8)} if "int8" in two_function_shard.name else {np.dtype(np.float16)}
    )
    compact = _run(decode, prefill, rope)

    monkeypatch.setattr(mil_module, "compact_weight", lambda op: None)  # today's path
    dense_decode, dense_prefill = _runners(two_function_shard)
    assert {w.data.dtype for w in dense_decode._weights.values()} == {np.dtype(np.float32)}
    dense = _run(dense_decode, dense_prefill, rope)

    for i, (got, want) in enumerate(zip(compact, dense, strict=True)):
        assert got.dtype == want.dtype == np.float16 and got.shape == want.shape, i
        g, w = got.astype(np.float64), want.astype(np.float64)
        assert np.isfinite(w).all() and w.any(), i
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=0, atol=4 * 2.0**-10 * scale, err_msg=f"output {i}")


def test_prefill_shares_the_decode_runners_weights(two_function_shard: Path) -> None:
    decode, prefill = _runners(two_function_shard)
    assert len(prefill._weights) == 4 * RANGE.num_layers
    for name, weight in prefill._weights.items():
        held = decode._weights[name]
        assert weight is held
        assert np.shares_memory(weight.data, held.data)
    # What the two runners hold: the blob's bytes once (1 byte a weight and a scale a row
    # for INT8, 2 bytes a weight for fp16).
    int8 = "int8" in two_function_shard.name
    for weight in decode._weights.values():
        rows, cols = weight.shape
        assert weight.nbytes == (rows * cols + 2 * rows if int8 else 2 * rows * cols)


# --- sharing decided by value ---------------------------------------------------------------


def test_sharing_is_by_value_never_by_name(tmp_path: Path) -> None:
    """Same names with other values are refused (one data value, one scale ulp, the sign
    of a zero); equal values under another name are shared."""
    rng = np.random.default_rng(5)
    data = rng.integers(-127, 128, (12, 8, 1, 1)).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, (12, 1, 1, 1)).astype(np.float16)
    fp16 = rng.standard_normal((12, 8, 1, 1)).astype(np.float16)
    fp16[0, 0, 0, 0] = 0.0
    other_data = data.copy()
    other_data[5, 3] = data[5, 3] + (1 if data[5, 3] < 127 else -1)
    other_scale = scale.copy()
    other_scale[7] = np.nextafter(scale[7], np.float16(1))
    signed_zero = fp16.copy()
    signed_zero[0, 0, 0, 0] = -0.0
    int8 = "constexpr"
    decode = {
        "same": _builder(int8, data=data, scale=scale),
        "data": _builder(int8, data=data, scale=scale),
        "scale": _builder(int8, data=data, scale=scale),
        "fp16": _builder("const", val=fp16),
        "fp16_zero": _builder("const", val=fp16),
    }
    prefill = {
        "same": _builder(int8, data=data.copy(), scale=scale.copy()),
        "data": _builder(int8, data=other_data, scale=scale),
        "scale": _builder(int8, data=data, scale=other_scale),
        "fp16": _builder("const", val=fp16.copy()),
        "fp16_zero": _builder("const", val=signed_zero),
        "renamed": _builder(int8, data=data.copy(), scale=scale.copy()),
    }
    package = _conv_program(tmp_path / "two.mlpackage", {"decode": decode, "prefill": prefill})
    dec = MILRunner(package)
    pre = MILRunner(package, function="prefill", state_from=dec)
    assert dec.function == "decode" and pre.function == "prefill"

    assert pre._weights["same_weight"] is dec._weights["same_weight"]
    assert pre._weights["fp16_weight"] is dec._weights["fp16_weight"]
    assert pre._weights["renamed_weight"] is dec._weights["same_weight"]  # found by value
    for name in ("data", "scale", "fp16_zero"):
        assert pre._weights[f"{name}_weight"] is not dec._weights[f"{name}_weight"], name
        assert not np.shares_memory(
            pre._weights[f"{name}_weight"].data, dec._weights[f"{name}_weight"].data
        ), name
        assert not pre._weights[f"{name}_weight"].same_values(dec._weights[f"{name}_weight"]), name

    # Each function computes with its own values.
    x = rng.standard_normal((1, 8, 1, 2)).astype(np.float16)
    got, dec_out = pre.step({"x": x}), dec.step({"x": x})
    cols = x.astype(np.float32).reshape(8, 2)
    for name, arrays in (("data", (other_data, scale)), ("scale", (data, other_scale))):
        weight = (arrays[0].astype(np.float32) * arrays[1].astype(np.float32)).astype(np.float16)
        want = (weight.astype(np.float32).reshape(12, 8) @ cols).astype(np.float16)
        np.testing.assert_allclose(
            got[name].reshape(12, 2).astype(np.float32), want.astype(np.float32), rtol=2e-3
        )
    assert not np.array_equal(got["data"], dec_out["data"])


def test_weight_pool_compares_every_bit() -> None:
    data = np.arange(-60, 60, dtype=np.int8).reshape(12, 10)
    scale = np.linspace(0.01, 0.02, 12).astype(np.float16)
    held = ConvWeight(data, scale)
    pool = WeightPool([held])
    assert pool.find(ConvWeight(data.copy(), scale.copy())) is held
    other = data.copy()
    other[6, 4] += 1  # neither the first nor the last row: past the fingerprint
    for weight in (
        ConvWeight(other, scale),
        ConvWeight(data, scale.astype(np.float32)),
        ConvWeight(data.view(np.uint8), scale),
        ConvWeight(data.astype(np.float16)),
    ):
        assert pool.find(weight) is weight
