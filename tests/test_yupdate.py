"""Tests of ctxsync.yupdate: the pure pre-validator of Yjs v1 updates, against real pycrdt updates."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctxsync.entries import Clock, EntryMap
from ctxsync.errors import RemoteProtocolError
from ctxsync.types import ENTRIES_ROOT, NodeId
from ctxsync.yupdate import (
    InvalidUpdate,
    MissingDependencies,
    UpdateSummary,
    check_update,
    decode_delete_set,
    decode_state_vector,
    delete_set_covers,
)
from tests.helpers import varuint

MIB = 1 << 20


# -- lib0 encoding, written independently of the code under test ------------------------------


def varstring(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return varuint(len(b)) + b


def update(client: int, clock: int, structs: list[bytes], delete_set: bytes = b"\x00") -> bytes:
    """One client's structs, then a delete set."""
    return (
        varuint(1) + varuint(len(structs)) + varuint(client) + varuint(clock) + b"".join(structs) + delete_set
    )


def root_item(ref: int, root: str | bytes, content: bytes, sub: str | bytes | None = None) -> bytes:
    """An item parented by name to a root type, with content ``ref``."""
    info = ref | (0x20 if sub is not None else 0)
    return (
        bytes([info]) + varuint(1) + varstring(root) + (varstring(sub) if sub is not None else b"") + content
    )


def any_item(root: str, key: str | None, value: bytes) -> bytes:
    """An Any item holding one encoded lib0 Any value."""
    return root_item(8, root, varuint(1) + value, key)


TRUE = b"\x78"


# -- real pycrdt updates --------------------------------------------------------------------


def recorded(build: Callable[[pycrdt.Doc[Any]], None], client_id: int = 7) -> list[bytes]:
    """Run ``build`` on a fresh doc; return every transaction's update, then the full state."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    build(doc)
    doc.unobserve(sub)
    return [*updates, doc.get_update()]


def build_map_values(doc: pycrdt.Doc[Any]) -> None:
    m = doc.get("m", type=pycrdt.Map)
    values: list[Any] = [
        "text", "ünïcødé ☃ 😀", "", 0, 1, -1, 2**31, -(2**40), 2**53, 1.5, -0.0, 1e300, float("inf"),
        True, False, None, b"", b"\x00\xff" * 10, [], {}, [1, "a", None, [2, [3]]],
        {"a": {"b": {"c": [1, 2, {"d": None}]}}, "": "empty key"},
    ]  # fmt: skip
    for i, value in enumerate(values):
        m[f"k{i}"] = value
    with doc.transaction():
        m["k0"] = "overwritten"
        m["k1"] = {"nested": "overwritten"}
    del m["k2"]
    with doc.transaction():
        for i in range(3, 8):
            del m[f"k{i}"]
    m["k3"] = "set again"


def build_entries(doc: pycrdt.Doc[Any]) -> None:
    ticks = iter(range(1_700_000_000_000, 1_800_000_000_000))
    entries = EntryMap(doc, NodeId("node-a"), Clock(lambda: next(ticks)))
    entries.set("greeting", '"hello"')
    entries.set("count", "42")
    entries.set("greeting", '"hello again"')
    entries.set("ü😀 key", '{"a": [1, 2, null]}')
    entries.delete("count")
    entries.close()


def build_text(doc: pycrdt.Doc[Any]) -> None:
    text = doc.get("t", type=pycrdt.Text)
    text += "hello world"
    text.insert(5, ", dear", {"bold": True})
    text.format(2, 8, {"italic": True, "color": "#ff0000"})
    text.insert_embed(3, {"image": "https://example.com/a.png"}, {"width": 10})
    del text[1:4]
    text += "!" * 100
    del text[len(text) - 50 :]
    text.insert(0, "😀 é ")  # no formatting after this: see test_refuses_format_update_yrs_cannot_apply
    text += " more"


def build_array(doc: pycrdt.Doc[Any]) -> None:
    array = doc.get("a", type=pycrdt.Array)
    array.extend([1, "two", None, [3], {"four": 4}, b"five"])
    array.insert(2, "inserted")
    array.append(True)
    del array[0]
    del array[1:3]
    with doc.transaction():
        for i in range(50):
            array.insert(i % 5, i)
    array.pop()


def build_nested(doc: pycrdt.Doc[Any]) -> None:
    root = doc.get("state", type=pycrdt.Map)
    root["inner"] = pycrdt.Map()
    inner = root["inner"]
    inner["x"] = 1
    inner["list"] = pycrdt.Array([1, 2, pycrdt.Text("t")])
    inner["text"] = pycrdt.Text("nested text")
    inner["list"].append(pycrdt.Map({"deep": pycrdt.Array(["d"])}))
    del inner["x"]
    arr = doc.get("arr", type=pycrdt.Array)
    arr.append(pycrdt.Map({"k": "v"}))
    arr.append(pycrdt.Array([pycrdt.Text("in array")]))
    doc.get(ENTRIES_ROOT, type=pycrdt.Map)["slot\x1fnode"] = {"t": "0" * 16, "v": "1"}


def build_xml(doc: pycrdt.Doc[Any]) -> None:
    fragment = doc.get("x", type=pycrdt.XmlFragment)
    fragment.children.append(pycrdt.XmlElement("p", {"class": "intro"}, [pycrdt.XmlText("hello")]))
    element = fragment.children.append(pycrdt.XmlElement("div"))
    element.attributes["id"] = "main"
    text = element.children.append(pycrdt.XmlText("xml text"))
    text.format(0, 3, {"b": True})
    text.insert_embed(1, {"e": 1})
    element.children.append(pycrdt.XmlElement("span", contents=[pycrdt.XmlText("😀")]))
    del fragment.children[0]


def build_subdocs(doc: pycrdt.Doc[Any]) -> None:
    docs = doc.get("docs", type=pycrdt.Map)
    docs["sub"] = pycrdt.Doc()
    docs["other"] = pycrdt.Doc()
    del docs["other"]


def build_big(doc: pycrdt.Doc[Any]) -> None:
    entries = doc.get(ENTRIES_ROOT, type=pycrdt.Map)
    with doc.transaction():
        for i in range(10_000):
            entries[f"key{i}\x1fnode"] = {"v": f'"value {i}"', "t": f"{i:016x}"}


BUILDERS: dict[str, Callable[[pycrdt.Doc[Any]], None]] = {
    "map_values": build_map_values,
    "entries": build_entries,
    "text": build_text,
    "array": build_array,
    "nested": build_nested,
    "xml": build_xml,
    "subdocs": build_subdocs,
}


def merged_two_clients() -> list[bytes]:
    """Updates of two clients editing concurrently, merged with ``pycrdt.merge_updates``."""
    doc_a: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    doc_b: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2**40)
    for doc, name in ((doc_a, "a"), (doc_b, "b")):
        doc.get(ENTRIES_ROOT, type=pycrdt.Map)[f"k\x1f{name}"] = {"v": f'"{name}"', "t": "1" * 16}
        doc.get("t", type=pycrdt.Text).insert(0, f"from {name} ")
    update_a, update_b = doc_a.get_update(), doc_b.get_update()
    merged = pycrdt.merge_updates(update_a, update_b)
    doc_a.apply_update(update_b)
    doc_a.get(ENTRIES_ROOT, type=pycrdt.Map)["k\x1fa"] = {"t": "2" * 16, "deleted": True}
    del doc_a.get("t", type=pycrdt.Text)[0:3]
    return [update_a, update_b, merged, doc_a.get_update(), pycrdt.merge_updates(merged, doc_a.get_update())]


_CORPUS: dict[str, list[bytes]] = {}


def corpus() -> dict[str, list[bytes]]:
    """Real updates by scenario (built once)."""
    if not _CORPUS:
        for name, build in BUILDERS.items():
            _CORPUS[name] = recorded(build)
        _CORPUS["merged"] = merged_two_clients()
    return _CORPUS


def all_updates() -> Iterator[tuple[str, bytes]]:
    for name, updates in corpus().items():
        for i, u in enumerate(updates):
            yield f"{name}[{i}]", u


def apply_to_fresh_doc(u: bytes) -> BaseException | None:
    """Apply ``u`` to a new doc and read its entries; return what was raised, if anything."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    try:
        doc.apply_update(u)
        doc.get(ENTRIES_ROOT, type=pycrdt.Map).to_py()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # PanicException is a BaseException
        return exc
    return None


