"""
Fuzz the one ingest path with mutated real updates and frames (fixed seeds, bounded).

Every input must end in exactly one of: accepted (applied, stored), duplicate (nothing new),
or refused with a RemoteProtocolError. Anything else escaping is a failure. Afterwards the
context is readable and the store reloads to the same entries: nothing refused reached it.
The counts per outcome are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable

import pycrdt

from ctxsync.codec import Hello, SyncStep1, SyncStep2, SyncUpdate, encode
from ctxsync.entries import Clock, EntryMap
from ctxsync.errors import RemoteProtocolError
from ctxsync.protocol import PeerProtocol
from ctxsync.types import PROTOCOL_VERSION, DocId, NodeId
from tests.helpers import MS, NODE_A, NODE_B, wait_until
from tests.test_mesh import Node, make  # noqa: F401  (fixture)

UPDATES = 16_000
FRAMES = 8_000
SEED = 20261121


def real_updates(rng: random.Random, count: int) -> list[bytes]:
    """Updates as peers really send them: entry writes and deletes, plus a Y.Text edited alongside."""
    doc: pycrdt.Doc = pycrdt.Doc(client_id=rng.randrange(1, 2**31))  # type: ignore[type-arg]
    captured: list[bytes] = []
    doc.observe(lambda e: captured.append(e.update))
    ticks = iter(range(1_700_000_000_000, 1_800_000_000_000, 7))
    entries = EntryMap(doc, NodeId("FUZZ"), Clock(now_ms=lambda: next(ticks)))
    text = doc.get("notes", type=pycrdt.Text)
    for i in range(count):
        r = rng.random()
        if r < 0.6:
            entries.set(f"k{rng.randrange(50)}", f'{{"n": {i}, "s": "{"x" * rng.randrange(40)}"}}')
        elif r < 0.75:
            entries.delete(f"k{rng.randrange(50)}")
        else:
            text.insert(rng.randrange(len(text) + 1), "abc" * rng.randrange(1, 4))
    captured.append(doc.get_update())
    return captured


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One random damage: bit flip, byte set, insert, delete, truncate, splice, or a huge length."""
    b = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:
        b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
    elif kind == 3 and b:
        del b[rng.randrange(len(b))]
    elif kind == 4 and b:
        del b[rng.randrange(len(b)) :]
    elif kind == 5:
        other = rng.choice(pool)
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif kind == 6 and b:
        i = rng.randrange(len(b))
        b[i : i + 1] = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])  # a varuint of ~4 GiB
    else:
        for _ in range(rng.randrange(2, 6)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


async def test_fuzz_ingest_updates(make: Callable[[str], Node]) -> None:  # noqa: F811 (fixture)
    """Mutated real updates are accepted or refused cleanly, and nothing refused reaches the store."""
    rng = random.Random(SEED)
    pool = real_updates(rng, 400)
    na = make("a")
    mesh = await na.open([])
    doc_id = DocId("fuzz")
    outcomes: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    # In causal order: 39 damaged variants of each real update, then the update itself, so the
    # document grows as a peer's would and the damaged ones meet a document they could apply to.
    for n in range(UPDATES):
        base = pool[(n // 40) % len(pool)]
        data = mutate(rng, base, pool) if n % 40 != 39 else base
        try:
            result = mesh.ingest(NODE_B, doc_id, [data])
        except RemoteProtocolError as exc:
            reasons[str(exc)[:90]] += 1
            ctx = mesh.contexts.get(doc_id)
            if ctx is not None and ctx.rebuilding:
                # pycrdt failed on the real document after the checks passed: the context is
                # rebuilt from the store; wait for it, as later updates would be dropped meanwhile.
                outcomes["refused, context rebuilt"] += 1
                await wait_until(lambda: not mesh.contexts[doc_id].rebuilding, 5000 * MS)
            else:
                outcomes["refused"] += 1
            continue
        if result.missing:
            outcomes["missing dependencies (resync)"] += 1
            continue
        if not result.updates:
            outcomes["duplicate"] += 1
            continue
        outcomes["accepted"] += 1
        ctx = mesh.contexts[doc_id]
        for update in result.updates:
            ctx.version += 1
            ctx.entries.pop_changes()
            await mesh.store.append(doc_id, ctx.version, update)
    elapsed = time.monotonic() - started
    print(f"\n[fuzz] {UPDATES} updates in {elapsed:.1f} s: {dict(outcomes)}")
    for reason, count in reasons.most_common(8):
        print(f"[fuzz]   refused {count:6d}  {reason}")
    assert sum(outcomes.values()) == UPDATES
    assert outcomes["refused"] > UPDATES // 4 and outcomes["accepted"] >= len(pool) // 2
    live = {e.key: e.value for e in mesh.entries(doc_id)}
    assert not mesh.contexts[doc_id].rebuilding
    live_doc = mesh.contexts[doc_id].doc
    await na.close()
    na.store = type(na.store)(na.dir / "store.db")
    reopened = await na.open([])
    stored_entries = {e.key: e.value for e in reopened.entries(doc_id)}
    # Nothing but what the live document holds reached the store: the stored state adds
    # nothing to it, and it reloads to the same entries.
    changes: list[bytes] = []
    live_doc.observe(lambda e: changes.append(e.update))
    live_doc.apply_update(reopened.contexts[doc_id].doc.get_update())
    assert all(c == b"\x00\x00" for c in changes)
    print(f"[fuzz] store reloads {len(stored_entries)} entries ({len(live)} live)")
    assert stored_entries == live


def test_fuzz_frames() -> None:
    """Mutated real frames make the protocol raise RemoteProtocolError or yield messages, never anything else."""
    rng = random.Random(SEED + 1)
    pool = real_updates(rng, 200)
    frames = [
        encode(SyncStep1(DocId("ctx"), b"\x01\x02\x03")),
        *(encode(SyncStep2(DocId("ctx"), u)) for u in pool[:50]),
        *(encode(SyncUpdate(DocId("ctx"), tuple(pool[i : i + 3]))) for i in range(0, 150, 3)),
    ]
    hello = encode(Hello(PROTOCOL_VERSION, NODE_A, "peer"))
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for n in range(FRAMES):
        proto = PeerProtocol(NODE_B, "me", expected_peer=NODE_A, max_frame_bytes=1 << 20, max_message_bytes=1 << 22)
        proto.receive_frame(hello)
        proto.events_received()
        frame = rng.choice(frames)
        data = mutate(rng, frame, frames) if n % 10 else frame
        try:
            proto.receive_frame(data)
            outcomes["message" if proto.events_received() else "partial"] += 1
        except RemoteProtocolError:
            outcomes["refused"] += 1
    print(f"\n[fuzz] {FRAMES} frames in {time.monotonic() - started:.1f} s: {dict(outcomes)}")
    assert sum(outcomes.values()) == FRAMES and outcomes["refused"] > FRAMES // 4
