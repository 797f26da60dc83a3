"""`anechain build` (the one-command pipeline) and `anechain generate` (decode a manifest)."""

from __future__ import annotations

from pathlib import Path

import click

from anechain.cli._common import (
    AsciiIntRange,
    InputFile,
    backend_option,
    cache_dir_option,
    check_outputs,
    config_option,
    human_bytes,
    model_option,
    progress_printer,
    render_table,
    report_only_option,
    resolve_config,
)


def _fmt(value: object, digits: int = 5) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def render_build(result) -> str:  # type: ignore[no-untyped-def]
    rows = []
    for a in result.artifacts:
        r = a.report
        if r is None:
            rows.append(
                [
                    a.name,
                    a.path.name,
                    human_bytes(a.size_bytes),
                    "-",
                    "-",
                    "-",
                    "-",
                    "reused" if a.reused else "written",
                ]
            )
            continue
        m = r.golden.metrics
        residency = {
            "checked": "pass" if r.residency_passed else "FAIL",
            "report_only": "report only",
            "not_checked": "not checked",
        }[r.residency["status"]]
        if r.kind == "head":
            golden = f"top1 {_fmt(m['top1_agreement'], 3)}, cos {_fmt(m['cosine'])}"
        else:
            nt = (r.golden.next_token or {}).get("metrics", {})
            golden = (
                f"cos {_fmt(m['cosine'])}, delta {_fmt(m['delta_cosine'])}, "
                f"rel rmse {_fmt(m.get('rel_rmse'), 4)}, rel max {_fmt(m.get('rel_max_abs'), 3)}, "
                f"bulk cos {_fmt(m.get('bulk_cosine'))}, KL {_fmt(nt.get('kl_mean'))}/"
                f"{_fmt(nt.get('kl_worst'))}, top1 {_fmt(nt.get('top1_agreement'), 3)}"
            )
        verdict = "pass" if r.verdict == "pass" else "FAIL " + ",".join(r.failed_gates())
        rows.append(
            [
                a.name,
                a.path.name,
                human_bytes(a.size_bytes),
                residency,
                golden,
                r.backend,
                verdict,
                "reused" if a.reused else "built",
            ]
        )
    lines = [
        render_table(
            ["shard", "file", "size", "residency", "golden", "backend", "verdict", ""], rows
        )
    ]
    for check in (result.generation, result.chain):
        if check is not None:
            lines.append(check.describe())
    if result.manifest is not None:
        lines.append(f"manifest: {result.manifest}")
    lines.append(f"build: {'PASS' if result.passed else 'FAIL'}")
    return "\n".join(lines)


@click.command("build")
@config_option(
    "anechain YAML config: architecture, topology, gates, build settings "
    "(default: the tiny preset, as configs/tiny.yaml)."
)
@model_option("Checkpoint folder (overrides build.checkpoint).", required=False)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder (overrides build.out_dir).",
)
@backend_option
@cache_dir_option
@report_only_option
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the summary as JSON.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The model's report page, one self-contained HTML file (default: OUT/report.html).",
)
def build(
    config_path: Path | None,
    model_dir: Path | None,
    out_dir: Path | None,
    backend: str,
    cache_dir: Path | None,
    report_only: bool,
    json_out: Path | None,
    html_path: Path | None,
) -> None:
    """Run the whole pipeline and prove it: export every range of the configured topology,
    the head and the embedding; compile and check residency where the machine allows
    (macOS); validate every package against transformers; write the manifest; decode a
    few tokens from the manifest and compare them with transformers' greedy generation.

    Artifacts already built and validated from the same inputs are reused. Exits 1 if any
    gate fails.

    \b
    Examples:
      anechain build                                   # the tiny demo (random checkpoint)
      anechain build --config configs/phi-4-mini.yaml --model ~/models/Phi-4-mini-instruct
    """
    from anechain.build import run_build
    from anechain.checkpoint import Checkpoint

    config = resolve_config(config_path, preset="tiny")
    checkpoint = model_dir or (Path(config.build.checkpoint) if config.build.checkpoint else None)
    out = out_dir or Path(config.build.out_dir or f"artifacts/{config.name or 'build'}")
    html_path = html_path or out / "report.html"
    check_outputs(json_out, html_path, folders=(out,))
    if checkpoint is not None:
        arch = Checkpoint(checkpoint).architecture
        if arch != config.architecture:
            click.echo(
                f"note: using {checkpoint}'s architecture, which differs from the config's",
                err=True,
            )
    say = progress_printer()
    result = run_build(
        config,
        out,
        checkpoint,
        backend=backend,
        cache_dir=cache_dir,
        progress=say,
        residency_report_only=report_only,
    )
    click.echo(render_build(result))
    from anechain.html_model import build_page
    from anechain.html_report import write_page

    write_page(html_path, build_page(result))
    click.echo(f"report page: {html_path}", err=True)
    if json_out is not None:
        from anechain.jsonio import atomic_write_json

        summary = {
            "passed": result.passed,
            "manifest": str(result.manifest) if result.manifest else None,
            "artifacts": [
                {
                    "name": a.name,
                    "path": str(a.path),
                    "size_bytes": a.size_bytes,
                    "reused": a.reused,
                    "verdict": a.report.verdict if a.report else None,
                }
                for a in result.artifacts
            ],
            "generation": result.generation.to_dict() if result.generation else None,
            "chain": result.chain.to_dict() if result.chain else None,
        }
        atomic_write_json(json_out, summary, sort_keys=False)
    if not result.passed:
        raise click.exceptions.Exit(1)


