"""Benchmark: the long window's figures (every gate, its bound and margin) beside the other
windows', on the real SmolLM2-135M and on the tiny trained-like random checkpoint.

The long window (anechain.validate_long) prefills the calibration sequence up to the context
minus `long_steps` through each shard's own prefill function and cache, then decodes; every
position and the KV cache are compared with transformers in fp32. Shards are exported into
the work dir (reused when there), validated with the MIL runner and the config's gates.

    python scripts/bench_long.py --model smollm2 [--workdir DIR] [--long-tokens N]
        [--context 1024] [--prefill-tokens 64] [--quantization none] [--ranges 0:10]
    python scripts/bench_long.py --model tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _checkpoint(model: str, work: Path):  # type: ignore[no-untyped-def]
    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import load_config

    config = load_config(CONFIGS / ("smollm2.yaml" if model == "smollm2" else "tiny.yaml"))
    folder = work / f"{model}-ckpt"
    if not folder.exists():
        if model == "smollm2":
            from anechain.importer import import_smollm2

            import_smollm2(folder)
        else:
            write_random_checkpoint(folder, config.architecture, seed=0)  # trained-like
    return config, Checkpoint(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--cache-dir", type=Path, help="golden reference cache")
    p.add_argument("--long-tokens", type=int, help="default: the context minus long_steps")
    p.add_argument("--quantization", choices=("int8", "none"))
    p.add_argument("--prefill-tokens", type=int, help="T; 0: decode-only shards")
    p.add_argument("--context", type=int, help="export.context_length (default: the config's)")
    p.add_argument("--ranges", nargs="*", help="layer ranges (default: the config's topology)")
    args = p.parse_args()

    from anechain.config import LayerRange
    from anechain.export import LayerSpec, export_shard
    from anechain.report import LONG_GATES
    from anechain.validate import validate_shard

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-long-"))
    work.mkdir(parents=True, exist_ok=True)
    config, ckpt = _checkpoint(args.model, work)
    export = config.export
    if args.quantization:
        export = dataclasses.replace(export, quantization=args.quantization)
    if args.prefill_tokens is not None:
        export = dataclasses.replace(export, prefill_tokens=args.prefill_tokens)
    if args.context is not None:
        export = dataclasses.replace(export, context_length=args.context)
    settings = config.validation
    if args.long_tokens is not None:
        settings = dataclasses.replace(settings, long_tokens=args.long_tokens)
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"{args.model}: context {export.context_length}, T={export.prefill_tokens}, "
        f"{export.quantization}, long window {settings.long_window(export.context_length)}"
    )
    specs = {s.name: s for s in LONG_GATES}
    for text in args.ranges or export.topology:
        r = LayerRange.parse(text)
        tag = f"{export.quantization}_T{export.prefill_tokens}_c{export.context_length}"
        pkg = work / f"layers_{r.start}_{r.end}_{tag}.mlpackage"
        if not pkg.exists():
            export_shard(ckpt, LayerSpec(r, pkg), export)
        t = time.perf_counter()
        report = validate_shard(pkg, ckpt, settings, backend="mil", cache_dir=args.cache_dir)
        took = time.perf_counter() - t
        long = report.long or {}
        print(
            f"\n[{r}] verdict {report.verdict} ({took:.0f} s): long window {long.get('prompt')} "
            f"prompt positions via {long.get('function')} ({len(long.get('chunks', []))} "
            f"chunks), {long.get('decode_steps')} decode steps"
        )
        print(f"  {'gate':<24} {'value':>9} {'bound':>10} {'margin':>9}  other windows")
        by_name = {g.name: g for g in report.gates}
        for g in report.gates:
            if g.name not in specs:
                continue
            base = by_name.get(g.name.removeprefix("long_"))
            other = f"{base.value:.5g}" if base is not None and base.value is not None else "-"
            value = "nan" if g.value is None else f"{g.value:.5g}"
            margin = "-" if g.value is None else f"{abs(g.value - g.bound):.4g}"
            print(f"  {g.name:<24} {value:>9} {g.op} {g.bound:<7g} {margin:>9}  {other}")
        worst = max(long.get("per_position", []), key=lambda row: row["rel_rmse"] or 0)
        print(
            f"  worst position {worst['position']} ({worst['function']}): cosine "
            f"{worst['cosine']:.5f}, rel_rmse (own RMS) {worst['rel_rmse']:.4f}; decode after "
            f"the prompt: cosine {long['decode_metrics']['cosine']:.5f}"
        )
        failed = report.failures()
        if failed:
            print(f"  failed: {failed}")


if __name__ == "__main__":
    from _bench import run

    run(main)
