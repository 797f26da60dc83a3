"""Validate a shard: golden parity against transformers (any OS) plus residency (macOS or a
saved plan), in one report with one verdict.

The decode loop is the same for every runner: the reference hidden state entering layer
START at position p is fed with the host-built inputs for p, the state carries across
steps, and the output is compared with the reference leaving layer END-1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anechain.checkpoint import Checkpoint
from anechain.config import ResidencySettings, ValidationSettings
from anechain.contract import KIND_HEAD, KIND_LAYERS, ShardMetadata, read_package_metadata
from anechain.errors import PackageError
from anechain.fsutil import sha256_tree
from anechain.golden import calibration_tokens, reference
from anechain.head import head_tensor_names, run_head_golden
from anechain.metrics import compare_cache, compare_shard
from anechain.package import package_size
from anechain.report import Gate, Golden, ValidationReport, evaluate_gates
from anechain.rope import RopeParameters, step_inputs
from anechain.runners import ShardRunner, open_runner, resolve_backend


@dataclass(frozen=True)
class ResidencyOptions:
    settings: ResidencySettings = field(default_factory=ResidencySettings)
    plan_file: Path | None = None  # replay a saved compute plan (any OS)
    save_plan_to: Path | None = None
    report_only: bool = False  # count, but do not gate (hosted macOS runners have no ANE)
    compiled: Path | None = None  # the package already compiled, for a live plan


def check_package_matches(meta: ShardMetadata, checkpoint: Checkpoint, where: str) -> None:
    """Refuse a package exported from another checkpoint, in one line."""
    if meta.kind not in (KIND_LAYERS, KIND_HEAD):
        raise PackageError(f"{where} is a {meta.kind!r} package, not a layer shard or head")
    arch = checkpoint.architecture
    if meta.num_hidden_layers != arch.num_hidden_layers:
        raise PackageError(
            f"{where} was exported from a {meta.num_hidden_layers}-layer model; "
            f"{checkpoint.path} has {arch.num_hidden_layers}"
        )
    if meta.checkpoint_fingerprint != checkpoint.fingerprint:
        raise PackageError(
            f"{where} was exported from another checkpoint (fingerprint "
            f"{meta.checkpoint_fingerprint[:12]}, {checkpoint.path} is "
            f"{checkpoint.fingerprint[:12]})"
        )
    if meta.layers is None:
        names, what = list(head_tensor_names(checkpoint)), "the final norm and LM head"
    else:
        names, what = checkpoint.layer_tensor_names(meta.layers), f"layers {meta.layers}"
    if meta.weights_fingerprint != checkpoint.weights_fingerprint(names):
        raise PackageError(
            f"{where}: the weights of {what} in {checkpoint.path} differ from those the "
            "package was exported from"
        )


def package_rope(meta: ShardMetadata, checkpoint: Checkpoint, where: str) -> RopeParameters:
    """The RoPE parameters the package carries (what generate and a runtime use), checked
    against the checkpoint's config: validation builds its host inputs from these."""
    raw = meta.extra.get("rope")
    if raw is None:
        raise PackageError(f"{where} has no anechain.rope metadata (host cos/sin parameters)")
    try:
        shipped = RopeParameters.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{where}: unreadable anechain.rope metadata ({exc})") from None
    expected = RopeParameters.from_hf_config(checkpoint.hf_config)
    for name in ("attention_scaling", "original_max_position_embeddings"):
        if getattr(shipped, name) != getattr(expected, name):
            raise PackageError(
                f"{where}: its rope metadata has {name} {getattr(shipped, name)}, "
                f"{checkpoint.path}'s config gives {getattr(expected, name)}"
            )
    for name in ("inv_freq_short", "inv_freq_long"):
        got, want = np.asarray(getattr(shipped, name)), np.asarray(getattr(expected, name))
        if got.shape != want.shape or not np.array_equal(got, want):
            raise PackageError(
                f"{where}: its rope metadata's {name} differ from {checkpoint.path}'s config"
            )
    return shipped


_STATES = ("key_cache", "value_cache")


@dataclass
class _Window:
    """One run of consecutive decode steps from a fresh (or reference-filled) cache."""

    name: str
    positions: range
    filled: int  # cache positions 0..filled-1 written from the reference before step one
    fed: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    layer_outputs: list[list[np.ndarray]] = field(default_factory=list)


def _windows(settings: ValidationSettings, context: int) -> list[_Window]:
    """The first `steps` positions, and `late_steps` at the end of the context window."""
    windows = [_Window("early", range(settings.steps), 0)]
    late = settings.late_steps
    if late and settings.steps + late <= context:
        windows.append(_Window("late", range(context - late, context), context - late))
    return windows


