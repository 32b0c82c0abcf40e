"""
Pre-validation of Yjs v1 updates from untrusted peers, before pycrdt ever sees them.

pycrdt (yrs) is not safe to feed hostile bytes (DESIGN.md, *Hostile input*): some malformed
updates make it panic (``pyo3_runtime.PanicException``, a ``BaseException``), a few bytes claiming a
huge length make it reserve gigabytes, and some well-formed updates leave a context unreadable. This
module owns :func:`check_update`, a pure walk over the bytes of one update that refuses all of
that, in time linear in the input, reading every claimed length against the bytes actually left
before looping or allocating.

Format (lib0 encoding, as yjs ``src/utils/encoding.js`` writes it and yrs 0.28 ``update.rs``, the
version inside pycrdt 0.14.13, reads it)::

    update      = varuint n_clients, n_clients x client_structs, delete_set
    client_structs = varuint n_structs, varuint client, varuint clock, n_structs x struct
    struct      = info byte; info == 0: GC (varuint len); info == 10: Skip (varuint len);
                  else an Item with content ref = info & 0x1f:
                  [info & 0x80: origin ID] [info & 0x40: right origin ID]
                  [no origin bit: varuint parent_info (1: varstring root name, 0: parent ID);
                   info & 0x20: varstring parent_sub] content
    ID          = varuint client, varuint clock
    delete_set  = varuint n_clients, n_clients x (varuint client, varuint n_ranges,
                  n_ranges x (varuint clock, varuint len))

Item contents: 1 Deleted (varuint len), 3 Binary (varbytes), 4 String (varstring, length in UTF-8
bytes), 5 Embed (varstring JSON), 6 Format (varstring key, varstring JSON), 7 Type (type ref byte;
3 XmlElement adds a varstring name), 8 Any (varuint count, count x lib0 Any), 9 Doc (varstring
guid, lib0 Any options).

Refused on purpose although yjs can write them, because yrs 0.28 parses them differently from yjs
(so a validator following either one could be fooled into checking other bytes than pycrdt
applies):

* content 2 (JSON, yjs's legacy content): yrs reads ``count + 1`` strings, yjs ``count``;
* type ref 5 (XmlHook): yjs writes a name after it, yrs reads none;
* GC and Skip structs whose info byte has flag bits set (yjs ignores the bits, yrs reads an Item),
  and content refs above 9 (yjs refuses them, yrs masks them to 4 bits).

Also refused, as pycrdt never writes them and yrs would silently wrap or misread them: type refs
other than 0-4 and 6 (7 weak link, 9 subdocument type, 15 undefined), numbers yrs reads as 32-bit
(clocks, lengths, counts) above ``2**32 - 1``, client ids of ``2**53`` or more (yrs keeps their
low 53 bits, so two ids this walk tells apart could be one client to pycrdt), a client's clock
running past ``2**32 - 1``, empty
GC/Skip structs and delete ranges, a client listed twice in the structs or in the delete set, a
parent info other than 0 or 1, and an item whose origin, right origin or parent is an item of its
own client that is not older than itself (impossible in a real history; two such updates crash
yrs 0.28 with SIGSEGV).

Skip structs (only merged updates with gaps hold them) are refused unless ``allow_skip``: yrs 0.28
crashes the process (SIGSEGV) on some pending updates holding one. More generally, yrs 0.28 can
crash or corrupt its heap while merging *pending* updates (ones whose dependencies the document
lacks), which no check of one update alone can rule out; pass the receiver's state vector as
``state`` to refuse such updates (:class:`MissingDependencies`) and never create pending state.

Limits: an item placed by an origin or a right origin, or parented by ID, inherits its parent from
an item of the receiver's document, which a check of the bytes alone cannot see. Such an item is
checked against the entries rules only when its origin (or right origin) is an item of the same
update decoded before it and known to be in the entries root; otherwise it is accepted. Callers
must still apply the update to a scratch document and check the result (DESIGN.md).

Pure: imports nothing but the standard library and :mod:`ctxsync.errors` (no pycrdt, asyncio,
websockets, sqlite3, psutil or structlog).
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from bisect import bisect_right
from collections.abc import Mapping
from typing import Final, NamedTuple, NoReturn

from .errors import RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "InvalidUpdate", "MissingDependencies", "UpdateSummary",
    "check_update", "decode_delete_set", "decode_state_vector", "delete_set_covers",
]  # fmt: skip

DEFAULT_MAX_BYTES: Final = 256 * 2**20
"""Default largest update :func:`check_update` accepts, in bytes."""

DEFAULT_MAX_DEPTH: Final = 64
"""Default deepest nesting of lib0 Any arrays/objects (and of JSON texts) accepted."""

_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_CLIENT_MAX: Final = 2**53 - 1
"""Largest client id accepted: yrs keeps the low 53 bits of one."""
_I64_MAX: Final = 0x7FFF_FFFF_FFFF_FFFF
_CHUNK: Final = 65536
"""Strings longer than this many bytes are validated in chunks of this size."""

# Content refs (info & 0x1f) of Items.
_DELETED: Final = 1
_JSON: Final = 2
_BINARY: Final = 3
_STRING: Final = 4
_EMBED: Final = 5
_FORMAT: Final = 6
_TYPE: Final = 7
_ANY: Final = 8
_DOC: Final = 9
_GC_INFO: Final = 0
_SKIP_INFO: Final = 10
_HAS_ORIGIN: Final = 0x80
_HAS_RIGHT_ORIGIN: Final = 0x40
_HAS_PARENT_SUB: Final = 0x20

_ENTRY_CONTENTS: Final = frozenset({_DELETED, _JSON, _ANY})
"""Contents an item of the entries root may have (JSON is refused everywhere anyway)."""
_CONTENT_NAMES: Final = {
    1: "Deleted", 2: "JSON", 3: "Binary", 4: "String", 5: "Embed", 6: "Format", 7: "Type",
    8: "Any", 9: "Doc",
}  # fmt: skip
_TYPE_XML_ELEMENT: Final = 3
_TYPE_REFS: Final = frozenset({0, 1, 2, 3, 4, 6})
"""Array, Map, Text, XmlElement, XmlFragment, XmlText."""

_ANY_FIXED: Final = {127: 0, 126: 0, 121: 0, 120: 0, 124: 4, 123: 8, 122: 8}
"""lib0 Any tags followed by a fixed number of bytes: undefined, null, false, true, float32,
float64, bigint."""
_ANY_VARINT: Final = 125
_ANY_STRING: Final = 119
_ANY_OBJECT: Final = 118
_ANY_ARRAY: Final = 117
_ANY_BYTES: Final = 116


class InvalidUpdate(RemoteProtocolError):
    """
    A Yjs update is malformed, too large, or would damage the context it is applied to.

    Attributes:
        reason: What is wrong, without the offset.
        offset: Byte offset in the update where decoding failed; ``None`` when the problem is not
            at one place (e.g. the update is too large).

    """

    def __init__(self, reason: str, *, offset: int | None = None) -> None:
        super().__init__(reason if offset is None else f"{reason} (at byte {offset})")
        self.reason = reason
        self.offset = offset


class MissingDependencies(InvalidUpdate):
    """
    An update is well formed but needs structs the receiver does not have (only raised when
    :func:`check_update` is given the receiver's ``state``).

    yrs would keep such an update pending, and yrs 0.28 can crash the process (SIGSEGV, heap
    corruption) while merging pending updates, so do not apply it: ask the peer for what is
    missing (sync step 1) instead. This is not necessarily the peer's fault: updates relayed by
    different peers can arrive out of order.
    """


class UpdateSummary(NamedTuple):
    """
    What :func:`check_update` saw in a valid update.

    A named tuple: one is made per update received, and a frozen dataclass took 2.5 µs of a
    small update's ~20 µs check.
    """

    clients: int
    """Number of clients whose structs the update carries."""
    structs: int
    """Number of structs (items, GC and Skip) in the update."""
    delete_ranges: int
    """Number of ranges in the update's delete set."""
    roots: frozenset[str]
    """Names of the root types that items of the update are parented to directly (by name)."""
    entry_keys: frozenset[str]
    """Map keys (parent subs) of the items parented directly, by name, to the entries root
    (only with ``collect_keys``; empty otherwise)."""
    size_bytes: int
    """Size of the update in bytes."""
    state_vector: dict[int, int]
    """The update's own state vector: client id -> the clock after its last struct (every
    client whose structs it carries; not the clients only named in its delete set). Once the
    update is applied to a document that was missing none of its dependencies, that document's
    state vector holds at least these clocks."""


def _fail(reason: str, offset: int | None) -> NoReturn:
    raise InvalidUpdate(reason, offset=offset)


_LONG_VARUINT: Final = re.compile(rb"[\x80-\xff]{2,9}[\x00-\x7f]")
"""A varuint of 3 to 10 bytes: client ids (53-bit random numbers, 8 bytes) are the usual ones."""
_LONG_VALUES: dict[bytes, int] = {}
"""Decoded long varuints by their bytes (valid ones only). The same few client ids are read in
every update and state vector, and a Python loop over 8 bytes took 1.8 µs; a decoded state vector
of 10 clients took 36 µs per update received. Bounded: cleared when it reaches
:data:`_LONG_VALUES_MAX` entries."""
_LONG_VALUES_MAX: Final = 4096


def _varuint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Read a lib0 varuint of at most 64 bits at ``pos``; return it and the next offset."""
    n = len(data)
    if pos < n:
        b = data[pos]
        if b < 0x80:
            return b, pos + 1
        if pos + 1 < n and data[pos + 1] < 0x80:
            return (b & 0x7F) | data[pos + 1] << 7, pos + 2
    match = _LONG_VARUINT.match(data, pos)
    if match is not None:
        known = _LONG_VALUES.get(match.group())
        if known is not None:
            return known, match.end()
    value, end = _varuint_loop(data, pos, what)
    if match is not None:
        if len(_LONG_VALUES) >= _LONG_VALUES_MAX:
            _LONG_VALUES.clear()
        _LONG_VALUES[match.group()] = value
    return value, end


def _varuint_loop(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """:func:`_varuint` without the cache: byte by byte, with the exact error."""
    n = len(data)
    start = pos
    value = 0
    shift = 0
    while True:
        if pos >= n:
            _fail(f"truncated varuint ({what})", start)
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value > _U64_MAX:
                _fail(f"varuint over 64 bits ({what})", start)
            return value, pos
        shift += 7
        if shift >= 70:
            _fail(f"varuint longer than 10 bytes ({what})", start)


def _client(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """
    Read a client id: a varuint below 2**53. yrs keeps only the low 53 bits of a client id (as
    yjs's are JavaScript-safe integers), so ids X and X + 2**53 would be two clients to this
    walk and one to pycrdt: an update could then pass the readiness check and still be left
    pending, or report clocks it does not bring.
    """
    value, end = _varuint(data, pos, what)
    if value > _CLIENT_MAX:
        _fail(f"{what} {value} is 2**53 or more (yrs keeps 53 bits)", pos)
    return value, end


def _u32(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Read a varuint that yrs reads as a 32-bit number (it would wrap larger ones)."""
    if pos < len(data) and data[pos] < 0x80:  # one byte: the common case, without a call
        return data[pos], pos + 1
    value, end = _varuint(data, pos, what)
    if value > _U32_MAX:
        _fail(f"{what} {value} does not fit in 32 bits", pos)
    return value, end


def _count(data: bytes, pos: int, what: str, min_bytes: int) -> tuple[int, int]:
    """Read a count of elements taking at least ``min_bytes`` each, refusing impossible counts."""
    if pos < len(data) and data[pos] < 0x80:
        value, end = data[pos], pos + 1
    else:
        value, end = _u32(data, pos, what)
    if value * min_bytes > len(data) - end:
        _fail(f"{what} {value} exceeds the {len(data) - end} bytes left", pos)
    return value, end


def _length(data: bytes, pos: int, what: str, max_len: int | None) -> tuple[int, int]:
    """Read the byte length of a varstring or varbytes and check that the bytes are there."""
    value, end = _varuint(data, pos, what)
    if value > len(data) - end:
        _fail(f"{what} length {value} exceeds the {len(data) - end} bytes left", pos)
    if max_len is not None and value > max_len:
        _fail(f"{what} is {value} bytes long; the limit is {max_len}", pos)
    return value, end


def _validate_utf8(data: bytes, start: int, end: int, what: str) -> None:
    """Check that ``data[start:end]`` is UTF-8, decoding at most one chunk at a time."""
    if end - start <= _CHUNK:
        try:
            data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"invalid UTF-8 in {what}", start + exc.start)
        return
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    chunk_start = start
    with memoryview(data) as view:
        while chunk_start < end:
            chunk_end = min(chunk_start + _CHUNK, end)
            try:
                decoder.decode(view[chunk_start:chunk_end], chunk_end == end)
            except UnicodeDecodeError:
                _fail(f"invalid UTF-8 in {what}", chunk_start)
            chunk_start = chunk_end


def _skip_string(data: bytes, pos: int, what: str, max_len: int | None) -> int:
    """Check a varstring (varuint byte length + UTF-8) without keeping it; return the next offset."""
    if pos < len(data):  # fast path: a one-byte length, ASCII bytes that are all there
        size = data[pos]
        end = pos + 1 + size
        if size < 0x80 and end <= len(data) and (max_len is None or size <= max_len):
            if data[pos + 1 : end].isascii():
                return end
    size, start = _length(data, pos, what, max_len)
    end = start + size
    if size:
        _validate_utf8(data, start, end, what)
    return end


def _string(data: bytes, pos: int, what: str, max_len: int | None) -> tuple[str, int]:
    """Read a varstring (varuint byte length + UTF-8) and return it decoded."""
    if pos < len(data):  # fast path: a one-byte length and bytes that are all there
        size = data[pos]
        end = pos + 1 + size
        if size < 0x80 and end <= len(data) and (max_len is None or size <= max_len):
            try:
                return data[pos + 1 : end].decode("utf-8"), end
            except UnicodeDecodeError as exc:
                _fail(f"invalid UTF-8 in {what}", pos + 1 + exc.start)
    size, start = _length(data, pos, what, max_len)
    end = start + size
    try:
        return data[start:end].decode("utf-8"), end
    except UnicodeDecodeError as exc:
        _fail(f"invalid UTF-8 in {what}", start + exc.start)


def _utf16_length(data: bytes, start: int, end: int) -> int:
    """Return the length in UTF-16 code units (yrs's item length) of valid UTF-8 bytes."""
    # Every byte that is not a continuation byte starts a code point; 4-byte sequences (lead
    # bytes 0xF0-0xF4) are astral and take two UTF-16 units.
    chunk = data[start:end]
    if chunk.isascii():
        return end - start
    continuation = sum(chunk.count(bytes([b])) for b in range(0x80, 0xC0))
    astral = sum(chunk.count(bytes([b])) for b in range(0xF0, 0xF5))
    return (end - start) - continuation + astral


def _check_json(text: str, what: str, offset: int, max_depth: int, *, allow_undefined: bool) -> None:
    """Check that ``text`` is strict JSON (no NaN/Infinity) nested at most ``max_depth`` deep."""
    if allow_undefined and text == "undefined":
        return

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError):
        _fail(f"{what} is not valid JSON", offset)
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth + 1 > max_depth:
                _fail(f"{what} is nested deeper than {max_depth}", offset)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _skip_any(data: bytes, pos: int, max_depth: int, max_len: int | None) -> int:
    """Walk one lib0 Any value at ``pos`` without recursion; return the next offset."""
    n = len(data)
    counts: list[int] = []  # values left in each open array/object
    objects: list[bool] = []  # whether each open container is an object (keys before values)
    while True:
        if objects and objects[-1]:
            pos = _skip_string(data, pos, "Any object key", max_len)
        if pos >= n:
            _fail("truncated Any value", pos)
        tag = data[pos]
        tag_at = pos
        pos += 1
        fixed = _ANY_FIXED.get(tag)
        if fixed is not None:
            if pos + fixed > n:
                _fail("truncated Any number", tag_at)
            pos += fixed
        elif tag == _ANY_STRING:
            pos = _skip_string(data, pos, "Any string", max_len)
        elif tag == _ANY_VARINT:
            pos = _skip_varint(data, pos)
        elif tag == _ANY_ARRAY or tag == _ANY_OBJECT:
            is_object = tag == _ANY_OBJECT
            what = "Any object size" if is_object else "Any array length"
            count, pos = _count(data, pos, what, 2 if is_object else 1)
            if len(counts) >= max_depth:
                _fail(f"Any value nested deeper than {max_depth}", tag_at)
            if count:
                counts.append(count)
                objects.append(is_object)
                continue
        elif tag == _ANY_BYTES:
            size, start = _length(data, pos, "Any byte array", max_len)
            pos = start + size
        else:
            _fail(f"unknown Any tag {tag}", tag_at)
        # One value is complete: close the containers it completes.
        while True:
            if not counts:
                return pos
            counts[-1] -= 1
            if counts[-1]:
                break
            counts.pop()
            objects.pop()


