"""The command line through click's CliRunner: exit codes, messages, help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from anechain.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands_with_examples(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("export", "random-checkpoint"):
        assert command in result.output
    result = runner.invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    assert "--layer-spec" in result.output and "Examples:" in result.output


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def test_every_command_and_option_says_what_it_is(runner):
    """`--help` is the manual: every command has a description, every option a line."""
    bare = [
        f"{name} {param.opts[0]}"
        for name, command in _commands(cli)
        for param in command.params
        if isinstance(param, click.Option) and param.name != "help" and not param.help
    ]
    assert bare == []
    assert [name for name, command in _commands(cli) if not command.help] == []
    assert len(list(_commands(cli))) > 10  # the walk reaches the subcommands


def test_random_checkpoint_and_export(runner, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = runner.invoke(
        cli,
        ["random-checkpoint", str(ckpt), "--preset", "tiny", "--num-layers", "2", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "2 layers" in result.output
    again = runner.invoke(cli, ["random-checkpoint", str(ckpt)])
    assert again.exit_code == 2 and "already exists" in again.output

    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        [
            "export",
            "--model",
            str(ckpt),
            "--config",
            "configs/tiny.yaml",
            "--layer-spec",
            f"0:1:{out}/a.mlpackage",
            "--layer-spec",
            f"1:2:{out}/b.mlpackage",
            "--json",
            str(out / "summary.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "a.mlpackage").is_dir() and (out / "b.mlpackage").is_dir()
    assert "0:1" in result.stdout and "1:2" in result.stdout
    assert "convert done" in result.stderr  # progress goes to stderr
    assert '"conv": 4' in (out / "summary.json").read_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0:3", "is not START:END:PATH"),
        ("0:x:a.mlpackage", "is not START:END"),
        ("3:1:a.mlpackage", "needs 0 <= START < END"),
        ("0:2:a.txt", "PATH must end in .mlpackage"),
        ("0:7:a.mlpackage", "END is past the model's 6 decoder layers"),
    ],
)
def test_bad_layer_specs_are_usage_errors(runner, tiny_checkpoint_dir, tmp_path, spec, message):
    result = runner.invoke(
        cli, ["export", "--model", str(tiny_checkpoint_dir), "--layer-spec", spec]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_duplicate_and_existing_outputs(runner, tiny_checkpoint_dir, tmp_path):
    a = tmp_path / "a.mlpackage"
    result = runner.invoke(
        cli,
        [
            "export",
            "--model",
            str(tiny_checkpoint_dir),
            "--layer-spec",
            f"0:1:{a}",
            "--layer-spec",
            f"1:2:{a}",
        ],
    )
    assert result.exit_code == 2 and "write the same path" in result.output
    a.mkdir()
    result = runner.invoke(
        cli, ["export", "--model", str(tiny_checkpoint_dir), "--layer-spec", f"0:1:{a}"]
    )
    assert result.exit_code == 2 and "pass --overwrite" in result.output


def test_library_errors_are_one_line_exit_1(runner, tmp_path, tiny_checkpoint_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("architecture: {hidden_size: 64}\nexprot: {}\n")
    result = runner.invoke(
        cli,
        [
            "export",
            "--model",
            str(tiny_checkpoint_dir),
            "--config",
            str(bad),
            "--layer-spec",
            f"0:1:{tmp_path}/a.mlpackage",
        ],
    )
    assert result.exit_code == 1
    assert "unknown config key 'exprot'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

    (tmp_path / "notackpt").mkdir()
    result = runner.invoke(
        cli,
        [
            "export",
            "--model",
            str(tmp_path / "notackpt"),
            "--layer-spec",
            f"0:1:{tmp_path}/a.mlpackage",
        ],
    )
    assert result.exit_code == 1 and "has no config.json" in result.output


def test_missing_model_dir_is_usage_error(runner, tmp_path):
    result = runner.invoke(
        cli, ["export", "--model", str(tmp_path / "nope"), "--layer-spec", "0:1:a.mlpackage"]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
