"""Bad inputs through the CLI: each ends in one line of error, the right exit code, no
traceback, nothing at the destination and existing files untouched.

Exit 2 is a usage error (what was typed cannot be used), 1 a failure (the inputs are
wrong or a check failed). The special-file, disk-full and interrupted-run classes are in
test_bad_inputs_fs.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from anechain.checkpoint import Checkpoint, copy_checkpoint
from anechain.cli import cli
from anechain.config import preset_path
from anechain.errors import CheckpointError
from anechain.fsutil import sha256_tree
from anechain.platform import macos_at_least

TINY = str(preset_path("tiny"))


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def rewrite_tensor(ckpt: Path, name: str, change) -> None:  # type: ignore[no-untyped-def]
    """Replace one tensor of a checkpoint (a copy) by `change(tensor)`."""
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture
def ckpt(tiny_checkpoint_dir: Path, tmp_path: Path) -> Path:
    return copy_checkpoint(tiny_checkpoint_dir, tmp_path / "ckpt")


def existing_package(path: Path) -> str:
    """A pre-existing output a failed run must leave exactly as it was."""
    path.mkdir(parents=True)
    (path / "marker").write_text("the previous package\n")
    return sha256_tree(path)


def no_leftovers(folder: Path) -> None:
    assert not list(folder.glob(".*.partial")), list(folder.iterdir())


# --- silent corruption: shapes and dtypes ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change", "found"),
    [
        ("model.layers.0.self_attn.qkv_proj.weight", lambda t: t[:-1], "[127, 64]"),
        # Transposed: same element count, so a reshape would have taken it silently.
        ("model.layers.1.mlp.down_proj.weight", lambda t: t.T, "[128, 64]"),
        ("model.layers.1.input_layernorm.weight", lambda t: t.to(torch.int16), "dtype I16"),
    ],
)
def test_export_refuses_a_tensor_that_does_not_fit_the_architecture(
    ckpt, tmp_path, name, change, found, error_line
):
    rewrite_tensor(ckpt, name, change)
    dest = tmp_path / "out" / "a.mlpackage"
    before = existing_package(dest)
    result = invoke(
        "export", "--model", ckpt, "--config", TINY, "--layer-spec", f"0:2:{dest}", "--overwrite"
    )
    message = error_line(result, 1)
    assert name in message and found in message
    if "dtype" not in found:
        assert "expected" in message
    assert sha256_tree(dest) == before
    no_leftovers(dest.parent)


def test_head_and_embedding_exports_check_their_tensors(ckpt, tmp_path, error_line):
    rewrite_tensor(ckpt, "model.embed_tokens.weight", lambda t: t[:, :-1])
    for option, dest in (("--head", "h.mlpackage"), ("--embedding", "e.npy")):
        result = invoke("export", "--model", ckpt, "--config", TINY, option, tmp_path / dest)
        message = error_line(result, 1)
        assert "model.embed_tokens.weight has shape [512, 63], expected [512, 64]" in message
        assert not (tmp_path / dest).exists()


def test_golden_reference_checks_shapes_before_running(ckpt, tmp_path):
    from anechain.golden import reference_boundaries

    rewrite_tensor(ckpt, "model.layers.2.self_attn.qkv_proj.weight", lambda t: t.T)
    checkpoint = Checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"model.layers.2.self_attn.qkv_proj.weight"):
        reference_boundaries(checkpoint, [1, 2, 3], 3, cache_dir=tmp_path)
    # Layers before the bad one are fine: the reference up to layer 2 still runs.
    assert reference_boundaries(checkpoint, [1, 2, 3], 2, cache_dir=tmp_path).shape == (3, 3, 64)


# --- NaN and Inf in the weights -------------------------------------------------------------


@pytest.mark.parametrize(("value", "what"), [(float("nan"), "1 NaN"), (float("inf"), "1 Inf")])
def test_export_names_a_non_finite_tensor(ckpt, tmp_path, value, what, error_line):
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[5, 7] = value
        return t

    rewrite_tensor(ckpt, name, poison)
    dest = tmp_path / "b.mlpackage"
    result = invoke("export", "--model", ckpt, "--config", TINY, "--layer-spec", f"0:2:{dest}")
    message = error_line(result, 1)
    assert name in message and what in message and "non-finite" in message
    assert not dest.exists()
    no_leftovers(tmp_path)


def test_non_finite_weights_outside_the_range_do_not_block_it(ckpt, tmp_path):
    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    rewrite_tensor(ckpt, "model.layers.4.mlp.down_proj.weight", poison)
    dest = tmp_path / "ok.mlpackage"
    result = invoke("export", "--model", ckpt, "--config", TINY, "--layer-spec", f"0:1:{dest}")
    assert result.exit_code == 0, result.output
    assert dest.is_dir()


def test_check_finite_counts_what_it_finds():
    t = torch.zeros(4, 4, dtype=torch.bfloat16)
    Checkpoint.check_finite("ok", t)
    t[0, 0], t[1, 1], t[2, 2] = float("nan"), float("-inf"), float("inf")
    with pytest.raises(CheckpointError, match=r"tensor x holds non-finite values \(1 NaN, 2 Inf\)"):
        Checkpoint.check_finite("x", t)


# --- tracebacks that are now one line -------------------------------------------------------


def test_config_that_is_not_utf8(tmp_path, tiny_checkpoint_dir, error_line):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", bad, "--embedding", tmp_path / "e.npy"
    )
    assert "is not UTF-8 text" in error_line(result, 1)
    assert not (tmp_path / "e.npy").exists()


def test_yaml_nested_past_the_recursion_limit(tmp_path, tiny_checkpoint_dir, error_line):
    deep = tmp_path / "deep.yaml"
    deep.write_text("validation: " + "[" * 5000 + "]" * 5000 + "\n")
    result = invoke(
        "export",
        "--model",
        tiny_checkpoint_dir,
        "--config",
        deep,
        "--embedding",
        tmp_path / "e.npy",
    )
    assert "nested too deeply" in error_line(result, 1)


@pytest.mark.parametrize(
    "spec",
    [
        "0:\u00b9:a.mlpackage",  # superscript one: int() refuses it (was a traceback)
        "\u0661:2:a.mlpackage",  # Arabic-Indic one: int() accepted it (was silently 1)
        "0:\uff12:a.mlpackage",  # fullwidth two
        "0:1\u00b2:a.mlpackage",
    ],
)
def test_non_ascii_digits_in_a_layer_spec_are_usage_errors(
    tiny_checkpoint_dir, tmp_path, spec, error_line
):
    result = invoke("export", "--model", tiny_checkpoint_dir, "--layer-spec", spec)
    assert "is not START:END" in error_line(result, 2)


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--embedding", "e.npy", "--context", "\u0666\u0664"],  # Arabic-Indic 64
        ["random-checkpoint", "c", "--num-layers", "\uff12"],  # fullwidth 2
        ["export", "--embedding", "e.npy", "--prefill-tokens", "\u0664"],  # Arabic-Indic 4
        ["random-checkpoint", "c", "--seed", "\u00b3"],  # superscript 3
    ],
)
def test_non_ascii_digits_in_integer_options_are_usage_errors(
    tiny_checkpoint_dir, tmp_path, args, error_line
):
    if args[0] == "export":
        args = [args[0], "--model", str(tiny_checkpoint_dir), *args[1:]]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        result = CliRunner().invoke(cli, args)
        assert "is not an integer (ASCII digits)" in error_line(result, 2)
        assert os.listdir(".") == []


def test_non_ascii_digits_in_a_topology(tmp_path, tiny_checkpoint_dir, error_line):
    config = tmp_path / "topo.yaml"
    config.write_text(Path(TINY).read_text().replace('"3:5"', '"3:\u2075"'))
    result = invoke(
        "export",
        "--model",
        tiny_checkpoint_dir,
        "--config",
        config,
        "--embedding",
        tmp_path / "e.npy",
    )
    assert "layer range '3:\u2075' is not START:END" in error_line(result, 1)


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        ('["0:3", "4:6"]', "layers 3:4 are in no shard (gap between shard 1 (0:3) and shard 2"),
        ('["0:3", "2:6"]', "shard 1 (0:3) and shard 2 (2:6) overlap at layers 2:3"),
        ('["0:3", "3:5"]', "layers 5:6 are in no shard"),
    ],
)
def test_a_topology_that_does_not_chain_is_refused_before_anything_is_made(
    tmp_path, tiny_checkpoint_dir, topology, message, error_line
):
    config = tmp_path / "topo.yaml"
    text = Path(TINY).read_text()
    assert '["0:3", "3:5", "5:6"]' in text
    config.write_text(text.replace('["0:3", "3:5", "5:6"]', topology))
    for model in ([], ["--model", tiny_checkpoint_dir]):  # random checkpoint, or given
        out = tmp_path / f"out{len(model)}"
        result = invoke("build", "--config", config, "--out", out, *model)
        assert message in error_line(result, 1)
        assert not out.exists()


def test_a_truncated_golden_cache_is_a_miss(
    tiny_shards, tiny_checkpoint_dir, tiny_config, tmp_path
):
    from anechain.config import LayerRange

    package = tiny_shards[LayerRange(0, 3)]
    cache = tmp_path / "cache"
    args = [
        "validate", "shard", package, "--model", tiny_checkpoint_dir, "--config", TINY,
        "--backend", "mil", "--steps", "2", "--cache-dir", cache,
        "--report", tmp_path / "r.json",
    ]  # fmt: skip
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    # Every reference folder's layer-1 output file, cut in half.
    cut = sorted((cache / "golden").glob("*/h002.npy"))
    assert cut
    whole = [np.load(f) for f in cut]
    for f in cut:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "Traceback" not in again.output
    for f, w in zip(cut, whole, strict=True):
        np.testing.assert_array_equal(np.load(f), w)  # recomputed, rewritten


def test_a_foreign_golden_cache_is_a_miss(tiny_checkpoint, tmp_path):
    from anechain.golden import _cache_path, reference_boundaries

    tokens = [1, 2, 3]
    good = reference_boundaries(tiny_checkpoint, tokens, 2, cache_dir=tmp_path)
    good = np.asarray(good)
    path = _cache_path(tmp_path, tiny_checkpoint, tokens) / "h001.npy"
    np.save(path, np.zeros((3, 7), np.float32))  # wrong hidden size
    np.testing.assert_array_equal(reference_boundaries(tiny_checkpoint, tokens, 2, tmp_path), good)
    assert np.load(path).shape == (3, 64)  # rewritten


@pytest.fixture
def resigned_build(tiny_build, tmp_path):
    """A copy of the tiny build whose embedding can be replaced and its manifest re-signed."""
    result, _ = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)

    def replace(table: np.ndarray) -> Path:
        with open(out / "embedding.npy", "wb") as f:
            np.save(f, table, allow_pickle=table.dtype == object)
        manifest = out / "manifest.json"
        data = json.loads(manifest.read_text())
        data["embedding"]["file"]["sha256"] = sha256_tree(out / "embedding.npy")
        data["embedding"]["file"]["size_bytes"] = (out / "embedding.npy").stat().st_size
        manifest.write_text(json.dumps(data, indent=2))
        return manifest

    return replace


def _plain_rope(d: dict, scale: float = 1.0, scaling: float = 1.0) -> None:
    """Tables of RoPE without long-context scaling (as transformers computes them, float32)."""
    rot, theta = d["rope"]["rotary_dim"], d["rope"]["rope_theta"]
    exponent = np.arange(0, rot, 2, dtype=np.int64).astype(np.float32) / rot
    inv = (1.0 / np.float32(theta) ** exponent * scale).astype(np.float32).tolist()
    d["rope"]["precomputed"].update(
        inv_freq_short=inv, inv_freq_long=inv, attention_scaling=scaling
    )


def _set(path: str, value):
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        d[last] = value(d[last]) if callable(value) else value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("head.chunk_rows", 100), "chunk_rows 100 does not split vocab_size 512"),
        (_set("rope.rope_theta", 500.0), "rope.rope_theta is 500.0 but the architecture's"),
        (_set("rope.precomputed.inv_freq_short", lambda v: v[:-1]), "5 short and 6 long"),
        (_set("rope.precomputed.attention_scaling", -1.3), "attention_scaling is not a positive"),
        (_set("rope.precomputed.inv_freq_long", lambda v: [0.0] * len(v)), "frequencies <= 0"),
        (
            _set("rope.precomputed.original_max_position_embeddings", 4096),
            "original_max_position_embeddings 4096 differs",
        ),
        (lambda d: _plain_rope(d, scale=1.01), "not those of rope_theta 10000"),
        (lambda d: _plain_rope(d, scaling=1.3), "attention_scaling is 1.3 without long"),
        (_set("embedding.shape", [512, 32]), "embedding.shape [512, 32] is not [512, 64]"),
    ],
)
def test_verify_refuses_host_data_that_disagrees_with_the_model(
    tiny_build, tmp_path, edit, message, error_line
):
    """Every file still matches its sha256; what the host reads from the manifest itself
    (RoPE tables, the head's chunk rows) would make `generate` silently wrong."""
    result, _ = tiny_build
    out = tmp_path / "b"
    shutil.copytree(result.out_dir, out)
    manifest = out / "manifest.json"
    data = json.loads(manifest.read_text())
    plain = json.loads(json.dumps(data))
    _plain_rope(plain)  # correct tables of an unscaled model verify
    manifest.write_text(json.dumps(plain))
    assert invoke("manifest", "verify", manifest).exit_code == 0
    edit(data)
    manifest.write_text(json.dumps(data))
    assert message in error_line(invoke("manifest", "verify", manifest), 1)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            np.zeros((511, 64), np.float16),
            "is float16 (511, 64); the model needs float16 (512, 64)",
        ),
        (np.zeros((512, 64), np.float32), "is float32 (512, 64)"),
        (np.array([{"a": 1}] * 3, dtype=object), "holds Python objects, not numbers"),
    ],
)
def test_generate_refuses_a_resigned_embedding(resigned_build, table, message, error_line):
    manifest = resigned_build(table)
    result = invoke("generate", "--manifest", manifest, "--prompt-ids", "1,2", "--backend", "mil")
    assert message in error_line(result, 1)


