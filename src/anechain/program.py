"""Shard ML Programs written directly with coremltools' MIL Builder.

No torch tracing, no conversion of a float graph, no quantization pass: the weights come
quantized from `anechain.weights` and are placed as `constexpr_blockwise_shift_scale` data;
the ops emitted are the ones the traced torch module (`anechain.model`, the executable
specification) converts to, in the same order with the same constants, so both programs
compute the same fp16 values (tests/test_program_equivalence.py).

API (small on purpose; a T-token `prefill` function is built from the same pieces):

    LayerIO.placeholders(contract)         a function's inputs + states, contract names
    emit_layers(io, weights, arch, context, tokens=T) -> [Var]
                                           decoder layers over (1, C, 1, T) activations,
                                           each layer's output var; decode is T = 1. The
                                           weight consts carry their name as `weight_id`,
                                           so a second function emitting the same
                                           `LayerWeights` shares their blobs.
    emit_head(x, head_weights, eps)        final norm + chunked LM head
    layer_program / head_program           a one-function `main` Program
    to_mlmodel(prog)                       ct.convert with no graph passes (DESIGN.md)

Naming is deterministic: every op of shard-relative layer k starts with `layers_{k}_`
(the MIL runner attributes ops to layers by it), weights keep the Hugging Face names
(`layers_3_self_attn_qkv_proj_weight`), and layer k's output hidden state is the var
`layers_{k}_output` (the last one is the contract's `output_hidden_states`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from coremltools.converters.mil import Builder as mb

from anechain.config import Architecture
from anechain.contract import IOContract
from anechain.weights import HeadWeights, LayerWeights, emit_const

# --- emission -------------------------------------------------------------------------------


@dataclass
class LayerIO:
    """The vars a layer function reads: its inputs and states (contract names)."""

    hidden_states: Any  # (1, C, 1, T) fp16
    position: Any  # (1,) int32
    cos: Any  # (1, 1, T, R) fp16 (T = 1: (1, 1, 1, R))
    sin: Any
    attention_mask: Any  # (1, 1, T, context) fp16
    key_cache: Any  # state (L, KVH, context, D) fp16
    value_cache: Any

    @staticmethod
    def placeholders(contract: IOContract) -> dict[str, Any]:
        """Function input placeholders for a contract (inputs then states, in its order)."""
        from coremltools.converters.mil.mil import types

        dtypes = {"float16": types.fp16, "int32": types.int32}
        out = {
            s.name: mb.placeholder(shape=s.shape, dtype=dtypes[s.dtype]) for s in contract.inputs
        }
        for s in contract.states:
            out[s.name] = mb.state_tensor_placeholder(shape=s.shape, dtype=types.fp16)
        return out


def _fp16(x: float) -> np.float16:
    return np.float16(x)


def emit_rms_norm(x: Any, gain: Any, eps: float, p: str) -> Any:
    """ANERMSNorm: x / max(|x|, 1) before squaring (no fp16 overflow), as the traced program.

    eps / scale / scale is emitted as inverse(scale) * eps / scale, which is what the torch
    converter makes of `(eps / scale) / scale` (inverse's epsilon 1e-4 in fp32 included).
    """
    a = mb.abs(x=x, name=p + "abs")
    m = mb.reduce_max(x=a, axes=[1], keep_dims=True, name=p + "absmax")
    s = mb.clip(x=m, alpha=_fp16(1.0), beta=_fp16(np.inf), name=p + "scale")  # (1, 1, 1, T)
    xs = mb.real_div(x=x, y=s, name=p + "xs")
    inv_s = mb.inverse(x=s, epsilon=np.float32(1e-4), name=p + "inv_scale")
    e = mb.mul(x=inv_s, y=_fp16(eps), name=p + "eps_over_scale")
    e = mb.real_div(x=e, y=s, name=p + "eps")
    sq = mb.mul(x=xs, y=xs, name=p + "square")
    mean = mb.reduce_mean(x=sq, axes=[1], keep_dims=True, name=p + "mean")
    var = mb.add(x=mean, y=e, name=p + "var")
    inv = mb.rsqrt(x=var, epsilon=np.float32(1e-12), name=p + "rsqrt")
    y = mb.mul(x=xs, y=inv, name=p + "normed")
    return mb.mul(x=y, y=gain, name=p + "out")


def _conv(x: Any, weight: Any, name: str) -> Any:
    return mb.conv(
        x=x,
        weight=weight,
        strides=[1, 1],
        pad_type="valid",
        pad=[0, 0, 0, 0],
        dilations=[1, 1],
        groups=1,
        name=name,
    )


def _slice_channels(x: Any, start: int, stop: int, total: int, name: str) -> Any:
    """x[:, start:stop] of a (1, total, 1, T) tensor, as the converter writes it."""
    shape = list(x.shape)
    return mb.slice_by_index(
        x=x,
        begin=[0, start, 0, 0],
        end=[shape[0], stop, shape[2], shape[3]],
        end_mask=[True, stop == total, True, True],
        name=name,
    )


def _slice_last(x: Any, start: int, stop: int, name: str) -> Any:
    """x[..., start:stop] of a rank-4 tensor."""
    shape = [int(d) for d in x.shape]
    return mb.slice_by_index(
        x=x,
        begin=[0, 0, 0, start],
        end=[*shape[:3], stop],
        end_mask=[True, True, True, stop == shape[3]],
        name=name,
    )


def emit_rope(x: Any, cos: Any, sin: Any, arch: Architecture, p: str) -> Any:
    """Partial rotary (Phi3) on x (1, heads, T, D): rotate the first rotary_dim dims."""
    d, r = arch.head_dim, arch.rotary_dim
    half = r // 2
    rot = _slice_last(x, 0, r, p + "rot")
    x1 = _slice_last(rot, 0, half, p + "x1")
    x2 = _slice_last(rot, half, r, p + "x2")
    neg = mb.mul(x=x2, y=_fp16(-1.0), name=p + "neg_x2")
    rotated = mb.concat(values=[neg, x1], axis=-1, interleave=False, name=p + "rotated")
    a = mb.mul(x=rot, y=cos, name=p + "rot_cos")
    b = mb.mul(x=rotated, y=sin, name=p + "rot_sin")
    out = mb.add(x=a, y=b, name=p + "roped")
    if r == d:
        return out
    passthrough = _slice_last(x, r, d, p + "pass")
    return mb.concat(values=[out, passthrough], axis=-1, interleave=False, name=p + "full")


@dataclass
class _Shared:
    """Values every layer of one function uses, made once (as the converter shares them)."""

    kv_bounds: list[tuple[Any, Any]]  # per layer: KV write (begin, end), int32 (4,)
    mask: Any = None  # attention mask reshaped for the scores


def emit_kv_bounds(position: Any, num_layers: int, arch: Architecture, tokens: int) -> list:
    """Each layer's KV write window [k, 0, p, 0] .. [k + 1, KVH, p + T, D], emitted together.

    This is all the program's int32 arithmetic (one add, two concats per layer); made
    before the first fp16 op, it forms one block ahead of the graph instead of sitting
    between every layer's fp16 ops.
    """
    i32 = np.int32
    nkv, d = arch.num_key_value_heads, arch.head_dim
    position_end = mb.add(x=position, y=i32(tokens), name="position_end")
    bounds = []
    for k in range(num_layers):
        begin = mb.concat(
            values=[np.array([k], i32), np.array([0], i32), position, np.array([0], i32)],
            axis=0,
            interleave=False,
            name=f"layers_{k}_self_attn_kv_begin",
        )
        end = mb.concat(
            values=[
                np.array([k + 1], i32),
                np.array([nkv], i32),
                position_end,
                np.array([d], i32),
            ],
            axis=0,
            interleave=False,
            name=f"layers_{k}_self_attn_kv_end",
        )
        bounds.append((begin, end))
    return bounds


def _heads(x: Any, heads: int, d: int, tokens: int, name: str) -> Any:
    """(1, heads * D, 1, T) -> (1, heads, T, D)."""
    if tokens == 1:
        return mb.reshape(x=x, shape=[1, heads, 1, d], name=name)
    x = mb.reshape(x=x, shape=[1, heads, d, tokens], name=name + "_split")
    return mb.transpose(x=x, perm=[0, 1, 3, 2], name=name)


def emit_attention(
    h: Any,
    w: LayerWeights,
    io: LayerIO,
    shared: _Shared,
    state: dict[str, Any],
    arch: Architecture,
    context: int,
    offset: int,
    tokens: int,
) -> Any:
    """Self-attention of layer `offset` with its KV write at `position`; returns o_proj's output.

    `state` holds the latest value of each cache (read_state once, then each layer's
    coreml_update_state output), so the in-place writes chain through the layers.
    """
    p = w.prefix + "self_attn_"
    nh, nkv, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    q_size, kv_size = nh * d, nkv * d
    total = q_size + 2 * kv_size
    qkv = _conv(h, w.qkv_proj.emit(), p + "qkv")  # (1, (H + 2 KVH) D, 1, T)
    q = _heads(_slice_channels(qkv, 0, q_size, total, p + "q_flat"), nh, d, tokens, p + "q_heads")
    k = _slice_channels(qkv, q_size, q_size + kv_size, total, p + "k_flat")
    k = _heads(k, nkv, d, tokens, p + "k_heads")
    v = _slice_channels(qkv, q_size + kv_size, total, total, p + "v_flat")
    v = _heads(v, nkv, d, tokens, p + "v")
    # Scale q before the score matmul so scores stay small in fp16.
    q = mb.mul(x=emit_rope(q, io.cos, io.sin, arch, p + "q_"), y=_fp16(d**-0.5), name=p + "q")
    k = emit_rope(k, io.cos, io.sin, arch, p + "k_")

    if "key_cache" not in state:
        state["key_cache"] = mb.read_state(input=io.key_cache, name="key_cache_read")
        state["value_cache"] = mb.read_state(input=io.value_cache, name="value_cache_read")
    begin, end = shared.kv_bounds[offset]
    views = {}
    for cache, update in (("key_cache", k), ("value_cache", v)):
        written = mb.slice_update(
            x=state[cache],
            update=update,  # (1, KVH, T, D)
            begin=begin,
            end=end,
            stride=[1, 1, 1, 1],
            begin_mask=[False] * 4,
            end_mask=[False, True, False, True],
            squeeze_mask=[False] * 4,
            name=p + cache + "_write",
        )
        state[cache] = mb.coreml_update_state(
            state=getattr(io, cache), value=written, name=p + cache + "_update"
        )
        views[cache] = mb.slice_by_index(  # this layer's cache (KVH, context, D)
            x=state[cache],
            begin=[offset, 0, 0, 0],
            end=[offset + 1, nkv, context, d],
            end_mask=[False, True, True, True],
            squeeze_mask=[True, False, False, False],
            name=p + cache.split("_")[0] + "s",
        )
    groups = nh // nkv
    if tokens == 1:
        # GQA without repeating the cache: (KVH, G, D) x (KVH, D, context).
        qg = mb.reshape(x=q, shape=[nkv, groups, d], name=p + "q_grouped")
        keys, values = views["key_cache"], views["value_cache"]
        if shared.mask is None:
            shared.mask = mb.reshape(x=io.attention_mask, shape=[1, 1, -1], name="mask")
    else:
        # (KVH, G, T, D) x (KVH, 1, D, context); the mask (1, 1, T, context) broadcasts.
        qg = mb.reshape(x=q, shape=[nkv, groups, tokens, d], name=p + "q_grouped")
        keys = mb.expand_dims(x=views["key_cache"], axes=[1], name=p + "keys_g")
        values = mb.expand_dims(x=views["value_cache"], axes=[1], name=p + "values_g")
        if shared.mask is None:
            shared.mask = io.attention_mask
    scores = mb.matmul(x=qg, y=keys, transpose_x=False, transpose_y=True, name=p + "scores_raw")
    scores = mb.add(x=scores, y=shared.mask, name=p + "scores")
    probs = mb.softmax(x=scores, axis=-1, name=p + "probs")
    out = mb.matmul(x=probs, y=values, transpose_x=False, transpose_y=False, name=p + "context")
    if tokens == 1:
        out = mb.reshape(x=out, shape=[1, q_size, 1, 1], name=p + "context_flat")
    else:
        out = mb.reshape(x=out, shape=[1, nh, tokens, d], name=p + "context_heads")
        out = mb.transpose(x=out, perm=[0, 1, 3, 2], name=p + "context_t")
        out = mb.reshape(x=out, shape=[1, q_size, 1, tokens], name=p + "context_flat")
    return _conv(out, w.o_proj.emit(), p + "o")


def emit_mlp(h: Any, w: LayerWeights, arch: Architecture) -> Any:
    p = w.prefix + "mlp_"
    i = arch.intermediate_size
    gate_up = _conv(h, w.gate_up_proj.emit(), p + "gate_up")  # (1, 2I, 1, T)
    gate = _slice_channels(gate_up, 0, i, 2 * i, p + "gate")
    up = _slice_channels(gate_up, i, 2 * i, 2 * i, p + "up")
    act = mb.silu(x=gate, name=p + "act")
    return _conv(mb.mul(x=act, y=up, name=p + "gated"), w.down_proj.emit(), p + "down")


def emit_layers(
    io: LayerIO,
    layers: list[LayerWeights],
    arch: Architecture,
    context: int,
    tokens: int = 1,
    output_name: str = "output_hidden_states",
) -> list[Any]:
    """Decoder layers in order over (1, C, 1, T) activations; returns each layer's output var.

    The last layer's output is named `output_name`; layer k's is `layers_{k}_output`.
    """
    shared = _Shared(emit_kv_bounds(io.position, len(layers), arch, tokens))
    state: dict[str, Any] = {}
    x, outputs = io.hidden_states, []
    for n, w in enumerate(layers):
        offset = int(w.prefix.split("_")[1])
        gain_in = emit_const(w.input_layernorm, w.prefix + "input_layernorm_weight")
        gain_post = emit_const(
            w.post_attention_layernorm, w.prefix + "post_attention_layernorm_weight"
        )
        h = emit_rms_norm(x, gain_in, arch.rms_norm_eps, w.prefix + "input_layernorm_")
        attn = emit_attention(h, w, io, shared, state, arch, context, offset, tokens)
        x = mb.add(x=x, y=attn, name=w.prefix + "attn_residual")
        h = emit_rms_norm(x, gain_post, arch.rms_norm_eps, w.prefix + "post_attention_layernorm_")
        last = n == len(layers) - 1
        x = mb.add(x=x, y=emit_mlp(h, w, arch), name=output_name if last else w.prefix + "output")
        outputs.append(x)
    return outputs


def emit_head(x: Any, w: HeadWeights, eps: float) -> tuple[Any, Any]:
    """Final norm + chunked LM head: (chunk_max (1, n) fp16, chunk_argmax (1, n) int32)."""
    h = emit_rms_norm(x, emit_const(w.norm, "norm_weight"), eps, "norm_")
    maxes, indices = [], []
    for n, chunk in enumerate(w.chunks):
        p = f"chunks_{n}_"
        logits = _conv(h, chunk.emit(), p + "logits")  # (1, rows, 1, 1)
        flat = mb.reshape(x=logits, shape=[1, -1], name=p + "flat")
        maxes.append(mb.reduce_max(x=flat, axes=[1], keep_dims=True, name=p + "max"))
        indices.append(
            mb.reduce_argmax(
                x=flat, axis=1, keep_dims=True, output_dtype="int32", name=p + "argmax"
            )
        )
    return (
        mb.concat(values=maxes, axis=1, interleave=False, name="chunk_max"),
        mb.concat(values=indices, axis=1, interleave=False, name="chunk_argmax"),
    )


# --- programs ---------------------------------------------------------------------------------


def _function(contract: IOContract) -> Any:
    import coremltools as ct
    from coremltools.converters.mil.mil import Function

    return Function(LayerIO.placeholders(contract), opset_version=ct.target.iOS18)


def layer_program(
    contract: IOContract, layers: list[LayerWeights], arch: Architecture, context: int
) -> tuple[Any, list[str]]:
    """A `main` (decode, T = 1) Program for these layers; returns it and the layer output names."""
    from coremltools.converters.mil import mil

    prog = mil.Program()
    with _function(contract) as func:
        io = LayerIO(**{name: func.inputs[name] for name in func.inputs})
        outputs = emit_layers(io, layers, arch, context, tokens=1)
        func.set_outputs([outputs[-1]])
        prog.add_function("main", func)
    return prog, [v.name for v in outputs]


def layer_functions_program(
    arch: Architecture, context: int, layers: list[LayerWeights], prefill_tokens: int
) -> tuple[Any, list[str]]:
    """`decode` (T = 1, the default function) and `prefill` (T tokens) in one Program.

    Both functions emit the same LayerWeights, so each weight const carries the same
    `weight_id` in both and the package stores one blob per weight; the two functions
    declare the same states, which Core ML shares across a model's functions.
    """
    from coremltools.converters.mil import mil

    from anechain.contract import FUNCTION_DECODE, FUNCTION_PREFILL, layer_contract

    prog = mil.Program()
    names: list[str] = []
    for name, tokens in ((FUNCTION_DECODE, 1), (FUNCTION_PREFILL, prefill_tokens)):
        contract = layer_contract(arch, context, len(layers), tokens)
        with _function(contract) as func:
            io = LayerIO(**{n: func.inputs[n] for n in func.inputs})
            outputs = emit_layers(io, layers, arch, context, tokens=tokens)
            func.set_outputs([outputs[-1]])
            prog.add_function(name, func)
        names = names or [v.name for v in outputs]  # decode's, as layer_program's
    prog.default_function_name = FUNCTION_DECODE
    prog.export_as_multifunction = True
    return prog, names


def head_program(contract: IOContract, weights: HeadWeights, arch: Architecture) -> Any:
    from coremltools.converters.mil import mil

    prog = mil.Program()
    with _function(contract) as func:
        chunk_max, chunk_argmax = emit_head(
            func.inputs["hidden_states"], weights, arch.rms_norm_eps
        )
        func.set_outputs([chunk_max, chunk_argmax])
        prog.add_function("main", func)
    return prog


def pass_pipeline() -> Any:
    """No graph passes: the program is already in its final form (see DESIGN.md).

    With an empty main pipeline, coremltools also drops the cleanup passes from its backend
    pipeline (const elimination/deduplication, DCE, name dedup); what stays are the
    backend's own I/O and naming passes.
    """
    import coremltools as ct

    return ct.PassPipeline.EMPTY


def to_mlmodel(prog: Any, package_dir: Any = None) -> Any:
    """ct.convert of a built program (iOS18 ML Program, fp16), not loaded; saved at
    `package_dir` (an .mlpackage path) if given."""
    import coremltools as ct

    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=pass_pipeline(),
        skip_model_load=True,
        package_dir=None if package_dir is None else str(package_dir),
    )
