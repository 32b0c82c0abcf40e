"""
Process and peer figures: psutil sampling, the periodic ``node.stats`` / ``peer.stats`` events,
and the event loop watchdog (``loop.stalled`` / ``loop.resumed``).

psutil is sampled at most once per call of :meth:`ProcessSampler.sample` (the daemon calls
it once per ``stats_interval_s`` and for ``ctxsync status``). Field names carry units.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO

import psutil
import structlog

log = structlog.get_logger("ctxsync.metrics")


class ProcessSampler:
    """Samples this process with psutil: RSS, CPU percent since the last sample, fds, threads."""

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # prime: the first reading is relative to this call
        self.started_at = time.time()
        """Unix time the daemon started, in seconds."""

    def sample(self) -> dict[str, Any]:
        """
        Return ``{"rss_bytes", "cpu_percent", "num_fds", "num_threads", "uptime_s"}``.

        ``cpu_percent`` covers the time since the previous call (100 = one core busy).
        """
        with self._proc.oneshot():
            rss = self._proc.memory_info().rss
            cpu = self._proc.cpu_percent(None)
            fds = self._proc.num_fds() if hasattr(self._proc, "num_fds") else -1
            threads = self._proc.num_threads()
        return {
            "rss_bytes": rss,
            "cpu_percent": round(cpu, 1),
            "num_fds": fds,
            "num_threads": threads,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


def trim_memory() -> bool:
    """
    Give the C heap's free memory back to the operating system (glibc ``malloc_trim(0)``).

    CPython frees objects to its allocators, which keep the pages: after startup (imports,
    TLS set-up, loading the store) and after a burst of work the daemon's RSS stays at its
    high-water mark. The daemon calls this after startup and at each ``node.stats`` interval;
    it takes a few milliseconds. A no-op returning False where the C library has no
    ``malloc_trim`` (musl, macOS).

    Returns:
        True if memory was given back (glibc's own answer).
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
            _malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            pass
    if _malloc_trim is False:
        return False
    return bool(_malloc_trim(0))


_malloc_trim: Any = None


def log_stats(status: dict[str, Any]) -> None:
    """
    Log one ``peer.stats`` per configured peer and one ``node.stats``.

    Args:
        status: The daemon's status object: the mesh's (``peers``, ``contexts``) plus
            ``process`` (from :meth:`ProcessSampler.sample`) and ``store``.
    """
    for p in status["peers"]:
        log.info(
            "peer.stats",
            peer_id=p["node_id"],
            peer_name=p["name"],
            connected=p["connected"],
            rtt_ms=p["rtt_ms"],
            sent_bytes=p["sent_bytes"],
            received_bytes=p["received_bytes"],
            sent_updates=p["sent_updates"],
            received_updates=p["received_updates"],
            queued_bytes=p["queued_bytes"],
            reconnects=p["reconnects"],
            rtt_p50_ms=p.get("rtt_p50_ms"),
            rtt_p99_ms=p.get("rtt_p99_ms"),
            protocol_errors=p.get("protocol_errors", 0),
            contexts_in_sync=sum(1 for v in p["contexts"].values() if v["in_sync"]),
            contexts_out_of_sync={d: v["out_of_sync_s"] for d, v in p["contexts"].items() if not v["in_sync"]},
            contexts_shared=len(p["contexts"]),
        )
    proc = status["process"]
    log.info(
        "node.stats",
        rss_bytes=proc["rss_bytes"],
        cpu_percent=proc["cpu_percent"],
        num_fds=proc["num_fds"],
        num_threads=proc["num_threads"],
        uptime_s=proc["uptime_s"],
        contexts=len(status["contexts"]),
        entries=sum(c["entries"] for c in status["contexts"].values()),
        tombstones=sum(c.get("tombstones", 0) for c in status["contexts"].values()),
        peers_connected=sum(1 for p in status["peers"] if p["connected"]),
        peers_configured=len(status["peers"]),
        store_bytes=status["store"]["size_bytes"],
        updates_in_per_s=status.get("node", {}).get("updates_in_per_s"),
        updates_out_per_s=status.get("node", {}).get("updates_out_per_s"),
        loop_lag_ms=status.get("node", {}).get("loop_lag_ms"),
        loop_stalls_total=status.get("node", {}).get("loop_stalls_total", 0),
        contexts_loaded=status.get("node", {}).get("contexts_loaded"),
        alerts_active=len(status.get("alerts", [])),
    )


STACK_FRAMES = 8
"""Innermost frames of the loop thread given in a ``loop.stalled`` event."""
MAX_TRACEBACK_S = 86_400.0
"""Longest ``traceback_s`` (seconds): faulthandler's timer overflows on very large ones."""


class LoopWatchdog:
    """
    Tell when the asyncio event loop stops turning (a stall), from outside the loop.

    While one callback holds the loop (a large catch-up applied on it, a slow synchronous call,
    a hang inside an extension), nothing else in the daemon runs: no API answer, no ping, no
    ``node.stats``; the loop's own lag probe (``loop_lag_ms``) reports only once it turns again.
    So:

    - the loop sets a heartbeat every ``beat_s`` (a timer: ``min(stall_s / 4, 1)`` seconds);
    - a thread checks it as often; once the heartbeat is ``stall_s`` seconds overdue, it logs
      ``loop.stalled`` (WARNING, once per stall) with ``stalled_s`` so far and ``stack``, the
      innermost Python frames of the loop's thread (:func:`sys._current_frames`): where it is
      stuck;
    - when the heartbeat runs ``stall_s`` or more late, the loop logs ``loop.resumed`` (WARNING)
      with that delay in ``stalled_s``, and counts the stall (:attr:`stalls`). The delay is
      counted from when the heartbeat was due, so a stall that began up to ``beat_s`` after
      that is counted from ``stall_s + beat_s`` of length.

    A thread needs the GIL, and an extension may hold it for the whole stall (pycrdt does while
    it applies an update): then ``loop.stalled`` comes only after the stall, if at all, and its
    stack shows where the loop is by then. For that case ``traceback_s`` arms the standard
    library's :func:`faulthandler.dump_traceback_later`, whose C thread needs no GIL: a stall
    of ``traceback_s`` seconds or more appends the traceback of every thread to
    ``traceback_file`` (plain text, as Python prints it). Give it a regular file: re-arming
    waits for a dump under way to finish, with the GIL held, so a dump blocked on a pipe
    nobody reads would freeze the process. The timer is re-armed every ``traceback_s / 4``
    seconds, at a heartbeat, so a stall shorter than ``3/4 traceback_s - beat_s`` is never
    dumped. ``faulthandler`` has one such timer per process: this object owns it from
    :meth:`start` to :meth:`stop`.

    Args:
        stall_s: Seconds of delay that make a stall (> 0).
        traceback_s: Seconds of stall after which tracebacks are written: 0 (off), or from
            ``stall_s`` to :data:`MAX_TRACEBACK_S`.
        traceback_file: Where tracebacks go (a file with a descriptor); needed if
            ``traceback_s`` is not 0.

    Raises:
        ValueError: If a value is out of range, or ``traceback_s`` comes without a file.
    """

    def __init__(self, stall_s: float, traceback_s: float = 0.0, *, traceback_file: TextIO | None = None) -> None:
        if not 0 < stall_s < float("inf"):
            raise ValueError(f"stall_s must be a finite number > 0, got {stall_s!r}")
        if traceback_s != 0 and not stall_s <= traceback_s <= MAX_TRACEBACK_S:
            raise ValueError(f"traceback_s must be 0 or from stall_s ({stall_s!r}) to {MAX_TRACEBACK_S}, got {traceback_s!r}")
        if traceback_s and traceback_file is None:
            raise ValueError("traceback_s needs a traceback_file")
        self.stall_s = stall_s
        self.traceback_s = traceback_s
        self.beat_s = min(stall_s / 4, 1.0)
        self._traceback_file = traceback_file
        self.stalls = 0
        """Stalls ended so far (each logged as ``loop.resumed``)."""
        self.last_stall_s = 0.0
        """Length of the last stall, in seconds (0.0 before the first)."""
        self._due = 0.0  # time.monotonic() by which the next heartbeat should run
        self._reported_due = -1.0  # the _due a loop.stalled was logged for
        self._armed_at = -float("inf")
        self._loop_thread = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat and the watching thread (call from the running loop's thread)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._due = time.monotonic() + self.beat_s
        self._timer = self._loop.call_later(self.beat_s, self._beat)
        self._rearm(time.monotonic())
        self._thread = threading.Thread(target=self._watch, name="ctxsync-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat, the thread and the traceback timer (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.traceback_s and self._armed_at > -float("inf"):
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = -float("inf")

    def _beat(self) -> None:
        now = time.monotonic()
        try:
            late = now - self._due
            if late >= self.stall_s:
                self.stalls += 1
                self.last_stall_s = late
                log.warning("loop.resumed", stalled_s=round(late, 3), stalls=self.stalls)
            self._rearm(now)
        finally:  # whatever happened above, the heartbeat goes on
            self._due = now + self.beat_s
            if self._loop is not None and not self._stop.is_set():
                self._timer = self._loop.call_later(self.beat_s, self._beat)

    def _rearm(self, now: float) -> None:
        if not self.traceback_s or self._traceback_file is None or now - self._armed_at < self.traceback_s / 4:
            return
        try:
            faulthandler.dump_traceback_later(self.traceback_s, repeat=False, file=self._traceback_file, exit=False)
        except Exception as exc:  # the file has no usable descriptor any more
            log.warning("loop.watchdog_traceback_off", error=str(exc))
            self.traceback_s = 0.0
            return
        self._armed_at = now

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            now = time.monotonic()  # before reading _due: a heartbeat in between only moves it later
            due = self._due
            late = now - due
            if late >= self.stall_s and due != self._reported_due:
                self._reported_due = due
                log.warning("loop.stalled", stalled_s=round(late, 3), stack=self._stack())

    def _stack(self) -> list[str]:
        """The loop thread's innermost frames, outermost first: ``"dir/file.py:line function"``."""
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return []
        frames = traceback.extract_stack(frame)[-STACK_FRAMES:]
        return [f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in frames]


def _short_path(filename: str) -> str:
    """``filename`` relative to the import root it was found under (``ctxsync/mesh.py``, ``asyncio/events.py``)."""
    roots = sorted({os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *(p for p in sys.path if p)}, key=len)
    for root in reversed(roots):  # the longest, most specific root first
        if filename.startswith(root.rstrip(os.sep) + os.sep):
            return filename[len(root.rstrip(os.sep)) + 1 :]
    return os.path.basename(filename)
