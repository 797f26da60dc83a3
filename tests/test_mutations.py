"""The mutation suite: each seeded bug must be rejected by `validate shard` with the default
gates, on the tiny checkpoint and on an odd-shaped one, and each test names the gate that
catches it.

Program-side bugs are seeded in the torch module (anechain.model) for the duration of a
traced export (anechain._traced, the executable specification of the built programs; the
unmutated traced shard passes too); host-side bugs alter the inputs the validation loop
feeds the runner of the shipped (built) shard. Every
mutant is validated on layers [0, 2): layer 0 reads the (small) embeddings, layer 1 writes
the massive activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import anechain.validate as validate
from anechain._traced import export_shard_traced
from anechain.config import LayerRange, load_preset
from anechain.export import LayerSpec, export_shard
from anechain.model import ANEMLP, ANEAttention, ANERMSNorm, LayerRangeModel

LAYERS = LayerRange(0, 2)
_TINY = load_preset("tiny")
# Decode-only packages: the mutants are decode bugs (prefill has its own checks).
CONFIG = dataclasses.replace(_TINY, export=dataclasses.replace(_TINY.export, prefill_tokens=0))


# --- program-side mutants: the torch module a traced export converts --------------------


def _rope_halves_swapped(self: ANEAttention, x, cos, sin):  # type: ignore[no-untyped-def]
    rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
    x1, x2 = rot[..., : self.half_rotary], rot[..., self.half_rotary :]
    rotated = torch.cat((-x1, x2), dim=-1)  # the halves of rotate_half swapped
    return torch.cat((rot * cos + rotated * sin, passthrough), dim=-1)


def _heads(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    # (..., heads, ..., D) reordered by slicing (converts to slices + concat, no gather).
    return torch.cat([t[:, h : h + 1] for h in order], dim=1)


def _attention_wrong_groups(self: ANEAttention, x, position, cos, sin, mask, kc, vc):  # type: ignore[no-untyped-def]
    """ANEAttention.forward with query head i under KV head i % KVH instead of i // G."""
    kvh, g = self.num_kv_heads, self.groups
    order = [j * kvh + kv for kv in range(kvh) for j in range(g)]  # slot kv*G+j <- head j*KVH+kv
    back = [order.index(h) for h in range(self.num_heads)]
    qkv = self.qkv_proj(x)
    q = qkv[:, : self.q_size].reshape(1, self.num_heads, 1, self.head_dim)
    k = qkv[:, self.q_size : self.q_size + self.kv_size]
    k = k.reshape(1, kvh, 1, self.head_dim)
    v = qkv[:, self.q_size + self.kv_size :].reshape(1, kvh, 1, self.head_dim)
    q = _heads(self._rope(q, cos, sin) * self.scaling, order)  # the bug
    k = self._rope(k, cos, sin)
    i = self.layer_offset
    kc[i : i + 1, :, position : position + 1, :] = k
    vc[i : i + 1, :, position : position + 1, :] = v
    scores = torch.matmul(q.reshape(kvh, g, self.head_dim), kc[i].transpose(1, 2))
    probs = torch.softmax(scores + mask.reshape(1, 1, -1), dim=-1)
    out = torch.matmul(probs, vc[i]).reshape(1, self.num_heads, 1, self.head_dim)
    return self.o_proj(_heads(out, back).reshape(1, self.q_size, 1, 1))


def _mlp_gate_up_swapped(self: ANEMLP, x):  # type: ignore[no-untyped-def]
    gate_up = self.gate_up_proj(x)
    up, gate = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
    return self.down_proj(torch.nn.functional.silu(gate) * up)


def _patch_init(cls: type, after: Callable[[Any], None]) -> Callable[..., None]:
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        after(self)

    return init


_LOAD = LayerRangeModel.load_hf_layer_weights


def _neighbour_loader(checkpoint: Any) -> Callable[..., None]:
    """load_hf_layer_weights giving layer 1 its neighbour layer 2's weights. (Layer 0's
    would be the same bytes twice: coremltools shares them and export refuses the package.)"""

    def load(self: LayerRangeModel, tensors: dict[str, torch.Tensor]) -> None:
        names = checkpoint.layer_tensor_names_for(2)
        neighbour = checkpoint.read_tensors(names)
        _LOAD(self, {**tensors, **{n.replace(".2.", ".1.", 1): t for n, t in neighbour.items()}})

    return load


PROGRAM_MUTANTS: dict[str, tuple[type, str, Any]] = {
    "rotate_half_swapped": (ANEAttention, "_rope", _rope_halves_swapped),
    "query_scaling_x1.25": (
        ANEAttention,
        "__init__",
        _patch_init(ANEAttention, lambda a: setattr(a, "scaling", a.scaling * 1.25)),
    ),
    "gqa_wrong_kv_head": (ANEAttention, "forward", _attention_wrong_groups),
    "gate_up_swapped": (ANEMLP, "forward", _mlp_gate_up_swapped),
    "rmsnorm_eps_x100": (
        ANERMSNorm,
        "__init__",
        _patch_init(ANERMSNorm, lambda n: setattr(n, "eps", n.eps * 100)),
    ),
    "neighbour_weights": (LayerRangeModel, "load_hf_layer_weights", _neighbour_loader),
}


# --- host-side mutants: what the validation loop feeds the shard --------------------------


def _host(alter: Callable[[Any, dict[str, np.ndarray], int, int], None]) -> Callable[..., Any]:
    real = validate.step_inputs

    def step_inputs(rope, hidden, position, context_length):  # type: ignore[no-untyped-def]
        inputs = real(rope, hidden, position, context_length)
        alter(rope, inputs, position, context_length)
        return inputs

    return step_inputs


