"""Golden reference: hidden states from transformers' own Phi3 decoder layers, in fp32.

The reference is not the module export traces (that is what is being checked) but
`transformers.models.phi3.modeling_phi3.Phi3DecoderLayer`, run one layer at a time over the
whole calibration sequence with a causal mask and transformers' per-position (decode-step)
rotary embeddings: equal to step-by-step decode. Only one
layer's weights are in memory at a time, and only the calibration tokens' embedding rows
are read. Boundaries (the hidden state entering each layer) are cached in an .npz keyed by
checkpoint fingerprint and calibration tokens, and extended incrementally, so validating
five shards runs each layer once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings
from anechain.errors import CheckpointError, ConfigError
from anechain.fsutil import atomic_path

log = logging.getLogger(__name__)

_CACHE_VERSION = "golden-v1"


def default_cache_dir() -> Path:
    env = os.environ.get("ANECHAIN_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anechain"


def calibration_tokens(settings: ValidationSettings, vocab_size: int) -> list[int]:
    """The deterministic token sequence validation runs: explicit ids, or seeded draws."""
    if settings.calibration_tokens:
        tokens = list(settings.calibration_tokens)[: settings.steps]
        if len(tokens) < settings.steps:
            raise ConfigError(
                f"validation.calibration_tokens has {len(tokens)} ids; {settings.steps} steps "
                "need as many"
            )
    else:
        rng = np.random.default_rng(settings.calibration_seed)
        tokens = rng.integers(0, vocab_size, size=settings.steps).tolist()
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"calibration token {bad[0]} is outside the vocabulary ({vocab_size})")
    return [int(t) for t in tokens]


def _cache_path(cache_dir: Path, checkpoint: Checkpoint, tokens: list[int]) -> Path:
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{checkpoint.fingerprint}|{','.join(map(str, tokens))}".encode()
    ).hexdigest()[:24]
    return cache_dir / "golden" / f"{key}.npz"


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
        config._attn_implementation = "eager"
        self.config = config
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

    def run(self, layer_index: int, hidden: np.ndarray, cache: object = None) -> np.ndarray:
        """The layer's output (S, C); a transformers `Cache` given as `cache` receives its KV."""
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        layer = Phi3DecoderLayer(self.config, layer_idx=layer_index).eval()
        prefix = f"model.layers.{layer_index}."
        tensors = self.checkpoint.read_tensors(self.checkpoint.layer_tensor_names_for(layer_index))
        layer.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in tensors.items()}, strict=True
        )
        with torch.no_grad():
            out = layer(
                torch.from_numpy(hidden)[None],
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
                cache=cache,
            )
        out = out[0] if isinstance(out, tuple) else out
        return out[0].numpy()


def _load_cached(cache: Path, step_shape: tuple[int, int]) -> np.ndarray | None:
    """The cached boundaries (k, S, hidden) float32, or None: a truncated, corrupt or
    foreign file is a miss (recomputed and rewritten), never an error."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as data:
            have = data["boundaries"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        log.warning("ignoring unreadable golden cache %s", cache)
        return None
    if have.dtype != np.float32 or have.ndim != 3 or have.shape[1:] != step_shape or not len(have):
        log.warning("ignoring golden cache %s of shape %s %s", cache, have.shape, have.dtype)
        return None
    return have


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
    checkpoint.check_reference(upto)
    cache = _cache_path(cache_dir or default_cache_dir(), checkpoint, tokens)
    have = _load_cached(cache, (len(tokens), checkpoint.architecture.hidden_size))
    if have is not None and have.shape[0] > upto:
        return have[: upto + 1]

    boundaries = list(have) if have is not None else [_embed(checkpoint, tokens)]
    runner = _LayerRunner(checkpoint, len(tokens))
    for i in range(len(boundaries) - 1, upto):
        if progress:
            progress(f"reference: transformers layer {i} ({i + 1}/{upto})")
        boundaries.append(runner.run(i, boundaries[-1]))
    result = np.stack(boundaries).astype(np.float32)
    with atomic_path(cache, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, boundaries=result)
    return result
