"""
Crash safety: real daemons killed with SIGKILL at seeded random moments, then restarted.

* An acknowledged write (a ``set`` that returned) is on disk: after SIGKILL and a restart the
  store opens cleanly and every acknowledged write is there, or was overwritten by a later
  write that was sent too. Writes in flight at the kill may or may not be there.
* The same while the store compacts after every commit, and while a large catch-up from a
  peer is being applied; a restarted node converges with its peer again.
* A damaged store (garbage, truncated, a zeroed page) is refused: ``ctxsync run`` exits 1 at
  once with one line on stderr naming the file, and the file is left byte for byte as it was.

Each test prints its figures (writes acknowledged / found after restart, restart time) to the
terminal, also under ``pytest -q``. Only daemons started here are killed, by their own PID.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctxsync.client import Client
from ctxsync.errors import ApiError, NotFound
from tests.integration.nodes import TIMEOUT_FACTOR, Node, wait_for

pytestmark = pytest.mark.integration

MakeNode = Callable[..., Node]

ABSENT: Any = object()
"""The state of a key that holds no value (never written, or deleted)."""


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a figure to the terminal even under ``pytest -q`` (output is captured otherwise)."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n    [crash] {line}", end="", flush=True)

    return emit


def set_compact_threshold(node: Node, rows: int) -> None:
    """Rewrite ``[store] compact_threshold`` in the node's config.toml (read at the next start)."""
    path = node.home / "config.toml"
    text = path.read_text()
    assert "compact_threshold = 2000" in text, text
    path.write_text(text.replace("compact_threshold = 2000", f"compact_threshold = {rows}"))


def timed_start(node: Node) -> float:
    """Start the daemon, wait for ``node.started``; return the seconds it took."""
    t0 = time.monotonic()
    node.start()
    return time.monotonic() - t0


def assert_opened_cleanly(node: Node) -> dict[str, Any]:
    """The run just started logged ``node.started`` and no error event; return ``node.started``."""
    events = node.events(since_start=True)
    started = [e for e in events if e["event"] == "node.started"]
    assert started, f"{node.name}: no node.started in {events[-5:]}"
    errors = [e for e in events if e.get("level") == "error"]
    assert not errors, f"{node.name}: error events after restart: {errors[:3]}"
    return started[0]


def sigkill(node: Node) -> None:
    """SIGKILL the daemon this test started (by its PID) and reap it."""
    assert node.proc is not None
    assert node.proc.poll() is None, f"{node.name} died on its own: {node.log_path.read_text()[-1500:]}"
    node.proc.kill()
    node.proc.wait(timeout=10 * TIMEOUT_FACTOR)


async def read_context(node: Node, context: str, prefix: str = "") -> dict[str, Any]:
    """The live entries of a context as ``{key: value}``; empty if the context does not exist."""
    async with Client.for_home(node.home, open_timeout=10 * TIMEOUT_FACTOR) as c:
        try:
            return await c.get_all(context, prefix)
        except NotFound:
            return {}


def context_of(node: Node, context: str, prefix: str = "") -> dict[str, Any]:
    return asyncio.run(read_context(node, context, prefix))


def store_rows(node: Node, tmp: Path) -> tuple[int, int]:
    """``(checkpoints, log rows)`` of a (possibly crashed) store, read from a copy of its files."""
    copy = tmp / f"inspect-{node.name}-{time.monotonic_ns()}"
    copy.mkdir()
    for suffix in ("", "-wal"):
        src = Path(f"{node.home / 'store.db'}{suffix}")
        if src.exists():
            shutil.copyfile(src, copy / f"store.db{suffix}")
    conn = sqlite3.connect(copy / "store.db")
    try:
        checkpoints = conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
        rows = conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
    finally:
        conn.close()
        shutil.rmtree(copy, ignore_errors=True)
    return int(checkpoints), int(rows)


# -- writing until the daemon is killed --------------------------------------------------------