# -- accepts what pycrdt produces -----------------------------------------------------------


@pytest.mark.parametrize("name", [*BUILDERS, "merged"])
def test_accepts_every_real_update(name: str) -> None:
    """Accepts every incremental and full-state update pycrdt produces for a scenario."""
    for u in corpus()[name]:
        summary = check_update(u)
        assert summary.size_bytes == len(u)
        assert apply_to_fresh_doc(u) is None


def test_accepts_empty_update() -> None:
    """Accepts the empty update and summarises it as empty."""
    assert check_update(b"\x00\x00") == UpdateSummary(0, 0, 0, frozenset(), frozenset(), 2, {})
    empty_doc: pycrdt.Doc[Any] = pycrdt.Doc()
    assert check_update(empty_doc.get_update()).structs == 0


def test_accepts_big_document() -> None:
    """Accepts a 10,000-key entries map and lists every key."""
    (incremental, full) = recorded(build_big)
    for u in (incremental, full):
        summary = check_update(u, collect_keys=True)
        assert summary.roots == {ENTRIES_ROOT}
        assert len(summary.entry_keys) == 10_000
        assert check_update(u).entry_keys == frozenset()  # not gathered by default
        assert summary.structs == 10_000


def test_accepts_bytearray_and_memoryview() -> None:
    """Accepts any bytes-like object holding an update."""
    u = corpus()["entries"][-1]
    assert check_update(bytearray(u)) == check_update(u)  # type: ignore[arg-type]
    assert check_update(memoryview(u)) == check_update(u)  # type: ignore[arg-type]


def test_summary_of_entries_update() -> None:
    """Summarises an entries update: root, slot keys, counts."""
    full = corpus()["entries"][-1]
    summary = check_update(full, collect_keys=True)
    assert summary.roots == {ENTRIES_ROOT}
    assert summary.entry_keys == {"greeting\x1fnode-a", "count\x1fnode-a", "ü😀 key\x1fnode-a"}
    assert summary.clients == 1
    assert summary.delete_ranges >= 1
    # An overwrite is positioned after the slot it replaces: no parent name in its bytes.
    overwrite = corpus()["entries"][2]
    assert check_update(overwrite, collect_keys=True).entry_keys == frozenset()


