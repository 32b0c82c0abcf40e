"""
mDNS/DNS-SD discovery of other ctxsync nodes on the LAN, with ``zeroconf``.

This module owns what a node says about itself on the LAN and how it reads what others say.
Each node registers one DNS-SD service (RFC 6763) of type :data:`SERVICE_TYPE`:

* instance name ``<node id>._ctxsync._tcp.local.`` (a node id is 63 characters: one DNS label);
* SRV record: the sync listener's TCP port, on host ``<node id>.local.``;
* A (and AAAA) records: the addresses the node can be dialed at;
* TXT record: ``id=<node id>`` and ``v=1``, nothing else.

An announcement carries only the node id and the port: never a context name, a node name or
the machine's host name. It proves nothing either: the daemon dials the addresses it learns and
mutual TLS pins the certificate, so a forged announcement costs a failed dial, no more.

:class:`Discovery` reports every other ctxsync node it sees, paired or not, through its
``on_found`` callback; the daemon keeps the paired ones and lets static addresses from the
config win over discovered ones.

Rule: an I/O adapter, like ``transport.py``. It imports zeroconf, ifaddr, asyncio and structlog,
and from ctxsync only ``errors``, ``types`` and ``crypto``; zeroconf only once an interface is
found usable (:meth:`Discovery.start`): it adds about 3.4 MiB to the daemon's RSS, which a
machine or listen address without multicast would hold for nothing. It never dials and never
reads the config. Everything zeroconf raises is translated here, once, into :class:`DiscoveryError`; nothing
a peer sends can raise into zeroconf's record handling (malformed services are logged at DEBUG
and ignored).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ifaddr
import structlog

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .crypto import parse_node_id, short_id
from .errors import CryptoError, CtxSyncError, InvalidState
from .types import NodeId

__all__ = [
    "SERVICE_TYPE", "TXT_VERSION", "Discovery", "DiscoveryError", "InvalidAnnouncement", "announced_addresses",
    "parse_service", "scan_interfaces",
]  # fmt: skip

log = structlog.get_logger("ctxsync.discovery")

SERVICE_TYPE = "_ctxsync._tcp.local."
"""DNS-SD service type of a ctxsync node's sync listener."""

TXT_VERSION = "1"
"""Value of the ``v`` key in our TXT record: the announcement format version."""

MAX_ADDRESSES = 16
"""Most addresses kept from one announcement; the rest are dropped."""

MAX_NODES = 1024
"""Most node ids remembered by :meth:`Discovery.addresses`; the oldest is forgotten first."""

MAX_RESOLVING = 64
"""Most services resolved at once; announcements beyond that are dropped until one finishes."""

_MAX_NAME_CHARS = 255  # a DNS name
_MAX_ID_BYTES = 100  # a node id is 63; room for spaces a person might have typed
_MIN_CLOSE_S = 0.5  # closing the sockets gets this long even when the goodbyes used up stop_timeout
_SIOCGIFFLAGS = 0x8913  # <linux/sockios.h>
_IFF_UP = 0x1
_IFF_MULTICAST = 0x1000

Address = tuple[str, int]
"""``(host, port)``: an IP address as text (IPv6 without brackets) and a TCP port."""


class DiscoveryError(CtxSyncError):
    """mDNS discovery cannot start: no usable interface, no multicast, or the node id is taken.

    The daemon can log it and go on with static addresses only.
    """


class InvalidAnnouncement(DiscoveryError):
    """A service received by mDNS is not a well-formed ctxsync announcement; it is ignored."""


