"""Tests of ctxsync.codec: wire messages, lib0 encoding, chunking. Pure and synchronous."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxsync.codec import (
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    MAX_UPDATES_PER_FRAME,
    Ack,
    Chunk,
    Goodbye,
    Hello,
    Message,
    MessageType,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode,
    encode,
    encode_chunked,
    pack_updates,
)
from ctxsync.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from ctxsync.types import MAX_DOC_ID_CHARS, PROTOCOL_VERSION, DocId
from tests.helpers import NODE_A, varuint

D = DocId("notes")
MIB = 1 << 20



def varbytes(b: bytes) -> bytes:
    return varuint(len(b)) + b


SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, NODE_A, "alpha"),
    Hello(0, "", ""),
    Hello(PROTOCOL_VERSION, NODE_A, "ünïcødé ☃ 名前 🚀"),
    Hello(PROTOCOL_VERSION, "x" * MAX_NAME_CHARS, "é" * MAX_NAME_CHARS),
    SyncStep1(D, b"\x00"),
    SyncStep1(DocId("a"), b""),
    SyncStep2(DocId("team:ops.v2_x-Y"), b""),
    SyncStep2(D, bytes(range(256)) * 4),
    SyncStep2(DocId("n" * MAX_DOC_ID_CHARS), b"\x01\x02"),
    SyncUpdate(D, ()),
    SyncUpdate(D, (b"",)),
    SyncUpdate(D, (b"a", b"", b"c" * 300, bytes(range(256)))),
    SyncUpdate(D, (b"u",), 1_767_000_000_123),
    SyncStep1(D, b"\x00", "lineage-Id_22-chars-xx"),
    Ack(0),
    Ack(2**40),
    Chunk(False, b""),
    Chunk(True, b"xyz"),
    Chunk(False, b"\x00" * 200),
    Goodbye(""),
    Goodbye("node stopping ☃"),
    Goodbye("r" * MAX_REASON_CHARS),
]

# One non-trivial valid frame of each type, for the malformed-input tests.
FRAMES_BY_TYPE: dict[MessageType, bytes] = {
    MessageType.HELLO: encode(Hello(PROTOCOL_VERSION, NODE_A, "ünï")),
    MessageType.SYNC_STEP1: encode(SyncStep1(D, b"\x01\x02\x03")),
    MessageType.SYNC_STEP2: encode(SyncStep2(D, b"\x00" * 130)),
    MessageType.SYNC_UPDATE: encode(SyncUpdate(D, (b"ab", b"", b"c" * 129))),
    MessageType.CHUNK: encode(Chunk(True, b"part")),
    MessageType.GOODBYE: encode(Goodbye("bye ☃")),
    MessageType.ACK: encode(Ack(300)),
}


def test_decode_error_is_a_remote_protocol_error() -> None:
    """A malformed frame is the peer's fault."""
    assert issubclass(DecodeError, RemoteProtocolError)


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=repr)
def test_round_trip(message: Message) -> None:
    """Decoding an encoded message gives back an equal message."""
    frame = encode(message)
    assert isinstance(frame, bytes)
    assert decode(frame) == message


def frame_type(frame: bytes) -> MessageType:
    return MessageType(frame[0])


def type_of(message: Message) -> MessageType:
    return {
        Hello: MessageType.HELLO,
        SyncStep1: MessageType.SYNC_STEP1,
        SyncStep2: MessageType.SYNC_STEP2,
        SyncUpdate: MessageType.SYNC_UPDATE,
        Chunk: MessageType.CHUNK,
        Goodbye: MessageType.GOODBYE,
        Ack: MessageType.ACK,
    }[type(message)]


@pytest.mark.parametrize("message", SAMPLES, ids=repr)
def test_frame_starts_with_message_type(message: Message) -> None:
    """The first byte of a frame is the message type."""
    assert frame_type(encode(message)) == type_of(message)


