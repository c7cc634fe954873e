"""CLI polish: every fixed set of values is listed in --help and checked when parsed (a typo is
exit 2 naming the valid values; options that also take paths keep taking them), shell
completion, and -v/-q on every command."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from uta_cli.app import app

runner = CliRunner()
COMMANDS = ("pretrain", "finetune", "zeroshot", "export", "convert", "inspect-mask", "embed",
            "classify", "repoint")
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}


def cli(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env={**WIDE, **(env or {})})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def squashed(text: str) -> str:
    return "".join(text.split())


def test_core_and_command_line_agree_on_the_choices():
    from uta_cli.commands import export as export_cmd
    from uta_cli.commands import zeroshot as zeroshot_cmd
    from uta_cli.models import release
    from uta_cli.workflows import export as export
    from uta_cli.workflows import zeroshot as evaluation

    assert typing.get_args(export_cmd.Format) == export.FORMATS
    assert typing.get_args(export_cmd.OutputKind) == export.KINDS
    assert typing.get_args(zeroshot_cmd.Task) == evaluation.TASKS
    assert typing.get_args(zeroshot_cmd.Precision) == evaluation.PRECISIONS
    assert typing.get_args(zeroshot_cmd.CkptFormat) == release.FORMATS
    assert typing.get_args(export_cmd.CkptFormat) == release.FORMATS
    from uta_cli.commands import embed as embed_cmd

    assert typing.get_args(embed_cmd.CkptFormat) == release.FORMATS
    assert typing.get_args(embed_cmd.Precision) == evaluation.PRECISIONS


def _listed(command: str) -> list[str]:
    """What --help must show: every Literal option as <a|b>, word-or-path ones as [a|b|PATH]."""
    from uta_cli.commands import export as e
    from uta_cli.commands import zeroshot as z
    from uta_cli.commands._common import metavar

    def lit(tp) -> str:
        return "<" + "|".join(typing.get_args(tp)) + ">"

    return {"pretrain": ["[auto|never|PATH]"], "finetune": ["[auto|never|PATH]"],
            "zeroshot": [lit(z.CkptFormat), lit(z.Task), lit(z.Precision),
                         metavar(z.DATASETS, "PATH"), metavar(z.TEMPLATES, "FILE")],
            "export": [lit(e.Format), lit(e.OutputKind), lit(e.CkptFormat),
                       metavar(e.TEMPLATES, "FILE")],
            "convert": ["<uta-release>"],
            "embed": [lit(z.CkptFormat), lit(z.Precision), "[auto|cpu|cuda|cuda:N]"],
            "classify": [lit(z.CkptFormat), lit(z.Precision), "[openai|simple|none|FILE]",
                         "[auto|cpu|cuda|cuda:N]"],
            "repoint": [],
            "inspect-mask": ["<random|block|reversed-block|attention|all>"]}[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_choice_and_verbosity(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    for text in _listed(command) + ["--verbose", "-v", "--quiet", "-q"]:
        assert squashed(text) in squashed(result.output), (command, text)


@pytest.mark.parametrize("args,valid", [
    (["export", "--ckpt", "x", "--output", "y", "--format", "onx"],
     "'onnx', 'torchscript', 'pt2', 'open-clip'"),
    (["export", "--ckpt", "x", "--output", "y", "--format", "onnx", "--output-kind", "token"],
     "'embedding', 'tokens', 'classifier'"),
    (["zeroshot", "--ckpt", "x", "--dataset", "demo", "--precision", "fp16"],
     "'auto', 'bf16', 'fp32'"),
    (["zeroshot", "--ckpt", "x", "--dataset", "demo", "--task", "retreival"],
     "'classification', 'retrieval'"),
    (["zeroshot", "--ckpt", "x", "--dataset", "imagenett"], "Did you mean 'imagenet'?"),
    (["zeroshot", "--ckpt", "x", "--dataset", "demo", "--templates", "opneai"],
     "Did you mean 'openai'?"),
    (["pretrain", "--resume", "atuo"], "auto, never"),
    (["finetune", "finetune_demo", "--resume", "nevr"], "Did you mean 'never'?"),
    (["inspect-mask", "--strategy", "reversed"],
     "'random', 'block', 'reversed-block', 'attention', 'all'"),
    (["convert", "x.pt", "--output", "o", "--from", "timm"], "'uta-release'"),
    (["embed", "a.png", "--ckpt", "x", "--output", "e.npy", "--device", "cdua"],
     "Did you mean 'cuda'?"),
])
def test_a_typo_is_exit_2_with_the_valid_values(args, valid):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert squashed(valid) in squashed(result.output), result.output
    assert "Traceback" not in result.output


def test_path_taking_options_still_take_paths(tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a {c}.\n")
    run_dir = tmp_path / "norun"
    # parsing passes: each fails later, on the missing checkpoint, not on the option's value
    for args in (["zeroshot", "--ckpt", run_dir, "--dataset", tmp_path, "--templates",
                  templates],
                 ["zeroshot", "--ckpt", run_dir, "--dataset", "val-{000..009}.tar",
                  "--templates", "simple"],
                 ["export", "--ckpt", run_dir, "--format", "onnx", "--output", "o.onnx",
                  "--templates", templates]):
        result = cli(*args)
        assert result.exit_code == 2 and "not found" in result.output, (args, result.output)
        assert "Invalid value" not in result.output


def test_verbose_shows_uta_info_lines_and_quiet_hides_progress(tmp_path, tiny_clip_dir, caplog):
    """The levels gate what reaches the terminal's handler (here pytest's, caplog)."""
    sets = []
    for s in tiny_overrides(tiny_clip_dir, steps=2, **{"train.checkpoint_every": 2}):
        sets += ["--set", s]

    def run(name, *flags):
        caplog.clear()
        result = cli("pretrain", "demo", "--output-dir", tmp_path / name, *sets, *flags)
        assert result.exit_code == 0, result.output
        info = [r.getMessage() for r in caplog.records if r.name.startswith("uta_cli")]
        return result.output, " ".join(info)

    out, logged = run("loud", "-v")
    assert "checkpoint written" in logged and "step 2 loss" in out
    out, logged = run("plain")
    assert "checkpoint written" not in logged and "step 2 loss" in out
    out, logged = run("quiet", "--quiet")
    assert "checkpoint written" not in logged and "step 2 loss" not in out
    assert "validation:" not in out


def test_shell_completion_offers_the_choices():
    uta = os.path.join(os.path.dirname(sys.executable), "uta")
    assert "--install-completion" in cli("--help").output
    env = {**os.environ, "_UTA_COMPLETE": "complete_bash", "COMP_WORDS": "uta export --format ",
           "COMP_CWORD": "3"}
    out = subprocess.run([uta], env=env, capture_output=True, text=True, timeout=120)
    assert set(out.stdout.split()) >= {"onnx", "torchscript", "pt2", "open-clip"}, out
    env.update(COMP_WORDS="uta pretrain --resume ", COMP_CWORD="3")
    out = subprocess.run([uta], env=env, capture_output=True, text=True, timeout=120)
    assert {"auto", "never"} <= set(out.stdout.split()), out
