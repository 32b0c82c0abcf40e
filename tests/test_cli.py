"""The command line's global options, through the real ``ctxsync`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxsync.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [["--home", "/h/x", "id"], ["id", "--home", "/h/x"], ["--home", "/h/x", "peer", "list"], ["peer", "list", "--home", "/h/x"]],
)
def test_home_is_kept_before_and_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).home == "/h/x"


def test_home_before_the_command_is_the_home_used(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CTXSYNC_HOME"}
    env["HOME"] = str(tmp_path / "user")  # where ~/.ctxsync would be, were --home lost
    home = tmp_path / "node"

    def ctxsync(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctxsync", *args], env=env, capture_output=True, text=True, timeout=60
        )

    made = ctxsync("--home", str(home), "init", "--name", "n1", "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0")
    assert made.returncode == 0, made.stderr
    assert (home / "node.key").exists()
    assert not (tmp_path / "user" / ".ctxsync").exists()
    shown = ctxsync("--home", str(home), "id")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == made.stdout.strip().splitlines()[-1]
