"""Tests of ctxsync.metrics helpers that need no daemon."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from ctxsync.metrics import ProcessSampler, trim_memory


def test_trim_memory_gives_back_freed_heap() -> None:
    """After freeing many C-heap blocks, malloc_trim reports memory returned (glibc); never raises."""
    if not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None:
        pytest.skip("malloc_trim is glibc's (Linux)")
    blocks = [bytearray(1000) for _ in range(50_000)]  # 50 MB of small malloc blocks (above pymalloc's 512 B)
    del blocks
    assert trim_memory() is True
    sampler = ProcessSampler()
    assert sampler.sample()["rss_bytes"] > 0