def _flat_string_object(data: bytes, pos: int, max_len: int | None) -> int | None:
    """
    Where Any content of one object of short ASCII string keys and values (an entry slot such as
    ``{"v": "1", "t": "..."}``) starting at ``pos`` ends; ``None`` if the content is anything
    else, or malformed (the full walk then reads it and says what is wrong).

    The same bytes :func:`_skip_any` accepts, about four times faster: every length is one byte,
    and one ``isascii()`` over the whole content checks that (a byte of 0x80 or more would be a
    longer length, or UTF-8 to validate) and the strings' encoding at once.
    """
    try:
        if data[pos] != 1 or data[pos + 1] != _ANY_OBJECT:
            return None
        count = data[pos + 2]
        end = pos + 3
        longest = 0
        for _ in range(count):
            key_size = data[end]
            end += key_size + 1
            if data[end] != _ANY_STRING:
                return None
            value_size = data[end + 1]
            end += value_size + 2
            longest = max(longest, key_size, value_size)
    except IndexError:
        return None
    if end > len(data) or (max_len is not None and longest > max_len) or not data[pos:end].isascii():
        return None
    return end


def _skip_varint(data: bytes, pos: int) -> int:
    """Skip a lib0 signed varint (sign in bit 6 of the first byte) of at most 63 magnitude bits."""
    n = len(data)
    start = pos
    if pos >= n:
        _fail("truncated Any integer", start)
    b = data[pos]
    pos += 1
    value = b & 0x3F
    shift = 6
    while b >= 0x80:
        if pos >= n:
            _fail("truncated Any integer", start)
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if shift > 69:
            _fail("Any integer longer than 10 bytes", start)
    if value > _I64_MAX:
        _fail("Any integer over 63 bits", start)
    return pos


