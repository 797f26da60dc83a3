"""The module export traces equals transformers' own Phi3 decoder layers, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Phi3ForCausalLM

from anechain.config import LayerRange
from anechain.model import ANERMSNorm, LayerRangeModel
from anechain.rope import RopeParameters, step_inputs


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _hf_decode_boundaries(model, tokens, layers: LayerRange) -> list[tuple[torch.Tensor, ...]]:
    """(input of layer start, output of layer end-1) for each decode step with a KV cache."""
    captured: dict[str, torch.Tensor] = {}
    blocks = model.model.layers
    h1 = blocks[layers.start].register_forward_pre_hook(
        lambda m, args, kwargs: captured.__setitem__(
            "in", kwargs.get("hidden_states", args[0] if args else None)
        ),
        with_kwargs=True,
    )
    h2 = blocks[layers.end - 1].register_forward_hook(
        lambda m, args, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)
    )
    cache = DynamicCache(config=model.config)
    steps = []
    try:
        with torch.no_grad():
            for p, tok in enumerate(tokens):
                model(
                    torch.tensor([[tok]]),
                    cache=cache,
                    use_cache=True,
                    position_ids=torch.tensor([[p]]),
                )
                steps.append((captured["in"][0, -1].clone(), captured["out"][0, -1].clone()))
    finally:
        h1.remove()
        h2.remove()
    return steps


@pytest.mark.parametrize("layers", [LayerRange(0, 3), LayerRange(3, 5), LayerRange(5, 6)])
def test_layer_range_matches_transformers_decode(tiny_checkpoint, layers):
    arch = tiny_checkpoint.architecture
    hf = Phi3ForCausalLM.from_pretrained(
        str(tiny_checkpoint.path), local_files_only=True, dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(1).integers(0, arch.vocab_size, size=10).tolist()
    reference = _hf_decode_boundaries(hf, tokens, layers)

    context = 32
    ours = LayerRangeModel(arch, layers, context).eval()
    ours.load_hf_layer_weights(
        tiny_checkpoint.read_tensors(tiny_checkpoint.layer_tensor_names(layers))
    )
    rope = RopeParameters.from_hf_config(tiny_checkpoint.hf_config)
    with torch.no_grad():
        for p, (h_in, h_out) in enumerate(reference):
            x = step_inputs(rope, h_in.numpy(), p, context)
            args = [
                torch.from_numpy(x[k]).float() if x[k].dtype != np.int32 else torch.from_numpy(x[k])
                for k in ("hidden_states", "position", "cos", "sin", "attention_mask")
            ]
            # fp16 inputs would add rounding; feed the exact fp32 values instead.
            args[0] = h_in.reshape(1, -1, 1, 1)
            c, s = rope.cos_sin(p)
            args[2], args[3] = (torch.from_numpy(v).reshape(1, 1, 1, -1) for v in (c, s))
            out = ours(*args).reshape(-1)
            assert _cosine(out, h_out) >= 0.99999, f"step {p}"
            assert _cosine(out - h_in, h_out - h_in) >= 0.99999, f"delta at step {p}"
    # The cache holds one entry per step and nothing past it.
    assert ours.key_cache[:, :, len(tokens) :].abs().max() == 0
    assert ours.key_cache[:, :, len(tokens) - 1].abs().max() > 0


def test_rmsnorm_survives_values_that_overflow_fp16_squares():
    norm = ANERMSNorm(8, 1e-5).half()
    x = torch.tensor([300.0, -2000.0, 5.0, 0.5, 40000.0, 1.0, -7.0, 3.0]).reshape(1, 8, 1, 1)
    expected = x.double() / x.double().pow(2).mean(dim=1, keepdim=True).add(1e-5).sqrt()
    got = norm(x.half()).double()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=2e-3, atol=1e-3)
    # The plain fp16 formula loses the whole vector (x^2 overflows): the reason for ANERMSNorm.
    plain = x.half() * torch.rsqrt(x.half().pow(2).mean(dim=1, keepdim=True) + 1e-5)
    assert not torch.allclose(plain.double(), expected, rtol=1e-2, atol=1e-2)


def test_long_rope_switch_matches_transformers_decode(tmp_path):
    """Past original_max_position_embeddings LongRoPE switches to the long factors, per
    position as transformers' decode step does; the module, the host inputs and the golden
    reference all follow it."""
    import dataclasses

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import load_preset
    from anechain.golden import reference_boundaries

    arch = dataclasses.replace(
        load_preset("tiny").architecture, num_hidden_layers=2, original_max_position_embeddings=8
    )
    ckpt = Checkpoint(write_random_checkpoint(tmp_path / "ckpt", arch, seed=3))
    hf = Phi3ForCausalLM.from_pretrained(
        str(ckpt.path), local_files_only=True, dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(2).integers(0, arch.vocab_size, size=14).tolist()
    layers = LayerRange(0, 2)
    reference = _hf_decode_boundaries(hf, tokens, layers)
    rope = RopeParameters.from_hf_config(ckpt.hf_config)
    assert rope.inv_freq_long != rope.inv_freq_short

    ours = LayerRangeModel(arch, layers, 32).eval()
    ours.load_hf_layer_weights(ckpt.read_tensors(ckpt.layer_tensor_names(layers)))
    with torch.no_grad():
        for p, (h_in, h_out) in enumerate(reference):
            x = step_inputs(rope, h_in.numpy(), p, 32)
            c, s = (torch.from_numpy(v).reshape(1, 1, 1, -1) for v in rope.cos_sin(p))
            out = ours(
                h_in.reshape(1, -1, 1, 1),
                torch.from_numpy(x["position"]),
                c,
                s,
                torch.from_numpy(x["attention_mask"]).float(),
            ).reshape(-1)
            assert _cosine(out - h_in, h_out - h_in) >= 0.99999, f"step {p}"

    bounds = reference_boundaries(ckpt, tokens, 2, cache_dir=tmp_path / "cache")
    for p, (_, h_out) in enumerate(reference):
        np.testing.assert_allclose(bounds[2][p], h_out.numpy(), rtol=1e-4, atol=1e-4)