def test_message_types_are_stable() -> None:
    """Message type numbers are part of the wire format."""
    assert {t.name: t.value for t in MessageType} == {
        "HELLO": 0,
        "SYNC_STEP1": 1,
        "SYNC_STEP2": 2,
        "SYNC_UPDATE": 3,
        "CHUNK": 4,
        "GOODBYE": 5,
        "ACK": 6,
    }


def test_encoding_matches_the_documented_layout() -> None:
    """Every field is a varuint, varbytes or varstring, in the documented order."""
    assert encode(Hello(1, "n", "é")) == b"\x00\x01" + varbytes(b"n") + varbytes("é".encode())
    assert encode(SyncStep1(D, b"sv")) == b"\x01" + varbytes(b"notes") + varbytes(b"sv") + varbytes(b"")
    assert encode(SyncStep1(D, b"sv", "L1")) == b"\x01" + varbytes(b"notes") + varbytes(b"sv") + varbytes(b"L1")
    assert encode(SyncStep2(D, b"up")) == b"\x02" + varbytes(b"notes") + varbytes(b"up")
    assert encode(SyncUpdate(D, (b"u", b""))) == b"\x03" + varbytes(b"notes") + b"\x02\x01u\x00" + b"\x00"
    assert encode(SyncUpdate(D, (b"u",), 300)) == b"\x03" + varbytes(b"notes") + b"\x01\x01u" + varuint(300)
    assert encode(Ack(5)) == b"\x06\x05\x00" and encode(Ack(5, 300)) == b"\x06\x05" + varuint(300)
    assert encode(Chunk(True, b"p")) == b"\x04\x01\x01p"
    assert encode(Chunk(False, b"")) == b"\x04\x00\x00"
    assert encode(Goodbye("bye")) == b"\x05" + varbytes(b"bye")


@pytest.mark.parametrize(
    "message",
    [
        SyncStep2(D, bytes(range(256)) * (3 * MIB // 256)),
        SyncUpdate(D, (b"\x01" * (2 * MIB), b"", b"\x02" * (MIB + 1))),
        Chunk(True, b"\xff" * (4 * MIB)),
    ],
    ids=["step2-3MiB", "update-3MiB", "chunk-4MiB"],
)
def test_round_trip_multi_megabyte(message: Message) -> None:
    """Multi-megabyte payloads round-trip unchanged."""
    assert decode(encode(message)) == message


def test_zero_count_update_list_round_trips() -> None:
    """A SyncUpdate with no updates is one count byte after the name (then origin_ms)."""
    frame = encode(SyncUpdate(D, ()))
    assert frame == b"\x03\x05notes\x00\x00"
    assert decode(frame) == SyncUpdate(D, ())


def test_long_goodbye_reason_is_truncated() -> None:
    """A Goodbye reason longer than MAX_REASON_CHARS is cut, so the frame still decodes."""
    assert decode(encode(Goodbye("é" * (MAX_REASON_CHARS + 10)))) == Goodbye("é" * MAX_REASON_CHARS)


# -- varuint --------------------------------------------------------------------------

VARUINT_CASES = [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2**32 - 1, b"\xff\xff\xff\xff\x0f"),
    (2**53, b"\x80\x80\x80\x80\x80\x80\x80\x10"),
    (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    (2**64 - 1, b"\xff" * 9 + b"\x01"),
]


@pytest.mark.parametrize(("value", "encoded"), VARUINT_CASES, ids=[str(v) for v, _ in VARUINT_CASES])
def test_varuint_edge_values(value: int, encoded: bytes) -> None:
    """Varuints use 7 bits a byte, least significant group first, and round-trip."""
    frame = encode(Hello(value, "", ""))
    assert frame == b"\x00" + encoded + b"\x00\x00"
    assert decode(frame) == Hello(value, "", "")


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16383, 16384, 2**21])
def test_varbytes_length_prefix_edges(length: int) -> None:
    """A payload whose length needs one, two or three varuint bytes round-trips."""
    message = SyncStep2(D, b"\x07" * length)
    frame = encode(message)
    assert frame == b"\x02\x05notes" + varuint(length) + message.update
    assert decode(frame) == message


