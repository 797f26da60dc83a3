"""Two-function layer shards from the MIL Builder exporter: shared weights, the prefill
function's ANE layout, validation of both functions (and its refusals), and generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from anechain import validate_prefill
from anechain.config import LayerRange
from anechain.contract import layer_contract, read_package_metadata
from anechain.export import LayerSpec, export_shard, program_op_counts
from anechain.package import load_program, package_size
from anechain.runners.mil import MILRunner
from anechain.validate import validate_shard

RANGE = LayerRange(0, 3)
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


@pytest.fixture(scope="module")
def packages(tmp_path_factory, tiny_checkpoint, tiny_config) -> dict[int, Path]:
    """[0, 3) exported decode-only (T = 0) and with the tiny preset's prefill (T = 4)."""
    out = tmp_path_factory.mktemp("prefill")
    made = {}
    for t in (0, tiny_config.export.prefill_tokens):
        settings = dataclasses.replace(tiny_config.export, prefill_tokens=t)
        spec = LayerSpec(RANGE, out / f"layers_0_3_t{t}.mlpackage")
        made[t] = export_shard(tiny_checkpoint, spec, settings).path
    return made


def test_tiny_preset_prefills_in_small_chunks(tiny_config):
    assert tiny_config.export.prefill_tokens == 4


def test_two_functions_share_every_weight_blob_and_the_states(packages, tiny_config):
    decode_only, both = packages[0], packages[4]
    # One copy of the weights: the blob file is byte-identical to the decode-only one.
    assert (both / WEIGHTS).read_bytes() == (decode_only / WEIGHTS).read_bytes()
    # Only the program text grows (the tiny model's weights are small; see DESIGN.md).
    extra = package_size(both) - package_size(decode_only)
    spec, prog = load_program(both)
    assert extra < len(spec.SerializeToString())
    assert sorted(prog.functions) == ["decode", "prefill"]
    assert spec.description.defaultFunctionName == "decode"
    meta = read_package_metadata(both)
    assert meta.functions == {"decode": 1, "prefill": 4}
    assert read_package_metadata(decode_only).functions == {"main": 1}
    for name, t in meta.functions.items():
        counts = program_op_counts(prog, name)
        assert counts["conv"] == 12 and counts["linear"] == 0  # 4 x 3 layers, 1x1 convs
        assert counts["constexpr_blockwise_shift_scale"] == 12
        runner = MILRunner(both, function=name)
        contract = layer_contract(tiny_config.architecture, 64, 3, t)
        assert runner.inputs == contract.inputs and runner.outputs == contract.outputs
        assert runner.states == contract.states
    # The mil runner keeps one copy of weights equal in both functions.
    decode = MILRunner(both)
    prefill = MILRunner(both, function="prefill", state_from=decode)
    assert len(prefill._weights) == 12
    # Every layer's cache write updates the state in place (no whole-cache copy per layer).
    for runner in (decode, prefill):
        writes = [s for s in runner._steps if s.op_type == "slice_update"]
        assert len(writes) == 6 and all(s.extra.get("in_place") for s in writes)
    assert all(prefill._weights[k] is decode._weights[k] for k in prefill._weights)


def test_the_two_function_package_is_reproducible(packages, tiny_checkpoint, tiny_config, tmp_path):
    from anechain.fsutil import sha256_tree

    settings = dataclasses.replace(tiny_config.export, prefill_tokens=4)
    again = export_shard(tiny_checkpoint, LayerSpec(RANGE, tmp_path / "again.mlpackage"), settings)
    assert sha256_tree(again.path) == sha256_tree(packages[4])


def test_both_functions_pass_validation(packages, tiny_checkpoint, tiny_config, tmp_path):
    report = validate_shard(
        packages[4], tiny_checkpoint, tiny_config.validation, "mil", cache_dir=tmp_path
    )
    assert report.verdict == "pass", report.failed_gates()
    names = {g.name for g in report.gates}
    assert {"prefill_cosine", "prefill_kv_keys_cosine", "prefill_decode_cosine"} <= names
    # 16 steps, T = 4: 11 positions in chunks of 4, 4, 3 (partial), then 5 decode steps.
    assert report.prefill["chunks"] == [[0, 4], [4, 4], [8, 3]]
    positions = [(p["position"], p["function"]) for p in report.prefill["per_position"]]
    assert positions == [(i, "prefill") for i in range(11)] + [(i, "decode") for i in range(11, 16)]
    data = report.to_dict()
    assert data["functions"] == {"decode": 1, "prefill": 4} and data["prefill"]["passed"]


