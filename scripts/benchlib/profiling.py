"""
``scripts/bench --profile DIR``: sample ctxsync daemons with py-spy during the workloads.

The latency loop is sampled with ``--idle`` (waiting threads too: a wall-clock view); the
throughput, catch-up and new-node workloads by CPU. Running daemons are attached by PID
(``py-spy record --pid``); daemons started inside a
workload (the restarted node of the catch-up, the new node) run under ``py-spy record -- ...``
so that their start-up is sampled too. Each profile is a py-spy "raw" file (collapsed stacks),
summarised by :func:`summarize` into the functions with the most samples, self and inclusive.
Profiling slows the daemons down: figures of a profiled run are not benchmark results.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from benchlib.util import Procs, say

RATE = 250  # samples per second


def pyspy_exe() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("scripts/bench --profile needs py-spy: pip install -e '.[bench]'")
    return exe


def pyspy_argv(out: Path, *, idle: bool = False) -> list[str]:
    """``py-spy record`` writing collapsed stacks; ``idle`` also samples threads that wait (wall-clock view)."""
    return [
        pyspy_exe(),
        "record",
        "--rate",
        str(RATE),
        "--format",
        "raw",
        "--nonblocking",
        *(["--idle"] if idle else []),
        "--output",
        str(out),
    ]


class Profiler:
    def __init__(self, out_dir: Path, procs: Procs) -> None:
        self.out_dir = out_dir
        self.procs = procs
        out_dir.mkdir(parents=True, exist_ok=True)
        pyspy_exe()

    def spawn_file(self, name: str) -> Path:
        return self.out_dir / f"{name}.txt"

    @staticmethod
    def maybe(
        prof: Profiler | None, name: str, pids: dict[str, int], *, idle: bool = False
    ) -> contextlib.AbstractAsyncContextManager[None]:
        return prof.attach(name, pids, idle=idle) if prof is not None else contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def attach(self, name: str, pids: dict[str, int], *, idle: bool = False) -> AsyncIterator[None]:
        spies = []
        for who, pid in pids.items():
            argv = [*pyspy_argv(self.out_dir / f"{name}-{who}.txt", idle=idle), "--pid", str(pid)]
            spies.append(
                await self.procs.spawn(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                )
            )
        await asyncio.sleep(0.5)  # let py-spy attach before the workload starts
        try:
            yield
        finally:
            for spy in spies:
                await self.procs.stop(spy, sig=signal.SIGINT, timeout=20)


_LINE = re.compile(r" \(([^)]*?)(?::\d+)?\)$")


def _frame(f: str) -> str:
    """``func (ctxsync/mesh.py:123)`` -> ``func (ctxsync/mesh.py)``: one entry per function."""
    m = _LINE.search(f)
    if not m:
        return f
    name, path = f[: m.start()], m.group(1)
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith("/"):  # py-spy already shortens paths under sys.path (ctxsync/mesh.py)
        path = path.rsplit("/", 1)[-1]
    return f"{name} ({path})"


def summarize(path: Path, top: int = 15) -> str:
    """Top functions by self and inclusive samples of one py-spy raw file."""
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"{path.name}: no profile ({exc.strerror})"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path.name}: no samples"
    out = [
        f"{path.name}: {total} samples at {RATE} Hz (~{total / RATE:.2f} s busy)",
        "  self%  incl%  function",
    ]
    seen = set()
    for f, n in self_n.most_common(top):
        seen.add(f)
        out.append(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    out.append("  top inclusive (entry points excluded):")
    skip = re.compile(
        r"^(<module>|_run_module_as_main|_run_code|run|main|run_until_complete|run_forever|_run_once|_run|cmd_run|run_async|__call__) "
    )
    for f, n in incl.most_common(top * 3):
        if skip.match(f) or f in seen:
            continue
        out.append(f"  {100 * self_n[f] / total:5.1f}  {100 * n / total:5.1f}  {f}")
        seen.add(f)
        if len(seen) >= top * 2:
            break
    return "\n".join(out)


def summarize_dir(out_dir: Path) -> str:
    parts = [summarize(p) for p in sorted(out_dir.glob("*.txt"))]
    say(f"profiles written to {out_dir}")
    return "\n\n".join(parts)
