"""Tests for ctxsync.crypto: identities, node ids, peer cards, and real mutual TLS 1.3 on loopback."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ctxsync import crypto
from ctxsync.crypto import Identity, PeerCard
from ctxsync.errors import CryptoError
from ctxsync.types import TLS_SERVER_NAME, NodeId

TIMEOUT_S = 5.0 * float(os.environ.get("CTXSYNC_TESTS_TIMEOUT_FACTOR", "1"))

# Syncthing's own test vector (lib/protocol/deviceid_test.go): its check characters come from
# Syncthing's luhn32, so parsing it checks that ours computes the same ones.
SYNCTHING_ID = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"


@pytest.fixture(scope="module")
def alice() -> Identity:
    return crypto.generate_identity("alice")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return crypto.generate_identity("bob")


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return crypto.generate_identity("mallory")


# --------------------------------------------------------------------------------------------------
# generate_identity


def test_identity_certificate_is_as_specified() -> None:
    """Makes an Ed25519 self-signed v3 certificate with the specified names, window and extensions."""
    now = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)
    identity = crypto.generate_identity("alice's laptop", now=now)
    cert = x509.load_pem_x509_certificate(identity.cert_pem)

    assert cert.version is x509.Version.v3
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert 0 < cert.serial_number < 2**159
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice's laptop"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ctxsync"
    assert cert.not_valid_before_utc == datetime(2026, 3, 3, 5, 6, 7, tzinfo=UTC)
    assert cert.not_valid_after_utc == datetime(2046, 3, 4, 5, 6, 7, tzinfo=UTC)
    cert.verify_directly_issued_by(cert)

    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.key_encipherment or usage.value.crl_sign)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert aki.key_identifier == ski.digest
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TLS_SERVER_NAME]
    assert len(ext) == 6


def test_identity_default_time_is_now() -> None:
    """Backdates notBefore by about a day from the current time when no time is given."""
    cert = x509.load_pem_x509_certificate(crypto.generate_identity("n").cert_pem)
    backdate = datetime.now(UTC) - cert.not_valid_before_utc
    assert timedelta(hours=23, minutes=59) < backdate < timedelta(days=1, minutes=1)


def test_identity_key_matches_certificate_and_node_id(alice: Identity) -> None:
    """Holds an unencrypted PKCS#8 key for the certificate and the certificate's node id."""
    assert alice.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(alice.key_pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    cert = x509.load_pem_x509_certificate(alice.cert_pem)
    assert key.public_key() == cert.public_key()
    assert alice.node_id == crypto.node_id_from_cert(alice.cert_pem)
    assert "PRIVATE" not in repr(alice) and alice.node_id in repr(alice)


def test_identities_are_unique(alice: Identity, bob: Identity) -> None:
    """Gives every new identity its own key, serial and node id."""
    assert alice.node_id != bob.node_id and alice.key_pem != bob.key_pem


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", "bell\a"])
def test_identity_rejects_bad_names(name: str) -> None:
    """Refuses an empty, over-long or unprintable name."""
    with pytest.raises(CryptoError):
        crypto.generate_identity(name)


# --------------------------------------------------------------------------------------------------
# Certificates, fingerprints and node ids


def test_cert_der_and_fingerprint(alice: Identity) -> None:
    """Converts PEM to DER and hashes the DER, whichever form it is given."""
    der = crypto.cert_der(alice.cert_pem)
    assert der == x509.load_pem_x509_certificate(alice.cert_pem).public_bytes(serialization.Encoding.DER)
    assert crypto.cert_der(der) == der
    assert len(crypto.fingerprint(alice.cert_pem)) == 32
    assert crypto.fingerprint(alice.cert_pem) == crypto.fingerprint(der)
    assert crypto.node_id_from_cert(der) == alice.node_id


@pytest.mark.parametrize(
    "garbage", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_cert_functions_reject_garbage(garbage: bytes) -> None:
    """Raises CryptoError for bytes that are not a certificate."""
    for function in (crypto.cert_der, crypto.fingerprint, crypto.node_id_from_cert):
        with pytest.raises(CryptoError):
            function(garbage)


def test_cert_functions_reject_two_certificates(alice: Identity, bob: Identity) -> None:
    """Refuses PEM holding more than one certificate."""
    with pytest.raises(CryptoError, match="one PEM certificate"):
        crypto.fingerprint(alice.cert_pem + bob.cert_pem)


def test_node_id_format(alice: Identity) -> None:
    """Prints 8 dashed groups of 7 upper-case base32 characters, the same every time."""
    node_id = crypto.node_id_from_cert(alice.cert_pem)
    assert len(node_id) == 63
    groups = node_id.split("-")
    assert len(groups) == 8 and all(len(g) == 7 for g in groups)
    assert set(node_id.replace("-", "")) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert crypto.node_id_from_cert(alice.cert_pem) == node_id
    # Without its 4 check characters (the 14th of each 14), the id is base32 of the fingerprint.
    chars = node_id.replace("-", "")
    digits = "".join(chars[i : i + 13] for i in range(0, 56, 14))
    assert base64.b32decode(digits + "====") == crypto.fingerprint(alice.cert_pem)
    assert crypto.short_id(node_id) == groups[0]


@pytest.mark.parametrize(
    "text",
    [
        SYNCTHING_ID,
        SYNCTHING_ID.lower(),
        SYNCTHING_ID.replace("-", ""),
        SYNCTHING_ID.replace("-", " "),
        " p56i-oi7mzjnu2yiqgdrey dm2m gtimgl3bxnpq6w5bm tbbz4tjxzwicq2 \n",
    ],
)
def test_parse_node_id_accepts_human_forms(text: str) -> None:
    """Accepts lower case, spaces and dashes anywhere, and returns the canonical form."""
    assert crypto.parse_node_id(text) == SYNCTHING_ID


def test_parse_node_id_round_trip(alice: Identity) -> None:
    """Parses what node_id_from_cert prints, in any case and grouping."""
    assert crypto.parse_node_id(alice.node_id) == alice.node_id
    assert crypto.parse_node_id(alice.node_id.lower().replace("-", "")) == alice.node_id


def test_parse_node_id_rejects_every_single_typo(alice: Identity) -> None:
    """Catches any one substituted character with the check characters."""
    chars = list(alice.node_id.replace("-", ""))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for index, char in enumerate(chars):
        typo = chars.copy()
        typo[index] = alphabet[(alphabet.index(char) + 1) % 32]
        with pytest.raises(CryptoError):
            crypto.parse_node_id("".join(typo))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        SYNCTHING_ID[:-1],
        SYNCTHING_ID + "A",
        SYNCTHING_ID.replace("P56", "P51"),  # 1 is not base32
        SYNCTHING_ID.replace("I", "\u0131"),  # dotless i upper-cases to I
        SYNCTHING_ID.replace("-", "_"),
        # 52 characters without check characters (Syncthing's old form) are not accepted.
        SYNCTHING_ID.replace("-", "")[:52],
    ],
)
def test_parse_node_id_rejects_garbage(text: str) -> None:
    """Raises CryptoError for anything that is not a well-formed node id."""
    with pytest.raises(CryptoError):
        crypto.parse_node_id(text)


