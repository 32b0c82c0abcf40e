"""
Pairing by invitation: ``ctxsync invite`` on node A, ``ctxsync join TOKEN`` on node B.

The invite token (one line, ~90 characters) is ``ctxsync-invite1:`` + base64url (no padding) of::

    fingerprint (32 bytes)   SHA-256 of A's certificate DER: B pins A by it (A's node id)
    invite id   (8 bytes)    random; names the invite, public
    secret      (16 bytes)   random, 128 bits; never sent, only proven
    port        (2 bytes)    big endian: A's pairing listener
    host        (rest)       4 bytes IPv4, 16 bytes IPv6, or a UTF-8 host name

The exchange runs on A's *pairing listener*: a separate, short-lived TLS 1.3 listener (never
the sync listener), one JSON line each way:

1. B connects with TLS 1.3. Python's ``ssl`` cannot verify a bare fingerprint, so B takes
   whatever certificate A presents, then compares its SHA-256 with the token's before sending
   a byte. The TLS 1.3 handshake has already proven that A holds that certificate's key
   (CertificateVerify), so this pins A exactly as a CA-less trust store would.
2. B sends ``{"invite": id, "card": B's peer card, "proof": HMAC-SHA256(secret, "ctxsync-join-v1"
   || A's fingerprint || invite id || card)}``: the proof binds the secret to this card and this
   inviter; the secret itself never leaves B, not even inside TLS.
3. A checks the invite (known, not expired, not used, fewer than :data:`MAX_FAILURES` wrong
   proofs) and the proof (constant time), marks it used, pairs B, and answers ``{"ok": true,
   "card": A's peer card, "contexts": [...], "read_only": bool}``; or ``{"ok": false, "error":
   reason, "message": text}`` with reason ``unknown``, ``expired``, ``used``, ``wrong_secret``,
   ``bad_request``.

B needs no certificate of A beforehand (the fingerprint suffices) and A learns B's
certificate from the card; both sides then trust each other's pinned certificate on the sync
listener as if they had exchanged peer cards by hand.

No home-made cryptography: TLS 1.3 from ``ssl``, HMAC-SHA256 from ``hmac``, randomness from
``secrets``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import secrets
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from ctxsync.crypto import PeerCard, decode_peer_card, node_id_from_cert, node_id_from_fingerprint
from ctxsync.errors import CryptoError, CtxSyncError
from ctxsync.types import NodeId

__all__ = [
    "TOKEN_PREFIX",
    "InviteToken",
    "JoinResult",
    "PairingError",
    "PairingListener",
    "decode_token",
    "encode_token",
    "join",
]

log = structlog.get_logger("ctxsync.pairing")

TOKEN_PREFIX: Final = "ctxsync-invite1:"
"""Prefix of every invite token (format version 1)."""

MAX_LINE_BYTES: Final = 65_536
"""Longest request or answer line on the pairing listener, in bytes."""

IO_TIMEOUT_S: Final = 10.0
"""Time allowed for the TLS handshake and for each line, in seconds."""

MAX_FAILURES: Final = 5
"""Wrong proofs after which an invite is withdrawn (the secret has 128 bits; this bounds noise)."""

CLOSE_GRACE_S: Final = 60.0
"""How long the listener stays open after its last invite ended (used or expired), so that a
late join is told why, in seconds. Then it closes and nothing of the invites is kept."""

MAX_CONNECTIONS: Final = 8
"""Pairing connections served at once; more are closed at once."""

_PROOF_LABEL: Final = b"ctxsync-join-v1"
_SECRET_BYTES: Final = 16
_ID_BYTES: Final = 8
_SNI: Final = "ctxsync-pairing"


class PairingError(CtxSyncError):
    """Pairing failed; the message says why and what to do.

    Attributes:
        reason: ``unknown``, ``expired``, ``used``, ``wrong_secret``, ``wrong_node``,
            ``unreachable``, ``bad_token`` or ``bad_request``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InviteToken:
    """The decoded contents of an invite token."""

    fingerprint: bytes
    """SHA-256 of the inviter's certificate DER (32 bytes)."""
    invite_id: bytes
    """Random invite id (8 bytes)."""
    secret: bytes
    """Random one-time secret (16 bytes)."""
    host: str
    """Host of the inviter's pairing listener."""
    port: int
    """Port of the inviter's pairing listener."""

    @property
    def node_id(self) -> NodeId:
        """The inviter's node id, derived from :attr:`fingerprint`."""
        return node_id_from_fingerprint(self.fingerprint)


