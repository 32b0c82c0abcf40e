"""Tests of ctxsync.protocol: two sans-I/O PeerProtocols joined by a fake link (PeerPair)."""

from __future__ import annotations

from typing import Any

import pytest
from pycrdt import Doc, Map, TransactionEvent

from ctxsync.codec import (
    Ack,
    Chunk,
    Goodbye,
    Hello,
    Message,
    MessageType,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    encode,
    encode_chunked,
)
from ctxsync.errors import (
    DecodeError,
    HandshakeRejected,
    InvalidState,
    RemoteProtocolError,
    UnsupportedVersion,
)
from ctxsync.protocol import TRANSITIONS, PeerProtocol, State
from ctxsync.types import ENTRIES_ROOT, PROTOCOL_VERSION, DocId, NodeId
from tests.helpers import NODE_A, NODE_B, PeerPair

D = DocId("notes")
KIB = 1024
NODE_C = NodeId("-".join(["C" * 7] * 8))

# A valid frame of each type, as side "b" would receive it from side "a".
FRAME_OF: dict[MessageType, bytes] = {
    MessageType.HELLO: encode(Hello(PROTOCOL_VERSION, NODE_A, "alpha")),
    MessageType.SYNC_STEP1: encode(SyncStep1(D, b"\x00")),
    MessageType.SYNC_STEP2: encode(SyncStep2(D, b"\x00\x00")),
    MessageType.SYNC_UPDATE: encode(SyncUpdate(D, (b"\x00\x00",))),
    MessageType.CHUNK: encode(Chunk(True, encode(SyncStep2(D, b"\x00\x00")))),
    MessageType.GOODBYE: encode(Goodbye("bye")),
    MessageType.ACK: encode(Ack(0)),
}


def entries(doc: Doc[Any]) -> dict[str, Any]:
    return doc.get(ENTRIES_ROOT, type=Map).to_py()  # type: ignore[no-any-return]


def make_doc(items: dict[str, Any]) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    m = doc.get(ENTRIES_ROOT, type=Map)
    with doc.transaction():
        for k, v in items.items():
            m[k] = v
    return doc


def fresh_b() -> PeerProtocol:
    """Side "b" alone, in state HANDSHAKE."""
    return PeerProtocol(
        NODE_B, "beta", expected_peer=NODE_A, max_frame_bytes=64 * KIB, max_message_bytes=1 << 20
    )


def b_in_state(state: State) -> PeerProtocol:
    """Side "b" alone, brought to ``state`` by frames from "a"."""
    b = fresh_b()
    if state in (State.OPEN, State.CLOSED):
        b.receive_frame(FRAME_OF[MessageType.HELLO])
    if state is State.CLOSED:
        b.receive_frame(FRAME_OF[MessageType.GOODBYE])
    b.events_received()
    assert b.state is state
    return b


# -- handshake ------------------------------------------------------------------------


def test_hello_exchange_opens_both_sides() -> None:
    """After both Hellos each side is OPEN and knows the other's name."""
    pair = PeerPair()
    assert (pair.a.state, pair.b.state) == (State.HANDSHAKE, State.HANDSHAKE)
    events = pair.open()
    assert events == {
        "a": [Hello(PROTOCOL_VERSION, NODE_B, "beta")],
        "b": [Hello(PROTOCOL_VERSION, NODE_A, "alpha")],
    }
    assert (pair.a.state, pair.b.state) == (State.OPEN, State.OPEN)
    assert (pair.a.peer_name, pair.b.peer_name) == ("beta", "alpha")
    assert pair.sent == {
        "a": [FRAME_OF[MessageType.HELLO]],
        "b": [encode(Hello(PROTOCOL_VERSION, NODE_B, "beta"))],
    }


def test_one_sided_hello_opens_only_the_receiver() -> None:
    """The receive state follows what was received, not what was sent."""
    pair = PeerPair()
    pair.a.start()
    assert pair.pump() == {"a": [], "b": [Hello(PROTOCOL_VERSION, NODE_A, "alpha")]}
    assert (pair.a.state, pair.b.state) == (State.HANDSHAKE, State.OPEN)