def test_parse_node_id_rejects_non_canonical_last_digit() -> None:
    """Refuses a 52nd digit with padding bits set, so that each fingerprint has exactly one id."""
    chars = SYNCTHING_ID.replace("-", "")
    assert chars[54] == "Q"  # 13th digit of the 4th group: "Q" = 16 uses only its top bit
    prefix = chars[:54] + "R"  # "R" = 17 also sets a padding bit
    fits_check: list[str] = []
    for check in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567":
        with pytest.raises(CryptoError) as info:
            crypto.parse_node_id(prefix + check)
        if "non-canonical" in str(info.value):
            fits_check.append(check)
    assert len(fits_check) == 1  # the one check character that fits is still refused


def test_parse_node_id_names_the_problem() -> None:
    """Says which check character failed, as a hint of a typo."""
    with pytest.raises(CryptoError, match="check character"):
        crypto.parse_node_id(SYNCTHING_ID.replace("MZJNU2Y", "MZJNU3Y"))


# --------------------------------------------------------------------------------------------------
# Peer cards


def _card(identity: Identity, addr: str | None = "10.0.0.7:7780") -> PeerCard:
    return PeerCard(node_id=identity.node_id, name="alice", addr=addr, cert_pem=identity.cert_pem)


def _raw_card(fields: object) -> str:
    body = json.dumps(fields, separators=(",", ":")).encode()
    return "ctxsync1:" + base64.urlsafe_b64encode(body).decode().rstrip("=")


