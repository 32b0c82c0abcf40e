"""
Node configuration: ``config.toml`` and ``peers.toml`` as frozen dataclasses.

A node's home holds two TOML files:

* ``config.toml`` (:data:`CONFIG_FILE`): the node's settings, edited by people and created by
  ``ctxsync init``. Read with :func:`parse`, written with :func:`dump_node`.
* ``peers.toml`` (:data:`PEERS_FILE`): the paired peers, written by ``ctxsync peer add/remove``.
  May be absent (no peers). Read with :func:`parse_peers`, written with :func:`dump_peers`.

Every value is validated once, here: an unknown section or key, a wrong type or a value out of
range raises :class:`~ctxsync.errors.ConfigError` naming the file and the dotted key, so typos
are caught at startup instead of being ignored. The dataclasses check their values on
construction too, so a :class:`NodeConfig` that exists is valid and :func:`dump_node` always
writes a file :func:`parse` accepts.

Rules:

1. :func:`parse`, :func:`parse_peers`, :func:`dump_node`, :func:`dump_peers` and
   :func:`parse_hostport` are pure: no files, no ``os.environ``. The caller passes the
   environment to :func:`parse` (only ``cli`` and ``daemon`` read it).
2. :func:`load` and :func:`write_atomic` are the only functions that touch the file system.
3. This module imports no ``asyncio``, ``websockets``, ``sqlite3``, ``psutil`` or ``structlog``;
   it returns values and raises errors, the caller logs. Certificates and node ids are checked
   only for shape here; :mod:`ctxsync.crypto` verifies them.

Every key and environment variable is listed in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tempfile
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias, cast, get_args

import tomli_w

from .alerts import DEFAULT_RULES, AlertRule, parse_rules
from .errors import ConfigError
from .types import NodeId

__all__ = [
    "CONFIG_FILE",
    "ENV_API",
    "ENV_LISTEN",
    "ENV_LOG_LEVEL",
    "ENV_STATS_INTERVAL_S",
    "ENV_DISCOVERY",
    "LOG_LEVELS",
    "LogConfig",
    "LogLevel",
    "ApiConfig",
    "DiscoveryConfig",
    "PairingConfig",
    "NodeConfig",
    "PEERS_FILE",
    "PeerConfig",
    "StoreConfig",
    "SyncConfig",
    "dump_node",
    "dump_peers",
    "format_hostport",
    "is_loopback",
    "load",
    "parse",
    "parse_hostport",
    "parse_peers",
    "write_atomic",
]

CONFIG_FILE = "config.toml"
"""Name of the node settings file in a node's home."""

PEERS_FILE = "peers.toml"
"""Name of the paired-peers file in a node's home. Absent means no peers."""

ENV_LISTEN = "CTXSYNC_LISTEN"
"""Environment variable overriding ``node.listen`` (``HOST:PORT``)."""

ENV_API = "CTXSYNC_API"
"""Environment variable overriding ``node.api`` (``HOST:PORT``)."""

ENV_LOG_LEVEL = "CTXSYNC_LOG_LEVEL"
"""Environment variable overriding ``log.level``."""

ENV_STATS_INTERVAL_S = "CTXSYNC_STATS_INTERVAL_S"
"""Environment variable overriding ``log.stats_interval_s`` (seconds)."""

ENV_DISCOVERY = "CTXSYNC_DISCOVERY"
"""Environment variable overriding ``discovery.enabled``: ``on``/``off`` (or ``1``/``0``, ``true``/``false``)."""

LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
"""A log level name, lower case."""

LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
"""Accepted log levels, most verbose first."""

NAME_MAX_CHARS = 64
"""Longest node or peer name, in characters."""

MIN_FRAME_BYTES = 65536
"""Smallest accepted ``sync.max_frame_bytes``, in bytes."""

MIN_COMPACT_THRESHOLD = 10
"""Smallest accepted ``store.compact_threshold``, in log rows."""


class _FieldError(ConfigError):
    """A dataclass rejected a value; :func:`parse` re-raises it with the file's path."""

    def __init__(self, reason: str, *, key: str) -> None:
        super().__init__(reason, key=key)
        self.reason = reason


def _invalid(key: str, reason: str) -> NoReturn:
    raise _FieldError(reason, key=key)