class _Intervals:
    """Clock ranges, per client, of the items known to be in the entries root (merged, in order)."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: dict[int, array[int]] = {}
        self._ends: dict[int, array[int]] = {}

    def add(self, client: int, start: int, end: int) -> None:
        starts = self._starts.get(client)
        if starts is None:
            self._starts[client] = array("Q", [start])
            self._ends[client] = array("Q", [end])
            return
        ends = self._ends[client]
        if ends[-1] == start:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)

    def __contains__(self, item_id: tuple[int, int]) -> bool:
        client, clock = item_id
        starts = self._starts.get(client)
        if starts is None:
            return False
        i = bisect_right(starts, clock) - 1
        return i >= 0 and clock < self._ends[client][i]


def check_update(
    update: bytes,
    *,
    entries_root: str = "entries",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_string_bytes: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allow_skip: bool = False,
    state: Mapping[int, int] | None = None,
    collect_keys: bool = False,
) -> UpdateSummary:
    """
    Check that a Yjs v1 update is well formed and safe to apply to a context's document.

    The walk is linear in ``len(update)``; no claimed count or length is trusted before the bytes
    it needs are known to be there, so a tiny update claiming a huge size fails at once. Memory
    used is at most a small multiple of the input size.

    Args:
        update: One Yjs v1 update, as ``Doc.get_update()`` or ``pycrdt.merge_updates`` return it.
        entries_root: Name of the root map holding the context's entries (see
            :data:`ctxsync.types.ENTRIES_ROOT`). Items parented to it by name must carry a map key
            (parent sub) and a plain value: Any or Deleted content, never a shared type or a
            subdocument.
        max_bytes: Largest update accepted, in bytes.
        max_string_bytes: Longest string or byte array accepted anywhere in the update, in bytes.
            ``None`` means no limit other than the update's size.
        max_depth: Deepest nesting of arrays/objects accepted in lib0 Any values and JSON texts.
        allow_skip: Accept Skip structs. Only merged updates with gaps hold them (neither
            ``Doc.get_update()`` nor a transaction's update does), and yrs 0.28 can crash the
            process on a pending update holding one, so they are refused by default.
        state: The receiver's state vector (client id -> next clock, see
            :func:`decode_state_vector`). When given, an update that needs structs neither the
            receiver nor the update holds (a clock gap, an origin, a parent or a deletion beyond
            what is known) raises :class:`MissingDependencies` instead of being accepted: yrs would
            keep it pending, and its pending-update code can crash the process.
        collect_keys: Gather the map keys of the entries root's items into the summary's
            ``entry_keys`` (it is empty otherwise). Off by default: decoding and keeping every
            key of a 100,000-key update took about 0.3 s of a joining node's time.

    Returns:
        What the update holds. Apply it to a scratch document next; this check cannot see items
        positioned relative to ones the receiver already has (see the module docstring).

    Raises:
        InvalidUpdate: If the update is too large, truncated, malformed, uses an encoding yrs and
            yjs disagree on, or would put something other than a keyed plain value in the entries
            root. ``offset`` tells where.
        MissingDependencies: If ``state`` is given and the update is not causally ready.

    """
    if not isinstance(update, bytes):
        update = bytes(update)
    data = update
    n = len(data)
    if n > max_bytes:
        _fail(f"update is {n} bytes; the limit is {max_bytes}", None)

    roots: set[str] = set()
    entry_keys: set[str] = set()
    in_entries = _Intervals()
    seen_clients: set[int] = set()
    total_structs = 0
    # With ``state``: what the update covers (client -> (first clock, end clock)) and the clocks it
    # refers to outside itself (client -> highest clock referred to + 1, and where).
    covers: dict[int, tuple[int, int]] = {}
    needs: dict[int, tuple[int, int]] = {}
    ready = state is not None

    def need(ref_client: int, ref_clock: int, at: int) -> None:
        if ref_client not in needs or needs[ref_client][0] <= ref_clock:
            needs[ref_client] = (ref_clock + 1, at)

    entries_seen = False
    # The entries root's name as a varstring with a one-byte length, compared as bytes; empty
    # (the fast comparison off) when that cannot be, or when the full walk must refuse the name.
    try:
        root_name = entries_root.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: never valid in an update
        root_name = b"\x80" * 0x80
    root_prefix = bytes([len(root_name)]) + root_name if len(root_name) < 0x80 else b""
    if max_string_bytes is not None and len(root_name) > max_string_bytes:
        root_prefix = b""
    n_clients, pos = _count(data, 0, "number of clients", 3)
    for _ in range(n_clients):
        client_at = pos
        n_structs, pos = _count(data, pos, "number of structs", 2)
        client, pos = _client(data, pos, "client id")
        if client in seen_clients:
            _fail(f"client {client} listed twice", client_at)
        seen_clients.add(client)
        clock, pos = _u32(data, pos, "clock")
        first_clock = clock
        if state is not None and clock > state.get(client, 0):
            raise MissingDependencies(
                f"update starts at clock {clock} of client {client}; "
                f"the receiver has clocks up to {state.get(client, 0)}",
                offset=client_at,
            )
        total_structs += n_structs
        for _ in range(n_structs):
            struct_at = pos
            if pos >= n:
                _fail("truncated struct", pos)
            info = data[pos]
            pos += 1
            if info == _GC_INFO or info == _SKIP_INFO:
                length, pos = _u32(data, pos, "GC/Skip length")
                if length == 0:
                    _fail("empty GC/Skip struct", struct_at)
                if info == _SKIP_INFO:
                    if not allow_skip:
                        _fail("Skip struct refused (allow_skip is off)", struct_at)
                    if state is not None and clock + length > state.get(client, 0):
                        raise MissingDependencies(
                            f"update skips clocks {clock}..{clock + length - 1} of client {client}",
                            offset=struct_at,
                        )
            else:
                ref = info & 0x1F
                if ref == _GC_INFO or ref == _SKIP_INFO:
                    _fail(f"GC/Skip struct with flag bits (info byte {info:#04x})", struct_at)
                if ref > _DOC:
                    _fail(f"unknown content ref {ref}", struct_at)
                if ref == _JSON:
                    _fail("JSON content (ref 2) is refused: yrs and yjs decode it differently", struct_at)
                parent_is_entries = False
                origin: tuple[int, int] | None = None
                right_origin: tuple[int, int] | None = None
                if info & _HAS_ORIGIN:
                    origin_client, pos = _client(data, pos, "origin client")
                    origin_clock, pos = _u32(data, pos, "origin clock")
                    if origin_client == client and origin_clock >= clock:
                        _fail("item's origin is not older than the item", struct_at)
                    if ready and origin_client != client:
                        need(origin_client, origin_clock, struct_at)
                    origin = (origin_client, origin_clock)
                if info & _HAS_RIGHT_ORIGIN:
                    right_client, pos = _client(data, pos, "right origin client")
                    right_clock, pos = _u32(data, pos, "right origin clock")
                    if right_client == client and right_clock >= clock:
                        _fail("item's right origin is not older than the item", struct_at)
                    if ready and right_client != client:
                        need(right_client, right_clock, struct_at)
                    right_origin = (right_client, right_clock)
                if origin is None and right_origin is None:
                    parent_at = pos
                    parent_info, pos = _varuint(data, pos, "parent info")
                    if parent_info == 1:
                        if root_prefix and data[pos : pos + len(root_prefix)] == root_prefix:  # not decoded again
                            pos += len(root_prefix)
                            parent_is_entries = entries_seen = True
                        else:
                            root, pos = _string(data, pos, "root type name", max_string_bytes)
                            roots.add(root)
                            parent_is_entries = root == entries_root
                    elif parent_info == 0:
                        parent_client, pos = _client(data, pos, "parent client")
                        parent_clock, pos = _u32(data, pos, "parent clock")
                        if parent_client == client and parent_clock >= clock:
                            _fail("item's parent is not older than the item", struct_at)
                        if ready and parent_client != client:
                            need(parent_client, parent_clock, struct_at)
                    else:
                        _fail(f"parent info {parent_info} is neither 0 nor 1", parent_at)
                    if info & _HAS_PARENT_SUB:
                        if parent_is_entries and collect_keys:
                            sub, pos = _string(data, pos, "parent sub", max_string_bytes)
                            entry_keys.add(sub)
                        else:
                            pos = _skip_string(data, pos, "parent sub", max_string_bytes)
                    elif parent_is_entries:
                        _fail(f"item under root {entries_root!r} without a map key", struct_at)
                else:
                    # Parent and key are copied from the origin; check what this update can tell.
                    parent_is_entries = (origin is not None and origin in in_entries) or (
                        right_origin is not None and right_origin in in_entries
                    )
                if parent_is_entries and ref not in _ENTRY_CONTENTS:
                    _fail(
                        f"{_CONTENT_NAMES[ref]} content (ref {ref}) under root {entries_root!r}; "
                        "entries hold plain values only",
                        struct_at,
                    )
                content_at = pos
                if ref == _ANY:
                    end = _flat_string_object(data, pos, max_string_bytes) if max_depth else None
                    if end is not None:  # one object of short ASCII strings: what an entry slot is
                        length, pos = 1, end
                    else:
                        length, pos = _count(data, pos, "Any content length", 1)
                        for _ in range(length):
                            pos = _skip_any(data, pos, max_depth, max_string_bytes)
                elif ref == _STRING:
                    end = _skip_string(data, pos, "string content", max_string_bytes)
                    length = _utf16_length(data, end - _length(data, pos, "string content", None)[0], end)
                    pos = end
                elif ref == _DELETED:
                    length, pos = _u32(data, pos, "deleted length")
                elif ref == _TYPE:
                    if pos >= n:
                        _fail("truncated type ref", pos)
                    type_ref = data[pos]
                    pos += 1
                    if type_ref not in _TYPE_REFS:
                        _fail(f"unsupported type ref {type_ref}", content_at)
                    if type_ref == _TYPE_XML_ELEMENT:
                        pos = _skip_string(data, pos, "XML element name", max_string_bytes)
                    length = 1
                elif ref == _BINARY:
                    size, start = _length(data, pos, "binary content", max_string_bytes)
                    pos = start + size
                    length = 1
                elif ref == _EMBED:
                    text, pos = _string(data, pos, "embed", max_string_bytes)
                    _check_json(text, "embed", content_at, max_depth, allow_undefined=False)
                    length = 1
                elif ref == _FORMAT:
                    pos = _skip_string(data, pos, "format key", max_string_bytes)
                    value_at = pos
                    text, pos = _string(data, pos, "format value", max_string_bytes)
                    _check_json(text, "format value", value_at, max_depth, allow_undefined=False)
                    length = 1
                else:  # _DOC
                    pos = _skip_string(data, pos, "subdocument guid", max_string_bytes)
                    pos = _skip_any(data, pos, max_depth, max_string_bytes)
                    length = 1
                if parent_is_entries and length:
                    in_entries.add(client, clock, clock + length)
            if clock + length > _U32_MAX:
                _fail(f"clock of client {client} runs past 2**32 - 1", struct_at)
            clock += length
        covers[client] = (first_clock, clock)

    delete_ranges = 0
    ds_clients, pos = _count(data, pos, "number of delete set clients", 2)
    seen_clients.clear()
    for _ in range(ds_clients):
        client_at = pos
        client, pos = _client(data, pos, "delete set client")
        if client in seen_clients:
            _fail(f"client {client} listed twice in the delete set", client_at)
        seen_clients.add(client)
        n_ranges, pos = _count(data, pos, "number of delete ranges", 2)
        delete_ranges += n_ranges
        for _ in range(n_ranges):
            range_at = pos
            clock, pos = _u32(data, pos, "delete range clock")
            length, pos = _u32(data, pos, "delete range length")
            if length == 0:
                _fail("empty delete range", range_at)
            if clock + length > _U32_MAX:
                _fail("delete range runs past clock 2**32 - 1", range_at)
            if ready:
                need(client, clock + length - 1, range_at)
    if pos != n:
        _fail(f"{n - pos} trailing bytes after the delete set", pos)
    if state is not None:
        for ref_client, (ref_end, at) in needs.items():
            known = state.get(ref_client, 0)
            covered = covers.get(ref_client)
            if covered is not None:
                known = max(known, covered[1])
            if ref_end > known:
                raise MissingDependencies(
                    f"update refers to clock {ref_end - 1} of client {ref_client}; "
                    f"the receiver and the update have clocks up to {known}",
                    offset=at,
                )
    if entries_seen:
        roots.add(entries_root)
    return UpdateSummary(
        clients=n_clients,
        structs=total_structs,
        delete_ranges=delete_ranges,
        roots=frozenset(roots),
        entry_keys=frozenset(entry_keys),
        size_bytes=n,
        state_vector={client: end for client, (_, end) in covers.items()},
    )


def decode_state_vector(state: bytes) -> dict[int, int]:
    """
    Decode an encoded Yjs state vector, as ``Doc.get_state()`` returns it.

    Linear in the number of clients (about 1 µs each; client ids come from a cache, see
    :data:`_LONG_VALUES`), which grows for as long as a context lives: callers that check every
    update received should keep a bound instead of decoding each time (``Context.known_state``).

    Args:
        state: ``varuint count``, then ``count x (varuint client, varuint clock)``.

    Returns:
        Client id -> next clock (the number of structs of that client the document holds).

    Raises:
        InvalidUpdate: If the bytes are not exactly one well-formed state vector.

    """
    data = bytes(state)
    count, pos = _count(data, 0, "number of state vector entries", 2)
    result: dict[int, int] = {}
    for _ in range(count):
        client, pos = _varuint(data, pos, "state vector client")
        result[client], pos = _u32(data, pos, "state vector clock")
    if pos != len(data):
        _fail(f"{len(data) - pos} trailing bytes after the state vector", pos)
    return result


DeleteSet = dict[int, list[tuple[int, int]]]
"""Client id -> its deleted clock ranges ``(clock, length)``, sorted, merged where they touch."""


def decode_delete_set(update: bytes) -> DeleteSet | None:
    """
    Decode the delete set of a Yjs v1 update that carries no structs (what ``Doc.get_update``
    returns for a state vector that already has everything: a sync step 2 between two replicas
    that hold the same structs).

    Args:
        update: ``varuint 0`` (no struct clients), then the delete set: ``varuint count``, then
            ``count x (varuint client, varuint n, n x (varuint clock, varuint length))``.

    Returns:
        The delete set, ranges sorted and merged; None if the update carries structs.

    Raises:
        InvalidUpdate: If the bytes are not such an update (see :func:`check_update` for a full check).
    """
    data = bytes(update)
    struct_clients, pos = _count(data, 0, "number of struct clients", 2)
    if struct_clients:
        return None
    result: DeleteSet = {}
    clients, pos = _count(data, pos, "number of delete set clients", 2)
    for _ in range(clients):
        client, pos = _client(data, pos, "delete set client")
        n_ranges, pos = _count(data, pos, "number of delete ranges", 2)
        ranges = result.setdefault(client, [])
        for _ in range(n_ranges):
            clock, pos = _u32(data, pos, "delete range clock")
            length, pos = _u32(data, pos, "delete range length")
            ranges.append((clock, length))
    if pos != len(data):
        _fail(f"{len(data) - pos} trailing bytes after the delete set", pos)
    for client, ranges in result.items():
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for clock, length in ranges:
            if merged and clock <= merged[-1][0] + merged[-1][1]:
                start, prev = merged[-1]
                merged[-1] = (start, max(prev, clock + length - start))
            else:
                merged.append((clock, length))
        result[client] = merged
    return result


def delete_set_covers(ours: DeleteSet, theirs: DeleteSet) -> bool:
    """Whether every range of ``theirs`` lies inside a range of ``ours`` (both as :func:`decode_delete_set` returns them)."""
    for client, ranges in theirs.items():
        have = ours.get(client)
        if not have:
            if ranges:
                return False
            continue
        starts = [start for start, _ in have]
        for clock, length in ranges:
            i = bisect_right(starts, clock) - 1
            if i < 0 or clock + length > have[i][0] + have[i][1]:
                return False
    return True
