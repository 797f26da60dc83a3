"""Typed configs: architecture presets, export settings, validation gates, and layer ranges.

Configs are YAML files validated when loaded: an unknown key or a wrong type is a
ConfigError naming the key. Precedence is CLI > YAML > dataclass defaults; the CLI applies
its overrides with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from anechain.errors import ConfigError

# The Phi-3 family (Phi3ForCausalLM), each with a tiny form of the same rope kind.
PRESETS = (
    "tiny",
    "phi-4-mini",
    "phi-3-mini-4k",
    "phi-3-mini-128k",
    "phi-3.5-mini",
    "tiny-phi-3-mini-4k",
    "tiny-phi-3-mini-128k",
    "tiny-phi-3.5-mini",
)
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer

# ASCII only: int() also accepts other scripts' digits (Arabic-Indic, fullwidth) and
# refuses superscripts, so "¹" would be a traceback and "١" silently 1.
_ASCII_INT = re.compile(r"[0-9]+")


_ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_ascii_float(text: str) -> float | None:
    """The finite number `text` spells in ASCII (1, 0.5, 1e-5), else None (NaN, inf, "١")."""
    text = text.strip(" \t")
    if not _ASCII_FLOAT.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None  # 1e999 overflows to inf


def parse_ascii_int(text: str) -> int | None:
    """The non-negative integer `text` spells in ASCII digits (spaces around allowed), else None."""
    text = text.strip(" \t")
    return int(text) if _ASCII_INT.fullmatch(text) else None


@dataclass(frozen=True, order=True)
class LayerRange:
    """Decoder layers [start, end) of one shard."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ConfigError(f"layer range {self.start}:{self.end} needs 0 <= START < END")

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        parts = [parse_ascii_int(p) for p in text.split(":")]
        if len(parts) != 2 or parts[0] is None or parts[1] is None:
            raise ConfigError(f"layer range {text!r} is not START:END (e.g. 8:16)")
        return cls(parts[0], parts[1])

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def check_within(self, num_hidden_layers: int) -> None:
        if self.end > num_hidden_layers:
            raise ConfigError(
                f"layer range {self} ends past the model's {num_hidden_layers} decoder layers"
            )

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class Architecture:
    """Phi-4-mini architecture numbers, with Hugging Face's names (used to make checkpoints)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    partial_rotary_factor: float = 0.75
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"architecture.{name} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("architecture.hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "architecture.num_attention_heads must be a multiple of num_key_value_heads"
            )
        if self.rotary_dim % 2 or not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(
                "architecture.partial_rotary_factor must give an even rotary dimension "
                "in (0, head_dim]"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class ExportSettings:
    """How layer shards are built."""

    context_length: int = 2048
    # "int8": per-output-channel symmetric INT8 projections; "none": fp16 weights.
    quantization: str = "int8"
    topology: tuple[str, ...] = ()
    # LM head vocabulary chunk: the ANE's per-dimension limit is 16384.
    head_chunk_rows: int = 16384
    # Tokens per call of each layer shard's `prefill` function (beside `decode`, sharing its
    # weights and KV states); 0 exports decode only (e.g. an iPhone-sized build).
    prefill_tokens: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.head_chunk_rows <= 16384:
            raise ConfigError(
                f"export.head_chunk_rows must be in 1..16384, got {self.head_chunk_rows}"
            )
        if self.context_length <= 0 or self.context_length % 32:
            raise ConfigError(
                f"export.context_length must be a positive multiple of 32 (ANE-friendly state "
                f"shapes), got {self.context_length}"
            )
        if self.quantization not in ("int8", "none"):
            raise ConfigError(
                f"export.quantization must be 'int8' or 'none', got {self.quantization!r}"
            )
        if not 0 <= self.prefill_tokens <= self.context_length:
            raise ConfigError(
                f"export.prefill_tokens must be in 0..{self.context_length} (the context), "
                f"got {self.prefill_tokens}"
            )
        for spec in self.topology:
            LayerRange.parse(spec)

    @property
    def layer_ranges(self) -> list[LayerRange]:
        return [LayerRange.parse(s) for s in self.topology]


@dataclass(frozen=True)
class Gates:
    """Golden gates: shard output against PyTorch. NaN/Inf always rejects.

    Error bounds are relative to the reference's scale, per step, since hidden states grow
    from ~1 to hundreds or thousands through a real model (derivation in DESIGN.md).
    """

    min_cosine: float = 0.998
    # Cosine of (output - input): catches a layer whose contribution vanished.
    min_delta_cosine: float = 0.9
    # The same at the worst single step: one large step (a massive activation at BOS)
    # dominates the whole-run cosines and can hide steps that are wrong.
    min_step_delta_cosine: float = 0.8
    # KV cache read back from the shard's state after decoding: cosine with transformers'
    # cache at every written position, worst layer (positions never written must stay 0).
    min_kv_cosine: float = 0.99
    # Worst step's RMSE / s, s = max(the step's reference RMS, the median step's): a step's
    # cosine down to ~0.98 (min_cosine bounds the whole sequence).
    max_rel_rmse: float = 0.2
    # Worst element's |error| / (s + |reference element|): an allclose with atol = rtol * s,
    # so outlier channels may err in proportion to their size.
    max_rel_abs: float = 0.5
    # The LM head: the shard's token must be the reference's on this share of steps, and
    # where it is not, the two tokens' reference logits may differ by at most
    # max_top1_margin logit standard deviations (a flip between near-ties).
    min_top1_agreement: float = 0.9
    max_top1_margin: float = 0.25
    # Next-token verdicts (nexttoken.py): the whole model's budget of KL(ref || shard) in nats,
    # mean and worst over the validated positions, for each shard substituted alone and for
    # the whole chain in `build` (derivation in DESIGN.md, "Next-token verdicts").
    max_kl_mean: float = 0.05
    max_kl_worst: float = 0.5
    # Cosine of the output without its massive channels (metrics.bulk_channels).
    min_bulk_cosine: float = 0.99

    def __post_init__(self) -> None:
        # A bound outside its measure's range gates nothing (min_cosine -5) or rejects every
        # shard (min_cosine 2): either way the verdict would not be about the shard.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"validation.gates.{f.name} must be a finite number")
            if "cosine" in f.name and not -1 <= value <= 1:
                raise ConfigError(
                    f"validation.gates.{f.name} must be in -1..1 (a cosine), got {value:g}"
                )
            if f.name == "min_top1_agreement" and not 0 <= value <= 1:
                raise ConfigError(
                    f"validation.gates.{f.name} must be in 0..1 (a share), got {value:g}"
                )
            if f.name.startswith("max_") and value < 0:
                raise ConfigError(f"validation.gates.{f.name} must be >= 0, got {value:g}")


@dataclass(frozen=True)
class ValidationSettings:
    steps: int = 16
    calibration_seed: int = 0
    # Explicit token ids; when empty: BOS + a fixed text with the checkpoint's tokenizer,
    # or BOS + ids drawn with calibration_seed.
    calibration_tokens: tuple[int, ...] = ()
    # Steps decoded at the end of the context window (the cache filled from the reference
    # up to context - late_steps), so the mask and positions at the end are exercised.
    late_steps: int = 4
    # The runtime's window (validate_long): a prompt of `long_tokens` positions through the
    # shard's own prefill (decode-only: decode, token by token) and cache, then `long_steps`
    # decode steps from that cache, every position compared. None: the context minus
    # long_steps; 0: no long window (a manifest built with such a config does not need one).
    long_tokens: int | None = None
    long_steps: int = 4
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"validation.steps must be positive, got {self.steps}")
        if self.late_steps < 0:
            raise ConfigError(f"validation.late_steps must be >= 0, got {self.late_steps}")
        if self.long_tokens is not None and self.long_tokens < 0:
            raise ConfigError(f"validation.long_tokens must be >= 0, got {self.long_tokens}")
        if self.long_steps < 1:
            raise ConfigError(f"validation.long_steps must be >= 1, got {self.long_steps}")
        if not 0 <= self.calibration_seed <= SEED_MAX:
            raise ConfigError(
                f"validation.calibration_seed must be in 0..{SEED_MAX}, got {self.calibration_seed}"
            )

    def long_window(self, context: int) -> tuple[int, int] | None:
        """(prompt positions, decode steps) of the long window in a context, or None (off)."""
        if self.long_tokens == 0:
            return None
        steps = self.long_steps
        prompt = context - steps if self.long_tokens is None else self.long_tokens
        if prompt < 1 or prompt + steps > context:
            raise ConfigError(
                f"the long window ({prompt} prompt positions + {steps} decode steps) does not "
                f"fit the context of {context}"
            )
        return prompt, steps


@dataclass(frozen=True)
class ResidencySettings:
    # Strict: every conv and every fp16 compute op prefers the Neural Engine.
    strict: bool = True
    max_compute_non_ane: int = 0  # fp16 compute ops allowed off the ANE when not strict
    # Plumbing (int32 index ops, state read/write) off the ANE: at most this share of the
    # plan's estimated cost (of its op count when the plan has no costs). 5 %: the limit a
    # known project rejects shards at; ANEMLL's published profile of its stateful models has
    # 0.7 % of ops off the ANE (an integer cast and `select`), `slice_update` on it.
    max_plumbing_share: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_plumbing_share <= 1.0:
            raise ConfigError(
                f"residency.max_plumbing_share must be within [0, 1], got {self.max_plumbing_share}"
            )


@dataclass(frozen=True)
class BuildSettings:
    """`anechain build`: the whole pipeline from a checkpoint to a proven manifest."""

    # Hugging Face checkpoint folder; empty: a random one with `architecture` is made (demo).
    checkpoint: str = ""
    # Where packages, reports and the manifest go; empty: artifacts/<name>.
    out_dir: str = ""
    seed: int = 0  # of the random checkpoint
    # The generation check's prompt: explicit ids first; else, when the checkpoint folder has
    # a tokenizer, `prompt` through it (as a user turn of its chat template, if it has one):
    # random ids make a trained model answer with near-ties everywhere; else 8 ids drawn
    # with `seed`.
    prompt_tokens: tuple[int, ...] = ()
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"build.max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"build.seed must be in 0..{SEED_MAX}, got {self.seed}")


@dataclass(frozen=True)
class Config:
    architecture: Architecture
    export: ExportSettings = field(default_factory=ExportSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    residency: ResidencySettings = field(default_factory=ResidencySettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    name: str = ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, casting only where YAML is lossy."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping")
        return from_dict(tp, value, where)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads 1e-5 (no dot) as a string: cast it explicitly, from ASCII only.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        number = parse_ascii_float(value) if isinstance(value, str) else float(value)
        if number is None and isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        # A NaN bound passes nothing and would be written as a bare NaN; "١" is not 1.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number in ASCII digits, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # internal: new field type


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(f"missing config key {key!r}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/YAML-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    path = Path(path)
    try:
        if path.exists() and not (path.is_file() or path.is_fifo()):
            raise ConfigError(f"config {path} is not a file")  # /dev/zero would never end
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        if mark is not None and problem:  # PyYAML's MarkedYAMLError: where, and what
            where = f"line {mark.line + 1}, column {mark.column + 1}"
            raise ConfigError(f"config {path} is not valid YAML at {where}: {problem}") from None
        raise ConfigError(f"config {path} is not valid YAML: {exc}".splitlines()[0]) from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise ConfigError(f"config {path} is nested too deeply to be an anechain config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    try:
        config: Config = from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for r in config.export.layer_ranges:
        try:
            r.check_within(config.architecture.num_hidden_layers)
        except ConfigError as exc:
            raise ConfigError(f"{path}: export.topology: {exc}") from None
    return config


def preset_path(name: str) -> Path:
    """Path of a preset shipped with the package (configs/ holds links to these)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return Path(str(resources.files("anechain") / "presets" / f"{name}.yaml"))


def load_preset(name: str) -> Config:
    return load_config(preset_path(name))
