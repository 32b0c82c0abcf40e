"""
Composition root: builds store -> mesh -> peer listener -> API -> stats, and runs them
until a signal says stop.

The only module that builds concrete objects and wires them (Syncthing's
``lib/syncthing/syncthing.go``). Shutdown order: stop accepting API and peer connections,
tell peers Goodbye, then close the store last so every queued update is committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import itertools
import os
import signal
import time
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

from ctxsync import __version__, config, transport
from ctxsync.alerts import AlertEvaluator
from ctxsync.api import Api
from ctxsync.recovery import Recovery
from ctxsync.webhooks import WebhookDispatcher
from ctxsync.crypto import node_id_from_cert
from ctxsync.errors import ConfigError, CryptoError, CtxSyncError, StoreError
from ctxsync.crypto import PeerCard, encode_peer_card
from ctxsync.home import CERT_FILE, KEY_FILE, STORE_FILE, TOKEN_FILE, TRACEBACK_FILE, advertised_host, check_permissions, open_store_key, pair_card
from ctxsync.pairing import PairingListener, encode_token
from ctxsync.log import configure_logging
from ctxsync.mesh import Mesh
from ctxsync.metrics import LoopWatchdog, ProcessSampler, log_stats, trim_memory
from ctxsync.store import Store
from ctxsync.types import DocId, NodeId

log = structlog.get_logger("ctxsync.daemon")

__all__ = ["CERT_FILE", "KEY_FILE", "STORE_FILE", "TOKEN_FILE", "Daemon", "run"]

PEERS_POLL_S = 2.0
STARTUP_TRIM_S = 1.0
"""Seconds after startup to give the C heap's free memory back (metrics.trim_memory)."""
MONITOR_INTERVAL_S = 0.5
"""Period of the monitor task: event loop lag probe, RTT sampling, update rates, in seconds."""
LOOP_LAG_WINDOW = 20
"""Loop lag probes kept; ``loop_lag_ms`` is the largest of them (the last 10 s)."""
RATE_WINDOW = 20
"""Monitor ticks over which updates per second are averaged (10 s)."""
DISCOVERY_RETRY_MIN_S = 2.0
"""Seconds before mDNS discovery is started again after it failed to start (then doubling)."""
DISCOVERY_RETRY_MAX_S = 300.0
"""Longest wait between two attempts to start mDNS discovery, in seconds."""
IDLE_COMPACT_MIN_ROWS = 64
"""Log rows from which a context left unchanged for ``store.idle_compact_s`` is compacted."""
IDLE_COMPACT_TICK_S = 5.0
"""Longest period of the idle-compaction check, in seconds (shorter if ``idle_compact_s`` is)."""
IDLE_UNLOAD_TICK_S = 5.0
"""Longest period of the idle-unload check, in seconds (shorter if ``unload_idle_s`` is)."""
GC_YOUNG_THRESHOLD = 10_000
"""Net container allocations between two young-generation collections (CPython's default: 700).

A batch of pipelined writes keeps thousands of objects (requests, futures, changes) alive for a
few milliseconds; with the default threshold they survive collections, are promoted, and soon
trigger full collections that walk every context's whole index. Measured with two meshes in one
process over 20,000 replicated writes: 0.20 s of collection at 700, 0.06 s at 10,000 (about
7 µs less CPU per write). Reference cycles, which are rare here, live a little longer."""