def encode_token(token: InviteToken) -> str:
    """Encode an invite token as one line: :data:`TOKEN_PREFIX` + base64url of the layout above."""
    try:
        ip = ipaddress.ip_address(token.host)
        host = ip.packed
    except ValueError:
        host = token.host.encode("utf-8")
    body = token.fingerprint + token.invite_id + token.secret + struct.pack(">H", token.port) + host
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def decode_token(text: str) -> InviteToken:
    """
    Decode an invite token typed or pasted by a person (white space anywhere is ignored).

    Raises:
        PairingError: ``bad_token``, saying what is wrong with it.
    """
    text = "".join(text.split())
    if not text.startswith(TOKEN_PREFIX):
        raise PairingError(f"not an invite token: it should start with {TOKEN_PREFIX!r} (from `ctxsync invite`)", reason="bad_token")
    body_text = text[len(TOKEN_PREFIX) :]
    try:
        body = base64.urlsafe_b64decode(body_text + "=" * (-len(body_text) % 4))
    except (binascii.Error, ValueError):
        raise PairingError("the invite token is damaged (not base64url): copy it again whole", reason="bad_token") from None
    if base64.urlsafe_b64encode(body).decode("ascii").rstrip("=") != body_text:
        raise PairingError("the invite token is damaged (its last character): copy it again whole", reason="bad_token")
    fixed = 32 + _ID_BYTES + _SECRET_BYTES + 2
    if len(body) <= fixed or len(body) > fixed + 255:
        raise PairingError("the invite token is truncated or too long: copy it again whole", reason="bad_token")
    fingerprint, invite_id = body[:32], body[32 : 32 + _ID_BYTES]
    secret = body[32 + _ID_BYTES : 32 + _ID_BYTES + _SECRET_BYTES]
    (port,) = struct.unpack(">H", body[fixed - 2 : fixed])
    raw_host = body[fixed:]
    if len(raw_host) in (4, 16):
        host = str(ipaddress.ip_address(raw_host))
    else:
        try:
            host = raw_host.decode("utf-8")
        except UnicodeDecodeError:
            raise PairingError("the invite token's host is damaged: copy it again whole", reason="bad_token") from None
    if port == 0 or not host:
        raise PairingError("the invite token has no address: copy it again whole", reason="bad_token")
    return InviteToken(fingerprint, invite_id, secret, host, port)


def _proof(secret: bytes, fingerprint: bytes, invite_id: bytes, card: str) -> str:
    mac = hmac.new(secret, _PROOF_LABEL + fingerprint + invite_id + card.encode("ascii"), hashlib.sha256)
    return mac.hexdigest()


@dataclass
class _Invite:
    invite_id: bytes
    secret: bytes
    expires_at: float  # time.monotonic()
    contexts: tuple[str, ...]
    read_only: bool
    wall_expires_at: float  # time.time(), for messages
    used_by: NodeId | None = None
    used_at: float = 0.0  # time.monotonic()
    failures: int = 0

    def ended_at(self) -> float:
        """When this invite stopped being usable (monotonic seconds)."""
        return self.used_at if self.used_by is not None else self.expires_at


@dataclass(frozen=True, slots=True)
class JoinResult:
    """What a successful join learned: the inviter's card and what it shares."""

    card: PeerCard
    """The inviter's peer card (certificate, name, sync address)."""
    contexts: tuple[str, ...]
    """Contexts the inviter shares with the joiner (``("*",)`` for all)."""
    read_only: bool
    """Whether the inviter accepts no updates from the joiner."""


OnJoin = Callable[[PeerCard, tuple[str, ...], bool], Awaitable[None]]
"""``on_join(card, contexts, read_only)``: pair the joiner (write peers.toml, go live). Raising refuses the join."""