def test_summary_of_nested_and_merged_updates() -> None:
    """Reports the roots items are parented to by name, and every client of a merged update."""
    nested = check_update(corpus()["nested"][-1], collect_keys=True)
    assert nested.roots == {"state", "arr", ENTRIES_ROOT}
    assert nested.entry_keys == {"slot\x1fnode"}
    merged = check_update(corpus()["merged"][2], collect_keys=True)
    assert merged.clients == 2
    assert merged.roots == {ENTRIES_ROOT, "t"}
    assert merged.entry_keys == {"k\x1fa", "k\x1fb"}
    assert check_update(corpus()["text"][-1]).roots == {"t"}
    assert check_update(corpus()["xml"][-1]).roots == {"x"}


def test_summary_counts_structs_and_delete_ranges() -> None:
    """Counts structs and delete ranges exactly as encoded."""
    u = update(5, 0, [any_item("m", "a", TRUE), any_item("m", "b", TRUE), b"\x00\x03"])
    u = (
        u[:-1]
        + varuint(2)
        + varuint(5)
        + varuint(2)
        + b"\x00\x01\x05\x01"
        + varuint(9)
        + varuint(1)
        + b"\x00\x02"
    )
    assert check_update(u) == UpdateSummary(1, 3, 3, frozenset({"m"}), frozenset(), len(u), {5: 5})


# -- refuses malformed updates --------------------------------------------------------------


def test_invalid_update_is_remote_protocol_error() -> None:
    """InvalidUpdate closes the session like every other remote protocol error."""
    with pytest.raises(RemoteProtocolError) as info:
        check_update(b"\x00")
    assert isinstance(info.value, InvalidUpdate)
    assert info.value.offset == 1
    assert "truncated" in info.value.reason
    assert "at byte 1" in str(info.value)


@pytest.mark.parametrize("name", [*BUILDERS, "merged"])
def test_refuses_every_truncation(name: str) -> None:
    """Every proper prefix of a real update raises InvalidUpdate, and nothing else."""
    for u in corpus()[name][-2:]:
        for cut in range(len(u)):
            with pytest.raises(InvalidUpdate) as info:
                check_update(u[:cut])
            assert info.value.offset is not None
            assert 0 <= info.value.offset <= cut


def test_refuses_trailing_bytes() -> None:
    """Bytes after the delete set are refused, at their offset."""
    u = corpus()["entries"][-1]
    for extra in (b"\x00", b"\x00\x00", b"garbage"):
        with pytest.raises(InvalidUpdate, match="trailing") as info:
            check_update(u + extra)
        assert info.value.offset == len(u)


def test_refuses_oversized_update() -> None:
    """An update over ``max_bytes`` is refused before it is read."""
    u = corpus()["entries"][-1]
    check_update(u, max_bytes=len(u))
    with pytest.raises(InvalidUpdate, match="limit") as info:
        check_update(u, max_bytes=len(u) - 1)
    assert info.value.offset is None


def test_refuses_long_strings_when_limited() -> None:
    """``max_string_bytes`` bounds every string, including nested Any strings."""
    u = update(5, 0, [any_item("m", "k", b"\x75\x01\x77" + varstring("x" * 100))])
    check_update(u, max_string_bytes=100)
    with pytest.raises(InvalidUpdate, match="limit"):
        check_update(u, max_string_bytes=99)


HUGE = [2**32 - 1, 2**31, 10**6, 1000]


def _huge_claims() -> Iterator[bytes]:
    for n in HUGE:
        big = varuint(n)
        yield big  # clients
        yield b"\x01" + big  # structs
        yield b"\x00" + big  # delete set clients
        yield b"\x00\x01\x05" + big  # delete ranges
        yield update(5, 0, [root_item(8, "m", big, "k")])[:-1]  # Any content length
        yield update(5, 0, [any_item("m", "k", b"\x75" + big)])[:-1]  # Any array
        yield update(5, 0, [any_item("m", "k", b"\x76" + big)])[:-1]  # Any object
        yield update(5, 0, [any_item("m", "k", b"\x77" + big)])[:-1]  # Any string
        yield update(5, 0, [any_item("m", "k", b"\x74" + big)])[:-1]  # Any bytes
        yield update(5, 0, [root_item(4, "t", big)])[:-1]  # string content
        yield update(5, 0, [root_item(3, "t", big)])[:-1]  # binary content
        yield b"\x01\x01\x05\x00\x08\x01" + big  # root name length
        yield update(5, 0, [b"\x28\x01\x01m" + big])[:-1]  # parent sub length


@pytest.mark.parametrize("u", list(_huge_claims()), ids=lambda u: u.hex()[:24])
def test_refuses_huge_claims_fast_and_without_allocating(u: bytes) -> None:
    """A count or length larger than the bytes left is refused at once, allocating nothing big."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidUpdate):
            check_update(u)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB
    assert elapsed < 0.1


def test_refuses_huge_claim_with_reason_and_offset() -> None:
    """A lying count is refused where it is written, naming the count and the bytes left."""
    u = update(5, 0, [any_item("m", "k", b"\x75" + varuint(2**31))])[:-1]
    with pytest.raises(InvalidUpdate, match="Any array length 2147483648 exceeds the 0 bytes left") as info:
        check_update(u)
    assert info.value.offset == len(u) - len(varuint(2**31))


@pytest.mark.parametrize(
    ("u", "match"),
    [
        (b"\x80" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\xff" * 9 + b"\x7f", "over 64 bits"),
        (b"\x80", "truncated varuint"),
        (b"\x01\x01\x05" + varuint(2**32) + b"\x00\x01\x00", "32 bits"),
        (update(5, 2**32 - 1, [b"\x00\x01"]), "past 2\\*\\*32"),
        (update(5, 0, [b"\x00\x00"]), "empty GC"),
        (update(5, 0, [b"\x0a\x00"]), "empty GC/Skip"),
        (update(5, 0, [b"\x0a\x01"]), "Skip struct refused"),
        (update(5, 1, [b"\x84\x05\x04" + varstring("ab")]), "origin is not older"),
        (update(5, 1, [b"\x44\x05\x01" + varstring("ab")]), "right origin is not older"),
        (update(5, 1, [b"\x44\x05\x02" + varstring("ab")]), "right origin is not older"),
        (update(5, 1, [b"\x04\x00\x05\x02" + varstring("ab")]), "parent is not older"),
        (update(5, 0, [b"\x80\x01\x00\x01"]), "flag bits"),
        (update(5, 0, [b"\x4a\x01\x00\x01"]), "flag bits"),
        (update(5, 0, [root_item(11, "m", b"\x00")]), "unknown content ref 11"),
        (update(5, 0, [root_item(0x18, "m", b"\x01\x78")]), "unknown content ref 24"),
        (update(5, 0, [root_item(2, "a", b"\x01" + varstring("1"))]), "JSON content"),
        (update(5, 0, [root_item(7, "m", b"\x05" + varstring("hook"), "k")]), "type ref 5"),
        (update(5, 0, [root_item(7, "m", b"\x07", "k")]), "type ref 7"),
        (update(5, 0, [root_item(7, "m", b"\x09", "k")]), "type ref 9"),
        (update(5, 0, [root_item(7, "m", b"\x0f", "k")]), "type ref 15"),
        (update(5, 0, [b"\x08\x02\x01\x78"]), "parent info 2"),
        (update(5, 0, [any_item("m", "k", b"\x73")]), "unknown Any tag 115"),
        (update(5, 0, [any_item("m", "k", b"\x80")]), "unknown Any tag 128"),
        (update(5, 0, [any_item("m", "k", b"\x7d" + b"\x80" * 10 + b"\x01")]), "longer than 10"),
        (update(5, 0, [any_item("m", "k", b"\x7d" + b"\xbf" + b"\xff" * 8 + b"\x02")]), "over 63 bits"),
        (update(5, 0, [any_item("m", "k", b"\x7b\x00\x00")]), "truncated Any number"),
        (update(5, 0, [root_item(5, "t", varstring("{bad"))]), "embed is not valid JSON"),
        (update(5, 0, [root_item(5, "t", varstring("NaN"))]), "embed is not valid JSON"),
        (update(5, 0, [root_item(6, "t", varstring("bold") + varstring("tru"))]), "format value"),
        (update(5, 0, [root_item(5, "t", varstring("[" * 65 + "]" * 65))]), "deeper than 64"),
        (update(5, 0, [any_item("m", "k", TRUE)]) + b"\x00", "trailing"),
        (varuint(2) + b"\x01\x05\x00\x08\x01\x01m\x01\x78" + b"\x01\x05\x00\x00\x01\x00", "listed twice"),
        (b"\x00\x02\x05\x01\x00\x01\x05\x01\x02\x01", "listed twice in the delete set"),
        (b"\x00\x01\x05\x01\x00\x00", "empty delete range"),
        (b"\x00\x01\x05\x01" + varuint(2**32 - 2) + b"\x02", "past clock"),
    ],
)
def test_refuses_malformed(u: bytes, match: str) -> None:
    """Refuses each malformed or ambiguous encoding with a reason naming the problem."""
    with pytest.raises(InvalidUpdate, match=match):
        check_update(u)


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"ok\xe2\x82"],
)
@pytest.mark.parametrize("where", ["root", "key", "any string", "any key", "text", "long text"])
def test_refuses_bad_utf8(bad: bytes, where: str) -> None:
    """Refuses invalid UTF-8 (overlong, surrogates, truncated sequences) in every kind of string."""
    if where == "root":
        u = update(5, 0, [any_item("m", "k", TRUE).replace(b"\x01m", varstring(b"m" + bad))])
    elif where == "key":
        u = update(5, 0, [root_item(8, "m", b"\x01\x78", b"k" + bad)])
    elif where == "any string":
        u = update(5, 0, [any_item("m", "k", b"\x77" + varstring(bad))])
    elif where == "any key":
        u = update(5, 0, [any_item("m", "k", b"\x76\x01" + varstring(bad) + TRUE)])
    elif where == "text":
        u = update(5, 0, [root_item(4, "t", varstring(b"abc" + bad))])
    else:
        u = update(5, 0, [root_item(4, "t", varstring(b"a" * 200_000 + bad + b"b" * 10))])
    with pytest.raises(InvalidUpdate, match="UTF-8"):
        check_update(u)


def test_refuses_bad_utf8_in_real_update() -> None:
    """A real update with one string byte replaced by 0xff is refused where the byte is."""
    u = corpus()["entries"][-1]
    at = u.index(b"greeting")
    with pytest.raises(InvalidUpdate, match="UTF-8") as info:
        check_update(u[:at] + b"\xff" + u[at + 1 :])
    assert info.value.offset == at


def _nested_any(depth: int, container: bytes) -> bytes:
    if container == b"\x75":
        return b"\x75\x01" * (depth - 1) + b"\x75\x00"
    return (b"\x76\x01\x01k") * (depth - 1) + b"\x76\x00"


@pytest.mark.parametrize("container", [b"\x75", b"\x76"])
def test_refuses_deep_any_nesting(container: bytes) -> None:
    """Refuses Any arrays/objects nested deeper than ``max_depth``; accepts up to it."""
    ok = update(5, 0, [any_item("m", "k", _nested_any(64, container))])
    check_update(ok)
    deep = update(5, 0, [any_item("m", "k", _nested_any(65, container))])
    with pytest.raises(InvalidUpdate, match="deeper than 64"):
        check_update(deep)
    check_update(deep, max_depth=65)
    very_deep = update(5, 0, [any_item("m", "k", _nested_any(100_000, container))])
    with pytest.raises(InvalidUpdate, match="deeper than 10"):
        check_update(very_deep, max_depth=10)


def test_refuses_deep_nesting_made_by_pycrdt() -> None:
    """A deeply nested dict written with pycrdt is refused (reading it back would recurse)."""
    value: dict[str, Any] = {}
    for _ in range(100):
        value = {"d": value}
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.get("m", type=pycrdt.Map)["deep"] = value
    with pytest.raises(InvalidUpdate, match="deeper than 64"):
        check_update(doc.get_update())
    check_update(doc.get_update(), max_depth=101)


def test_refuses_format_update_yrs_cannot_apply() -> None:
    """pycrdt's format update after an astral character names itself as right origin: refused.

    No replica can integrate such an item (pycrdt leaves it, and every later update of its client,
    pending forever), so the update is refused as impossible rather than parked.
    """
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=7)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("t", type=pycrdt.Text)
    text += "hello world"
    text.insert(0, "😀 é ")
    text.format(2, 8, {"italic": True})
    replica: pycrdt.Doc[Any] = pycrdt.Doc()
    for u in updates:
        replica.apply_update(u)
    assert decode_state_vector(replica.get_state()) != decode_state_vector(doc.get_state())
    with pytest.raises(InvalidUpdate, match="right origin is not older"):
        check_update(updates[-1])


# -- yrs crash guards: Skip structs and causal readiness ------------------------------------

# Each pair below is accepted by pycrdt 0.14.13 one update at a time, and applying both to one
# Doc(client_id=99) kills the process with SIGSEGV (found by fuzzing; kept as data, never applied).
SEGFAULT_PAIRS = [
    # Two pending updates of client 2 overlapping at clock 2; the second's origin is its own future.
    ("01010202000300", "0101020184020402616200"),
    # Pending updates: a Skip at clock 3 of client 1, then an item filling it with origin into a GC.
    ("0103010100020a010801017402787e00", "01010103a8010102787601017677013100"),
]


@pytest.mark.parametrize("pair", SEGFAULT_PAIRS)
def test_refuses_known_segfault_pairs(pair: tuple[str, str]) -> None:
    """One update of each known crashing pair is refused alone; with a fresh doc's state, both are."""
    updates = [bytes.fromhex(h) for h in pair]
    refused = 0
    for u in updates:
        try:
            check_update(u)
        except InvalidUpdate:
            refused += 1
    assert refused == 1
    for u in updates:
        with pytest.raises(MissingDependencies):
            check_update(u, allow_skip=True, state={})


