"""`anechain build`: checkpoint -> shards + head + embedding -> compile and residency where the
machine allows -> golden validation -> manifest -> a short generation compared with
transformers. One summary; a failed gate fails the build.

Every artifact is keyed by its inputs (checkpoint fingerprint, the weights it holds, export
settings, anechain version); one built and validated from the same inputs, and unchanged
since, is reused rather than rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from anechain import __version__
from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.config import Config, LayerRange
from anechain.errors import PlatformError
from anechain.export import LayerSpec, export_embedding, export_head, export_shard
from anechain.fsutil import sha256_tree
from anechain.head import head_tensor_names
from anechain.jsonio import atomic_write_json
from anechain.manifest import build_manifest
from anechain.platform import is_macos
from anechain.runners import resolve_backend
from anechain.validate import (
    ResidencyOptions,
    default_report_path,
    validate_shard,
    write_report,
)

Progress = Callable[[str], None]
STATE_FILE = "build-state.json"


@dataclass
class ArtifactResult:
    name: str  # "0:8", "head", "embedding"
    path: Path
    size_bytes: int
    reused: bool
    report: dict[str, Any] | None = None  # validation report (packages only)

    @property
    def passed(self) -> bool:
        return self.report is None or self.report["verdict"] == "pass"


@dataclass
class GenerationCheck:
    prompt: list[int]
    tokens: list[int]
    reference: list[int]
    exact: bool
    # Teacher-forced on transformers' own sequence: positions where the chain chose another
    # token, with transformers' top-1 margin there (in logit standard deviations).
    flips: list[dict[str, float]]
    max_flip_margin: float
    agreement: float  # teacher-forced share of positions where the chain chose transformers'
    min_agreement: float
    bound: float
    profile: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.max_flip_margin <= self.bound

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class BuildResult:
    out_dir: Path
    checkpoint: Path
    artifacts: list[ArtifactResult] = field(default_factory=list)
    manifest: Path | None = None
    generation: GenerationCheck | None = None
    compiled: bool = False

    @property
    def passed(self) -> bool:
        gen_ok = self.generation is None or self.generation.passed
        return all(a.passed for a in self.artifacts) and self.manifest is not None and gen_ok


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _State:
    """build-state.json: artifact -> the key of the inputs it was built from, and its sha256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, str]] = {}
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            data = {}  # unreadable: rebuild what it described
        if isinstance(data, dict):
            self.data = {k: v for k, v in data.items() if isinstance(v, dict)}

    def fresh(self, artifact: Path, key: str, entry_name: str | None = None) -> bool:
        """Was `artifact` made (or validated) from `key`, and is it unchanged since?"""
        entry = self.data.get(entry_name or artifact.name, {})
        return bool(
            entry.get("key") == key
            and artifact.exists()
            and entry.get("sha256") == sha256_tree(artifact)
        )

    def record(self, artifact: Path, key: str, entry_name: str | None = None) -> None:
        self.data[entry_name or artifact.name] = {"key": key, "sha256": sha256_tree(artifact)}
        atomic_write_json(self.path, self.data)


def _reusable_report(package: Path) -> dict[str, Any] | None:
    """The report beside `package` if it is readable and describes this very package."""
    try:
        data = json.loads(default_report_path(package).read_text())
        same = data["package"]["sha256"] == sha256_tree(package)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if same and isinstance(data, dict) else None


