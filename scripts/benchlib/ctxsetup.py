"""
Run several ``ctxsync`` CLI commands in one interpreter (``python -m benchlib.ctxsetup``).

Each command is exactly ``ctxsync ARGV`` (``ctxsync.cli.main``), but one Python start-up
(about 0.6 s here) serves them all. Steps come as a JSON list on stdin:
``[{"argv": ["init", ...], "save": "idA"}, {"argv": ["peer", "add", "@cardB", ...]}]``; an
argument ``@NAME`` is replaced by the saved stdout of an earlier step. The answer on stdout is
``{"saved": {...}}``, or ``{"error": "..."}`` for the first step that exits non-zero.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def main() -> int:
    from ctxsync.cli import main as cli_main

    steps = json.load(sys.stdin)
    saved: dict[str, str] = {}
    for step in steps:
        argv = [saved[a[1:]] if a.startswith("@") else a for a in step["argv"]]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
        if rc != 0:
            json.dump(
                {"error": f"ctxsync {' '.join(step['argv'])} exited {rc}: {err.getvalue().strip()}"},
                sys.stdout,
            )
            return 1
        if "save" in step:
            saved[step["save"]] = out.getvalue().strip()
    json.dump({"saved": saved}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
