"""The `keeprl` command line: help lists the subcommands, and no subcommand is a usage error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rl import cli


def test_help_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert cli.COMMANDS["demo"].help in out


def test_demo_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--seed", "--tokens", "--device"):
        assert option in out


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_installed_console_script_runs() -> None:
    # pip puts the console script beside the interpreter of the venv it installs into.
    script = Path(sys.executable).with_name("keeprl")
    assert script.exists(), f"no keeprl script beside {sys.executable}: is keeprl installed?"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