def run_golden(
    runner: ShardRunner,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    rope: RopeParameters | None = None,
    outputs: list[Any] | None = None,
) -> tuple[Golden, tuple[Gate, ...]]:
    """The decode loop: reference in, shard out, compared per step, per layer (when the
    runner exposes layer outputs), and for the KV cache read back from the shard's state.

    Two windows: the first `steps` positions from an empty cache, and `late_steps` at the
    end of the context with the cache filled from the reference before them. The host
    inputs come from the package's rope metadata (`rope`, read and checked if not given).
    Each window's outputs are appended to `outputs` (validate_long.WindowOutputs) if given.
    """
    rope = rope or package_rope(meta, checkpoint, "the package")
    context = meta.context_length
    if settings.steps > context:
        raise PackageError(
            f"{settings.steps} validation steps do not fit the package's context of {context}"
        )
    windows = _windows(settings, context)
    length = windows[-1].positions.stop
    tokens = calibration_tokens(settings, checkpoint, length)
    start, end = meta.layers.start, meta.layers.end
    ref = reference(checkpoint, tokens, end, cache_dir, progress)
    ref_in, ref_out = ref.boundaries[start], ref.boundaries[end]  # (S, C)
    ref_kv = {"key_cache": ref.keys[start:end], "value_cache": ref.values[start:end]}

    per_step: list[dict[str, Any]] = []
    kv: list[dict[str, Any]] = []
    kv_unwritten = 0.0
    first_nonfinite: dict[str, Any] | None = None
    layer_max: dict[int, float] = {}
    for w in windows:
        runner.reset()
        for state in _STATES if w.filled else ():
            fill = np.zeros(runner.read_state(state).shape, np.float16)  # (L, KVH, T, D)
            fill[:, :, : w.filled] = ref_kv[state][:, :, : w.filled]
            runner.write_state(state, fill)
        for p in w.positions:
            inputs = step_inputs(rope, ref_in[p], p, context)
            out = runner.step(inputs)["output_hidden_states"].astype(np.float32).reshape(-1)
            # The shard saw the fp16-rounded reference input; its delta is measured from that.
            x = inputs["hidden_states"].astype(np.float32).reshape(-1)
            step = compare_shard(x, out, ref_in[p], ref_out[p])
            per_step.append({"step": p, "window": w.name, **step.to_dict()})
            w.fed.append(x)
            w.outputs.append(out)
            w.layer_outputs.append(
                [v.astype(np.float32).reshape(-1) for v in getattr(runner, "layer_outputs", [])]
            )
            if first_nonfinite is None and step.output.nonfinite:
                where = getattr(runner, "first_nonfinite", None) or {}
                first_nonfinite = {"step": p, **where}
                if first_nonfinite.get("layer") is not None:
                    first_nonfinite["layer"] = start + int(first_nonfinite["layer"])
            for k, v in enumerate(getattr(runner, "layer_max_abs", None) or []):
                v, prev = float(v), layer_max.get(start + k)
                # NaN wins: a layer that produced NaN at any step must show it.
                keep = prev is None or math.isnan(v) or v > prev
                layer_max[start + k] = v if keep else prev
            if progress and (p + 1) % 4 == 0:
                progress(f"[{meta.layers}] step {p + 1} ({w.name})")
        # The cache as the shard left it, against transformers' at every written position.
        written = np.zeros(context, dtype=bool)
        written[: w.positions.stop] = True
        for state in _STATES:
            expected = np.zeros_like(runner.read_state(state), dtype=np.float32)
            expected[:, :, : w.positions.stop] = ref_kv[state][:, :, : w.positions.stop]
            layers, unwritten = compare_cache(runner.read_state(state), expected, written)
            kv_unwritten = max(kv_unwritten, unwritten)
            kv += [
                {"window": w.name, "state": state, "layer": start + k, **c.to_dict()}
                for k, c in enumerate(layers)
            ]

    if outputs is not None:
        from anechain.validate_long import WindowOutputs

        outputs += [
            WindowOutputs(
                w.name,
                tuple(tokens),
                np.asarray(w.positions),
                np.stack(w.fed),
                np.stack(w.outputs),
            )
            for w in windows
        ]
    by_window = {
        w.name: compare_shard(
            np.stack(w.fed), np.stack(w.outputs), ref_in[w.positions], ref_out[w.positions]
        ).to_dict()
        for w in windows
    }
    # The gated figures cover every step of both windows together (a 4-step window alone
    # is too noisy for the whole-run bounds); each window is reported beside them.
    every = [p for w in windows for p in w.positions]
    metrics = compare_shard(
        np.stack([x for w in windows for x in w.fed]),
        np.stack([o for w in windows for o in w.outputs]),
        ref_in[every],
        ref_out[every],
    ).to_dict()
    step_deltas = [s["delta_cosine"] for s in per_step]
    metrics["step_delta_cosine"] = None if None in step_deltas else min(step_deltas)
    kv_cos = [c["cosine"] for c in kv]
    metrics["kv_cosine"] = None if None in kv_cos else min(kv_cos)
    metrics["kv_unwritten_max_abs"] = kv_unwritten
    layers = _layer_metrics(windows, ref.boundaries, start, end)
    # A runner without layer outputs (Core ML) is judged at the shard's granularity.
    deltas = [m["delta_cosine"] for m in layers] or [metrics["delta_cosine"]]
    metrics["layer_delta_cosine"] = None if None in deltas else min(deltas)
    gates = evaluate_gates(metrics, settings.gates, KIND_LAYERS)
    golden = Golden(
        metrics=metrics,
        per_step=per_step,
        first_nonfinite=first_nonfinite,
        layer_max_abs=layer_max,
        windows=by_window,
        kv=kv,
        layers=layers,
    )
    return golden, gates