# --- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--context", "8192", "is beyond"),  # the checkpoint's max_position_embeddings
        ("--prefill-tokens", "100", "must be in 0..64 (the context), got 100"),  # the settings'
    ],
)
def test_export_option_values_beyond_their_limits_are_usage_errors(
    tiny_checkpoint_dir, tmp_path, option, value, message, error_line
):
    dest = tmp_path / "a.mlpackage"
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", TINY,
        "--layer-spec", f"0:1:{dest}", option, value,
    )  # fmt: skip
    line = error_line(result, 2)
    assert option in line and message in line
    assert option != "--context" or "max_position_embeddings (4096)" in line
    assert not dest.exists()


def test_a_kv_cache_that_cannot_fit_is_refused_before_any_work(
    tiny_checkpoint_dir, tmp_path, monkeypatch, error_line
):
    import anechain.checkpoint as checkpoint_module

    reads = []
    real = checkpoint_module.Checkpoint.read_tensors
    monkeypatch.setattr(
        checkpoint_module.Checkpoint,
        "read_tensors",
        lambda self, names: reads.append(names) or real(self, names),
    )
    # 2 states x 1 layer x 2 KV heads x 4096 positions x 16 x 2 bytes = 524 KB needed.
    monkeypatch.setattr(checkpoint_module, "available_memory", lambda: 500_000)
    dest = tmp_path / "a.mlpackage"
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", TINY,
        "--layer-spec", f"0:1:{dest}", "--context", "4096",
    )  # fmt: skip
    message = error_line(result, 1)
    assert "context 4096 needs 524.3 KB of KV cache for 1 layers; 500.0 KB" in message
    assert reads == [] and not dest.exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 5, "hidden_size 64 is not a multiple of num_attention_heads 5"),
        ("num_hidden_layers", "6", "num_hidden_layers must be a positive integer, got '6'"),
        ("vocab_size", True, "vocab_size must be a positive integer, got True"),
        ("intermediate_size", 0, "intermediate_size must be a positive integer, got 0"),
        (
            "num_key_value_heads",
            3,
            "num_attention_heads 4 is not a multiple of num_key_value_heads",
        ),
        ("hidden_size", None, "hidden_size must be a positive integer, got None"),
    ],
)
def test_architecture_errors_in_config_json_are_one_line(
    ckpt, tmp_path, field, value, message, error_line
):
    config = json.loads((ckpt / "config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    result = invoke("export", "--model", ckpt, "--embedding", tmp_path / "e.npy")
    assert message in error_line(result, 1)


def test_transformers_config_errors_are_joined_into_one_line(ckpt, tmp_path, error_line):
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_scaling"]["short_factor"] = [1.0]  # transformers' validator: multi-line
    (ckpt / "config.json").write_text(json.dumps(config))
    result = invoke("export", "--model", ckpt, "--embedding", tmp_path / "e.npy")
    assert "short_factor" in error_line(result, 1)


# --- output that is what it claims ----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--min-cosine", "2", "min_cosine must be in -1..1 (a cosine), got 2"),
        ("--min-cosine", "-5", "min_cosine must be in -1..1 (a cosine), got -5"),
        ("--min-delta-cosine", "1.5", "min_delta_cosine must be in -1..1"),
        ("--max-rel-rmse", "-1", "max_rel_rmse must be >= 0, got -1"),
        ("--steps", "0", "0 is not in the range x>=1"),
        ("--max-rel-abs", "nan", "is not a finite number"),
        ("--min-cosine", "inf", "is not a finite number"),
        ("--max-rel-rmse", "1e999", "is not a finite number"),
        ("--max-rel-abs", "\u0661", "is not a finite number"),
    ],
)
def test_gate_bounds_outside_their_measure_are_usage_errors(
    tiny_shards, tiny_checkpoint_dir, tmp_path, option, value, message, error_line
):
    """A cosine bound of 2 would reject every shard, one of -5 pass every one."""
    package = next(iter(tiny_shards.values()))
    report = tmp_path / "r.json"
    result = invoke(
        "validate", "shard", package, "--model", tiny_checkpoint_dir, "--backend", "mil",
        "--report", report, option, value,
    )  # fmt: skip
    line = error_line(result, 2)
    assert message in line and option in line
    assert not report.exists()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("min_cosine: 0.998", "min_cosine: 1.2", "min_cosine must be in -1..1"),
        ("max_kl_worst: 0.5", "max_kl_worst: -0.1", "max_kl_worst must be >= 0"),
        ("min_top1_agreement: 0.9", "min_top1_agreement: 90", "must be in 0..1 (a share)"),
    ],
)
def test_gate_bounds_outside_their_measure_in_a_config_are_refused(
    tmp_path, tiny_checkpoint_dir, old, new, message, error_line
):
    config = tmp_path / "bad.yaml"
    text = Path(TINY).read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    result = invoke(
        "export", "--model", tiny_checkpoint_dir, "--config", config,
        "--embedding", tmp_path / "e.npy",
    )  # fmt: skip
    assert message in error_line(result, 1)


