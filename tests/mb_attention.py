"""A small two-function program built with coremltools' MIL Builder, for prefill tests.

One attention block (qkv 1x1 conv, partial RoPE from the host's cos/sin, the KV written as a
T-slice at `position`, GQA attention under the host's mask, o_proj, residual) in the shard
contract of contract.layer_contract, once for T = 1 (`decode`) and once for T (`prefill`),
sharing one pair of KV states and the weight blobs. It is not a Phi3 layer (no norms, no
MLP): it exercises what prefill adds (the T axis, the T-slice write, the causal mask rows,
state shared across functions) through the real runners on a real saved program.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anechain.config import Architecture
from anechain.contract import FUNCTION_DECODE, FUNCTION_PREFILL, layer_contract


def _function(arch: Architecture, context: int, tokens: int, weights: dict[str, np.ndarray]):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    contract = layer_contract(arch, context, 1, tokens)
    h, kvh, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    g, r, t = h // kvh, arch.rotary_dim, tokens
    specs = [
        mb.TensorSpec(s.shape, types.int32 if s.dtype == "int32" else types.fp16)
        for s in contract.inputs
    ] + [mb.StateTensorSpec(s.shape, types.fp16) for s in contract.states]

    def rope(x, cos, sin, heads):  # x: (1, heads, T, D); cos/sin: (1, 1, T, R)
        rot = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, heads, t, r])
        rest = mb.slice_by_index(x=x, begin=[0, 0, 0, r], end=[1, heads, t, d])
        x1 = mb.slice_by_index(x=rot, begin=[0, 0, 0, 0], end=[1, heads, t, r // 2])
        x2 = mb.slice_by_index(x=rot, begin=[0, 0, 0, r // 2], end=[1, heads, t, r])
        rotated = mb.concat(values=[mb.mul(x=x2, y=np.float16(-1)), x1], axis=-1)
        out = mb.add(x=mb.mul(x=rot, y=cos), y=mb.mul(x=rotated, y=sin))
        return mb.concat(values=[out, rest], axis=-1)

    def heads_last(x, heads):  # (1, heads * D, 1, T) -> (1, heads, T, D)
        x = mb.reshape(x=x, shape=[1, heads, d, t])
        return mb.transpose(x=x, perm=[0, 1, 3, 2])

    @mb.function(input_specs=specs, opset_version=ct.target.iOS18)
    def layer(hidden_states, position, cos, sin, attention_mask, key_cache, value_cache):
        qkv = mb.conv(x=hidden_states, weight=weights["qkv"], name="layers_0_qkv_proj")
        q = mb.slice_by_index(x=qkv, begin=[0, 0, 0, 0], end=[1, h * d, 1, t])
        k = mb.slice_by_index(x=qkv, begin=[0, h * d, 0, 0], end=[1, (h + kvh) * d, 1, t])
        v = mb.slice_by_index(
            x=qkv, begin=[0, (h + kvh) * d, 0, 0], end=[1, (h + 2 * kvh) * d, 1, t]
        )
        q = mb.mul(x=rope(heads_last(q, h), cos, sin, h), y=np.float16(d**-0.5))
        k = rope(heads_last(k, kvh), cos, sin, kvh)
        v = heads_last(v, kvh)
        zero = np.array([0, 0], np.int32)
        begin = mb.concat(values=[zero, position, np.array([0], np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, kvh, t, d], np.int32))
        keys = mb.slice_update(x=mb.read_state(input=key_cache), update=k, begin=begin, end=end)
        mb.coreml_update_state(state=key_cache, value=keys)
        values = mb.slice_update(x=mb.read_state(input=value_cache), update=v, begin=begin, end=end)
        mb.coreml_update_state(state=value_cache, value=values)
        q = mb.reshape(x=q, shape=[kvh, g, t, d])
        keys = mb.reshape(x=keys, shape=[kvh, 1, context, d])
        values = mb.reshape(x=values, shape=[kvh, 1, context, d])
        scores = mb.matmul(x=q, y=keys, transpose_y=True)  # (KVH, G, T, context)
        scores = mb.add(x=scores, y=attention_mask)
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=values)  # (KVH, G, T, D)
        out = mb.transpose(x=mb.reshape(x=out, shape=[1, h, t, d]), perm=[0, 1, 3, 2])
        out = mb.reshape(x=out, shape=[1, h * d, 1, t])
        out = mb.conv(x=out, weight=weights["o"], name="layers_0_o_proj")
        return mb.add(x=hidden_states, y=out, name="output_hidden_states")

    return layer


def build_attention_package(
    dest: Path, arch: Architecture, context: int, tokens: int, seed: int = 0
) -> Path:
    """Save the program (functions `decode` and, if tokens > 0, `prefill`) to `dest`."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Program
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    rng = np.random.default_rng(seed)
    h, kvh, d, c = (
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.head_dim,
        arch.hidden_size,
    )
    weights = {
        "qkv": (rng.standard_normal(((h + 2 * kvh) * d, c, 1, 1)) * c**-0.5).astype(np.float16),
        "o": (rng.standard_normal((c, h * d, 1, 1)) * (h * d) ** -0.5).astype(np.float16),
    }
    prog = Program()
    prog.add_function(FUNCTION_DECODE, _function(arch, context, 1, weights))
    if tokens:
        prog.add_function(FUNCTION_PREFILL, _function(arch, context, tokens, weights))
        prog.export_as_multifunction = True
        PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(prog)
    prog.default_function_name = FUNCTION_DECODE
    model = ct.convert(
        prog,
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    model.save(str(dest))
    return dest
