"""Benchmark: the cost of the checkpoint checks on full-size Phi-4-mini tensors.

`Checkpoint.check_tensors` reads only safetensors headers (no tensor bytes). The NaN/Inf
check (`Checkpoint.check_finite`) runs on every tensor as it is read: one aminmax pass over
the bf16 data. This prints its time per full-size layer and for the embedding, next to the
bf16 -> fp32 conversion export already does on the same tensors, and extrapolates to the
whole model (32 layers + the 200064 x 3072 embedding, 7.6 GB bf16).

    python scripts/bench_checks.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from anechain.checkpoint import Checkpoint
from anechain.config import load_preset


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    a = load_preset("phi-4-mini").architecture
    h, i, d = a.hidden_size, a.intermediate_size, a.head_dim
    gen = torch.Generator().manual_seed(0)
    layer = {
        "qkv_proj": ((a.num_attention_heads + 2 * a.num_key_value_heads) * d, h),
        "o_proj": (h, a.num_attention_heads * d),
        "gate_up_proj": (2 * i, h),
        "down_proj": (h, i),
        "norms": (2, h),
    }
    tensors = {k: torch.randn(*s, generator=gen).to(torch.bfloat16) for k, s in layer.items()}
    elements = sum(t.numel() for t in tensors.values())

    def check_layer() -> None:
        for name, t in tensors.items():
            Checkpoint.check_finite(name, t)

    def convert_layer() -> None:
        for t in tensors.values():
            t.float()

    def isfinite_layer() -> None:
        for t in tensors.values():
            bool(torch.isfinite(t).all())

    check = best_of(check_layer, args.repeat)
    convert = best_of(convert_layer, args.repeat)
    naive = best_of(isfinite_layer, args.repeat)
    # The embedding: same cost per element as a layer's tensors (one aminmax pass).
    embedding_elements = a.vocab_size * h
    per_element = check / elements
    total = per_element * (a.num_hidden_layers * elements + embedding_elements)
    print(f"command: python {' '.join(map(shlex.quote, sys.argv))}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one full-size layer: {elements / 1e6:.1f} M bf16 elements")
    print(f"  check_finite (aminmax)      {1000 * check:8.1f} ms")
    print(f"  isfinite().all() instead     {1000 * naive:8.1f} ms")
    print(f"  bf16 -> fp32 (export's copy) {1000 * convert:8.1f} ms")
    print(
        f"whole model ({a.num_hidden_layers} layers + embedding, "
        f"{2 * (a.num_hidden_layers * elements + embedding_elements) / 1e9:.1f} GB bf16): "
        f"check_finite ~{total:.1f} s"
    )


if __name__ == "__main__":
    from _bench import run

    run(main)
