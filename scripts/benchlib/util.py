"""Small shared pieces of ``scripts/bench``: processes, waits, statistics, machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = SCRIPTS_DIR.parent
MIB = 2**20


def say(msg: str) -> None:
    """Progress line on stderr (stdout carries only the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """
    ``n`` different TCP ports on 127.0.0.1 that were free a moment ago, for daemons to listen on.

    Drawn at random from 10000 up to below the kernel's ephemeral range (where it leaves room), and
    bound together so that no two are the same. Not ``bind(0)``: the kernel hands those out of the
    ephemeral range, which outgoing connections use too. A daemon stopped and started again on its
    port (the catch-up workload, every restart of ``scripts/soak``) could find it taken by a
    peer's dial or a CLI call meanwhile ("address already in use"), as the integration tests once
    did in CI.
    """
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        high = 32767  # Linux's default range starts at 32768
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < n:
            s = stack.enter_context(socket.socket())
            tries = 0
            while high - 10000 >= 1000 and tries < 100:
                tries += 1
                with contextlib.suppress(OSError):  # taken, or drawn already for this call
                    s.bind(("127.0.0.1", random.randint(10000, high)))
                    break
            else:  # no room below the ephemeral range, or no luck: the kernel's choice
                s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    return ports


class BenchTimeout(Exception):
    """A bounded wait ran out."""


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
) -> float:
    """Poll ``predicate`` (sync or async) until true; return the monotonic time it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        ok = predicate()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def pct_summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of durations in seconds."""
    return {
        "n": len(values_s),
        "p50_ms": percentile(values_s, 50) * 1000,
        "p90_ms": percentile(values_s, 90) * 1000,
        "p99_ms": percentile(values_s, 99) * 1000,
        "max_ms": max(values_s) * 1000,
    }


# -- processes ------------------------------------------------------------------------


class Procs:
    """Every process this run started, so that cleanup signals exactly those (by PID)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd  # children run in the temp dir, so `python -m` never imports from the caller's cwd
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(
        self,
        *argv: str,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        env: dict[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=self.cwd
        )
        self.procs.append(proc)
        return proc

    async def stop(
        self, proc: asyncio.subprocess.Process, *, sig: int = signal.SIGTERM, timeout: float = 20.0
    ) -> int | None:
        """Signal one of our processes and wait for it; SIGKILL it if it outlives ``timeout``."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
        return proc.returncode

    async def stop_all(self) -> None:
        live = [p for p in self.procs if p.returncode is None]
        await asyncio.gather(*(self.stop(p, timeout=10.0) for p in live), return_exceptions=True)


def open_log(path: Path) -> Any:
    """A log file opened for appending, to hand to a child as its stdout/stderr."""
    return open(path, "ab")  # noqa: SIM115 - the caller closes it once the child has it


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


class JsonChild:
    """A child speaking JSON lines: commands on stdin, events on stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.events.put_nowait(json.loads(line))
        self.events.put_nowait(None)

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, *kinds: str, timeout: float) -> dict[str, Any]:
        """The next event whose ``ev`` is one of ``kinds`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchTimeout(f"{self.name}: no {'/'.join(kinds)} event within {timeout:.0f} s")
            try:
                ev = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                raise BenchTimeout(
                    f"{self.name}: no {'/'.join(kinds)} event within {timeout:.0f} s"
                ) from None
            if ev is None:
                raise BenchTimeout(
                    f"{self.name}: exited (code {self.proc.returncode}) before a {'/'.join(kinds)} event"
                )
            if ev.get("ev") in kinds:
                return ev

    async def close(self) -> None:
        """Ask the child to quit and give it 5 s (the caller then stops it by PID if needed)."""
        with contextlib.suppress(Exception):
            await self.send(op="quit")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)
        self._reader.cancel()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the ctxsync of this checkout, whatever is installed, and benchlib for the child roles
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SCRIPTS_DIR), str(REPO_DIR), env.get("PYTHONPATH", "")) if p
    )
    env.pop("CTXSYNC_HOME", None)
    env.pop("CTXSYNC_API", None)
    env.pop("CTXSYNC_LISTEN", None)
    return env


def compile_bytecode() -> str:
    """
    Write the bytecode of the ctxsync under test (``compileall``), as installing a package does.

    An installed ctxsync (``pip install``) has its bytecode, and an editable checkout gets it on
    its first run, unless ``PYTHONDONTWRITEBYTECODE`` is set (as in some sandboxes): then every
    daemon would compile about 14,500 lines of source at each start: 0.1-0.25 s of start-up
    (measured on importing the daemon's modules) that no installed daemon pays. It does not
    change a daemon's idle RSS (51.0 MiB either way, measured). Third-party packages were
    compiled by pip already. Returns what was done, for the machine description.
    """
    import compileall

    import ctxsync

    pkg = Path(ctxsync.__file__).resolve().parent
    ok = compileall.compile_dir(str(pkg), quiet=1)
    return f"compiled ({pkg})" if ok else f"compileall failed for {pkg}: daemons compile from source"


# -- machine ---------------------------------------------------------------------------


def ctxsync_source() -> str:
    """Where the ctxsync under test was imported from, and its git commit (``+dirty`` if changed)."""
    import subprocess

    import ctxsync

    pkg = Path(ctxsync.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(pkg.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return f"{pkg} (not a git checkout)"
        dirty = subprocess.run(
            ["git", "-C", str(pkg.parent), "status", "--porcelain", "--", "ctxsync"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return f"{pkg} (git {head.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''})"
    except (OSError, subprocess.SubprocessError):
        return str(pkg)


def machine_info(tmp_root: Path) -> dict[str, Any]:
    """CPU, cores, memory, OS, temp file system, Python and library versions, date, load."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "unknown"
    with contextlib.suppress(Exception):
        best = ""
        for part in psutil.disk_partitions(all=True):
            if str(tmp_root).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
                best, fs = part.mountpoint, f"{part.fstype} ({part.mountpoint})"

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {
        "ctxsync_source": ctxsync_source(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "tmp_fs": fs,
        "python": platform.python_version(),
        "ctxsync": ver("ctxsync"),
        "pycrdt": ver("pycrdt"),
        "pycrdt-websocket": ver("pycrdt-websocket"),
        "websockets": ver("websockets"),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
