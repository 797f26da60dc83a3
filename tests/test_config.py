from __future__ import annotations

import pytest

from anechain.config import LayerRange, load_config, load_preset
from anechain.errors import ConfigError


def test_phi4_preset_is_the_real_architecture():
    c = load_preset("phi-4-mini")
    a = c.architecture
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (32, 3072, 8192)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (24, 8, 128)
    assert (a.partial_rotary_factor, a.rotary_dim, a.vocab_size) == (0.75, 96, 200064)
    assert a.tie_word_embeddings
    assert [str(r) for r in c.export.layer_ranges] == ["0:8", "8:16", "16:24", "24:30", "30:32"]


def test_tiny_preset_keeps_the_architecture_features():
    a = load_preset("tiny").architecture
    assert a.num_attention_heads > a.num_key_value_heads  # GQA
    assert a.rotary_dim < a.head_dim  # partial rotary
    assert a.max_position_embeddings > a.original_max_position_embeddings  # LongRoPE scaling


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
architecture:
  hidden_size: 64
  intermediate_size: 128
  num_hidden_layers: 4
  num_attention_heads: 4
  num_key_value_heads: 2
  vocab_size: 128
"""


def test_minimal_config_gets_defaults(tmp_path):
    c = load_config(_write(tmp_path, BASE + "  rms_norm_eps: 1e-6\n"))
    assert c.architecture.rms_norm_eps == 1e-6  # YAML reads 1e-6 as a string: cast
    assert c.export.context_length == 2048 and c.export.quantization == "int8"
    assert c.validation.gates.min_cosine == 0.998


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  hiden_size: 3\n", "unknown config key 'architecture.hiden_size'"),
        ("export:\n  context_length: abc\n", "export.context_length must be an integer"),
        ("export:\n  context_length: 100\n", "multiple of 32"),
        ("export:\n  quantization: int4\n", "export.quantization must be 'int8' or 'none'"),
        ("export:\n  topology: ['0:5']\n", "ends past the model's 4 decoder layers"),
        ("export:\n  topology: ['3:1']\n", "needs 0 <= START < END"),
        ("validation:\n  gates:\n    min_cosine: high\n", "min_cosine must be a number"),
        ("residency:\n  strict: 1\n", "residency.strict must be true or false"),
        ("bogus: 1\n", "unknown config key 'bogus'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_write(tmp_path, BASE + extra))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))
    # Where: the line and column of the problem, as an editor shows them.
    with pytest.raises(ConfigError, match="not valid YAML at line 3, column 5: mapping values"):
        load_config(_write(tmp_path, "a: 1\nb: 2\nc: d: e: f\n"))
    with pytest.raises(ConfigError, match="missing config key 'architecture'"):
        load_config(_write(tmp_path, "export: {}\n"))


def test_layer_range_parse():
    assert LayerRange.parse("8:16") == LayerRange(8, 16)
    assert LayerRange(8, 16).num_layers == 8
    for bad in ("8", "8:x", "-1:3", "4:4", "a:b:c"):
        with pytest.raises(ConfigError):
            LayerRange.parse(bad)