def reference_length(settings: ValidationSettings, context: int) -> int:
    """How long a calibration sequence the decode windows compare against."""
    return _windows(settings, context)[-1].positions.stop


def _layer_metrics(
    windows: list[_Window], boundaries: np.ndarray, start: int, end: int
) -> list[dict[str, Any]]:
    """Each layer's output and delta against transformers' layer, all steps together.

    A layer's delta is measured from the shard's own previous layer output, so one
    broken layer is named, not the ones after it. Empty when the runner exposes no layer
    outputs (Core ML compares the shard output only).
    """
    n = end - start
    rows = [lo for w in windows for lo in w.layer_outputs]
    if not rows or any(len(lo) != n for lo in rows):
        return []
    positions = [p for w in windows for p in w.positions]
    fed = np.stack([x for w in windows for x in w.fed])  # (N, C)
    outs = np.stack([np.stack(lo) for lo in rows], axis=1)  # (L, N, C)
    result = []
    for k in range(n):
        actual_in = fed if k == 0 else outs[k - 1]
        c = compare_shard(
            actual_in,
            outs[k],
            boundaries[start + k][positions],
            boundaries[start + k + 1][positions],
        )
        result.append({"layer": start + k, **c.to_dict()})
    return result


def validate_shard(
    package: str | Path,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    backend: str = "auto",
    residency: ResidencyOptions | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    runner_options: dict[str, Any] | None = None,
) -> ValidationReport:
    """Residency (live on macOS, replayed from a saved plan, else not checked) and golden
    parity with the chosen runner, in one report."""
    from anechain.residency import check_residency

    package = Path(package)
    meta = read_package_metadata(package)
    check_package_matches(meta, checkpoint, str(package))
    rope = package_rope(meta, checkpoint, str(package)) if meta.kind == KIND_LAYERS else None
    backend = resolve_backend(backend)
    opts = residency or ResidencyOptions()
    if meta.prefill_tokens:  # refused before the reference and the decode windows run
        from anechain.validate_prefill import prefill_length

        prefill_length(settings.steps, meta.prefill_tokens)
    if meta.kind == KIND_LAYERS and settings.steps <= meta.context_length:
        # The decode windows' reference (every layer: the next-token verdict finishes the
        # model) before the runner holds the shard's weights, so the two never share memory;
        # the windows read it back from disk. Cold, full-size 8-layer shard: peak 2.96 GiB
        # with them side by side.
        length = reference_length(settings, meta.context_length)
        tokens = calibration_tokens(settings, checkpoint, length)
        reference(checkpoint, tokens, meta.num_hidden_layers, cache_dir, progress)
    if progress:
        progress(f"[{meta.layers or 'head'}] loading {package.name} with the {backend} runner")
    runner = open_runner(backend, package, **(runner_options or {}))
    outputs: list[Any] = []  # the shard's outputs per window, for next-token verdicts
    residency_report = check_residency(
        package,
        opts.settings,
        plan_file=opts.plan_file,
        save_plan_to=opts.save_plan_to,
        report_only=opts.report_only,
        # The coreml runner compiled the package already: one compile serves both.
        compiled=opts.compiled or getattr(runner, "compiled", None),
    ).to_dict()
    if meta.kind == KIND_HEAD:
        head = run_head_golden(runner, meta, checkpoint, settings, cache_dir, progress)
        gates = evaluate_gates(head["metrics"], settings.gates, KIND_HEAD)
        golden = Golden(
            metrics=head["metrics"],
            per_step=head["per_step"],
            first_nonfinite=head["first_nonfinite"],
        )
    else:
        golden, gates = run_golden(
            runner, meta, checkpoint, settings, cache_dir, progress, rope, outputs
        )
    prefill = second = None
    if meta.prefill_tokens:  # a two-function package: prefill, then decode from its cache
        from anechain.validate_prefill import open_prefill_runner, run_prefill_golden

        second = open_prefill_runner(backend, package, runner, **(runner_options or {}))
        prefill = run_prefill_golden(
            runner, second, meta, checkpoint, settings, cache_dir, progress
        )
        gates = gates + prefill.gates
        outputs.append(prefill.outputs)
    long = None
    if meta.kind == KIND_LAYERS and rope is not None:  # the runtime's window
        from anechain.validate_long import run_long_golden

        length = reference_length(settings, meta.context_length)
        long = run_long_golden(
            runner, second, meta, checkpoint, settings, rope, length, cache_dir, progress
        )
        if long is not None:
            gates = gates + long.gates
            outputs.append(long.outputs)
    if meta.kind == KIND_LAYERS:  # the windows' outputs through the rest of the model
        judged = [w for w in outputs if w.name in NEXT_TOKEN_WINDOWS]
        if long is not None:  # its decode steps, and prompt positions spread over the context
            judged = [
                w.sample(LONG_NEXT_TOKEN_ROWS, keep_last=long.decode_steps) if w.name == "long"
                else w
                for w in judged
            ]  # fmt: skip
        golden, more = next_token_golden(
            golden, judged, meta, checkpoint, settings, cache_dir, progress
        )
        gates = gates + more
    return ValidationReport(
        package=package,
        package_sha256=sha256_tree(package),
        size_bytes=package_size(package),
        meta=meta,
        backend=backend,
        steps=settings.steps,
        golden=golden,
        gates=gates,
        residency=residency_report,
        prefill=prefill.to_dict() if prefill is not None else None,
        long=long.to_dict() if long is not None else None,
        outputs=tuple(outputs),
    )