@dataclass
class Op:
    """One ``set`` (value is JSON text) or delete (value is None) sent to the daemon."""

    seq: int
    key: str
    value: str | None
    acked: bool = False


@dataclass
class Run:
    """What one writer sent before and during a kill."""

    ops: list[Op] = field(default_factory=list)
    kill_after_s: float = 0.0
    failed: int = 0
    """Requests that got an error (they were in flight at the kill, or sent after it)."""

    @property
    def acked(self) -> int:
        return sum(op.acked for op in self.ops)


async def write_until_killed(
    node: Node,
    context: str,
    prefix: str,
    rng: random.Random,
    *,
    keys: int = 2000,
    batch: int = 100,
    min_acks: int = 1500,
    jitter_s: float = 0.05,
    max_s: float = 60.0,
) -> Run:
    """
    Pipeline ``set``/delete requests (``batch`` in flight at once, distinct keys per batch) on
    one API connection until the daemon is SIGKILLed at a seeded random moment.

    The first pass over ``keys`` keys creates them; later passes overwrite them and delete
    every fifth. Once a seeded random number of writes in ``[min_acks, 2 * min_acks]`` has
    been acknowledged, the kill lands after a further seeded random delay of at most
    ``jitter_s``, while the next batches are in flight.
    """
    assert keys % batch == 0
    loop = asyncio.get_running_loop()
    run = Run()
    t0 = loop.time()
    kill_target = rng.randint(min_acks, 2 * min_acks)
    killed: list[float] = []
    handle: asyncio.TimerHandle | None = None

    def kill() -> None:
        killed.append(loop.time())
        assert node.proc is not None
        if node.proc.poll() is None:
            node.proc.kill()

    async with Client.for_home(node.home) as client:
        seq = 0
        while True:
            assert loop.time() - t0 < max_s * TIMEOUT_FACTOR, f"no kill within {max_s} s ({run.acked} acked)"
            ops = []
            for _ in range(batch):
                key = f"{prefix}{seq % keys:05d}"
                delete = seq >= keys and seq % 5 == 0
                value = None if delete else json.dumps({"seq": seq, "pad": "p" * rng.randrange(8, 80)})
                ops.append(Op(seq, key, value))
                seq += 1
            run.ops += ops
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        client.set(context, op.key, op.value)
                        if op.value is not None
                        else client.delete(context, op.key)
                        for op in ops
                    ),
                    return_exceptions=True,
                ),
                timeout=30 * TIMEOUT_FACTOR,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            for op, result in zip(ops, results, strict=True):
                op.acked = not isinstance(result, BaseException)
            if errors:
                assert killed, f"a write failed before the kill: {errors[0]!r}"
                assert all(isinstance(e, ApiError) for e in errors), errors[:3]
                run.failed = len(errors)
                break
            if handle is None and run.acked >= kill_target:
                handle = loop.call_later(rng.uniform(0, jitter_s), kill)
    assert node.proc is not None
    await asyncio.to_thread(node.proc.wait, 10 * TIMEOUT_FACTOR)
    assert node.proc.returncode == -9, f"{node.name} exited {node.proc.returncode}, not by our SIGKILL"
    run.kill_after_s = killed[0] - t0
    return run


@dataclass
class Tally:
    acked: int = 0
    """Writes acknowledged before the kill."""
    survived: int = 0
    """Acknowledged writes found after the restart (as written, or overwritten by a later write)."""
    extra: int = 0
    """Writes not acknowledged (in flight at the kill) that were committed anyway."""
    violations: list[str] = field(default_factory=list)


def _state(value: str | None) -> Any:
    return ABSENT if value is None else json.loads(value)


