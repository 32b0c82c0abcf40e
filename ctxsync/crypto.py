"""
Node identity, node ids, peer cards and the TLS policy between peers.

This module owns a node's identity (an Ed25519 key and a self-signed X.509 certificate), the node
id derived from it (Syncthing's device-ID format), the one-line peer card exchanged when pairing,
and the mutual TLS 1.3 contexts that pin peer certificates. Keys and certificates come from
``cryptography``, the channel is the standard library's TLS 1.3: no home-made cipher or handshake.

Rule: a pure layer. It imports no asyncio, websockets, sqlite3, psutil or structlog; it returns
values and raises :class:`~ctxsync.errors.CryptoError`, and the caller logs. The only files it reads
are the identity files that :meth:`ssl.SSLContext.load_cert_chain` insists on getting as paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CryptoError
from .types import TLS_SERVER_NAME, NodeId

__all__ = [
    "PEER_CARD_PREFIX", "Identity", "PeerCard", "cert_der", "client_tls_context", "decode_peer_card",
    "encode_peer_card", "fingerprint", "generate_identity", "node_id_from_cert", "node_id_from_fingerprint", "parse_node_id",
    "peer_cert_node_id", "server_tls_context", "short_id",
]  # fmt: skip

PEER_CARD_PREFIX = "ctxsync1:"
"""Prefix of a peer card; the digit is the card format version."""

MAX_PEER_CARD_CHARS = 8192
"""Longest peer card accepted, in characters (a real one has about 1,000)."""

MAX_NAME_CHARS = 64
"""Longest node name, in characters: RFC 5280's ``ub-common-name``."""

MAX_ADDR_CHARS = 300
"""Longest peer address in a card, in characters (a 253-character DNS name, ``:port``, room)."""

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 section 6; also Syncthing's luhnBase32
_B32_VALUE = {c: i for i, c in enumerate(_B32)}
_ID_CHARS = 56  # 52 base32 characters of a SHA-256, plus 4 check characters
_CARD_BODY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip
_DER = serialization.Encoding.DER
_PEM = serialization.Encoding.PEM


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's identity: its self-signed certificate and private key.

    Attributes:
        node_id: Node id of ``cert_pem`` (:func:`node_id_from_cert`).
        cert_pem: PEM X.509 certificate, one ``CERTIFICATE`` block.
        key_pem: PEM PKCS#8 Ed25519 private key, unencrypted; the caller writes it with mode 0600.
            Left out of ``repr()``.
    """

    node_id: NodeId
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PeerCard:
    """What a node tells another so that they can pair.

    Attributes:
        node_id: The node's id; equal to ``node_id_from_cert(cert_pem)`` in a checked card.
        name: Human-readable node name, 1 to 64 printable characters.
        addr: ``HOST:PORT`` where the node listens for peers, or ``None`` if it only dials out.
        cert_pem: The node's PEM X.509 certificate, to be pinned.
    """

    node_id: NodeId
    name: str
    addr: str | None
    cert_pem: bytes


def generate_identity(name: str, *, now: datetime | None = None) -> Identity:
    """Make a new Ed25519 key and a self-signed X.509 v3 certificate for it.

    The certificate follows RFC 5280: a random positive 159-bit serial number (4.1.2.2), subject =
    issuer = ``CN=<name>, O=ctxsync``, valid from a day before ``now`` (clock skew between peers) to
    20 years after it, and the extensions basicConstraints ``CA:FALSE`` (critical), keyUsage
    digitalSignature (critical), extendedKeyUsage serverAuth + clientAuth, subject and authority key
    identifiers (4.2.1.2 method 1) and subjectAltName ``dNSName=`` :data:`~ctxsync.types.TLS_SERVER_NAME`.

    Args:
        name: Human-readable node name, 1 to 64 printable characters.
        now: Issue time; a naive datetime is taken as UTC. Defaults to the current time.

    Raises:
        CryptoError: If ``name`` is empty, too long or not printable.
    """
    _check_name(name)
    now = datetime.now(UTC) if now is None else now
    now = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(UTC)
    now = now.replace(microsecond=0)  # X.509 times have whole seconds
    try:
        not_after = now.replace(year=now.year + 20)
    except ValueError:  # 29 February
        not_after = now.replace(year=now.year + 20, day=28)
    serial = 0
    while serial == 0:  # positive, and at most 20 octets in DER
        serial = secrets.randbits(159)

    key = ed25519.Ed25519PrivateKey.generate()
    public_key = key.public_key()
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ctxsync")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), org])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
        .sign(key, None)  # Ed25519 hashes internally: no separate digest algorithm
    )
    key_pem = key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    node_id = _node_id_from_der(cert.public_bytes(_DER))
    return Identity(node_id=node_id, cert_pem=cert.public_bytes(_PEM), key_pem=key_pem)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise CryptoError(f"node name must be 1 to {MAX_NAME_CHARS} printable characters")
    return name


def _load_cert(cert: bytes) -> x509.Certificate:
    """Parse exactly one certificate, PEM or DER (a second one would be trusted too when pinned)."""
    if not isinstance(cert, bytes | bytearray | memoryview):
        raise CryptoError(f"certificate must be bytes, not {type(cert).__name__}")
    try:
        if b"-----BEGIN" in cert:
            certs = x509.load_pem_x509_certificates(bytes(cert))
            if len(certs) != 1:
                raise CryptoError(f"expected one PEM certificate, found {len(certs)}")
            return certs[0]
        return x509.load_der_x509_certificate(bytes(cert))
    except ValueError as exc:
        raise CryptoError("not a valid X.509 certificate") from exc


def _pinnable(cert: x509.Certificate) -> x509.Certificate:
    """Refuse a CA certificate as a peer's: pinning it would trust every certificate it issues."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:  # malformed extensions
        raise CryptoError("not a valid X.509 certificate") from exc
    if is_ca:
        raise CryptoError("a peer certificate must not be a CA certificate (basicConstraints CA:TRUE)")
    return cert