# --------------------------------------------------------------------------------------------
# HOST:PORT


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?")
_DOTTED_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_hostport(text: str, *, key: str = "", path: str | None = None) -> tuple[str, int]:
    """
    Parse a ``HOST:PORT`` address.

    ``HOST`` is a host name, an IPv4 address or an IPv6 address in brackets
    (``[::1]:47101``, ``[fe80::1%eth0]:47101``). ``PORT`` is a decimal number in 0..65535; 0 asks
    the OS for a free port when listening.

    Args:
        text: The address, e.g. ``"127.0.0.1:47101"``.
        key: Dotted key or environment variable the text came from, for the error message.
        path: File the text came from, for the error message.

    Returns:
        ``(host, port)``, with the brackets of an IPv6 address removed.

    Raises:
        ConfigError: If the text is not a valid ``HOST:PORT``.

    """

    def fail(reason: str) -> NoReturn:
        raise ConfigError(f"{reason} (got {text!r}, expected HOST:PORT)", path=path, key=key or None)

    if not isinstance(text, str):
        fail("an address must be a string")
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            fail("missing ']' after the IPv6 address")
        host, port_text = text[1:end], text[end + 1 :]
        if not port_text.startswith(":"):
            fail("missing ':PORT' after ']'")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            fail(f"{host!r} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            fail("missing ':PORT'")
        if not host:
            fail("missing host")
        if ":" in host:
            fail("an IPv6 address needs brackets, as in [::1]:47101")
        if not _HOSTNAME_RE.fullmatch(host):
            fail(f"{host!r} is not a host name or IP address")
        if _DOTTED_RE.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                fail(f"{host!r} is not an IPv4 address")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        fail(f"port {port_text!r} is not a number in 0..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """
    Tell whether a listen host is on loopback only.

    Args:
        host: An IP address or host name, without brackets or port.

    Returns:
        ``True`` for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``; ``False`` for
        everything else, wildcard addresses (``0.0.0.0``, ``::``) and other names included.
    """
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_hostport(host: str, port: int) -> str:
    """
    Format an address as ``HOST:PORT``, the inverse of :func:`parse_hostport`.

    Args:
        host: Host name or IP address; an IPv6 address (any host containing ``:``) is bracketed.
        port: Port number, 0..65535.

    Returns:
        ``"host:port"`` or ``"[v6]:port"``.

    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_addr(key: str, addr: object) -> None:
    """Check that ``addr`` is a ``(host, port)`` tuple that survives a text round trip."""
    if (
        not isinstance(addr, tuple)
        or len(addr) != 2
        or not isinstance(addr[0], str)
        or not isinstance(addr[1], int)
        or isinstance(addr[1], bool)
    ):
        _invalid(key, f"expected a (host, port) tuple, got {addr!r}")
    try:
        parsed = parse_hostport(format_hostport(addr[0], addr[1]))
    except ConfigError as exc:
        _invalid(key, str(exc))
    if parsed != addr:
        _invalid(key, f"{addr!r} is not a valid (host, port)")


def _check_name(key: str, name: object) -> None:
    if not isinstance(name, str):
        _invalid(key, f"expected a string, got {name!r}")
    if not 1 <= len(name) <= NAME_MAX_CHARS:
        _invalid(key, f"must be 1..{NAME_MAX_CHARS} characters long, got {len(name)}")
    if name != name.strip():
        _invalid(key, f"must not start or end with white space, got {name!r}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        _invalid(key, f"must not contain control characters, got {name!r}")


def _check_number(
    key: str, value: float, *, minimum: float, exclusive: bool = False, bound: str = ""
) -> None:
    """Check that a number is finite and >= (or >, if ``exclusive``) ``minimum``, named ``bound``."""
    if not math.isfinite(value):
        _invalid(key, f"must be a finite number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        limit = f"{bound} ({minimum!r})" if bound else repr(minimum)
        _invalid(key, f"must be {'>' if exclusive else '>='} {limit}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """
    One paired peer, as stored in ``peers.toml``.

    Raises:
        ConfigError: On construction, if a field is invalid.

    """

    node_id: NodeId
    """The peer's node id. Checked here only as a non-empty string; crypto verifies it."""
    name: str
    """The peer's name, for people: 1..64 characters."""
    cert_pem: str
    """The peer's pinned certificate, PEM text. Checked here only as non-empty; crypto parses it."""
    addr: tuple[str, int] | None = None
    """Where to dial the peer, ``(host, port)``; ``None`` if it only dials us."""
    contexts: tuple[str, ...] = ("*",)
    """Names of the contexts shared with this peer; ``"*"`` shares all of them."""
    read_only: bool = False
    """If true, the peer may read the shared contexts but its updates are not applied here."""
    read_only_contexts: tuple[str, ...] = ()
    """Shared contexts the peer may read but not write (its updates to them are refused)."""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id.strip():
            _invalid("node_id", f"expected a non-empty string, got {self.node_id!r}")
        _check_name("name", self.name)
        if not isinstance(self.cert_pem, str) or not self.cert_pem.strip():
            _invalid("cert", "expected the peer's certificate as non-empty PEM text")
        if self.addr is not None:
            _check_addr("addr", self.addr)
        if not isinstance(self.contexts, tuple):
            _invalid("contexts", f"expected a tuple of context names, got {self.contexts!r}")
        for doc_id in self.contexts:
            if not isinstance(doc_id, str) or not doc_id:
                _invalid("contexts", f"expected non-empty context names, got {doc_id!r}")
        if not isinstance(self.read_only, bool):
            _invalid("read_only", f"expected a boolean, got {self.read_only!r}")
        if not isinstance(self.read_only_contexts, tuple):
            _invalid("read_only_contexts", f"expected a tuple of context names, got {self.read_only_contexts!r}")
        for doc_id in self.read_only_contexts:
            if not isinstance(doc_id, str) or not doc_id or doc_id == "*":
                _invalid("read_only_contexts", f"expected context names, got {doc_id!r}")

    def shares(self, doc_id: str) -> bool:
        """
        Tell whether a context is shared with this peer.

        Args:
            doc_id: The context's name.

        Returns:
            ``True`` if :attr:`contexts` holds ``"*"`` or ``doc_id``.

        """
        return "*" in self.contexts or doc_id in self.contexts

    def accepts_writes(self, doc_id: str) -> bool:
        """
        Tell whether this peer's updates to a shared context are applied here.

        Returns:
            ``False`` for a read-only peer, or a context in :attr:`read_only_contexts`.
        """
        return not self.read_only and doc_id not in self.read_only_contexts


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """
    The ``[sync]`` section: peer connections, frames and batching.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    ping_interval_s: float = 5.0
    """Websocket keepalive ping interval, in seconds (> 0)."""
    ping_timeout_s: float = 10.0
    """Close the connection if no pong arrives within this, in seconds (> 0)."""
    max_frame_bytes: int = 1_048_576
    """Hard cap of one websocket message, in bytes (>= 65536)."""
    max_value_bytes: int = 262_144
    """Cap of one entry value's JSON text, in bytes (>= 1 and < ``max_frame_bytes / 2``)."""
    max_message_bytes: int = 268_435_456
    """Cap of one message reassembled from several frames (catch-up), in bytes (>= ``max_frame_bytes``)."""
    send_queue_bytes: int = 16_777_216
    """Bound of each peer's queue of unsent updates, in bytes (>= 65536). On overflow the peer is resynced."""
    reconnect_min_s: float = 0.5
    """First delay before redialing a lost peer, in seconds (> 0)."""
    reconnect_max_s: float = 30.0
    """Longest delay between dials, in seconds (>= ``reconnect_min_s``)."""

    def __post_init__(self) -> None:
        _check_number("sync.ping_interval_s", self.ping_interval_s, minimum=0, exclusive=True)
        _check_number("sync.ping_timeout_s", self.ping_timeout_s, minimum=0, exclusive=True)
        _check_number("sync.max_frame_bytes", self.max_frame_bytes, minimum=MIN_FRAME_BYTES)
        _check_number("sync.max_value_bytes", self.max_value_bytes, minimum=1)
        if 2 * self.max_value_bytes >= self.max_frame_bytes:
            _invalid(
                "sync.max_value_bytes",
                f"must be < max_frame_bytes / 2 = {self.max_frame_bytes / 2:g}, got {self.max_value_bytes}",
            )
        _check_number(
            "sync.max_message_bytes",
            self.max_message_bytes,
            minimum=self.max_frame_bytes,
            bound="sync.max_frame_bytes",
        )
        _check_number("sync.send_queue_bytes", self.send_queue_bytes, minimum=65_536)
        _check_number("sync.reconnect_min_s", self.reconnect_min_s, minimum=0, exclusive=True)
        _check_number(
            "sync.reconnect_max_s",
            self.reconnect_max_s,
            minimum=self.reconnect_min_s,
            bound="sync.reconnect_min_s",
        )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """
    The ``[store]`` section: the SQLite store.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    compact_threshold: int = 2000
    """Update log rows per context that trigger a compaction into a checkpoint (>= 10)."""
    idle_compact_s: float = 60.0
    """Seconds a context must go unchanged before its log (from 64 rows) is compacted anyway,
    so that a restart does not replay it row by row: 0 (off) or >= 1."""
    unload_idle_s: float = 600.0
    """Seconds a context must go unread, unwritten and unsynced before its document is unloaded
    from memory (loaded back from the store when next needed): 0 (off) or >= 1."""
    key_file: str = ""
    """File holding the store key (URL-safe base64 of 32 bytes, mode 0600); empty means
    ``store.key`` in the home. A relative path is relative to the home."""
    key_env: str = ""
    """Name of an environment variable holding the store key instead of a file; empty means none.
    When set, the variable must be set and non-empty, or the daemon refuses to start."""

    def __post_init__(self) -> None:
        _check_number("store.compact_threshold", self.compact_threshold, minimum=MIN_COMPACT_THRESHOLD)
        _check_number("store.idle_compact_s", self.idle_compact_s, minimum=0)
        if 0 < self.idle_compact_s < 1:
            _invalid("store.idle_compact_s", f"must be 0 (off) or >= 1, got {self.idle_compact_s!r}")
        _check_number("store.unload_idle_s", self.unload_idle_s, minimum=0)
        if 0 < self.unload_idle_s < 1:
            _invalid("store.unload_idle_s", f"must be 0 (off) or >= 1, got {self.unload_idle_s!r}")
        if not isinstance(self.key_file, str) or "\x00" in self.key_file:
            _invalid("store.key_file", f"expected a path, got {self.key_file!r}")
        if not isinstance(self.key_env, str) or not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)?", self.key_env):
            _invalid("store.key_env", f"expected an environment variable name, got {self.key_env!r}")
        if self.key_file and self.key_env:
            _invalid("store.key_env", "give key_file or key_env, not both")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """
    The ``[api]`` section: the local control API (its address is ``node.api``).

    Raises:
        ConfigError: On construction, if a value has the wrong type.

    """

    allow_remote: bool = False
    """Allow ``node.api`` on a non-loopback address. Off by default: the API is for this
    machine's users and tools; opening it to the LAN exposes every context to whoever
    holds the token (sent in clear: the API has no TLS)."""

    def __post_init__(self) -> None:
        if not isinstance(self.allow_remote, bool):
            _invalid("api.allow_remote", f"expected a boolean, got {self.allow_remote!r}")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """
    The ``[discovery]`` section: finding paired peers' addresses by mDNS/DNS-SD.

    Raises:
        ConfigError: On construction, if a value has the wrong type.

    """

    enabled: bool = True
    """Announce this node (node id and sync port only) and look up paired peers on the LAN.
    A peer's static ``addr`` in peers.toml always wins over a discovered one."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            _invalid("discovery.enabled", f"expected a boolean, got {self.enabled!r}")


@dataclass(frozen=True, slots=True)
class PairingConfig:
    """
    The ``[pairing]`` section: the listener ``ctxsync invite`` opens for joiners.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    port: int = 0
    """TCP port of the pairing listener, on ``node.listen``'s host; 0 lets the OS pick one each
    time it opens. Set one to let it through a firewall, as the sync port is."""

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            _invalid("pairing.port", f"expected a port number 0-65535, got {self.port!r}")


MIN_LOOP_STALL_S = 0.1
"""Smallest ``log.loop_stall_s`` but 0: the heartbeat runs every quarter of it."""
MAX_LOOP_STALL_S = 3600.0
MAX_LOOP_STALL_TRACEBACK_S = 86_400.0
"""Largest ``log.loop_stall_traceback_s`` (seconds): faulthandler's timer overflows on huge ones."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """
    The ``[log]`` section: logging and periodic statistics.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    level: LogLevel = "info"
    """Lowest level logged: ``debug``, ``info``, ``warning`` or ``error``."""
    stats_interval_s: float = 10.0
    """Period of the ``peer.stats`` and ``node.stats`` events, in seconds (> 0)."""
    loop_stall_s: float = 5.0
    """Seconds the event loop may stay busy with one thing before ``loop.stalled`` is logged
    (:class:`ctxsync.metrics.LoopWatchdog`); 0 turns the watchdog off."""
    loop_stall_traceback_s: float = 120.0
    """Seconds of a stall after which every thread's traceback is appended to
    ``stall-tracebacks.txt`` in the home (a hang): 0 (off), or from 1 and ``loop_stall_s``
    to 86,400."""

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            _invalid("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        _check_number("log.stats_interval_s", self.stats_interval_s, minimum=0, exclusive=True)
        _check_number("log.loop_stall_s", self.loop_stall_s, minimum=0)
        if self.loop_stall_s and not MIN_LOOP_STALL_S <= self.loop_stall_s <= MAX_LOOP_STALL_S:
            _invalid("log.loop_stall_s", f"must be 0 (off) or from {MIN_LOOP_STALL_S} to {MAX_LOOP_STALL_S}, got {self.loop_stall_s!r}")
        _check_number("log.loop_stall_traceback_s", self.loop_stall_traceback_s, minimum=0)
        if self.loop_stall_traceback_s:
            low = max(1.0, self.loop_stall_s)
            if not low <= self.loop_stall_traceback_s <= MAX_LOOP_STALL_TRACEBACK_S:
                _invalid(
                    "log.loop_stall_traceback_s",
                    f"must be 0 (off) or from {low} (1, and log.loop_stall_s) to {MAX_LOOP_STALL_TRACEBACK_S}, "
                    f"got {self.loop_stall_traceback_s!r}",
                )


@dataclass(frozen=True, slots=True)
class ContextsConfig:
    """
    The ``[contexts]`` section: history and recovery points of every context.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    history_limit: int = 1000
    """History records kept per context, newest first (>= 1)."""
    snapshot_every: int = 1000
    """Take an automatic snapshot of a context every this many versions (changes), or every as
    many versions as it has entries when that is more; 0 turns them off (snapshots before a
    restore or adopt are still taken)."""
    snapshot_keep: int = 20
    """Automatic snapshots kept per context, newest first (>= 1); named ones stay until deleted."""

    def __post_init__(self) -> None:
        _check_number("contexts.history_limit", self.history_limit, minimum=1)
        _check_number("contexts.snapshot_every", self.snapshot_every, minimum=0)
        _check_number("contexts.snapshot_keep", self.snapshot_keep, minimum=1)


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """
    The ``[webhooks]`` section: how change batches are delivered to webhook URLs.

    Raises:
        ConfigError: On construction, if a value is out of range.

    """

    max_attempts: int = 8
    """Deliveries tried per batch before it goes to the dead-letter list (>= 1)."""
    backoff_s: float = 1.0
    """Delay before the first retry, in seconds, doubled (with jitter) for each next one (> 0)."""
    max_backoff_s: float = 300.0
    """Longest delay between retries, in seconds (>= ``backoff_s``)."""
    timeout_s: float = 10.0
    """Time limit of one POST, in seconds (> 0)."""
    batch_max: int = 100
    """Most changes in one POST (>= 1)."""

    def __post_init__(self) -> None:
        _check_number("webhooks.max_attempts", self.max_attempts, minimum=1)
        _check_number("webhooks.backoff_s", self.backoff_s, minimum=0, exclusive=True)
        _check_number("webhooks.max_backoff_s", self.max_backoff_s, minimum=self.backoff_s, bound="webhooks.backoff_s")
        _check_number("webhooks.timeout_s", self.timeout_s, minimum=0, exclusive=True)
        _check_number("webhooks.batch_max", self.batch_max, minimum=1)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """
    A node's whole configuration: ``config.toml`` plus the peers of ``peers.toml``.

    Raises:
        ConfigError: On construction, if a value is invalid or two peers share a node id.

    """

    name: str
    """This node's name, for people: 1..64 characters."""
    listen: tuple[str, int]
    """Address of the peer (sync) listener, ``(host, port)``; port 0 picks a free port."""
    api: tuple[str, int]
    """Address of the local control API, ``(host, port)``; keep it on loopback."""
    sync: SyncConfig = SyncConfig()
    """The ``[sync]`` section."""
    store: StoreConfig = StoreConfig()
    """The ``[store]`` section."""
    log: LogConfig = LogConfig()
    """The ``[log]`` section."""
    api_settings: ApiConfig = ApiConfig()
    """The ``[api]`` section."""
    discovery: DiscoveryConfig = DiscoveryConfig()
    """The ``[discovery]`` section."""
    pairing: PairingConfig = PairingConfig()
    """The ``[pairing]`` section."""
    contexts: ContextsConfig = ContextsConfig()
    """The ``[contexts]`` section."""
    webhooks: WebhooksConfig = WebhooksConfig()
    """The ``[webhooks]`` section."""
    alerts: tuple[AlertRule, ...] = DEFAULT_RULES
    """The alert rules in force: the defaults merged with the ``[[alert]]`` tables
    (:func:`ctxsync.alerts.parse_rules`)."""
    peers: tuple[PeerConfig, ...] = ()
    """The paired peers, from ``peers.toml``; never written to ``config.toml``."""

    def __post_init__(self) -> None:
        _check_name("node.name", self.name)
        _check_addr("node.listen", self.listen)
        _check_addr("node.api", self.api)
        if not self.api_settings.allow_remote and not is_loopback(self.api[0]):
            _invalid(
                "node.api",
                f"{self.api[0]} is not a loopback address; the API belongs on 127.0.0.1"
                " (or set [api] allow_remote = true, knowing the token then crosses the network in clear)",
            )
        if self.listen == self.api and self.listen[1] != 0:
            _invalid("node.api", f"must differ from node.listen, both are {format_hostport(*self.api)}")
        if self.pairing.port and self.pairing.port in (self.listen[1], self.api[1]):
            _invalid("pairing.port", f"must differ from the ports of node.listen and node.api, got {self.pairing.port}")
        _check_unique_peers(self.peers)

    def peer(self, node_id: str) -> PeerConfig | None:
        """
        Find a paired peer by node id.

        Args:
            node_id: The peer's node id.

        Returns:
            The peer, or ``None`` if it is not paired.

        """
        for peer in self.peers:
            if peer.node_id == node_id:
                return peer
        return None


def _check_unique_peers(peers: Iterable[PeerConfig]) -> None:
    seen: dict[str, int] = {}
    for i, peer in enumerate(peers):
        if peer.node_id in seen:
            _invalid(
                f"peer[{i}].node_id",
                f"duplicate peer {peer.node_id!r} (also peer[{seen[peer.node_id]}])",
            )
        seen[peer.node_id] = i


# --------------------------------------------------------------------------------------------
# Reading TOML values


_TOML_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _type_name(value: object) -> str:
    return _TOML_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


class _Reader:
    """Typed access to one TOML file's values, raising ConfigError with its path and key."""

    __slots__ = ("path",)

    def __init__(self, path: str | None) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(reason, path=self.path, key=key or None)

    def loads(self, toml_text: str) -> dict[str, Any]:
        try:
            return tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", path=self.path) from None

    def table(self, key: str, value: object, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_type_name(value)}")
        known = list(allowed)
        for name in value:
            if name not in known:
                dotted = f"{key}.{name}" if key else name
                hint = difflib.get_close_matches(name, known, n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of: {', '.join(known)}"
                what = "section" if not key and isinstance(value[name], dict) else "key"
                self.fail(dotted, f"unknown {what}{also}")
        return value

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_type_name(value)}")
        return value

    def integer(self, key: str, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"expected an integer, got {_type_name(value)}")
        return value

    def number(self, key: str, value: object) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(key, f"expected a number, got {_type_name(value)}")
        return float(value)

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_type_name(value)}")
        return value

    def log_level(self, key: str, value: object) -> LogLevel:
        level = self.string(key, value).lower()
        if level not in LOG_LEVELS:
            self.fail(key, f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    def section(self, name: str, raw: Mapping[str, Any], cls: type[Any]) -> dict[str, Any]:
        """Read the keys of one dataclass section, converted by the type of each field."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in self.table(name, raw.get(name, {}), fields).items():
            kind = fields[key]
            dotted = f"{name}.{key}"
            if kind == "int":
                values[key] = self.integer(dotted, value)
            elif kind == "float":
                values[key] = self.number(dotted, value)
            elif kind == "bool":
                values[key] = self.boolean(dotted, value)
            elif kind == "str":
                values[key] = self.string(dotted, value)
            elif kind == "LogLevel":
                values[key] = self.log_level(dotted, value)
            else:  # pragma: no cover - a field type this reader does not know
                raise AssertionError(f"no reader for {cls.__name__}.{key}: {kind}")
        return values

    def build(self, factory: type[Any], values: Mapping[str, Any]) -> Any:
        """Construct a dataclass, re-raising its validation error with this file's path."""
        try:
            return factory(**values)
        except _FieldError as exc:
            raise ConfigError(exc.reason, path=self.path, key=exc.key) from None


_NODE_KEYS = ("name", "listen", "api")
_SECTIONS: dict[str, type[Any]] = {
    "sync": SyncConfig,
    "store": StoreConfig,
    "log": LogConfig,
    "api": ApiConfig,
    "discovery": DiscoveryConfig,
    "pairing": PairingConfig,
    "contexts": ContextsConfig,
    "webhooks": WebhooksConfig,
}
_SECTION_FIELDS = {
    "sync": "sync", "store": "store", "log": "log", "api": "api_settings", "discovery": "discovery",
    "pairing": "pairing", "contexts": "contexts", "webhooks": "webhooks",
}  # fmt: skip


def parse(toml_text: str, env: Mapping[str, str] | None = None, *, path: str | None = None) -> NodeConfig:
    """
    Parse the text of ``config.toml`` and apply environment overrides.

    The overrides are ``CTXSYNC_LISTEN``, ``CTXSYNC_API`` (``HOST:PORT``), ``CTXSYNC_LOG_LEVEL``
    and ``CTXSYNC_STATS_INTERVAL_S`` (seconds). A variable set to the empty string counts as unset;
    other ``CTXSYNC_*`` variables are ignored here.

    Args:
        toml_text: The file's text.
        env: Environment variables, usually ``os.environ``; ``None`` applies no overrides.
        path: The file's path, for error messages.

    Returns:
        The configuration, with ``peers=()``; see :func:`parse_peers` and :func:`load`.

    Raises:
        ConfigError: If the TOML is malformed, a section or key is unknown, a required key is
            missing, a value has the wrong type or is out of range, or an override is invalid
            (the error then names the variable).

    """
    reader = _Reader(path)
    raw = reader.table("", reader.loads(toml_text), ["node", "alert", *_SECTIONS])
    if "node" not in raw:
        reader.fail("node", "missing section [node]")
    node = reader.table("node", raw["node"], _NODE_KEYS)
    for key in _NODE_KEYS:
        if key not in node:
            reader.fail(f"node.{key}", "missing required key")
    name = reader.string("node.name", node["name"])
    listen = parse_hostport(reader.string("node.listen", node["listen"]), key="node.listen", path=path)
    api = parse_hostport(reader.string("node.api", node["api"]), key="node.api", path=path)
    sections = {section: reader.section(section, raw, cls) for section, cls in _SECTIONS.items()}

    overrides = {key: value for key, value in (env or {}).items() if value != ""}
    if ENV_LISTEN in overrides:
        listen = parse_hostport(overrides[ENV_LISTEN], key=ENV_LISTEN)
    if ENV_API in overrides:
        api = parse_hostport(overrides[ENV_API], key=ENV_API)
    if ENV_LOG_LEVEL in overrides:
        sections["log"]["level"] = _Reader(None).log_level(ENV_LOG_LEVEL, overrides[ENV_LOG_LEVEL])
    if ENV_DISCOVERY in overrides:
        flag = overrides[ENV_DISCOVERY].strip().lower()
        if flag not in ("on", "off", "1", "0", "true", "false"):
            raise ConfigError(f"expected on or off, got {overrides[ENV_DISCOVERY]!r}", key=ENV_DISCOVERY)
        sections["discovery"]["enabled"] = flag in ("on", "1", "true")
    if ENV_STATS_INTERVAL_S in overrides:
        sections["log"]["stats_interval_s"] = _env_seconds(
            ENV_STATS_INTERVAL_S, overrides[ENV_STATS_INTERVAL_S]
        )

    sync = reader.build(SyncConfig, sections["sync"])
    store = reader.build(StoreConfig, sections["store"])
    log = reader.build(LogConfig, sections["log"])
    api_settings = reader.build(ApiConfig, sections["api"])
    discovery = reader.build(DiscoveryConfig, sections["discovery"])
    pairing = reader.build(PairingConfig, sections["pairing"])
    contexts = reader.build(ContextsConfig, sections["contexts"])
    webhooks = reader.build(WebhooksConfig, sections["webhooks"])
    if listen == api and listen[1] != 0:
        # Checked here too so that the message can say where the values came from.
        moved = [variable for variable in (ENV_LISTEN, ENV_API) if variable in overrides]
        source = f" (after {' and '.join(moved)})" if moved else ""
        reader.fail("node.api", f"must differ from node.listen, both are {format_hostport(*api)}{source}")
    values = {
        "name": name,
        "listen": listen,
        "api": api,
        "sync": sync,
        "store": store,
        "log": log,
        "api_settings": api_settings,
        "discovery": discovery,
        "pairing": pairing,
        "contexts": contexts,
        "webhooks": webhooks,
        "alerts": parse_rules(raw.get("alert", []), path=path),
    }
    return cast(NodeConfig, reader.build(NodeConfig, values))


def _env_seconds(variable: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number of seconds, got {text!r}", key=variable) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite number of seconds > 0, got {text!r}", key=variable)
    return value


_PEER_KEYS = ("node_id", "name", "addr", "contexts", "read_only", "read_only_contexts", "cert")


def _context_names(
    reader: _Reader, table: Mapping[str, Any], prefix: str, field: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    """Read an optional array of context names of a ``[[peer]]`` table."""
    if field not in table:
        return default
    key = f"{prefix}.{field}"
    items = table[field]
    if not isinstance(items, list):
        reader.fail(key, f"expected an array of context names, got {_type_name(items)}")
    return tuple(reader.string(f"{key}[{j}]", item) for j, item in enumerate(items))


def parse_peers(toml_text: str, *, path: str | None = None) -> tuple[PeerConfig, ...]:
    """
    Parse the text of ``peers.toml``.

    Node ids are checked only as non-empty strings and certificates only as non-empty text;
    :mod:`ctxsync.crypto` verifies both.

    Args:
        toml_text: The file's text; an empty text has no peers.
        path: The file's path, for error messages.

    Returns:
        The peers, in file order.

    Raises:
        ConfigError: If the TOML is malformed, a key is unknown or missing, a value is invalid,
            or two peers have the same node id. Keys are named ``peer[INDEX].KEY``.

    """
    reader = _Reader(path)
    raw = reader.table("", reader.loads(toml_text), ["peer"])
    entries = raw.get("peer", [])
    if not isinstance(entries, list):
        reader.fail("peer", f"expected an array of tables [[peer]], got {_type_name(entries)}")
    peers: list[PeerConfig] = []
    for i, entry in enumerate(entries):
        prefix = f"peer[{i}]"
        table = reader.table(prefix, entry, _PEER_KEYS)
        for key in ("node_id", "name", "cert"):
            if key not in table:
                reader.fail(f"{prefix}.{key}", "missing required key")
        addr = None
        if "addr" in table:
            key = f"{prefix}.addr"
            addr = parse_hostport(reader.string(key, table["addr"]), key=key, path=path)
        contexts = _context_names(reader, table, prefix, "contexts", ("*",))
        read_only_contexts = _context_names(reader, table, prefix, "read_only_contexts", ())
        try:
            peer = PeerConfig(
                node_id=NodeId(reader.string(f"{prefix}.node_id", table["node_id"])),
                name=reader.string(f"{prefix}.name", table["name"]),
                cert_pem=reader.string(f"{prefix}.cert", table["cert"]),
                addr=addr,
                contexts=contexts,
                read_only=reader.boolean(f"{prefix}.read_only", table.get("read_only", False)),
                read_only_contexts=read_only_contexts,
            )
        except _FieldError as exc:
            reader.fail(f"{prefix}.{exc.key}", exc.reason)
        peers.append(peer)
    try:
        _check_unique_peers(peers)
    except _FieldError as exc:
        reader.fail(exc.key or "", exc.reason)
    return tuple(peers)


# --------------------------------------------------------------------------------------------
# Writing TOML


def dump_node(cfg: NodeConfig) -> str:
    """
    Render a configuration as ``config.toml`` text, every key written out.

    ``parse(dump_node(cfg)) == dataclasses.replace(cfg, peers=())``: peers belong in
    ``peers.toml`` (:func:`dump_peers`).

    Args:
        cfg: The configuration.

    Returns:
        TOML text.

    """
    doc: dict[str, Any] = {
        "node": {
            "name": cfg.name,
            "listen": format_hostport(*cfg.listen),
            "api": format_hostport(*cfg.api),
        },
    }
    for section, attr in _SECTION_FIELDS.items():
        doc[section] = dataclasses.asdict(getattr(cfg, attr))
    names = {rule.name for rule in cfg.alerts}
    alerts: list[dict[str, Any]] = [dataclasses.asdict(rule) for rule in cfg.alerts]
    alerts += [{"name": rule.name, "enabled": False} for rule in DEFAULT_RULES if rule.name not in names]
    doc["alert"] = alerts
    return tomli_w.dumps(doc)


def dump_peers(peers: Iterable[PeerConfig]) -> str:
    """
    Render peers as ``peers.toml`` text, certificates as multi-line strings.

    Args:
        peers: The peers, in the order to write them.

    Returns:
        TOML text; the empty string if there are no peers.

    Raises:
        ConfigError: If two peers have the same node id.

    """
    peers = tuple(peers)
    _check_unique_peers(peers)
    if not peers:
        return ""
    tables: list[dict[str, Any]] = []
    for peer in peers:
        table: dict[str, Any] = {"node_id": str(peer.node_id), "name": peer.name}
        if peer.addr is not None:
            table["addr"] = format_hostport(*peer.addr)
        table["contexts"] = list(peer.contexts)
        table["read_only"] = peer.read_only
        if peer.read_only_contexts:
            table["read_only_contexts"] = list(peer.read_only_contexts)
        table["cert"] = peer.cert_pem
        tables.append(table)
    return tomli_w.dumps({"peer": tables}, multiline_strings=True)


# --------------------------------------------------------------------------------------------
# Files


def _read_text(path: Path) -> str:
    """Read a UTF-8 file; FileNotFoundError propagates, other failures become ConfigError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", path=str(path)) from None


def load(home: str | Path, env: Mapping[str, str] | None = None) -> NodeConfig:
    """
    Read a node's configuration from its home: ``config.toml`` and, if present, ``peers.toml``.

    Args:
        home: The node's home directory.
        env: Environment variables for the overrides of :func:`parse`, usually ``os.environ``;
            ``None`` applies none (this function never reads ``os.environ`` itself).

    Returns:
        The configuration, with its peers.

    Raises:
        ConfigError: If ``config.toml`` is missing (run ``ctxsync init``), a file cannot be
            read, or :func:`parse` / :func:`parse_peers` reject it.

    """
    home = Path(home)
    config_path = home / CONFIG_FILE
    try:
        text = _read_text(config_path)
    except FileNotFoundError:
        raise ConfigError(
            f"no {CONFIG_FILE} in {home}: run `ctxsync init --home {home}` first",
            path=str(config_path),
        ) from None
    cfg = parse(text, env, path=str(config_path))
    peers_path = home / PEERS_FILE
    try:
        peers_text = _read_text(peers_path)
    except FileNotFoundError:
        return cfg
    return dataclasses.replace(cfg, peers=parse_peers(peers_text, path=str(peers_path)))


def write_atomic(path: str | Path, text: str, *, mode: int = 0o600) -> None:
    """
    Replace a file's content atomically and durably.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` with
    :func:`os.replace` and fsyncs the directory, so a reader sees either the old or the new
    content, never a mix, and the new content survives a crash once this returns.

    Args:
        path: The file to write; its directory must exist.
        text: The new content, written as UTF-8.
        mode: Permission bits of the file, e.g. ``0o600`` (the default) or ``0o644``.

    Raises:
        OSError: If writing fails; the original file is then unchanged and no temporary file
            is left.

    """
    path = Path(path)
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            tmp.write(text.encode("utf-8"))
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
