"""Golden reference: hidden states from transformers' own Phi3 decoder layers, in fp32.

The reference is not the module export traces (that is what is being checked) but
`transformers.models.phi3.modeling_phi3.Phi3DecoderLayer`, run one layer at a time over the
whole calibration sequence with a causal mask and transformers' per-position (decode-step)
rotary embeddings: equal to step-by-step decode. It is streamed: one layer's weights are in
memory at a time (fp32, built in place from the checkpoint's tensors), attention runs through
transformers' SDPA path (no (H, S, S) probability matrix: 400 MB a layer at 2048 positions),
and only the calibration tokens' embedding rows are read. Each layer's output and KV cache go
to disk as it finishes (golden_store.py: one file per layer, keyed by checkpoint fingerprint
and calibration tokens) and are read back memory-mapped, so validating five shards runs each
layer once and a validation holds only the layers it reads.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings
from anechain.errors import CheckpointError, ConfigError
from anechain.golden_store import LayerStore, Stack

log = logging.getLogger(__name__)

_CACHE_VERSION = "golden-v3"  # v3: one file per layer (golden_store.py)


def default_cache_dir() -> Path:
    env = os.environ.get("ANECHAIN_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anechain"


# The default calibration text when the checkpoint has a tokenizer: trained models reach
# their largest activations at the first token (BOS) and at delimiters, so it has both.
CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
    "two astronauts walked on its surface.\nQ: What is 12 * 7? A: 84.\n"
    "def add(a, b):\n    return a + b\n"
)


def _tokenizer_ids(checkpoint: Checkpoint) -> list[int] | None:
    """BOS + CALIBRATION_TEXT with the checkpoint folder's own tokenizer, if it has one."""
    if not (checkpoint.path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    except Exception as exc:  # transformers raises assorted errors for broken tokenizers
        raise CheckpointError(f"{checkpoint.path}: cannot load its tokenizer ({exc})") from None
    ids = tok(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"]
    return [_bos(checkpoint), *ids]


def _bos(checkpoint: Checkpoint) -> int:
    bos = checkpoint.raw_config.get("bos_token_id")
    return int(bos) if isinstance(bos, int) else 0


def calibration_tokens(
    settings: ValidationSettings, checkpoint: Checkpoint, length: int | None = None
) -> list[int]:
    """The deterministic token sequence validation runs (`length` ids, default `steps`).

    Explicit `calibration_tokens` first; else, when the checkpoint folder has a tokenizer,
    BOS + a fixed text (repeated to length); else BOS + ids drawn with calibration_seed.
    Positions past `steps` (the late window's prefix) continue the same sequence.
    """
    vocab_size = checkpoint.architecture.vocab_size
    length = length or settings.steps
    if settings.calibration_tokens:
        tokens = list(settings.calibration_tokens)[: settings.steps]
        if len(tokens) < settings.steps:
            raise ConfigError(
                f"validation.calibration_tokens has {len(tokens)} ids; {settings.steps} steps "
                "need as many"
            )
    else:
        text = _tokenizer_ids(checkpoint)
        tokens = (text * (length // len(text) + 1))[:length] if text else [_bos(checkpoint)]
    if len(tokens) < length:
        rng = np.random.default_rng(settings.calibration_seed)
        tokens += rng.integers(0, vocab_size, size=length - len(tokens)).tolist()
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"calibration token {bad[0]} is outside the vocabulary ({vocab_size})")
    return [int(t) for t in tokens[:length]]


def _cache_path(cache_dir: Path, checkpoint: Checkpoint, tokens: list[int]) -> Path:
    """The folder of one reference (golden_store.LayerStore)."""
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{checkpoint.fingerprint}|{','.join(map(str, tokens))}".encode()
    ).hexdigest()[:24]
    return cache_dir / "golden" / key


def _embed(checkpoint: Checkpoint, tokens: list[int]) -> np.ndarray:
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    file = checkpoint._location(name).file
    try:
        with safe_open(str(file), framework="pt") as f:
            table = f.get_slice(name)
            rows = [table[t : t + 1] for t in tokens]  # only these rows are read
    except Exception as exc:  # SafetensorError has no importable base class
        raise CheckpointError(f"{file} cannot be read: {exc}") from None
    table_rows = torch.cat(rows)
    Checkpoint.check_finite(name, table_rows)  # only the calibration tokens' rows
    return table_rows.float().numpy()


class _LayerRunner:
    """transformers' Phi3DecoderLayer over a full sequence, one layer at a time."""

    def __init__(self, checkpoint: Checkpoint, seq_len: int) -> None:
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        self.checkpoint = checkpoint
        config = checkpoint.hf_config
        # SDPA for outputs and KV (no (H, S, S) probabilities in memory); eager where the
        # probabilities themselves are wanted (trace(..., probs=True)).
        config._attn_implementation = "sdpa"
        self.config = config
        self.eager_config = copy.deepcopy(config)
        self.eager_config._attn_implementation = "eager"
        positions = torch.arange(seq_len)[None]
        rotary = Phi3RotaryEmbedding(config)
        dummy = torch.zeros(1, 1, config.hidden_size)
        # One position at a time, as transformers' decode step computes them: LongRoPE picks
        # short or long factors by position, where one prefill call would pick for all.
        per_position = [rotary(dummy, torch.tensor([[p]])) for p in range(seq_len)]
        self.position_ids = positions
        self.position_embeddings = (
            torch.cat([c for c, _ in per_position], dim=1),
            torch.cat([s for _, s in per_position], dim=1),
        )
        causal = torch.full((seq_len, seq_len), torch.finfo(torch.float32).min).triu(1)
        self.mask = causal[None, None]  # (1, 1, S, S) additive

    def layer(self, layer_index: int, eager: bool = False) -> Any:
        """transformers' Phi3DecoderLayer `layer_index` with the checkpoint's weights, fp32."""
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        config = self.eager_config if eager else self.config
        with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned
            layer = Phi3DecoderLayer(config, layer_idx=layer_index).eval()
        prefix = f"model.layers.{layer_index}."
        tensors = self.checkpoint.read_tensors(self.checkpoint.layer_tensor_names_for(layer_index))
        state = {}
        for name in list(tensors):  # one bf16 tensor alive beside the fp32 ones
            state[name[len(prefix) :]] = tensors.pop(name).float()
        layer.load_state_dict(state, strict=True, assign=True)
        return layer

    def run(self, layer_index: int, hidden: np.ndarray, cache: Any = None) -> np.ndarray:
        """The layer's output (S, C); a transformers `Cache` given as `cache` receives its KV."""
        return self.trace(layer_index, hidden, cache, probs=False).hidden

    def trace(
        self, layer_index: int, hidden: np.ndarray, cache: Any = None, probs: bool = True
    ) -> LayerTrace:
        """One layer over the sequence, with its KV cache and (if `probs`, through the eager
        path) its attention probabilities."""
        from transformers import DynamicCache

        layer = self.layer(layer_index, eager=probs)
        kept: list[torch.Tensor] = []
        hook = layer.self_attn.register_forward_hook(lambda m, a, out: kept.append(out[1]))
        if cache is None:
            cache = DynamicCache(config=self.config)
        with torch.no_grad():
            out = layer(
                torch.from_numpy(np.array(hidden, np.float32))[None],  # a copy: may be a map
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
                cache=cache,
                use_cache=True,
            )
        hook.remove()
        out = out[0] if isinstance(out, tuple) else out
        kv = cache.layers[layer_index]
        return LayerTrace(
            hidden=out[0].numpy(),
            keys=kv.keys[0].numpy(),  # post-RoPE, as transformers caches them
            values=kv.values[0].numpy(),
            probs=kept[0][0].numpy() if probs else None,
        )


@dataclass(frozen=True)
class LayerTrace:
    """One reference layer over the calibration sequence."""

    hidden: np.ndarray  # (S, C) the layer's output
    keys: np.ndarray  # (KVH, S, D) transformers' key cache (post-RoPE)
    values: np.ndarray  # (KVH, S, D)
    probs: np.ndarray | None  # (H, S, S) attention probabilities (eager runs only)


def activation_statistics(checkpoint: Checkpoint, tokens: list[int]) -> dict[str, Any]:
    """What makes a model trained-like for validation, measured with the reference layers.

    Per layer: attention entropy of the last token over the whole sequence per head (in
    nats; uniform is ln S), the residual stream's RMS and largest |value|, and its top
    channels ("massive activations": a few channels far above the rest, carried on).
    """
    runner = _LayerRunner(checkpoint, len(tokens))
    hidden = _embed(checkpoint, tokens)
    layers = []
    for i in range(checkpoint.architecture.num_hidden_layers):
        t = runner.trace(i, hidden)
        hidden = t.hidden
        p = t.probs[:, -1].astype(np.float64)  # (H, S)
        entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
        peak = np.abs(hidden).max(axis=0)  # (C,) per channel over the sequence
        top = np.argsort(-peak)[:3]
        layers.append(
            {
                "layer": i,
                "attention_entropy": [round(float(e), 4) for e in entropy],
                "hidden_rms": round(float(np.sqrt(np.mean(hidden.astype(np.float64) ** 2))), 4),
                "hidden_max_abs": round(float(peak.max()), 3),
                "median_abs": round(float(np.median(np.abs(hidden))), 4),
                "top_channels": [[int(c), round(float(peak[c]), 3)] for c in top],
            }
        )
    return {
        "tokens": [int(t) for t in tokens],
        "uniform_entropy": round(math.log(len(tokens)), 4),
        "layers": layers,
    }


@dataclass(frozen=True)
class Reference:
    """transformers' layers over the calibration sequence, layers 0..upto-1, on disk.

    Each field indexes like the array it stands for; an entry is a memory map of its file.
    """

    boundaries: Stack  # (upto + 1, S, C): entry i enters layer i
    keys: Stack  # (upto, KVH, S, D): each layer's key cache (post-RoPE)
    values: Stack  # (upto, KVH, S, D)


def reference_boundaries(
    checkpoint: Checkpoint,
    tokens: list[int],
    upto: int,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Hidden states entering layers 0..upto: (upto + 1, len(tokens), hidden) float32.

    Entry i is the input of layer i, so entry `end` is the output of layer end-1 (never the
    final norm's output).
    """
    return reference(checkpoint, tokens, upto, cache_dir, progress).boundaries


def reference(
    checkpoint: Checkpoint,
    tokens: list[int],
    upto: int,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Reference:
    """Boundaries and KV caches of layers 0..upto-1, computed layer by layer (only the layers
    not on disk yet), each written to disk as it finishes and read back memory-mapped."""
    checkpoint.check_reference(upto)
    a = checkpoint.architecture
    store = LayerStore(
        _cache_path(cache_dir or default_cache_dir(), checkpoint, tokens),
        (len(tokens), a.hidden_size),
        (a.num_key_value_heads, len(tokens), a.head_dim),
    )
    done = store.layers_done(upto)
    if done < upto:
        if done < 0:
            hidden = _embed(checkpoint, tokens)
            store.write_embedding(hidden)
            done = 0
        else:
            hidden = np.array(store.boundaries(done)[done])
        runner = _LayerRunner(checkpoint, len(tokens))
        for i in range(done, upto):
            if progress:
                progress(f"reference: transformers layer {i} ({i + 1}/{upto})")
            t = runner.trace(i, hidden, probs=False)
            store.write_layer(i, t.hidden, t.keys, t.values)
            hidden = t.hidden
    return Reference(store.boundaries(upto), store.keys(upto), store.values(upto))