def _negate_sin(rope, inputs, p, ctx):  # type: ignore[no-untyped-def]
    inputs["sin"] = -inputs["sin"]


def _drop_scaling(rope, inputs, p, ctx):  # type: ignore[no-untyped-def]
    for key in ("cos", "sin"):
        inputs[key] = (inputs[key].astype(np.float32) / rope.attention_scaling).astype(np.float16)


def _mask_one_too_wide(rope, inputs, p, ctx):  # type: ignore[no-untyped-def]
    inputs["attention_mask"][..., : min(p + 2, ctx)] = 0


def _kv_at_next_position(rope, inputs, p, ctx):  # type: ignore[no-untyped-def]
    inputs["position"] = np.array([min(p + 1, ctx - 1)], dtype=np.int32)


HOST_MUTANTS = {
    "negated_sin": _negate_sin,
    "longrope_scaling_dropped": _drop_scaling,
    "mask_one_too_wide": _mask_one_too_wide,
    "kv_at_position_plus_1": _kv_at_next_position,
}

# The gate that catches each mutant on both checkpoints (others may fail too). Measured
# values (tiny / odd), with the bound: see the comments. The real SmolLM2's layers [0, 2)
# give rmse 0.682 for mask_one_too_wide and 0.220 for query_scaling_x1.25.
CAUGHT_BY = {
    "negated_sin": "kv_cosine",  # 0.488 / 0.468, >= 0.99
    "rotate_half_swapped": "kv_cosine",  # 0.817 / 0.822
    "longrope_scaling_dropped": "kv_cosine",  # 0.936 / 0.926
    "query_scaling_x1.25": "rmse",  # worst step RMSE / RMS(ref) 0.264 / 0.264, <= 0.2
    "mask_one_too_wide": "rmse",  # 0.270 / 0.295
    "kv_at_position_plus_1": "kv_unwritten",  # 4.77 / 4.87, <= 0
    "gqa_wrong_kv_head": "layer_delta_cosine",  # 0.279 / 0.613, >= 0.9
    "gate_up_swapped": "step_delta_cosine",  # 0.600 / 0.447, >= 0.8
    "rmsnorm_eps_x100": "layer_delta_cosine",  # 0.761 / 0.680
    "neighbour_weights": "layer_delta_cosine",  # 0.016 / 0.014, and it names layer 1
}


@contextmanager
def _program_mutant(monkeypatch: pytest.MonkeyPatch, name: str, checkpoint: Any) -> Iterator[None]:
    cls, attr, fn = PROGRAM_MUTANTS[name]
    if fn is _neighbour_loader:
        fn = fn(checkpoint)
    with monkeypatch.context() as m:
        m.setattr(cls, attr, fn)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "golden-cache"


@pytest.fixture(scope="module", params=["tiny", "odd"])
def subject(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(checkpoint, the good shard's package) for each checkpoint, exported once."""
    name = {"tiny": "trained_checkpoint", "odd": "trained_odd_checkpoint"}[request.param]
    ckpt = request.getfixturevalue(name)
    pkg = tmp_path_factory.mktemp(f"good-{request.param}") / "layers_0_2.mlpackage"
    export_shard(ckpt, LayerSpec(LAYERS, pkg), CONFIG.export)
    return request.param, ckpt, pkg


def _validate(pkg: Path, ckpt: Any, cache: Path) -> dict[str, Any]:
    report = validate.validate_shard(pkg, ckpt, CONFIG.validation, backend="mil", cache_dir=cache)
    return report.to_dict()


def _failed(data: dict[str, Any]) -> dict[str, float | None]:
    return {g["name"]: g["value"] for g in data["gates"] if not g["passed"]}


def test_the_good_shard_passes(subject, cache, tmp_path):  # type: ignore[no-untyped-def]
    _, ckpt, pkg = subject
    data = _validate(pkg, ckpt, cache)
    assert data["verdict"] == "pass", _failed(data)
    traced = tmp_path / "traced.mlpackage"  # what the program-side mutants start from
    export_shard_traced(ckpt, LayerSpec(LAYERS, traced), CONFIG.export)
    assert _validate(traced, ckpt, cache)["verdict"] == "pass"
    # Every gate that catches a mutant is measured on the good shard too.
    assert set(CAUGHT_BY.values()) <= {g["name"] for g in data["gates"]}


@pytest.mark.parametrize("name", sorted(HOST_MUTANTS))
def test_host_side_bug_is_rejected(subject, cache, monkeypatch, name):  # type: ignore[no-untyped-def]
    _, ckpt, pkg = subject
    monkeypatch.setattr(validate, "step_inputs", _host(HOST_MUTANTS[name]))
    data = _validate(pkg, ckpt, cache)
    assert data["verdict"] == "fail"
    assert CAUGHT_BY[name] in _failed(data), _failed(data)


@pytest.mark.parametrize("name", sorted(PROGRAM_MUTANTS))
def test_program_side_bug_is_rejected(subject, cache, monkeypatch, tmp_path, name):  # type: ignore[no-untyped-def]
    _, ckpt, _ = subject
    pkg = tmp_path / "mutant.mlpackage"
    with _program_mutant(monkeypatch, name, ckpt):
        export_shard_traced(ckpt, LayerSpec(LAYERS, pkg), CONFIG.export)
    data = _validate(pkg, ckpt, cache)
    assert data["verdict"] == "fail"
    assert CAUGHT_BY[name] in _failed(data), _failed(data)
    if name == "neighbour_weights":  # the per-layer verdicts name the broken layer
        layers = {m["layer"]: m["delta_cosine"] for m in data["golden"]["layers"]}
        assert layers[0] > 0.99 > 0.9 > layers[1]