def parse_service(info: ServiceInfo) -> tuple[NodeId, list[Address]]:
    """
    Read a resolved ctxsync service: who announced it and where it can be dialed.

    Args:
        info: A resolved service of type :data:`SERVICE_TYPE` (SRV, TXT and address records
            loaded), as :meth:`AsyncServiceInfo.async_request` leaves it.

    Returns:
        ``(node_id, addresses)``: the canonical node id from the TXT record, and the distinct
        usable ``(ip, port)`` pairs, IPv4 first, then IPv6, most recently announced first within
        each family; at most :data:`MAX_ADDRESSES`. Unspecified, multicast and link-local IPv6
        addresses (which need a scope id) are left out. May be our own node id: the caller
        filters it.

    Raises:
        InvalidAnnouncement: If the name is not ``<node id>._ctxsync._tcp.local.``, the TXT record
            has no valid ``id`` or names another node than the instance name, its ``v`` is not
            :data:`TXT_VERSION`, the port is not 1 to 65535, or no address is usable.
    """
    name = info.name
    suffix = "." + SERVICE_TYPE
    if len(name) > _MAX_NAME_CHARS or not name.lower().endswith(suffix):
        raise InvalidAnnouncement(f"not a {SERVICE_TYPE} service")
    properties = info.properties
    raw_id = properties.get(b"id")
    if raw_id is None or len(raw_id) > _MAX_ID_BYTES:
        raise InvalidAnnouncement("TXT record has no id")
    version = properties.get(b"v", TXT_VERSION.encode("ascii"))
    if version != TXT_VERSION.encode("ascii"):
        raise InvalidAnnouncement(f"unsupported announcement version {version!r}")
    try:
        node_id = parse_node_id(raw_id.decode("ascii"))
        instance_id = parse_node_id(name[: -len(suffix)])
    except (UnicodeDecodeError, CryptoError) as exc:
        raise InvalidAnnouncement(f"bad node id: {exc}") from exc
    if instance_id != node_id:
        raise InvalidAnnouncement("instance name and TXT id name different nodes")
    port = info.port
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidAnnouncement(f"bad port {port!r}")
    addresses: list[Address] = []
    for text in info.parsed_scoped_addresses():
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:  # not an IP address
            continue
        if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
            continue
        address = (str(ip), port)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidAnnouncement("no usable address")
    return node_id, addresses[:MAX_ADDRESSES]


def _interface_flags(name: str) -> int | None:
    """Return the ``IFF_*`` flags of a network interface, or ``None`` where they can't be read."""
    if not sys.platform.startswith("linux"):  # elsewhere: unknown, let zeroconf try
        return None
    import fcntl

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH22x", name.encode()[:15], 0)  # struct ifreq, 40 bytes
            flags: int = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
            return flags
    except (OSError, UnicodeError):
        return None