@pytest.mark.parametrize("addr", ["10.0.0.7:7780", "[::1]:7780", None])
def test_peer_card_round_trip(alice: Identity, addr: str | None) -> None:
    """Decodes what it encodes, as one line of URL-safe characters."""
    card = _card(alice, addr)
    text = crypto.encode_peer_card(card)
    assert text.startswith("ctxsync1:")
    assert "\n" not in text and " " not in text and "=" not in text
    assert set(text[len("ctxsync1:") :]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert crypto.decode_peer_card(text) == card
    assert crypto.decode_peer_card(f"  {text[:40]}\n{text[40:]} \n") == card  # wrapped by a mailer


def test_peer_card_body_is_compact_json(alice: Identity) -> None:
    """Carries the fields id, name, addr and cert as compact JSON."""
    body = crypto.encode_peer_card(_card(alice))[len("ctxsync1:") :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert json.loads(raw) == {
        "id": alice.node_id,
        "name": "alice",
        "addr": "10.0.0.7:7780",
        "cert": alice.cert_pem.decode(),
    }
    assert b": " not in raw and b", " not in raw


def test_peer_card_rejects_mismatched_id(alice: Identity, bob: Identity) -> None:
    """Refuses a card whose node id is not its certificate's, when encoding and decoding."""
    forged = PeerCard(node_id=bob.node_id, name="bob", addr=None, cert_pem=alice.cert_pem)
    with pytest.raises(CryptoError, match="does not match"):
        crypto.encode_peer_card(forged)
    fields = {"id": bob.node_id, "name": "bob", "addr": None, "cert": alice.cert_pem.decode()}
    with pytest.raises(CryptoError, match="does not match"):
        crypto.decode_peer_card(_raw_card(fields))


def test_peer_card_rejects_tampered_certificate(alice: Identity) -> None:
    """Refuses a card whose certificate was altered, even where it still parses."""
    der = bytearray(crypto.cert_der(alice.cert_pem))
    der[-10] ^= 0x01  # inside the signature: still a well-formed certificate
    pem = x509.load_der_x509_certificate(bytes(der)).public_bytes(serialization.Encoding.PEM)
    fields = {"id": alice.node_id, "name": "alice", "addr": None, "cert": pem.decode()}
    with pytest.raises(CryptoError, match="does not match"):
        crypto.decode_peer_card(_raw_card(fields))
    text = crypto.encode_peer_card(_card(alice))
    middle = len(text) // 2
    flipped = text[:middle] + ("A" if text[middle] != "A" else "B") + text[middle + 1 :]
    with pytest.raises(CryptoError):
        crypto.decode_peer_card(flipped)


def test_peer_card_rejects_extra_certificate(alice: Identity, bob: Identity) -> None:
    """Refuses a card smuggling a second certificate, which would otherwise be trusted too."""
    fields = {
        "id": alice.node_id,
        "name": "a",
        "addr": None,
        "cert": (alice.cert_pem + bob.cert_pem).decode(),
    }
    with pytest.raises(CryptoError, match="one PEM certificate"):
        crypto.decode_peer_card(_raw_card(fields))


def test_peer_card_rejects_ca_certificate() -> None:
    """Refuses a CA certificate, which would vouch for any certificate it signs."""
    ca_pem, _ = _make_cert(ca=True)
    fields = {"id": crypto.node_id_from_cert(ca_pem), "name": "ca", "addr": None, "cert": ca_pem.decode()}
    with pytest.raises(CryptoError, match="CA"):
        crypto.decode_peer_card(_raw_card(fields))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ctxsync1:",
        "hello",
        "ctxsync2:e30",
        "ctxsync1:!!!!",
        "ctxsync1:A",
        "ctxsync1:" + base64.urlsafe_b64encode(b"not json").decode(),
        "ctxsync1:" + base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "ctxsync1:" + base64.urlsafe_b64encode(b"[" * 3000).decode(),
        _raw_card([]),
        _raw_card({}),
        _raw_card({"id": "x", "name": "n", "addr": None}),
        "ctxsync1:" + "A" * 10_000,
    ],
)
def test_peer_card_rejects_garbage(text: str) -> None:
    """Raises CryptoError for a bad prefix, base64url, JSON or field set."""
    with pytest.raises(CryptoError):
        crypto.decode_peer_card(text)