def test_skip_structs_need_allow_skip() -> None:
    """A merged update with a gap holds a Skip: refused by default, accepted with allow_skip."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=5)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for i in range(3):
        doc.get("m", type=pycrdt.Map)[str(i)] = i
    gappy = pycrdt.merge_updates(updates[0], updates[2])
    with pytest.raises(InvalidUpdate, match="Skip"):
        check_update(gappy)
    assert check_update(gappy, allow_skip=True).structs == 3
    with pytest.raises(MissingDependencies, match="skips clocks 1..1"):
        check_update(gappy, allow_skip=True, state={})
    check_update(gappy, allow_skip=True, state={5: 2})


def test_delete_sets_of_struct_free_updates_decode_and_compare() -> None:
    """A replica's delete-set-only update decodes to merged ranges; coverage is checked range by range."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=7)
    m = doc.get("m", type=pycrdt.Map)
    for i in range(6):
        m[f"k{i}"] = i
    for i in (1, 2, 4):  # clocks 1, 2 and 4: two ranges once merged
        del m[f"k{i}"]
    ours = decode_delete_set(doc.get_update(doc.get_state()))
    assert ours == {7: [(1, 2), (4, 1)]}
    assert decode_delete_set(doc.get_update()) is None  # it carries structs
    assert decode_delete_set(b"\x00\x00") == {}
    assert delete_set_covers(ours, {7: [(1, 1)]}) and delete_set_covers(ours, {7: [(1, 2), (4, 1)]}) and delete_set_covers(ours, {})
    assert not delete_set_covers(ours, {7: [(1, 3)]})  # runs into clock 3, not deleted here
    assert not delete_set_covers(ours, {7: [(0, 1)]}) and not delete_set_covers(ours, {8: [(0, 1)]})
    for bad in (b"", b"\x00", b"\x00\x01\x07", b"\x00\x00\x00"):
        with pytest.raises(InvalidUpdate):
            decode_delete_set(bad)


