"""Seeded export bugs for a real checkpoint: the shard is built from altered weights while
the reference (transformers over the checkpoint folder) stays right, so validation and
build must reject it. Used by tests/test_real_model.py and scripts/bench_real.py.

- `neighbour`: one layer exported with the next layer's weights (an off-by-one in the
  layer range a shard reads);
- `qk_gguf`: every layer's q and k rows in llama.cpp's interleaved order, i.e. a GGUF
  import that forgot to undo the permutation (rotate_half pairs the wrong dimensions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import anechain.export as export
from anechain.checkpoint import Checkpoint

MUTANTS = ("neighbour", "qk_gguf")


def gguf_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate_half) rows -> llama.cpp's interleaved order, as its converter writes them."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@contextmanager
def seeded(mutant: str, checkpoint: Checkpoint, layer: int) -> Iterator[None]:
    """Exports inside the block read `mutant`'s weights (`layer`: the one `neighbour` alters)."""
    if mutant not in MUTANTS:
        raise ValueError(f"unknown mutant {mutant!r}; choose {MUTANTS}")
    arch = checkpoint.architecture
    real = export.iter_tensors

    def altered(ckpt: Checkpoint, names):  # type: ignore[no-untyped-def]
        for name, tensor in real(ckpt, names):
            if mutant == "neighbour" and name.startswith(f"model.layers.{layer}."):
                src = name.replace(f"layers.{layer}.", f"layers.{layer + 1}.", 1)
                tensor = ckpt.read_tensors([src])[src]
            elif mutant == "qk_gguf" and name.endswith("self_attn.qkv_proj.weight"):
                q_rows = arch.num_attention_heads * arch.head_dim
                kv_rows = arch.num_key_value_heads * arch.head_dim
                q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
                q = gguf_order(q, arch.num_attention_heads)
                k = gguf_order(k, arch.num_key_value_heads)
                tensor = torch.cat([q, k, v]).contiguous()
            yield name, tensor

    export.iter_tensors = altered
    try:
        yield
    finally:
        export.iter_tensors = real
