"""Unit tests of ctxsync.daemon helpers that need no running daemon (the daemon itself: tests/integration)."""

from __future__ import annotations

from ctxsync.daemon import IdleContexts
from ctxsync.types import DocId

A, B, C = DocId("a"), DocId("b"), DocId("c")


def test_idle_contexts_are_those_unchanged_for_idle_s() -> None:
    """A context is due once its version has stayed the same for idle_s; a new version starts the wait again."""
    idle = IdleContexts(60.0)
    assert idle.due({A: 1, B: 5}, now=0.0) == []  # first seen: the wait starts
    assert idle.due({A: 1, B: 6}, now=59.9) == []
    assert idle.due({A: 1, B: 6}, now=60.0) == [A]  # B changed at 59.9
    assert idle.due({A: 1, B: 6, C: 1}, now=119.8) == [A]
    assert idle.due({A: 1, B: 6, C: 1}, now=119.9) == [A, B]  # in the mapping's order
    assert idle.due({A: 2, B: 6, C: 1}, now=200.0) == [B, C]  # A was written: it waits again
    assert idle.due({A: 2, B: 6, C: 1}, now=260.0) == [A, B, C]


def test_a_context_that_goes_away_is_forgotten() -> None:
    """A context missing from a sample is dropped, and starts its wait again if it comes back."""
    idle = IdleContexts(10.0)
    idle.due({A: 1}, now=0.0)
    assert idle.due({A: 1}, now=10.0) == [A]
    assert idle.due({}, now=11.0) == []
    assert idle.due({A: 1}, now=12.0) == []
    assert idle.due({A: 1}, now=22.0) == [A]
