"""Random-weight checkpoints in the real HF format: trained-like (the default) or flat.

The trained-like style behaves like a trained model where validation needs it to: massive
activations on BOS, hidden states growing with depth, next-token distributions as peaked as a
real model's (sensitivity.REAL_NEXT_TOKEN), and attention that is robust to weight noise as a
real model's is (sinks, recency and a shared direction in every token's state, rather than
peaks on arbitrary random keys).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anechain import random_structure as structure
from anechain.checkpoint_files import phi3_weight_bytes, save_sharded, write_config
from anechain.config import Architecture
from anechain.errors import CheckpointError
from anechain.fsutil import atomic_path

if TYPE_CHECKING:
    from anechain.checkpoint import Checkpoint


def hf_config_dict(arch: Architecture, rope_scaling: str | None = None) -> dict[str, Any]:
    """A config.json with the Phi-3 family's keys for `arch` (LongRoPE factors made up).

    As the real files: `rope_scaling` "longrope" when the model runs past its original
    window (the default then), else "none", written as null (Phi-3-mini-4k, Llama
    imports); no `partial_rotary_factor` key for full rotary (Phi-3's configs have none).
    """
    if rope_scaling is None:
        longer = arch.max_position_embeddings > arch.original_max_position_embeddings
        rope_scaling = "longrope" if longer else "none"
    half = arch.rotary_dim // 2
    # Plausible LongRoPE factors: short near 1, long rising towards the interpolation factor.
    short = [round(1.0 + 0.05 * i / max(half - 1, 1), 6) for i in range(half)]
    long = [round(1.0 + 30.0 * (i / max(half - 1, 1)) ** 2, 6) for i in range(half)]
    scaling: dict[str, Any] | None = None
    if rope_scaling == "longrope":
        scaling = {"type": "longrope", "short_factor": short, "long_factor": long}
    elif rope_scaling != "none":
        raise CheckpointError(f"unknown rope scaling {rope_scaling!r}; choose longrope or none")
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id(arch),
        "eos_token_id": arch.vocab_size - 1,
        "pad_token_id": arch.vocab_size - 1,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "original_max_position_embeddings": arch.original_max_position_embeddings,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_key_value_heads": arch.num_key_value_heads,
        "partial_rotary_factor": arch.partial_rotary_factor,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_scaling": scaling,
        "rope_theta": arch.rope_theta,
        "sliding_window": 262144,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": arch.vocab_size,
    }
    if arch.partial_rotary_factor == 1.0:
        del config["partial_rotary_factor"]
    return config


# Random-weight styles. "trained" (the default) behaves like a trained model where
# validation needs it to; "flat" is the earlier model (near-uniform attention), kept to
# compare against.
STYLES = ("trained", "flat")
# The trained style before it had shared structure (attention peaked on random keys), kept
# only so tests can show the sensitivity band rejects it; not offered by the CLI.
PEAKED = "peaked"
STATS_NAME = "random-checkpoint-stats.json"

# PEAKED's gain of the q and k rows of qkv_proj: logits of std ~QK_GAIN^2 peak each query
# on an arbitrary random key, which 0.9 % weight noise flips (sensitivity.py).
QK_GAIN = 1.6
# With the shared structure (random_structure), the random part of q/k only gives content
# variety (logit std ~1), as the structured parts decide where attention goes.
CONTENT_GAIN = 1.0
# Massive activations: in this early layer, a few MLP units fire on the BOS token only and
# write a few hundred into MASSIVE_CHANNELS; the residual carries it to the last layer.
MASSIVE_LAYER = 1
MASSIVE_VALUE = 300.0
_UNIT_PROJECTION = 8.0


def massive_channels(hidden_size: int) -> tuple[int, ...]:
    return (hidden_size // 5, (3 * hidden_size) // 4)


def _outlier_channels(hidden_size: int) -> torch.Tensor:
    """Channels whose down_proj rows are larger: the residual stream's outliers."""
    return torch.arange(3) * (hidden_size // 3) + 1


def _trigger_channels(hidden_size: int) -> torch.Tensor:
    """The few channels BOS's embedding lies on (no massive or outlier channel)."""
    h = hidden_size
    return torch.tensor([h // 8, (2 * h) // 5, (3 * h) // 5, h - 2])


def _trigger_direction(arch: Architecture, seed: int) -> torch.Tensor:
    """A unit vector on the trigger channels only, so the final norm can mute it: BOS's
    large embedding row must not dominate the tied LM head's logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.zeros(arch.hidden_size)
    channels = _trigger_channels(arch.hidden_size)
    u[channels] = torch.randn(len(channels), generator=gen).sign()
    return u / u.norm()


@dataclass(frozen=True)
class _Trigger:
    """The BOS direction the massive-activation units respond to, in hidden space."""

    direction: torch.Tensor  # (hidden,) unit vector
    # The direction every ordinary token shares (random_structure); None in PEAKED.
    shared: torch.Tensor | None = None


def _random_layer(
    arch: Architecture,
    layer: int,
    gen: torch.Generator,
    style: str = "trained",
    trigger: _Trigger | None = None,
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors with trained-like scales.

    Projections have unit gain (std 1/sqrt(fan_in)), norm gains scatter around 1, and the
    block outputs grow with depth, with a few outlier channels, so the residual stream
    grows through the layers as in a trained model. The "trained" style adds, in
    MASSIVE_LAYER, units that fire on the BOS direction, and random_structure's shared
    direction, recency and BOS sink (PEAKED: a q/k gain instead of the structure).
    """
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    nq, nkv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    depth = 1.0 + 2.0 * layer / max(arch.num_hidden_layers - 1, 1)

    def mat(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) * (gain / math.sqrt(inp))

    def gains(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    # Drawn in the flat model's order, so style "flat" reproduces it exactly.
    down = mat(h, i, 0.5 * depth)
    outliers = _outlier_channels(h)
    down[outliers] *= 6.0
    p = f"model.layers.{layer}."
    tensors = {
        p + "input_layernorm.weight": gains(h),
        p + "self_attn.qkv_proj.weight": mat(nq + 2 * nkv, h),
        p + "self_attn.o_proj.weight": mat(h, arch.num_attention_heads * d, 0.5 * depth),
        p + "post_attention_layernorm.weight": gains(h),
        p + "mlp.gate_up_proj.weight": mat(2 * i, h),
        p + "mlp.down_proj.weight": down,
    }
    if style in ("trained", PEAKED):
        # Outlier channels 3x (not 6x) the others: peaked attention already passes more of
        # each upstream rounding error on, and 6x made INT8 shards fail on that alone.
        down[outliers] *= 0.5
        qkv = tensors[p + "self_attn.qkv_proj.weight"]
        qkv[: nq + nkv] *= QK_GAIN if trigger is None or trigger.shared is None else CONTENT_GAIN
        massive = trigger is not None and layer == min(MASSIVE_LAYER, arch.num_hidden_layers - 1)
        if massive:
            _add_massive_units(arch, tensors[p + "mlp.gate_up_proj.weight"], down, trigger, gen)
        if trigger is not None and trigger.shared is not None:
            down *= structure.block_gain(layer)
            structure.route_shared_values(
                arch, qkv, tensors[p + "self_attn.o_proj.weight"], trigger.shared
            )
            tensors[p + "self_attn.o_proj.weight"] *= structure.block_gain(layer)
            structure.add_shared_units(
                arch,
                tensors[p + "mlp.gate_up_proj.weight"],
                down,
                trigger.shared,
                # The shared part builds up over the first layers, as a real model's does
                # (SmolLM2-135M: ~10 % of a state's energy after the embedding, ~45 % from
                # layer 2 on); it would otherwise drown the first layers' own outputs.
                min(1.0, layer / 3),
                gen,
                avoid=_massive_units(arch) if massive else torch.tensor([], dtype=torch.long),
            )
            structure.add_attention_structure(arch, qkv, trigger.shared, _bos_dir(trigger), gen)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


def _massive_units(arch: Architecture) -> torch.Tensor:
    i = arch.intermediate_size
    n = max(4, min(16, i // 16))
    return torch.arange(n) * (i // n)


def _bos_dir(trigger: _Trigger) -> torch.Tensor:
    """Where BOS's normed state lies: its trigger direction (first layers), then the
    massive channels."""
    h = trigger.direction.shape[0]
    v = trigger.direction.clone()
    v[list(massive_channels(h))] += 1.0 / math.sqrt(2)
    return v / v.norm()


def _add_massive_units(
    arch: Architecture,
    gate_up: torch.Tensor,  # (2I, H): gate rows, then up rows
    down: torch.Tensor,  # (H, I)
    trigger: _Trigger,
    gen: torch.Generator,
) -> None:
    """Make a few MLP units respond to the trigger direction and write massive values.

    On the normed input x (rms 1), a unit with gate and up rows a*u computes
    silu(a x.u) * a x.u: small for an ordinary token (x.u ~ N(0, 1)) but about
    (a sqrt(H))^2 for BOS, whose normed state lies near u.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    # A few units (as many as a tiny model has at any width): each carries a sizeable part
    # of the massive value, so its down_proj weights set their INT8 row scales, rather than
    # vanishing below them (at 3072 wide, 512 units each writing 3e-4 rounded to 0).
    units = _massive_units(arch)
    n = len(units)
    u = trigger.direction
    # Each row is u plus its own noise (as large as u): BOS still dominates every unit, and
    # the rows' INT8 rounding errors are independent, so they average out over the units.
    # Scaled so BOS's projection on a row is the same at any width (1 at hidden 64).
    scale = _UNIT_PROJECTION / math.sqrt(h)

    def rows() -> torch.Tensor:
        return scale * (u[None] + torch.randn(n, h, generator=gen) / math.sqrt(h))  # (n, H)

    gate_up[units] = rows()
    gate_up[i + units] = rows()
    # BOS's normed state lies along u (x.u ~ sqrt(H)): each unit gives ~_UNIT_PROJECTION^2.
    per_unit = _UNIT_PROJECTION**2
    weight = MASSIVE_VALUE / (n * per_unit)
    for c in massive_channels(h):
        down[c, units] = weight * (1.0 + 0.1 * torch.randn(n, generator=gen))
    # The units' other outputs stay ordinary.
    others = torch.ones(h, dtype=torch.bool)
    others[list(massive_channels(h))] = False
    rows_out = others.nonzero().squeeze(1)
    down[rows_out[:, None], units[None]] *= 0.1


@dataclass(frozen=True)
class HeadShape:
    """What sets the tied head's next-token distribution: the log-normal sigma of the
    embedding's row norms (the shape of the logits' tail; also the input rows' norms) and
    the logit scale the final norm's gains give (a temperature), or None for gains ~1."""

    spread: float
    logit_scale: float | None


# Matched to SmolLM2-135M's next-token statistics on the calibration text (mean entropy,
# median top1 - top2 margin in logit std units, median p(top1); sensitivity.REAL_NEXT_TOKEN):
# a tail just heavy enough that a few tokens stand out, logits of std ~3 as a real head's.
TRAINED_HEAD = HeadShape(spread=0.5, logit_scale=2.6)
# The generator before: norms spread by 1.5, so a few huge rows won every position by tens
# to hundreds of logits (entropy 0, next-token KL vacuous). Kept for PEAKED and for tests to
# show the next-token band rejects it.
OLD_HEAD = HeadShape(spread=1.5, logit_scale=None)
# Embedding rows are this std x randn before their norms spread.
_EMBEDDING_STD = 0.02


def _random_embedding(
    arch: Architecture,
    gen: torch.Generator,
    trigger: _Trigger | None = None,
    head: HeadShape = TRAINED_HEAD,
) -> torch.Tensor:
    """Token rows whose norms spread log-normally, as trained embeddings' do.

    With the head tied to it, that spread gives the logits a heavier tail than a Gaussian's:
    a few candidates stand out at each position, as in a trained model. With a trigger, the
    BOS row points along its direction, with a norm that keeps it dominant through the first
    layers (where the massive-activation units read it).
    """
    rows = torch.randn(arch.vocab_size, arch.hidden_size, generator=gen) * _EMBEDDING_STD
    spread = head.spread if trigger is not None else 0.75
    norms = torch.exp(spread * torch.randn(arch.vocab_size, 1, generator=gen))
    rows = rows * norms
    if trigger is not None:
        rows[bos_token_id(arch)] = trigger.direction * math.sqrt(arch.hidden_size)
        if trigger.shared is not None:
            structure.add_shared_to_embedding(rows, trigger.shared, bos_token_id(arch))
    return rows.to(torch.bfloat16)


def _random_lm_head(
    arch: Architecture, gen: torch.Generator, head: HeadShape | None
) -> torch.Tensor:
    """An untied head's rows: Gaussian, their norms spread as `head` says (the trained
    style's next-token shape, as a tied embedding gives it), or all alike (flat)."""
    rows = torch.randn(arch.vocab_size, arch.hidden_size, generator=gen) * _EMBEDDING_STD
    if head is not None:
        rows = rows * torch.exp(head.spread * torch.randn(arch.vocab_size, 1, generator=gen))
    return rows.to(torch.bfloat16)


def _final_norm(
    arch: Architecture,
    gen: torch.Generator,
    trigger: _Trigger | None,
    head: HeadShape = TRAINED_HEAD,
) -> torch.Tensor:
    """Final norm gains; the trained style mutes the channels that carry outliers (massive,
    outlier and BOS-trigger channels), as trained final norms do: their large values (and
    errors) would otherwise decide the tied head's logits. The gains then carry the head's
    temperature: a normed state (rms 1) times rows of std _EMBEDDING_STD gives logits of std
    ~_EMBEDDING_STD sqrt(H') x gain over its H' unmuted channels, so they are scaled to
    head.logit_scale at any width (at vocabulary 8192)."""
    h = arch.hidden_size
    gains = 1.0 + 0.1 * torch.randn(h, generator=gen)
    if trigger is not None:
        loud = [*_trigger_channels(h).tolist(), *massive_channels(h), *_outlier_channels(h)]
        if trigger.shared is not None:
            loud += structure.shared_channels(h).tolist()
        gains[torch.tensor(loud)] = 0.01
        if head.logit_scale is not None:
            # A larger vocabulary has more runners-up in its tail: the scale falls as
            # 1 / ln(vocab), set at the band's 8192 (200064 needed 0.75x, ln ratio 0.74).
            scale = head.logit_scale * math.log(8192) / math.log(arch.vocab_size)
            gains *= scale / (_EMBEDDING_STD * math.sqrt(h - len(set(loud))))
    return gains.to(torch.bfloat16)


def bos_token_id(arch: Architecture) -> int:
    """The BOS id random checkpoints declare (the last id, as hf_config_dict writes it)."""
    return arch.vocab_size - 1


def write_random_checkpoint(
    out_dir: str | Path,
    arch: Architecture,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: Callable[[str], None] | None = None,
    style: str = "trained",
    rope_scaling: str | None = None,
    head: HeadShape | None = None,
) -> Path:
    """Write a random-weight checkpoint in exactly the format of a real one.

    `head` (trained style) defaults to TRAINED_HEAD; PEAKED keeps OLD_HEAD, the generator
    it reproduces.

    Sharded bf16 safetensors + model.safetensors.index.json + config.json, built in a
    temporary folder and renamed into place. Layers are generated and written a shard
    file at a time, so memory stays near one shard even at full size.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it")
    if style not in (*STYLES, PEAKED):
        raise CheckpointError(f"unknown random-checkpoint style {style!r}; choose {STYLES}")
    gen = torch.Generator().manual_seed(seed)
    if head is None:
        head = OLD_HEAD if style == PEAKED else TRAINED_HEAD
    trigger = None
    if style in ("trained", PEAKED):
        shared = structure.shared_direction(arch, seed) if style == "trained" else None
        trigger = _Trigger(_trigger_direction(arch, seed), shared)

    def groups() -> Iterable[dict[str, torch.Tensor]]:
        yield {
            # Tied, the embedding is the head and takes its shape; untied, the input rows
            # stay as they were (the layers' behaviour the tests' bounds were measured on)
            # and the head gets the shape on its own rows.
            "model.embed_tokens.weight": _random_embedding(
                arch, gen, trigger, head if arch.tie_word_embeddings else OLD_HEAD
            ),
            "model.norm.weight": _final_norm(arch, gen, trigger, head),
        }
        for layer in range(arch.num_hidden_layers):
            if progress:
                progress(f"layer {layer + 1}/{arch.num_hidden_layers}")
            yield _random_layer(arch, layer, gen, style, trigger)
        if not arch.tie_word_embeddings:
            yield {
                "lm_head.weight": _random_lm_head(arch, gen, head if style == "trained" else None)
            }

    config = hf_config_dict(arch, rope_scaling)
    # The bytes needed, told ahead: a full disk is named with them (bf16 weights).
    with atomic_path(out_dir, overwrite=overwrite, expected_bytes=phi3_weight_bytes(config)) as tmp:
        tmp.mkdir()
        save_sharded(tmp, groups(), max_shard_bytes)
        write_config(tmp, config)
        if progress:
            progress("measuring activation statistics with transformers")
        from anechain.checkpoint import Checkpoint

        stats = random_checkpoint_stats(Checkpoint(tmp), style, seed)
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=2) + "\n")
    return out_dir


def random_checkpoint_stats(checkpoint: Checkpoint, style: str, seed: int) -> dict[str, Any]:
    """The statistics `random-checkpoint` writes beside the weights (STATS_NAME).

    Measured on BOS + 15 seeded token ids, with transformers' own layers.
    """
    import numpy as np

    from anechain.golden import activation_statistics

    arch = checkpoint.architecture
    ids = np.random.default_rng(0).integers(0, arch.vocab_size, size=15).tolist()
    return {
        "schema": "anechain.random-checkpoint-stats/1",
        "style": style,
        "seed": seed,
        "massive_channels": list(massive_channels(arch.hidden_size)) if style != "flat" else [],
        **activation_statistics(checkpoint, [bos_token_id(arch), *ids]),
    }