def test_negative_varuint_cannot_be_encoded() -> None:
    """Encoding a negative integer is a local bug."""
    with pytest.raises(LocalProtocolError):
        encode(Hello(-1, "", ""))


def test_encode_refuses_a_non_message() -> None:
    """Encoding something that is not a Message is a local bug."""
    with pytest.raises(LocalProtocolError):
        encode("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frame",
    [
        b"\x80" * 10 + b"\x01",  # 11-byte varuint as the type
        b"\x00" + b"\xff" * 10 + b"\x00",  # 11-byte protocol version
        b"\x05" + b"\x80" * 20 + b"\x00",  # 21-byte reason length
        b"\x80" * 1000,  # never ends
    ],
    ids=["type", "version", "length", "endless"],
)
def test_over_long_varuint_is_refused(frame: bytes) -> None:
    """A varuint of more than ten bytes is refused."""
    with pytest.raises(DecodeError):
        decode(frame)


@pytest.mark.parametrize("value", [2**64, 2**70 - 1])
def test_varuint_above_64_bits_is_refused(value: int) -> None:
    """A varuint of 2**64 or more is refused, as the 64-bit limit says."""
    with pytest.raises(DecodeError):
        decode(b"\x00" + varuint(value) + b"\x00\x00")


# -- malformed input ------------------------------------------------------------------


def test_empty_frame_is_refused() -> None:
    """An empty frame has no message type."""
    with pytest.raises(DecodeError):
        decode(b"")


@pytest.mark.parametrize("kind", [7, 8, 127, 128, 2**32, 2**63])
def test_unknown_message_type_is_refused(kind: int) -> None:
    """A message type outside 0..6 is refused."""
    with pytest.raises(DecodeError, match="unknown message type"):
        decode(varuint(kind) + b"\x00" * 8)


@pytest.mark.parametrize("kind", list(MessageType), ids=lambda t: t.name)
def test_truncated_at_every_offset_is_refused(kind: MessageType) -> None:
    """Every proper prefix of a valid frame is refused."""
    frame = FRAMES_BY_TYPE[kind]
    decode(frame)  # the whole frame is valid
    for end in range(len(frame)):
        with pytest.raises(DecodeError):
            decode(frame[:end])


@pytest.mark.parametrize("kind", list(MessageType), ids=lambda t: t.name)
@pytest.mark.parametrize("extra", [b"\x00", b"\xff\xff", b"trailing"])
def test_trailing_bytes_are_refused(kind: MessageType, extra: bytes) -> None:
    """Bytes after the last field are refused."""
    with pytest.raises(DecodeError, match="trailing"):
        decode(FRAMES_BY_TYPE[kind] + extra)


