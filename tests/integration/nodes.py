"""
Real daemons for integration tests: ``ctxsync`` subprocesses on loopback, one home each.

:class:`Node` runs the CLI exactly as a user would (``python -m ctxsync ...``), starts
``ctxsync run`` with its JSON log going to a file, and reads that log back as events.
Only processes started here are ever signalled, by their own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import wait_until_sync

TIMEOUT_FACTOR = float(os.environ.get("CTXSYNC_TESTS_TIMEOUT_FACTOR", "1"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux's default range is 32768-60999)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports on 127.0.0.1 that were free a moment ago.

    Taken below the kernel's ephemeral range when it leaves room (ports 10000 and up, drawn at
    random): a port the kernel handed out by ``bind(0)`` comes from that range, so an outgoing
    connection made before the daemon binds it (another node dialing, a CLI call) could take it
    as its local port. That once failed a CI run: "address already in use" at a node's start.

    All are bound at once before any is released: two ports picked one after the other can be the
    same one (the kernel may hand a just-released port out again), which once made a node's API
    and sync listener collide in CI.
    """
    low, high = 10000, _ephemeral_low() - 1
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(n):
            for _attempt in range(100 if high - low >= 1000 else 0):
                port = random.randint(low, high)
                s = stack.enter_context(socket.socket())
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # taken (or just picked for this call)
                    continue
                ports.append(port)
                break
            else:  # no room below the ephemeral range, or no luck: the kernel's choice
                s = stack.enter_context(socket.socket())
                s.bind(("127.0.0.1", 0))
                ports.append(int(s.getsockname()[1]))
        return ports


class Node:
    """One ctxsync node: a home in ``tmp_path`` and, while running, its daemon process."""

    def __init__(self, root: Path, name: str, *, env: dict[str, str] | None = None, netns: str | None = None) -> None:
        self.name = name
        self.home = root / name
        self.listen_port, self.api_port = free_ports(2)
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "CTXSYNC_STATS_INTERVAL_S": "1",
            # mDNS would multicast on the host's network: tests stay on loopback. Tests of
            # discovery turn it on inside a network namespace of their own (``netns``).
            "CTXSYNC_DISCOVERY": "off",
            **(env or {}),
        }
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.env.pop("CTXSYNC_HOME", None)
        self.node_id = ""

    # -- CLI -------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``ctxsync ARGS --home HOME``; with ``check``, fail the test on a non-zero exit."""
        cp = subprocess.run(
            [*self.prefix, sys.executable, "-m", "ctxsync", *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout * TIMEOUT_FACTOR,
        )
        if check and cp.returncode != 0:
            raise AssertionError(f"ctxsync {' '.join(args)} on {self.name} exited {cp.returncode}: {cp.stderr.strip()}")
        return cp

    def init(self, *extra: str) -> str:
        """``ctxsync init`` with free loopback ports; return the node id."""
        out = self.cli(
            "init", "--name", self.name, "--listen", f"127.0.0.1:{self.listen_port}", "--api", f"127.0.0.1:{self.api_port}", *extra
        )
        self.node_id = out.stdout.strip()
        return self.node_id

    def card(self) -> str:
        """This node's peer card (``ctxsync export``)."""
        return self.cli("export").stdout.strip()

    def pair(self, other: Node) -> None:
        """Pair both ways through peer cards."""
        self.cli("peer", "add", other.card())
        other.cli("peer", "add", self.card())

    def get(self, context: str, key: str | None = None) -> Any:
        """``ctxsync get``; returns the parsed JSON, or None if it exits 1 (absent)."""
        args = ["get", context] + ([key] if key is not None else [])
        cp = self.cli(*args, check=False)
        if cp.returncode == 1:
            return None
        assert cp.returncode == 0, cp.stderr
        return json.loads(cp.stdout)

    def status(self) -> dict[str, Any]:
        """``ctxsync status --json``."""
        return dict(json.loads(self.cli("status", "--json").stdout))

    def try_status(self) -> dict[str, Any] | None:
        """``ctxsync status --json``, or None if the daemon did not answer (e.g. busy applying a large catch-up)."""
        cp = self.cli("status", "--json", check=False)
        return dict(json.loads(cp.stdout)) if cp.returncode == 0 else None

    def entry_count(self, context: str) -> int | None:
        """Live entries of ``context`` per ``status``, or None if absent or the daemon did not answer."""
        st = self.try_status()
        return None if st is None else st["contexts"].get(context, {}).get("entries")

    # -- daemon ----------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Start ``ctxsync run``; with ``wait``, return once ``node.started`` is logged."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "ctxsync", "run", "--home", str(self.home)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        if wait:
            wait_until_sync(lambda: self._started() or self._died(), 20 * TIMEOUT_FACTOR)
            assert not self._died(), f"{self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"

    def _started(self) -> bool:
        return any(e["event"] == "node.started" for e in self.events(since_start=True))

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        """Signal the daemon (only the one this object started) and wait; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout * TIMEOUT_FACTOR)
        return code

    def kill(self) -> None:
        """SIGKILL, for cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def events(self, name: str | None = None, *, since_start: bool = False) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (parsed); non-JSON lines fail the test."""
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        if since_start:
            data = data[getattr(self, "_log_offset", 0) :]
        out = []
        for line in data.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                raise AssertionError(f"{self.name}: log line is not JSON: {line!r}") from None
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def connected_to(self, *others: Node) -> bool:
        """True when ``status`` shows every one of ``others`` connected."""
        st = self.status()
        up = {p["node_id"] for p in st["peers"] if p["connected"]}
        return all(o.node_id in up for o in others)


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    """wait_until_sync with the suite's timeout factor applied."""
    wait_until_sync(predicate, timeout * TIMEOUT_FACTOR)