def _gates(report) -> dict[str, bool]:
    return {g.name: g.passed for g in report.gates}


def test_decode_that_does_not_continue_from_the_prefilled_cache_fails(
    packages, tiny_checkpoint, tiny_config, tmp_path, monkeypatch
):
    """A prefill runner with its own state: decode then reads an empty cache."""
    from anechain.runners import open_runner

    monkeypatch.setattr(
        validate_prefill,
        "open_prefill_runner",
        lambda backend, package, decode, **o: open_runner(backend, package, function="prefill"),
    )
    report = validate_shard(
        packages[4], tiny_checkpoint, tiny_config.validation, "mil", cache_dir=tmp_path
    )
    gates = _gates(report)
    # The decode's relative error catches it (1.35 against 0.2); its cosine (0.9985, bound
    # 0.998) barely moves, as the state's shared part dominates it, as in a real model.
    assert report.verdict == "fail" and not gates["prefill_decode_rmse"]
    assert not gates["prefill_kv_keys_cosine"]  # the prefill's cache never reached decode
    assert gates["cosine"]  # the decode-only loop alone would have passed


def test_a_prefill_with_wrong_rope_fails_on_its_kv(
    packages, tiny_checkpoint, tiny_config, tmp_path, monkeypatch
):
    """Host bug: every chunk gets the RoPE of the next chunk's positions."""
    real = validate_prefill.chunk_inputs

    def shifted(rope, hidden, offset, tokens, context):
        x = real(rope, hidden, offset, tokens, context)
        y = real(rope, hidden, offset + tokens, tokens, context + tokens)
        return {**x, "cos": y["cos"], "sin": y["sin"]}

    monkeypatch.setattr(validate_prefill, "chunk_inputs", shifted)
    report = validate_shard(
        packages[4], tiny_checkpoint, tiny_config.validation, "mil", cache_dir=tmp_path
    )
    gates = _gates(report)
    assert report.verdict == "fail"
    assert not gates["prefill_kv_keys_cosine"] and gates["prefill_kv_values_cosine"]


def test_a_prefill_function_from_other_weights_fails(
    packages, tiny_checkpoint, tiny_config, tmp_path, monkeypatch
):
    """A package whose prefill function was built from layer 1's weights in layer 0's place."""
    import anechain.program as program

    real = program.emit_layers

    def swapped(io, layers, arch, context, tokens=1, **kw):
        if tokens > 1:
            layers = [dataclasses.replace(layers[1], prefix=layers[0].prefix), *layers[1:]]
        return real(io, layers, arch, context, tokens, **kw)

    monkeypatch.setattr(program, "emit_layers", swapped)
    settings = dataclasses.replace(tiny_config.export, prefill_tokens=4)
    bad = export_shard(tiny_checkpoint, LayerSpec(RANGE, tmp_path / "bad.mlpackage"), settings)
    monkeypatch.undo()
    decode = MILRunner(bad.path)
    prefill = MILRunner(bad.path, function="prefill", state_from=decode)
    shared = [k for k in prefill._weights if prefill._weights[k] is decode._weights.get(k)]
    assert len(shared) < 12  # layer 0's differ: compared by value, not trusted by name
    report = validate_shard(
        bad.path, tiny_checkpoint, tiny_config.validation, "mil", cache_dir=tmp_path
    )
    gates = _gates(report)
    assert gates["cosine"] and report.verdict == "fail"  # decode is fine, prefill is not
    assert not gates["prefill_cosine"] and not gates["prefill_kv_keys_cosine"]


def test_prefill_length_always_leaves_a_partial_chunk_and_a_decode_step():
    assert validate_prefill.prefill_length(16, 4) == 11
    assert validate_prefill.prefill_length(16, 64) == 12
    assert validate_prefill.prefill_length(2, 1) == 1
    for steps in range(2, 40):
        for t in (1, 2, 3, 4, 8):
            p = validate_prefill.prefill_length(steps, t)
            assert 1 <= p < steps and (p % t or t == 1 or p == 1)
    with pytest.raises(Exception, match="at least 2 steps"):
        validate_prefill.prefill_length(1, 4)