def run_build(
    config: Config,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    backend: str = "auto",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    residency_report_only: bool = False,
) -> BuildResult:
    """Run the whole pipeline; see the module docstring.

    `residency_report_only` counts residency without gating on it (Macs without a Neural
    Engine, such as hosted CI runners)."""
    say = progress or (lambda msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _State(out_dir / STATE_FILE)
    if checkpoint_dir is None:
        # A random checkpoint of the config's architecture and seed, remade when either changes.
        checkpoint_dir = out_dir / "checkpoint"
        made_from = _key("random-checkpoint", asdict(config.architecture), config.build.seed)
        if not state.fresh(checkpoint_dir, made_from, "checkpoint#random"):
            say(f"making a random {config.name or 'model'} checkpoint in {checkpoint_dir}")
            write_random_checkpoint(
                checkpoint_dir, config.architecture, seed=config.build.seed, overwrite=True
            )
            state.record(checkpoint_dir, made_from, "checkpoint#random")
    checkpoint = Checkpoint(checkpoint_dir)
    n_layers = checkpoint.architecture.num_hidden_layers
    ranges = config.export.layer_ranges or [LayerRange(0, n_layers)]
    for r in ranges:
        r.check_within(n_layers)
    backend = resolve_backend(backend)
    result = BuildResult(out_dir, checkpoint_dir)
    settings = asdict(config.export)
    base = (__version__, checkpoint.fingerprint, settings)
    residency = ResidencyOptions(config.residency, report_only=residency_report_only)
    # What a verdict depends on besides the package: gates, steps, calibration, backend,
    # residency settings, and whether residency can be checked on this machine.
    validation_key = _key(
        __version__,
        asdict(config.validation),
        backend,
        asdict(config.residency),
        residency_report_only,
        is_macos(),
    )

    def package_step(name: str, path: Path, key: str, export: Callable[[], Any]) -> None:
        exported = state.fresh(path, key)
        verdict_entry = path.name + "#validation"
        report = None
        if exported and state.fresh(path, validation_key, verdict_entry):
            report = _reusable_report(path)
        reused = report is not None
        if not reused:
            if not exported:
                say(f"[{name}] exporting {path.name}")
                export()
                state.record(path, key)
            compiled = _compile(path, say) if is_macos() else None
            result.compiled = result.compiled or compiled is not None
            say(f"[{name}] validating with the {backend} runner")
            # Compiled once: the compute plan and the Core ML runner both use it.
            report_obj = validate_shard(
                path,
                checkpoint,
                config.validation,
                backend=backend,
                residency=replace(residency, compiled=compiled),
                cache_dir=cache_dir,
                progress=say,
                runner_options={"compiled": compiled} if compiled and backend == "coreml" else None,
            )
            report = write_report(report_obj, default_report_path(path))
            state.record(path, validation_key, verdict_entry)
        else:
            say(f"[{name}] {path.name} is up to date (same inputs, validated): reused")
        result.artifacts.append(ArtifactResult(name, path, sha_size(path), reused, report))

    for r in ranges:
        path = out_dir / f"layers_{r.start}_{r.end}.mlpackage"
        key = _key(
            *base,
            "layers",
            str(r),
            checkpoint.weights_fingerprint(checkpoint.layer_tensor_names(r)),
        )
        package_step(
            str(r),
            path,
            key,
            lambda r=r, path=path: export_shard(
                checkpoint, LayerSpec(r, path), config.export, overwrite=True, progress=say
            ),
        )

    head_path = out_dir / "head.mlpackage"
    head_key = _key(*base, "head", checkpoint.weights_fingerprint(head_tensor_names(checkpoint)))
    package_step(
        "head",
        head_path,
        head_key,
        lambda: export_head(checkpoint, head_path, config.export, overwrite=True, progress=say),
    )

    emb_path = out_dir / "embedding.npy"
    emb_key = _key(
        __version__,
        checkpoint.fingerprint,
        "embedding",
        checkpoint.weights_fingerprint(["model.embed_tokens.weight"]),
    )
    reused = state.fresh(emb_path, emb_key)
    if not reused:
        export_embedding(checkpoint, emb_path, overwrite=True, progress=say)
        state.record(emb_path, emb_key)
    result.artifacts.append(ArtifactResult("embedding", emb_path, sha_size(emb_path), reused))

    if not all(a.passed for a in result.artifacts):
        return result  # no manifest for a topology with a failed shard
    manifest = out_dir / "manifest.json"
    build_manifest(
        [a.path for a in result.artifacts if a.report is not None],
        manifest,
        overwrite=True,
        embedding=emb_path,
    )
    result.manifest = manifest
    result.generation = _check_generation(
        config, manifest, checkpoint_dir, checkpoint.architecture.vocab_size, backend, say
    )
    return result


def sha_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _compile(package: Path, say: Progress) -> Path | None:
    from anechain.compile import compile_package

    try:
        r = compile_package(package)
    except PlatformError as exc:  # e.g. macOS older than 15: residency stays unchecked
        say(f"not compiling {package.name}: {exc}")
        return None
    say(f"compiled {package.name} -> {r.compiled.name}" + (" (up to date)" if r.skipped else ""))
    return r.compiled


def _check_generation(
    config: Config,
    manifest: Path,
    checkpoint_dir: Path,
    vocab: int,
    backend: str,
    say: Progress,
) -> GenerationCheck:
    from anechain.runtime import ManifestRuntime, transformers_greedy, transformers_logits

    prompt = list(config.build.prompt_tokens) or (
        np.random.default_rng(config.build.seed).integers(0, vocab, size=8).tolist()
    )
    n = config.build.max_new_tokens
    say(f"generating {n} tokens from the manifest and with transformers")
    runtime = ManifestRuntime(manifest, backend=backend)
    ours = runtime.generate(prompt, n)
    reference = transformers_greedy(checkpoint_dir, prompt, n)
    # Teacher forcing on transformers' sequence: a flip is benign only between near-ties.
    sequence = prompt + reference
    chain = runtime.next_tokens(sequence)
    logits = transformers_logits(checkpoint_dir, sequence)  # (S, vocab)
    flips = []
    for p, token in enumerate(chain):
        best = int(np.argmax(logits[p]))
        if token != best:
            # How much worse transformers finds the chain's token, in logit std units.
            gap = (logits[p, best] - logits[p, token]) / logits[p].std()
            flips.append({"position": p, "margin": round(float(gap), 4)})
    return GenerationCheck(
        prompt=prompt,
        tokens=ours.tokens,
        reference=reference,
        exact=ours.tokens == reference,
        flips=flips,
        max_flip_margin=max((f["margin"] for f in flips), default=0.0),
        agreement=1 - len(flips) / len(sequence),
        min_agreement=config.validation.gates.min_top1_agreement,
        bound=config.validation.gates.max_top1_margin,
        profile=ours.profile.summary(),
    )
