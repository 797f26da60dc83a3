"""The runtime's window: a long prompt through the shard's own functions and cache, then decode.

The other windows each leave part of a runtime's run out: early decodes from an empty cache
for `steps` tokens, late fills the cache from the reference, prefill covers about 3/4 of
`steps` tokens. Here the first `prompt` positions of the calibration sequence (default: the
context minus `long_steps`) go through the shard as a runtime feeds them, in T-token chunks
through `prefill` (`rope.prefill_plan`, as `generate` does; positions the last fitting
chunk cannot reach are decoded), or token by token through `decode` for a decode-only
package, every call writing the shard's own KV state; then `long_steps` decode steps
continue from that cache. Every position's output is compared with transformers' layer
output, and the KV state read back with transformers' cache at every position, so a
cache-position or mask bug that only shows after many chunks is seen.

The reference is golden.py's, layer by layer and cached on disk: with the late window on,
the same sequence and cache entry the decode windows use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from anechain.checkpoint import Checkpoint
from anechain.config import ValidationSettings
from anechain.contract import FUNCTION_DECODE, FUNCTION_PREFILL, ShardMetadata
from anechain.golden import calibration_tokens, reference
from anechain.metrics import compare_cache, compare_shard, compare_shard_rows
from anechain.report import LONG_GATES, Gate, evaluate_specs
from anechain.rope import RopeParameters, chunk_inputs, chunk_outputs, prefill_plan, step_inputs
from anechain.runners import ShardRunner

_STATES = ("key_cache", "value_cache")


@dataclass(frozen=True)
class WindowOutputs:
    """A shard's outputs over one validated window, in the form a consumer that substitutes
    them into the reference needs (next-token verdicts): position i of `positions` is the
    calibration sequence `tokens`' position, `fed` what the shard was given there (the fp16
    reference input), `outputs` what it returned. float32 (N, hidden)."""

    name: str  # "early", "late", "long"
    tokens: tuple[int, ...]  # the calibration sequence the positions index
    positions: np.ndarray  # (N,) int64
    fed: np.ndarray  # (N, C)
    outputs: np.ndarray  # (N, C)

    def sample(self, rows: int, keep_last: int = 0) -> WindowOutputs:
        """At most `rows` of the positions: the last `keep_last`, and the rest spread evenly
        over those before them (the first and the last of them included)."""
        n = len(self.positions)
        if n <= rows:
            return self
        tail = min(keep_last, rows)
        before = n - tail
        spread = np.linspace(0, before - 1, rows - tail).round().astype(np.int64)
        pick = np.concatenate([np.unique(spread), np.arange(before, n)])
        return replace(
            self, positions=self.positions[pick], fed=self.fed[pick], outputs=self.outputs[pick]
        )


@dataclass
class LongGolden:
    """The long window's parity: every position, the KV states, and the gates on them."""

    prompt: int  # positions fed as the prompt (prefill chunks, or decode steps)
    decode_steps: int  # decode steps after the prompt
    function: str  # how the prompt went in: "prefill" or "decode"
    tokens: int  # T of the prompt's calls
    chunks: list[tuple[int, int]]  # (offset, real rows) of the prefill calls
    metrics: dict[str, Any]  # every position, as golden.metrics (gated)
    decode_metrics: dict[str, Any]  # the decode steps after the prompt alone (reported)
    kv: list[dict[str, Any]]  # per state and layer, over every position
    per_position: list[dict[str, Any]]
    first_nonfinite: dict[str, Any] | None
    outputs: WindowOutputs
    gates: tuple[Gate, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "decode_steps": self.decode_steps,
            "function": self.function,
            "tokens": self.tokens,
            "chunks": [list(c) for c in self.chunks],
            "metrics": self.metrics,
            "decode_metrics": self.decode_metrics,
            "kv": self.kv,
            "per_position": self.per_position,
            "first_nonfinite": self.first_nonfinite,
            "passed": all(g.passed for g in self.gates),
        }