def check_survivors(run: Run, found: dict[str, Any]) -> Tally:
    """
    Compare what a restarted node holds with what was written.

    For every key, the value found must be the state after its last acknowledged op, or the
    state after a later op (sent, not acknowledged, but committed). Anything else, an older
    value or an absent key whose creation was acknowledged, is a lost acknowledged write.
    """
    tally = Tally()
    by_key: dict[str, list[Op]] = {}
    for op in run.ops:
        by_key.setdefault(op.key, []).append(op)
    for key, ops in by_key.items():
        acked = [i for i, op in enumerate(ops) if op.acked]
        tally.acked += len(acked)
        got = found.get(key, ABSENT)
        # Index of the op whose state is what we found: the latest matching one (deletes repeat ABSENT).
        match = -1 if got is ABSENT else None
        for i in range(len(ops) - 1, -1, -1):
            if _state(ops[i].value) == got if got is not ABSENT else ops[i].value is None:
                match = i
                break
        last_acked = acked[-1] if acked else -1
        if match is None or match < last_acked:
            seen = "absent" if got is ABSENT else f"seq {got.get('seq') if isinstance(got, dict) else got!r}"
            tally.violations.append(f"{key}: found {seen}, last acknowledged op is seq {ops[last_acked].seq}")
            continue
        tally.survived += sum(1 for i in acked if i <= match)
        tally.extra += sum(1 for i in range(match + 1) if not ops[i].acked)
    strangers = sorted(set(found) - set(by_key))
    if strangers:
        tally.violations.append(f"keys never written: {strangers[:5]}")
    return tally


def crash_rounds(
    node: Node,
    seed: int,
    rounds: int,
    report: Callable[[str], None],
    tmp: Path,
    *,
    label: str,
    peer: Node | None = None,
    **write_kw: Any,
) -> None:
    """
    ``rounds`` times: write until SIGKILL, restart, check every acknowledged write (and, with
    ``peer``, that both nodes converge). Earlier rounds' data must stay as it was checked.
    """
    rng = random.Random(seed)
    kept: dict[str, Any] = {}  # every earlier round's context, as checked after its restart
    for r in range(rounds):
        prefix = f"s{seed}r{r}-"
        run = asyncio.run(write_until_killed(node, "crash", prefix, rng, **write_kw))
        checkpoints, log_rows = store_rows(node, tmp)
        restart_s = timed_start(node)
        started = assert_opened_cleanly(node)
        if peer is not None:
            converged_s = wait_converged(node, peer, "crash")
        found = context_of(node, "crash")
        tally = check_survivors(run, {k: v for k, v in found.items() if k.startswith(prefix)})
        report(
            f"{label} seed {seed} round {r}: killed after {run.kill_after_s:.2f} s, "
            f"acked {tally.acked}, found after restart {tally.survived} acked + {tally.extra} unacked-but-committed, "
            f"{run.failed} failed in flight; restart {restart_s:.2f} s ({started['entries']} entries from the store); "
            f"store at kill: {checkpoints} checkpoint(s), {log_rows} log rows"
            + (f"; converged with {peer.name} in {converged_s:.2f} s" if peer is not None else "")
        )
        assert not tally.violations, (
            f"{len(tally.violations)} acknowledged writes lost: {tally.violations[:5]}"
        )
        assert tally.survived == tally.acked and tally.acked >= write_kw.get("min_acks", 1500)
        if peer is None:  # with a peer, entries it held but this node lost arrive after node.started
            assert started["entries"] == len(found), (started["entries"], len(found))
        older = {k: v for k, v in found.items() if not k.startswith(prefix)}
        assert older == kept, "data of an earlier round changed after this round's crash"
        kept = found
        if peer is not None:
            assert_opened_cleanly(peer)  # the peer that stayed up logged no error either


def wait_converged(a: Node, b: Node, context: str, timeout: float = 60.0) -> float:
    """Wait until both nodes show the same entries for ``context``; return the seconds it took."""
    t0 = time.monotonic()
    wait_for(lambda: context_of(a, context) == context_of(b, context), timeout)
    return time.monotonic() - t0


# -- 1, 2: acknowledged writes survive SIGKILL ------------------------------------------------


