"""Benchmark: the golden gates on a full-size shard of the project's random Phi-4-mini
checkpoint, per step: the error figures, the reference's scale, and the relative figures
the gates bound (see DESIGN.md, "Gates that fit the model's scale").

Exports layers [0, N) of a random full-size checkpoint once into the work dir (~95 s and
8 GiB for 8 layers), validates it with the MIL runner and the phi-4-mini preset's gates, and
prints one row per step.

    python scripts/bench_gates.py [--layers 8] [--steps 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--cache-dir", type=Path, help="golden reference cache")
    args = p.parse_args()

    import numpy as np

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import LayerRange, load_preset
    from anechain.export import LayerSpec, export_shard
    from anechain.golden import calibration_tokens, reference_boundaries
    from anechain.report import gate_specs
    from anechain.validate import validate_shard

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-gates-"))
    config = load_preset("phi-4-mini")
    arch = dataclasses.replace(config.architecture, num_hidden_layers=args.layers)
    ckpt_dir = work / "checkpoint"
    if not ckpt_dir.exists():
        write_random_checkpoint(ckpt_dir, arch)
    ckpt = Checkpoint(ckpt_dir)
    layers = LayerRange(0, args.layers)
    pkg = work / f"layers_0_{args.layers}.mlpackage"
    if not pkg.exists():
        export_shard(ckpt, LayerSpec(layers, pkg), config.export)
    print(f"command: python {shlex.join(sys.argv)}")

    settings = dataclasses.replace(config.validation, steps=args.steps)
    t = time.perf_counter()
    report = validate_shard(pkg, ckpt, settings, backend="mil", cache_dir=args.cache_dir)
    took = time.perf_counter() - t
    tokens = calibration_tokens(settings, ckpt)
    ref = reference_boundaries(ckpt, tokens, args.layers, args.cache_dir)[args.layers]  # (S, C)
    rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2, axis=1))
    peak = np.abs(ref).max(axis=1)

    print(
        f"layers {layers} of a random full-size Phi-4-mini ({args.layers} layers), "
        f"{args.steps} steps, MIL runner, {took:.0f} s"
    )
    # Per step, against the step's own RMS: rel_max_abs = max |error_i| / (rms + |ref_i|).
    # The gated figures (overall line) floor each step's scale at the median step's RMS.
    head = ["step", "cosine", "rmse", "max_abs", "rms(ref)", "max|ref|", "rel_rmse", "rel_max_abs"]
    print("  ".join(f"{h:>11}" for h in head))
    for s in report.golden.per_step:
        p_ = s["step"]
        # Late-window steps (near the end of the context) lie past the calibration reference.
        scale = [float(rms[p_]), float(peak[p_])] if p_ < len(rms) else ["-", "-"]
        row = [p_, s["cosine"], s["rmse"], s["max_abs"], *scale]
        row += [s["rel_rmse"], s["rel_max_abs"]]
        print("  ".join(f"{v:>11.5g}" if isinstance(v, float) else f"{v:>11}" for v in row))
    m = report.golden.metrics
    print(
        f"overall: cosine {m['cosine']:.5f}, rmse {m['rmse']:.4f}, max_abs {m['max_abs']:.4f}, "
        f"worst step rel_rmse {m['rel_rmse']:.4f}, rel_max_abs {m['rel_max_abs']:.4f}"
    )
    specs = {s.name: s for s in gate_specs("layers", {"decode": 1, "prefill": 1})}
    for g in report.gates:
        print(f"gate {g.name:<13} {specs[g.name].metric:<13} {g.describe()}")
    print(f"verdict: {report.verdict}")


if __name__ == "__main__":
    from _bench import run

    run(main)