def test_frames_and_events_are_drained_once() -> None:
    """frames_to_send and events_received return each item once."""
    b = fresh_b()
    b.start()
    assert len(b.frames_to_send()) == 1
    assert b.frames_to_send() == []
    b.receive_frame(FRAME_OF[MessageType.HELLO])
    assert len(b.events_received()) == 1
    assert b.events_received() == []


@pytest.mark.parametrize("kind", [t for t in MessageType if t is not MessageType.HELLO], ids=lambda t: t.name)
def test_message_before_hello_is_refused(kind: MessageType) -> None:
    """Only a Hello is accepted before the handshake."""
    b = fresh_b()
    with pytest.raises(RemoteProtocolError, match="not allowed in state handshake"):
        b.receive_frame(FRAME_OF[kind])
    assert b.state is State.HANDSHAKE
    assert b.events_received() == []


def test_hello_with_another_node_id_is_rejected() -> None:
    """A Hello claiming another node id than the certificate raises HandshakeRejected."""
    b = fresh_b()
    with pytest.raises(HandshakeRejected) as info:
        b.receive_frame(encode(Hello(PROTOCOL_VERSION, NODE_C, "mallory")))
    assert info.value.peer_id == NODE_A
    assert b.events_received() == []
    assert b.peer_name is None


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32])
def test_hello_with_another_version_is_unsupported(version: int) -> None:
    """A Hello with another protocol version raises UnsupportedVersion, a RemoteProtocolError."""
    b = fresh_b()
    with pytest.raises(UnsupportedVersion) as info:
        b.receive_frame(encode(Hello(version, NODE_A, "alpha")))
    assert info.value.version == version
    assert isinstance(info.value, RemoteProtocolError)
    assert b.events_received() == []


@pytest.mark.parametrize(
    "hello",
    [Hello(PROTOCOL_VERSION, NODE_C, "mallory"), Hello(PROTOCOL_VERSION + 1, NODE_A, "alpha")],
    ids=["wrong-node", "wrong-version"],
)
def test_refused_hello_does_not_open(hello: Hello) -> None:
    """After a refused Hello the protocol is not OPEN and still refuses sync messages."""
    b = fresh_b()
    with pytest.raises((HandshakeRejected, UnsupportedVersion)):
        b.receive_frame(encode(hello))
    assert b.state is State.HANDSHAKE
    assert b.peer_name is None
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(FRAME_OF[MessageType.SYNC_STEP1])


def test_second_hello_is_refused() -> None:
    """A Hello after the handshake is refused."""
    pair = PeerPair()
    pair.open()
    pair.a.start()
    with pytest.raises(RemoteProtocolError, match="HELLO not allowed in state open"):
        pair.pump()


def test_garbage_frame_is_a_decode_error() -> None:
    """A malformed frame raises DecodeError, in any state."""
    for state in State:
        with pytest.raises(DecodeError):
            b_in_state(state).receive_frame(b"\xff\xff")


# -- sync step 1 / step 2 / updates with real documents ---------------------------------