# The windows whose outputs get a next-token verdict: every window. (The long window was left
# out while the random checkpoints' head was far more peaked than a trained one: row norms
# spread log-normally by 1.5, SmolLM2's by 0.175; a correct full-size INT8 0:8 shard's small
# long-window error became a flip worth KL 60.9 there. With the trained head shape it is
# judged like the rest.)
NEXT_TOKEN_WINDOWS = ("early", "late", "prefill", "long")

# Rows of the long window judged by the next-token verdict: its decode steps and prompt
# positions evenly spread before them. Every one of a full-size shard's 2044 prompt positions
# would cost the 200064-row head and every later layer over them, more than a forward of the
# whole model; each row is judged on its own (nexttoken: one step ahead of the reference), so
# a sample is exact where it looks.
LONG_NEXT_TOKEN_ROWS = 64


def next_token_golden(
    golden: Golden,
    outputs: list[Any],
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Golden, tuple[Gate, ...]]:
    """Every window's outputs (validate_long.WindowOutputs: any window, each with the
    calibration sequence its positions index) through the rest of the fp32 reference
    (nexttoken.py), and the next-token and bulk gates (report.NEXT_TOKEN_GATES)."""
    from dataclasses import replace

    from anechain.nexttoken import Substituted, assemble, substitute, substituted_records
    from anechain.report import NEXT_TOKEN_GATES, evaluate_specs

    n = checkpoint.architecture.num_hidden_layers
    parts: list[Substituted] = []
    by_tokens: dict[tuple[int, ...], list[Any]] = {}
    for w in outputs:
        by_tokens.setdefault(tuple(w.tokens), []).append(w)
    for tokens, windows in by_tokens.items():  # one reference per calibration sequence
        ref = reference(checkpoint, list(tokens), n, cache_dir, progress)
        parts.append(substitute(checkpoint, ref, meta.layers.end, windows, progress))
    # Then the LM head, read from disk once for every sequence's positions.
    records = substituted_records(checkpoint, parts)
    verdict = assemble(records, meta.layers.num_layers / n)
    golden = replace(golden, next_token=verdict)
    evidence = {"golden": {"metrics": golden.metrics, "next_token": verdict}}
    return golden, evaluate_specs(evidence, settings.gates, NEXT_TOKEN_GATES)
