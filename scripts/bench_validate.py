"""Benchmark: golden validation of a full-size shard with the MIL runner, next to the time of
transformers' fp32 forward over the same layers and steps (the reference itself).

Random full-size Phi-4-mini weights; the shard is exported once into the work dir.

    python scripts/bench_validate.py [--layers 8] [--steps 16] [--context 2048] [--workdir DIR]
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
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import LayerRange, ValidationSettings, load_preset
    from anechain.export import LayerSpec, export_shard
    from anechain.golden import _embed, _LayerRunner, calibration_tokens
    from anechain.rope import RopeParameters, step_inputs
    from anechain.runners.mil import MILRunner

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-"))
    config = load_preset("phi-4-mini")
    arch = dataclasses.replace(config.architecture, num_hidden_layers=args.layers)
    ckpt_dir = work / "checkpoint"
    if not ckpt_dir.exists():
        write_random_checkpoint(ckpt_dir, arch)
    ckpt = Checkpoint(ckpt_dir)
    layers = LayerRange(0, args.layers)
    pkg = work / f"bench_validate_{args.layers}.mlpackage"
    settings = dataclasses.replace(config.export, context_length=args.context)
    if not pkg.exists():
        export_shard(ckpt, LayerSpec(layers, pkg), settings)
    print(f"command: python {shlex.join(sys.argv)}")

    tokens = calibration_tokens(ValidationSettings(steps=args.steps), ckpt)
    # Reference: transformers' Phi3DecoderLayers in fp32 over the same steps (no cache).
    t = time.perf_counter()
    runner = _LayerRunner(ckpt, len(tokens))
    hidden = [_embed(ckpt, tokens)]
    for i in range(args.layers):
        hidden.append(runner.run(i, hidden[-1]))
    t_ref = time.perf_counter() - t

    t = time.perf_counter()
    mil = MILRunner(pkg)
    t_load = time.perf_counter() - t
    rope = RopeParameters.from_hf_config(ckpt.hf_config)
    t = time.perf_counter()
    for pos in range(len(tokens)):
        mil.step(step_inputs(rope, hidden[0][pos], pos, args.context))
    t_steps = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)

    print(f"{args.layers} full-size layers, {args.steps} steps, context {args.context}")
    print(f"transformers fp32 reference (load + forward): {t_ref:8.1f} s")
    print(f"MIL runner load (dequantize weights):         {t_load:8.1f} s")
    print(
        f"MIL runner {args.steps} decode steps:               {t_steps:8.1f} s "
        f"({1000 * t_steps / args.steps:.0f} ms/step)"
    )
    print(f"MIL total / reference:                        {(t_load + t_steps) / t_ref:8.2f} x")
    print(f"peak RSS of this process:                     {rss:8.2f} GiB")


if __name__ == "__main__":
    from _bench import run

    run(main)