@pytest.mark.parametrize("value", [".nan", ".inf", '"1e999"', '"\u0661e-5"'])
def test_non_finite_gate_bounds_in_a_config_are_refused(
    tmp_path, tiny_checkpoint_dir, value, error_line
):
    config = tmp_path / "nan.yaml"
    text = Path(TINY).read_text()
    assert "max_rel_abs: 0.5" in text
    config.write_text(text.replace("max_rel_abs: 0.5", f"max_rel_abs: {value}"))
    result = invoke(
        "export",
        "--model",
        tiny_checkpoint_dir,
        "--config",
        config,
        "--embedding",
        tmp_path / "e.npy",
    )
    assert "validation.gates.max_rel_abs must be a finite number" in error_line(result, 1)


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_report_with_non_finite_metrics_is_strict_json(
    overflow_checkpoint, tmp_path, tiny_config
):
    """A shard whose output overflows: its report's NaN/Inf metrics are null, not bare NaN."""
    dest = tmp_path / "layers_3_5.mlpackage"
    ckpt = overflow_checkpoint.path
    exported = invoke("export", "--model", ckpt, "--config", TINY, "--layer-spec", f"3:5:{dest}")
    assert exported.exit_code == 0, exported.output
    report = tmp_path / "r.json"
    result = invoke(
        "validate", "shard", dest, "--model", ckpt, "--config", TINY, "--backend", "mil",
        "--steps", "2", "--report", report, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 1 and "verdict: FAIL" in result.stdout
    data = _strict(report.read_text())
    assert data["golden"]["metrics"]["nonfinite"] > 0  # type: ignore[index]
    assert None in [g["value"] for g in data["gates"]]  # type: ignore[index]


def test_json_writer_turns_non_finite_values_into_null(tmp_path):
    from anechain.jsonio import atomic_write_json

    out = tmp_path / "x.json"
    atomic_write_json(out, {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": -np.inf}})
    assert _strict(out.read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# --- exit codes -----------------------------------------------------------------------------


@pytest.mark.skipif(
    __import__("anechain.residency").residency.live_plan_available(),
    reason="a live compute plan exists here, so --save-plan has something to save",
)
def test_save_plan_without_a_live_plan_is_a_usage_error(
    tiny_shards, tiny_checkpoint_dir, tmp_path, error_line
):
    package = next(iter(tiny_shards.values()))
    plan = tmp_path / "plan.json"
    result = invoke(
        "validate", "shard", package, "--model", tiny_checkpoint_dir, "--backend", "mil",
        "--save-plan", plan, "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert "--save-plan" in error_line(result, 2) and "none to save" in result.output
    assert not plan.exists() and not (tmp_path / "r.json").exists()
    result = invoke("residency", package, "--save-plan", plan)
    assert "none to save" in error_line(result, 2)
    assert not plan.exists()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("", "no token ids given"),
        (" ", "no token ids given"),
        (",", "is not a comma-separated list"),
        ("1,\u00b2", "is not a comma-separated list"),
        ("1,\u0662", "is not a comma-separated list"),
        ("1,512", "token id 512 is outside the model's vocabulary (0..511)"),
        ("-1", "is not a comma-separated list"),
    ],
)
def test_bad_prompt_ids_are_usage_errors(tiny_build, ids, message, error_line):
    result, _ = tiny_build
    run = invoke("generate", "--manifest", result.manifest, "--prompt-ids", ids, "--backend", "mil")
    assert message in error_line(run, 2)


# --- siblings in other commands -------------------------------------------------------------


@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-5"])
def test_plan_size_budget_must_be_a_finite_positive_number(
    tiny_checkpoint_dir, tmp_path, budget, error_line
):
    result = invoke(
        "plan", "--model", tiny_checkpoint_dir, "--size-budget", budget,
        "--report-dir", tmp_path / "plan",
    )  # fmt: skip
    assert "--size-budget" in error_line(result, 2)
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**63), "99999999999999999999999"])
def test_random_checkpoint_seed_out_of_range(tmp_path, seed, error_line):
    result = invoke("random-checkpoint", tmp_path / "c", "--seed", seed)
    assert "--seed" in error_line(result, 2)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  seed: 0", f"  seed: {2**64}", "build.seed must be in 0.."),
        ("  calibration_seed: 0", "  calibration_seed: -3", "validation.calibration_seed"),
    ],
)
def test_seeds_in_a_config_out_of_range(tmp_path, old, new, message, error_line):
    config = tmp_path / "c.yaml"
    config.write_text(Path(TINY).read_text().replace(old, new))
    result = invoke("build", "--config", config, "--out", tmp_path / "out")
    assert message in error_line(result, 1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["manifest", "show"], ["manifest", "verify"]])