@pytest.mark.parametrize(
    "change",
    [
        {"name": ""},
        {"name": 7},
        {"name": "evil\x1b[2J"},
        {"addr": 7780},
        {"addr": ""},
        {"addr": "a b:1"},
        {"id": None},
        {"id": "P56IOI7-MZJNU2Y"},
        {"cert": "not a certificate"},
        {"cert": "caf\u00e9"},
        {"cert": None},
        {"extra": 1},
    ],
)
def test_peer_card_rejects_bad_fields(alice: Identity, change: dict[str, object]) -> None:
    """Raises CryptoError for a field of the wrong type or value, or an unknown field."""
    fields: dict[str, object] = {
        "id": alice.node_id,
        "name": "alice",
        "addr": None,
        "cert": alice.cert_pem.decode(),
    }
    fields.update(change)
    with pytest.raises(CryptoError):
        crypto.decode_peer_card(_raw_card(fields))


# --------------------------------------------------------------------------------------------------
# Real mutual TLS 1.3 on loopback


@dataclass(frozen=True, slots=True)
class Paths:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Side:
    """What one end of a handshake saw: the TLS version and peer's node id, or the error."""

    version: str | None = None
    peer_id: NodeId | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _write(tmp_path: Path, identity: Identity) -> Paths:
    home = tmp_path / identity.node_id[:7]
    home.mkdir(exist_ok=True)
    paths = Paths(home / "cert.pem", home / "key.pem")
    paths.cert.write_bytes(identity.cert_pem)
    paths.key.write_bytes(identity.key_pem)
    paths.key.chmod(0o600)
    return paths


def _connect(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> tuple[Side, Side]:
    """Run one TLS handshake and a ping/pong over 127.0.0.1; return what (server, client) saw."""
    results: dict[str, Side] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                raw, _ = listener.accept()
                raw.settimeout(TIMEOUT_S)
                with server_context.wrap_socket(raw, server_side=True) as tls:
                    if tls.recv(4) != b"ping":
                        raise ConnectionError("no ping")
                    tls.sendall(b"pong")
                    results["server"] = Side(tls.version(), crypto.peer_cert_node_id(tls))
            except Exception as exc:  # reported to the test, not lost in the thread
                results["server"] = Side(error=exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
                client_context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME) as tls,
            ):
                # In TLS 1.3 the client finishes its handshake before the server has checked the
                # client's certificate: a refusal shows on the first read.
                tls.sendall(b"ping")
                if tls.recv(4) != b"pong":
                    raise ConnectionError("no pong")
                results["client"] = Side(tls.version(), crypto.peer_cert_node_id(tls))
        except Exception as exc:
            results["client"] = Side(error=exc)
        thread.join(TIMEOUT_S * 2)
        assert not thread.is_alive()
    return results["server"], results["client"]


def test_tls_paired_handshake(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Connects two paired nodes over TLS 1.3, each seeing the other's node id."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    server, client = _connect(
        crypto.server_tls_context(a.cert, a.key, [bob.cert_pem]),
        crypto.client_tls_context(b.cert, b.key, alice.cert_pem),
    )
    assert server == Side("TLSv1.3", bob.node_id)
    assert client == Side("TLSv1.3", alice.node_id)


def test_tls_server_trusts_several_peers(
    tmp_path: Path, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    """Accepts any of several trusted peers, given as PEM or DER."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    trusted = [crypto.cert_der(mallory.cert_pem), crypto.cert_der(bob.cert_pem)]
    server, client = _connect(
        crypto.server_tls_context(str(a.cert), str(a.key), iter(trusted)),
        crypto.client_tls_context(str(b.cert), str(b.key), crypto.cert_der(alice.cert_pem)),
    )
    assert server.peer_id == bob.node_id and client.peer_id == alice.node_id


def test_tls_refuses_client_the_server_does_not_trust(
    tmp_path: Path, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    """Fails on both sides when the server does not trust the client's certificate."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    server, client = _connect(
        crypto.server_tls_context(a.cert, a.key, [mallory.cert_pem]),
        crypto.client_tls_context(b.cert, b.key, alice.cert_pem),
    )
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert not client.ok


