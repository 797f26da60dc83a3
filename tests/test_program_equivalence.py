"""The built program equals the traced one (the executable specification), both ways exported.

Same op kinds and counts, same INT8 data and fp16 scales, same fp16 norm gains, and the
same fp16 outputs and KV states under the `mil` runner over 16 decode steps. The outputs
are compared bit for bit: the builder emits the converter's ops in the same order with
the same constants (including inverse's fp32 epsilon 1e-4 and rsqrt's 1e-12), and the
runner evaluates each op the same way, so there is no ulp of difference to explain; a
mismatch of even one ulp means the two programs differ and fails the test.

`const` ops are not compared: the converter deduplicates equal small constants (slice
bounds, axes) that the builder writes once per use; they are values, not computation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anechain._traced import export_head_traced, export_shard_traced
from anechain.config import LayerRange
from anechain.contract import read_package_metadata
from anechain.export import LAYER_OUTPUTS_KEY, LayerSpec, export_head, export_shard
from anechain.package import load_program
from anechain.rope import RopeParameters, step_inputs
from anechain.runners.mil import MILRunner

STEPS = 16


def _program_facts(path: Path) -> dict:
    """Op counts (consts aside), INT8 data/scales in op order, fp16 norm gains by use."""
    spec, prog = load_program(path)
    # The decode function: `main`, or `decode` beside `prefill` (the preset's prefill_tokens).
    ops = list(prog.functions[spec.description.defaultFunctionName or "main"].operations)
    counts: dict[str, int] = {}
    for op in ops:
        if op.op_type != "const":
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
    quant = [
        (op.data.val, op.scale.val) for op in ops if op.op_type == "constexpr_blockwise_shift_scale"
    ]
    # Gains: the const operand of the mul that ends each RMSNorm, in op order.
    gains = [
        v.val
        for op in ops
        if op.op_type == "mul"
        for v in op.inputs.values()
        if v.op is not None and v.op.op_type == "const" and v.val is not None and v.val.size > 1
    ]
    return {"counts": counts, "quant": quant, "gains": gains}


def _differences(a: Path, b: Path) -> list[str]:
    fa, fb = _program_facts(a), _program_facts(b)
    out = []
    if fa["counts"] != fb["counts"]:
        out.append(f"op counts {fa['counts']} != {fb['counts']}")
    if len(fa["quant"]) != len(fb["quant"]):
        out.append("number of INT8 weights")
    for n, ((da, sa), (db, sb)) in enumerate(zip(fa["quant"], fb["quant"], strict=False)):
        if da.dtype != np.int8 or not np.array_equal(da, db):
            out.append(f"INT8 data of weight {n}")
        if sa.dtype != np.float16 or not np.array_equal(sa, sb):
            out.append(f"scales of weight {n}")
    same_gains = len(fa["gains"]) == len(fb["gains"]) and all(
        ga.dtype == np.float16 and np.array_equal(ga, gb)
        for ga, gb in zip(fa["gains"], fb["gains"], strict=True)
    )
    if not same_gains:
        out.append("norm gains")
    return out


def _run(path: Path, checkpoint, context: int, steps: int = STEPS) -> tuple[list, dict]:
    """Outputs and final states of `steps` decode steps with trained-like hidden states."""
    rope = RopeParameters.from_hf_config(checkpoint.hf_config)
    runner = MILRunner(path)
    runner.reset()
    rng = np.random.default_rng(7)
    hidden = checkpoint.architecture.hidden_size
    outputs = []
    for p in range(steps):
        x = rng.standard_normal(hidden) * 2.0
        x[[1, hidden // 2]] = [300.0, -900.0]  # outlier channels: the fp16-safe norm at work
        out = runner.step(step_inputs(rope, x, p, context))
        outputs.append(out)
    states = {s.name: runner.read_state(s.name).copy() for s in runner.states}
    return outputs, states


def _run_head(path: Path, hidden: int) -> list:
    runner = MILRunner(path)
    rng = np.random.default_rng(3)
    return [
        runner.step(
            {
                "hidden_states": (rng.standard_normal(hidden) * 3)
                .astype(np.float16)
                .reshape(1, -1, 1, 1)
            }
        )
        for _ in range(STEPS)
    ]


def _assert_same_outputs(a: list, b: list) -> None:
    for step, (oa, ob) in enumerate(zip(a, b, strict=True)):
        assert oa.keys() == ob.keys()
        for key in oa:
            assert oa[key].dtype == ob[key].dtype
            assert np.array_equal(oa[key], ob[key]), f"step {step}: {key} differs"


CASES = [("tiny", LayerRange(0, 3)), ("tiny", LayerRange(5, 6)), ("odd", LayerRange(1, 3))]


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """(built, traced) packages per (checkpoint, range), exported once for the module."""
    made: dict = {}

    def get(which: str, layers: LayerRange | None, checkpoint, settings):
        key = (which, layers)
        if key not in made:
            out = tmp_path_factory.mktemp(f"equiv-{which}")
            if layers is None:
                a = export_head(checkpoint, out / "built.mlpackage", settings).path
                b = export_head_traced(checkpoint, out / "traced.mlpackage", settings).path
            else:
                a = export_shard(
                    checkpoint, LayerSpec(layers, out / "built.mlpackage"), settings
                ).path
                b = export_shard_traced(
                    checkpoint, LayerSpec(layers, out / "traced.mlpackage"), settings
                ).path
            made[key] = (a, b)
        return made[key]

    return get


def _checkpoint(request, which: str):
    return request.getfixturevalue(f"{which}_checkpoint"), request.getfixturevalue(
        f"{which}_config"
    ).export


@pytest.mark.parametrize(("which", "layers"), CASES)
def test_same_program_both_ways(request, both_ways, which, layers):
    checkpoint, settings = _checkpoint(request, which)
    built, traced = both_ways(which, layers, checkpoint, settings)
    assert _differences(built, traced) == []
    counts = _program_facts(built)["counts"]
    assert counts["conv"] == 4 * layers.num_layers and "linear" not in counts
    assert counts["constexpr_blockwise_shift_scale"] == 4 * layers.num_layers
    assert counts["read_state"] == 2
    assert counts["coreml_update_state"] == counts["slice_update"] == 2 * layers.num_layers
    # Both carry the per-layer output names, one per layer, the last one the output.
    for path in (built, traced):
        names = read_package_metadata(path).extra[LAYER_OUTPUTS_KEY]
        assert names.count('"') == 2 * layers.num_layers and "output_hidden_states" in names


@pytest.mark.parametrize(("which", "layers"), CASES)
def test_same_fp16_outputs_and_states_over_16_steps(request, both_ways, which, layers):
    checkpoint, settings = _checkpoint(request, which)
    built, traced = both_ways(which, layers, checkpoint, settings)
    out_a, states_a = _run(built, checkpoint, settings.context_length)
    out_b, states_b = _run(traced, checkpoint, settings.context_length)
    _assert_same_outputs(out_a, out_b)
    for name in states_a:
        assert np.array_equal(states_a[name], states_b[name]), name
    # The steps did something: every step wrote its position of every layer's cache.
    assert np.count_nonzero(states_a["key_cache"][:, :, :STEPS]) > 0
    assert not np.any(states_a["key_cache"][:, :, STEPS:])


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_same_head_both_ways(request, both_ways, which):
    checkpoint, settings = _checkpoint(request, which)
    built, traced = both_ways(which, None, checkpoint, settings)
    assert _differences(built, traced) == []
    hidden = checkpoint.architecture.hidden_size
    _assert_same_outputs(_run_head(built, hidden), _run_head(traced, hidden))


def test_comparison_rejects_a_seeded_difference(
    both_ways, tiny_checkpoint, tiny_config, tmp_path, monkeypatch
):
    """A builder with one wrong constant (RoPE sign) or one wrong rounding is caught."""
    import torch

    from anechain import program, weights

    settings = tiny_config.export
    _, traced = both_ways("tiny", LayerRange(5, 6), tiny_checkpoint, settings)
    spec = LayerSpec(LayerRange(5, 6), tmp_path / "rope.mlpackage")

    def wrong_rope(x, cos, sin, arch, p):
        return original_rope(x, sin, cos, arch, p)  # cos and sin swapped

    original_rope = program.emit_rope
    monkeypatch.setattr(program, "emit_rope", wrong_rope)
    export_shard(tiny_checkpoint, spec, settings)
    monkeypatch.setattr(program, "emit_rope", original_rope)
    assert _differences(spec.path, traced) == []  # same ops, same weights...
    out_a, _ = _run(spec.path, tiny_checkpoint, settings.context_length, steps=3)
    out_b, _ = _run(traced, tiny_checkpoint, settings.context_length, steps=3)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_outputs(out_a, out_b)  # ...but not the same values

    def half_away(weight):  # round half away from zero instead of half to even
        q = original_quantize(weight)
        w = weight.reshape(weight.shape[0], -1).to(torch.float16).float().numpy()
        s = q.scale.reshape(-1, 1).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = (w / s).astype(np.float16).astype(np.float32)
        data = np.clip(np.trunc(x + np.copysign(0.5, x)), -127, 127).astype(np.int8)
        return dataclasses.replace(q, data=data.reshape(q.data.shape))

    original_quantize = weights.quantize_int8
    monkeypatch.setattr(weights, "quantize_int8", half_away)
    spec = LayerSpec(LayerRange(5, 6), tmp_path / "round.mlpackage")
    export_shard(tiny_checkpoint, spec, settings)
    assert any("INT8 data" in d for d in _differences(spec.path, traced))


def _int32_layout(path: Path) -> tuple[int, bool]:
    """(number of int32-computing ops, whether all of them precede the first fp16 op)."""
    from coremltools.converters.mil.mil import types

    _, prog = load_program(path)

    def layout(function: Any) -> tuple[int, bool]:
        ops = [op for op in function.operations if op.op_type != "const"]
        is_int = [any(v.dtype == types.int32 for v in op.outputs) for op in ops]
        first_fp16 = next(
            i for i, op in enumerate(ops) if any(v.dtype == types.fp16 for v in op.outputs)
        )
        return sum(is_int), all(i < first_fp16 for i, flag in enumerate(is_int) if flag)

    # Every function (decode, and prefill when the preset has it) has the same layout.
    layouts = {name: layout(f) for name, f in prog.functions.items()}
    assert len(set(layouts.values())) == 1, layouts
    return next(iter(layouts.values()))


def test_int32_index_arithmetic_is_one_block_ahead_of_the_graph(request, both_ways):
    """2 concats per layer + 1 add (the KV write windows), all before the first fp16 op;
    the traced program has the same ops interleaved with the layers (the check sees it)."""
    checkpoint, settings = _checkpoint(request, "tiny")
    built, traced = both_ways("tiny", LayerRange(0, 3), checkpoint, settings)
    assert _int32_layout(built) == (2 * 3 + 1, True)
    assert _int32_layout(traced) == (2 * 3 + 1, False)