def cert_der(cert_pem: bytes) -> bytes:
    """Return the DER encoding (RFC 5280 ``Certificate``) of one PEM certificate; DER is returned as is.

    Raises:
        CryptoError: If the input is not exactly one valid certificate.
    """
    return _load_cert(cert_pem).public_bytes(_DER)


def fingerprint(cert: bytes) -> bytes:
    """Return the 32-byte SHA-256 of a certificate's DER encoding; ``cert`` is PEM or DER.

    Raises:
        CryptoError: If the input is not exactly one valid certificate.
    """
    return hashlib.sha256(cert_der(cert)).digest()


def _luhn32(group: str) -> str:
    """Return Syncthing's check character for a group of base32 characters.

    Not textbook Luhn mod N: the factor starts at 1 on the *leftmost* character, as in Syncthing's
    ``lib/protocol/luhn.go`` (``luhn32``), so ids check the same as Syncthing device IDs.
    """
    factor, total, n = 1, 0, len(_B32)
    for char in group:
        addend = factor * _B32_VALUE[char]
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _B32[(n - total % n) % n]


def _checked_chars(digest: bytes) -> str:
    """Return the 56 characters of a node id, without dashes, for a SHA-256 digest."""
    digits = base64.b32encode(digest).decode("ascii").rstrip("=")  # 52 characters
    return "".join(g + _luhn32(g) for g in (digits[i : i + 13] for i in range(0, 52, 13)))


def _dashed(chars: str) -> NodeId:
    return NodeId("-".join(chars[i : i + 7] for i in range(0, _ID_CHARS, 7)))


def _node_id_from_der(der: bytes) -> NodeId:
    return _dashed(_checked_chars(hashlib.sha256(der).digest()))


def node_id_from_fingerprint(digest: bytes) -> NodeId:
    """The node id of the certificate whose DER has this SHA-256 (32 bytes); see :func:`node_id_from_cert`.

    Raises:
        CryptoError: If ``digest`` is not 32 bytes.
    """
    if len(digest) != 32:
        raise CryptoError(f"a certificate fingerprint is 32 bytes, got {len(digest)}")
    return _dashed(_checked_chars(digest))


def node_id_from_cert(cert: bytes) -> NodeId:
    """Derive a node id from a certificate (PEM or DER), in Syncthing's device-ID format.

    Format (Syncthing ``lib/protocol/deviceid.go``): base32 (RFC 4648, no padding) of the SHA-256 of
    the DER is 52 characters; each of its 4 groups of 13 gets a check character (:func:`_luhn32`),
    giving 56, printed as 8 groups of 7 joined by ``-`` (63 characters), e.g.
    ``P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2``.

    Raises:
        CryptoError: If the input is not exactly one valid certificate.
    """
    return _node_id_from_der(cert_der(cert))


