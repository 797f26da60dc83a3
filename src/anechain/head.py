"""The LM head: the host-side reduction of its chunks, and its golden check.

The head package returns, for each vocabulary chunk of `chunk_rows` rows, the largest logit
and its index in the chunk; the host picks the chunk with the largest logit. Its golden
reference is transformers' own Phi3RMSNorm + the LM head matrix in fp32, applied to the
reference hidden state leaving the last decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings
from anechain.contract import ShardMetadata
from anechain.golden import calibration_tokens, reference_boundaries
from anechain.metrics import compare
from anechain.runners import ShardRunner


def reduce_chunks(chunk_max: np.ndarray, chunk_argmax: np.ndarray, chunk_rows: int) -> int:
    """Token id from the head's per-chunk (max logit, index): the first chunk wins ties."""
    maxes = np.asarray(chunk_max, dtype=np.float32).reshape(-1)
    chunk = int(np.argmax(maxes))
    return chunk * chunk_rows + int(np.asarray(chunk_argmax).reshape(-1)[chunk])


def head_tensor_names(checkpoint: Checkpoint) -> tuple[str, str]:
    """(final norm, LM head): the head is the embedding when they are tied."""
    head = "lm_head.weight"
    if checkpoint.architecture.tie_word_embeddings or head not in checkpoint.tensor_names():
        head = "model.embed_tokens.weight"
    return "model.norm.weight", head


# Rows of the LM head read at once: the real head is 200064 x 3072 bf16 (1.2 GB), never
# in memory whole (16384 rows: 100 MB bf16, 200 MB as fp32).
_HEAD_BLOCK_ROWS = 16384


def reference_logits(checkpoint: Checkpoint, hidden: np.ndarray) -> np.ndarray:
    """(S, vocab) fp32 logits of transformers' Phi3RMSNorm + LM head for hidden (S, C)."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    norm_name, head_name = head_tensor_names(checkpoint)
    checkpoint.check_tensors([norm_name, head_name])
    (norm_weight,) = checkpoint.read_tensors([norm_name]).values()
    norm = Phi3RMSNorm(checkpoint.architecture.hidden_size, checkpoint.architecture.rms_norm_eps)
    vocab, width = checkpoint.tensor_shape(head_name)
    logits = np.empty((len(hidden), vocab), np.float32)
    # One fp32 block for every read: a new 200 MB tensor per block (rows.float()) costs its
    # page faults: 172 vs 19 ms a 16384-row block on one core; a full-size pass of one row
    # took 2.2 s, 0.6 s now. The same values in the same layout: the same logits, bit for bit.
    block = torch.empty(min(_HEAD_BLOCK_ROWS, vocab), width)
    with torch.no_grad():
        norm.weight.copy_(norm_weight.float())
        h = norm(torch.from_numpy(np.array(hidden, np.float32)))
        for i in range(0, vocab, _HEAD_BLOCK_ROWS):
            rows = checkpoint.read_rows(head_name, i, min(i + _HEAD_BLOCK_ROWS, vocab))
            w = block[: len(rows)].copy_(rows)  # (rows, C) fp32
            logits[:, i : i + len(rows)] = (h @ w.T).numpy()
    return logits


def run_head_golden(
    runner: ShardRunner,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-chunk maxima and the reduced token against the reference, over the calibration steps.

    Returns the metrics: `top1_agreement` (shard token == reference argmax), the comparison
    of the chunk maxima with the reference's (cosine, rmse, max_abs), `nonfinite`, and
    `worst_margin`: where the tokens differ, the largest reference-logit gap between the
    reference's token and the shard's, in units of that step's logit standard deviation (0
    when they all agree): a flip between near-ties is benign, any other is not.
    """
    chunk_rows = int(meta.extra["head_chunk_rows"])
    tokens = calibration_tokens(settings, checkpoint)
    n = checkpoint.architecture.num_hidden_layers
    hidden = reference_boundaries(checkpoint, tokens, n, cache_dir, progress)[n]  # (S, C)
    logits = reference_logits(checkpoint, hidden)  # (S, V)
    vocab = logits.shape[1]
    pad = (-vocab) % chunk_rows
    padded = np.pad(logits, ((0, 0), (0, pad)), constant_values=-np.inf)
    ref_chunk_max = padded.reshape(len(tokens), -1, chunk_rows).max(axis=2)  # (S, n_chunks)

    runner.reset()
    maxes, agree, margins, per_step = [], [], [], []
    first_nonfinite = None
    for p in range(len(tokens)):
        with np.errstate(over="ignore"):  # beyond fp16's range is inf, as on the device
            x = hidden[p].astype(np.float16).reshape(1, -1, 1, 1)
        out = runner.step({"hidden_states": x})
        cmax = out["chunk_max"].astype(np.float32).reshape(-1)
        maxes.append(cmax)
        finite = bool(np.isfinite(cmax).all())
        token = reduce_chunks(cmax, out["chunk_argmax"], chunk_rows) if finite else -1
        expected = int(np.argmax(logits[p]))
        ok = token == expected
        agree.append(ok)
        # A flip's margin, in units of this step's logit spread: scale-free across models.
        gap = logits[p, expected] - (logits[p, token] if finite else -np.inf)
        margin = 0.0 if ok else float(gap / logits[p].std())
        margins.append(margin)
        if not finite and first_nonfinite is None:
            first_nonfinite = {"step": p, **(getattr(runner, "first_nonfinite", None) or {})}
        per_step.append({"step": p, "token": token, "expected": expected, "margin": margin})
    chunk = compare(np.stack(maxes), ref_chunk_max)
    metrics = {
        "top1_agreement": float(np.mean(agree)),
        "worst_margin": max(margins) if np.isfinite(max(margins)) else None,
        "cosine": chunk.to_dict()["cosine"],
        "rmse": chunk.to_dict()["rmse"],
        "max_abs": chunk.to_dict()["max_abs"],
        "nonfinite": chunk.nonfinite,
    }
    return {"metrics": metrics, "per_step": per_step, "first_nonfinite": first_nonfinite}