@dataclass
class PairingListener:
    """
    The pairing listener of one daemon: opened by the first invite, closed
    :data:`CLOSE_GRACE_S` after the last open invite ended.

    Args:
        cert_path: This node's certificate (PEM), served in the TLS handshake.
        key_path: Its private key.
        own_card: Returns this node's peer card (sent to the joiner).
        on_join: Pairs a joiner; see :data:`OnJoin`.
    """

    cert_path: Path
    key_path: Path
    own_card: Callable[[], str]
    on_join: OnJoin
    _invites: dict[bytes, _Invite] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _host: str = ""
    _port: int = 0
    _active: int = 0
    _reaper: asyncio.Task[None] | None = None
    _fingerprint: bytes = b""

    async def invite(
        self, *, host: str, port: int, ttl_s: float, contexts: Sequence[str], read_only: bool
    ) -> tuple[InviteToken, float]:
        """
        Open an invite (and the listener on ``host:port`` if it is not open yet).

        Args:
            host: Address to listen on (``0.0.0.0`` for every interface).
            port: Port to listen on; 0 picks a free one. Ignored while the listener is open.
            ttl_s: Lifetime of the invite, in seconds (> 0).
            contexts: What the joiner will share (``["*"]`` for every context).
            read_only: Whether the joiner's updates will be refused.

        Returns:
            ``(token, expires_at)``: the token with the listener's actual port and ``host``
            (the caller replaces a wildcard host with an address the joiner can reach), and
            the Unix time it expires.

        Raises:
            OSError: If the listener cannot be opened.
        """
        if self._server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(self.cert_path, self.key_path)
            self._fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert_path.read_text())).digest()
            self._server = await asyncio.start_server(
                self._connection, host, port, ssl=ctx, ssl_handshake_timeout=IO_TIMEOUT_S, limit=MAX_LINE_BYTES
            )
            self._host, self._port = host, self._server.sockets[0].getsockname()[1]
            log.info("pairing.listening", host=host, port=self._port)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="pairing-reaper")
        invite = _Invite(
            invite_id=secrets.token_bytes(_ID_BYTES),
            secret=secrets.token_bytes(_SECRET_BYTES),
            expires_at=time.monotonic() + ttl_s,
            wall_expires_at=time.time() + ttl_s,
            contexts=tuple(contexts),
            read_only=read_only,
        )
        self._invites[invite.invite_id] = invite
        log.info(
            "pairing.invited",
            invite_id=invite.invite_id.hex(),
            ttl_s=ttl_s,
            contexts=list(invite.contexts),
            read_only=read_only,
        )
        token = InviteToken(self._fingerprint, invite.invite_id, invite.secret, host, self._port)
        return token, invite.wall_expires_at

    @property
    def port(self) -> int:
        """The listener's port, 0 while closed."""
        return self._port if self._server is not None else 0

    def pending(self) -> int:
        """Invites neither used nor expired."""
        now = time.monotonic()
        return sum(1 for i in self._invites.values() if i.used_by is None and i.expires_at > now)

    async def close(self) -> None:
        """Close the listener and forget every invite."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 3)
            log.info("pairing.closed", port=self._port)
        self._invites.clear()

    async def _reap(self) -> None:
        # Close the listener (and forget every invite) CLOSE_GRACE_S after the last one ended.
        while self._server is not None:
            await asyncio.sleep(0.5)
            if self.pending() == 0:
                last_end = max((i.ended_at() for i in self._invites.values()), default=0.0)
                if time.monotonic() - last_end >= CLOSE_GRACE_S:
                    server, self._server = self._server, None
                    server.close()
                    self._invites.clear()
                    log.info("pairing.closed", port=self._port)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            answer = await self._answer(reader, addr)
            writer.write(json.dumps(answer).encode("ascii") + b"\n")
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.info("pairing.refused", addr=addr, reason="connection", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _answer(self, reader: asyncio.StreamReader, addr: str) -> dict[str, Any]:
        def refuse(reason: str, message: str, **fields: Any) -> dict[str, Any]:
            log.warning("pairing.refused", addr=addr, reason=reason, **fields)
            return {"ok": False, "error": reason, "message": message}

        try:
            line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
            req = json.loads(line)
            invite_id = bytes.fromhex(req["invite"])
            card_text, proof = req["card"], req["proof"]
            if not isinstance(card_text, str) or not isinstance(proof, str):
                raise TypeError("card and proof must be strings")
            card = decode_peer_card(card_text)
        except (ValueError, KeyError, TypeError, CryptoError, asyncio.LimitOverrunError) as exc:
            return refuse("bad_request", f"malformed join request: {exc}")
        invite = self._invites.get(invite_id)
        if invite is None:
            return refuse("unknown", "this node has no such invite: it is for another node, or was withdrawn")
        if invite.used_by is not None:
            return refuse("used", "this invite was already used: ask for a new one", invite_id=invite_id.hex())
        if time.monotonic() >= invite.expires_at:
            return refuse("expired", "this invite has expired: ask for a new one", invite_id=invite_id.hex())
        expected = _proof(invite.secret, self._fingerprint, invite_id, card_text)
        if not hmac.compare_digest(expected, proof):
            invite.failures += 1
            if invite.failures >= MAX_FAILURES:
                invite.expires_at = 0.0
            return refuse("wrong_secret", "wrong secret: the token was altered", invite_id=invite_id.hex(), failures=invite.failures)
        invite.used_by, invite.used_at = card.node_id, time.monotonic()  # before any await: no second join
        try:
            await self.on_join(card, invite.contexts, invite.read_only)
        except Exception as exc:
            invite.used_by = None
            return refuse("bad_request", f"cannot pair: {exc}", peer_id=card.node_id)
        log.info(
            "pairing.joined",
            peer_id=card.node_id,
            peer_name=card.name,
            addr=addr,
            contexts=list(invite.contexts),
            read_only=invite.read_only,
        )
        return {"ok": True, "card": self.own_card(), "contexts": list(invite.contexts), "read_only": invite.read_only}


async def join(token: InviteToken, own_card: str, *, timeout_s: float = IO_TIMEOUT_S) -> JoinResult:
    """
    Redeem an invite at the inviter's pairing listener.

    Args:
        token: The decoded invite token.
        own_card: This node's peer card (:func:`ctxsync.crypto.encode_peer_card`).
        timeout_s: Bound of the connection, the handshake and the answer, each, in seconds.

    Returns:
        The inviter's card and what it shares with this node.

    Raises:
        PairingError: ``unreachable`` (nothing answers, e.g. the invite's node stopped or its
            listener closed after the invite ended), ``wrong_node`` (the certificate at the
            address is not the one in the token), or the inviter's refusal reason.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned below by the token's fingerprint, before sending anything
    where = f"{token.host}:{token.port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                token.host, token.port, ssl=ctx, server_hostname=_SNI, ssl_handshake_timeout=timeout_s, limit=MAX_LINE_BYTES
            ),
            timeout_s,
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise PairingError(
            f"cannot reach the inviting node at {where} ({type(exc).__name__}: {exc}): is its daemon running,"
            " and is the invite still open? (an ended invite closes its listener)",
            reason="unreachable",
        ) from None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if not der or not hmac.compare_digest(hashlib.sha256(der).digest(), token.fingerprint):
            found = node_id_from_cert(der) if der else "none"
            raise PairingError(
                f"the node at {where} is not the one that made this invite (it is {found}, the invite names"
                f" {token.node_id}): wrong address, or someone is impersonating it; nothing was sent",
                reason="wrong_node",
            )
        proof = _proof(token.secret, token.fingerprint, token.invite_id, own_card)
        request = {"invite": token.invite_id.hex(), "card": own_card, "proof": proof}
        writer.write(json.dumps(request).encode("ascii") + b"\n")
        await asyncio.wait_for(writer.drain(), timeout_s)
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
        raise PairingError(f"the pairing exchange with {where} failed: {type(exc).__name__}: {exc}", reason="unreachable") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
    try:
        answer = json.loads(line)
        if not answer.get("ok"):
            raise PairingError(f"the inviting node refused: {answer.get('message', 'no reason given')}", reason=str(answer.get("error", "bad_request")))
        card = decode_peer_card(answer["card"])
        contexts = tuple(str(c) for c in answer["contexts"])
        read_only = bool(answer["read_only"])
    except PairingError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, CryptoError) as exc:
        raise PairingError(f"the inviting node sent a malformed answer: {exc}", reason="bad_request") from None
    if card.node_id != token.node_id:
        raise PairingError("the inviting node answered with another node's card", reason="wrong_node")
    return JoinResult(card, contexts, read_only)

