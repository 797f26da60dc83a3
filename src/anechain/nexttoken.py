"""Next-token verdicts: a shard's outputs put in place of its layers in the fp32 reference.

Hidden-state gates say how far a shard's outputs are from transformers'; what a user sees is
the next token. For every validated position p (any window: early, late, prefill, ...), the
shard's output at p replaces the reference hidden state leaving its last layer; the remaining
reference layers (transformers' own Phi3DecoderLayer, one at a time) run on those rows only,
each row attending to the reference's KV cache at positions < p and to its own key at p (what
a decode step at p sees: a one-step-ahead verdict, so one bad position does not leak into the
next); then the final norm and the LM head. The distribution is compared with the full
reference's: KL(ref || shard), top-1 agreement, and each flip with the reference's logit margin
(top1 - top2) there. Aggregates are a pure function of the per-position records, so a reader
recomputes them (report_read.py) and refuses forged ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anechain.checkpoint import Checkpoint
from anechain.golden import Reference, _LayerRunner
from anechain.head import reference_logits


@dataclass(frozen=True)
class WindowOutputs:
    """One window's shard outputs: (N, C) hidden states at `positions` (each row is judged on
    its own). Any object with these fields will do (validate_long.WindowOutputs)."""

    name: str
    positions: tuple[int, ...]
    outputs: np.ndarray


def finish_reference(
    checkpoint: Checkpoint,
    ref: Reference,
    end: int,
    positions: Sequence[int],
    hidden: np.ndarray,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Reference layers end..n-1 over `hidden` (N, C) at `positions`, KV from `ref` (which
    must hold every layer's keys and values): the hidden states entering the final norm."""
    n = checkpoint.architecture.num_hidden_layers
    if end == n or not len(positions):
        return np.asarray(hidden, dtype=np.float32)
    seq = ref.boundaries.shape[1]
    runner = _LayerRunner(checkpoint, seq)
    pos = torch.tensor(list(positions))
    cos, sin = runner.position_embeddings
    embeddings = (cos[:, pos], sin[:, pos])
    # Row j sees the reference's keys at positions < p_j, and its own new key (after them).
    rows = len(pos)
    allowed = torch.cat([torch.arange(seq)[None] < pos[:, None], torch.eye(rows, dtype=bool)], 1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    x = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))[None]
    for i in range(end, n):
        if progress:
            progress(f"next-token: reference layer {i} over {rows} substituted positions")
        from transformers import DynamicCache

        cache = DynamicCache(config=runner.config)
        keys, values = (torch.from_numpy(np.array(kv[i]))[None] for kv in (ref.keys, ref.values))
        cache.update(keys, values, i)
        layer = runner.layer(i)
        with torch.no_grad():
            out = layer(
                x,
                attention_mask=mask[None, None],
                position_ids=pos[None],
                position_embeddings=embeddings,
                cache=cache,
                use_cache=True,
            )
        x = out[0] if isinstance(out, tuple) else out
    return x[0].numpy()


def position_records(
    window: str, positions: Sequence[int], ref_logits: np.ndarray, logits: np.ndarray
) -> list[dict[str, Any]]:
    """Per position: KL(ref || shard) in nats, both top-1 tokens, the reference's top1 - top2
    logit margin. A non-finite shard logit gives KL None (fails every gate)."""
    records = []
    for p, r, s in zip(positions, ref_logits, logits, strict=True):
        r, s = r.astype(np.float64), s.astype(np.float64)  # a row at a time: 1.6 MB each
        finite = bool(np.isfinite(s).all())
        lr = r - np.logaddexp.reduce(r)
        kl = None
        if finite:
            ls = s - np.logaddexp.reduce(s)
            kl = max(0.0, float(np.sum(np.exp(lr) * (lr - ls))))  # >= 0 up to rounding
        top2 = np.argpartition(-r, 1)[:2]
        expected = int(top2[np.argmax(r[top2])])
        records.append(
            {
                "window": window,
                "position": int(p),
                "kl": kl,
                "expected": expected,
                "token": int(np.argmax(s)) if finite else -1,
                "margin": float(r[top2].max() - r[top2].min()),
            }
        )
    return records


def summarize(records: Sequence[dict[str, Any]], share: float = 1.0) -> dict[str, Any]:
    """The verdict's figures from per-position records (what a reader recomputes).

    `share`: the shard's layers / the model's, recorded beside them (DESIGN.md, "Next-token
    verdicts", on why the budget is not split by it).
    """
    kls = [r["kl"] for r in records]
    bad = any(k is None or not math.isfinite(k) for k in kls)
    flips = [
        {k: r[k] for k in ("window", "position", "expected", "token", "margin")}
        for r in records
        if r["token"] != r["expected"]
    ]
    kl_mean = None if bad or not kls else float(np.mean(kls))
    kl_worst = None if bad or not kls else float(max(kls))
    return {
        "positions": len(records),
        "share": share,
        "kl_mean": kl_mean,
        "kl_worst": kl_worst,
        "top1_agreement": 1.0 - len(flips) / len(records) if records else None,
        "flips": flips,
        "worst_flip_margin": max((f["margin"] for f in flips), default=0.0),
    }


# Positions whose logits are computed at once (each pass reads the LM head from disk): a
# Phi-4-mini vocabulary is 200064 wide, 0.8 MB a row, twice (shard and reference).
_LOGIT_ROWS = 64


def window_records(
    checkpoint: Checkpoint,
    ref: Reference,
    end: int,
    windows: Sequence[Any],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-position records of `windows` (each with name, positions, outputs) substituted at
    layer `end` into `ref` (every layer's boundaries and KV), against the full reference."""
    n = checkpoint.architecture.num_hidden_layers
    positions = [int(p) for w in windows for p in w.positions]
    names = [w.name for w in windows for _ in w.positions]
    hidden = np.concatenate([np.asarray(w.outputs, np.float32) for w in windows])
    final = finish_reference(checkpoint, ref, end, positions, hidden, progress)
    records: list[dict[str, Any]] = []
    for i in range(0, len(positions), _LOGIT_ROWS):
        rows = slice(i, i + _LOGIT_ROWS)
        # Both in one pass over the LM head (read in blocks from disk).
        both = reference_logits(
            checkpoint, np.concatenate([final[rows], ref.boundaries[n][positions[rows]]])
        )
        logits, expected = both[: len(both) // 2], both[len(both) // 2 :]
        for name in dict.fromkeys(names[rows]):
            mine = [k for k, m in enumerate(names[rows]) if m == name]
            records += position_records(
                name, [positions[rows][k] for k in mine], expected[mine], logits[mine]
            )
    return records


def next_token_verdict(
    checkpoint: Checkpoint,
    ref: Reference,
    end: int,
    windows: Sequence[Any],
    share: float,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every window's outputs substituted at layer `end`, finished by the reference, against
    the full reference: {"metrics": all positions, "windows": per window, "per_position"}."""
    return assemble(window_records(checkpoint, ref, end, windows, progress), share)


def assemble(records: list[dict[str, Any]], share: float) -> dict[str, Any]:
    """The report's `next_token` block from its per-position records."""
    names = list(dict.fromkeys(r["window"] for r in records))
    return {
        "metrics": summarize(records, share),
        "windows": {n: summarize([r for r in records if r["window"] == n], share) for n in names},
        "per_position": records,
    }