def run_long_golden(
    decode: ShardRunner,
    prefill: ShardRunner | None,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    rope: RopeParameters,
    reference_length: int,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LongGolden | None:
    """The long window on `decode` (and `prefill`, sharing its state), or None when the
    settings turn it off. `reference_length`: the calibration sequence the decode windows
    used (their reference is reused when it covers the window)."""
    window = settings.long_window(meta.context_length)
    if window is None or meta.layers is None:
        return None
    prompt, steps = window
    context, layers = meta.context_length, meta.layers
    total = prompt + steps
    tokens = calibration_tokens(settings, checkpoint, max(total, reference_length))
    ref = reference(checkpoint, tokens, layers.end, cache_dir, progress)
    ref_in, ref_out = ref.boundaries[layers.start], ref.boundaries[layers.end]  # (S, C)

    t = meta.prefill_tokens if prefill is not None else 1
    chunks = prefill_plan(prompt, t, context) if prefill is not None else []
    covered = sum(n for _, n in chunks)
    decode.reset()  # and prefill's: one state
    fed: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    for k, (offset, n) in enumerate(chunks):
        x = chunk_inputs(rope, ref_in[offset : offset + n], offset, t, context)
        out = prefill.step(x)["output_hidden_states"]  # type: ignore[union-attr]
        outs.append(chunk_outputs(out, n).astype(np.float32))
        fed.append(chunk_outputs(x["hidden_states"], n).astype(np.float32))
        if progress and (k + 1) % 16 == 0:
            progress(f"[{layers}] long window: prefill chunk {k + 1} of {len(chunks)}")
    for q in range(covered, total):
        x = step_inputs(rope, ref_in[q], q, context)
        out = decode.step(x)["output_hidden_states"]
        outs.append(out.astype(np.float32).reshape(1, -1))
        fed.append(x["hidden_states"].astype(np.float32).reshape(1, -1))
        if progress and (q + 1) % 64 == 0:
            progress(f"[{layers}] long window: position {q + 1} of {total}")
    a_in, a_out = np.concatenate(fed), np.concatenate(outs)

    rows = compare_shard_rows(a_in, a_out, ref_in[:total], ref_out[:total])
    per_position = [
        {"position": i, "function": FUNCTION_PREFILL if i < covered else FUNCTION_DECODE, **c}
        for i, c in enumerate(rows)
    ]
    bad = [p["position"] for p in per_position if p["nonfinite"]]
    metrics = compare_shard(a_in, a_out, ref_in[:total], ref_out[:total]).to_dict()
    deltas = [p["delta_cosine"] for p in per_position]
    metrics["step_delta_cosine"] = None if None in deltas else min(deltas)
    decode_metrics = compare_shard(
        a_in[prompt:], a_out[prompt:], ref_in[prompt:total], ref_out[prompt:total]
    ).to_dict()

    # The cache as the runtime leaves it. Padded rows of the last chunk write past the prompt
    # (rope.chunk_inputs): decode overwrites them, and any it does not reach are neither
    # compared nor required to be zero; every position past them must be.
    end = max([total] + [o + t for o, _ in chunks])
    written = np.zeros(context, dtype=bool)
    written[:total] = True
    beyond = np.zeros(context, dtype=bool)
    beyond[end:] = True
    ref_kv = {"key_cache": ref.keys[layers.start :], "value_cache": ref.values[layers.start :]}
    kv: list[dict[str, Any]] = []
    unwritten = 0.0
    for state in _STATES:
        actual = decode.read_state(state)
        expected = np.zeros(actual.shape, dtype=np.float32)
        expected[:, :, :total] = ref_kv[state][:, :, :total]
        per_layer, _ = compare_cache(actual, expected, written)
        kv += [
            {"state": state, "layer": layers.start + k, **c.to_dict()}
            for k, c in enumerate(per_layer)
        ]
        rest = np.asarray(actual, dtype=np.float64)[:, :, beyond]
        unwritten = max(unwritten, float(np.max(np.abs(rest))) if rest.size else 0.0)
    kv_cos = [c["cosine"] for c in kv]
    metrics["kv_cosine"] = None if None in kv_cos else min(kv_cos)
    metrics["kv_unwritten_max_abs"] = unwritten

    gates = evaluate_specs({"long": {"metrics": metrics}}, settings.gates, LONG_GATES)
    outputs = WindowOutputs("long", tuple(tokens), np.arange(total), a_in, a_out)
    return LongGolden(
        prompt=prompt,
        decode_steps=steps,
        function=FUNCTION_PREFILL if prefill is not None else FUNCTION_DECODE,
        tokens=t,
        chunks=chunks,
        metrics=metrics,
        decode_metrics=decode_metrics,
        kv=kv,
        per_position=per_position,
        first_nonfinite={"position": bad[0]} if bad else None,
        outputs=outputs,
        gates=gates,
    )