def scan_interfaces(interfaces: Sequence[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """
    Find which interface addresses mDNS can use: those of interfaces that are up with multicast on.

    Reads the interface list (``getifaddrs``) and flags (``SIOCGIFFLAGS``) of the calling thread's
    network namespace; sends nothing.

    Args:
        interfaces: IP addresses to check (IPv4 or IPv6), or ``None`` for every IPv4 address of
            every interface.

    Returns:
        ``(usable, problems)``: the usable addresses as text, each mapped to its interface's name,
        in the order given (``None``: sorted); and one line per address left out, e.g.
        ``"127.0.0.1: lo has multicast off"``.
    """
    owners: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                owners.setdefault(ipaddress.ip_address(text.split("%")[0]), adapter.name)
            except ValueError:
                continue
    if interfaces is None:
        candidates = [str(ip) for ip in sorted(a for a in owners if a.version == 4)]
    else:
        candidates = list(interfaces)
    usable: dict[str, str] = {}
    problems: list[str] = []
    for text in candidates:
        name = owners.get(ipaddress.ip_address(text.split("%")[0]))
        flags = None if name is None else _interface_flags(name)
        if name is None:
            problems.append(f"{text}: no interface has this address")
        elif flags is not None and not flags & _IFF_UP:
            problems.append(f"{text}: {name} is down")
        elif flags is not None and not flags & _IFF_MULTICAST:
            problems.append(f"{text}: {name} has multicast off")
        else:
            usable[text] = name
    return usable, problems


def _one_per_interface(usable: dict[str, str]) -> list[str]:
    """One address per interface and IP version: zeroconf joins the mDNS group once on each."""
    chosen: dict[tuple[str, int], str] = {}
    for text, name in usable.items():
        chosen.setdefault((name, ipaddress.ip_address(text.split("%")[0]).version), text)
    return list(chosen.values())


def announced_addresses(usable: Sequence[str]) -> list[str]:
    """
    Choose, among the addresses mDNS runs on, the ones to announce when none are configured.

    Args:
        usable: Addresses from :func:`scan_interfaces`.

    Returns:
        The IPv4 addresses except loopback (``127.0.0.0/8``), sorted; or the loopback ones when
        there is nothing else (a network namespace with only ``lo``), so that nodes on the same
        machine still find each other.
    """
    ips = sorted({ip for ip in map(ipaddress.ip_address, usable) if ip.version == 4}, key=int)
    outside = [ip for ip in ips if not ip.is_loopback]
    return [str(ip) for ip in outside or ips]


def _format(addresses: Sequence[Address]) -> list[str]:
    """``host:port`` strings for logs, with IPv6 hosts in brackets."""
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in addresses]


class Discovery:
    """
    Announce this node by mDNS and report the other ctxsync nodes on the LAN.

    Call :meth:`start` and later :meth:`stop` on the same running event loop; ``on_found`` is
    called on that loop. Zeroconf runs on that loop too (no thread of its own); its UDP sockets
    are bound to port 5353 with ``SO_REUSEPORT``, so several nodes (and Avahi) can share a machine.
    mDNS runs only on interfaces that are up with multicast on (:func:`scan_interfaces`); the
    scan is repeated every ``refresh_interval`` seconds, so that an interface that comes up or a
    new DHCP lease is used and announced.

    Args:
        node_id: This node's id, announced as the instance name and in the TXT record.
        port: TCP port of this node's sync listener, 1 to 65535.
        on_found: Called as ``on_found(peer_id, [(host, port), ...])`` each time a service of
            another node is added or updated with resolved addresses (see :func:`parse_service`
            for the list). Called for every ctxsync node seen, paired or not, never for our own
            id, possibly before :meth:`start` returns. Must not block; an exception it raises is
            logged and dropped.
        interfaces: IP addresses of the interfaces to use for mDNS (IPv4 and IPv6 allowed), or
            ``None`` for the IPv4 addresses of every interface.
        addresses: IP addresses to announce. ``None``: the usable ``interfaces`` given, or else
            :func:`announced_addresses` of the usable interfaces.
        refresh_interval: Seconds between two scans of the interfaces; ``None`` or 0: scan only
            at start.
        resolve_timeout: Seconds to wait for a service's records once it is seen.
        start_timeout: Seconds :meth:`start` may take, probing the name included (about 1.2 s
            normally).
        stop_timeout: Seconds :meth:`stop` may take, goodbye packets included (about 0.3 s
            normally); closing the sockets may take 0.5 s more if the goodbyes used it all.

    Raises:
        CryptoError: If ``node_id`` is not a node id.
        ValueError: If ``port`` is out of range or an interface or address is not an IP address.
    """

    def __init__(
        self,
        node_id: NodeId,
        port: int,
        *,
        on_found: Callable[[NodeId, list[Address]], None],
        interfaces: Sequence[str] | None = None,
        addresses: Sequence[str] | None = None,
        refresh_interval: float | None = 30.0,
        resolve_timeout: float = 3.0,
        start_timeout: float = 10.0,
        stop_timeout: float = 2.0,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be 1 to 65535, not {port!r}")
        for text in [*(interfaces or ()), *(addresses or ())]:
            ipaddress.ip_address(text)  # raises ValueError
        self.node_id: NodeId = parse_node_id(node_id)
        """This node's id, canonical."""
        self.port = port
        """TCP port announced in the SRV record."""
        self._on_found = on_found
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._fixed_addresses = list(addresses) if addresses is not None else None
        self._refresh_interval = refresh_interval
        self._resolve_timeout = resolve_timeout
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._name = f"{self.node_id}.{SERVICE_TYPE}"
        self._found: dict[NodeId, list[Address]] = {}
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._usable: list[str] = []
        self._announced: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._started = False
        self._closed = False
        self._quiet = False

    # -- public API -----------------------------------------------------------------------

    def addresses(self) -> dict[NodeId, list[Address]]:
        """
        Return the last known addresses of every other node seen, by node id.

        A node that sent a goodbye keeps its last addresses here. Returns a copy.
        """
        return {node_id: list(addrs) for node_id, addrs in self._found.items()}

    async def start(self, *, quiet: bool = False) -> None:
        """
        Open the mDNS sockets, start browsing, and register this node's service.

        ``quiet``: log a failure (``discovery.failed``, ``discovery.interface_unusable``) at
        DEBUG instead of ERROR and WARNING, for a caller that retries and has said so once.

        Returns once the instance name is probed (RFC 6762 section 8.1, about 1.2 s) and the
        first announcement is sent; two more follow in the background.

        Raises:
            DiscoveryError: If zeroconf cannot start (no interface with multicast, a socket
                error, an unknown interface address), another responder already announces this
                node id, or it takes more than ``start_timeout`` seconds. Everything opened is
                closed again before it is raised.
            InvalidState: If called twice.
        """
        if self._started:
            raise InvalidState("Discovery.start() may be called once")
        self._started = True
        self._quiet = quiet
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._start()
        except Exception as exc:
            await self._close()
            error = exc if isinstance(exc, DiscoveryError) else DiscoveryError(self._describe(exc))
            (log.debug if quiet else log.error)("discovery.failed", error=str(error))
            if error is exc:
                raise
            raise error from exc
        except BaseException:  # cancelled while starting
            await self._close()
            raise
        log.info(
            "discovery.started",
            port=self.port,
            interfaces=self._usable,
            addrs=self._announced,
        )

    async def stop(self) -> None:
        """
        Send goodbye packets for our service, stop browsing and close the sockets.

        Idempotent, and safe before :meth:`start` or after it failed. Takes about 0.3 s, at most
        ``stop_timeout`` + 0.5 seconds, and never raises; call it before the event loop closes.
        """
        if self._closed:
            return
        started = self._aiozc is not None
        await self._close()
        if started:
            log.info("discovery.stopped")

    # -- starting and stopping ------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"mDNS discovery did not start within {self._start_timeout} s"
        zeroconf = sys.modules.get("zeroconf")  # imported by _start, if it got that far
        if zeroconf is not None and isinstance(exc, zeroconf.NonUniqueNameException):
            return (
                f"another mDNS responder already announces node {short_id(self.node_id)}: "
                "is ctxsync already running with this identity?"
            )
        if isinstance(exc, OSError):
            return f"cannot open the mDNS sockets on {', '.join(self._usable)}: {exc.strerror or exc}"
        return f"cannot start mDNS discovery: {type(exc).__name__}: {exc}"

    async def _start(self) -> None:
        # Checked here, not left to zeroconf: it would open sockets on interfaces without
        # multicast that never hear anything, and leaks its listen socket when it raises.
        usable, problems = scan_interfaces(self._interfaces)
        for problem in problems:
            (log.debug if self._quiet else log.warning)("discovery.interface_unusable", reason=problem)
        if not usable:
            reasons = "; ".join(problems) or "no interface has an IPv4 address"
            raise DiscoveryError(f"no interface is up with multicast on for mDNS: {reasons}")
        self._usable = list(usable)
        # Imported only now: zeroconf adds about 3.4 MiB to the daemon's RSS, for nothing on a
        # machine (or a listen address) where mDNS cannot run.
        from zeroconf import Zeroconf
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        zc = Zeroconf(interfaces=_one_per_interface(usable), use_asyncio=True)  # this loop: no thread
        self._aiozc = AsyncZeroconf(zc=zc)
        await zc.async_wait_for_start()
        if not zc.engine.senders:
            raise DiscoveryError(f"zeroconf could not use any of {', '.join(self._usable)}")
        self._browser = AsyncServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_state_change])
        self._announced = self._addresses_to_announce(self._usable)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self.port,
            properties={"id": self.node_id, "v": TXT_VERSION},
            server=f"{self.node_id}.local.",
            parsed_addresses=self._announced,
        )
        announcing = await self._aiozc.async_register_service(self._info, allow_name_change=False)
        self._registered = True
        self._track(asyncio.ensure_future(announcing))
        if self._refresh_interval:
            self._track(asyncio.create_task(self._refresh_loop(self._refresh_interval)))

    def _addresses_to_announce(self, usable: list[str]) -> list[str]:
        if self._fixed_addresses is not None:
            return list(self._fixed_addresses)
        if self._interfaces is not None:
            return list(usable)
        return announced_addresses(usable)

    def _track(self, task: asyncio.Future[Any]) -> None:
        assert isinstance(task, asyncio.Task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self) -> None:
        """Cancel our tasks, send goodbyes and close zeroconf, in about ``stop_timeout`` seconds."""
        self._closed = True
        tasks = [*self._tasks, *self._resolving.values()]
        for task in tasks:
            task.cancel()
        aiozc, browser, info = self._aiozc, self._browser, self._info
        self._aiozc = self._browser = self._info = None
        registered, self._registered = self._registered, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_timeout
        try:
            async with asyncio.timeout_at(deadline):
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                if browser is not None:
                    await browser.async_cancel()
                if aiozc is not None and info is not None and registered:
                    await (await aiozc.async_unregister_service(info))  # 3 goodbyes, 125 ms apart
        except TimeoutError:
            log.warning("discovery.stop_timeout", timeout_s=self._stop_timeout, step="goodbye")
        except Exception as exc:  # closing must not fail the daemon's shutdown
            log.warning("discovery.stop_failed", error=f"{type(exc).__name__}: {exc}", step="goodbye")
        if aiozc is None:
            return
        try:  # whatever happened above, close the sockets
            async with asyncio.timeout_at(max(deadline, loop.time() + _MIN_CLOSE_S)):
                await aiozc.async_close()
        except TimeoutError:
            log.warning("discovery.stop_timeout", timeout_s=self._stop_timeout, step="close")
        except Exception as exc:
            log.warning("discovery.stop_failed", error=f"{type(exc).__name__}: {exc}", step="close")

    async def _refresh_loop(self, interval: float) -> None:
        """Follow changes of the interfaces: one coming up, a new DHCP lease."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh()
            except Exception as exc:
                log.warning("discovery.refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def _refresh(self) -> None:
        usable, problems = scan_interfaces(self._interfaces)
        aiozc, info = self._aiozc, self._info
        if list(usable) == self._usable or aiozc is None or info is None:
            return
        if not usable:  # keep what we have until an interface comes back
            log.debug("discovery.no_interface", reasons=problems)
            return
        self._usable = list(usable)
        # Leaves the group on interfaces gone, joins it on new ones and re-announces there.
        await aiozc.async_update_interfaces(interfaces=_one_per_interface(usable))
        announced = self._addresses_to_announce(self._usable)
        if announced != self._announced:
            self._announced = announced
            info.addresses = announced
            self._track(asyncio.ensure_future(await aiozc.async_update_service(info)))
        log.info("discovery.readdressed", interfaces=self._usable, addrs=self._announced)

    # -- receiving ------------------------------------------------------------------------

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser handler, called by zeroconf on the loop: schedule a resolution, never raise."""
        try:
            from zeroconf import ServiceStateChange  # loaded since _start

            if self._closed or service_type != SERVICE_TYPE or len(name) > _MAX_NAME_CHARS:
                return
            if name.lower() == self._name.lower():
                return  # our own service, heard back
            if state_change is ServiceStateChange.Removed:
                log.debug("discovery.goodbye", name=name)
                return
            if name in self._resolving:
                self._again.add(name)  # resolve again once the current one is done
                return
            if len(self._resolving) >= MAX_RESOLVING:
                log.debug("discovery.ignored", name=name, reason="too many services resolving")
                return
            self._resolving[name] = asyncio.create_task(self._resolve(zeroconf, name))
        except Exception as exc:
            log.debug("discovery.handler_failed", name=name[:_MAX_NAME_CHARS], error=repr(exc))

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        """Load a service's SRV, TXT and address records (from the cache or by asking), then accept it."""
        try:
            from zeroconf.asyncio import AsyncServiceInfo  # loaded since _start

            while True:
                self._again.discard(name)
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if await info.async_request(zeroconf, int(self._resolve_timeout * 1000)):
                    self._accept(info)
                else:
                    log.debug("discovery.unresolved", name=name, timeout_s=self._resolve_timeout)
                if name not in self._again or self._closed:
                    return
        except Exception as exc:
            log.debug("discovery.resolve_failed", name=name, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._resolving.pop(name, None)
            self._again.discard(name)

    def _accept(self, info: ServiceInfo) -> None:
        """Validate a resolved service, remember its addresses and call ``on_found``."""
        try:
            peer_id, addrs = parse_service(info)
        except InvalidAnnouncement as exc:
            log.debug("discovery.ignored", name=info.name[:_MAX_NAME_CHARS], reason=str(exc))
            return
        if peer_id == self.node_id:
            return
        previous = self._found.pop(peer_id, None)
        if previous is None and len(self._found) >= MAX_NODES:
            self._found.pop(next(iter(self._found)))
        self._found[peer_id] = addrs
        if previous is None or set(previous) != set(addrs):
            log.info("discovery.found", peer_id=peer_id, addrs=_format(addrs))
        else:
            log.debug("discovery.refreshed", peer_id=peer_id, addrs=_format(addrs))
        try:
            self._on_found(peer_id, list(addrs))
        except Exception as exc:
            log.error("discovery.callback_failed", peer_id=peer_id, error=f"{type(exc).__name__}: {exc}")
