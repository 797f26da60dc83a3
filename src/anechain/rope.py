"""Host-side per-step inputs: LongRoPE cos/sin, the attention mask and the write position.

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
    if not 0 <= position < context_length:
        raise ValueError(f"position {position} outside the context of {context_length}")
    cos, sin = rope.cos_sin(position)
    with np.errstate(over="ignore"):  # beyond fp16's range is inf, as on the device
        hidden16 = np.asarray(hidden).astype(np.float16)
    mask = np.full((1, 1, 1, context_length), MASK_VALUE, dtype=np.float16)
    mask[..., : position + 1] = 0
    return {
        "hidden_states": hidden16.reshape(1, -1, 1, 1),
        "position": np.array([position], dtype=np.int32),
        "cos": cos.astype(np.float16).reshape(1, 1, 1, -1),
        "sin": sin.astype(np.float16).reshape(1, 1, 1, -1),
        "attention_mask": mask,
    }
