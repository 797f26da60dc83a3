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
from itertools import groupby
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
    finite = np.isfinite(hidden).all(axis=1)
    if not finite.all():
        # A NaN row's key would reach every row's scores (0 * NaN in the product), so the
        # finite rows are finished without it; its own output stays NaN (KL None, a failure).
        out = np.full(np.shape(hidden), np.nan, np.float32)
        if finite.any():
            kept = [p for p, f in zip(positions, finite, strict=True) if f]
            out[finite] = finish_reference(
                checkpoint, ref, end, kept, np.asarray(hidden)[finite], progress
            )
        return out
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


# Records come in blocks of this many positions of one reference, each block grouped by
# window: the order validation has always written (the rows' own unless a name recurs).
_RECORD_BLOCK = 64

# Logit rows (shard and reference, per position) of one pass over the LM head. Each pass
# reads the whole head from disk (Phi-4-mini: 200064 x 3072 bf16, seconds), rows are cheap:
# 256 rows of a 200064 vocabulary are 205 MB of fp32 logits.
_HEAD_PASS_ROWS = 256


@dataclass(frozen=True)
class Substituted:
    """One reference's positions to judge, in record order: window names and positions, the
    hidden states entering the final norm with the shard's outputs substituted (N, C), and
    the reference's own there (N, C)."""

    names: list[str]
    positions: list[int]
    final: np.ndarray
    expected: np.ndarray


def substitute(
    checkpoint: Checkpoint,
    ref: Reference,
    end: int,
    windows: Sequence[Any],
    progress: Callable[[str], None] | None = None,
) -> Substituted:
    """`windows` (each with name, positions, outputs) substituted at layer `end` into `ref`
    (every layer's boundaries and KV) and finished by the reference; the LM head is left to
    `substituted_records`, so that one pass serves every reference."""
    n = checkpoint.architecture.num_hidden_layers
    positions = [int(p) for w in windows for p in w.positions]
    names = [w.name for w in windows for _ in w.positions]
    hidden = np.concatenate([np.asarray(w.outputs, np.float32) for w in windows])
    final = finish_reference(checkpoint, ref, end, positions, hidden, progress)
    order = _record_order(names)
    return Substituted(
        names=[names[k] for k in order],
        positions=[positions[k] for k in order],
        final=np.asarray(final, np.float32)[order],
        expected=np.asarray(ref.boundaries[n][[positions[k] for k in order]], np.float32),
    )


def _record_order(names: Sequence[str]) -> list[int]:
    """Row indices in record order: per block of _RECORD_BLOCK rows, grouped by window."""
    order: list[int] = []
    for i in range(0, len(names), _RECORD_BLOCK):
        block = names[i : i + _RECORD_BLOCK]
        for name in dict.fromkeys(block):
            order += [i + k for k, m in enumerate(block) if m == name]
    return order


def substituted_records(
    checkpoint: Checkpoint, parts: Sequence[Substituted]
) -> list[dict[str, Any]]:
    """Per-position records of every part, in order, against each part's reference.

    The LM head is read once for all of them (once per _HEAD_PASS_ROWS rows). A row's logits
    depend on the other rows of its pass only through how the fp32 product splits its work
    (the norm is per row; one thread gives the same bits, two may differ in the last one), so
    the records are those of a pass per reference, to fp32 rounding.
    """
    names = [m for p in parts for m in p.names]
    if not names:
        return []
    positions = [q for p in parts for q in p.positions]
    final = np.concatenate([p.final for p in parts])  # (N, C)
    expected = np.concatenate([p.expected for p in parts])  # (N, C)
    # Passes of equal size: no pass of a single position (2 rows) when one more would do.
    per_pass = max(1, _HEAD_PASS_ROWS // 2)
    passes = -(-len(names) // per_pass)
    size = -(-len(names) // passes)
    records: list[dict[str, Any]] = []
    for i in range(0, len(names), size):
        rows = slice(i, i + size)
        both = reference_logits(checkpoint, np.concatenate([final[rows], expected[rows]]))
        logits, ref_logits = both[: len(both) // 2], both[len(both) // 2 :]  # (n, vocab) each
        k = 0
        for name, run in groupby(names[rows]):  # each run of one window's rows
            j = k + len(list(run))
            records += position_records(name, positions[rows][k:j], ref_logits[k:j], logits[k:j])
            k = j
    return records


def window_records(
    checkpoint: Checkpoint,
    ref: Reference,
    end: int,
    windows: Sequence[Any],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-position records of `windows` (each with name, positions, outputs) substituted at
    layer `end` into `ref` (every layer's boundaries and KV), against the full reference."""
    return substituted_records(checkpoint, [substitute(checkpoint, ref, end, windows, progress)])


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