def test_json_nested_past_the_recursion_limit(tmp_path, command, error_line):
    deep = tmp_path / "m.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    result = invoke(*command, deep)
    assert "nested too deeply" in error_line(result, 1)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", b"[1, 2]", "config.json is not a JSON object"),
        ("config.json", b"[" * 100_000, "config.json is not valid JSON (nested too deeply"),
        ("model.safetensors.index.json", b'{"weight_map": [1]}', "not a valid safetensors index"),
        ("model.safetensors.index.json", b"\xff\xfe", "not a valid safetensors index"),
    ],
)
def test_malformed_checkpoint_files(ckpt, tmp_path, file, content, message, error_line):
    (ckpt / file).write_bytes(content)
    result = invoke("export", "--model", ckpt, "--embedding", tmp_path / "e.npy")
    assert message in error_line(result, 1)
    assert not (tmp_path / "e.npy").exists()


def test_malformed_safetensors_header(ckpt, tmp_path, error_line):
    import struct

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"]["model.norm.weight"]
    header = b'{"model.norm.weight": {"dtype": "BF16", "shape": "x", "data_offsets": [0, 2]}}'
    file.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    result = invoke("export", "--model", ckpt, "--embedding", tmp_path / "e.npy")
    assert "malformed header entry for model.norm.weight" in error_line(result, 1)


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        # The right shape and dtype over too few bytes: safetensors would read past them.
        (lambda b, e: [b, b + 2], "model.norm.weight holds 2 bytes, not the 128 its shape needs"),
        (lambda b, e: [e, b], "model.norm.weight runs past its end"),  # end before begin
        (lambda b, e: [b, e + 10**9], "model.norm.weight runs past its end"),
    ],
)
def test_safetensors_offsets_that_do_not_hold_the_tensor(
    ckpt, tmp_path, offsets, message, error_line
):
    import struct

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"]["model.norm.weight"]
    raw = file.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    entry = header["model.norm.weight"]
    entry["data_offsets"] = offsets(*entry["data_offsets"])
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    result = invoke("export", "--model", ckpt, "--config", TINY, "--head", tmp_path / "h.mlpackage")
    assert message in error_line(result, 1)
    assert not (tmp_path / "h.mlpackage").exists()


