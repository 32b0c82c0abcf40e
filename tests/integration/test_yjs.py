"""
The Yjs endpoint end to end: real daemons as subprocesses, real Yjs clients over loopback.

The Python Yjs client is pycrdt's ``Provider`` (what pycrdt-websocket builds on) over a
``websockets`` client connection; hostile and awareness traffic comes from raw websocket
clients writing y-protocols messages by hand (``tests.helpers.varuint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from pycrdt import Array, Doc, Map, Provider, Text
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import varuint, wait_until
from tests.integration.nodes import TIMEOUT_FACTOR, Node, wait_for

pytestmark = pytest.mark.integration

MakeNode = Callable[..., Node]
T = 5.0 * TIMEOUT_FACTOR
"""Timeout of one wait in these tests, in seconds."""


class WebsocketChannel:
    """A ``pycrdt.Channel`` over a ``websockets`` client connection (what pycrdt's Provider reads and writes)."""

    def __init__(self, ws: ClientConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> WebsocketChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        await self._ws.send(message)

    async def recv(self) -> bytes:
        message = await self._ws.recv()
        assert isinstance(message, bytes)
        return message


def token(node: Node) -> str:
    return (node.home / "api.token").read_text().strip()


def url(node: Node, context: str, *, with_token: bool = True) -> str:
    query = f"?token={token(node)}" if with_token else ""
    return f"ws://127.0.0.1:{node.api_port}/yjs/{context}{query}"


@contextlib.asynccontextmanager
async def provider(node: Node, context: str, doc: Doc[Any]) -> AsyncIterator[Provider]:
    """Connect ``doc`` to ``node`` at /yjs/CONTEXT with a real Provider; yield once it is synced."""
    async with websockets.connect(url(node, context), max_size=None) as ws:
        async with Provider(doc, WebsocketChannel(ws, f"/yjs/{context}")) as prov:
            await asyncio.wait_for(prov.synced.wait(), T)
            yield prov


async def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """``node.cli`` off the event loop, so providers keep running meanwhile."""
    return await asyncio.to_thread(node.cli, *args)


async def get(node: Node, context: str, key: str) -> Any:
    return await asyncio.to_thread(node.get, context, key)


def sync_message(sync_type: int, payload: bytes) -> bytes:
    return varuint(0) + varuint(sync_type) + varuint(len(payload)) + payload


def awareness_message(*entries: tuple[int, int, Any]) -> bytes:
    body = varuint(len(entries))
    for client_id, clock, state in entries:
        text = json.dumps(state).encode()
        body += varuint(client_id) + varuint(clock) + varuint(len(text)) + text
    return varuint(1) + varuint(len(body)) + body


def read_awareness(message: bytes) -> dict[int, Any]:
    """Client id -> state of an awareness message (states decoded from JSON)."""
    assert message[0] == 1
    data = message[1:]
    pos = 0

    def uint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    uint()  # length of the update
    out = {}
    for _ in range(uint()):
        client_id, _clock, n = uint(), uint(), uint()
        out[client_id] = json.loads(data[pos : pos + n])
        pos += n
    return out


async def next_awareness(ws: ClientConnection) -> dict[int, Any]:
    """The states of the next awareness message ``ws`` receives (sync messages are skipped)."""
    while True:
        message = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(message, bytes)
        if message[0] == 1:
            return read_awareness(message)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """Two paired daemons, started and connected, shared by the tests of this module (each uses its own context)."""
    root = tmp_path_factory.mktemp("yjs")
    a, b = Node(root, "alice"), Node(root, "bob")
    try:
        a.init()
        b.init()
        a.pair(b)
        a.start()
        b.start()
        wait_for(lambda: a.connected_to(b) and b.connected_to(a))
        yield a, b
    finally:
        a.kill()
        b.kill()


async def test_providers_on_two_daemons_share_text_and_array(pair: tuple[Node, Node]) -> None:
    """A Y.Text and a Y.Array edited through one daemon reach a provider on its peer, and back."""
    a, b = pair
    await cli(a, "set", "notes", "seed", "true")  # made on one node first: both then share its lineage
    wait_for(lambda: b.get("notes", "seed") is True)

    doc_a: Doc[Any] = Doc()
    doc_b: Doc[Any] = Doc()
    async with provider(a, "notes", doc_a), provider(b, "notes", doc_b):
        doc_a["doc"] = text_a = Text("hello")
        doc_a["items"] = items_a = Array([1, "two"])
        text_b = doc_b.get("doc", type=Text)
        items_b = doc_b.get("items", type=Array)
        await wait_until(lambda: str(text_b) == "hello" and items_b.to_py() == [1.0, "two"], T)

        text_b += " world"
        items_b.append({"three": 3})
        await wait_until(lambda: str(text_a) == "hello world" and len(items_a) == 3, T)
        assert items_a.to_py() == [1.0, "two", {"three": 3.0}]


async def test_cli_entries_show_in_the_yjs_doc_and_cli_still_reads(pair: tuple[Node, Node]) -> None:
    """CLI writes appear under the "entries" root map; the CLI reads the context after a Yjs app edits it."""
    a, _ = pair
    await cli(a, "set", "board", "k", "1")
    doc: Doc[Any] = Doc()
    async with provider(a, "board", doc):
        entries = doc.get("entries", type=Map)
        slot = f"k\x1f{a.node_id}"
        await wait_until(lambda: slot in entries.to_py(), T)
        value = entries.to_py()[slot]
        assert value["v"] == "1" and len(value["t"]) == 16

        await cli(a, "set", "board", "k2", '{"x": [1, 2]}')  # a live update, after the sync
        await wait_until(lambda: f"k2\x1f{a.node_id}" in entries.to_py(), T)
        assert json.loads(entries.to_py()[f"k2\x1f{a.node_id}"]["v"]) == {"x": [1, 2]}

        doc["doc"] = text = Text("app text")
        text += " edited"
        fresh: Doc[Any] = Doc()  # a second client: it sees the edit once the daemon has it
        async with provider(a, "board", fresh):
            await wait_until(lambda: str(fresh.get("doc", type=Text)) == "app text edited", T)
    assert await get(a, "board", "k") == 1
    assert await get(a, "board", "k2") == {"x": [1, 2]}


async def test_text_survives_a_daemon_restart(make_node: MakeNode) -> None:
    """After a restart the daemon gives a new provider the text an earlier provider wrote."""
    node = make_node("solo")
    await asyncio.to_thread(node.start)
    doc: Doc[Any] = Doc()
    async with provider(node, "persist", doc):
        doc["doc"] = Text("kept across restarts")
    # The client sees no acknowledgement: wait until the daemon has it, through a second provider.
    probe: Doc[Any] = Doc()
    async with provider(node, "persist", probe):
        await wait_until(lambda: str(probe.get("doc", type=Text)) == "kept across restarts", T)
    assert await asyncio.to_thread(node.stop) == 0
    await asyncio.to_thread(node.start)
    again: Doc[Any] = Doc()
    async with provider(node, "persist", again):
        await wait_until(lambda: str(again.get("doc", type=Text)) == "kept across restarts", T)


async def test_handshake_without_token_or_with_origin_is_refused(pair: tuple[Node, Node]) -> None:
    """No token or a wrong one gets HTTP 401; a browser Origin header gets 403."""
    a, _ = pair
    for bad in (url(a, "notes", with_token=False), f"ws://127.0.0.1:{a.api_port}/yjs/notes?token=wrong"):
        with pytest.raises(InvalidStatus) as exc_info:
            async with websockets.connect(bad):
                pass
        assert exc_info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as exc_info:
        async with websockets.connect(url(a, "notes"), additional_headers={"Origin": "http://evil.example"}):
            pass
    assert exc_info.value.response.status_code == 403
    # The Authorization header is accepted as well as ?token=.
    async with websockets.connect(
        url(a, "notes", with_token=False), additional_headers={"Authorization": f"Bearer {token(a)}"}
    ) as ws:
        first = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(first, bytes) and first[:2] == b"\x00\x00"  # sync step 1


async def test_hostile_messages_close_only_that_connection(pair: tuple[Node, Node]) -> None:
    """Garbage, a malformed update and an entries-root misuse each close their connection; the daemon and the context stay as they were."""
    a, _ = pair
    await cli(a, "set", "hostile", "k", '"safe"')
    before = await get(a, "hostile", "k")
    refused_before = len(a.events("yjs.refused"))

    bad_entries: Doc[Any] = Doc()
    bad_entries.get("entries", type=Map)["k\x1fX"] = Text("not a plain value")
    attacks = [
        b"\xff" * 12,  # a varuint longer than lib0 allows
        varuint(0) + varuint(2) + varuint(1000) + b"\x01\x02",  # claims more bytes than it has
        sync_message(2, b"\x05\xff\xff\xff\xff\x0f\x01\x02\x03"),  # a sync update with a malformed update
        sync_message(2, bad_entries.get_update()),  # a shared type inside the entries root
    ]
    for attack in attacks:
        async with websockets.connect(url(a, "hostile")) as ws:
            await ws.send(attack)
            with pytest.raises(ConnectionClosed) as exc_info:
                while True:
                    await asyncio.wait_for(ws.recv(), T)
            assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code in (1003, 1008)

    wait_for(lambda: len(a.events("yjs.refused")) >= refused_before + len(attacks), T)
    refused = a.events("yjs.refused")[refused_before:]
    assert all(e["doc_id"] == "hostile" and e["reason"] for e in refused)
    assert a.status()["contexts"]["hostile"]["entries"] == 1
    assert await get(a, "hostile", "k") == before == "safe"
    doc: Doc[Any] = Doc()
    async with provider(a, "hostile", doc):
        assert set(doc.get("entries", type=Map).to_py()) == {f"k\x1f{a.node_id}"}


async def test_awareness_is_relayed_between_clients_of_a_context(pair: tuple[Node, Node]) -> None:
    """Awareness reaches the other clients, new and querying clients get current states, and a departure is announced."""
    a, _ = pair
    async with websockets.connect(url(a, "presence")) as one, websockets.connect(url(a, "presence")) as two:
        await one.send(awareness_message((1111, 1, {"user": "ana", "cursor": 3})))
        assert await next_awareness(two) == {1111: {"user": "ana", "cursor": 3}}
        assert await next_awareness(one) == {
            1111: {"user": "ana", "cursor": 3}
        }  # echoed, as y-websocket does

        async with websockets.connect(url(a, "presence")) as three:
            assert await next_awareness(three) == {1111: {"user": "ana", "cursor": 3}}  # on connect
            await three.send(awareness_message((3333, 1, {"user": "élise"})))
            assert await next_awareness(one) == {3333: {"user": "élise"}}
            assert await next_awareness(three) == {3333: {"user": "élise"}}  # its own, echoed
            await three.send(varuint(3))  # query awareness
            assert await next_awareness(three) == {
                1111: {"user": "ana", "cursor": 3},
                3333: {"user": "élise"},
            }
        assert await next_awareness(two) == {3333: {"user": "élise"}}
        assert await next_awareness(two) == {3333: None}  # three left

        await one.send(awareness_message((1111, 1, {"user": "stale"})))  # same clock: ignored
        await one.send(awareness_message((1111, 2, None)))  # the client says it is gone
        assert await next_awareness(two) == {1111: None}
    async with websockets.connect(url(a, "other")) as elsewhere:
        await elsewhere.send(varuint(3))
        first = await asyncio.wait_for(elsewhere.recv(), T)
        assert isinstance(first, bytes) and first[0] == 0  # step 1, and no awareness from "presence"


async def test_javascript_y_websocket_provider(pair: tuple[Node, Node], tmp_path: Path) -> None:
    """The JavaScript y-websocket provider syncs a Y.Text through the daemon (needs node and the npm packages)."""
    node_js = shutil.which("node")
    if node_js is None:
        pytest.skip("node (Node.js) is not installed")
    found = await asyncio.to_thread(
        subprocess.run,
        [node_js, "-e", "require.resolve('y-websocket'); require.resolve('yjs'); require.resolve('ws')"],
        capture_output=True,
        cwd=tmp_path,
    )
    if found.returncode != 0:
        pytest.skip(
            "the npm packages y-websocket, yjs and ws cannot be required (not installed; no network to npm here)"
        )
    a, _ = pair
    script = tmp_path / "client.js"
    script.write_text(
        "const Y = require('yjs'); const { WebsocketProvider } = require('y-websocket');\n"
        "const doc = new Y.Doc();\n"
        f"const p = new WebsocketProvider('ws://127.0.0.1:{a.api_port}/yjs', 'jsdoc', doc,"
        f" {{ WebSocketPolyfill: require('ws'), params: {{ token: '{token(a)}' }} }});\n"
        "p.on('sync', (ok) => { if (!ok) return; doc.getText('doc').insert(0, 'from js');"
        " setTimeout(() => { p.destroy(); process.exit(0); }, 500); });\n"
    )
    await asyncio.to_thread(subprocess.run, [node_js, str(script)], check=True, timeout=T * 4)
    doc: Doc[Any] = Doc()
    async with provider(a, "jsdoc", doc):
        await wait_until(lambda: str(doc.get("doc", type=Text)) == "from js", T)
