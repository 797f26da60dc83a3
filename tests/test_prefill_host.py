"""Prefill on the host and in the runners: chunk inputs, padding, chunk plans, and a
two-function program (decode + prefill sharing the KV states) run by the `mil` runner and,
with a fake Core ML model, by the `coreml` runner.

The program is tests/mb_attention.py: a real saved ML Program built with the MIL Builder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.fakes.coreml_model import FakeCompiler, mil_loader, toy_shard_model
from tests.mb_attention import build_attention_package

from anechain import rope as rope_module
from anechain.contract import MASK_VALUE, layer_contract
from anechain.errors import RunnerError
from anechain.rope import (
    RopeParameters,
    chunk_inputs,
    chunk_outputs,
    prefill_plan,
    step_inputs,
)
from anechain.runners import ShardRunner
from anechain.runners.coreml import CoreMLRunner
from anechain.runners.mil import MILRunner

T = 8
CONTEXT = 64


@pytest.fixture(scope="module")
def rope(tiny_checkpoint) -> RopeParameters:
    return RopeParameters.from_hf_config(tiny_checkpoint.hf_config)


@pytest.fixture(scope="module")
def arch(tiny_config):
    return tiny_config.architecture


@pytest.fixture(scope="module")
def attention_package(tmp_path_factory, arch) -> Path:
    return build_attention_package(
        tmp_path_factory.mktemp("mb") / "attention.mlpackage", arch, CONTEXT, T
    )


def runners(package: Path) -> tuple[MILRunner, MILRunner]:
    decode = MILRunner(package)
    return decode, MILRunner(package, function="prefill", state_from=decode)


# --- host inputs -------------------------------------------------------------------------------


def test_chunk_inputs_follow_the_contract_and_decode_is_t_equal_1(rope, arch):
    hidden = np.random.default_rng(0).standard_normal((5, arch.hidden_size))
    x = chunk_inputs(rope, hidden, 16, T, CONTEXT)
    spec = layer_contract(arch, CONTEXT, 1, T)
    assert {k: (v.shape, v.dtype.name) for k, v in x.items()} == {
        s.name: (s.shape, s.dtype) for s in spec.inputs
    }
    np.testing.assert_array_equal(chunk_outputs(x["hidden_states"], 5), hidden.astype(np.float16))
    assert (x["hidden_states"][..., 5:] == 0).all()  # padded rows
    for i in range(T):  # row i attends to 0 .. 16 + i, nothing after
        assert (x["attention_mask"][0, 0, i, : 17 + i] == 0).all()
        assert (x["attention_mask"][0, 0, i, 17 + i :] == MASK_VALUE).all()
        cos, sin = rope.cos_sin(16 + i)
        np.testing.assert_array_equal(x["cos"][0, 0, i], cos.astype(np.float16))
        np.testing.assert_array_equal(x["sin"][0, 0, i], sin.astype(np.float16))
    one = step_inputs(rope, hidden[0], 16, CONTEXT)
    assert one.keys() == x.keys()
    assert one["attention_mask"].shape == (1, 1, 1, CONTEXT)
    np.testing.assert_array_equal(one["attention_mask"][0, 0, 0], x["attention_mask"][0, 0, 0])


def test_chunk_rope_switches_to_long_factors_per_position(rope, arch):
    # tiny: original context 128; position 128 is the first past it (long factors).
    assert rope.inv_freq_short != rope.inv_freq_long
    x = chunk_inputs(rope, np.zeros((T, arch.hidden_size)), 124, T, 256)
    for i, p in enumerate(range(124, 132)):
        inv = np.asarray(rope.inv_freq_long if p >= 128 else rope.inv_freq_short, np.float32)
        emb = np.concatenate([p * inv, p * inv])
        want = (np.cos(emb) * rope.attention_scaling).astype(np.float16)
        np.testing.assert_array_equal(x["cos"][0, 0, i], want)


def test_chunk_inputs_refuse_too_many_rows_and_slices_past_the_context(rope, arch):
    with pytest.raises(ValueError, match="1..8 rows"):
        chunk_inputs(rope, np.zeros((T + 1, arch.hidden_size)), 0, T, CONTEXT)
    with pytest.raises(ValueError, match="1..8 rows"):
        chunk_inputs(rope, np.zeros((0, arch.hidden_size)), 0, T, CONTEXT)
    # Three real rows at 60 would still write the whole slice 60..67: refused.
    with pytest.raises(ValueError, match="outside the context"):
        chunk_inputs(rope, np.zeros((3, arch.hidden_size)), CONTEXT - 4, T, CONTEXT)
    with pytest.raises(ValueError, match="outside the context"):
        step_inputs(rope, np.zeros(arch.hidden_size), CONTEXT, CONTEXT)


def test_prefill_plan_pads_the_last_chunk_and_leaves_the_context_end_to_decode():
    assert prefill_plan(19, 8, 64) == [(0, 8), (8, 8), (16, 3)]
    assert prefill_plan(16, 8, 64) == [(0, 8), (8, 8)]
    assert prefill_plan(3, 8, 64) == [(0, 3)]
    assert prefill_plan(64, 8, 64)[-1] == (56, 8)
    # A slice from 24 would end at 32 > 30: positions 24.. are decoded one by one.
    assert prefill_plan(29, 8, 30) == [(0, 8), (8, 8), (16, 8)]
    with pytest.raises(ValueError):
        prefill_plan(5, 0, 64)


# --- the two-function program on the mil runner ------------------------------------------------


def run_prefill(
    decode: ShardRunner,
    prefill: ShardRunner,
    rope: RopeParameters,
    hidden: np.ndarray,
    poison: float = 0.0,
) -> list[np.ndarray]:
    """Chunks over hidden (P, C); padded rows poisoned with `poison`-scaled noise."""
    decode.reset()
    out = []
    for offset, n in prefill_plan(len(hidden), T, CONTEXT):
        x = chunk_inputs(rope, hidden[offset : offset + n], offset, T, CONTEXT)
        if poison:
            noise = np.random.default_rng(offset).standard_normal(x["hidden_states"].shape)
            x["hidden_states"][..., n:] = (poison * noise[..., n:]).astype(np.float16)
        out.append(chunk_outputs(prefill.step(x)["output_hidden_states"], n))
    return out


def run_decode(runner: ShardRunner, rope, hidden: np.ndarray, start: int) -> list[np.ndarray]:
    return [
        runner.step(step_inputs(rope, h, start + i, CONTEXT))["output_hidden_states"].reshape(-1)
        for i, h in enumerate(hidden)
    ]


def test_prefill_chunks_then_decode_equal_decode_only(attention_package, rope, arch):
    decode, prefill = runners(attention_package)
    assert (decode.function, prefill.function) == ("decode", "prefill")
    hidden = np.random.default_rng(1).standard_normal((24, arch.hidden_size)).astype(np.float32)
    want = np.stack(run_decode(decode, rope, hidden, 0))
    want_keys = decode.read_state("key_cache")

    got = np.concatenate(run_prefill(decode, prefill, rope, hidden[:19]))  # 8 + 8 + 3
    after = run_decode(decode, rope, hidden[19:], 19)  # decode continues from that cache
    np.testing.assert_allclose(got, want[:19], atol=2e-2)
    np.testing.assert_allclose(np.stack(after), want[19:], atol=2e-2)
    np.testing.assert_allclose(decode.read_state("key_cache"), want_keys, atol=2e-2)
    np.testing.assert_array_equal(
        prefill.read_state("value_cache"), decode.read_state("value_cache")
    )


def test_padded_rows_never_reach_a_real_token(attention_package, rope, arch):
    """Padded rows write KV at 19..23; no real row reads them, decode overwrites them."""
    decode, prefill = runners(attention_package)
    hidden = np.random.default_rng(2).standard_normal((24, arch.hidden_size)).astype(np.float32)
    clean = run_prefill(decode, prefill, rope, hidden[:19])
    clean_cache = decode.read_state("key_cache")
    clean_after = run_decode(decode, rope, hidden[19:], 19)
    clean_final = decode.read_state("key_cache")

    dirty = run_prefill(decode, prefill, rope, hidden[:19], poison=8.0)
    dirty_cache = decode.read_state("key_cache")
    # The poison did land in the cache, past the real tokens only ...
    assert not np.array_equal(dirty_cache[:, :, 19:24], clean_cache[:, :, 19:24])
    np.testing.assert_array_equal(dirty_cache[:, :, :19], clean_cache[:, :, :19])
    # ... and changed nothing a real token computed, then or later.
    for a, b in zip(dirty, clean, strict=True):
        np.testing.assert_array_equal(a, b)
    dirty_after = run_decode(decode, rope, hidden[19:], 19)
    for a, b in zip(dirty_after, clean_after, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(decode.read_state("key_cache"), clean_final)


def test_a_mask_that_lets_rows_see_the_padding_is_caught(
    attention_package, rope, arch, monkeypatch
):
    """The check above must fail for a wrong mask: every row sees the whole slice."""
    real = rope_module.chunk_inputs

    def leaky(rope_, hidden, offset, tokens, context):
        x = real(rope_, hidden, offset, tokens, context)
        x["attention_mask"][..., offset : offset + tokens] = 0
        return x

    monkeypatch.setattr(rope_module, "chunk_inputs", leaky)
    monkeypatch.setitem(globals(), "chunk_inputs", leaky)
    decode, prefill = runners(attention_package)
    hidden = np.random.default_rng(2).standard_normal((19, arch.hidden_size)).astype(np.float32)
    clean = run_prefill(decode, prefill, rope, hidden)
    dirty = run_prefill(decode, prefill, rope, hidden, poison=8.0)
    assert not np.array_equal(clean[-1], dirty[-1])


def test_shared_state_resets_for_both_and_refuses_foreign_runners(
    attention_package, rope, arch, tmp_path
):
    decode, prefill = runners(attention_package)
    prefill.step(chunk_inputs(rope, np.ones((T, arch.hidden_size)), 0, T, CONTEXT))
    assert decode.read_state("key_cache").any()
    prefill.reset()
    assert not decode.read_state("key_cache").any()

    with pytest.raises(RunnerError, match="no 'verify' function.*decode, prefill"):
        MILRunner(attention_package, function="verify")
    other = build_attention_package(tmp_path / "other.mlpackage", arch, 32, 4)
    with pytest.raises(RunnerError, match="cannot share the states"):
        MILRunner(other, function="prefill", state_from=decode)


# --- the coreml runner: function selection and one state, with a fake CompiledMLModel ----------


def test_coreml_runner_loads_a_function_and_shares_one_state(attention_package, rope, arch):
    contract = layer_contract(arch, CONTEXT, 1, T)
    states = {s.name: s.shape for s in contract.states}
    loads: list[tuple] = []

    def load_model(*args):
        loads.append(args[2:])  # one compiled model: a state of either function serves both
        return toy_shard_model(states, function=(args[2:] or ("",))[0], model=args[0])

    fake = FakeCompiler()
    decode = CoreMLRunner(attention_package, load_model=load_model, compiler=fake.compiler)
    prefill = CoreMLRunner(
        attention_package, load_model=load_model, function="prefill", state_from=decode
    )
    assert loads == [(), ("prefill",)] and len(fake.calls) == 1  # compiled once
    assert [f.shape for f in prefill.inputs] == [s.shape for s in contract.inputs]
    prefill.step(chunk_inputs(rope, np.ones((3, arch.hidden_size)), 5, T, CONTEXT))
    assert (decode.read_state("key_cache")[:, :, 5] == 6).all()  # the fake writes p + 1 at p
    with pytest.raises(RunnerError, match="shape"):  # decode's contract is checked for decode
        decode.step(chunk_inputs(rope, np.ones((3, arch.hidden_size)), 5, T, CONTEXT))
    decode.reset()
    assert not prefill.read_state("key_cache").any()
    with pytest.raises(RunnerError, match="no function 'verify'"):
        CoreMLRunner(attention_package, load_model=load_model, function="verify")


def test_a_compiled_two_function_model_is_described_per_function(
    attention_package, rope, arch, tmp_path
):
    """An .mlmodelc of decode + prefill: each function's inputs come from the package the
    compile sidecar names (the fake compiler's metadata.json has per-function schemas only,
    which nothing reads), and prefill then decode equal the mil runner's."""
    from anechain.compile import compile_package

    compiled = compile_package(attention_package, tmp_path, compiler=FakeCompiler().compiler)
    load = mil_loader(attention_package)
    decode = CoreMLRunner(compiled.compiled, load_model=load)
    prefill = CoreMLRunner(
        compiled.compiled, load_model=load, function="prefill", state_from=decode
    )
    mil_decode, mil_prefill = runners(attention_package)
    assert [f.shape for f in prefill.inputs] == [s.shape for s in mil_prefill.inputs]
    assert [f.shape for f in decode.inputs] == [s.shape for s in mil_decode.inputs]
    hidden = np.random.default_rng(4).standard_normal((11, arch.hidden_size)).astype(np.float32)
    got = np.concatenate(run_prefill(decode, prefill, rope, hidden[:9]))
    want = np.concatenate(run_prefill(mil_decode, mil_prefill, rope, hidden[:9]))
    np.testing.assert_allclose(got, want, atol=1e-2)
    after = run_decode(decode, rope, hidden[9:], 9)
    want_after = run_decode(mil_decode, rope, hidden[9:], 9)
    np.testing.assert_allclose(np.stack(after), np.stack(want_after), atol=1e-2)
    with pytest.raises(RunnerError, match="no function 'verify'"):
        CoreMLRunner(compiled.compiled, load_model=load, function="verify")
    # The fake's own rules: a function takes its own inputs; a state of another model is
    # refused (the bridge passes it on unchecked, mm:550-552; Core ML wants its own).
    x = chunk_inputs(rope, hidden[:4], 0, T, CONTEXT)
    with pytest.raises(RuntimeError, match="'hidden_states' has shape"):
        load("c", "cpu_and_ne").predict(dict(x), load("c", "cpu_and_ne").make_state())
    other = build_attention_package(tmp_path / "other.mlpackage", arch, CONTEXT, T)
    foreign = mil_loader(other)("c", "cpu_and_ne").make_state()
    with pytest.raises(RuntimeError, match="a state made by .*other.mlpackage"):
        load("c", "cpu_and_ne", "prefill").predict(dict(x), foreign)


@pytest.mark.macos
def test_core_ml_shares_one_state_across_the_functions(attention_package, rope, arch):
    """Real Core ML: prefill chunks then decode from the same state, as the mil runner does."""
    decode = CoreMLRunner(attention_package)
    prefill = CoreMLRunner(attention_package, function="prefill", state_from=decode)
    hidden = np.random.default_rng(3).standard_normal((12, arch.hidden_size)).astype(np.float32)
    got = np.concatenate(run_prefill(decode, prefill, rope, hidden[:10]))  # 8 + 2
    after = run_decode(decode, rope, hidden[10:], 10)
    mil_decode, mil_prefill = runners(attention_package)
    want = np.concatenate(run_prefill(mil_decode, mil_prefill, rope, hidden[:10]))
    want_after = run_decode(mil_decode, rope, hidden[10:], 10)
    np.testing.assert_allclose(got, want, atol=5e-2)
    np.testing.assert_allclose(np.stack(after), np.stack(want_after), atol=5e-2)
    np.testing.assert_allclose(
        decode.read_state("key_cache"), mil_decode.read_state("key_cache"), atol=5e-2
    )
