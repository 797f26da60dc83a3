"""The bridge's array rules (coremltools 9.0, coremlpython/CoreMLPythonArray.mm:10-30 and
CoreMLPythonUtils.mm:362-410), twice: in the runner's check (anechain.runners.bridge) and in
the fake native state the Linux tests run against (tests/fakes/coreml_model.py)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.fakes.coreml_model import convert_value, toy_shard_model

from anechain.errors import RunnerError

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint32", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fake_state_converts_as_the_bridge_does(dtype, capsys):
    """Array.mm:10-30: int32, float32 and float64 only (int8 needs the macOS 26 SDK);
    anything else is Utils.mm:407-409's "value type not convertible"."""
    state = toy_shard_model({"key_cache": (1, 1, 4, 2)}).make_state()
    value = np.ones((1, 1, 4, 2), dtype=dtype)
    if dtype in ("int32", "float32", "float64"):
        state.write_state("key_cache", value)
        assert state.read_state("key_cache").dtype == np.float32  # fp16 comes back as fp32
        assert (state.read_state("key_cache") == 1).all()
    else:
        with pytest.raises(RuntimeError, match="^value type not convertible$"):
            state.write_state("key_cache", value)
        assert capsys.readouterr().out.startswith("Error: value type not convertible:")
    with pytest.raises(RuntimeError, match="only multi-array value is supported"):
        state.write_state("key_cache", 1.0)
    read_only = np.ones((1, 1, 4, 2), np.float32)
    read_only.flags.writeable = False  # Array.mm:55 mutable_data() throws
    with pytest.raises(RuntimeError, match="^value type not convertible$"):
        state.write_state("key_cache", read_only)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bridge_rules_refuse_what_the_bridge_cannot_convert(dtype):
    from anechain.runners import bridge

    value = np.ones((2, 3), dtype=dtype)
    if dtype in ("int32", "float32", "float64"):
        bridge.check_array("input 'x'", value)
    else:
        with pytest.raises(RunnerError, match=f"input 'x' has dtype {dtype}; coremltools' bridge"):
            bridge.check_array("input 'x'", value)
    read_only = np.ones(3, np.float32)
    read_only.flags.writeable = False  # Array.mm:55 mutable_data() throws
    with pytest.raises(RunnerError, match="read-only"):
        bridge.check_array("input 'x'", read_only)
    # predict casts fp16 to fp32 itself (_compiled_model.py:229-231), write_state does not.
    fed = bridge.predict_inputs({"h": np.ones(2, np.float16), "p": np.array([1], np.int32)})
    assert fed["h"].dtype == np.float32 and fed["p"].dtype == np.int32
    with pytest.raises(RunnerError, match="input 'p' has dtype int64"):
        bridge.predict_inputs({"p": np.array([1], np.int64)})
    # A reversed view's negative stride would wrap in the bridge (Array.mm:41-50).
    reversed_view = np.arange(4, dtype=np.float32)[::-1]
    with pytest.raises(RuntimeError, match="negative stride"):
        convert_value(reversed_view)
    fed = bridge.predict_inputs({"x": reversed_view})
    assert convert_value(fed["x"]) is fed["x"] and fed["x"].tolist() == [3, 2, 1, 0]
    assert bridge.state_value("k", np.ones(2, np.float16), np.float16).dtype == np.float32
    with pytest.raises(RunnerError, match="state 'k' has dtype int8"):
        bridge.state_value("k", np.ones(2), np.int8)