def test_step1_step2_round_trip_with_real_docs() -> None:
    """Each side answers the other's step 1 with a step 2 that brings it up to date."""
    doc_a = make_doc({"a1": "from a", "shared": 1})
    doc_b = make_doc({"b1": ["from", "b"], "nested": {"x": 1.5}})
    pair = PeerPair()
    pair.open()

    pair.a.send_step1(D, doc_a.get_state())
    pair.b.send_step1(D, doc_b.get_state())
    events = pair.pump()
    assert events == {"a": [SyncStep1(D, doc_b.get_state())], "b": [SyncStep1(D, doc_a.get_state())]}

    # Each answers with what the other's state vector misses.
    (step1_from_b,) = events["a"]
    (step1_from_a,) = events["b"]
    assert isinstance(step1_from_a, SyncStep1) and isinstance(step1_from_b, SyncStep1)
    pair.a.send_step2(D, doc_a.get_update(step1_from_b.state_vector))
    pair.b.send_step2(D, doc_b.get_update(step1_from_a.state_vector))
    events = pair.pump()
    (step2_at_a,) = events["a"]
    (step2_at_b,) = events["b"]
    assert isinstance(step2_at_a, SyncStep2) and isinstance(step2_at_b, SyncStep2)
    assert step2_at_b.update == doc_a.get_update(doc_b.get_state())

    # A fresh doc gets exactly the sender's content from a step 2 against an empty state.
    fresh: Doc[Any] = Doc()
    fresh.apply_update(step2_at_b.update)
    assert entries(fresh) == {"a1": "from a", "shared": 1}

    doc_a.apply_update(step2_at_a.update)
    doc_b.apply_update(step2_at_b.update)
    expected = {"a1": "from a", "shared": 1, "b1": ["from", "b"], "nested": {"x": 1.5}}
    assert entries(doc_a) == entries(doc_b) == expected
    # Neither has anything the other lacks (state vector bytes are not canonical: compare updates).
    assert doc_a.get_update(doc_b.get_state()) == doc_b.get_update(doc_a.get_state()) == b"\x00\x00"


def test_step2_to_a_fresh_doc_carries_everything() -> None:
    """A fresh doc's step 1 is answered with the full document."""
    doc_a = make_doc({f"k{i}": i for i in range(50)})
    doc_b: Doc[Any] = Doc()
    pair = PeerPair()
    pair.open()
    pair.b.send_step1(D, doc_b.get_state())
    (step1,) = pair.pump()["a"]
    assert isinstance(step1, SyncStep1)
    pair.a.send_step2(D, doc_a.get_update(step1.state_vector))
    (step2,) = pair.pump()["b"]
    assert isinstance(step2, SyncStep2)
    doc_b.apply_update(step2.update)
    assert entries(doc_b) == {f"k{i}": i for i in range(50)}


class Recorder:
    """A real document that records the update of every transaction."""

    def __init__(self) -> None:
        self.doc: Doc[Any] = Doc()
        self.map = self.doc.get(ENTRIES_ROOT, type=Map)
        self.updates: list[bytes] = []
        self.doc.observe(self._on_transaction)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self.updates.append(event.update)


def test_live_updates_are_batched_in_one_frame() -> None:
    """Several live updates of one context travel in one frame and apply in order."""
    rec = Recorder()
    for i in range(5):
        rec.map[f"k{i}"] = i
    del rec.map["k0"]
    assert len(rec.updates) == 6
    pair = PeerPair()
    pair.open()
    pair.a.send_updates(D, rec.updates)
    events = pair.pump()
    assert len(pair.sent["a"]) == 1
    assert events["b"] == [SyncUpdate(D, tuple(rec.updates))]
    other: Doc[Any] = Doc()
    for u in rec.updates:
        other.apply_update(u)
    assert entries(other) == {"k1": 1, "k2": 2, "k3": 3, "k4": 4}


def test_live_updates_larger_than_a_frame_split_in_order() -> None:
    """Updates that exceed a frame arrive as several SyncUpdates, none above the limit, in order."""
    rec = Recorder()
    for i in range(60):
        rec.map[f"k{i}"] = "v" * (i * 50)  # the largest ones exceed a 2 KiB frame alone
    pair = PeerPair(max_frame_bytes=2 * KIB)
    pair.open()
    pair.a.send_updates(D, rec.updates)
    events = pair.pump()["b"]
    assert len(events) > 1
    assert all(len(f) <= 2 * KIB for f in pair.sent["a"])
    assert any(f[0] == MessageType.CHUNK for f in pair.sent["a"])  # the largest went chunked
    assert all(isinstance(e, SyncUpdate) and e.doc_id == D for e in events)
    assert [u for e in events for u in e.updates] == rec.updates  # type: ignore[union-attr]