def parse_node_id(text: str) -> NodeId:
    """Parse a node id typed or pasted by a person: any case, spaces and dashes anywhere.

    Returns:
        The canonical form: upper case, 8 groups of 7 joined by ``-``.

    Raises:
        CryptoError: If ``text`` is not 56 base32 characters or a check character does not match.
    """
    if not isinstance(text, str):
        raise CryptoError(f"node id must be a string, not {type(text).__name__}")
    if not text.isascii():  # before upper(): dotless i (U+0131) upper-cases to "I"
        raise CryptoError("node id must be ASCII: A-Z and 2-7 in groups separated by '-'")
    chars = "".join(text.split()).replace("-", "").upper()
    if len(chars) != _ID_CHARS or not set(chars) <= _B32_VALUE.keys():
        raise CryptoError(
            f"not a node id: expected {_ID_CHARS} characters A-Z and 2-7 (8 groups of 7), got {len(chars)}"
        )
    for index in range(4):
        if _luhn32(chars[index * 14 : index * 14 + 13]) != chars[index * 14 + 13]:
            raise CryptoError(f"node id check character {index + 1} of 4 does not match: mistyped node id?")
    # The 52nd digit holds one bit of the hash and 4 padding bits, which must be 0: one id per hash.
    digits = "".join(chars[i : i + 13] for i in range(0, _ID_CHARS, 14))
    if _checked_chars(base64.b32decode(digits + "====")) != chars:
        raise CryptoError("not a node id: non-canonical final character")
    return _dashed(chars)


def short_id(node_id: NodeId) -> str:
    """Return the first group of a node id (7 characters), for logs and tables. Not unique."""
    return node_id[:7]


def encode_peer_card(card: PeerCard) -> str:
    """Encode a peer card as one copy-pasteable line of ASCII (about 1,000 characters).

    Format (ctxsync's own, version 1): ``ctxsync1:`` and base64url without padding (RFC 4648
    section 5) of the compact JSON ``{"id": node id, "name": str, "addr": "HOST:PORT" | null,
    "cert": PEM text}``.

    Raises:
        CryptoError: If the card would not decode (:func:`decode_peer_card`), e.g. a wrong node id.
    """
    card = _checked_card(card.node_id, card.name, card.addr, card.cert_pem)
    fields = {"id": card.node_id, "name": card.name, "addr": card.addr, "cert": card.cert_pem.decode("ascii")}
    body = json.dumps(fields, separators=(",", ":")).encode("ascii")  # ensure_ascii
    return PEER_CARD_PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def decode_peer_card(text: str) -> PeerCard:
    """Decode and check a peer card made by :func:`encode_peer_card`.

    Whitespace anywhere is ignored (mail clients wrap long lines).

    Returns:
        The card, with a canonical ``node_id`` equal to the certificate's and ``cert_pem``
        re-encoded from the parsed certificate (so it holds exactly one).

    Raises:
        CryptoError: If the prefix, base64url, JSON, a field or the certificate is invalid, the
            certificate is a CA's, or the node id is not the certificate's.
    """
    if not isinstance(text, str):
        raise CryptoError(f"peer card must be a string, not {type(text).__name__}")
    text = "".join(text.split())
    if len(text) > MAX_PEER_CARD_CHARS:
        raise CryptoError(f"peer card too long: {len(text)} characters, at most {MAX_PEER_CARD_CHARS}")
    if not text.startswith(PEER_CARD_PREFIX):
        raise CryptoError(f"not a peer card: it must start with {PEER_CARD_PREFIX!r}")
    body = text[len(PEER_CARD_PREFIX) :]
    if not _CARD_BODY.fullmatch(body) or len(body) % 4 == 1:
        raise CryptoError("peer card is damaged: invalid base64url")
    try:
        fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, RecursionError) as exc:  # binascii.Error is a ValueError
        raise CryptoError("peer card is damaged: invalid base64url or JSON") from exc
    if not isinstance(fields, dict) or set(fields) != {"id", "name", "addr", "cert"}:
        raise CryptoError('peer card must hold exactly the fields "id", "name", "addr" and "cert"')
    node_id, cert = fields["id"], fields["cert"]
    if not isinstance(node_id, str) or not isinstance(cert, str) or not cert.isascii():
        raise CryptoError('peer card fields "id" and "cert" must be ASCII strings')
    return _checked_card(NodeId(node_id), fields["name"], fields["addr"], cert.encode("ascii"))


