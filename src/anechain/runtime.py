"""Greedy decoding over a manifest: embedding -> every shard with its state -> head -> reduce.

When every shard has a `prefill` function of one T, the prompt runs through it in T-token
chunks (the last one padded, see rope.chunk_inputs) that fill the KV states the `decode`
function then continues from; the head runs on the last prompt position only.

Uses only the manifest and the files it names (their sha256 checked at load), never the
checkpoint: this is what a runtime on a device does, and the proof that the manifest is
complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anechain.contract import FUNCTION_PREFILL
from anechain.errors import ManifestError
from anechain.head import reduce_chunks
from anechain.manifest import Manifest, load_embedding_table, load_manifest, verify_manifest
from anechain.rope import (
    RopeParameters,
    chunk_inputs,
    chunk_outputs,
    prefill_plan,
    step_inputs,
)
from anechain.runners import ShardRunner, open_runner, resolve_backend


@dataclass
class Profile:
    """Per-token timings (seconds) of the decode steps after warm-up, and the prompt's."""

    layers: list[float] = field(default_factory=list)
    per_shard: dict[str, list[float]] = field(default_factory=dict)
    head: list[float] = field(default_factory=list)  # predict + reduce
    total: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # of those, run through prefill (the rest: decode steps)
    prompt_seconds: float = 0.0  # the whole prompt, up to the first new token (incl. head)

    def summary(self) -> dict[str, Any]:
        def ms(values: list[float]) -> float | None:
            return round(1000 * float(np.mean(values)), 3) if values else None

        total = float(np.sum(self.total)) if self.total else 0.0
        return {
            "decode_tokens": len(self.total),
            "tokens_per_second": round(len(self.total) / total, 2) if total else None,
            "layers_ms_per_token": ms(self.layers),
            "shard_ms_per_token": {k: ms(v) for k, v in self.per_shard.items()},
            "head_ms_per_token": ms(self.head),
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prompt_tokens_per_second": (
                round(self.prompt_tokens / self.prompt_seconds, 2) if self.prompt_seconds else None
            ),
            "time_to_first_token_ms": round(1000 * self.prompt_seconds, 3),
        }


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the new tokens
    profile: Profile