def test_running_out_of_memory_is_one_line(
    tiny_shards, tiny_checkpoint_dir, tmp_path, monkeypatch, error_line
):
    import anechain.runners.mil as mil

    def no_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(mil.MILRunner, "reset", no_memory)
    package = next(iter(tiny_shards.values()))
    result = invoke(
        "validate", "shard", package, "--model", tiny_checkpoint_dir, "--config", TINY,
        "--backend", "mil", "--steps", "2", "--report", tmp_path / "oom.json",
    )  # fmt: skip
    assert "out of memory" in error_line(result, 1)
    assert not (tmp_path / "oom.json").exists()


@pytest.mark.parametrize(
    ("option", "dest", "name"),
    [
        ("--head", "h.mlpackage", "model.norm.weight"),
        ("--embedding", "e.npy", "model.embed_tokens.weight"),
    ],
)
def test_head_and_embedding_exports_name_a_non_finite_tensor(
    ckpt, tmp_path, option, dest, name, error_line
):
    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = float("-inf")
        return t

    rewrite_tensor(ckpt, name, poison)
    result = invoke("export", "--model", ckpt, "--config", TINY, option, tmp_path / dest)
    assert f"tensor {name} holds non-finite values (1 Inf)" in error_line(result, 1)
    assert not (tmp_path / dest).exists()