@pytest.mark.parametrize(
    "prefix",
    [
        b"\x05",  # GOODBYE reason
        b"\x04\x01",  # CHUNK data
        b"\x02\x05notes",  # STEP2 update
        b"\x01",  # STEP1 doc_id
        b"\x00\x01",  # HELLO node_id
        b"\x03\x05notes\x01",  # the one update of an UPDATE
    ],
    ids=["goodbye", "chunk", "step2", "step1-name", "hello-node", "update"],
)
@pytest.mark.parametrize("claimed", [2, 1000, 2**40, 2**63 - 1])
def test_length_beyond_the_frame_is_refused_without_allocating(prefix: bytes, claimed: int) -> None:
    """A length larger than the bytes left fails at once, without allocating it."""
    frame = prefix + varuint(claimed) + b"x"
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="exceeds"):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_tiny_frame_claiming_2_pow_40_bytes_fails_fast() -> None:
    """A 7-byte frame that claims a terabyte-long reason is refused before anything is allocated."""
    frame = b"\x05" + varuint(2**40)
    assert len(frame) == 7
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="exceeds"):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    "count",
    [2, 5, MAX_UPDATES_PER_FRAME, MAX_UPDATES_PER_FRAME + 1, 2**40, 2**63],
)
def test_update_count_beyond_the_frame_is_refused(count: int) -> None:
    """An update count larger than the bytes left (or the cap) fails before allocating."""
    frame = b"\x03\x05notes" + varuint(count) + b"\x00"
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="update count"):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_update_count_above_the_cap_is_refused_even_if_bytes_suffice() -> None:
    """More than MAX_UPDATES_PER_FRAME updates in one frame is refused."""
    count = MAX_UPDATES_PER_FRAME + 1
    frame = b"\x03\x05notes" + varuint(count) + b"\x00" * count
    with pytest.raises(DecodeError, match="update count"):
        decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x01" + varbytes(b"\xff") + varbytes(b"n"),  # node_id
        b"\x00\x01" + varbytes(b"n") + varbytes(b"caf\xc3"),  # name: truncated sequence
        b"\x00\x01" + varbytes(b"n") + varbytes(b"\xed\xa0\x80"),  # name: encoded surrogate
        b"\x01" + varbytes(b"\xc3\x28") + varbytes(b""),  # doc_id
        b"\x05" + varbytes(b"bye \xfe"),  # reason
        b"\x05" + varbytes(b"\xc0\xaf"),  # reason: over-long encoding
    ],
    ids=["node_id", "name", "surrogate", "doc_id", "reason", "overlong"],
)
def test_invalid_utf8_is_refused(frame: bytes) -> None:
    """A string field that is not valid UTF-8 is refused."""
    with pytest.raises(DecodeError, match="UTF-8"):
        decode(frame)


BAD_DOC_IDS = [
    "",
    ".hidden",
    "a b",
    "a/b",
    "caf\u00e9",
    "名前",
    "x" * (MAX_DOC_ID_CHARS + 1),
    "tab\t",
    "nul\x00",
]


@pytest.mark.parametrize("doc_id", BAD_DOC_IDS, ids=repr)
@pytest.mark.parametrize("kind", [MessageType.SYNC_STEP1, MessageType.SYNC_STEP2, MessageType.SYNC_UPDATE])
def test_invalid_context_name_is_refused(kind: MessageType, doc_id: str) -> None:
    """A STEP1, STEP2 or UPDATE naming an invalid context is refused."""
    tail = b"\x00" if kind == MessageType.SYNC_UPDATE else varbytes(b"")
    frame = varuint(kind) + varbytes(doc_id.encode()) + tail
    with pytest.raises(DecodeError, match="context name|longer than"):
        decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x01" + varbytes(b"n" * (MAX_NAME_CHARS + 1)) + varbytes(b""),
        b"\x00\x01" + varbytes(b"") + varbytes("é".encode() * (MAX_NAME_CHARS + 1)),
        b"\x05" + varbytes(b"r" * (MAX_REASON_CHARS + 1)),
    ],
    ids=["node_id", "name", "reason"],
)
def test_over_long_string_is_refused(frame: bytes) -> None:
    """Hello strings over MAX_NAME_CHARS and reasons over MAX_REASON_CHARS characters are refused."""
    with pytest.raises(DecodeError, match="longer than"):
        decode(frame)


@pytest.mark.parametrize("flag", [2, 3, 127, 128, 2**40])
def test_chunk_flag_other_than_0_or_1_is_refused(flag: int) -> None:
    """The chunk's final flag must be 0 or 1."""
    with pytest.raises(DecodeError, match="chunk flag"):
        decode(b"\x04" + varuint(flag) + varbytes(b"data"))


# -- encode_chunked -------------------------------------------------------------------


