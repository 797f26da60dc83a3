"""The prefill contract: T-token layer functions, and the functions recorded in metadata."""

from __future__ import annotations

import json

import pytest

from anechain.config import LayerRange
from anechain.contract import (
    ShardMetadata,
    function_names,
    layer_contract,
)
from anechain.errors import ConfigError, PackageError


def test_decode_is_the_t_equal_1_contract_and_prefill_differs_only_in_t(tiny_config):
    arch = tiny_config.architecture
    decode = layer_contract(arch, 64, 3)
    assert decode == layer_contract(arch, 64, 3, tokens=1)
    prefill = layer_contract(arch, 64, 3, tokens=8)
    shapes = {t.name: t.shape for t in prefill.inputs + prefill.outputs}
    assert shapes == {
        "hidden_states": (1, 64, 1, 8),
        "position": (1,),
        "cos": (1, 1, 8, arch.rotary_dim),
        "sin": (1, 1, 8, arch.rotary_dim),
        "attention_mask": (1, 1, 8, 64),
        "output_hidden_states": (1, 64, 1, 8),
    }
    assert prefill.states == decode.states  # one KV cache for both functions
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="1..64 tokens"):
            layer_contract(arch, 64, 3, tokens=bad)


def test_function_names():
    assert function_names(0) == {"main": 1}
    assert function_names(64) == {"decode": 1, "prefill": 64}
    with pytest.raises(ConfigError, match="prefill_tokens"):
        function_names(-1)


def _meta(tiny_config, functions=None) -> ShardMetadata:
    arch = tiny_config.architecture
    extra = {} if functions is None else {"functions": functions}
    return ShardMetadata(
        "0",
        "layers",
        LayerRange(0, 3),
        arch.num_hidden_layers,
        "c",
        "w",
        "int8",
        64,
        arch,
        layer_contract(arch, 64, 3),
        **extra,
    )


def test_functions_round_trip_through_package_metadata(tiny_config):
    meta = _meta(tiny_config, function_names(8))
    back = ShardMetadata.from_user_metadata(meta.to_user_metadata())
    assert back.functions == {"decode": 1, "prefill": 8} and back.prefill_tokens == 8
    assert back.function_contract("prefill") == layer_contract(tiny_config.architecture, 64, 3, 8)
    assert back.function_contract("decode") == back.contract
    with pytest.raises(PackageError, match="no function 'main'"):
        back.function_contract("main")
    # A package written before prefill existed has no key: decode only, as `main`.
    old = meta.to_user_metadata()
    del old["anechain.functions"]
    legacy = ShardMetadata.from_user_metadata(old)
    assert legacy.functions == {"main": 1} and legacy.prefill_tokens == 0


@pytest.mark.parametrize(
    "functions",
    [
        {"decode": 1},
        {"main": 1, "prefill": 8},
        {"decode": 2, "prefill": 8},
        {"decode": 1, "prefill": 0},
        {"decode": 1, "prefill": 8, "verify": 4},
        ["decode"],
    ],
)
def test_forged_functions_metadata_is_refused(tiny_config, functions):
    meta = _meta(tiny_config).to_user_metadata()
    meta["anechain.functions"] = json.dumps(functions)
    with pytest.raises(PackageError, match="functions"):
        ShardMetadata.from_user_metadata(meta, where="x.mlpackage")