def test_large_step2_is_chunked_and_reassembled() -> None:
    """A step 2 of 20,000 keys crosses as many frames of at most 64 KiB and rebuilds exactly."""
    doc = make_doc({f"key{i:05d}": f"value {i}" for i in range(20_000)})
    update = doc.get_update()
    assert len(update) > 4 * 64 * KIB
    pair = PeerPair(max_frame_bytes=64 * KIB)
    pair.open()
    pair.a.send_step2(D, update)
    events = pair.pump()
    assert len(pair.sent["a"]) >= len(update) // (64 * KIB)
    assert max(len(f) for f in pair.sent["a"]) <= 64 * KIB
    assert events["b"] == [SyncStep2(D, update)]
    fresh: Doc[Any] = Doc()
    fresh.apply_update(events["b"][0].update)  # type: ignore[union-attr]
    assert entries(fresh) == entries(doc)


def test_chunks_yield_no_event_until_the_final_one() -> None:
    """Non-final chunks produce nothing; the final one produces the whole message."""
    message = SyncStep2(D, bytes(range(256)) * 40)
    frames = encode_chunked(message, 1 * KIB)
    b = b_in_state(State.OPEN)
    for f in frames[:-1]:
        b.receive_frame(f)
        assert b.events_received() == []
    b.receive_frame(frames[-1])
    assert b.events_received() == [message]
    # The buffer is reset: the next chunked message decodes on its own.
    for f in frames:
        b.receive_frame(f)
    assert b.events_received() == [message]


# -- chunk refusals -----------------------------------------------------------------------


def test_reassembly_above_max_message_bytes_is_refused() -> None:
    """A chunked message larger than max_message_bytes is refused while arriving."""
    pair = PeerPair(max_frame_bytes=4 * KIB, max_message_bytes=10_000)
    pair.open()
    pair.a.send_step2(D, b"x" * 20_000)
    with pytest.raises(RemoteProtocolError, match="max_message_bytes"):
        pair.pump()


def test_reassembly_limit_is_inclusive() -> None:
    """A chunked message of exactly max_message_bytes is accepted, one byte more is not."""
    message = SyncStep2(D, b"y" * 5000)
    inner = encode(message)
    frames = encode_chunked(message, 1 * KIB)
    ok = PeerProtocol(NODE_B, "beta", expected_peer=NODE_A, max_frame_bytes=KIB, max_message_bytes=len(inner))
    ok.receive_frame(FRAME_OF[MessageType.HELLO])
    for f in frames:
        ok.receive_frame(f)
    assert ok.events_received()[-1] == message
    tight = PeerProtocol(
        NODE_B, "beta", expected_peer=NODE_A, max_frame_bytes=KIB, max_message_bytes=len(inner) - 1
    )
    tight.receive_frame(FRAME_OF[MessageType.HELLO])
    with pytest.raises(RemoteProtocolError, match="max_message_bytes"):
        for f in frames:
            tight.receive_frame(f)


@pytest.mark.parametrize(
    "kind",
    [MessageType.SYNC_STEP1, MessageType.SYNC_STEP2, MessageType.SYNC_UPDATE, MessageType.GOODBYE],
    ids=lambda t: t.name,
)
def test_non_chunk_between_chunks_is_refused(kind: MessageType) -> None:
    """Once a chunked message started, only its chunks are accepted."""
    b = b_in_state(State.OPEN)
    b.receive_frame(encode(Chunk(False, encode(SyncStep2(D, b"x" * 10))[:5])))
    with pytest.raises(RemoteProtocolError, match="middle of a chunked message"):
        b.receive_frame(FRAME_OF[kind])


@pytest.mark.parametrize(
    "inner",
    [
        Hello(PROTOCOL_VERSION, NODE_A, "alpha"),
        SyncStep1(D, b"\x00"),
        Chunk(True, encode(SyncStep2(D, b""))),
        Goodbye("bye"),
    ],
    ids=["hello", "step1", "chunk", "goodbye"],
)
def test_chunk_carrying_a_forbidden_message_is_refused(inner: Message) -> None:
    """Only STEP2 and UPDATE may travel chunked."""
    b = b_in_state(State.OPEN)
    frame = encode(inner)
    b.receive_frame(encode(Chunk(False, frame[:2])))
    with pytest.raises(RemoteProtocolError, match="must be STEP2 or UPDATE"):
        b.receive_frame(encode(Chunk(True, frame[2:])))
    assert b.events_received() == []


