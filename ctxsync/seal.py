"""
Encryption at rest: the ciphers that seal every blob the store writes, and the store key.

A *cipher* turns one blob (a Yjs v1 update, a checkpoint, a state vector) into what reaches
the disk and back, bound to associated data (the context's doc id), so a blob moved to
another context or altered by one bit is refused instead of loaded:

- :class:`ChecksumCipher` (``"crc32"``): ``crc32(aad + blob)`` (4 bytes, big endian) + blob.
  Integrity against damage only, no secrecy. What stores written before encryption at rest
  hold; a store is moved off it (re-sealed) the first time it is opened with a key.
- :class:`AeadCipher` (``"aes-256-gcm-siv"``): ``0x01 + nonce (12 random bytes) + AES-256-GCM-SIV
  ciphertext with its 16-byte tag`` (RFC 8452, from ``cryptography``). GCM-SIV is
  nonce-misuse resistant: a repeated random nonce (a birthday event after billions of
  blobs under one key) reveals only that two sealed blobs were equal, where plain GCM or
  ChaCha20-Poly1305 would leak the key stream. 29 bytes of overhead per blob; ~3.3 µs per
  120-byte blob on this machine.

The store key is 32 random bytes, written as URL-safe base64 text (44 characters) in a file
of mode 0600 (``store.key`` in the home by default), or given in an environment variable.
It lives outside the database: a copied ``store.db`` without it reveals no values.

Pure: no asyncio, no sqlite; :func:`load_key` and :func:`create_key_file` touch one file.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import zlib
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from ctxsync.errors import ConfigError

__all__ = [
    "KEY_BYTES",
    "AeadCipher",
    "ChecksumCipher",
    "Cipher",
    "create_key_file",
    "decode_key",
    "encode_key",
    "load_key",
]

KEY_BYTES: Final = 32
"""Length of a store key in bytes (AES-256)."""

_NONCE_BYTES: Final = 12
_AEAD_FORMAT: Final = b"\x01"


class Cipher(Protocol):
    """Seals and unseals the store's blobs. Called on the store's worker thread only."""

    name: str
    """Stable name recorded in the store (``meta.cipher``), e.g. ``"aes-256-gcm-siv"``."""

    def seal(self, blob: bytes, aad: bytes) -> bytes:
        """Return the sealed form of ``blob``, bound to ``aad``."""
        ...

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Return the blob sealed with the same ``aad``. Raises ValueError if it does not open."""
        ...


class ChecksumCipher:
    """CRC-32 framing: integrity against damage, no secrecy (stores without a key)."""

    name = "crc32"

    def seal(self, blob: bytes, aad: bytes) -> bytes:
        """``crc32(aad + blob)`` as 4 bytes big endian, then ``blob``."""
        return zlib.crc32(blob, zlib.crc32(aad)).to_bytes(4, "big") + blob

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`seal`. Raises ValueError if the checksum does not match."""
        if len(blob) < 4:
            raise ValueError("blob shorter than its checksum")
        data = blob[4:]
        if zlib.crc32(data, zlib.crc32(aad)).to_bytes(4, "big") != blob[:4]:
            raise ValueError("checksum mismatch: the stored bytes are damaged")
        return data


class AeadCipher:
    """
    AES-256-GCM-SIV with a random 96-bit nonce per blob (RFC 8452).

    Args:
        key: The 32-byte store key.

    Raises:
        ValueError: If ``key`` is not 32 bytes.
    """

    name = "aes-256-gcm-siv"

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a store key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCMSIV(key)

    def seal(self, blob: bytes, aad: bytes) -> bytes:
        """``0x01 + nonce (12 bytes) + ciphertext + tag (16 bytes)``."""
        nonce = os.urandom(_NONCE_BYTES)
        return _AEAD_FORMAT + nonce + self._aead.encrypt(nonce, blob, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """
        Inverse of :meth:`seal`.

        Raises:
            ValueError: If the blob is not in this format, was sealed with another key or
                associated data, or was altered.
        """
        if len(blob) < 1 + _NONCE_BYTES + 16 or blob[:1] != _AEAD_FORMAT:
            raise ValueError("not an AES-256-GCM-SIV sealed blob")
        try:
            return self._aead.decrypt(blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :], aad)
        except InvalidTag:
            raise ValueError("authentication failed: wrong key, or the stored bytes were altered") from None

    def __repr__(self) -> str:
        return "AeadCipher(key=<hidden>)"


def encode_key(key: bytes) -> str:
    """The text form of a store key: URL-safe base64 of its 32 bytes (44 characters)."""
    return base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, *, source: str) -> bytes:
    """
    Parse a store key's text form.

    Args:
        text: URL-safe base64 of 32 bytes; surrounding whitespace is ignored.
        source: Where it came from (a path or ``$VARIABLE``), for the error message.

    Raises:
        ConfigError: If it is not base64 of exactly 32 bytes. The message never holds the key.
    """
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ConfigError(f"{source}: not a store key (expected {KEY_BYTES} bytes in URL-safe base64)") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source}: a store key is {KEY_BYTES} bytes, this one has {len(key)}")
    return key


def create_key_file(path: Path) -> bytes:
    """
    Make a new random store key and write it to ``path`` with mode 0600.

    Returns:
        The 32-byte key.

    Raises:
        FileExistsError: If ``path`` exists: a key is never replaced (it would lose the store).
        OSError: If the file cannot be written.
    """
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (encode_key(key) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_key(path: Path) -> bytes:
    """
    Read a store key file.

    Raises:
        FileNotFoundError: If there is no such file.
        ConfigError: If it cannot be read or holds no valid key.
    """
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the store key {path}: {exc}") from None
    return decode_key(text, source=str(path))