@pytest.mark.parametrize("seed", [101, 202])
def test_acked_writes_survive_sigkill(
    make_node: MakeNode, tmp_path: Path, report: Callable[[str], None], seed: int
) -> None:
    """Thousands of pipelined writes, SIGKILL at a random moment, restart: every acknowledged write is there."""
    a = make_node("alice")
    report(f"alice initial start {timed_start(a):.2f} s")
    crash_rounds(a, seed, 3, report, tmp_path, label="sigkill")


def test_acked_writes_survive_sigkill_during_compaction(
    make_node: MakeNode, tmp_path: Path, report: Callable[[str], None]
) -> None:
    """With ``compact_threshold = 10`` the store compacts after nearly every commit; SIGKILL keeps every acked write."""
    a = make_node("alice")
    set_compact_threshold(a, 10)
    a.start()
    crash_rounds(a, 303, 3, report, tmp_path, label="compaction")


# -- 3: SIGKILL while a large catch-up from a peer is applied ----------------------------------


CATCH_UP_ENTRIES = 30_000


def test_sigkill_during_large_catch_up(make_node: MakeNode, report: Callable[[str], None]) -> None:
    """A new node killed during its 30,000-entry catch-up opens cleanly each time and converges."""
    a, b = make_node("alice"), make_node("bob")
    a.start()

    async def fill() -> None:
        async with Client.for_home(a.home) as c:
            for start in range(0, CATCH_UP_ENTRIES, 5000):
                items = [
                    (f"key-{i:06d}", json.dumps({"n": i, "pad": "c" * 40}))
                    for i in range(start, start + 5000)
                ]
                await c.set_many("big", items)  # type: ignore[arg-type]

    t0 = time.monotonic()
    asyncio.run(fill())
    report(f"catch-up: alice wrote {CATCH_UP_ENTRIES} entries in {time.monotonic() - t0:.2f} s")
    a.pair(b)
    wait_for(lambda: len(a.status()["peers"]) == 1, timeout=10)
    rng = random.Random(404)
    moments = ["at peer.connected", f"peer.connected + {rng.uniform(0.05, 0.6):.3f} s", "at sync.completed"]
    for moment in moments:
        restart_s = timed_start(b)
        started = assert_opened_cleanly(b)
        wait_for(lambda: any(e["event"] == "peer.connected" for e in b.events(since_start=True)), timeout=30)
        if "+" in moment:
            time.sleep(float(moment.split("+ ")[1].split()[0]))
        elif moment == "at sync.completed":
            wait_for(
                lambda: any(e["event"] == "sync.completed" for e in b.events(since_start=True)), timeout=60
            )
        synced_before_kill = any(e["event"] == "sync.completed" for e in b.events(since_start=True))
        sigkill(b)
        report(
            f"catch-up: bob started in {restart_s:.2f} s with {started['entries']} entries from its store; "
            f"SIGKILL {moment} (catch-up {'applied' if synced_before_kill else 'in progress'})"
        )
    restart_s = timed_start(b)
    started = assert_opened_cleanly(b)
    t0 = time.monotonic()
    wait_for(lambda: b.entry_count("big") == CATCH_UP_ENTRIES, timeout=90)
    caught_up_s = time.monotonic() - t0
    assert context_of(b, "big") == context_of(a, "big")
    assert_opened_cleanly(b)
    report(
        f"catch-up: final restart {restart_s:.2f} s with {started['entries']} entries from its store; "
        f"all {CATCH_UP_ENTRIES} entries after {caught_up_s:.2f} s more; alice and bob agree"
    )


# -- 4: a restarted node reconverges with its peer ---------------------------------------------


def test_killed_node_reconverges_with_peer(
    make_node: MakeNode, tmp_path: Path, report: Callable[[str], None]
) -> None:
    """Writes on A while B runs; SIGKILL A; restart A: A keeps every acked write and A and B agree."""
    a, b = make_node("alice"), make_node("bob")
    a.pair(b)
    a.start()
    b.start()
    wait_for(lambda: a.connected_to(b))
    crash_rounds(a, 505, 2, report, tmp_path, label="two-node", peer=b)
    assert context_of(b, "crash") == context_of(a, "crash")


