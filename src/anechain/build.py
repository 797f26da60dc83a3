"""`anechain build`: checkpoint -> shards + head + embedding -> compile and residency where the
machine allows -> golden validation -> manifest -> a short generation compared with
transformers. One summary; a failed gate fails the build.

Every artifact and every verdict is keyed by its inputs through artifacts.py, the cache
`plan` uses too (artifact-cache.json in the output folder); one built and validated from the
same inputs, and unchanged since, is reused rather than rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from anechain.artifacts import ArtifactCache, InputKeys, VerdictInputs, digest
from anechain.checkpoint import Checkpoint, write_random_checkpoint
from anechain.config import Config, LayerRange
from anechain.errors import CheckpointError, ConfigError, PlatformError
from anechain.export import LayerSpec, export_embedding, export_head, export_shard
from anechain.manifest_build import build_manifest
from anechain.platform import is_macos
from anechain.report import ValidationReport, report_path_for
from anechain.residency import expected_live_status
from anechain.runners import available_backend
from anechain.shards import coverage_problems
from anechain.validate import ResidencyOptions, validate_shard

Progress = Callable[[str], None]


@dataclass
class ArtifactResult:
    name: str  # "0:8", "head", "embedding"
    path: Path
    size_bytes: int
    reused: bool
    report: ValidationReport | None = None  # packages only

    @property
    def passed(self) -> bool:
        return self.report is None or self.report.verdict == "pass"


@dataclass
class GenerationCheck:
    prompt: list[int]
    # The text the prompt ids were tokenized from (chat template applied); None for ids
    # given in the config or drawn at random.
    prompt_text: str | None
    tokens: list[int]
    reference: list[int]
    exact: bool
    # Teacher-forced on transformers' own sequence (every prompt position and every generated
    # one): positions where the chain chose another token, with transformers' top-1 margin
    # there (in logit standard deviations).
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

    def describe(self) -> str:
        """One line for the summary and the build page."""
        return (
            f"generation: {len(self.tokens)} tokens after {len(self.prompt)}"
            f"{' (text prompt)' if self.prompt_text is not None else ''}, "
            f"{'identical to' if self.exact else 'differs from'} transformers' greedy; "
            f"teacher-forced agreement {self.agreement:.3f} (>= {self.min_agreement}), largest "
            f"flip margin {self.max_flip_margin:.3f} (<= {self.bound} logit std): "
            f"{'pass' if self.passed else 'FAIL'}"
        )


@dataclass
class ChainCheck:
    """The whole chain's final hidden states (every shard's outputs substituted, decode from
    the embedding) through the fp32 reference's final norm and LM head, against the full
    reference over the calibration positions: the whole-model next-token budget, unsplit."""

    verdict: dict[str, Any]  # nexttoken.summarize over the positions
    max_kl_mean: float
    max_kl_worst: float

    @property
    def passed(self) -> bool:
        m = self.verdict
        return (
            m["kl_mean"] is not None
            and m["kl_mean"] <= self.max_kl_mean
            and m["kl_worst"] <= self.max_kl_worst
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        """One line for the summary and the build page."""
        m = self.verdict

        def f(value: object, digits: int = 5) -> str:
            return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"

        flips = ", ".join(f"@{x['position']} margin {x['margin']:.3f}" for x in m["flips"])
        return (
            f"chain next-token: KL mean {f(m['kl_mean'])} (<= {self.max_kl_mean}), worst "
            f"{f(m['kl_worst'])} (<= {self.max_kl_worst}) over {m['positions']} positions, "
            f"top-1 {f(m['top1_agreement'], 3)}"
            + (f", flips {flips}" if flips else "")
            + f": {'pass' if self.passed else 'FAIL'}"
        )


@dataclass
class BuildResult:
    out_dir: Path
    checkpoint: Path
    artifacts: list[ArtifactResult] = field(default_factory=list)
    manifest: Path | None = None
    generation: GenerationCheck | None = None
    compiled: bool = False
    chain: ChainCheck | None = None

    @property
    def passed(self) -> bool:
        gen_ok = self.generation is None or self.generation.passed
        chain_ok = self.chain is None or self.chain.passed
        return (
            all(a.passed for a in self.artifacts)
            and self.manifest is not None
            and gen_ok
            and chain_ok
        )


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
    backend = available_backend(backend)
    # The topology must tile the model before anything is made (exports take hours).
    arch = (
        config.architecture if checkpoint_dir is None else Checkpoint(checkpoint_dir).architecture
    )
    n_layers = arch.num_hidden_layers
    ranges = config.export.layer_ranges or [LayerRange(0, n_layers)]
    for r in ranges:
        r.check_within(n_layers)
    problems = coverage_problems([(f"shard {i + 1}", r) for i, r in enumerate(ranges)], n_layers)
    if problems:
        raise ConfigError(f"export.topology does not chain 0:{n_layers}: {problems[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ArtifactCache(out_dir, say)
    if checkpoint_dir is None:
        # A random checkpoint of the config's architecture and seed, remade when either changes.
        checkpoint_dir = out_dir / "checkpoint"
        made_from = digest(
            ["random-checkpoint", asdict(config.architecture), config.build.seed, "trained"]
        )
        if cache.exported(checkpoint_dir, made_from) is None:
            say(f"making a random {config.name or 'model'} checkpoint in {checkpoint_dir}")
            write_random_checkpoint(
                checkpoint_dir,
                config.architecture,
                seed=config.build.seed,
                overwrite=True,
            )
            cache.record_export(checkpoint_dir, made_from)
    checkpoint = Checkpoint(checkpoint_dir)
    keys = InputKeys(checkpoint)
    result = BuildResult(out_dir, checkpoint_dir)
    residency = ResidencyOptions(config.residency, report_only=residency_report_only)
    how = VerdictInputs(
        config.validation, backend, config.residency, residency_report_only, expected_live_status()
    )

    def package_step(
        name: str, path: Path, layers: LayerRange | None, export: Callable[[], Any]
    ) -> None:
        key = keys.export_key("layers" if layers else "head", layers, config.export)
        sha = cache.exported(path, key)
        if sha is None:
            say(f"[{name}] exporting {path.name}")
            export()
            sha = cache.record_export(path, key)
        vkey = keys.verdict_key(sha, layers, how)
        verdict = cache.verdict(path, vkey)
        reused = verdict is not None and verdict.report is not None
        if verdict is not None and verdict.report is not None:
            report = verdict.report
            say(f"[{name}] {path.name} is up to date (same inputs, validated): reused")
        else:
            compiled = _compile(path, say) if is_macos() else None
            result.compiled = result.compiled or compiled is not None
            say(f"[{name}] validating with the {backend} runner")
            # Compiled once: the compute plan and the Core ML runner both use it.
            report = validate_shard(
                path,
                checkpoint,
                config.validation,
                backend=backend,
                residency=replace(residency, compiled=compiled),
                cache_dir=cache_dir,
                progress=say,
                runner_options={"compiled": compiled} if compiled and backend == "coreml" else None,
            )
            report.write(report_path_for(path))
            cache.record_verdict(path, vkey)
        result.artifacts.append(ArtifactResult(name, path, sha_size(path), reused, report))

    for r in ranges:
        path = out_dir / f"layers_{r.start}_{r.end}.mlpackage"
        package_step(
            str(r),
            path,
            r,
            lambda r=r, path=path: export_shard(
                checkpoint, LayerSpec(r, path), config.export, overwrite=True, progress=say
            ),
        )

    head_path = out_dir / "head.mlpackage"
    package_step(
        "head",
        head_path,
        None,
        lambda: export_head(checkpoint, head_path, config.export, overwrite=True, progress=say),
    )

    emb_path = out_dir / "embedding.npy"
    emb_key = keys.export_key("embedding", None, None)
    reused = cache.exported(emb_path, emb_key) is not None
    if not reused:
        export_embedding(checkpoint, emb_path, overwrite=True, progress=say)
        cache.record_export(emb_path, emb_key)
    result.artifacts.append(ArtifactResult("embedding", emb_path, sha_size(emb_path), reused))

    if not all(a.passed for a in result.artifacts):
        return result  # no manifest for a topology with a failed shard
    manifest = out_dir / "manifest.json"
    build_manifest(
        [a.path for a in result.artifacts if a.report is not None],
        manifest,
        overwrite=True,
        embedding=emb_path,
        gates=config.validation.gates,
        residency=config.residency,
        validation=config.validation,
        tokenizer=checkpoint_dir,
    )
    result.manifest = manifest
    result.generation = _check_generation(
        config, manifest, checkpoint_dir, checkpoint.architecture.vocab_size, backend, say
    )
    result.chain = check_chain(config, manifest, checkpoint, backend, cache_dir, say)
    return result


def check_chain(
    config: Config,
    manifest: Path,
    checkpoint: Checkpoint,
    backend: str,
    cache_dir: Path | None,
    say: Progress,
) -> ChainCheck:
    """The chain's next-token figure (ChainCheck) over the calibration sequence."""
    from anechain.golden import calibration_tokens, reference
    from anechain.nexttoken import WindowOutputs, next_token_verdict
    from anechain.runtime import ManifestRuntime

    tokens = calibration_tokens(config.validation, checkpoint)
    say(f"next-token verdict of the whole chain over {len(tokens)} positions")
    hidden = ManifestRuntime(manifest, backend=backend).final_hidden_states(tokens)
    n = checkpoint.architecture.num_hidden_layers
    ref = reference(checkpoint, tokens, n, cache_dir, say)
    chain = WindowOutputs("chain", tuple(range(len(tokens))), hidden)
    verdict = next_token_verdict(checkpoint, ref, n, [chain], 1.0)["metrics"]
    g = config.validation.gates
    return ChainCheck(verdict, g.max_kl_mean, g.max_kl_worst)


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


