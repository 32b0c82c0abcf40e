"""Invite tokens and the pairing exchange, in process over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from pathlib import Path

import pytest

from ctxsync.crypto import PeerCard, decode_peer_card, encode_peer_card, fingerprint, generate_identity
from ctxsync.pairing import TOKEN_PREFIX, InviteToken, PairingError, PairingListener, decode_token, encode_token, join


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "192.168.10.200", "laptop.local", "fe80::1"])
def test_token_round_trip(host: str) -> None:
    """Encodes to one short line and decodes back, for IPv4, IPv6 and host names."""
    token = InviteToken(bytes(range(32)), b"\x01" * 8, b"\x02" * 16, host, 47123)
    text = encode_token(token)
    assert text.startswith(TOKEN_PREFIX) and len(text) < 120 and "\n" not in text
    assert decode_token(text) == token
    assert decode_token(" " + text[:30] + "\n " + text[30:] + " ") == token  # wrapped by a mail client


def test_damaged_tokens_are_refused_clearly() -> None:
    """Every truncation or mutation fails with PairingError(bad_token) or decodes to a different token."""
    token = InviteToken(bytes(range(32)), b"\x01" * 8, b"\x02" * 16, "10.0.0.7", 47123)
    text = encode_token(token)
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_!="
    for _ in range(2000):
        body = list(text[len(TOKEN_PREFIX) :])
        cut = rng.random() < 0.3
        if cut:
            body = body[: rng.randrange(len(body))]
        else:
            body[rng.randrange(len(body))] = rng.choice(alphabet)
        try:
            decoded = decode_token(TOKEN_PREFIX + "".join(body))
        except PairingError as exc:
            assert exc.reason == "bad_token" and "token" in str(exc)
            continue
        assert decoded != token or "".join(body) == text[len(TOKEN_PREFIX) :]
    with pytest.raises(PairingError, match="should start with"):
        decode_token("ctxsync1:" + text[len(TOKEN_PREFIX) :])


class Side:
    """One node's identity on disk and its card."""

    def __init__(self, root: Path, name: str) -> None:
        ident = generate_identity(name)
        self.dir = root / name
        self.dir.mkdir()
        self.cert_path, self.key_path = self.dir / "node.crt", self.dir / "node.key"
        self.cert_path.write_bytes(ident.cert_pem)
        self.key_path.write_bytes(ident.key_pem)
        self.node_id = ident.node_id
        self.card = encode_peer_card(PeerCard(node_id=ident.node_id, name=name, addr="127.0.0.1:1", cert_pem=ident.cert_pem))


async def test_join_pairs_once_and_binds_proof_to_card(tmp_path: Path) -> None:
    """A join pairs the joiner's card; the same token cannot pair another card, even with its proof replayed."""
    a, b, c = Side(tmp_path, "a"), Side(tmp_path, "b"), Side(tmp_path, "c")
    joined: list[tuple[str, tuple[str, ...], bool]] = []

    async def on_join(card: PeerCard, contexts: tuple[str, ...], read_only: bool) -> None:
        joined.append((card.node_id, contexts, read_only))

    listener = PairingListener(a.cert_path, a.key_path, own_card=lambda: a.card, on_join=on_join)
    try:
        token, _ = await listener.invite(host="127.0.0.1", port=0, ttl_s=30, contexts=["x", "y"], read_only=True)
        assert token.fingerprint == fingerprint(a.cert_path.read_bytes())
        result = await join(token, b.card)
        assert result.card == decode_peer_card(a.card) and result.contexts == ("x", "y") and result.read_only
        assert joined == [(b.node_id, ("x", "y"), True)]
        with pytest.raises(PairingError) as used:
            await join(token, c.card)
        assert used.value.reason == "used"
        # A request whose proof was made for B's card, carrying C's card, is refused as a wrong secret.
        token2, _ = await listener.invite(host="127.0.0.1", port=0, ttl_s=30, contexts=["*"], read_only=False)
        from ctxsync.pairing import _proof

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", token2.port, ssl=ctx, server_hostname="x")
        proof = _proof(token2.secret, token2.fingerprint, token2.invite_id, b.card)
        writer.write(json.dumps({"invite": token2.invite_id.hex(), "card": c.card, "proof": proof}).encode() + b"\n")
        answer = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
        assert answer == {"ok": False, "error": "wrong_secret", "message": "wrong secret: the token was altered"}
        assert len(joined) == 1
    finally:
        await listener.close()


async def test_malformed_requests_are_refused(tmp_path: Path) -> None:
    """Garbage, oversized or truncated requests get a refusal or a closed connection, never a pairing."""
    a = Side(tmp_path, "a")
    joined: list[PeerCard] = []

    async def on_join(card: PeerCard, contexts: tuple[str, ...], read_only: bool) -> None:
        joined.append(card)

    listener = PairingListener(a.cert_path, a.key_path, own_card=lambda: a.card, on_join=on_join)
    try:
        token, _ = await listener.invite(host="127.0.0.1", port=0, ttl_s=30, contexts=["*"], read_only=False)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        for payload in (b"not json\n", b"[]\n", b'{"invite": "zz"}\n', b"{" + b" " * 70_000 + b"}\n", b"\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", token.port, ssl=ctx, server_hostname="x")
            writer.write(payload)
            line = await asyncio.wait_for(reader.read(), 15)
            writer.close()
            await writer.wait_closed()
            if line:
                assert json.loads(line)["ok"] is False
        # Plain TCP (no TLS) is dropped by the handshake.
        reader, writer = await asyncio.open_connection("127.0.0.1", token.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        await writer.wait_closed()
        assert joined == [] and listener.pending() == 1
    finally:
        await listener.close()
