"""Validate a shard: golden parity against transformers (any OS) plus residency (macOS or a
saved plan), in one report with one verdict.

The decode loop is the same for every runner: the reference hidden state entering layer
START at position p is fed with the host-built inputs for p, the state carries across
steps, and the output is compared with the reference leaving layer END-1.
"""

from __future__ import annotations

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
from anechain.golden import calibration_tokens, reference_boundaries
from anechain.head import head_tensor_names, run_head_golden
from anechain.metrics import ShardComparison, compare_shard
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


def run_golden(
    runner: ShardRunner,
    meta: ShardMetadata,
    checkpoint: Checkpoint,
    settings: ValidationSettings,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Golden, tuple[Gate, ...]]:
    """The decode loop: reference in, shard out, compared per step and overall."""
    if settings.steps > meta.context_length:
        raise PackageError(
            f"{settings.steps} validation steps do not fit the package's context of "
            f"{meta.context_length}"
        )
    tokens = calibration_tokens(settings, checkpoint.architecture.vocab_size)
    bounds = reference_boundaries(checkpoint, tokens, meta.layers.end, cache_dir, progress)
    ref_in, ref_out = bounds[meta.layers.start], bounds[meta.layers.end]  # (S, C)
    rope = RopeParameters.from_hf_config(checkpoint.hf_config)

    runner.reset()
    outputs, fed, per_step = [], [], []
    first_nonfinite: dict[str, Any] | None = None
    layer_max: dict[int, float] = {}
    for p in range(len(tokens)):
        inputs = step_inputs(rope, ref_in[p], p, meta.context_length)
        out = runner.step(inputs)["output_hidden_states"].astype(np.float32).reshape(-1)
        # The shard saw the fp16-rounded reference input; its delta is measured from that.
        x = inputs["hidden_states"].astype(np.float32).reshape(-1)
        step = compare_shard(x, out, ref_in[p], ref_out[p])
        per_step.append({"step": p, **step.to_dict()})
        outputs.append(out)
        fed.append(x)
        if first_nonfinite is None and step.output.nonfinite:
            where = getattr(runner, "first_nonfinite", None) or {}
            first_nonfinite = {"step": p, **where}
            if "layer" in first_nonfinite and first_nonfinite["layer"] is not None:
                first_nonfinite["layer"] = meta.layers.start + int(first_nonfinite["layer"])
        for k, v in enumerate(getattr(runner, "layer_max_abs", None) or []):
            layer = meta.layers.start + k
            v, prev = float(v), layer_max.get(layer)
            # NaN wins: a layer that produced NaN at any step must show it.
            layer_max[layer] = v if prev is None or math.isnan(v) or v > prev else prev
        if progress and (p + 1) % 4 == 0:
            progress(f"[{meta.layers}] step {p + 1}/{len(tokens)}")

    overall: ShardComparison = compare_shard(np.stack(fed), np.stack(outputs), ref_in, ref_out)
    metrics = overall.to_dict()
    gates = evaluate_gates(metrics, settings.gates, KIND_LAYERS)
    golden = Golden(
        metrics=metrics,
        per_step=per_step,
        first_nonfinite=first_nonfinite,
        layer_max_abs=layer_max,
    )
    return golden, gates


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
    backend = resolve_backend(backend)
    opts = residency or ResidencyOptions()
    if progress:
        progress(f"[{meta.layers or 'head'}] loading {package.name} with the {backend} runner")
    runner = open_runner(backend, package, **(runner_options or {}))
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
        golden, gates = run_golden(runner, meta, checkpoint, settings, cache_dir, progress)
    prefill = None
    if meta.prefill_tokens:  # a two-function package: prefill, then decode from its cache
        from anechain.validate_prefill import open_prefill_runner, run_prefill_golden

        second = open_prefill_runner(backend, package, runner, **(runner_options or {}))
        prefill = run_prefill_golden(
            runner, second, meta, checkpoint, settings, cache_dir, progress
        )
        gates = gates + prefill.gates
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
    )