def test_validating_against_a_corrupt_checkpoint_is_one_line(
    ckpt, tiny_shards, tmp_path, monkeypatch, error_line
):
    """A package whose recorded fingerprints match a checkpoint with a transposed tensor (as
    an older anechain exported it): validation names the tensor (it used to end in
    transformers' load_state_dict traceback)."""
    import anechain.validate as validate_module
    from anechain.config import LayerRange

    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_tensor(ckpt, name, lambda t: t.T)
    monkeypatch.setattr(validate_module, "check_package_matches", lambda *a: None)
    report = tmp_path / "r.json"
    result = invoke(
        "validate", "shard", tiny_shards[LayerRange(0, 3)], "--model", ckpt, "--config", TINY,
        "--backend", "mil", "--steps", "2", "--report", report, "--cache-dir", tmp_path / "c",
    )  # fmt: skip
    message = error_line(result, 1)
    assert name in message and "[128, 64], expected [64, 128]" in message
    assert not report.exists()


def test_capture_seed_out_of_range_is_a_usage_error(tiny_build, tiny_checkpoint_dir, error_line):
    result, _ = tiny_build
    run = invoke(
        "capture", result.out_dir / "layers_0_3.mlpackage", "--model", tiny_checkpoint_dir,
        "--out", result.out_dir / "captures", "--random-preset", "tiny",
        "--random-seed", str(2**64),
    )  # fmt: skip
    assert "--random-seed" in error_line(run, 2)
    assert not (result.out_dir / "captures").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--model", "CKPT", "--config", "/dev/zero", "--embedding", "e.npy"],
        ["manifest", "show", "/dev/zero"],
        ["manifest", "verify", "/dev/urandom"],
        ["generate", "--manifest", "/dev/zero", "--prompt-ids", "1"],
        ["residency", "PKG", "--compute-plan", "/dev/zero"],
    ],
)
def test_a_device_given_as_an_input_file_is_refused(
    tiny_checkpoint_dir, tiny_shards, tmp_path, args, error_line
):
    package = str(next(iter(tiny_shards.values())))
    args = [{"CKPT": str(tiny_checkpoint_dir), "PKG": package}.get(a, a) for a in args]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        result = CliRunner().invoke(cli, args)  # would read forever
        assert "is a device or socket, not a file" in error_line(result, 2)
        assert os.listdir(".") == []