def test_state_vector_decoding() -> None:
    """Decodes pycrdt state vectors; refuses malformed ones."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2**40)
    assert decode_state_vector(doc.get_state()) == {}
    doc.get("t", type=pycrdt.Text).insert(0, "a😀")
    assert decode_state_vector(doc.get_state()) == {2**40: 3}
    for bad in (b"", b"\x01", b"\x01\x05", b"\x00\x00", b"\xff\xff\xff\x0f"):
        with pytest.raises(InvalidUpdate):
            decode_state_vector(bad)


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_state_vector_client_ids_decode_the_same_every_time(clients: list[int]) -> None:
    """Long varuints (client ids) come from a cache after the first read: same value every time."""
    clients = list(dict.fromkeys(clients))
    encoded = varuint(len(clients)) + b"".join(varuint(c) + varuint(i) for i, c in enumerate(clients))
    expected = {c: i for i, c in enumerate(clients)}
    assert decode_state_vector(encoded) == expected
    assert decode_state_vector(encoded) == expected  # the cached path


def test_cached_varuints_still_refuse_what_is_too_long() -> None:
    """A valid 10-byte number in the cache does not make a longer run or a 65-bit value valid."""
    biggest = varuint(2**64 - 1)
    assert len(biggest) == 10
    assert decode_state_vector(b"\x01" + biggest + b"\x00") == {2**64 - 1: 0}
    assert decode_state_vector(b"\x01" + biggest + b"\x00") == {2**64 - 1: 0}
    too_big = biggest[:-1] + b"\x02"  # the same bytes but a 65th bit
    with pytest.raises(InvalidUpdate, match="over 64 bits"):
        decode_state_vector(b"\x01" + too_big + b"\x00")
    eleven = biggest[:-1] + b"\x81\x01"
    with pytest.raises(InvalidUpdate, match="longer than 10 bytes"):
        decode_state_vector(b"\x01" + eleven + b"\x00")
    with pytest.raises(InvalidUpdate, match="truncated"):
        decode_state_vector(b"\x01" + biggest[:-1])


def test_summary_state_vector_is_the_update_s_own() -> None:
    """``state_vector``: each client of the update and the clock after its last struct."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2**40)
    text = doc.get("t", type=pycrdt.Text)
    text.insert(0, "ab")
    before = doc.get_state()
    text.insert(2, "c😀")
    after = decode_state_vector(doc.get_state())
    assert after[2**40] > decode_state_vector(before)[2**40]
    assert check_update(doc.get_update()).state_vector == after
    assert check_update(doc.get_update(before)).state_vector == after
    assert check_update(b"\x00\x00").state_vector == {}


def test_string_item_covers_its_utf16_length_not_its_length_prefix() -> None:
    """
    A String item of "ab" covers clocks 0 and 1 only. The walk used to count the string's length
    prefix as a character, so it took a deletion of clock 2 (which the receiver lacks) as covered
    by the update itself, and let yrs keep the update pending.
    """
    ab = root_item(4, "t", varstring("ab"), None)
    assert check_update(update(5, 0, [ab])).state_vector == {5: 2}
    deletes_clock_2 = update(5, 0, [ab], varuint(1) + varuint(5) + varuint(1) + varuint(2) + varuint(1))
    with pytest.raises(MissingDependencies, match="clock 2 of client 5"):
        check_update(deletes_clock_2, state={})
    deletes_clock_1 = update(5, 0, [ab], varuint(1) + varuint(5) + varuint(1) + varuint(1) + varuint(1))
    check_update(deletes_clock_1, state={})
    emoji = root_item(4, "t", varstring("a😀"), None)  # 5 UTF-8 bytes, 3 UTF-16 units
    assert check_update(update(5, 0, [emoji])).state_vector == {5: 3}


_ASCII_PART = st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=4)
_OBJECT_PARTS = st.one_of(
    _ASCII_PART,
    _ASCII_PART,
    _ASCII_PART,
    st.text(max_size=3), st.text(alphabet="abc", min_size=126, max_size=130), st.sampled_from(["\x7f", "é", "😀"])
)


@given(
    st.lists(st.tuples(_OBJECT_PARTS, st.one_of(_OBJECT_PARTS, st.sampled_from([b"\x78", b"\x7d\x05"]))), max_size=4),
    st.sampled_from([None, None, 0, 3, 200]),
    st.sampled_from([0, 0, 0, 0, 1, 2]),
)
@settings(max_examples=400, deadline=None)
def test_flat_string_object_fast_path_agrees_with_the_full_walk(
    fields: list[tuple[str, str | bytes]], max_len: int | None, cut: int
) -> None:
    """The fast path for entry slots accepts exactly what the full walk accepts, ending at the same byte."""
    from ctxsync.yupdate import _flat_string_object, _skip_any

    body = b"".join(
        varstring(k) + (b"\x77" + varstring(v) if isinstance(v, str) else v) for k, v in fields
    )
    content = b"\x01\x76" + varuint(len(fields)) + body
    data = b"\x00" + content[: len(content) - cut]
    fast = _flat_string_object(data, 1, max_len)
    try:
        full: int | None = _skip_any(data, 2, 64, max_len) if data[1:2] == b"\x01" else None
    except InvalidUpdate:
        full = None
    if fast is not None:
        event("fast path")
        assert fast == full
    else:
        event("full walk")


def test_flat_string_object_fast_path_cases() -> None:
    """The entry-slot fast path takes short ASCII string objects only, and leaves the rest to the full walk."""
    from ctxsync.yupdate import _flat_string_object

    slot = b"\x01\x76\x02" + varstring("v") + b"\x77" + varstring("1") + varstring("t") + b"\x77" + varstring("x" * 20)
    assert _flat_string_object(slot + b"rest", 0, None) == len(slot)
    assert _flat_string_object(b"\x01\x76\x00", 0, None) == 3
    assert _flat_string_object(slot, 0, 19) is None  # a string over max_len: the full walk refuses it
    assert _flat_string_object(slot[:-1], 0, None) is None  # truncated
    not_fast = [
        b"\x01\x76\x01" + varstring("v") + b"\x78" + varstring("t") + b"\x77\x00",  # true, not a string
        b"\x01\x76\x01" + varstring("v") + b"\x77" + varstring("é"),  # not ASCII
        b"\x01\x76\x01" + varstring("v") + b"\x77" + varstring("x" * 200),  # two-byte length
        b"\x01\x75\x01\x77\x00",  # an array
        b"\x02\x76\x00\x76\x00",  # two values
    ]
    for content in not_fast:
        assert _flat_string_object(content, 0, None) is None, content