def generation_prompt(
    config: Config, checkpoint_dir: Path, vocab: int
) -> tuple[list[int], str | None]:
    """The generation check's prompt ids and the text they came from (see BuildSettings).

    A real model given random ids answers with near-ties at most positions (SmolLM2-135M:
    17 of 24 teacher-forced positions within 0.25 logit std), where any rounding flips the
    choice; its own tokenizer's text is what it was trained on.
    """
    settings = config.build
    if settings.prompt_tokens:
        return list(settings.prompt_tokens), None
    if settings.prompt and (checkpoint_dir / "tokenizer.json").is_file():
        from anechain.tokenizer import encode_prompt, load_tokenizer

        tok = load_tokenizer(checkpoint_dir)
        # A chat model is asked as `generate --chat` asks it: a user turn, assistant's opened.
        ids = encode_prompt(tok, settings.prompt, chat=bool(getattr(tok, "chat_template", None)))
        text = tok.decode(ids)
        bad = [t for t in ids if not 0 <= t < vocab]
        if not ids or bad:
            raise CheckpointError(
                f"{checkpoint_dir}: its tokenizer gives "
                + (f"token {bad[0]}, outside the vocabulary ({vocab})" if bad else "no tokens")
                + f" for build.prompt {settings.prompt!r}"
            )
        return [int(t) for t in ids], text
    rng = np.random.default_rng(settings.seed)
    return rng.integers(0, vocab, size=8).tolist(), None


def _check_generation(
    config: Config,
    manifest: Path,
    checkpoint_dir: Path,
    vocab: int,
    backend: str,
    say: Progress,
) -> GenerationCheck:
    from anechain.runtime import ManifestRuntime, transformers_greedy, transformers_logits

    prompt, text = generation_prompt(config, checkpoint_dir, vocab)
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
        prompt_text=text,
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