class ManifestRuntime:
    """The chained model a manifest describes, one runner per shard plus the head."""

    def __init__(
        self, manifest_path: str | Path, backend: str = "auto", prefill: bool = True
    ) -> None:
        """`prefill=False` feeds the prompt one token per decode step even if the shards
        have a prefill function."""
        path = Path(manifest_path)
        verify_manifest(path)  # every file's sha256, before anything runs
        m: Manifest = load_manifest(path)
        if m.head is None or m.embedding is None:
            raise ManifestError(
                f"manifest {path} has no {'head' if m.head is None else 'embedding'}; "
                "generation needs the embedding table and the head (anechain export "
                "--head/--embedding, then manifest build)"
            )
        if m.rope.precomputed is None:
            raise ManifestError(f"manifest {path} has no RoPE parameters (rope.precomputed)")
        self.manifest = m
        self.backend = resolve_backend(backend)
        root = path.parent
        self.rope = RopeParameters.from_dict(m.rope.precomputed)
        arch = m.model.architecture
        self.embedding = load_embedding_table(
            root / m.embedding.file.path, (arch.vocab_size, arch.hidden_size)
        )
        self.context_length = m.context_length
        self.chunk_rows = m.head.chunk_rows

        def runner(package: Any, compiled: Any, **options: Any) -> ShardRunner:
            # Core ML runs the compiled model when the manifest has one, described by the
            # package it names beside it (no API describes an .mlmodelc); MIL reads the package.
            if self.backend == "coreml" and compiled is not None:
                options["compiled"] = root / compiled.path
                if "state_from" not in options:  # verify_manifest hashed the package already
                    options["package_sha256"] = package.sha256
            return open_runner(self.backend, root / package.path, **options)

        self.shards: list[tuple[str, ShardRunner]] = [
            (str(s.layers), runner(s.package, s.compiled)) for s in m.shards
        ]
        # T of the shards' prefill functions: used only if every shard has one, of one T.
        ts = {s.prefill_tokens for s in m.shards}
        self.prefill_tokens = ts.pop() if prefill and len(ts) == 1 else 0
        self.prefill_shards: list[ShardRunner] = [
            runner(s.package, s.compiled, function=FUNCTION_PREFILL, state_from=decode)
            for s, (_, decode) in zip(m.shards, self.shards, strict=True)
            if self.prefill_tokens
        ]
        self.head = runner(m.head.package, m.head.compiled)

    def reset(self) -> None:
        for _, runner in self.shards:
            runner.reset()

    def _step(self, token: int, position: int, profile: Profile | None) -> int:
        t0 = time.perf_counter()
        hidden = np.asarray(self.embedding[token], dtype=np.float16)
        # cos/sin, mask and position are the same for every shard: made once per token.
        inputs = step_inputs(self.rope, hidden, position, self.context_length)
        for name, runner in self.shards:
            ts = time.perf_counter()
            out = runner.step(inputs)["output_hidden_states"]  # (1, C, 1, 1)
            inputs = {**inputs, "hidden_states": out.astype(np.float16, copy=False)}
            if profile is not None:
                profile.per_shard.setdefault(name, []).append(time.perf_counter() - ts)
        hidden = inputs["hidden_states"].reshape(-1)
        t1 = time.perf_counter()
        nxt = self._head(hidden, position)
        if profile is not None:
            t2 = time.perf_counter()
            profile.layers.append(t1 - t0)
            profile.head.append(t2 - t1)
            profile.total.append(t2 - t0)
        return nxt

    def _head(self, hidden: np.ndarray, position: int) -> int:
        out = self.head.step({"hidden_states": hidden.astype(np.float16).reshape(1, -1, 1, 1)})
        if not np.isfinite(out["chunk_max"]).all():
            raise ManifestError(f"non-finite logits at position {position}")
        return reduce_chunks(out["chunk_max"], out["chunk_argmax"], self.chunk_rows)

    def _prefill(self, prompt: list[int]) -> tuple[int, np.ndarray | None]:
        """Run the prompt's chunks through every shard's prefill function.

        Returns how many positions it covered and the last one's hidden state (None if it
        covered none); the rest of the prompt is left to decode steps.
        """
        t = self.prefill_tokens
        covered, last = 0, None
        for offset, n in prefill_plan(len(prompt), t, self.context_length) if t else ():
            hidden = np.asarray(self.embedding[prompt[offset : offset + n]], dtype=np.float16)
            for runner in self.prefill_shards:  # hidden: (n, C)
                inputs = chunk_inputs(self.rope, hidden, offset, t, self.context_length)
                hidden = chunk_outputs(runner.step(inputs)["output_hidden_states"], n)
            covered, last = offset + n, hidden[-1]
        return covered, last

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        warmup: int = 1,
        stop: tuple[int, ...] | frozenset[int] = (),
    ) -> Generation:
        """Greedy decoding; the prompt goes through prefill when the shards have it.
        Ends early after a token in `stop` (the eos ids), which is kept."""
        vocab = self.manifest.model.architecture.vocab_size
        if not prompt:
            raise ManifestError("the prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ManifestError(f"prompt token {bad[0]} is outside the vocabulary ({vocab})")
        # The last new token is never fed back: positions 0 .. len(prompt) + new - 2.
        if len(prompt) + max_new_tokens - 1 > self.context_length:
            raise ManifestError(
                f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the shards' context "
                f"of {self.context_length}"
            )
        self.reset()
        profile = Profile(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        covered, last = self._prefill(prompt)
        profile.prefill_tokens = covered
        token = -1
        if covered == len(prompt) and last is not None:  # the head: last position only
            token = self._head(last, covered - 1)
        for p in range(covered, len(prompt)):
            token = self._step(prompt[p], p, None)
        profile.prompt_seconds = time.perf_counter() - t0
        new = [token]
        if on_token:
            on_token(token)
        for i in range(1, max_new_tokens):
            if new[-1] in stop:
                break
            # Profile decode steps only, after `warmup` of them (first-call costs).
            token = self._step(new[-1], len(prompt) + i - 1, profile if i > warmup else None)
            new.append(token)
            if on_token:
                on_token(token)
        return Generation(list(prompt), new[:max_new_tokens], profile)

    def final_hidden_states(self, tokens: list[int]) -> np.ndarray:
        """Teacher forcing: the last shard's output at each position of `tokens`, (S, C) fp32
        (what the head receives), decode steps only."""
        self.reset()
        rows = []
        for p, token in enumerate(tokens):
            hidden = np.asarray(self.embedding[token], dtype=np.float16)
            inputs = step_inputs(self.rope, hidden, p, self.context_length)
            for _, runner in self.shards:
                out = runner.step(inputs)["output_hidden_states"]
                inputs = {**inputs, "hidden_states": out.astype(np.float16, copy=False)}
            rows.append(inputs["hidden_states"].astype(np.float32).reshape(-1))
        return np.stack(rows)

    def next_tokens(self, tokens: list[int]) -> list[int]:
        """Teacher forcing: the chain's next-token choice after each position of `tokens`."""
        self.reset()
        return [self._step(t, p, None) for p, t in enumerate(tokens)]


def transformers_logits(checkpoint_dir: str | Path, tokens: list[int]) -> np.ndarray:
    """transformers' fp32 next-token logits after each position of `tokens`: (S, vocab)."""
    import torch
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(
        str(checkpoint_dir), local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def transformers_greedy(
    checkpoint_dir: str | Path, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """The reference: transformers' own greedy `generate` on the checkpoint, in fp32."""
    import torch
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(
        str(checkpoint_dir), local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]
