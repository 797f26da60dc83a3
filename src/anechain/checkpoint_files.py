"""Writing a checkpoint folder in Hugging Face's format: sharded safetensors + index.

Used by `random-checkpoint` and `import`, so both write exactly what a real checkpoint
holds and the reader (checkpoint.py) sees one format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def save_sharded(
    folder: Path, groups: Iterable[dict[str, torch.Tensor]], max_shard_bytes: int = 2 << 30
) -> int:
    """Write tensor groups (e.g. one decoder layer each) into model-0000k-of-0000n files.

    A group never straddles two files, and at most one file's tensors are held at a time,
    so memory stays near one shard file. Returns the total size of the weight files.
    """
    from safetensors.torch import save_file

    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f"part-{len(written) + 1:05d}.safetensors"
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        written.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending.update(group)
        pending_bytes += nbytes
    flush()
    weight_map: dict[str, str] = {}
    total_size = 0
    for n, (name, names) in enumerate(written, start=1):
        final = f"model-{n:05d}-of-{len(written):05d}.safetensors"
        (folder / name).rename(folder / final)
        total_size += (folder / final).stat().st_size
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total_size


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def phi3_weight_bytes(config: dict, bytes_per_param: int = 2) -> int:
    """The bytes of a Phi3 checkpoint's weights from its config.json dict (the space a
    write of it needs, told before it starts): embedding, untied head, final norm and per
    layer qkv_proj, o_proj, gate_up_proj, down_proj and two norms."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = h // heads
    vocab = config["vocab_size"]
    per_layer = (h + 2 * kv * head_dim) * h + h * h + 3 * i * h + 2 * h
    tied = config.get("tie_word_embeddings", False)
    total = vocab * h * (1 if tied else 2) + h + config["num_hidden_layers"] * per_layer
    return total * bytes_per_param
