"""Validate a shard's `prefill` function against transformers, and decode continuing after it.

The calibration sequence's first P positions are fed in T-token chunks (the last one
partial, P not a multiple of T) through `prefill`; every position's output is compared with
transformers' layer outputs, and the KV states the chunks wrote with the keys and values
transformers' own attention caches (post-RoPE, per layer). Then `decode` runs the remaining
positions from that very cache (one state shared by both functions) and is compared as the
decode-only loop compares it. Gates reuse the decode gates, named `prefill_*`,
`prefill_kv_*` and `prefill_decode_*`, so a report's verdict covers both functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings
from anechain.contract import FUNCTION_PREFILL, ShardMetadata
from anechain.errors import PackageError
from anechain.golden import calibration_tokens, reference
from anechain.metrics import compare, compare_shard
from anechain.report import PREFILL_GATES, Gate, evaluate_specs
from anechain.rope import chunk_inputs, chunk_outputs, prefill_plan, step_inputs
from anechain.runners import ShardRunner, open_runner


def prefill_length(steps: int, tokens: int) -> int:
    """How many calibration positions prefill covers: about 3/4 of them, never a multiple of
    T (a partial last chunk is always checked), leaving at least one for decode."""
    if steps < 2:
        raise PackageError(f"validating prefill needs at least 2 steps, got {steps}")
    p = max(1, min(steps - 1, (3 * steps) // 4))
    if p % tokens == 0 and p > 1:
        p -= 1
    return p


@dataclass
class PrefillGolden:
    """Prefill's parity: outputs per position, KV states, and decode continuing after it."""

    tokens: int  # T
    chunks: list[tuple[int, int]]  # (offset, real rows)
    metrics: dict[str, Any]  # prefill outputs over positions 0..P-1 (as decode's metrics)
    kv: dict[str, Any]  # {"keys": Comparison, "values": Comparison} over 0..P-1
    decode_metrics: dict[str, Any]  # prefill 0..P-1 then decode P..S-1, as one run
    per_position: list[dict[str, Any]]
    gates: tuple[Gate, ...] = ()
    outputs: Any = None  # validate_long.WindowOutputs "prefill": every position, not written

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "chunks": [list(c) for c in self.chunks],
            "metrics": self.metrics,
            "kv": self.kv,
            "decode_metrics": self.decode_metrics,
            "per_position": self.per_position,
            "passed": self.passed,
        }


def run_prefill_golden(
    decode: ShardRunner,
    prefill: ShardRunner,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> PrefillGolden:
    """`prefill` and `decode` share one state; prefill in chunks, then decode, vs transformers."""
    if meta.layers is None or not meta.prefill_tokens:
        raise PackageError("the package has no prefill function")
    t, context, layers = meta.prefill_tokens, meta.context_length, meta.layers
    tokens = calibration_tokens(settings, checkpoint)
    if len(tokens) > context:
        raise PackageError(f"{len(tokens)} validation steps do not fit the context of {context}")
    p = prefill_length(len(tokens), t)
    chunks = prefill_plan(p, t, context)
    covered = sum(n for _, n in chunks)
    ref = reference(checkpoint, tokens, layers.end, cache_dir, progress)
    ref_in, ref_out = ref.boundaries[layers.start], ref.boundaries[layers.end]  # (S, C)
    from anechain.validate import package_rope

    rope = package_rope(meta, checkpoint, "the package")  # what a runtime builds cos/sin from

    decode.reset()  # and prefill's: one state
    fed, outs = [], []
    for offset, n in chunks:
        x = chunk_inputs(rope, ref_in[offset : offset + n], offset, t, context)
        out = prefill.step(x)["output_hidden_states"]
        outs.append(chunk_outputs(out, n).astype(np.float32))
        fed.append(chunk_outputs(x["hidden_states"], n).astype(np.float32))
        if progress:
            progress(f"[{layers}] prefill chunk at {offset}: {n} of {t} rows")
    keys = decode.read_state("key_cache").astype(np.float32)[:, :, :covered]
    values = decode.read_state("value_cache").astype(np.float32)[:, :, :covered]
    # transformers' own key/value caches of these layers (post-RoPE), stored with the reference
    ref_keys = np.asarray(ref.keys[layers.start :], np.float32)  # (layers, KVH, S, D)
    ref_values = np.asarray(ref.values[layers.start :], np.float32)
    a_in, a_out = np.concatenate(fed), np.concatenate(outs)
    per_position = [
        {
            "position": i,
            "function": FUNCTION_PREFILL,
            **compare_shard(a_in[i], a_out[i], ref_in[i], ref_out[i]).to_dict(),
        }
        for i in range(covered)
    ]
    metrics = compare_shard(a_in, a_out, ref_in[:covered], ref_out[:covered]).to_dict()
    kv = {
        "keys": compare(keys, ref_keys[:, :, :covered]).to_dict(),
        "values": compare(values, ref_values[:, :, :covered]).to_dict(),
    }

    d_in, d_out = [], []
    for q in range(covered, len(tokens)):  # decode continues from the prefilled cache
        x = step_inputs(rope, ref_in[q], q, context)
        out = decode.step(x)["output_hidden_states"].astype(np.float32).reshape(-1)
        d_in.append(x["hidden_states"].astype(np.float32).reshape(-1))
        d_out.append(out)
        per_position.append(
            {
                "position": q,
                "function": "decode",
                **compare_shard(d_in[-1], out, ref_in[q], ref_out[q]).to_dict(),
            }
        )
    # Gated as decode-only validation gates its run: over the whole sequence a runtime produces
    # (prefill, then decode), so the overall cosine means the same in both; the per-step
    # relative gates still see every decode step after prefill on its own.
    decode_metrics = compare_shard(
        np.concatenate([a_in, np.stack(d_in)]),
        np.concatenate([a_out, np.stack(d_out)]),
        ref_in[: len(tokens)],
        ref_out[: len(tokens)],
    ).to_dict()

    # report.PREFILL_GATES: the decode gates on each part, read where the report keeps them.
    evidence = {"prefill": {"metrics": metrics, "kv": kv, "decode_metrics": decode_metrics}}
    gates = evaluate_specs(evidence, settings.gates, PREFILL_GATES)
    from anechain.validate_long import WindowOutputs

    outputs = WindowOutputs(
        "prefill",
        tuple(tokens),
        np.arange(len(tokens)),
        np.concatenate([a_in, np.stack(d_in)]),
        np.concatenate([a_out, np.stack(d_out)]),
    )
    return PrefillGolden(t, chunks, metrics, kv, decode_metrics, per_position, gates, outputs)


def open_prefill_runner(
    backend: str, package: str | Path, decode: ShardRunner, **options: Any
) -> ShardRunner:
    """The package's prefill function, sharing `decode`'s state."""
    return open_runner(backend, package, function=FUNCTION_PREFILL, state_from=decode, **options)
