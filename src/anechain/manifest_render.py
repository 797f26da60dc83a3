"""`manifest show`: a manifest at a glance, for a terminal."""

from __future__ import annotations

from pathlib import Path

from anechain.contract import KIND_HEAD, KIND_LAYERS
from anechain.fsutil import human_size
from anechain.manifest import Manifest
from anechain.report import GATE_SETS


def _functions_text(functions: dict[str, int] | None) -> str:
    """`decode+prefill(T=64)`, or `decode` for a decode-only package."""
    if not functions or "prefill" not in functions:
        return "decode"
    return f"decode+prefill(T={functions['prefill']})"


_RESIDENCY_TEXT = {"checked": "checked", "report_only": "report only", "not_checked": "NOT CHECKED"}


def render_manifest(m: Manifest, path: str | Path = "manifest") -> str:
    """The topology at a glance, for a terminal."""
    arch, n = m.model.architecture, m.model.num_hidden_layers
    pre = "precomputed tables included" if m.rope.precomputed else "no precomputed tables"
    lines = [
        f"{path}  (manifest v{m.schema_version}, built {m.created}, anechain "
        f"{m.versions.get('anechain')})",
        f"model    {n} decoder layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads}/{arch.num_key_value_heads} heads, checkpoint "
        f"{m.model.checkpoint_fingerprint[:12]}",
        f"context  {m.context_length} tokens; RoPE theta {m.rope.rope_theta:g}, rotary_dim "
        f"{m.rope.rotary_dim}, {pre}; mask {m.mask.attended_value:g}/{m.mask.masked_value:g}",
        f"gates    shards: {_bounds(m, KIND_LAYERS)}",
        f"         head: {_bounds(m, KIND_HEAD)}",
        "",
    ]
    rows = [
        ["layers", "package", "size", "compiled", "functions", "gates", "cosine", "backend"]
        + ["residency"]
    ]
    for s in m.shards:
        v = s.validation
        cosine = v.metrics.get("cosine")
        passed = sum(g.passed for g in v.gates)
        rows.append(
            [
                str(s.layers),
                s.package.path,
                human_size(s.package.size_bytes),
                human_size(s.compiled.size_bytes) if s.compiled else "-",
                _functions_text(s.functions),
                f"{passed}/{len(v.gates)} {v.verdict}",
                f"{cosine:.5f}" if isinstance(cosine, int | float) else "-",
                v.backend,
                _RESIDENCY_TEXT[v.residency.status],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    unchecked = [str(s.layers) for s in m.shards if s.validation.residency.status != "checked"]
    total = human_size(sum(s.package.size_bytes for s in m.shards))
    residency = (
        f"not checked on the ANE for {len(unchecked)} of {len(m.shards)} shard(s): "
        f"{', '.join(unchecked)}"
        if unchecked
        else "checked for every shard"
    )
    extra = []
    if m.head is not None:
        h = m.head
        extra.append(
            f"head       {h.package.path}  {human_size(h.package.size_bytes)}, chunks of "
            f"{h.chunk_rows} rows, top-1 agreement "
            f"{h.validation.metrics.get('top1_agreement')}, {h.validation.verdict}"
        )
    if m.embedding is not None:
        e = m.embedding
        extra.append(
            f"embedding  {e.file.path}  {e.dtype} {e.shape[0]} x {e.shape[1]}, "
            f"{human_size(e.file.size_bytes)}"
        )
    return "\n".join(
        [
            *lines,
            *table,
            *extra,
            "",
            f"{len(m.shards)} shards, 0:{n}, {total}; residency {residency}",
        ]
    )


def _bounds(m: Manifest, kind: str) -> str:
    """The bounds the manifest required, e.g. 'cosine >= 0.998, rmse <= 0.1 (rel_rmse)'."""
    parts = []
    for spec in GATE_SETS[kind]:
        bound = 0.0 if spec.bound_field is None else m.gates.get(spec.bound_field)
        metric = f" ({spec.metric})" if spec.metric != spec.name else ""
        parts.append(f"{spec.name}{metric} {spec.op} {'?' if bound is None else f'{bound:g}'}")
    return ", ".join(parts)
