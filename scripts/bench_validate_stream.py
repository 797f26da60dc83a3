"""Benchmark: memory and time of `anechain validate shard` (every default window, next-token
substitution included) against transformers' own fp32 forward over the same positions.

Three child processes, each measured on its own (peak RSS from the kernel, wall time):
  1. transformers' Phi3ForCausalLM.model (fp32, its default attention) over the calibration
     sequence validation compares against (as long as the context), layers only;
  2. `anechain validate shard --backend mil` with an empty reference cache (cold: the
     reference is computed, streamed layer by layer to disk);
  3. the same again (warm: the reference is read back memory-mapped).
The validate children's progress lines (with their timestamps) are printed so each phase's
cost can be read off.

    python scripts/bench_validate_stream.py --model CKPT --package SHARD.mlpackage \
        [--config configs/phi-4-mini.yaml] [--workdir DIR] [--skip-baseline]

Full size: `anechain random-checkpoint /tmp/fs/ckpt --preset phi-4-mini --num-layers 8`,
`anechain export --model /tmp/fs/ckpt --config configs/phi-4-mini.yaml --layer-spec
0:8:/tmp/fs/s08.mlpackage`, then this script with --model /tmp/fs/ckpt --package
/tmp/fs/s08.mlpackage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BASELINE = r"""
import json, sys, time, resource
import torch
from transformers import Phi3ForCausalLM
from anechain.checkpoint import Checkpoint
from anechain.config import load_config
from anechain.golden import calibration_tokens
from anechain.validate import reference_length

ckpt, config, context = Checkpoint(sys.argv[1]), load_config(sys.argv[2]), int(sys.argv[3])
settings = config.validation
tokens = calibration_tokens(settings, ckpt, reference_length(settings, context))
t = time.perf_counter()
model = Phi3ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, local_files_only=True)
load = time.perf_counter() - t
torch.set_grad_enabled(False)
t = time.perf_counter()
model.model(torch.tensor([tokens]), use_cache=True)
forward = time.perf_counter() - t
print(json.dumps({"positions": len(tokens), "load_s": load, "forward_s": forward}))
"""


def _child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, str]:
    """(wall seconds, peak RSS GiB, stdout, stderr) of one child process."""
    t = time.perf_counter()
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: each measurement runs under
    # a wrapper process of its own, which reports its one child.
    wrapped = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)",
        *cmd,
    ]
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = proc.stderr.rstrip().splitlines()
    peak = int(lines[-1]) / (1 << 20) if lines and lines[-1].isdigit() else float("nan")
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, peak, proc.stdout, "\n".join(lines[:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--config", type=Path, default=Path("configs/phi-4-mini.yaml"))
    p.add_argument("--workdir", type=Path)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--extra", default="", help="more `validate shard` options, one string")
    args = p.parse_args()
    print(f"command: python {shlex.join(sys.argv)}")

    from anechain.contract import read_package_metadata

    meta = read_package_metadata(args.package)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-stream-"))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ)

    if not args.skip_baseline:
        wall, peak, out, _ = _child(
            [
                sys.executable,
                "-c",
                _BASELINE,
                str(args.model),
                str(args.config),
                str(meta.context_length),
            ],
            env,
        )
        base = json.loads(out.strip().splitlines()[-1])
        print(
            f"transformers fp32 forward, {base['positions']} positions: "
            f"{base['forward_s']:.1f} s (load {base['load_s']:.1f} s), peak {peak:.2f} GiB"
        )
    validate = [
        sys.executable, "-m", "anechain", "validate", "shard", str(args.package),
        "--model", str(args.model), "--config", str(args.config), "--backend", "mil",
        "--cache-dir", str(cache), "--report", str(work / "report.json"),
        *shlex.split(args.extra),
    ]  # fmt: skip
    results = {}
    for run in ("cold", "warm"):
        wall, peak, _, err = _child(validate, env)
        results[run] = (wall, peak)
        print(f"\nvalidate ({run} reference): {wall:.1f} s, peak {peak:.2f} GiB")
        print("\n".join(f"    {line}" for line in err.splitlines() if line.startswith("[")))
    verdict = json.loads((work / "report.json").read_text())["verdict"]
    print(f"\n{meta.layers} {args.package.name}: verdict {verdict}")
    if not args.skip_baseline:
        for run, (wall, peak) in results.items():
            print(
                f"{run}: {wall:.1f} s = {wall / base['forward_s']:.2f}x transformers' forward; "
                f"peak {peak:.2f} GiB (target <= 3 GiB, <= 1.5x)"
            )
    print(f"self: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB")


if __name__ == "__main__":
    from _bench import run

    run(main)
