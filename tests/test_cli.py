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


@pytest.mark.parametrize("command", ["replay", "inspect", "plot"])
def test_an_unwritable_output_path_is_refused_before_the_work(tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    flag = "--out" if command == "plot" else "--json"
    step = [] if command == "plot" else ["--step", "0"]
    for out, why in [
        (tmp_path, "is a directory"),
        (tmp_path / "file" / "report.json", "file is not a directory"),
        (tmp_path / "file" / "sub" / "report.json", "file is not a directory"),
    ]:
        # The run directory does not exist either: the output path is checked first.
        assert cli.main([command, str(tmp_path / "no-run"), *step, flag, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{flag}: " in err and why in err, err