# -- 5: a damaged store is refused and kept as it is -------------------------------------------


@dataclass(frozen=True)
class DonorStore:
    data: bytes
    page_size: int
    detected_page: int
    """0-based page near the middle whose zeroing ``PRAGMA quick_check`` reports."""
    silent_page: int
    """0-based page whose zeroing ``PRAGMA quick_check`` does not see (data inside a blob)."""
    key: bytes
    """The donor's store key file: its blobs open with this key only."""


def _quick_check(data: bytes, tmp: Path) -> list[str]:
    path = tmp / "probe.db"
    path.write_bytes(data)
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def _context_blobs(data: bytes, tmp: Path) -> list[bytes] | None:
    """The update and checkpoint blobs of a store image (what a context is rebuilt from), or None if unreadable."""
    path = tmp / "probe-blobs.db"
    path.write_bytes(data)
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT data FROM updates ORDER BY seq").fetchall()
        rows += conn.execute("SELECT data || state_vector FROM checkpoints ORDER BY doc_id").fetchall()
        return [bytes(r[0]) for r in rows]
    except sqlite3.Error:
        return None
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def _zero_page(data: bytes, page_size: int, page: int) -> bytes:
    return data[: page * page_size] + bytes(page_size) + data[(page + 1) * page_size :]


@pytest.fixture(scope="module")
def donor_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DonorStore]:
    """A real, cleanly closed store with 3,000 entries (about 160 pages), and two pages to zero."""
    root = tmp_path_factory.mktemp("donor")
    node = Node(root, "donor")
    node.init()
    try:
        node.start()

        async def fill() -> None:
            async with Client.for_home(node.home) as c:
                for start in range(0, 3000, 500):
                    await c.set_many(
                        "ctx",
                        [
                            (f"k{i:05d}", json.dumps({"i": i, "pad": "d" * 60}))
                            for i in range(start, start + 500)
                        ],
                    )
                for i in range(0, 3000, 7):
                    await c.set("ctx", f"k{i:05d}", json.dumps({"i": i, "again": True}))

        asyncio.run(fill())
        assert node.stop() == 0
    finally:
        node.kill()
    assert not Path(f"{node.home / 'store.db'}-wal").exists()  # checkpointed into store.db
    data = (node.home / "store.db").read_bytes()
    key = (node.home / "store.key").read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    assert pages > 50, pages
    mid = pages // 2
    detected = silent = None
    blobs = _context_blobs(data, root)
    for page in sorted(range(1, pages), key=lambda p: abs(p - mid)):  # page 0 holds the header
        damaged = _zero_page(data, page_size, page)
        ok = _quick_check(damaged, root) == ["ok"]
        # The silent page must hold content of the context itself (not history or snapshots,
        # which are read on request and refused then): its blobs must read back differently.
        if ok and silent is None and _context_blobs(damaged, root) != blobs:
            silent = page
        if not ok and detected is None:
            detected = page
        if detected is not None and silent is not None:
            break
    assert detected is not None and silent is not None
    yield DonorStore(data, page_size, detected, silent, key)


def _damage(kind: str, donor: DonorStore) -> bytes:
    if kind == "garbage":
        return random.Random(606).randbytes(64 * 1024)
    if kind == "truncated":
        return donor.data[: len(donor.data) // 2 + 1234]
    if kind == "zeroed-page":
        return _zero_page(donor.data, donor.page_size, donor.detected_page)
    if kind == "zeroed-blob-page":
        return _zero_page(donor.data, donor.page_size, donor.silent_page)
    raise AssertionError(kind)


def _digests(home: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.iterdir()) if p.is_file()}


@dataclass
class Refusal:
    returncode: int | None
    """None: the daemon did not refuse; it started and was killed by the test."""
    stdout: str
    stderr: str
    elapsed_s: float
    started: dict[str, Any] | None


