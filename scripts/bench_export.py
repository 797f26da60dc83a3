"""Benchmark: export time, peak RSS and package size of full-size Phi-4-mini shards.

Random full-size weights (`write_random_checkpoint` with the phi-4-mini preset), context 2048
by default, every export in its own process (peak RSS from wait4's ru_maxrss). Cases:

  eight  [0, N) of an N-layer checkpoint (N = --layers, default 8), built directly (the
         export path) and traced (the private `anechain._traced` spec path, --no-traced
         skips it: ~95 s and ~8 GiB for 8 layers)
  tail   [24, 32) of a 32-layer checkpoint: its peak RSS against [0, 8) of the N-layer one
  full   the whole Phi-4-mini through `anechain export` in one process: 0:8 8:16 16:24
         24:30 30:32, the head and the embedding
  prefill  [0, N) with a --prefill-tokens (default 64) prefill function beside decode: time
         and size against the decode-only export (every other case exports decode only)

Size check: package bytes / (INT8 data + fp16 scales + fp16 norm gains), target <= 1.001.

    python scripts/bench_export.py --cases eight tail full prefill [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_TOPOLOGY = ("0:8", "8:16", "16:24", "24:30", "30:32")


def child(args: argparse.Namespace) -> None:
    from anechain._traced import export_shard_traced
    from anechain.checkpoint import Checkpoint
    from anechain.config import LayerRange, load_preset
    from anechain.export import LayerSpec, export_shard

    settings = dataclasses.replace(
        load_preset("phi-4-mini").export, context_length=args.context, prefill_tokens=args.prefill
    )
    fn = export_shard_traced if args.path == "traced" else export_shard
    spec = LayerSpec(LayerRange.parse(args.range), Path(args.out))
    result = fn(Checkpoint(args.checkpoint), spec, settings, overwrite=True)
    print(json.dumps(result.to_dict()))


def run_child(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS GiB, stdout) of one child process, reaped with wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read the pipes first (a full pipe would block the child), then reap it with wait4.
    assert proc.stdout is not None and proc.stderr is not None
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / (1 << 20), stdout


def checkpoint(work: Path, n_layers: int) -> Path:
    path = work / f"checkpoint-{n_layers}"
    if not path.exists():
        # In a child process: Linux carries a parent's RSS into a forked child's ru_maxrss,
        # so writing gigabytes of random weights here would inflate every export's peak.
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--write-checkpoint", str(path), "--layers", str(n_layers)],
            check=True,
        )
        print(f"# random checkpoint, {n_layers} layers: {time.perf_counter() - t:.0f}s", flush=True)
    return path


def write_checkpoint(path: Path, n_layers: int) -> None:
    from anechain.checkpoint import write_random_checkpoint
    from anechain.config import load_preset

    arch = dataclasses.replace(load_preset("phi-4-mini").architecture, num_hidden_layers=n_layers)
    write_random_checkpoint(path, arch)


def payload_bytes(layers: int, head: bool = False) -> int:
    """INT8 data + fp16 scales + fp16 norm gains of `layers` Phi-4-mini layers (or the head)."""
    from anechain.config import load_preset

    a = load_preset("phi-4-mini").architecture
    if head:
        return a.vocab_size * a.hidden_size + 2 * a.vocab_size + 2 * a.hidden_size
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    shapes = [
        (q + 2 * kv, a.hidden_size),
        (a.hidden_size, q),
        (2 * a.intermediate_size, a.hidden_size),
        (a.hidden_size, a.intermediate_size),
    ]
    per_layer = sum(o * i + 2 * o for o, i in shapes) + 2 * 2 * a.hidden_size
    return layers * per_layer


def export_row(ckpt: Path, rng: str, path: str, work: Path, context: int, prefill: int = 0) -> dict:
    out = work / f"bench_{rng.replace(':', '_')}_{path}_t{prefill}.mlpackage"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--checkpoint",
        str(ckpt),
        "--range",
        rng,
        "--path",
        path,
        "--context",
        str(context),
        "--prefill",
        str(prefill),
        "--out",
        str(out),
    ]
    wall, cpu, rss, stdout = run_child(cmd)
    result = json.loads(stdout.strip().splitlines()[-1])
    start, end = map(int, rng.split(":"))
    shutil.rmtree(out, ignore_errors=True)
    return {
        "case": f"[{rng}) of {ckpt.name.split('-')[-1]}",
        "path": path,
        "wall": wall,
        "cpu": cpu,
        "rss": rss,
        "size": result["size_bytes"],
        "ratio": result["size_bytes"] / payload_bytes(end - start),
        "stages": result["stage_seconds"],
    }


def print_row(r: dict) -> None:
    stages = " ".join(f"{k}={v:.1f}" for k, v in r["stages"].items())
    print(
        f"{r['case']:<16} {r['path']:<7} {r['wall']:7.1f} {r['cpu']:6.1f} {r['rss']:8.2f} "
        f"{r['size'] / 1e6:10.1f} {r['ratio']:8.5f}  {stages}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases", nargs="+", default=["eight"], choices=["eight", "tail", "full", "prefill"]
    )
    p.add_argument("--prefill-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--no-traced", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the random checkpoints")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--range", help=argparse.SUPPRESS)
    p.add_argument("--path", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.write_checkpoint:
        return write_checkpoint(args.write_checkpoint, args.layers)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anechain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# command: python {shlex.join(sys.argv)}")
    print(f"# load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"{'case':<16} {'path':<7} {'wall s':>7} {'CPU s':>6} {'peak GiB':>8} {'package MB':>10} "
        f"{'size/payload':>8}  stages (s)"
    )
    rows = {}
    if "eight" in args.cases or "prefill" in args.cases:
        ckpt = checkpoint(work, args.layers)
        rng = f"0:{args.layers}"
        rows["fast"] = export_row(ckpt, rng, "fast", work, args.context)
        print_row(rows["fast"])
        if "prefill" in args.cases:
            t = args.prefill_tokens
            row = export_row(ckpt, rng, "fast", work, args.context, t)
            row["case"] += f" T={t}"
            print_row(row)
            print(
                f"# prefill T={t}: {row['size'] / rows['fast']['size']:.5f} x the decode-only "
                f"size, {row['wall'] / rows['fast']['wall']:.2f} x its wall time"
            )
        if "eight" in args.cases and not args.no_traced:
            rows["traced"] = export_row(ckpt, rng, "traced", work, args.context)
            print_row(rows["traced"])
            print(
                f"# speed-up: {rows['traced']['wall'] / rows['fast']['wall']:.1f}x wall, "
                f"{rows['traced']['cpu'] / rows['fast']['cpu']:.1f}x CPU"
            )
        if not args.keep:
            shutil.rmtree(ckpt)
    if "tail" in args.cases or "full" in args.cases:
        ckpt = checkpoint(work, 32)
        if "tail" in args.cases:
            rows["tail"] = export_row(ckpt, "24:32", "fast", work, args.context)
            print_row(rows["tail"])
            if "fast" in rows:
                print(
                    f"# peak RSS [24,32) / [0,8): {rows['tail']['rss'] / rows['fast']['rss']:.3f}"
                )
        if "full" in args.cases:
            out = work / "full"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "anechain",
                "export",
                "--model",
                str(ckpt),
                "--context",
                str(args.context),
                "--prefill-tokens",
                "0",
                *[
                    a
                    for s in FULL_TOPOLOGY
                    for a in ("--layer-spec", f"{s}:{out}/layers_{s.replace(':', '_')}.mlpackage")
                ],
                "--head",
                str(out / "head.mlpackage"),
                "--embedding",
                str(out / "embedding.npy"),
            ]
            wall, cpu, rss, _ = run_child(cmd)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            pkg = sum(
                f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix != ".npy"
            )
            ratio = pkg / (payload_bytes(32) + payload_bytes(0, head=True))
            print(
                f"{'whole model':<16} {'fast':<7} {wall:7.1f} {cpu:6.1f} {rss:8.2f} "
                f"{size / 1e6:10.1f} {ratio:8.5f}  (5 shards + head + embedding, one process)",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ckpt)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    from _bench import run

    run(main)