@pytest.mark.parametrize("entries_root", ["z" * 200, "entries", "é" * 70, "bad\udc80"])
def test_entries_root_comparison_never_takes_another_root_for_it(entries_root: str) -> None:
    """The bytes comparison of the entries root's name is off for names it cannot match exactly
    (128 bytes or more): a root whose name's length starts with the same byte is not taken for it."""
    long_root = "y" * 128  # its length is the two-byte varuint 0x80 0x01
    u = update(5, 0, [any_item(long_root, "k", TRUE), any_item("entries", "k\x1fa", b"\x76\x01\x01v\x77\x011")])
    summary = check_update(u, entries_root=entries_root, collect_keys=True)
    assert summary.roots == {long_root, "entries"}
    assert summary.entry_keys == ({"k\x1fa"} if entries_root == "entries" else frozenset())


def test_client_ids_of_2_53_or_more_are_refused_wherever_they_appear() -> None:
    """
    yrs keeps 53 bits of a client id, so X and X + 2**53 are one client to pycrdt. An update
    with such an id could pass the readiness check and still be left pending (its state vector
    reporting clocks pycrdt never integrated): every place a client id appears refuses them.
    """
    big, ok = 2**53, 2**53 - 1
    ds = varuint(1) + varuint(big) + varuint(1) + varuint(0) + varuint(1)
    item = root_item(8, "m", b"\x01\x78", "k")
    cases = {
        "client id": update(big, 0, [item]),
        "origin client": update(5, 0, [bytes([0x88]) + varuint(big) + varuint(0) + b"\x01\x78"]),
        "right origin client": update(5, 0, [bytes([0x48]) + varuint(big) + varuint(0) + b"\x01\x78"]),
        "parent client": update(5, 0, [bytes([0x28]) + varuint(0) + varuint(big) + varuint(0) + varstring("k") + b"\x01\x78"]),
        "delete set client": update(5, 0, [item], ds),
    }
    for what, u in cases.items():
        with pytest.raises(InvalidUpdate, match=f"{what} {big} is 2\\*\\*53 or more"):
            check_update(u)
    assert check_update(update(ok, 0, [item])).state_vector == {ok: 1}
    # The alias the reviewer built: X's item placed after (X + 2**53, 1), which X + 2**53 brings.
    x = 12345
    alias = (
        varuint(2)
        + varuint(1) + varuint(x) + varuint(0) + bytes([0x88]) + varuint(x + big) + varuint(1) + b"\x01\x7d\x01"
        + varuint(1) + varuint(x + big) + varuint(0) + root_item(8, "o", b"\x02\x7d\x01\x7d\x02", "k")
        + b"\x00"
    )  # fmt: skip
    with pytest.raises(InvalidUpdate, match="2\\*\\*53"):
        check_update(alias, state={})


def test_ready_updates_pass_with_state() -> None:
    """Every update of a recorded history is ready against the state it was made from."""
    for name in ("entries", "text", "nested", "xml", "map_values"):
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        for u in corpus()[name][:-1]:
            check_update(u, state=decode_state_vector(doc.get_state()))
            doc.apply_update(u)
        check_update(corpus()[name][-1], state={})


def test_refuses_updates_not_ready_for_state() -> None:
    """With the receiver's state, gaps and references to unknown structs raise MissingDependencies."""
    text_updates = corpus()["text"]
    with pytest.raises(MissingDependencies, match="starts at clock"):
        check_update(text_updates[1], state={})
    other = update(9, 0, [b"\x84" + varuint(5) + varuint(3) + varstring("x")])
    with pytest.raises(MissingDependencies, match="clock 3 of client 5"):
        check_update(other, state={5: 3})
    check_update(other, state={5: 4})
    parent = update(9, 0, [b"\x08\x00\x05\x07\x01\x78"])
    with pytest.raises(MissingDependencies, match="clock 7 of client 5"):
        check_update(parent, state={5: 7})
    deletion = b"\x00\x01\x05\x01\x02\x03"
    with pytest.raises(MissingDependencies, match="clock 4 of client 5"):
        check_update(deletion, state={5: 4})
    check_update(deletion, state={5: 5})
    check_update(deletion)  # without a state, only the shape is checked
    assert isinstance(MissingDependencies("x"), InvalidUpdate)


# -- entries root rules ---------------------------------------------------------------------


def _entries_as(build: Callable[[pycrdt.Doc[Any]], None]) -> bytes:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    build(doc)
    return doc.get_update()


ENTRIES_MISUSES: dict[str, Callable[[pycrdt.Doc[Any]], None]] = {
    "text root": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Text).insert(0, "text"),
    "array root": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Array).append({"t": "0" * 16, "v": "1"}),
    "xml root": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.XmlFragment).children.append("x"),
    "nested map": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Map).__setitem__(
        "k\x1fn", pycrdt.Map({"t": "x"})
    ),
    "nested array": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Map).__setitem__("k\x1fn", pycrdt.Array([1])),
    "nested text": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Map).__setitem__("k\x1fn", pycrdt.Text("x")),
    "subdoc": lambda d: d.get(ENTRIES_ROOT, type=pycrdt.Map).__setitem__("k\x1fn", pycrdt.Doc()),
}