def test_tls_refuses_server_other_than_pinned(
    tmp_path: Path, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    """Fails on both sides when the client pins a different certificate than the server's."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    server, client = _connect(
        crypto.server_tls_context(a.cert, a.key, [bob.cert_pem]),
        crypto.client_tls_context(b.cert, b.key, mallory.cert_pem),
    )
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert not server.ok


def test_tls_server_with_no_peers_refuses_everyone(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Refuses every client when the server trusts no certificate at all."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    server, client = _connect(
        crypto.server_tls_context(a.cert, a.key, []),
        crypto.client_tls_context(b.cert, b.key, alice.cert_pem),
    )
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert not client.ok


def test_tls_refuses_certificate_issued_by_pinned_key(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Refuses a certificate signed by a pinned peer's key: only the pinned certificate itself verifies."""
    alice_cert = x509.load_pem_x509_certificate(alice.cert_pem)
    alice_key = serialization.load_pem_private_key(alice.key_pem, password=None)
    assert isinstance(alice_key, ed25519.Ed25519PrivateKey)
    child_pem, child_key_pem = _make_cert(issuer=alice_cert, issuer_key=alice_key)
    child = _write(tmp_path, Identity(crypto.node_id_from_cert(child_pem), child_pem, child_key_pem))
    b = _write(tmp_path, bob)
    server, client = _connect(
        crypto.server_tls_context(b.cert, b.key, [alice.cert_pem]),
        crypto.client_tls_context(child.cert, child.key, bob.cert_pem),
    )
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert not client.ok


def test_tls_refuses_tls_1_2(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Refuses a peer that offers at most TLS 1.2, even with a trusted certificate."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    old = crypto.client_tls_context(b.cert, b.key, alice.cert_pem)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = _connect(crypto.server_tls_context(a.cert, a.key, [bob.cert_pem]), old)
    assert not server.ok and not client.ok


def test_tls_sni_callback_can_swap_in_a_new_context(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Lets a listener swap in a freshly built context from sni_callback, for a changed peer list."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    fresh = crypto.server_tls_context(a.cert, a.key, [bob.cert_pem])
    stale = crypto.server_tls_context(a.cert, a.key, [])
    seen: list[str | None] = []

    def swap(ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        seen.append(server_name)
        ssl_object.context = fresh

    stale.sni_callback = swap
    server, client = _connect(stale, crypto.client_tls_context(b.cert, b.key, alice.cert_pem))
    assert seen == [TLS_SERVER_NAME]
    assert server == Side("TLSv1.3", bob.node_id)
    assert client == Side("TLSv1.3", alice.node_id)


def test_tls_context_policy(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Builds TLS 1.3-only contexts that require and pin certificates and skip hostnames."""
    a = _write(tmp_path, alice)
    server = crypto.server_tls_context(a.cert, a.key, [bob.cert_pem])
    client = crypto.client_tls_context(a.cert, a.key, bob.cert_pem)
    for context in (server, client):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.maximum_version is ssl.TLSVersion.TLSv1_3
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname is False
        assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
        assert context.cert_store_stats()["x509"] == 1  # exactly the pinned certificate, no default CAs
    assert server.num_tickets == 0
    assert crypto.server_tls_context(a.cert, a.key, []).cert_store_stats()["x509"] == 0


def test_tls_context_errors(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """Raises CryptoError for missing or mismatched identity files and bad trusted certificates."""
    a, b = _write(tmp_path, alice), _write(tmp_path, bob)
    with pytest.raises(CryptoError, match="cannot load identity"):
        crypto.server_tls_context(tmp_path / "missing.pem", a.key, [])
    with pytest.raises(CryptoError, match="cannot load identity"):
        crypto.client_tls_context(a.cert, b.key, bob.cert_pem)  # key is not the certificate's
    with pytest.raises(CryptoError):
        crypto.server_tls_context(a.cert, a.key, [bob.cert_pem, b"garbage"])
    with pytest.raises(CryptoError):
        crypto.client_tls_context(a.cert, a.key, alice.cert_pem + bob.cert_pem)
    ca_pem, _ = _make_cert(ca=True)
    with pytest.raises(CryptoError, match="CA"):
        crypto.server_tls_context(a.cert, a.key, [ca_pem])


def test_peer_cert_node_id_before_handshake(alice: Identity) -> None:
    """Raises CryptoError when there is no verified peer certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=TLS_SERVER_NAME)
    with pytest.raises(CryptoError):
        crypto.peer_cert_node_id(tls)


# --------------------------------------------------------------------------------------------------
# Helpers


def _make_cert(
    *,
    ca: bool = False,
    issuer: x509.Certificate | None = None,
    issuer_key: ed25519.Ed25519PrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """Make a certificate ctxsync would not: a CA, or one issued by another key. Returns (cert, key) PEM."""
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer_key or key).public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    cert = builder.sign(issuer_key or key, None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
