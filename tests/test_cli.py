"""The command line as a user meets it: `python -m pipeline` and every stage's help, the MLproject
entry points as subcommands, the version. (Bad input: test_startup.py and test_bad_input.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd, env=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", ["extract", "sweep", "export", "main"])
def test_help(stage, tmp_path):
    result = cli(stage, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: python -m pipeline " + stage in result.stdout


def test_every_mlproject_entry_point_is_a_subcommand_with_its_parameters():
    import yaml

    from pipeline.cli import build_parser

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(entry_points) <= set(subcommands)
    for name, entry in entry_points.items():
        flags = {a.dest for a in subcommands[name]._actions if a.option_strings and a.dest != "help"}
        assert set(entry["parameters"]) <= flags, name
        assert entry["command"].startswith(f"python -m pipeline {name} "), name


def test_mlproject_defaults_are_the_command_lines_defaults():
    """An entry point run with its MLproject defaults does what the bare subcommand does."""
    import yaml

    from pipeline.cli import build_parser, parity_config
    from pipeline.config import ParityConfig

    def effective(args):
        values = vars(args)
        if args.command == "parity":
            values["config"] = parity_config({n: values.pop(n) for n in ParityConfig.model_fields})
        return values

    parser = build_parser()
    for name, entry in yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"].items():
        given = {p: "x" for p, spec in entry["parameters"].items() if "default" not in spec}
        defaults = {p: spec["default"] for p, spec in entry["parameters"].items() if "default" in spec}
        flags = [f"--{p}={v}" for p, v in given.items()]
        bare = effective(parser.parse_args([name, *flags]))
        mlproject = effective(parser.parse_args([name, *flags, *(f"--{p}={v}" for p, v in defaults.items())]))
        assert mlproject == bare, name


def test_export_help_names_every_format_export_writes():
    from pipeline.cli import build_parser
    from pipeline.export import FORMATS

    export_help = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    listed = " ".join(export_help.split()).split("comma list of ")[-1].split(" (default")[0]
    assert listed.split(", ") == list(FORMATS)


def test_version_and_help_read_plainly(tmp_path):
    import pipeline

    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"python -m pipeline {pipeline.__version__}"
    for args in (("--help",), ("findings", "--help"), ("parity", "--help")):
        text = cli(*args, cwd=tmp_path).stdout
        assert "``" not in text and ":func:" not in text and "usage: python -m pipeline" in text
        assert "(default True)" not in text and "(default False)" not in text  # true, false
    from pipeline.cli import build_parser

    for name, stage in build_parser()._subparsers._group_actions[0].choices.items():
        bare = [a.dest for a in stage._actions if not a.help or a.help.startswith("(default")]
        assert bare == [], name  # every flag says what it is


@pytest.mark.parametrize(("argv", "line"), [
    (["sweep", "--features", "f.h5", "--n_trials", "abc"],
     "error: argument --n_trials/--n-trials: expected an integer, got 'abc' (see python -m pipeline "
     "sweep --help)"),
    (["swep"], "error: argument command: invalid choice: 'swep' (choose from 'extract', 'sweep', "
     "'parity', 'export', 'main', 'findings') (see python -m pipeline --help)"),
    (["sweep"], "error: the following arguments are required: --features (see python -m pipeline "
     "sweep --help)"),
    (["sweep", "--features", "f.h5", "a\nb"],
     "error: unrecognized arguments: a\\nb (see python -m pipeline --help)"),
], ids=["not an integer", "unknown subcommand", "missing flag", "a newline in a stray argument"])
def test_a_malformed_command_line_is_one_line_and_exit_2(argv, line, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