def reassemble(frames: list[bytes]) -> bytes:
    """Check a CHUNK sequence (only the last one final) and return the inner frame."""
    chunks = [decode(f) for f in frames]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]  # type: ignore[union-attr]
    return b"".join(c.data for c in chunks)  # type: ignore[union-attr]


@pytest.mark.parametrize("limit", [17, 18, 64, 100, 1000, 65536])
@pytest.mark.parametrize("size", [0, 1, 50, 999, 5000])
def test_encode_chunked_respects_the_limit_and_reassembles(limit: int, size: int) -> None:
    """No frame exceeds the limit and the chunks join back into the original frame."""
    message = SyncStep2(D, bytes(i % 251 for i in range(size)))
    whole = encode(message)
    frames = encode_chunked(message, limit)
    assert all(len(f) <= limit for f in frames)
    if len(whole) <= limit:
        assert frames == [whole]
    else:
        assert len(frames) > 1
        assert reassemble(frames) == whole
        assert decode(reassemble(frames)) == message


def test_encode_chunked_boundary() -> None:
    """A frame of exactly the limit goes alone; one byte more is chunked."""
    message = SyncStep2(D, b"\x00" * 1000)
    n = len(encode(message))
    assert encode_chunked(message, n) == [encode(message)]
    frames = encode_chunked(message, n - 1)
    assert len(frames) == 2
    assert all(len(f) <= n - 1 for f in frames)
    assert reassemble(frames) == encode(message)


def test_encode_chunked_multi_megabyte_update() -> None:
    """A 5 MiB SyncUpdate splits into frames of at most 64 KiB that rebuild it."""
    message = SyncUpdate(D, (b"\x01" * (3 * MIB), b"\x02" * (2 * MIB)))
    frames = encode_chunked(message, 65536)
    assert len(frames) >= 5 * MIB // 65536
    assert max(len(f) for f in frames) <= 65536
    assert decode(reassemble(frames)) == message


@pytest.mark.parametrize("limit", [0, 1, 16])
def test_encode_chunked_limit_too_small(limit: int) -> None:
    """A limit that cannot carry a chunk is a local bug."""
    with pytest.raises(LocalProtocolError):
        encode_chunked(SyncStep2(D, b"x" * 100), limit)


# -- pack_updates ---------------------------------------------------------------------


def unpack(groups: list[list[bytes]]) -> list[SyncUpdate]:
    """Decode what pack_updates yielded: one SyncUpdate per group."""
    out = []
    for frames in groups:
        frame = frames[0] if len(frames) == 1 else reassemble(frames)
        msg = decode(frame)
        assert isinstance(msg, SyncUpdate)
        out.append(msg)
    return out


def test_pack_updates_groups_small_updates() -> None:
    """Small updates that fit one frame travel as one SyncUpdate, in order."""
    updates = [bytes([i]) * (i + 1) for i in range(100)]
    groups = list(pack_updates(D, updates, 65536))
    assert len(groups) == 1
    assert len(groups[0]) == 1
    assert unpack(groups) == [SyncUpdate(D, tuple(updates))]


def test_pack_updates_nothing_to_pack() -> None:
    """No updates yield no frame."""
    assert list(pack_updates(D, [], 65536)) == []


@pytest.mark.parametrize("limit", [256, 1000, 4096])
@pytest.mark.parametrize("doc_id", [D, DocId("n" * MAX_DOC_ID_CHARS)], ids=["short", "longest"])
def test_pack_updates_respects_the_limit(limit: int, doc_id: DocId) -> None:
    """Every frame fits the limit, updates keep their order, and frames are reasonably full."""
    updates = [bytes([i % 256]) * (1 + (i * 37) % 90) for i in range(1000)]
    groups = list(pack_updates(doc_id, updates, limit))
    assert all(len(f) <= limit for frames in groups for f in frames)
    messages = unpack(groups)
    assert all(m.doc_id == doc_id for m in messages)
    assert [u for m in messages for u in m.updates] == updates
    if limit > 32 + len(doc_id) + 100:  # every update fits a frame: no chunking, no waste
        assert all(len(frames) == 1 for frames in groups)
        total = sum(len(u) + 5 for u in updates)
        assert len(groups) <= 2 * total // (limit - 32 - len(doc_id)) + 1