def _checked_card(node_id: NodeId, name: object, addr: object, cert_pem: bytes) -> PeerCard:
    parsed_id = parse_node_id(node_id)
    if addr is not None and not (
        isinstance(addr, str) and 0 < len(addr) <= MAX_ADDR_CHARS and addr.isprintable() and " " not in addr
    ):
        raise CryptoError(f"peer address must be null or HOST:PORT, at most {MAX_ADDR_CHARS} characters")
    cert = _pinnable(_load_cert(cert_pem))
    if _node_id_from_der(cert.public_bytes(_DER)) != parsed_id:
        raise CryptoError("peer card node id does not match its certificate")
    return PeerCard(node_id=parsed_id, name=_check_name(name), addr=addr, cert_pem=cert.public_bytes(_PEM))


def _tls_context(
    server_side: bool, cert_path: str | Path, key_path: str | Path, trusted: list[bytes]
) -> ssl.SSLContext:
    ders = [_pinnable(_load_cert(cert)).public_bytes(_DER) for cert in trusted]
    # SSLContext(), unlike create_default_context(), loads no default CAs.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # identities are pinned certificates, not names
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    # Pinning a self-signed CA:FALSE certificate. Measured with OpenSSL 3.0.19: it is accepted as
    # its own trust anchor with or without the flags below. OpenSSL 1.1.1 (v3_purp.c) only counts a
    # certificate as self-signed when its keyUsage allows keyCertSign, which ours does not; there
    # VERIFY_X509_PARTIAL_CHAIN is what lets a certificate in the store be a trust anchor as it is.
    # VERIFY_X509_STRICT checks RFC 5280 rules, which our certificates pass (Python 3.13 sets both
    # by default). Nodes are not CAs on purpose: OpenSSL refuses any certificate *issued* by a
    # pinned key ("invalid CA certificate"), so only the pinned certificate itself verifies.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    if ders:  # with none, the store stays empty and CERT_REQUIRED refuses every peer
        context.load_verify_locations(cadata=b"".join(ders))
    try:
        context.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    except OSError as exc:  # ssl.SSLError is an OSError
        raise CryptoError(f"cannot load identity from {cert_path} and {key_path}: {exc}") from exc
    return context


def server_tls_context(
    cert_path: str | Path, key_path: str | Path, trusted_certs: Iterable[bytes]
) -> ssl.SSLContext:
    """Build the TLS context of a node's listener.

    Policy: TLS 1.3 only; a client certificate is required and verified against exactly
    ``trusted_certs`` (no default CAs; none at all refuses every client); hostnames are not
    checked; no session tickets, so every connection is verified against the peers trusted *now*.
    When the peer list changes, build a new context and swap it in from ``sni_callback``: OpenSSL
    then uses its trusted certificates but keeps the verify flags of the connection's first context,
    which are the same for every context built here.

    Args:
        cert_path: File with this node's PEM certificate. Paths, because
            :meth:`ssl.SSLContext.load_cert_chain` takes nothing else.
        key_path: File with this node's PEM PKCS#8 private key.
        trusted_certs: Certificates of the paired peers, PEM or DER, one per item; no CAs.

    Raises:
        CryptoError: If the identity files cannot be loaded or a trusted certificate is invalid.
    """
    context = _tls_context(True, cert_path, key_path, list(trusted_certs))
    context.num_tickets = 0  # no resumption: a removed peer cannot come back with an old ticket
    return context


def client_tls_context(cert_path: str | Path, key_path: str | Path, trusted_cert: bytes) -> ssl.SSLContext:
    """Build the TLS context for dialing one peer: the policy of :func:`server_tls_context`.

    Hostnames are not checked, but pass ``server_hostname=TLS_SERVER_NAME`` when connecting so that
    the listener's ``sni_callback`` sees a fixed name.

    Args:
        cert_path: File with this node's PEM certificate (``load_cert_chain`` takes only paths).
        key_path: File with this node's PEM PKCS#8 private key.
        trusted_cert: The peer's pinned certificate, PEM or DER.

    Raises:
        CryptoError: If the identity files cannot be loaded or ``trusted_cert`` is invalid.
    """
    return _tls_context(False, cert_path, key_path, [trusted_cert])


def peer_cert_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> NodeId:
    """Return the node id of the certificate the peer presented, after the handshake.

    With a context from this module, OpenSSL has verified that certificate against the pinned
    ones; the caller still checks the id against the peers it trusts *now*.

    Raises:
        CryptoError: If the handshake is not complete or the peer sent no certificate.
    """
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError as exc:  # handshake not done
        raise CryptoError("no peer certificate: TLS handshake not complete") from exc
    if not der:
        raise CryptoError("peer presented no certificate")
    return _node_id_from_der(der)
