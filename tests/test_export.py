"""Exported packages, loaded back from disk: ops, INT8 weights, states, metadata, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anechain.config import LayerRange
from anechain.contract import read_package_metadata
from anechain.errors import ExportError
from anechain.export import LayerSpec, export_shard, program_op_counts
from anechain.package import load_program


@pytest.mark.parametrize("layers", [LayerRange(0, 3), LayerRange(5, 6)])
def test_package_structure(tiny_shards, tiny_checkpoint, tiny_config, layers):
    path = tiny_shards[layers]
    spec, prog = load_program(path)
    counts = program_op_counts(prog)
    n = layers.num_layers
    assert counts["conv"] == 4 * n
    assert counts["linear"] == 0
    # Every matmul multiplies activations by the KV state, never by a weight.
    main = prog.functions["main"]
    for op in main.operations:
        if op.op_type == "matmul":
            assert op.x.op is None or op.x.op.op_type != "const"
            assert op.y.op is None or not op.y.op.op_type.startswith(("const", "constexpr"))

    # INT8 for every projection, per output channel; norm gains stay fp16.
    quant = [op for op in main.operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(quant) == 4 * n
    for op in quant:
        assert op.data.val.dtype == np.int8
        out_channels = op.data.shape[0]
        assert op.scale.shape[0] == out_channels and np.prod(op.scale.shape) == out_channels
    convs = [op for op in main.operations if op.op_type == "conv"]
    assert all(op.weight.op.op_type == "constexpr_blockwise_shift_scale" for op in convs)
    gains = [
        op for op in main.operations if op.op_type == "const" and "layernorm_weight" in op.name
    ]
    assert len(gains) == 2 * n and all(op.val.val.dtype == np.float16 for op in gains)

    # States: one key and one value state covering the shard's layers.
    arch = tiny_checkpoint.architecture
    want = (n, arch.num_key_value_heads, tiny_config.export.context_length, arch.head_dim)
    states = {s.name: tuple(s.type.stateType.arrayType.shape) for s in spec.description.state}
    assert states == {"key_cache": want, "value_cache": want}
    inputs = {i.name for i in spec.description.input}
    assert inputs == {"hidden_states", "position", "cos", "sin", "attention_mask"}
    assert [o.name for o in spec.description.output] == ["output_hidden_states"]
    assert spec.specificationVersion >= 9  # iOS18 / macOS15

    meta = read_package_metadata(path)
    assert meta.layers == layers
    assert meta.num_hidden_layers == arch.num_hidden_layers
    assert meta.checkpoint_fingerprint == tiny_checkpoint.fingerprint
    assert meta.weights_fingerprint == tiny_checkpoint.weights_fingerprint(
        tiny_checkpoint.layer_tensor_names(layers)
    )
    assert meta.quantization == "int8"
    assert meta.context_length == tiny_config.export.context_length
    assert meta.contract.states[0].shape == want
    assert meta.architecture == arch


def test_all_shards_share_one_contract(tiny_shards):
    keys = [read_package_metadata(p).contract.chain_key() for p in tiny_shards.values()]
    assert all(k == keys[0] for k in keys)


def test_export_reads_only_its_layers(tiny_checkpoint, tiny_config, tmp_path, monkeypatch):
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    export_shard(
        tiny_checkpoint, LayerSpec(LayerRange(3, 5), tmp_path / "s.mlpackage"), tiny_config.export
    )
    assert read and all(n.startswith(("model.layers.3.", "model.layers.4.")) for n in read)
    assert len(read) == 12


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tiny_config, tmp_path, monkeypatch):
    import coremltools as ct

    dest = tmp_path / "out" / "s.mlpackage"

    def write_half_then_die(proto_spec, weights_dir=None, package_path=None):
        # coremltools' package writer, interrupted half-way through the package.
        Path(package_path).mkdir(parents=True)
        (Path(package_path) / "Manifest.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ct.models.model, "_create_mlpackage", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_shard(tiny_checkpoint, LayerSpec(LayerRange(5, 6), dest), tiny_config.export)
    assert not dest.exists()
    assert not dest.parent.exists()  # not even the folder the export created for it


def test_existing_output_is_refused_unless_overwrite(tiny_checkpoint, tiny_config, tmp_path):
    dest = tmp_path / "s.mlpackage"
    dest.mkdir()
    (dest / "marker").write_text("old")
    spec = LayerSpec(LayerRange(5, 6), dest)
    with pytest.raises(ExportError, match="already exists"):
        export_shard(tiny_checkpoint, spec, tiny_config.export)
    export_shard(tiny_checkpoint, spec, tiny_config.export, overwrite=True)
    assert not (dest / "marker").exists()
    assert read_package_metadata(dest).layers == LayerRange(5, 6)


def test_fp16_export_has_no_int8(tiny_checkpoint, tiny_config, tmp_path):
    import dataclasses

    settings = dataclasses.replace(tiny_config.export, quantization="none")
    result = export_shard(
        tiny_checkpoint, LayerSpec(LayerRange(0, 1), tmp_path / "f.mlpackage"), settings
    )
    assert result.op_counts["conv"] == 4
    assert result.quantized_weights == 0
    assert read_package_metadata(result.path).quantization == "none"


@pytest.mark.slow
def test_full_size_one_layer_package_size(tmp_path):
    """A full-size Phi-4-mini layer in INT8 is 100.8 MB (+- 0.5 %)."""
    import dataclasses

    from anechain.checkpoint import Checkpoint, write_random_checkpoint
    from anechain.config import load_preset

    config = load_preset("phi-4-mini")
    arch = dataclasses.replace(config.architecture, num_hidden_layers=1, vocab_size=1024)
    ckpt = Checkpoint(write_random_checkpoint(tmp_path / "ckpt", arch))
    result = export_shard(
        ckpt, LayerSpec(LayerRange(0, 1), tmp_path / "l.mlpackage"), config.export
    )
    assert abs(result.size_bytes - 100.8e6) / 100.8e6 < 0.005