@pytest.mark.parametrize("name", list(ENTRIES_MISUSES))
def test_refuses_entries_root_misuse(name: str) -> None:
    """Refuses updates that make the entries root a sequence or put a shared type or doc in it."""
    u = _entries_as(ENTRIES_MISUSES[name])
    with pytest.raises(InvalidUpdate, match=repr(ENTRIES_ROOT)):
        check_update(u)
    # Under another root name, the same update is fine.
    renamed = u.replace(varstring(ENTRIES_ROOT), varstring("entriez"))
    assert "entriez" in check_update(renamed).roots
    check_update(u, entries_root="elsewhere")


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (any_item(ENTRIES_ROOT, None, TRUE), "without a map key"),
        (root_item(1, ENTRIES_ROOT, b"\x01"), "without a map key"),
        (root_item(4, ENTRIES_ROOT, varstring("s"), "k"), "String content"),
        (root_item(3, ENTRIES_ROOT, varstring(b"b"), "k"), "Binary content"),
        (root_item(5, ENTRIES_ROOT, varstring("{}"), "k"), "Embed content"),
        (root_item(6, ENTRIES_ROOT, varstring("b") + varstring("1"), "k"), "Format content"),
        (root_item(7, ENTRIES_ROOT, b"\x01", "k"), "Type content"),
        (root_item(9, ENTRIES_ROOT, varstring("guid") + b"\x7e", "k"), "Doc content"),
    ],
)
def test_refuses_non_plain_entry_items(item: bytes, match: str) -> None:
    """Refuses items under the entries root without a key, or holding anything but a plain value."""
    with pytest.raises(InvalidUpdate, match=match):
        check_update(update(5, 0, [item]))


def test_accepts_plain_entry_items() -> None:
    """Accepts keyed Any and Deleted items under the entries root."""
    u = update(
        5,
        0,
        [any_item(ENTRIES_ROOT, "a", b"\x76\x01\x01v\x77\x011"), root_item(1, ENTRIES_ROOT, b"\x02", "b")],
    )
    assert check_update(u, collect_keys=True).entry_keys == {"a", "b"}


def test_refuses_shared_type_after_entry_in_same_update() -> None:
    """A shared type placed (by origin) after an entries item of the same update is refused."""

    def build(doc: pycrdt.Doc[Any]) -> None:
        entries = doc.get(ENTRIES_ROOT, type=pycrdt.Map)
        entries["k\x1fn"] = {"t": "0" * 16, "v": "1"}
        entries["k\x1fn"] = pycrdt.Map({"nested": 1})

    with pytest.raises(InvalidUpdate, match="Type content"):
        check_update(_entries_as(build))


def test_accepts_shared_type_by_origin_to_unknown_item() -> None:
    """Documented limit: an item positioned after an item the update does not hold is accepted."""

    def build(doc: pycrdt.Doc[Any]) -> None:
        entries = doc.get(ENTRIES_ROOT, type=pycrdt.Map)
        entries["k\x1fn"] = {"t": "0" * 16, "v": "1"}
        entries["k\x1fn"] = pycrdt.Map({"nested": 1})

    updates = recorded(build)
    check_update(updates[1])  # the second write alone: its parent is only known to the receiver
    with pytest.raises(InvalidUpdate):
        check_update(updates[-1])


# -- throughput -----------------------------------------------------------------------------


def test_throughput_of_big_entries_update() -> None:
    """Checks a ~10 MB, 100,000-entry update well under 10 seconds."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    entries = doc.get(ENTRIES_ROOT, type=pycrdt.Map)
    with doc.transaction():
        for i in range(100_000):
            entries[f"some/longish/key/{i:08d}\x1fNODE-ABCDEF-GHIJKL"] = {
                "v": f'{{"value": {i}, "text": "some text for entry {i}"}}',
                "t": f"{1_700_000_000_000 + i:012x}0000",
            }
    u = doc.get_update()
    started = time.perf_counter()
    summary = check_update(u)
    elapsed = time.perf_counter() - started
    assert summary.structs == 100_000
    assert len(u) > 10_000_000
    assert elapsed < 10


# -- property: mutations of real updates ----------------------------------------------------


def _mutation_bases() -> list[bytes]:
    bases = [u for _, u in all_updates() if len(u) < 4000]
    return bases


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    bases = _mutation_bases()
    u = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = draw(st.integers(0, max(len(u) - 1, 0)))
        if kind == "insert":
            u.insert(at, draw(st.integers(0, 255)))
        elif not u:
            continue
        elif kind == "delete":
            del u[at]
        elif kind == "flip":
            u[at] ^= 1 << draw(st.integers(0, 7))
        else:
            u[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x74, 0x75, 0x76, 0x77, 0x07, 0x28, 0x81]))
    return bytes(u)


PANICS_AFTER_ACCEPT: list[tuple[bytes, str]] = []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_are_refused_or_safe_for_pycrdt(u: bytes) -> None:
    """A mutated update is refused with InvalidUpdate, or pycrdt applies it without panicking."""
    try:
        check_update(u)
    except InvalidUpdate:
        event("refused")
        return
    exc = apply_to_fresh_doc(u)
    event("accepted, pycrdt " + ("applied it" if exc is None else type(exc).__name__))
    if exc is not None and not isinstance(exc, Exception):
        PANICS_AFTER_ACCEPT.append((u, repr(exc)))
    assert exc is None or isinstance(exc, Exception), f"pycrdt raised {exc!r} on accepted {u.hex()}"