def test_reference_kv_is_transformers_cache(tiny_checkpoint, tmp_path):
    """The stored reference's values (what prefill's KV is compared with) equal the
    attention's own v projections."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    from anechain.golden import reference

    tokens = [5, 7, 11, 13]
    ref = reference(tiny_checkpoint, tokens, 1, tmp_path)
    bounds, values = ref.boundaries, ref.values
    layer = Phi3DecoderLayer(tiny_checkpoint.hf_config, 0).eval()
    tensors = tiny_checkpoint.read_tensors(tiny_checkpoint.layer_tensor_names_for(0))
    layer.load_state_dict({k[len("model.layers.0.") :]: v.float() for k, v in tensors.items()})
    with torch.no_grad():
        h = layer.input_layernorm(torch.from_numpy(bounds[0]))
        qkv = layer.self_attn.qkv_proj(h).numpy()
    arch = tiny_checkpoint.architecture
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    v = qkv[:, q + kv :].reshape(len(tokens), arch.num_key_value_heads, arch.head_dim)
    np.testing.assert_allclose(values[0], v.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


def test_validate_cli_shows_the_prefill_gates(packages, tiny_checkpoint_dir, tmp_path):
    from click.testing import CliRunner

    from anechain.cli import cli

    report = tmp_path / "r.json"
    args = ["validate", "shard", str(packages[4]), "--model", str(tiny_checkpoint_dir)]
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    args += ["--config", str(config), "--backend", "mil", "--report", str(report)]
    run = CliRunner().invoke(cli, [*args, "--cache-dir", str(tmp_path)])
    assert run.exit_code == 0, run.output
    assert "prefill_kv_keys_cosine" in run.stdout and "prefill_decode_cosine" in run.stdout
    assert "prefill T=4: chunks 0+4, 4+4, 8+3, then decode from that cache" in run.stdout


def test_prefill_of_an_odd_shaped_model_passes(odd_checkpoint, odd_config, tmp_path):
    """3 query heads per KV head, rotary over half the head, hidden 96, T = 3."""
    settings = dataclasses.replace(odd_config.export, prefill_tokens=3)
    spec = LayerSpec(LayerRange(0, 2), tmp_path / "odd.mlpackage")
    path = export_shard(odd_checkpoint, spec, settings).path
    report = validate_shard(path, odd_checkpoint, odd_config.validation, "mil", cache_dir=tmp_path)
    assert report.verdict == "pass", report.failed_gates()
    assert report.prefill["chunks"] == [[0, 3], [3, 3], [6, 3], [9, 2]]


@pytest.mark.macos
def test_both_functions_pass_validation_through_core_ml(
    packages, tiny_checkpoint, tiny_config, tmp_path
):
    """The prefill validation with both functions compiled and run by Core ML, one state
    (golden parity only: residency of a two-function package is counted elsewhere)."""
    from anechain.runners import open_runner

    meta = read_package_metadata(packages[4])
    decode = open_runner("coreml", packages[4])
    prefill = validate_prefill.open_prefill_runner("coreml", packages[4], decode)
    result = validate_prefill.run_prefill_golden(
        decode, prefill, meta, tiny_checkpoint, tiny_config.validation, tmp_path
    )
    assert result.passed, [g for g in result.gates if not g.passed]


def test_residency_reads_the_decode_function_of_a_two_function_package(packages):
    """`read_program` reads one function (by default decode); residency reads and gates every
    function (`read_programs`, tests/test_residency.py); see DESIGN.md."""
    from anechain.errors import ResidencyError
    from anechain.residency import read_program, read_programs

    assert [p.function for p in read_programs(packages[4])] == ["decode", "prefill"]
    assert [p.function for p in read_programs(packages[0])] == ["main"]

    program = read_program(packages[4])
    assert program.function == "decode"
    assert sum(op.type == "conv" for op in program.ops) == 12
    assert read_program(packages[0]).function == "main"
    assert read_program(packages[4], "prefill").function == "prefill"
    with pytest.raises(ResidencyError, match="no function 'main'"):
        read_program(packages[4], "main")


def test_one_function_loads_alone(packages):
    """A runner reads only its own function: every function holds the whole weight set, so
    loading all of them costs a copy of the weights per function."""
    from anechain.errors import PackageError

    both = packages[4]
    _, whole = load_program(both)
    for name in ("decode", "prefill"):
        _, one = load_program(both, name)
        assert list(one.functions) == [name]

        # (The loader numbers const names across the functions it reads: compare the rest.)
        def ops(prog, name=name):
            return [
                (op.op_type, [tuple(v.shape) for v in op.outputs])
                for op in prog.functions[name].operations
            ]

        assert ops(one) == ops(whole)
    with pytest.raises(PackageError, match=r"no 'verify' function \(it has decode, prefill\)"):
        load_program(both, "verify")