def run_expecting_refusal(node: Node, tmp: Path) -> Refusal:
    """``ctxsync run``; wait for it to exit, or for ``node.started``, then SIGKILL it (this PID only)."""
    out, err = tmp / f"{node.name}.run.out", tmp / f"{node.name}.run.err"
    t0 = time.monotonic()
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctxsync", "run", "--home", str(node.home)],
            stdout=fo,
            stderr=fe,
            env=node.env,
        )
    try:
        wait_for(lambda: proc.poll() is not None or b'"node.started"' in out.read_bytes(), timeout=30)
    finally:
        elapsed = time.monotonic() - t0
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10 * TIMEOUT_FACTOR)
    stdout = out.read_text(errors="replace")
    started = next((json.loads(line) for line in stdout.splitlines() if '"node.started"' in line), None)
    return Refusal(
        None if started else proc.returncode, stdout, err.read_text(errors="replace"), elapsed, started
    )


@pytest.mark.parametrize(
    "kind",
    [
        "garbage",
        "truncated",
        "zeroed-page",
        "zeroed-blob-page",
    ],
)
def test_damaged_store_is_refused_and_kept(
    make_node: MakeNode, donor_store: DonorStore, tmp_path: Path, report: Callable[[str], None], kind: str
) -> None:
    """`ctxsync run` on a damaged store exits 1 at once with one stderr line naming the file; the file is unchanged."""
    a = make_node("alice")
    store = a.home / "store.db"
    store.write_bytes(_damage(kind, donor_store))
    (a.home / "store.key").write_bytes(donor_store.key)  # the donor's blobs are sealed with its key
    before = _digests(a.home)
    run = run_expecting_refusal(a, tmp_path)
    after = _digests(a.home)
    created = sorted(set(after) - set(before))
    if run.started is not None:
        outcome = f"NOT refused: started with {run.started['entries']} of 3000 entries"
    else:
        outcome = f"exit {run.returncode} in {run.elapsed_s:.2f} s, {len(run.stderr.strip().splitlines())} stderr line(s): {run.stderr.strip()[:150]!r}"
    report(
        f"damaged store ({kind}): {outcome}" + (f"; files created beside it: {created}" if created else "")
    )
    missing = set(before) - set(after)
    assert not missing, f"files deleted: {missing}"
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"files changed: {changed}"
    assert run.started is None, (
        f"the daemon started on a damaged store ({run.started['entries']} of 3000 entries)"
    )
    assert run.returncode == 1, (run.returncode, run.stderr, run.stdout[-500:])
    assert run.elapsed_s < 10 * TIMEOUT_FACTOR
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0], run.stderr
    failed = [json.loads(line) for line in run.stdout.splitlines() if '"node.failed"' in line]
    assert (
        len(failed) == 1 and failed[0]["error_type"] == "StoreCorrupt" and str(store) in failed[0]["error"]
    ), run.stdout


# -- growth: compaction must keep the log short -------------------------------------------------


def test_compaction_keeps_the_log_short(
    make_node: MakeNode, tmp_path: Path, report: Callable[[str], None]
) -> None:
    """With ``compact_threshold = 10``, 300 writes in 30 commits leave a checkpoint and a short log."""
    a = make_node("alice")
    set_compact_threshold(a, 10)
    a.start()

    async def write() -> None:
        async with Client.for_home(a.home) as c:
            for b in range(30):
                await asyncio.gather(
                    *(c.set("ctx", f"k{b}-{i}", json.dumps({"b": b, "i": i})) for i in range(10))
                )

    asyncio.run(write())
    assert a.stop() == 0
    checkpoints, rows = store_rows(a, tmp_path)
    report(
        f"compaction: 300 writes with compact_threshold = 10 left {checkpoints} checkpoint(s), {rows} log rows"
    )
    assert checkpoints == 1 and rows <= 20, (checkpoints, rows)
    a.start()
    assert len(context_of(a, "ctx")) == 300