def test_pack_updates_chunks_a_single_oversize_update() -> None:
    """An update larger than a frame travels alone as chunks, between its neighbours."""
    small1, huge, small2, small3 = b"a" * 10, bytes(range(256)) * 200, b"b" * 10, b"c" * 10
    groups = list(pack_updates(D, [small1, huge, small2, small3], 4096))
    assert [len(frames) > 1 for frames in groups] == [False, True, False]
    assert all(len(f) <= 4096 for frames in groups for f in frames)
    assert unpack(groups) == [
        SyncUpdate(D, (small1,)),
        SyncUpdate(D, (huge,)),
        SyncUpdate(D, (small2, small3)),
    ]


def test_pack_updates_only_oversize_updates() -> None:
    """Consecutive oversize updates each become their own chunk sequence."""
    updates = [b"\x01" * 10_000, b"\x02" * 20_000]
    groups = list(pack_updates(D, updates, 4096))
    assert len(groups) == 2
    assert unpack(groups) == [SyncUpdate(D, (updates[0],)), SyncUpdate(D, (updates[1],))]


# -- properties -----------------------------------------------------------------------

_UTF8 = st.characters(codec="utf-8")
doc_ids = st.from_regex(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}", fullmatch=True).map(DocId)
blobs = st.binary(max_size=300)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        st.integers(0, 2**63 - 1),
        st.text(_UTF8, max_size=MAX_NAME_CHARS),
        st.text(_UTF8, max_size=MAX_NAME_CHARS),
    ),
    st.builds(SyncStep1, doc_ids, blobs),
    st.builds(SyncStep2, doc_ids, blobs),
    st.builds(SyncUpdate, doc_ids, st.lists(blobs, max_size=8).map(tuple)),
    st.builds(Chunk, st.booleans(), blobs),
    st.builds(Goodbye, st.text(_UTF8, max_size=MAX_REASON_CHARS)),
)
PROPERTY = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(messages)
def test_property_round_trip(message: Message) -> None:
    """decode(encode(m)) == m for any valid message."""
    assert decode(encode(message)) == message


@PROPERTY
@given(messages, st.integers(17, 400))
def test_property_chunked_round_trip(message: Message, limit: int) -> None:
    """encode_chunked never exceeds the limit and its frames rebuild the message."""
    frames = encode_chunked(message, limit)
    assert all(len(f) <= limit for f in frames)
    whole = frames[0] if len(frames) == 1 else reassemble(frames)
    assert decode(whole) == message


def decodes_or_refuses(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except DecodeError:
        return
    assert isinstance(msg, (Hello, SyncStep1, SyncStep2, SyncUpdate, Chunk, Goodbye, Ack))
    assert decode(encode(msg)) == msg


@PROPERTY
@given(st.binary(max_size=64))
def test_property_random_bytes_decode_or_raise_decode_error(frame: bytes) -> None:
    """Random bytes decode to a message or raise DecodeError, never anything else."""
    decodes_or_refuses(frame)


@PROPERTY
@given(messages, st.data())
def test_property_mutated_frames_decode_or_raise_decode_error(message: Message, data: st.DataObject) -> None:
    """A valid frame with one byte changed, inserted or removed decodes or raises DecodeError."""
    frame = bytearray(encode(message))
    pos = data.draw(st.integers(0, len(frame)))
    op = data.draw(st.sampled_from(["set", "insert", "delete"]))
    byte = data.draw(st.integers(0, 255))
    if op == "insert":
        frame.insert(pos, byte)
    elif pos < len(frame):
        if op == "set":
            frame[pos] = byte
        else:
            del frame[pos]
    decodes_or_refuses(bytes(frame))
