"""A full disk under the store: writes fail without a false acknowledgement, reads and peers go on, and it recovers."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctxsync import SyncClient
from ctxsync.errors import ApiError
from tests.integration.nodes import Node, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs mounted for this test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {cp.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full (bounded by its size)."""
    chunk = b"\0" * (256 * 1024)
    with open(path, "wb") as f:
        for _ in range(1000):  # 250 MiB at most; the disk is 24 MiB
            try:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                return
    raise AssertionError("the disk never filled")


def test_full_disk_refuses_writes_then_recovers(tmp_path: Path, small_disk: Path, make_node: Callable[..., Node]) -> None:
    """On a full disk `set` fails (exit 1, no false ack), reads and peer updates go on, and writes work again once space returns."""
    (small_disk / "alice").mkdir()
    (tmp_path / "alice").symlink_to(small_disk / "alice")
    a, b = make_node("alice"), make_node("bob")
    a.pair(b)
    a.start()
    b.start()
    wait_for(lambda: a.connected_to(b))
    a.cli("set", "ctx", "before", '"ok"')

    fill(small_disk / "filler")
    acked: dict[str, str] = {}
    failed: list[str] = []
    pad = "x" * 20_000
    for i in range(60):  # bounded: until SQLite hits the full disk
        key = f"k{i:02d}"
        cp = a.cli("set", "ctx", key, f'"{pad}{i}"', check=False)
        if cp.returncode == 0:
            acked[key] = f"{pad}{i}"
        else:
            assert cp.returncode == 1 and "store" in cp.stderr, cp.stderr
            failed.append(key)
            if len(failed) >= 2:
                break
    assert failed, "no write failed on a full disk"
    assert any(e["event"] == "store.append_failed" for e in a.events())
    # Reads and peers keep working while the store fails.
    assert a.get("ctx", "before") == "ok"
    b.cli("set", "ctx", "from-bob", '"still syncing"')
    wait_for(lambda: a.get("ctx", "from-bob") == "still syncing")
    assert a.status()["peers"][0]["connected"]

    (small_disk / "filler").unlink()
    wait_for(lambda: any(e["event"] == "store.recovered" for e in a.events()), timeout=30)
    a.cli("set", "ctx", "after", '"recovered"')
    assert a.stop() == 0
    a.start()
    for key, value in acked.items():
        assert a.get("ctx", key) == value, key
    assert a.get("ctx", "after") == "recovered"
    assert a.get("ctx", "from-bob") == "still syncing"


def test_changes_cursor_waits_for_a_version_whose_commit_failed(make_node: Callable[..., Node]) -> None:
    """A version that failed to commit, stored on retry after a later one, is not skipped by `changes`."""
    a, b = make_node("alice"), make_node("bob")
    a.pair(b)
    a.start()
    b.start()
    wait_for(lambda: a.connected_to(b))
    with SyncClient.for_home(a.home) as ca, SyncClient.for_home(b.home) as cb:
        ca.set("ctx", "k1", "1")  # alice's version 1
        blocker = sqlite3.connect(a.home / "store.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # alice's commits now fail (database is locked)
            with pytest.raises(ApiError, match="store"):
                ca.set("ctx", "k2", "2")  # version 2: applied, not acknowledged, kept for a retry
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # Bob's write becomes alice's version 3 and is stored at once, usually before version 2's
        # retry (half a second later): the history then has 1 and 3, and 2 comes later.
        cb.set("ctx", "k3", "3")
        seen: list[str] = []
        since = 0
        deadline = time.monotonic() + 30
        while len(seen) < 3:  # bounded by the deadline
            assert time.monotonic() < deadline, f"keys seen {seen}"
            page = ca.changes("ctx", since)
            seen += [ch["key"] for ch in page["changes"]]
            since = page["next"]
            time.sleep(0.02)
    assert seen == ["k1", "k2", "k3"]
    assert any(e["event"] == "store.append_failed" for e in a.events())