@pytest.mark.skipif(macos_at_least((15,)), reason="off-macOS behaviour")
@pytest.mark.parametrize("command", ["build", "plan"])
def test_the_coreml_backend_off_macos_is_refused_before_any_export(
    tiny_checkpoint_dir, tmp_path, command, error_line
):
    """On a real checkpoint the exports before the first validation take hours."""
    out = tmp_path / "out"
    args = {
        "build": ["build", "--config", TINY, "--out", out],
        "plan": ["plan", "--model", tiny_checkpoint_dir, "--config", TINY,
                 "--max-layers-per-shard", "3", "--report-dir", out, "-o", tmp_path / "m.json"],
    }[command]  # fmt: skip
    line = error_line(invoke(*args, "--backend", "coreml"), 1)
    assert "the coreml backend (Core ML stateful predict) needs macOS 15+" in line
    assert not any(out.rglob("*.mlpackage")) and not (tmp_path / "m.json").exists()


def test_too_few_steps_for_a_prefill_shard_is_refused_before_any_work(
    tiny_build, tiny_checkpoint_dir, tmp_path, error_line
):
    """Prefill is checked on about 3/4 of the steps, decode on the rest: one step cannot be
    split, and a full-size validation should not run its reference and decode windows first."""
    package = tiny_build[0].out_dir / "layers_5_6.mlpackage"  # decode + prefill (T=4)
    report = tmp_path / "r.json"
    result = invoke(
        "validate", "shard", package, "--model", tiny_checkpoint_dir, "--backend", "mil",
        "--config", TINY, "--report", report, "--steps", "1", "--cache-dir", tmp_path / "c",
    )  # fmt: skip
    assert "validating prefill needs at least 2 steps, got 1" in error_line(result, 1)
    assert "loading" not in result.stderr and not report.exists()
    assert not any((tmp_path / "c").rglob("*.npy"))  # no reference was computed
