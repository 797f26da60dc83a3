"""Host-side inputs of a layer function: LongRoPE cos/sin, the attention mask, the write offset.

Decode feeds one position per call (`step_inputs`); prefill feeds a chunk of T positions
(`chunk_inputs`), the same contract at T > 1 (see contract.py). A chunk shorter than T is
padded: its padded rows write KV at positions past the real tokens, which no real row reads
(the mask stops every row at its own position) and which the next chunk or decode step
overwrites before any row reads them (each call writes its whole slice before attending).

The frequencies come from transformers' own rope init function for the checkpoint's
config, so the host applies exactly Phi3's LongRoPE: short factors while the sequence fits
`original_max_position_embeddings`, long factors past it, and the attention scaling folded
into cos/sin. The parameters serialise to plain lists, so a runtime can rebuild the inputs
from the manifest without the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from anechain.contract import MASK_VALUE


@dataclass(frozen=True)
class RopeParameters:
    inv_freq_short: tuple[float, ...]  # (rotary_dim / 2,)
    inv_freq_long: tuple[float, ...]
    attention_scaling: float
    original_max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> RopeParameters:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = hf_config.rope_parameters
        rope_type = params.get("rope_type", "default")
        original = int(
            params.get("original_max_position_embeddings") or hf_config.max_position_embeddings
        )
        if rope_type == "default":
            from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

            short, scaling = Phi3RotaryEmbedding.compute_default_rope_parameters(hf_config)
            long = short
        else:
            init = ROPE_INIT_FUNCTIONS[rope_type]
            short, scaling = init(hf_config, None)
            long, _ = init(hf_config, None, seq_len=original + 1)
        return cls(
            tuple(float(x) for x in short),
            tuple(float(x) for x in long),
            float(scaling),
            original,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inv_freq_short": list(self.inv_freq_short),
            "inv_freq_long": list(self.inv_freq_long),
            "attention_scaling": self.attention_scaling,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "long_when": "position + 1 > original_max_position_embeddings",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeParameters:
        return cls(
            tuple(data["inv_freq_short"]),
            tuple(data["inv_freq_long"]),
            float(data["attention_scaling"]),
            int(data["original_max_position_embeddings"]),
        )

    def cos_sin(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(rotary_dim,) float32 cos and sin for one position, as Phi3's rotary embedding.

        As in transformers' decode step, a position past the original context uses the long
        factors.
        """
        long = position + 1 > self.original_max_position_embeddings
        inv = np.asarray(self.inv_freq_long if long else self.inv_freq_short, dtype=np.float32)
        freqs = np.float32(position) * inv
        emb = np.concatenate([freqs, freqs])
        return (np.cos(emb) * self.attention_scaling).astype(np.float32), (
            np.sin(emb) * self.attention_scaling
        ).astype(np.float32)


def step_inputs(
    rope: RopeParameters, hidden: np.ndarray, position: int, context_length: int
) -> dict[str, np.ndarray]:
    """The inputs of every layer shard for one decode step.

    hidden: (hidden_size,) -> hidden_states (1, C, 1, 1) fp16.
    """
    return chunk_inputs(rope, np.asarray(hidden).reshape(1, -1), position, 1, context_length)


def chunk_inputs(
    rope: RopeParameters, hidden: np.ndarray, offset: int, tokens: int, context_length: int
) -> dict[str, np.ndarray]:
    """The inputs of a T-token layer function for positions offset .. offset + n - 1.

    hidden: (n, hidden_size), 1 <= n <= T -> hidden_states (1, C, 1, T) fp16, rows n..T-1
    zero. The call writes KV at offset .. offset + T - 1, so that slice must fit the context.
    Padded rows get their positions' cos/sin and the causal rule like real rows: finite,
    and never read by a real row.
    """
    hidden = np.asarray(hidden)
    n = hidden.shape[0]
    if hidden.ndim != 2 or not 1 <= n <= tokens:
        raise ValueError(f"a {tokens}-token chunk takes 1..{tokens} rows, got {hidden.shape}")
    if not (0 <= offset and offset + tokens <= context_length):
        raise ValueError(
            f"positions {offset}..{offset + tokens - 1} outside the context of {context_length}"
        )
    positions = range(offset, offset + tokens)
    cos, sin = zip(*(rope.cos_sin(p) for p in positions), strict=True)  # T x (R,)
    with np.errstate(over="ignore"):  # beyond fp16's range is inf, as on the device
        hidden16 = np.zeros((tokens, hidden.shape[1]), np.float16)
        hidden16[:n] = hidden.astype(np.float16)
    # Row i attends to columns 0 .. offset + i.
    columns = np.arange(context_length)[None, :]
    rows = np.arange(offset, offset + tokens)[:, None]
    mask = np.where(columns <= rows, 0.0, MASK_VALUE).astype(np.float16)  # (T, context)
    return {
        "hidden_states": np.ascontiguousarray(hidden16.T).reshape(1, -1, 1, tokens),
        "position": np.array([offset], dtype=np.int32),
        "cos": np.stack(cos).astype(np.float16).reshape(1, 1, tokens, -1),
        "sin": np.stack(sin).astype(np.float16).reshape(1, 1, tokens, -1),
        "attention_mask": mask.reshape(1, 1, tokens, context_length),
    }


def chunk_outputs(output_hidden_states: np.ndarray, n: int) -> np.ndarray:
    """A T-token function's output (1, C, 1, T) -> the n real rows (n, C)."""
    out = np.asarray(output_hidden_states)
    return out.reshape(out.shape[1], out.shape[-1]).T[:n]


def prefill_plan(length: int, tokens: int, context_length: int) -> list[tuple[int, int]]:
    """(offset, n) chunks covering positions 0 .. length - 1 in T-token calls.

    Every call writes a whole T-slice, so a chunk must end inside the context: positions
    the last fitting chunk cannot reach are left to decode (the list covers fewer).
    """
    if tokens < 1:
        raise ValueError(f"prefill needs T >= 1, got {tokens}")
    return [
        (offset, min(tokens, length - offset))
        for offset in range(0, length, tokens)
        if offset + tokens <= context_length
    ]
