"""The structure that makes a random checkpoint as robust to weight noise as a real one.

Measured (scripts/bench_sensitivity.py): a real model's hidden states share a large
component across tokens (SmolLM2-135M: the mean state holds ~40 % of a state's energy after
2 layers), and its attention goes to positions chosen by that shared structure (recency,
sinks) with wide margins. Random q/k rows instead peak each query on an arbitrary key among
random tokens: any perturbation flips the winner, and 0.9 % weight noise moved late
positions' states to cosine ~0.85 where a real model stays at 0.9998.

So the trained-like style adds, on top of the random weights:
- a shared direction m: every embedding row (but BOS) carries a part along it, and in
  every layer a few MLP units hold each normed state at a set fraction along it, with a
  single stable point (no state runs onto m, at any depth), and the part every value
  takes of it is written back onto m;
- recency: query and key rows read the shared direction into the same rotary pairs, so
  q.k ~ sum_j cos(w_j (p - s)) peaks at the newest positions whatever the tokens;
- a sink on BOS: queries read the shared direction, keys read BOS's own directions (its
  trigger and massive channels), into dims RoPE barely rotates; values read none of
  them, so the sink is a no-op.

Measured over 32 layers (hidden 576, 512 tokens, scripts/bench_depth.py): the mean state
holds 0.82-0.94 of a state's energy and no state grows past 1.4x the median after layer 2
(real SmolLM2-135M: 0.5-0.7, and 1.6x from layer 12 on). The units before read m and
wrote more of it, a feedback with a threshold: from layer ~10 every state ran onto m at
hidden 576, a few chosen by chance at full size, where a perturbation at layer 8 decided
when, and flipped one next token of the full-size 32-layer model by KL 9 (DESIGN.md).
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
# Peak recency logit and the range of sink logits over the heads. 6: with the states held
# on m, 12 peaked attention so that an extra (empty) cache slot, one too wide a mask, moved
# the odd fixture's states by rmse 0.155 where the real model's move by 0.68 (6: 0.295).
RECENCY_LOGIT = 6.0
SINK_LOGITS = (2.0, 6.0)
# Block outputs (o_proj, down_proj) from layer 2 on, relative to the flat model's: small
# updates to a large residual, as in a real model, so a perturbation is not amplified
# layer after layer (a block as large as its input doubles a perturbation's energy).
# (0.2 gives 3.4/4.8x the real 1 - cosine at hidden 576, but the tiny model's residual
# then stops growing after layer 3; 0.3 gives 4.0/5.3x.)
LATE_BLOCK_GAIN = 0.3
# The fraction of a normed state along the shared direction the units hold (sets the q/k
# scales): 0.7 puts the 8-layer noise curve at 1.7-3.3x the real one (0.6: 3-6.7x, out of
# sensitivity.BAND), as the rest of a state is more fragile than a real model's.
_SHARED_FRACTION = 0.7
# Gate gain of the units that write the shared part back: steep, so they stay off for
# states with x.m < 0.
_BACK_GATE = 8.0


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


def route_shared_values(
    arch: Architecture,
    qkv: torch.Tensor,  # (nq + 2 nkv, H)
    o_proj: torch.Tensor,  # (H, nq)
    m: torch.Tensor,
) -> None:
    """Make o_proj write the values' shared part along m.

    Every state is mostly m, so every value has a part V m alike for all tokens, and
    attention passes it on wherever it looks: o_proj wrote it as a bias growing layer after
    layer, which one token of the tied head won at 111 of 128 positions (hidden 576).
    Turned onto m (its size kept), it joins the shared part the units hold, and the final
    norm mutes it.
    """
    d, heads, kv_heads = arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads
    nq, nkv = heads * d, kv_heads * d
    shared = qkv[nq + nkv :] @ m  # (nkv,): each kv head's value of m
    u = shared.view(kv_heads, 1, d).expand(kv_heads, heads // kv_heads, d).reshape(nq)
    u = u / u.norm()
    out = o_proj @ u  # (H,)
    o_proj.sub_(out[:, None] * u[None])
    o_proj.add_(out.norm() * m[:, None] * u[None])


def add_shared_units(
    arch: Architecture,
    gate_up: torch.Tensor,  # (2I, H)
    down: torch.Tensor,  # (H, I)
    m: torch.Tensor,
    ramp: float,
    gen: torch.Generator,
    avoid: torch.Tensor,
) -> None:
    """MLP units that hold every token's normed state at x.m ~ _SHARED_FRACTION sqrt(H),
    so the shared part keeps pace with the growing residual stream.

    A normed state x has |x|^2 = H whatever the token, so pairs of units reading a random
    unit direction r (gate and up rows r, and -r) give silu(y) y + silu(-y) y = y^2, of mean
    1: they write along m the same for every token. Units reading m (gate steep, up 1)
    write back -m ~ c^2 for c = x.m / sqrt(H) > 0 only: the two balance at c =
    _SHARED_FRACTION, a single stable point. Units reading m alone wrote +m ~ c^2: a
    feedback with a threshold, which in 32 layers ran a few states, chosen by chance, onto
    m (every state at hidden 576), where a small perturbation decided when.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    n = max(4, min(16, i // 16))
    step = i // n
    base = torch.arange(n) * step
    plus, minus, back = ((base + max(1, (k * step) // 4)) % i for k in (2, 3, 1))
    keep = ~(torch.isin(plus, avoid) | torch.isin(minus, avoid) | torch.isin(back, avoid))
    plus, minus, back = plus[keep], minus[keep], back[keep]
    root = math.sqrt(h)
    r = torch.randn(len(plus), h, generator=gen)
    r /= r.norm(dim=1, keepdim=True)
    gate_up[plus] = r
    gate_up[i + plus] = r
    gate_up[minus] = -r
    gate_up[i + minus] = -r
    # Each pair gives y^2 ~ 1: together they write SHARED_WRITE sqrt(H) x ramp along m.
    total = SHARED_WRITE * ramp * root
    noise = torch.randn(len(back), h, generator=gen) / root
    gate_up[back] = (_BACK_GATE / root) * (m[None] + 0.1 * noise)
    gate_up[i + back] = m[None] / root
    # At c = _SHARED_FRACTION the units reading m write back as much as the pairs write.
    c = _SHARED_FRACTION
    per_back = _BACK_GATE * c * c * float(torch.sigmoid(torch.tensor(_BACK_GATE * c)))
    spread = 1.0 + 0.1 * torch.randn(len(plus), generator=gen)
    for units, weight in (
        (plus, total / len(plus)),
        (minus, total / len(plus)),
        (back, -total / (len(back) * per_back)),
    ):
        # Only along m: a random remainder would be written alike for every token, a
        # bias the tied head turns into one token winning every position.
        down[:, units] = weight * m[:, None] * spread


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
    # Values read nothing of BOS's own channels: attending to the sink is a no-op, as in
    # trained models (a sink's values are near zero), not a part of BOS's value alike for
    # every token.
    qkv[nq + kv_heads * d :, bos_dir != 0] = 0.0
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