def test_chunk_carrying_garbage_is_a_decode_error() -> None:
    """Reassembled bytes that do not decode raise DecodeError."""
    b = b_in_state(State.OPEN)
    b.receive_frame(encode(Chunk(False, b"\x02\x05not")))
    with pytest.raises(DecodeError):
        b.receive_frame(encode(Chunk(True, b"es")))  # name complete, update length missing


# -- goodbye and closing ----------------------------------------------------------------


def test_goodbye_closes_the_receiver() -> None:
    """Goodbye is delivered, then the receiver is CLOSED and refuses every later frame."""
    pair = PeerPair()
    pair.open()
    pair.a.send_goodbye("node stopping")
    assert pair.a.closing
    assert pair.pump() == {"a": [], "b": [Goodbye("node stopping")]}
    assert pair.b.state is State.CLOSED
    for frame in FRAME_OF.values():
        with pytest.raises(RemoteProtocolError, match="not allowed in state closed"):
            pair.b.receive_frame(frame)


def test_side_that_said_goodbye_still_receives() -> None:
    """Saying Goodbye stops sending, not receiving: the other side's in-flight frames are accepted."""
    pair = PeerPair()
    pair.open()
    pair.a.send_goodbye("bye")
    pair.b.send_step1(D, b"\x00")
    assert pair.pump() == {"a": [SyncStep1(D, b"\x00")], "b": [Goodbye("bye")]}
    assert pair.a.state is State.OPEN


@pytest.mark.parametrize(
    "send",
    [
        lambda p: p.send_step1(D, b"\x00"),
        lambda p: p.send_step2(D, b"\x00\x00"),
        lambda p: p.send_updates(D, [b"\x00\x00"]),
    ],
    ids=["step1", "step2", "updates"],
)
def test_send_after_goodbye_is_invalid(send: Any) -> None:
    """Nothing can be sent after send_goodbye."""
    pair = PeerPair()
    pair.open()
    pair.a.send_goodbye("bye")
    with pytest.raises(InvalidState):
        send(pair.a)
    assert pair.a.frames_to_send() == [encode(Goodbye("bye"))]


def test_goodbye_is_sent_once() -> None:
    """A second send_goodbye queues nothing."""
    b = fresh_b()
    b.send_goodbye("first")
    b.send_goodbye("second")
    assert b.frames_to_send() == [encode(Goodbye("first"))]


# -- the state table ------------------------------------------------------------------


def test_transitions_table_is_the_documented_protocol() -> None:
    """The table is Hello to open, sync messages, chunks and acks while open, Goodbye to close."""
    sync = {MessageType.SYNC_STEP1, MessageType.SYNC_STEP2, MessageType.SYNC_UPDATE, MessageType.CHUNK, MessageType.ACK}
    assert TRANSITIONS == {
        State.HANDSHAKE: {MessageType.HELLO: State.OPEN},
        State.OPEN: {**{t: State.OPEN for t in sync}, MessageType.GOODBYE: State.CLOSED},
        State.CLOSED: {},
    }


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("kind", list(MessageType), ids=lambda t: t.name)
def test_state_table_is_enforced(state: State, kind: MessageType) -> None:
    """A message in TRANSITIONS moves to the listed state; any other is refused."""
    b = b_in_state(state)
    if kind in TRANSITIONS[state]:
        b.receive_frame(FRAME_OF[kind])
        assert b.state is TRANSITIONS[state][kind]
        assert len(b.events_received()) == 1
    else:
        with pytest.raises(RemoteProtocolError, match="not allowed"):
            b.receive_frame(FRAME_OF[kind])
        assert b.state is state
        assert b.events_received() == []
