"""Benchmark: export of N full-size Phi-4-mini layers (random weights).

For each N: wall time per stage, peak RSS of the exporting process, package size. Each
export runs in its own process so peak RSS is per N. The same-run baseline is the fp16
export of the same layers (the trace -> convert path without INT8); the figures measured on
these machines for the plain path (8 layers: 118.8 s, 8.03 GiB) are printed beside them.

    python scripts/bench_export.py --layers 1 2 8 [--context 2048] [--workdir DIR]
        [--prefill-tokens 0 64]

INT8 exports run once per --prefill-tokens value (0: decode only; T: decode + a T-token
prefill function sharing the weights), with the size ratio to the decode-only package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN_PATH = {1: (19.3, 2.40), 2: (33.9, 2.96), 4: (64.5, 4.23), 8: (118.8, 8.03)}


def child(args: argparse.Namespace) -> None:
    from anechain.checkpoint import Checkpoint
    from anechain.config import LayerRange, load_preset
    from anechain.export import LayerSpec, export_shard

    settings = dataclasses.replace(
        load_preset("phi-4-mini").export,
        context_length=args.context,
        quantization=args.quantization,
        prefill_tokens=args.prefill,
    )
    result = export_shard(
        Checkpoint(args.checkpoint), LayerSpec(LayerRange(0, args.n), Path(args.out)), settings
    )
    print(json.dumps(result.to_dict()))


def run_one(
    checkpoint: Path, n: int, quantization: str, context: int, work: Path, prefill: int = 0
) -> dict:
    out = work / f"bench_{n}_{quantization}_t{prefill}.mlpackage"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--checkpoint",
        str(checkpoint),
        "--n",
        str(n),
        "--quantization",
        quantization,
        "--context",
        str(context),
        "--prefill",
        str(prefill),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"export of {n} layers failed (status {status})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["peak_rss_gib"] = usage.ru_maxrss / (1 << 20)  # KiB on Linux
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[0, 64])
    p.add_argument("--prefill", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="int8", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from anechain.checkpoint import write_random_checkpoint
    from anechain.config import load_preset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-"))
    arch = dataclasses.replace(
        load_preset("phi-4-mini").architecture, num_hidden_layers=max(args.layers)
    )
    ckpt = work / "checkpoint"
    if not ckpt.exists():
        t = time.perf_counter()
        write_random_checkpoint(ckpt, arch)
        print(
            f"random checkpoint ({arch.num_hidden_layers} full-size layers): "
            f"{time.perf_counter() - t:.1f}s",
            flush=True,
        )
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"{'N':>2} {'mode':5} {'T':>3} {'wall s':>7} {'convert':>8} {'quantize':>8} "
        f"{'peak GiB':>8} {'package MB':>11}   plain path (notes)"
    )
    runs = [("int8", t) for t in args.prefill_tokens]
    runs = runs if args.no_baseline else [("none", 0), *runs]
    for n in args.layers:
        decode_only = None
        for mode, t in runs:
            r = run_one(ckpt, n, mode, args.context, work, t)
            if mode == "int8" and t == 0:
                decode_only = r["size_bytes"]
            st = r["stage_seconds"]
            ref = PLAIN_PATH.get(n)
            note = f"{ref[0]:.1f} s, {ref[1]:.2f} GiB" if ref and mode == "int8" else ""
            if t and decode_only:
                note = f"size {r['size_bytes'] / decode_only:.5f} x decode-only"
            print(
                f"{n:>2} {mode:5} {t:>3} {r['wall']:7.1f} {st.get('convert', 0):8.1f} "
                f"{st.get('quantize', 0):8.1f} {r['peak_rss_gib']:8.2f} "
                f"{r['size_bytes'] / 1e6:11.1f}   {note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
