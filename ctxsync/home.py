"""
A node's home directory: the names of its files, who may read them, and its store key.

::

    HOME/               0700
      config.toml       0600   node settings (config.py)
      peers.toml        0600   paired peers (config.py)
      node.key          0600   Ed25519 private key (crypto.py)
      node.crt          0644   self-signed certificate; its SHA-256 is the node id
      api.token         0600   bearer token of the local API
      store.key         0600   the store's AEAD key (seal.py), unless [store] key_file / key_env
      store.db          0600   SQLite store (store.py), with store.db-wal and store.db-shm

The daemon refuses to start while the home, or a file that holds a secret or the store, can
be read or written by other users (:func:`check_permissions`): ssh does the same with keys.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ctxsync.config import PEERS_FILE, NodeConfig, PeerConfig, dump_peers, load, parse_hostport, write_atomic
from ctxsync.crypto import PeerCard
from ctxsync.errors import ConfigError
from ctxsync.seal import AeadCipher, create_key_file, decode_key, load_key

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "STORE_FILE",
    "STORE_KEY_FILE",
    "TRACEBACK_FILE",
    "TOKEN_FILE",
    "advertised_host",
    "check_permissions",
    "open_store_key",
    "pair_card",
    "store_key_path",
]

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
TOKEN_FILE = "api.token"
STORE_FILE = "store.db"
STORE_KEY_FILE = "store.key"
TRACEBACK_FILE = "stall-tracebacks.txt"
"""Where the event loop watchdog appends every thread's traceback after a long stall (a hang)."""

_PRIVATE_FILES = (KEY_FILE, TOKEN_FILE, STORE_KEY_FILE, "config.toml", "peers.toml")
_STORE_FILES = (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", STORE_FILE + "-journal")


def store_key_path(home: Path, cfg: NodeConfig) -> Path | None:
    """The store key file ``cfg`` names (``store.key`` in the home by default); ``None`` if it names an env variable."""
    if cfg.store.key_env:
        return None
    if not cfg.store.key_file:
        return home / STORE_KEY_FILE
    path = Path(cfg.store.key_file).expanduser()
    return path if path.is_absolute() else home / path


def _loose(path: Path, allowed: int) -> str | None:
    """Describe why ``path`` is too open (mode bits beyond ``allowed`` for group/other), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    extra = mode & 0o077 & ~allowed
    if not extra:
        return None
    return f"{path} has mode {mode:04o}"


def check_permissions(home: Path, cfg: NodeConfig) -> None:
    """
    Refuse a home that other local users can read into.

    The home must be 0700 (no group/other bits); the node key, API token, store key,
    configuration, peer list and store files 0600. The certificate may be world-readable.

    Raises:
        ConfigError: Naming every offending path and the ``chmod`` that fixes it.
    """
    problems = []
    if (p := _loose(home, 0)) is not None:
        problems.append((p, f"chmod 700 {home}"))
    key_path = store_key_path(home, cfg)
    files = [home / name for name in (*_PRIVATE_FILES, *_STORE_FILES)]
    if key_path is not None and key_path not in files:
        files.append(key_path)
    for path in files:
        if (p := _loose(path, 0)) is not None:
            problems.append((p, f"chmod 600 {path}"))
    if problems:
        found = "; ".join(p for p, _ in problems)
        fix = " && ".join(f for _, f in problems)
        raise ConfigError(f"other users can read this node's secrets ({found}); refusing to start. Fix: {fix}")


def open_store_key(home: Path, cfg: NodeConfig, env: Mapping[str, str], *, store_cipher: str | None) -> tuple[AeadCipher, bool]:
    """
    Load the store key that ``cfg`` names, making one if it is the default file and missing.

    Args:
        home: The node's home.
        cfg: Its configuration (``[store] key_file`` / ``key_env``).
        env: Environment, for ``key_env``.
        store_cipher: What the existing store is sealed with (:meth:`Store.sealed_with`):
            ``None`` if there is no store yet, ``"crc32"`` for a store written before
            encryption at rest. A new key is made only for these two, never for a store
            that is already encrypted (its key would be lost for good).

    Returns:
        ``(cipher, created)``: the cipher, and whether a new key file was written.

    Raises:
        ConfigError: If the variable is unset, the file is missing where a key cannot be
            made, or the key is malformed. Messages never contain the key.
    """
    if cfg.store.key_env:
        text = env.get(cfg.store.key_env, "")
        if not text:
            raise ConfigError(
                f"[store] key_env names ${cfg.store.key_env}, which is not set: export the store key in it", key="store.key_env"
            )
        return AeadCipher(decode_key(text, source=f"${cfg.store.key_env}")), False
    path = store_key_path(home, cfg)
    assert path is not None
    try:
        return AeadCipher(load_key(path)), False
    except FileNotFoundError:
        pass
    if cfg.store.key_file:
        raise ConfigError(f"the store key file {path} ([store] key_file) does not exist", key="store.key_file")
    if store_cipher not in (None, "crc32"):
        raise ConfigError(
            f"{home / STORE_FILE} is encrypted ({store_cipher}) but its key {path} is missing:"
            " restore the key file from your backup (a new key cannot open it)"
        )
    try:
        return AeadCipher(create_key_file(path)), True
    except OSError as exc:
        raise ConfigError(f"cannot create the store key {path}: {exc.strerror}") from None


def advertised_host(listen_host: str) -> str | None:
    """
    The host other machines should dial to reach a listener bound to ``listen_host``.

    A specific address is itself; a wildcard (``0.0.0.0``, ``::``, empty) becomes this
    machine's address for its host name (``None`` if that cannot be resolved).
    """
    import socket

    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def pair_card(home: Path, env: Mapping[str, str], card: PeerCard, *, contexts: tuple[str, ...], read_only: bool) -> PeerConfig:
    """
    Pair the node of a peer card: add it to ``peers.toml`` (replacing an entry of the same
    node id), atomically. The running daemon still has to be told (reload).

    Args:
        home: This node's home.
        env: Environment, for loading the configuration.
        card: The peer's card: node id, name, dial address, certificate.
        contexts: Contexts shared with the peer (``("*",)`` for all).
        read_only: Refuse the peer's updates.

    Returns:
        The peer as written.

    Raises:
        ConfigError: If the configuration or the card's address is invalid.
        OSError: If peers.toml cannot be written.
    """
    peers = load(home, env).peers
    peer = PeerConfig(
        node_id=card.node_id,
        name=card.name,
        cert_pem=card.cert_pem.decode("ascii"),
        addr=parse_hostport(card.addr, key="card.addr") if card.addr else None,
        contexts=contexts,
        read_only=read_only,
    )
    kept = [p for p in peers if p.node_id != card.node_id]
    write_atomic(home / PEERS_FILE, dump_peers([*kept, peer]), mode=0o600)
    return peer


def secure_file(path: Path) -> None:
    """Make ``path`` 0600 if it exists (files SQLite or older versions created with the umask)."""
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass
