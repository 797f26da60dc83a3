"""Next-token verdicts (nexttoken.py): shard outputs finished by the fp32 reference, against it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from anechain.config import LayerRange
from anechain.contract import read_package_metadata
from anechain.errors import ReportError
from anechain.golden import calibration_tokens, reference
from anechain.head import head_tensor_names
from anechain.nexttoken import (
    WindowOutputs,
    finish_reference,
    next_token_verdict,
    position_records,
    substitute,
    substituted_records,
    summarize,
    window_records,
)
from anechain.report_read import parse_report
from anechain.runners import open_runner
from anechain.validate import (
    LONG_NEXT_TOKEN_ROWS,
    next_token_golden,
    run_golden,
    validate_shard,
)

NEXT_TOKEN = {"next_token_kl_mean", "next_token_kl_worst", "bulk_cosine", "bulk_rmse"}


@pytest.fixture
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "golden-cache"


def test_the_reference_substituted_for_itself_is_the_reference(tiny_checkpoint, tiny_config, cache):
    """Finishing the reference's own hidden states at any layer gives its final ones (KL 0,
    no flip); a perturbed row does not."""
    n = tiny_checkpoint.architecture.num_hidden_layers
    tokens = calibration_tokens(tiny_config.validation, tiny_checkpoint, 64)
    ref = reference(tiny_checkpoint, tokens, n, cache)
    positions = [0, 1, 5, 17, 62, 63]
    for end in range(n + 1):
        final = finish_reference(
            tiny_checkpoint, ref, end, positions, ref.boundaries[end][positions]
        )
        np.testing.assert_allclose(final, ref.boundaries[n][positions], rtol=1e-4, atol=1e-3)
    same = WindowOutputs("early", tuple(positions), ref.boundaries[1][positions])
    m = next_token_verdict(tiny_checkpoint, ref, 1, [same], 1 / n)["metrics"]
    assert m["kl_worst"] < 1e-8 and m["top1_agreement"] == 1.0 and m["flips"] == []
    noisy = ref.boundaries[1][positions] + np.random.default_rng(0).normal(
        0, 3.0, ref.boundaries[1][positions].shape
    ).astype(np.float32)
    bad = WindowOutputs("early", tuple(positions), noisy)
    assert next_token_verdict(tiny_checkpoint, ref, 1, [bad], 1 / n)["metrics"]["kl_worst"] > 0.1


def test_a_non_finite_row_spoils_only_its_own_position(tiny_checkpoint, tiny_config, cache):
    """Rows are finished independently (each sees the reference's keys and its own): a shard
    output with a NaN at one position gives that position no KL (a failing record) and leaves
    every other position's record what it is without it."""
    n = tiny_checkpoint.architecture.num_hidden_layers
    tokens = calibration_tokens(tiny_config.validation, tiny_checkpoint, 64)
    ref = reference(tiny_checkpoint, tokens, n, cache)
    positions = (0, 1, 5, 17, 62, 63)
    hidden = ref.boundaries[1][list(positions)].copy()
    hidden[2, 3] = np.nan
    final = finish_reference(tiny_checkpoint, ref, 1, positions, hidden)
    assert np.isnan(final[2]).all()
    keep = [0, 1, 3, 4, 5]
    alone = finish_reference(tiny_checkpoint, ref, 1, [positions[k] for k in keep], hidden[keep])
    np.testing.assert_allclose(final[keep], alone, rtol=1e-5, atol=1e-5)
    records = window_records(tiny_checkpoint, ref, 1, [WindowOutputs("early", positions, hidden)])
    assert [r["kl"] is None for r in records] == [False, False, True, False, False, False]
    assert summarize(records)["kl_worst"] is None  # the verdict still fails


def test_summary_lists_flips_with_the_reference_margin():
    records = [
        {"window": "early", "position": 0, "kl": 0.01, "expected": 3, "token": 3, "margin": 4.0},
        {"window": "late", "position": 9, "kl": 0.03, "expected": 3, "token": 8, "margin": 0.2},
    ]
    m = summarize(records, share=0.5)
    assert m["kl_mean"] == pytest.approx(0.02) and m["kl_worst"] == 0.03
    assert m["share"] == 0.5
    assert m["top1_agreement"] == 0.5
    assert m["flips"] == [
        {"window": "late", "position": 9, "expected": 3, "token": 8, "margin": 0.2}
    ]
    # A non-finite shard logit (KL None) leaves no figure to pass a gate with.
    assert summarize([{**records[0], "kl": None}])["kl_mean"] is None


@pytest.mark.parametrize("layers", [LayerRange(0, 3), LayerRange(5, 6)])
def test_correct_shard_passes_the_next_token_gates(
    tiny_shards, tiny_checkpoint, tiny_config, cache, layers
):
    report = validate_shard(
        tiny_shards[layers], tiny_checkpoint, tiny_config.validation, backend="mil", cache_dir=cache
    )
    gates = {g.name: g for g in report.gates}
    assert NEXT_TOKEN <= set(gates) and all(gates[n].passed for n in NEXT_TOKEN)
    nt = report.golden.next_token
    n = tiny_checkpoint.architecture.num_hidden_layers
    assert nt["metrics"]["share"] == layers.num_layers / n
    # Every window, the long one included (all its positions here: 60 + 4 < 64 rows).
    assert set(nt["windows"]) == {"early", "late", "long"}
    long = report.long["prompt"] + report.long["decode_steps"]
    assert long <= LONG_NEXT_TOKEN_ROWS
    assert nt["metrics"]["positions"] == tiny_config.validation.steps + 4 + long
    assert report.verdict == "pass"
    # Written and read back: the figures are recomputed and agree.
    back = parse_report(json.loads(json.dumps(report.to_dict())), "r")
    assert back.golden.next_token == nt


def test_a_correct_single_layer_shard_passes(tiny_checkpoint, tiny_config, cache, tmp_path):
    """Each shard is held to the whole-model budget, not a layer share of it (DESIGN.md,
    "Next-token verdicts": on the earlier random model layer 0 alone moved next tokens more
    than all six layers together)."""
    import dataclasses

    from anechain.export import LayerSpec, export_shard

    pkg = tmp_path / "layers_0_1.mlpackage"
    export = dataclasses.replace(tiny_config.export, prefill_tokens=0)
    export_shard(tiny_checkpoint, LayerSpec(LayerRange(0, 1), pkg), export)
    report = validate_shard(pkg, tiny_checkpoint, tiny_config.validation, "mil", cache_dir=cache)
    assert report.verdict == "pass", report.failures()
    assert report.golden.next_token["metrics"]["share"] == 1 / 6


class _TokenBias:
    """A seeded bug: the shard's output pushed along one token's LM-head row (through the
    final norm's gain) by `eps` of the step's typical element: the hidden state barely
    moves, that token's logit rises everywhere."""

    def __init__(self, inner: Any, checkpoint: Any, eps: float, token: int = 5) -> None:
        norm, head = head_tensor_names(checkpoint)
        t = checkpoint.read_tensors([norm, head])
        u = t[head][token].float().numpy() * t[norm].float().numpy()
        self.inner, self.eps, self.u = inner, eps, u / np.linalg.norm(u)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.step(inputs)
        h = out["output_hidden_states"].astype(np.float32)
        typical = np.sqrt(np.median(h**2) * h.size)  # the bulk's scale, not the massive channels'
        bent = h + self.eps * typical * self.u.reshape(h.shape)
        return {**out, "output_hidden_states": bent.astype(np.float16)}


def test_a_bug_that_barely_moves_the_hidden_state_but_flips_tokens_is_caught_by_kl(
    tiny_shards, tiny_checkpoint, tiny_config, cache
):
    pkg = tiny_shards[LayerRange(5, 6)]
    meta = read_package_metadata(pkg)
    settings = tiny_config.validation
    runner = _TokenBias(open_runner("mil", pkg), tiny_checkpoint, eps=0.1)
    outputs: list[Any] = []
    golden, gates = run_golden(runner, meta, tiny_checkpoint, settings, cache, outputs=outputs)
    golden, more = next_token_golden(golden, outputs, meta, tiny_checkpoint, settings, cache)
    failed = {g.name for g in (*gates, *more) if not g.passed}
    # Every hidden-state gate (and the bulk's) passes: cosine 0.9995.
    assert golden.metrics["cosine"] > 0.999
    assert failed == {"next_token_kl_mean", "next_token_kl_worst"}
    assert golden.next_token["metrics"]["top1_agreement"] < 1.0


@pytest.fixture
def written(tiny_shards, tiny_checkpoint, tiny_config, cache) -> dict[str, Any]:
    report = validate_shard(
        tiny_shards[LayerRange(3, 5)],
        tiny_checkpoint,
        tiny_config.validation,
        "mil",
        cache_dir=cache,
    )
    return json.loads(json.dumps(report.to_dict()))


def _gate(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in data["gates"] if g["name"] == name)


def test_reader_refuses_forged_kl(written):
    parse_report(written, "r")  # as written: accepted
    forged = json.loads(json.dumps(written))
    m = forged["golden"]["next_token"]["metrics"]
    m["kl_mean"] = 1e-6  # and the gate's value agrees with it
    _gate(forged, "next_token_kl_mean")["value"] = 1e-6
    with pytest.raises(ReportError, match="next_token.metrics differs from its per-position"):
        parse_report(forged, "r")


def test_reader_refuses_a_hidden_flip_or_a_forged_share(written):
    hidden = json.loads(json.dumps(written))
    record = hidden["golden"]["next_token"]["per_position"][0]
    record["token"] = record["expected"] + 1  # a flip the figures do not list
    with pytest.raises(ReportError, match="differs from its per-position records"):
        parse_report(hidden, "r")
    share = json.loads(json.dumps(written))
    share["golden"]["next_token"]["metrics"]["share"] = 1.0  # not the shard's 2 of 6 layers
    with pytest.raises(ReportError, match="differs from its per-position records"):
        parse_report(share, "r")
    negative = json.loads(json.dumps(written))
    negative["golden"]["next_token"]["per_position"][0]["kl"] = -1.0
    with pytest.raises(ReportError, match="not one position"):
        parse_report(negative, "r")
    gone = json.loads(json.dumps(written))
    del gone["golden"]["next_token"]
    with pytest.raises(ReportError, match="golden.next_token"):
        parse_report(gone, "r")


def test_long_window_sample_keeps_its_decode_steps_and_spreads_the_prompt():
    from anechain.validate_long import WindowOutputs as Long

    n, c = 2048, 3
    rows = np.arange(n * c, dtype=np.float32).reshape(n, c)
    w = Long("long", (1,) * n, np.arange(n), rows, rows + 1)
    s = w.sample(64, keep_last=4)
    assert len(s.positions) == 64
    assert list(s.positions[-4:]) == [2044, 2045, 2046, 2047]  # the decode steps
    prompt = s.positions[:-4]
    assert prompt[0] == 0 and prompt[-1] == 2043 and np.all(np.diff(prompt) > 0)
    assert np.ptp(np.diff(prompt)) <= 1  # evenly spread
    np.testing.assert_array_equal(s.fed, rows[s.positions])
    np.testing.assert_array_equal(s.outputs, rows[s.positions] + 1)
    assert w.sample(n) is w  # short enough: every position


def _records_a_pass_per_reference(checkpoint, ref, end, windows):
    """window_records before the one head pass for every reference (a pass per reference and
    per 64 positions), verbatim: what the new path must give, to fp32 rounding."""
    from anechain.head import reference_logits

    n = checkpoint.architecture.num_hidden_layers
    positions = [int(p) for w in windows for p in w.positions]
    names = [w.name for w in windows for _ in w.positions]
    hidden = np.concatenate([np.asarray(w.outputs, np.float32) for w in windows])
    final = finish_reference(checkpoint, ref, end, positions, hidden)
    records: list[dict[str, Any]] = []
    for i in range(0, len(positions), 64):
        rows = slice(i, i + 64)
        both = reference_logits(
            checkpoint, np.concatenate([final[rows], ref.boundaries[n][positions[rows]]])
        )
        logits, expected = both[: len(both) // 2], both[len(both) // 2 :]
        for name in dict.fromkeys(names[rows]):
            mine = [k for k, m in enumerate(names[rows]) if m == name]
            records += position_records(
                name, [positions[rows][k] for k in mine], expected[mine], logits[mine]
            )
    return records


def test_one_head_pass_for_every_reference_gives_the_same_records(
    tiny_checkpoint, tiny_config, cache, monkeypatch
):
    """next_token_golden's path (substitute per reference, then one LM-head pass for all)
    gives the records a pass per reference gave: same order (a recurring window name over
    more than 64 positions too), the same figures to fp32 rounding (torch's threads split a
    product by its rows: one thread gives the same bits), a NaN row included."""
    import anechain.nexttoken as nexttoken

    n = tiny_checkpoint.architecture.num_hidden_layers
    rng = np.random.default_rng(1)
    first = reference(
        tiny_checkpoint, calibration_tokens(tiny_config.validation, tiny_checkpoint, 64), n, cache
    )
    tokens = [int(t) for t in rng.integers(0, tiny_checkpoint.architecture.vocab_size, 48)]
    second = reference(tiny_checkpoint, tokens, n, cache)

    def window(ref: Any, end: int, name: str, positions: Any) -> WindowOutputs:
        pos = tuple(int(p) for p in positions)
        x = ref.boundaries[end][list(pos)]
        return WindowOutputs(name, pos, (x + rng.normal(0, 0.5, x.shape)).astype(np.float32))

    # A NaN row substituted after the last layer: KL None and token -1 at that row alone.
    nan = window(second, n, "late", range(40, 45))
    nan.outputs[2] = np.nan
    sequences = [  # (reference, layer substituted at, windows)
        (first, 3, [window(first, 3, "early", range(16)), window(first, 3, "late", range(44, 48))]),
        (second, 3, [window(second, 3, "prefill", range(0, 48, 3))]),
        (second, n, [nan]),
        # 70 positions: records per block of 64, grouped by window within a block.
        (
            first,
            1,
            [
                window(first, 1, name, rng.integers(0, 64, k))
                for name, k in [("early", 50), ("late", 10), ("early", 10)]
            ],
        ),
    ]
    before = [
        r
        for ref, end, ws in sequences
        for r in _records_a_pass_per_reference(tiny_checkpoint, ref, end, ws)
    ]
    assert [r["window"] for r in before[41:]] == ["early"] * 54 + ["late"] * 10 + ["early"] * 6
    assert [r["kl"] is None for r in before] == [k == 38 for k in range(111)]
    assert before[38]["token"] == -1

    passes: list[int] = []
    inner = nexttoken.reference_logits

    def counted(checkpoint: Any, hidden: np.ndarray) -> np.ndarray:
        passes.append(len(hidden))
        return inner(checkpoint, hidden)

    monkeypatch.setattr(nexttoken, "reference_logits", counted)
    per_reference = [
        r for ref, end, ws in sequences for r in window_records(tiny_checkpoint, ref, end, ws)
    ]
    _assert_same_records(per_reference, before)
    assert len(passes) == 4
    parts = [substitute(tiny_checkpoint, ref, end, ws) for ref, end, ws in sequences]
    passes.clear()
    _assert_same_records(substituted_records(tiny_checkpoint, parts), before)
    assert passes == [2 * 111]
    # Memory bounded: passes of 20 positions at most, evened out (111 = 6 x 19 - 3).
    monkeypatch.setattr(nexttoken, "_HEAD_PASS_ROWS", 40)
    passes.clear()
    _assert_same_records(substituted_records(tiny_checkpoint, parts), before)
    assert passes == [38] * 5 + [32]
    assert substituted_records(tiny_checkpoint, []) == []


def _assert_same_records(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same records in the same order: names, positions, tokens and None exactly, every
    figure to fp32 rounding."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float) and g[key] is not None:
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, g, w)
            else:
                assert g[key] == value, (key, g, w)


def test_records_that_differ_are_told_apart() -> None:
    record = {"window": "early", "position": 3, "token": 7, "kl": 0.01, "margin": None}
    _assert_same_records([record], [dict(record, kl=0.01 * (1 + 1e-6))])
    for wrong in (dict(record, kl=0.0101), dict(record, token=8), dict(record, window="late")):
        with pytest.raises(AssertionError):
            _assert_same_records([wrong], [record])
    with pytest.raises(AssertionError):
        _assert_same_records([record, record], [record])


def test_the_reused_head_block_gives_the_logits_of_a_block_per_read(tiny_checkpoint, monkeypatch):
    """reference_logits converts each block of the LM head into one reused fp32 tensor: the
    logits are those of a new tensor per block (rows.float()), bit for bit, a short last
    block included."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    import anechain.head as head

    monkeypatch.setattr(head, "_HEAD_BLOCK_ROWS", 100)  # 512 rows: 5 x 100 + 12
    hidden = np.random.default_rng(3).normal(0, 3, (9, tiny_checkpoint.architecture.hidden_size))
    hidden = hidden.astype(np.float32)
    norm_name, head_name = head_tensor_names(tiny_checkpoint)
    a = tiny_checkpoint.architecture
    norm = Phi3RMSNorm(a.hidden_size, a.rms_norm_eps)
    blocks = []
    with torch.no_grad():
        norm.weight.copy_(tiny_checkpoint.read_tensors([norm_name])[norm_name].float())
        h = norm(torch.from_numpy(hidden))
        for i in range(0, a.vocab_size, 100):
            rows = tiny_checkpoint.read_rows(head_name, i, min(i + 100, a.vocab_size))
            blocks.append((h @ rows.float().T).numpy())
    np.testing.assert_array_equal(head.reference_logits(tiny_checkpoint, hidden), np.hstack(blocks))
