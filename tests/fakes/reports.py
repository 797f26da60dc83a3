"""Validation reports for fake packages, written by anechain.report's own class.

The package is a folder with a Manifest.json and some bytes (manifest build never loads a
Core ML model); the report around it is a real `ValidationReport`, its gates evaluated with
`evaluate_gates`, so tests never restate the report format. Forgeries edit the written JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anechain.config import Architecture, Gates, LayerRange
from anechain.contract import (
    KIND_HEAD,
    KIND_LAYERS,
    ShardMetadata,
    function_names,
    head_contract,
    layer_contract,
)
from anechain.fsutil import sha256_tree
from anechain.nexttoken import assemble
from anechain.package import package_size
from anechain.report import (
    LONG_GATES,
    NEXT_TOKEN_GATES,
    PREFILL_GATES,
    Golden,
    ValidationReport,
    evaluate_gates,
    evaluate_specs,
)
from anechain.residency import ResidencyCounts, ResidencyReport

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "partial_rotary_factor": 0.75,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
}

# Figures of a passing layer shard (relative errors: per step, against the reference's RMS).
LAYER_METRICS = {
    "cosine": 0.9995,
    "rmse": 0.01,
    "max_abs": 0.1,
    "rel_rmse": 0.03,
    "rel_max_abs": 0.2,
    "delta_cosine": 0.99,
    "delta_rmse": 0.01,
    "delta_max_abs": 0.1,
    "nonfinite": 0,
    "step_delta_cosine": 0.98,
    "layer_delta_cosine": 0.99,
    "kv_cosine": 0.9995,
    "kv_unwritten_max_abs": 0.0,
    "bulk_cosine": 0.999,
    "bulk_rel_rmse": 0.04,
    "massive_channels": 2,
}


def next_token_block(share: float) -> dict[str, Any]:
    """A next-token verdict as validation writes it (nexttoken.assemble), 4 positions."""
    records = [
        {
            "window": "early",
            "position": p,
            "kl": 0.001 * (p + 1),
            "expected": 7,
            "token": 7,
            "margin": 2.0,
        }
        for p in range(4)
    ]
    return assemble(records, share)


HEAD_METRICS = {
    "top1_agreement": 1.0,
    "worst_margin": 0.0,
    "cosine": 0.9999,
    "rmse": 0.01,
    "max_abs": 0.05,
    "nonfinite": 0,
}
VERSIONS = {
    "anechain": "0.1.0",
    "coremltools": "9.0",
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "numpy": "2.3.5",
}


def fake_package(folder: Path, name: str, payload: bytes) -> Path:
    pkg = folder / f"{name}.mlpackage"
    weights = pkg / "Data" / "com.apple.CoreML" / "weights"
    weights.mkdir(parents=True)
    (pkg / "Manifest.json").write_text(json.dumps({"fileFormatVersion": "1.0.0"}))
    (weights / "weight.bin").write_bytes(payload)
    return pkg


def residency_dict(status: str = "checked") -> dict[str, Any]:
    """A residency object as residency.ResidencyReport writes it (7 convs, all on the ANE,
    one plumbing op off it: 1 % of the plan's cost)."""
    if status == "not_checked":
        return ResidencyReport(status, None, None, reason="needs macOS").to_dict()
    counts = ResidencyCounts(
        ops_total=30,
        compute_total=20,
        compute_ane=20,
        compute_cpu=0,
        compute_gpu=0,
        compute_non_ane=0,
        conv_total=7,
        conv_ane=7,
        plumbing_total=4,
        plumbing_non_ane=1,
        index_ops=2,
        state_ops=2,
    )
    passed = True if status == "checked" else None
    return ResidencyReport(
        status, counts, passed, plumbing_share=0.01, plumbing_basis="estimated cost"
    ).to_dict()


def layer_report(
    pkg: Path,
    layers: str,
    arch: dict[str, Any] = TINY,
    context: int = 64,
    fingerprint: str = "ckpt-a",
    metrics: dict[str, Any] | None = None,
    residency: str = "checked",
    gates: Gates | None = None,
    prefill_tokens: int = 0,
    long: tuple[int, int] | None = (-4, 4),
    windows: tuple[int, int] = (16, 4),
) -> ValidationReport:
    """The report `anechain validate shard` would write for layer shard `pkg` (with a prefill
    function of `prefill_tokens` tokens if not 0), with a long window of `long` = (prompt
    positions, decode steps) (a negative prompt: the context minus it) unless None, and
    `windows` = (early, late) decode steps (config.ValidationSettings' defaults)."""
    rng = LayerRange.parse(layers)
    architecture = Architecture(**arch)
    meta = ShardMetadata(
        version="0.1.0",
        kind=KIND_LAYERS,
        layers=rng,
        num_hidden_layers=architecture.num_hidden_layers,
        checkpoint_fingerprint=fingerprint,
        weights_fingerprint=f"weights-{layers}",
        quantization="int8",
        context_length=context,
        architecture=architecture,
        contract=layer_contract(architecture, context, rng.num_layers),
        functions=function_names(prefill_tokens),
    )
    metrics = {**LAYER_METRICS, **(metrics or {})}
    gate_list = evaluate_gates(metrics, gates or Gates(), KIND_LAYERS)
    next_token = next_token_block(rng.num_layers / architecture.num_hidden_layers)
    prefill = None
    if prefill_tokens:
        kv = {"cosine": 0.9999, "rmse": 0.001, "max_abs": 0.01, "nonfinite": 0}
        prefill = {
            "tokens": prefill_tokens,
            "metrics": dict(LAYER_METRICS),
            "kv": {"keys": dict(kv), "values": dict(kv)},
            "decode_metrics": dict(LAYER_METRICS),
        }
        gate_list += evaluate_specs({"prefill": prefill}, gates or Gates(), PREFILL_GATES)
    long_window = None
    if long is not None:
        prompt = long[0] if long[0] >= 0 else context + long[0]
        long_window = {
            "prompt": prompt,
            "decode_steps": long[1],
            "function": "prefill" if prefill_tokens else "decode",
            "tokens": prefill_tokens or 1,
            "metrics": dict(LAYER_METRICS),
        }
        gate_list += evaluate_specs({"long": long_window}, gates or Gates(), LONG_GATES)
    evidence = {"golden": {"metrics": metrics, "next_token": next_token}}
    gate_list += evaluate_specs(evidence, gates or Gates(), NEXT_TOKEN_GATES)
    return ValidationReport(
        package=pkg,
        package_sha256=sha256_tree(pkg),
        size_bytes=package_size(pkg),
        meta=meta,
        backend="mil",
        steps=windows[0],
        long=long_window,
        golden=Golden(
            metrics=metrics,
            per_step=[{"step": i, "window": "early", **metrics} for i in range(windows[0])]
            + [
                {"step": context - windows[1] + i, "window": "late", **metrics}
                for i in range(windows[1])
            ],
            first_nonfinite=None,
            layer_max_abs={i: 1.0 for i in range(rng.start, rng.end)},
            next_token=next_token,
        ),
        gates=gate_list,
        residency=residency_dict(residency),
        prefill=prefill,
        created="2026-11-25T12:00:00+00:00",
        versions=dict(VERSIONS),
    )


def head_report(
    pkg: Path, arch: dict[str, Any] = TINY, chunk_rows: int = 64, fingerprint: str = "ckpt-a"
) -> ValidationReport:
    architecture = Architecture(**arch)
    chunks = -(-architecture.vocab_size // chunk_rows)
    meta = ShardMetadata(
        version="0.1.0",
        kind=KIND_HEAD,
        layers=None,
        num_hidden_layers=architecture.num_hidden_layers,
        checkpoint_fingerprint=fingerprint,
        weights_fingerprint="weights-head",
        quantization="int8",
        context_length=64,
        architecture=architecture,
        contract=head_contract(architecture, chunks),
        extra={"head_chunk_rows": str(chunk_rows)},
    )
    return ValidationReport(
        package=pkg,
        package_sha256=sha256_tree(pkg),
        size_bytes=package_size(pkg),
        meta=meta,
        backend="mil",
        steps=16,
        golden=Golden(HEAD_METRICS, [], None),
        gates=evaluate_gates(HEAD_METRICS, Gates(), KIND_HEAD),
        residency=residency_dict("not_checked"),
        created="2026-11-25T12:00:00+00:00",
        versions=dict(VERSIONS),
    )


def make_shard(folder: Path, layers: str, name: str | None = None, **kw: Any) -> Path:
    """A fake package with its report beside it; returns the report's path."""
    name = name or "layers_" + layers.replace(":", "_")
    pkg = fake_package(folder, name, f"weights of {layers} {kw.get('fingerprint', '')}".encode())
    report = folder / f"{name}.report.json"
    layer_report(pkg, layers, **kw).write(report)
    return report


def make_head(folder: Path, **kw: Any) -> Path:
    pkg = fake_package(folder, "head", b"head weights")
    report = folder / "head.report.json"
    head_report(pkg, **kw).write(report)
    return report


def make_shards(folder: Path, ranges: list[str], **kw: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_shard(folder, r, **kw) for r in ranges]


def edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