class IdleContexts:
    """
    Which contexts have gone unchanged for ``idle_s`` seconds, from their versions sampled over
    time (a context's version counts every transaction that changed it, local or remote).

    Args:
        idle_s: Seconds without a new version that make a context idle (> 0).
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._since: dict[DocId, tuple[int, float]] = {}  # doc_id -> (version, time it was first seen at)

    def due(self, versions: Mapping[DocId, int], now: float) -> list[DocId]:
        """
        Record ``versions`` (doc id -> version) seen at ``now`` (seconds, monotonic) and return the
        doc ids whose version has not changed for ``idle_s`` or more, in ``versions``' order.
        A context seen for the first time, or with a new version, starts its wait again.
        """
        due = []
        for doc_id, version in versions.items():
            known = self._since.get(doc_id)
            if known is None or known[0] != version:
                self._since[doc_id] = (version, now)
            elif now - known[1] >= self.idle_s:
                due.append(doc_id)
        for gone in self._since.keys() - versions.keys():
            del self._since[gone]
        return due


class Daemon:
    """
    One node's daemon, for one home directory.

    Args:
        home: The node's home (config.toml, node.key, node.crt, api.token, store.db).
        env: Environment for ``CTXSYNC_*`` overrides.
    """

    def __init__(self, home: Path, env: Mapping[str, str]) -> None:
        self.home = home
        self.env = env
        self.config = config.load(home, env)
        try:
            cert = (home / CERT_FILE).read_bytes()
            (home / KEY_FILE).stat()
            self.token = (home / TOKEN_FILE).read_text().strip()
        except FileNotFoundError as exc:
            raise ConfigError(f"{exc.filename} is missing: is {home} a ctxsync home? (`ctxsync init`)") from None
        self.node_id: NodeId = node_id_from_cert(cert)
        self.stopping = asyncio.Event()
        self.stop_reason = "unknown"
        self.sampler = ProcessSampler()
        self.store: Store | None = None
        self.mesh: Mesh | None = None
        self._peers_mtime = self._mtime()
        self._cert_pem = cert
        self._sync_port = self.config.listen[1]
        self.alerts = AlertEvaluator(self.config.alerts)
        self.discovery: Any = None  # a ctxsync.discovery.Discovery once started
        self.watchdog: LoopWatchdog | None = None
        self._loop_lag_ms: collections.deque[float] = collections.deque(maxlen=LOOP_LAG_WINDOW)
        self._rates: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=RATE_WINDOW + 1)
        self.pairing = PairingListener(
            cert_path=home / CERT_FILE, key_path=home / KEY_FILE, own_card=self.own_card, on_join=self._on_join
        )

    def own_card(self) -> str:
        """This node's peer card, with the address peers should dial (``ctxsync export``)."""
        host = advertised_host(self.config.listen[0])
        addr = config.format_hostport(host, self._sync_port) if host else None
        return encode_peer_card(PeerCard(node_id=self.node_id, name=self.config.name, addr=addr, cert_pem=self._cert_pem))

    async def _on_join(self, card: PeerCard, contexts: tuple[str, ...], read_only: bool) -> None:
        """Pair a node that redeemed an invite: write it to peers.toml and make it live."""
        pair_card(self.home, self.env, card, contexts=contexts, read_only=read_only)
        await self.reload_peers()

    async def invite(self, contexts: list[str], read_only: bool, ttl_s: float, addr: str | None) -> dict[str, Any]:
        """Open a pairing invite (the API's ``invite`` op); see :meth:`PairingListener.invite`."""
        listen_host = self.config.listen[0]
        host = addr or advertised_host(listen_host)
        if host is None:
            raise ConfigError("cannot tell which address the joiner should dial: give one (`ctxsync invite --addr HOST`)")
        try:
            token, expires_at = await self.pairing.invite(
                host=listen_host, port=self.config.pairing.port, ttl_s=ttl_s, contexts=contexts, read_only=read_only
            )
        except OSError as exc:
            where = config.format_hostport(listen_host, self.config.pairing.port) if self.config.pairing.port else listen_host
            raise ConfigError(f"cannot open the pairing listener on {where}: {exc.strerror or exc}", key="pairing.port") from None
        token = dataclasses.replace(token, host=host)
        return {
            "token": encode_token(token),
            "expires_at": datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds"),
            "node_id": self.node_id,
            "addr": config.format_hostport(host, token.port),
        }

    def _mtime(self) -> float:
        try:
            return (self.home / config.PEERS_FILE).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def stop(self, reason: str) -> None:
        """Ask the daemon to shut down (a signal's name, or ``"api"``)."""
        if not self.stopping.is_set():
            self.stop_reason = reason
            log.info("node.stopping", reason=reason)
            self.stopping.set()

    def status(self) -> dict[str, Any]:
        """The status object of ``ctxsync status --json`` (mesh + process + store)."""
        assert self.mesh is not None and self.store is not None
        st = self.mesh.status()
        st["process"] = self.sampler.sample()
        s = self.store.stats()
        st["store"] = {
            "path": s.path,
            "size_bytes": s.size_bytes,
            "commits": s.commits,
            "appends": s.appends,
            "compactions": s.compactions,
            "compaction_failures": s.compaction_failures,
            "last_compaction_error": s.last_compaction_error,
            "failing": self.mesh.store_failing,
        }
        st["version"] = __version__
        st["listen"] = config.format_hostport(*self.config.listen)
        st["node"] = self._node_figures()
        st["alerts"] = [a.to_json() for a in self.alerts.active()]
        return st

    def _node_figures(self) -> dict[str, Any]:
        assert self.mesh is not None
        rate_in = rate_out = 0.0
        if len(self._rates) >= 2:
            (t0, in0, out0), (t1, in1, out1) = self._rates[0], self._rates[-1]
            if t1 > t0:
                rate_in, rate_out = (in1 - in0) / (t1 - t0), (out1 - out0) / (t1 - t0)
        return {
            "updates_in_total": self.mesh.updates_received,
            "updates_out_total": self.mesh.updates_sent,
            "updates_in_per_s": round(rate_in, 1),
            "updates_out_per_s": round(rate_out, 1),
            "loop_lag_ms": round(max(self._loop_lag_ms, default=0.0), 3),
            "loop_stalls_total": self.watchdog.stalls if self.watchdog else 0,
            "last_loop_stall_s": round(self.watchdog.last_stall_s, 3) if self.watchdog else 0.0,
            "contexts_loaded": len(self.mesh.contexts),
            "context_loads_total": self.mesh.loads,
            "context_unloads_total": self.mesh.unloads,
        }

    def _api_hosts(self) -> frozenset[str]:
        """Host header names of the API when ``[api] allow_remote`` puts it on the LAN."""
        host = self.config.api[0]
        names = {host}
        if (lan := advertised_host(host)) is not None:
            names.add(lan)
        return frozenset(names)

    async def _discover(self) -> None:
        """
        Announce this node and look up paired peers by mDNS, for as long as the daemon runs.

        If mDNS cannot start (no interface with multicast yet, as when the daemon starts before
        the network is up; a socket error; another responder announcing this node id), it is
        tried again after :data:`DISCOVERY_RETRY_MIN_S`, doubling up to
        :data:`DISCOVERY_RETRY_MAX_S` (with jitter). The first failure is logged at ERROR
        (``discovery.failed``), each retry at INFO (``discovery.retry``, with the error), so a
        machine that never has multicast gets one error line, not one every five minutes.
        Static peer addresses work meanwhile. A setting that can never work (a listen host that
        is a name, not an address) turns discovery off at once.
        """
        from ctxsync.discovery import Discovery, DiscoveryError  # it imports zeroconf only once mDNS can run
        from ctxsync.mesh import backoff

        assert self.mesh is not None
        host = self.config.listen[0]
        interfaces = None if host in ("0.0.0.0", "::", "") else [host]
        delays = backoff(DISCOVERY_RETRY_MIN_S, DISCOVERY_RETRY_MAX_S)
        for attempt in itertools.count(1):
            try:
                discovery = Discovery(self.node_id, self._sync_port, on_found=self.mesh.on_discovered, interfaces=interfaces)
                await discovery.start(quiet=attempt > 1)
            except DiscoveryError as exc:  # the module logged discovery.failed; static addresses still work
                delay = next(delays)
                log.info("discovery.retry", attempt=attempt, retry_in_s=round(delay, 1), error=str(exc))
                await asyncio.sleep(delay)
                continue
            except (ValueError, OSError) as exc:  # could not even be set up (e.g. a listen host that is a name)
                log.warning("discovery.failed", error=str(exc), retrying=False)
                return
            self.discovery = discovery
            return

    async def _compact_idle(self, idle_s: float) -> None:
        """
        Compact the log of each context left unchanged for ``idle_s`` seconds
        (:class:`IdleContexts`) once it has :data:`IDLE_COMPACT_MIN_ROWS` rows and is large
        enough next to its checkpoint (:meth:`Store.compaction_due`), one context at a time.

        Automatic compactions come only with writes, after ``store.compact_threshold`` rows
        (2000): a context written some hundreds of times and then left alone kept its log for
        good, and every start read, unsealed and applied it row by row. Measured: 200 contexts
        of 1,000 rows each took 6.9-7.4 s to start, 1.5 s once compacted. A compaction that
        fails is counted by the store (``store.compaction_failed`` in the stats loop), and the
        context waits until its log grows by ``compact_threshold`` rows.
        """
        assert self.mesh is not None and self.store is not None
        idle = IdleContexts(idle_s)
        while True:
            await asyncio.sleep(min(IDLE_COMPACT_TICK_S, idle_s))
            if self.mesh.store_failing:
                continue
            versions = {doc_id: self.mesh.version_of(doc_id) for doc_id in self.mesh.context_ids()}
            for doc_id in idle.due(versions, time.monotonic()):
                if self.mesh.version_of(doc_id) != versions[doc_id] or self.mesh.store_failing:
                    continue  # changed while an earlier one was compacted: not idle
                if not self.store.compaction_due(doc_id, IDLE_COMPACT_MIN_ROWS):
                    continue
                started = time.monotonic()
                try:
                    written = await self.store.compact(doc_id)
                except StoreError as exc:  # counted by the store; the next context may still go
                    log.debug("store.idle_compaction_failed", doc_id=doc_id, error=str(exc))
                    continue
                took = time.monotonic() - started
                log.debug("store.compacted", doc_id=doc_id, reason="idle", written=written, took_s=round(took, 3))
                # The store thread does nothing else meanwhile (writes wait): leave it free at
                # least half the time, however many contexts are due (after a restart, all).
                await asyncio.sleep(took)

    async def _unload_idle(self, idle_s: float) -> None:
        """
        Unload from memory each context not read, written or synced for ``idle_s`` seconds
        (:meth:`Mesh.unload_idle`), then give the freed memory back to the system. A context
        costs memory for as long as it is loaded (its document and entry index: measured about
        350 KiB for 300 live entries, four times its encoded size), so without this a daemon
        that runs for months grows with every context it ever held.
        """
        assert self.mesh is not None
        while True:
            await asyncio.sleep(min(IDLE_UNLOAD_TICK_S, idle_s))
            if self.mesh.store_failing:
                continue
            started = time.monotonic()
            unloaded = self.mesh.unload_idle(idle_s)
            if unloaded:
                trim_memory()
                log.debug(
                    "context.unloaded", contexts=unloaded[:20], count=len(unloaded), loaded=len(self.mesh.contexts),
                    took_ms=round((time.monotonic() - started) * 1000, 3),
                )  # fmt: skip

    async def _monitor(self) -> None:
        # Event loop lag: how late a timer fires. A busy loop (a large catch-up applied on it)
        # shows here first, before the API slows down.
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(MONITOR_INTERVAL_S)
            self._loop_lag_ms.append(max(0.0, (loop.time() - t0 - MONITOR_INTERVAL_S) * 1000))
            if self.mesh is not None:
                self.mesh.sample_rtt()
                self._rates.append((loop.time(), self.mesh.updates_received, self.mesh.updates_sent))

    async def reload_peers(self) -> int:
        """Re-read peers.toml and make it the live peer list; return the peer count."""
        assert self.mesh is not None
        self._peers_mtime = self._mtime()
        peers = config.load(self.home, self.env).peers
        self.mesh.set_peers(peers)
        return len(peers)

    async def _watch_peers_file(self) -> None:
        # The CLI tells a running daemon about peer changes through the API; this poll
        # catches edits made by hand or while the API call failed.
        while True:
            await asyncio.sleep(PEERS_POLL_S)
            if self._mtime() != self._peers_mtime:
                try:
                    n = await self.reload_peers()
                    log.info("config.reloaded", peers=n)
                except ConfigError as exc:
                    log.error("config.reload_failed", error=str(exc))

    async def _stats_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.config.log.stats_interval_s)
            status = self.status()
            for kind, alert in self.alerts.observe(status, time.time()):
                fields = alert.to_json()
                event = fields.pop("name")
                if kind == "raised":
                    log.warning("alert.raised", alert=event, **fields)
                else:
                    log.info("alert.cleared", alert=event, **fields)
            status["alerts"] = [a.to_json() for a in self.alerts.active()]
            log_stats(status)
            trim_memory()
            store = status["store"]
            if store["compaction_failures"] > failures:
                failures = store["compaction_failures"]
                log.error("store.compaction_failed", failures=failures, error=store["last_compaction_error"])

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM (or the API's stop op), then shut down cleanly."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, sig.name)
        check_permissions(self.home, cfg)
        records_at_stop: list[asyncio.Future[None]] = []
        store_path = self.home / STORE_FILE
        cipher, created = open_store_key(self.home, cfg, self.env, store_cipher=Store.sealed_with(store_path))
        if created:
            log.warning("store.key_created", reason="no store key yet: made one; back it up, apart from store.db (without it the store cannot be read)")
        async with Store(
            store_path,
            compact_threshold=cfg.store.compact_threshold,
            cipher=cipher,
            history_limit=cfg.contexts.history_limit,
            snapshot_keep=cfg.contexts.snapshot_keep,
        ) as store:
            if store.resealed:
                log.warning("store.resealed", blobs=store.resealed, cipher=cipher.name)
            self.store = store
            mesh = self.mesh = Mesh(
                node_id=self.node_id,
                config=cfg,
                store=store,
                cert_path=self.home / CERT_FILE,
                key_path=self.home / KEY_FILE,
            )
            await mesh.load(unload=cfg.store.unload_idle_s > 0)
            recovery = Recovery(mesh, store, cfg.contexts)
            webhooks = WebhookDispatcher(
                store,
                cfg.webhooks,
                self.node_id,
                current_version=mesh.version_of,
                unstored_from=mesh.unstored_from,
            )
            mesh.on_durable.append(webhooks.notify)
            await webhooks.start()
            listener = await transport.listen(
                mesh.run_channel,
                cfg.listen[0],
                cfg.listen[1],
                ssl_context=transport.listening_context(mesh.server_context),
                max_frame_bytes=cfg.sync.max_frame_bytes,
                ping_interval=cfg.sync.ping_interval_s,
                ping_timeout=cfg.sync.ping_timeout_s,
            )
            self._sync_port = listener.sockets[0].getsockname()[1] if listener.sockets else cfg.listen[1]
            api = Api(
                mesh,
                token=self.token,
                status=self.status,
                reload_peers=self.reload_peers,
                stop=lambda: self.stop("api"),
                invite=self.invite,
                allowed_hosts=self._api_hosts() if cfg.api_settings.allow_remote else frozenset(),
                alert_rules=cfg.alerts,
                recovery=recovery,
                webhooks=webhooks,
            )
            try:
                api_server = await api.listen(*cfg.api)
            except OSError as exc:
                listener.close()
                raise ConfigError(f"cannot listen on {config.format_hostport(*cfg.api)}: {exc.strerror}", key="node.api") from None
            mesh.start_peers()
            log.info(
                "node.started",
                name=cfg.name,
                version=__version__,
                listen=config.format_hostport(*cfg.listen),
                api=config.format_hostport(*cfg.api),
                peers=len(cfg.peers),
                contexts=len(mesh.context_ids()),
                contexts_rebuilt=mesh.rebuilt,
                entries=mesh.entry_count(),
            )
            background = [
                asyncio.create_task(self._stats_loop(), name="stats"),
                asyncio.create_task(self._watch_peers_file(), name="peers-file"),
                asyncio.create_task(self._monitor(), name="monitor"),
            ]
            if cfg.discovery.enabled:
                background.append(asyncio.create_task(self._discover(), name="discovery"))
            if cfg.store.idle_compact_s > 0:
                background.append(asyncio.create_task(self._compact_idle(cfg.store.idle_compact_s), name="idle-compaction"))
            if cfg.store.unload_idle_s > 0:
                background.append(asyncio.create_task(self._unload_idle(cfg.store.unload_idle_s), name="idle-unload"))
            loop.call_later(STARTUP_TRIM_S, trim_memory)  # once the first sessions are up
            tracebacks = None
            try:
                if cfg.log.loop_stall_s > 0:  # after loading: a long start is not a stall
                    if cfg.log.loop_stall_traceback_s > 0:
                        try:
                            tracebacks = _open_append(self.home / TRACEBACK_FILE)
                        except OSError as exc:  # stalls are still logged
                            log.warning("loop.watchdog_traceback_off", error=str(exc))
                    self.watchdog = LoopWatchdog(
                        cfg.log.loop_stall_s,
                        cfg.log.loop_stall_traceback_s if tracebacks is not None else 0.0,
                        traceback_file=tracebacks,
                    )
                    self.watchdog.start()
                await self.stopping.wait()
            finally:
                try:
                    for t in background:
                        t.cancel()
                    # Let each finish its cancellation (a discovery start under way closes its sockets).
                    for t, result in zip(background, await asyncio.gather(*background, return_exceptions=True), strict=True):
                        if isinstance(result, Exception):  # it had failed before the stop: say so
                            log.error("node.task_failed", task=t.get_name(), error=f"{type(result).__name__}: {result}")
                    # Peers first hear Goodbye on every session, dialed or accepted; closing the
                    # listener before would cut accepted sessions with a bare 1001.
                    await self.pairing.close()
                    if self.discovery is not None:
                        await self.discovery.stop()  # goodbye packets: peers forget this address
                    await webhooks.stop()
                    await mesh.stop()
                    await mesh.flush_unpersisted()
                    if cfg.store.unload_idle_s > 0:  # records in the store: the next start rebuilds none of these
                        records_at_stop = mesh.unload_all()
                    await recovery.stop()
                    api_server.close()
                    listener.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(listener.wait_closed(), 3)
                        await asyncio.wait_for(api_server.wait_closed(), 3)
                finally:
                    if self.watchdog is not None:
                        self.watchdog.stop()
                    if tracebacks is not None:
                        tracebacks.close()
            # Leaving the store's context commits everything queued, then closes it.
        # Counted now that the store is closed: a record it could not commit is not counted.
        unloaded = sum(1 for f in records_at_stop if f.done() and not f.cancelled() and f.exception() is None)
        log.info("node.stopped", reason=self.stop_reason, contexts_unloaded=unloaded)


def _open_append(path: Path) -> TextIO:
    """Open ``path`` for appending, created with mode 0600 (the home's files are private)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


def run(home: Path, env: Mapping[str, str]) -> int:
    """
    Run the daemon in the foreground (``ctxsync run``).

    Returns:
        0 after a clean shutdown, 1 if it could not start (the reason on stderr and in
        a ``node.failed`` event).
    """
    try:
        cfg = config.load(home, env)
        cert = (home / CERT_FILE).read_bytes()
        configure_logging(level=cfg.log.level, json=True, node_id=node_id_from_cert(cert))
    except FileNotFoundError as exc:
        print(f"ctxsync: error: {exc.filename} is missing: run `ctxsync init --home {home}` first", file=sys.stderr)
        return 1
    except (ConfigError, CryptoError) as exc:
        print(f"ctxsync: error: {exc}", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(home, env)
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        asyncio.run(daemon.run())
    except CtxSyncError as exc:
        message = " ".join(str(exc).split())  # one line on stderr, whatever the cause said
        log.error("node.failed", error=message, error_type=type(exc).__name__)
        print(f"ctxsync: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
