"""The structure that makes a random checkpoint as robust to weight noise as a real one.

Measured (scripts/bench_sensitivity.py): a real model's hidden states share a large
component across tokens (SmolLM2-135M: the mean state holds ~40 % of a state's energy after
2 layers), and its attention goes to positions chosen by that shared structure (recency,
sinks) with wide margins. Random q/k rows instead peak each query on an arbitrary key among
random tokens: any perturbation flips the winner, and 0.9 % weight noise moved late
positions' states to cosine ~0.85 where a real model stays at 0.9998.

So the trained-like style adds, on top of the random weights:
- a shared direction: every embedding row (but BOS) carries a part along it, and in every
  layer a few MLP units that read it write more of it, growing with depth;
- recency: query and key rows read the shared direction into the same rotary pairs, so
  q.k ~ sum_j cos(w_j (p - s)) peaks at the newest positions whatever the tokens;
- a sink on BOS: queries read the shared direction, keys read BOS's own directions (its
  trigger and massive channels), into dims RoPE barely rotates.
"""

from __future__ import annotations

import math

import torch

from anechain.config import Architecture

# Shared part of each embedding row, relative to the row's norm.
SHARED_EMBEDDING = 0.3
# What the shared-direction units write per layer, in units of sqrt(hidden) (ramped up
# over the first layers).
SHARED_WRITE = 0.5
# Peak recency logit and the range of sink logits over the heads.
RECENCY_LOGIT = 12.0
SINK_LOGITS = (2.0, 6.0)
# Block outputs (o_proj, down_proj) from layer 2 on, relative to the flat model's: small
# updates to a large residual, as in a real model, so a perturbation is not amplified
# layer after layer (a block as large as its input doubles a perturbation's energy).
# (0.2 gives 3.4/4.8x the real 1 - cosine at hidden 576, but the tiny model's residual
# then stops growing after layer 3; 0.3 gives 4.0/5.3x.)
LATE_BLOCK_GAIN = 0.3
# Expected fraction of a normed state along the shared direction (sets the q/k scales).
_SHARED_FRACTION = 0.5


def block_gain(layer: int) -> float:
    return 1.0 if layer < 2 else LATE_BLOCK_GAIN


def shared_channels(hidden_size: int) -> torch.Tensor:
    """Channels the shared direction lies on (none of the massive, outlier, trigger ones)."""
    h = hidden_size
    return torch.tensor([h // 10, h // 6, h // 2 + 1, (5 * h) // 6])


def shared_direction(arch: Architecture, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2)
    m = torch.zeros(arch.hidden_size)
    channels = shared_channels(arch.hidden_size)
    m[channels] = 1.0 + 0.5 * torch.rand(len(channels), generator=gen)
    return m / m.norm()


def add_shared_to_embedding(rows: torch.Tensor, m: torch.Tensor, skip: int) -> None:
    """Every row but `skip` (BOS) gets SHARED_EMBEDDING x its norm along m."""
    norms = rows.norm(dim=1, keepdim=True)
    bos = rows[skip].clone()
    rows.add_(SHARED_EMBEDDING * norms * m[None])
    rows[skip] = bos


def add_shared_units(
    arch: Architecture,
    gate_up: torch.Tensor,  # (2I, H)
    down: torch.Tensor,  # (H, I)
    m: torch.Tensor,
    ramp: float,
    gen: torch.Generator,
    avoid: torch.Tensor,
) -> None:
    """A few MLP units that fire on every ordinary token (its state has a part along m)
    and write more of m, so the shared part keeps pace with the growing residual stream."""
    h, i = arch.hidden_size, arch.intermediate_size
    n = max(4, min(16, i // 16))
    units = (torch.arange(n) * (i // n) + max(1, i // (2 * n))) % i
    units = units[~torch.isin(units, avoid)]
    # A normed ordinary state has x.m ~ _SHARED_FRACTION sqrt(H); the rows give it 2.
    scale = 2.0 / (_SHARED_FRACTION * math.sqrt(h))

    def rows() -> torch.Tensor:
        noise = torch.randn(len(units), h, generator=gen) / math.sqrt(h)
        return scale * (m[None] + 0.5 * noise)

    gate_up[units] = rows()
    gate_up[i + units] = rows()
    # Each unit gives silu(2) x 2 ~ 3.5; together they write SHARED_WRITE sqrt(H) x depth.
    per_unit = 3.5
    weight = SHARED_WRITE * ramp * math.sqrt(h) / (len(units) * per_unit)
    down[:, units] *= 0.1
    down[:, units] += weight * m[:, None] * (1.0 + 0.1 * torch.randn(len(units), generator=gen))


def _slow_dims(arch: Architecture) -> torch.Tensor:
    """Head dims RoPE leaves alone (partial rotary) or turns slowest (its last pair)."""
    d, rot = arch.head_dim, arch.rotary_dim
    if rot < d:
        return torch.arange(rot, d)
    half = rot // 2
    return torch.tensor([half - 1, rot - 1])


def _recency_pairs(arch: Architecture) -> torch.Tensor:
    """Rotary pairs (first index) turning between ~1 and ~1/64 rad per position."""
    half = arch.rotary_dim // 2
    freqs = arch.rope_theta ** (-2.0 * torch.arange(half) / arch.rotary_dim)
    pairs = ((freqs <= 1.0) & (freqs >= 1 / 64)).nonzero().squeeze(1)
    return pairs if len(pairs) else torch.arange(min(half, 2))


def add_attention_structure(
    arch: Architecture,
    qkv: torch.Tensor,  # (nq + 2 nkv, H) rows of q, then k, then v
    m: torch.Tensor,
    bos_dir: torch.Tensor,
    gen: torch.Generator,
) -> None:
    """Recency and a BOS sink, read from the shared direction and BOS's own directions."""
    h, d = arch.hidden_size, arch.head_dim
    heads, kv_heads = arch.num_attention_heads, arch.num_key_value_heads
    group = heads // kv_heads
    nq = heads * d
    half = arch.rotary_dim // 2
    pairs = _recency_pairs(arch)
    recency = torch.zeros(d)
    recency[pairs] = 1.0
    recency[pairs + half] = 1.0
    recency /= recency.norm()
    slow = _slow_dims(arch)
    sink = torch.zeros(d)
    sink[slow] = 1.0
    sink /= sink.norm()
    shared = _SHARED_FRACTION * math.sqrt(h)  # x.m of a normed ordinary state
    bos_proj = 0.7 * math.sqrt(h)  # x.bos_dir of BOS's normed state
    # logit = q.k / sqrt(d): recency q = k = a (x.m) c, so a^2 shared^2 = RECENCY sqrt(d).
    a = math.sqrt(RECENCY_LOGIT * math.sqrt(d)) / shared
    lo, hi = SINK_LOGITS
    for kv in range(kv_heads):
        k_rows = slice(nq + kv * d, nq + (kv + 1) * d)
        qkv[k_rows] += a * recency[:, None] * m[None]
        # Sink keys: b (x.bos_dir) on BOS; each query head sets its own sink logit.
        b = 1.0 / bos_proj
        qkv[k_rows] += b * sink[:, None] * bos_dir[None]
        for g in range(group):
            head = kv * group + g
            q_rows = slice(head * d, (head + 1) * d)
            target = lo + (hi - lo) * float(torch.rand(1, generator=gen))
            qkv[q_rows] += a * recency[:, None] * m[None]
            qkv[q_rows] += (target * math.sqrt(d) / shared) * sink[:, None] * m[None]