def _parse_ids(text: str) -> list[int]:
    from anechain.config import parse_ascii_int

    ids = [parse_ascii_int(t) for t in text.split(",")] if text.strip() else []
    if not ids:
        raise click.BadParameter("no token ids given (e.g. 1,2,3)", param_hint="--prompt-ids")
    if any(i is None for i in ids):
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of token ids (ASCII digits)",
            param_hint="--prompt-ids",
        )
    return [i for i in ids if i is not None]


@click.command("generate")
@click.option(
    "--manifest",
    "manifest_path",
    required=True,
    type=InputFile(),
    help="The manifest.json of validated shards (`build` or `manifest build` writes it).",
)
@click.option("--prompt-ids", help="Comma-separated token ids, e.g. 1,2,3.")
@click.option(
    "--prompt",
    help="Text, tokenized with the tokenizer the manifest lists (copied from the checkpoint "
    "by `build` / `manifest build --tokenizer`); the answer streams as text.",
)
@click.option(
    "--chat",
    is_flag=True,
    help="Wrap --prompt as a user turn in the checkpoint's chat template, the assistant's "
    "turn opened.",
)
@click.option(
    "--max-new-tokens",
    type=AsciiIntRange(min=1),
    default=16,
    show_default=True,
    help="Stop after this many new tokens (or earlier, at an eos the manifest lists).",
)
@backend_option
@click.option(
    "--profile",
    is_flag=True,
    help="Print prompt (prefill) tok/s, time to first token, decode tok/s and ms/token for "
    "the layers, each shard and the head.",
)
@click.option(
    "--no-prefill",
    is_flag=True,
    help="Feed the prompt one token per decode step even if the shards have prefill.",
)
def generate(
    manifest_path: Path,
    prompt_ids: str | None,
    prompt: str | None,
    chat: bool,
    max_new_tokens: int,
    backend: str,
    profile: bool,
    no_prefill: bool,
) -> None:
    """Greedy decoding over a manifest: embedding -> every shard -> head -> reduce.

    Uses only the manifest and the files it names (their sha256 checked first), never the
    checkpoint. The prompt runs through the shards' prefill function in chunks when they
    have one (else one token per step). Generation stops at an eos token the manifest
    lists (the checkpoint's eos_token_id and its tokenizer's eos) or after
    --max-new-tokens. With --prompt the text streams to stdout as it is generated; with
    --prompt-ids the new token ids are printed.

    \b
    Examples:
      anechain generate --manifest artifacts/tiny/manifest.json --prompt-ids 1,2,3,4 --profile
      anechain generate --manifest artifacts/smollm2/manifest.json --chat \\
          --prompt "What is the capital of France?" --max-new-tokens 32
    """
    from anechain.manifest import load_manifest
    from anechain.runtime import ManifestRuntime

    if (prompt_ids is None) == (prompt is None):
        raise click.UsageError("give exactly one of --prompt-ids and --prompt")
    if chat and prompt is None:
        raise click.UsageError("--chat applies to --prompt (text), not --prompt-ids")
    listed = load_manifest(manifest_path).tokenizer
    if prompt is not None and listed is None:
        raise click.UsageError(
            f"{manifest_path} lists no tokenizer, so --prompt cannot be tokenized; rebuild it "
            "with `manifest build --tokenizer CHECKPOINT` (or `build`), or use --prompt-ids"
        )
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else []
    runtime = ManifestRuntime(manifest_path, backend=backend, prefill=not no_prefill)
    stop = runtime.manifest.tokenizer.eos_token_ids if runtime.manifest.tokenizer else ()
    on_token = None
    if prompt is not None:
        from anechain.tokenizer import encode_prompt, load_tokenizer, text_streamer

        tokenizer = load_tokenizer(manifest_path.parent / runtime.manifest.tokenizer.folder)
        ids = encode_prompt(tokenizer, prompt, chat)
        on_token = text_streamer(tokenizer, lambda text: click.echo(text, nl=False))
    vocab = runtime.manifest.model.architecture.vocab_size
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise click.BadParameter(
            f"token id {outside[0]} is outside the model's vocabulary (0..{vocab - 1})",
            param_hint="--prompt-ids" if prompt is None else "--prompt",
        )
    result = runtime.generate(ids, max_new_tokens, on_token=on_token, stop=frozenset(stop))
    if prompt is None:
        click.echo(",".join(map(str, result.tokens)))
    else:
        click.echo()  # end the streamed line
        ended = "eos" if result.tokens[-1] in stop else f"{len(result.tokens)} tokens"
        click.echo(
            f"[{len(ids)} prompt tokens; new: {','.join(map(str, result.tokens))}; "
            f"stopped at {ended}]",
            err=True,
        )
    if profile:
        s = result.profile.summary()
        shards = ", ".join(f"{k} {v:.2f}" for k, v in s["shard_ms_per_token"].items())
        click.echo(
            f"prompt {s['prompt_tokens']} tokens ({s['prefill_tokens']} by prefill, T="
            f"{runtime.prefill_tokens or '-'}) {s['prompt_tokens_per_second']} tok/s, time to "
            f"first token {s['time_to_first_token_ms']} ms; "
            f"decode {s['tokens_per_second']} tok/s over {s['decode_tokens']} tokens; "
            f"layers {s['layers_ms_per_token']} ms/token ({shards}); "
            f"head predict+reduce {s['head_ms_per_token']} ms/token [{runtime.backend}]",
            err=True,
        )


COMMANDS = [build, generate]
