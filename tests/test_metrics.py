"""Tests of ctxsync.metrics helpers that need no daemon: memory trimming, sampling, the loop watchdog."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from ctxsync.metrics import LoopWatchdog, ProcessSampler, trim_memory
from tests.helpers import wait_until


def test_trim_memory_gives_back_freed_heap() -> None:
    """After freeing many C-heap blocks, malloc_trim reports memory returned (glibc); never raises."""
    if not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None:
        pytest.skip("malloc_trim is glibc's (Linux)")
    blocks = [bytearray(1000) for _ in range(50_000)]  # 50 MB of small malloc blocks (above pymalloc's 512 B)
    del blocks
    assert trim_memory() is True
    sampler = ProcessSampler()
    assert sampler.sample()["rss_bytes"] > 0


# -- the event loop watchdog -----------------------------------------------------------------


def _hold_the_loop(seconds: float) -> None:
    """Block the calling (loop) thread for ``seconds``, releasing the GIL, as a slow syscall does."""
    time.sleep(seconds)


def _hold_the_loop_and_the_gil(seconds: float) -> None:
    """Block for ``seconds`` in C without releasing the GIL, as pycrdt does while it applies an update."""
    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call
    libc.usleep(ctypes.c_uint(int(seconds * 1_000_000)))


async def test_watchdog_logs_a_stall_where_it_happens_and_when_it_ends() -> None:
    """A callback that holds the loop 0.8 s: loop.stalled (with the stuck frame) while it lasts, then loop.resumed."""
    wd = LoopWatchdog(0.2)
    with structlog.testing.capture_logs() as logs:
        wd.start()
        try:
            await asyncio.sleep(0.3)  # a few heartbeats, no stall
            assert wd.stalls == 0
            asyncio.get_running_loop().call_soon(_hold_the_loop, 0.8)
            await wait_until(lambda: wd.stalls == 1, 10)
        finally:
            wd.stop()
    stalled = [e for e in logs if e["event"] == "loop.stalled"]
    resumed = [e for e in logs if e["event"] == "loop.resumed"]
    assert len(stalled) == 1 and len(resumed) == 1, logs
    assert stalled[0]["log_level"] == "warning" and 0.2 <= stalled[0]["stalled_s"] < 0.8
    assert any("test_metrics.py" in f and f.endswith(" _hold_the_loop") for f in stalled[0]["stack"]), stalled[0]
    assert 0.7 <= resumed[0]["stalled_s"] < 5 and resumed[0]["stalls"] == 1
    assert wd.last_stall_s == pytest.approx(resumed[0]["stalled_s"], abs=0.001)


@pytest.fixture
def traceback_file(tmp_path: Path) -> Iterator[TextIO]:
    """A file for faulthandler's tracebacks (it writes to the descriptor)."""
    with open(tmp_path / "tracebacks.txt", "w+") as f:
        yield f


async def test_watchdog_writes_tracebacks_even_while_the_gil_is_held(traceback_file: TextIO) -> None:
    """A native call holding the GIL 1 s (a hang's stand-in): faulthandler's C thread still writes the traceback."""
    with structlog.testing.capture_logs() as logs:
        wd = LoopWatchdog(0.2, traceback_s=0.4, traceback_file=traceback_file)
        wd.start()
        try:
            await asyncio.sleep(0.2)
            asyncio.get_running_loop().call_soon(_hold_the_loop_and_the_gil, 1.0)
            await wait_until(lambda: wd.stalls == 1, 10)
        finally:
            wd.stop()
    traceback_file.seek(0)
    text = traceback_file.read()
    assert "most recent call first" in text and "_hold_the_loop_and_the_gil" in text, text
    assert [e["event"] for e in logs if e["event"] == "loop.resumed"] == ["loop.resumed"]


async def test_watchdog_without_tracebacks_writes_none(traceback_file: TextIO) -> None:
    """traceback_s = 0: a long stall writes no traceback (the faulthandler timer is never armed)."""
    with structlog.testing.capture_logs():
        wd = LoopWatchdog(0.1, traceback_s=0, traceback_file=traceback_file)
        wd.start()
        try:
            asyncio.get_running_loop().call_soon(_hold_the_loop_and_the_gil, 0.6)
            await wait_until(lambda: wd.stalls == 1, 10)
        finally:
            wd.stop()
    traceback_file.seek(0)
    assert traceback_file.read() == ""


async def test_watchdog_is_quiet_while_the_loop_turns(traceback_file: TextIO) -> None:
    """Awaiting work, however long in total, is no stall: no event, nothing counted, and with
    traceback_s as short as allowed (stall_s) the heartbeats re-arm the timer in time: no traceback."""
    wd = LoopWatchdog(1.0, traceback_s=1.0, traceback_file=traceback_file)
    with structlog.testing.capture_logs() as logs:
        wd.start()
        try:
            for _ in range(75):  # 1.5 s of short steps
                await asyncio.sleep(0.02)
        finally:
            wd.stop()
    assert wd.stalls == 0 and wd.last_stall_s == 0.0
    assert [e for e in logs if e["event"].startswith("loop.")] == []
    traceback_file.seek(0)
    assert traceback_file.read() == ""


def test_watchdog_refuses_bad_thresholds(traceback_file: TextIO) -> None:
    with pytest.raises(ValueError, match="stall_s"):
        LoopWatchdog(0)
    with pytest.raises(ValueError, match="stall_s"):
        LoopWatchdog(float("nan"))
    for bad in (-1, 0.5, 1e10):  # negative, shorter than stall_s, beyond faulthandler's timer
        with pytest.raises(ValueError, match="traceback_s"):
            LoopWatchdog(1.0, traceback_s=bad, traceback_file=traceback_file)
    with pytest.raises(ValueError, match="traceback_file"):
        LoopWatchdog(1.0, traceback_s=2.0)


def test_stack_paths_are_relative_to_their_import_root() -> None:
    """Frames name files as imported: ctxsync's own, the standard library's and installed packages' alike."""
    import json.decoder

    import websockets.asyncio.server

    import ctxsync.mesh
    from ctxsync.metrics import _short_path

    assert _short_path(ctxsync.mesh.__file__) == "ctxsync/mesh.py"
    assert _short_path(json.decoder.__file__) == "json/decoder.py"
    assert _short_path(websockets.asyncio.server.__file__) == "websockets/asyncio/server.py"
