"""A paired but hostile peer: its bad frames close only its own session; the daemon serves everyone else."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pycrdt
import pytest

from ctxsync.codec import Hello, SyncUpdate, encode
from ctxsync.crypto import client_tls_context
from ctxsync.errors import PeerDisconnected
from ctxsync.transport import dial
from ctxsync.types import PROTOCOL_VERSION, DocId, NodeId
from tests.integration.nodes import Node, wait_for

pytestmark = pytest.mark.integration


def text_under_entries_root() -> bytes:
    """A well-formed update that would turn the entries map of a context into a Y.Text."""
    doc: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
    doc.get("entries", type=pycrdt.Text).insert(0, "hostile")
    return doc.get_update()


async def send_as(mallory: Node, target: Node, frames: list[bytes]) -> str:
    """Connect to ``target`` with mallory's identity, say Hello, send ``frames``; return how it ended."""
    ctx = client_tls_context(mallory.home / "node.crt", mallory.home / "node.key", (target.home / "node.crt").read_bytes())
    channel = await dial(
        "127.0.0.1",
        target.listen_port,
        ssl_context=ctx,
        expected_peer=NodeId(target.node_id),
        max_frame_bytes=1 << 20,
        ping_interval=5,
        ping_timeout=5,
    )
    await channel.send(encode(Hello(PROTOCOL_VERSION, mallory.node_id, "mallory")))
    try:
        async with asyncio.timeout(10):
            for frame in frames:
                await channel.send(frame)
            while True:
                await channel.recv()
    except PeerDisconnected as exc:
        return str(exc)
    finally:
        await channel.close()


@pytest.mark.parametrize(
    ("case", "frames", "reason"),
    [
        ("garbage frame", [b"\x09garbage"], "unknown message type"),
        ("truncated frame", [b"\xff\xfe\xfd"], "truncated varuint"),
        ("truncated update", [encode(SyncUpdate(DocId("ctx"), (b"\x01\x01\x80",)))], "update"),
        ("huge claimed length", [encode(SyncUpdate(DocId("ctx"), (b"\x01\xff\xff\xff\xff\x0f\x00",)))], "update"),
        (
            "entries root turned into text",
            [encode(SyncUpdate(DocId("ctx"), (text_under_entries_root(),)))],
            "entries",
        ),
        ("oversized frame", [b"\x03" + b"\x00" * (1 << 21)], None),
    ],
)
def test_hostile_peer_closes_only_its_session(
    make_node: Callable[..., Node], case: str, frames: list[bytes], reason: str | None
) -> None:
    """Each bad input closes the hostile session with a logged reason; nothing is stored; other peers go on."""
    a, b, mallory = make_node("alice"), make_node("bob"), make_node("mallory")
    a.pair(b)
    a.pair(mallory)
    a.start()
    b.start()
    wait_for(lambda: a.connected_to(b))
    a.cli("set", "ctx", "k", '"before"')
    ended = asyncio.run(send_as(mallory, a, frames))
    assert "closed" in ended
    if reason is not None:
        wait_for(lambda: bool(a.events("peer.protocol_error")))
        err = a.events("peer.protocol_error")[0]
        assert err["peer_id"] == mallory.node_id and reason in err["reason"], err
        assert err["level"] == "warning"
    wait_for(lambda: any(e.get("peer_id") == mallory.node_id for e in a.events("peer.disconnected")))
    # Nothing of it was kept, and alice still serves bob both ways.
    assert a.get("ctx") == {"k": "before"}
    b.cli("set", "ctx", "from-bob", "1")
    wait_for(lambda: a.get("ctx", "from-bob") == 1)
    a.cli("set", "ctx", "from-alice", "2")
    wait_for(lambda: b.get("ctx", "from-alice") == 2)
    assert a.proc is not None and a.proc.poll() is None
    assert not [e for e in a.events() if e["level"] in ("error", "critical")], case
