"""
Process and peer figures: psutil sampling and the periodic ``node.stats`` / ``peer.stats`` events.

psutil is sampled at most once per call of :meth:`ProcessSampler.sample` (the daemon calls
it once per ``stats_interval_s`` and for ``ctxsync status``). Field names carry units.
"""

from __future__ import annotations

import os
import time
from typing import Any

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
        alerts_active=len(status.get("alerts", [])),
    )
