"""
Tests for ctxsync.discovery: parsing received announcements, and real mDNS between nodes.

Network rule: mDNS traffic stays inside a network namespace that the test creates and deletes,
with only ``lo`` in it (multicast turned on there); the host's interfaces are never used. The
nodes run either in this process, in a thread that entered the namespace (``setns`` is per
thread), or as separate processes under ``ip netns exec``. Those tests need root and ``ip``, and
are skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from zeroconf import ServiceInfo

from ctxsync import discovery
from ctxsync.crypto import generate_identity
from ctxsync.discovery import (
    SERVICE_TYPE,
    Discovery,
    DiscoveryError,
    InvalidAnnouncement,
    announced_addresses,
    parse_service,
    scan_interfaces,
)
from ctxsync.errors import CryptoError, InvalidState
from ctxsync.types import NodeId

from tests.helpers import MS, wait_until, wait_until_sync

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SYNCTHING_ID = NodeId("P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2")
ID_A = generate_identity("a").node_id
ID_B = generate_identity("b").node_id
FOUND_S = 8000 * MS
"""How long two nodes may take to find each other: probing takes ~1.2 s, then one packet."""


def service(
    node_id: str = SYNCTHING_ID,
    *,
    name: str | None = None,
    port: int | None = 7000,
    properties: dict[str, str | None] | None = None,
    addresses: list[str] | None = None,
) -> ServiceInfo:
    """A resolved service as zeroconf hands it over, by default a valid ctxsync announcement."""
    return ServiceInfo(
        SERVICE_TYPE,
        name if name is not None else f"{node_id}.{SERVICE_TYPE}",
        port=port,
        properties=properties if properties is not None else {"id": node_id, "v": "1"},
        server=f"{node_id}.local.",
        parsed_addresses=addresses if addresses is not None else ["192.0.2.7"],
    )


Found = tuple[NodeId, list[tuple[str, int]]]
OnFound = Callable[[NodeId, list[tuple[str, int]]], None]


def recorder() -> tuple[list[Found], OnFound]:
    """A list of on_found calls and the callback that fills it."""
    calls: list[Found] = []

    def on_found(peer_id: NodeId, addrs: list[tuple[str, int]]) -> None:
        calls.append((peer_id, addrs))

    return calls, on_found


# -- parsing received announcements: no network ------------------------------------------


def test_parse_service_reads_id_port_and_addresses() -> None:
    """Returns the node id and each address with the SRV port, IPv4 first."""
    info = service(addresses=["2001:db8::5", "192.0.2.7", "198.51.100.1"])
    node_id, addrs = parse_service(info)
    assert node_id == SYNCTHING_ID
    assert addrs[-1] == ("2001:db8::5", 7000)
    assert sorted(addrs[:2]) == [("192.0.2.7", 7000), ("198.51.100.1", 7000)]


def test_parse_service_canonicalizes_the_node_id() -> None:
    """A lower-case id in the TXT record and instance name gives the canonical upper-case id."""
    lower = SYNCTHING_ID.lower()
    assert parse_service(service(lower))[0] == SYNCTHING_ID


def test_parse_service_accepts_a_missing_version() -> None:
    """A TXT record with only ``id`` is read as version 1."""
    assert parse_service(service(properties={"id": SYNCTHING_ID}))[0] == SYNCTHING_ID


def test_parse_service_drops_unusable_addresses() -> None:
    """Unspecified, multicast and link-local IPv6 addresses are left out; duplicates too."""
    info = service(addresses=["0.0.0.0", "224.0.0.251", "fe80::1", "192.0.2.7", "::"])
    assert parse_service(info)[1] == [("192.0.2.7", 7000)]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"properties": {}}, "no id"),
        ({"properties": {"v": "1"}}, "no id"),
        ({"properties": {"id": None}}, "no id"),
        ({"properties": {"id": "x" * 200}}, "no id"),
        ({"properties": {"id": "not-a-node-id"}}, "bad node id"),
        ({"properties": {"id": SYNCTHING_ID[:-1] + "3"}}, "bad node id"),
        ({"properties": {"id": SYNCTHING_ID, "v": "2"}}, "version"),
        ({"properties": {"id": ID_A}}, "different nodes"),
        ({"name": f"printer.{SERVICE_TYPE}"}, "bad node id"),
        ({"port": 0}, "bad port"),
        ({"port": None}, "bad port"),
        ({"addresses": []}, "no usable address"),
        ({"addresses": ["fe80::1", "0.0.0.0"]}, "no usable address"),
    ],
)
def test_parse_service_rejects_malformed_announcements(kwargs: dict[str, Any], reason: str) -> None:
    """Every malformed TXT record, name, port or address list raises InvalidAnnouncement."""
    with pytest.raises(InvalidAnnouncement, match=reason):
        parse_service(service(**kwargs))


def test_parse_service_rejects_non_ascii_id() -> None:
    """A TXT id that is not ASCII is refused, not decoded."""
    raw_txt = b"\x09id=\xff\xfe\xfd\xfc\xfb\xfa"  # one string of 9 bytes, as received
    with pytest.raises(InvalidAnnouncement, match="bad node id"):
        parse_service(service(properties=raw_txt))  # type: ignore[arg-type]


def test_parse_service_rejects_another_service_type() -> None:
    """A service of another type is refused, even with a valid TXT record."""
    info = ServiceInfo(
        "_other._tcp.local.",
        f"{SYNCTHING_ID}._other._tcp.local.",
        port=7000,
        properties={"id": SYNCTHING_ID},
        parsed_addresses=["192.0.2.7"],
    )
    with pytest.raises(InvalidAnnouncement, match="not a _ctxsync._tcp.local. service"):
        parse_service(info)


def test_accept_ignores_malformed_services_with_a_debug_log() -> None:
    """A malformed service calls nothing and logs ``discovery.ignored`` at DEBUG."""
    calls, on_found = recorder()
    d = Discovery(ID_A, 7000, on_found=on_found)
    with structlog.testing.capture_logs() as logs:
        d._accept(service(properties={"id": "garbage"}))
        d._accept(service(port=0))
    assert calls == []
    assert d.addresses() == {}
    assert [(e["event"], e["log_level"]) for e in logs] == [("discovery.ignored", "debug")] * 2
    assert "bad node id" in logs[0]["reason"] and "bad port" in logs[1]["reason"]


def test_accept_ignores_our_own_id() -> None:
    """Our own announcement, heard back, is not reported."""
    calls, on_found = recorder()
    d = Discovery(SYNCTHING_ID, 7000, on_found=on_found)
    with structlog.testing.capture_logs() as logs:
        d._accept(service(SYNCTHING_ID))
    assert calls == [] and d.addresses() == {} and logs == []


def test_accept_logs_found_only_when_the_addresses_change() -> None:
    """on_found is called for every update; ``discovery.found`` is logged at INFO only on a change."""
    calls, on_found = recorder()
    d = Discovery(ID_A, 7000, on_found=on_found)
    with structlog.testing.capture_logs() as logs:
        d._accept(service(addresses=["192.0.2.7", "192.0.2.8"]))
        d._accept(service(addresses=["192.0.2.8", "192.0.2.7"]))  # same set
        d._accept(service(addresses=["192.0.2.9"]))
        d._accept(service(addresses=["192.0.2.9"], port=7001))
    assert len(calls) == 4 and all(peer == SYNCTHING_ID for peer, _ in calls)
    assert calls[-1][1] == [("192.0.2.9", 7001)]
    found = [e for e in logs if e["event"] == "discovery.found"]
    assert [e["log_level"] for e in found] == ["info"] * 3
    assert found[0]["peer_id"] == SYNCTHING_ID
    assert sorted(found[0]["addrs"]) == ["192.0.2.7:7000", "192.0.2.8:7000"]
    assert found[2]["addrs"] == ["192.0.2.9:7001"]
    assert d.addresses() == {SYNCTHING_ID: [("192.0.2.9", 7001)]}


def test_addresses_returns_a_copy() -> None:
    """Changing what addresses() returned changes nothing inside."""
    d = Discovery(ID_A, 7000, on_found=lambda peer, addrs: addrs.clear())
    d._accept(service())
    d.addresses()[SYNCTHING_ID].clear()
    assert d.addresses() == {SYNCTHING_ID: [("192.0.2.7", 7000)]}


def test_accept_survives_a_failing_callback() -> None:
    """An exception from on_found is logged as ``discovery.callback_failed``, not raised."""

    def on_found(peer_id: NodeId, addrs: list[tuple[str, int]]) -> None:
        raise RuntimeError("boom")

    d = Discovery(ID_A, 7000, on_found=on_found)
    with structlog.testing.capture_logs() as logs:
        d._accept(service())
    failed = [e for e in logs if e["event"] == "discovery.callback_failed"]
    assert failed and "boom" in failed[0]["error"] and failed[0]["log_level"] == "error"


def test_accept_forgets_the_oldest_node_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_NODES node ids are remembered; the oldest goes first."""
    monkeypatch.setattr(discovery, "MAX_NODES", 2)
    d = Discovery(ID_A, 7000, on_found=lambda peer, addrs: None)
    ids = [generate_identity(f"n{i}").node_id for i in range(3)]
    for node_id in ids:
        d._accept(service(node_id))
    assert list(d.addresses()) == ids[1:]


async def test_state_change_handler_never_raises() -> None:
    """The browser handler ignores our own name, goodbyes and over-long names without raising."""
    from zeroconf import ServiceStateChange

    d = Discovery(ID_A, 7000, on_found=lambda peer, addrs: None)
    zc: Any = None  # never used on these paths
    d._on_state_change(zc, SERVICE_TYPE, f"{ID_A}.{SERVICE_TYPE}", ServiceStateChange.Added)
    d._on_state_change(zc, SERVICE_TYPE, f"{ID_B}.{SERVICE_TYPE}", ServiceStateChange.Removed)
    d._on_state_change(zc, SERVICE_TYPE, "x" * 1000 + "." + SERVICE_TYPE, ServiceStateChange.Added)
    d._on_state_change(zc, "_other._tcp.local.", f"{ID_B}._other._tcp.local.", ServiceStateChange.Added)
    assert d._resolving == {}


def test_constructor_checks_its_arguments() -> None:
    """A bad port, node id or interface address is refused at once."""
    noop: OnFound = lambda peer, addrs: None  # noqa: E731
    for port in (0, 65536, True):
        with pytest.raises(ValueError, match="port"):
            Discovery(ID_A, port, on_found=noop)
    with pytest.raises(CryptoError):
        Discovery(NodeId("nope"), 7000, on_found=noop)
    with pytest.raises(ValueError):
        Discovery(ID_A, 7000, on_found=noop, interfaces=["eth0"])
    assert Discovery(NodeId(ID_A.lower()), 7000, on_found=noop).node_id == ID_A


async def test_stop_before_start_is_a_quick_no_op() -> None:
    """stop() without start() returns at once, any number of times."""
    d = Discovery(ID_A, 7000, on_found=lambda peer, addrs: None)
    started = time.monotonic()
    await d.stop()
    await d.stop()
    assert time.monotonic() - started < 100 * MS


def test_announced_addresses_prefers_non_loopback_ipv4() -> None:
    """Loopback is announced only when there is nothing else; IPv6 is not announced by default."""
    assert announced_addresses(["127.0.0.1", "192.0.2.9", "192.0.2.10", "2001:db8::1"]) == [
        "192.0.2.9",
        "192.0.2.10",
    ]
    assert announced_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    assert announced_addresses([]) == []


def test_zeroconf_is_not_imported_until_an_interface_is_usable() -> None:
    """
    The daemon and a start that finds no usable interface leave zeroconf unimported (about 3.4
    MiB of RSS). A fresh interpreter, since this one imported zeroconf for the tests above.
    The interface is an address no interface has: start() fails before any socket is opened.
    """
    script = (
        "import asyncio, sys\n"
        "import ctxsync.daemon, ctxsync.discovery as d\n"
        "before = 'zeroconf' in sys.modules\n"
        f"n = d.Discovery({ID_A!r}, 7001, on_found=lambda p, a: None, interfaces=['192.0.2.1'])\n"
        "try:\n"
        "    asyncio.run(n.start())\n"
        "except d.DiscoveryError as exc:\n"
        "    print('refused:', exc)\n"
        "print(before, 'zeroconf' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.splitlines()  # structlog's default output (discovery.failed) comes first
    refused = [line for line in lines if line.startswith("refused:")]
    assert len(refused) == 1 and "192.0.2.1: no interface has this address" in refused[0]
    assert lines[-1] == "False False"


def test_scan_interfaces_reports_an_unknown_address() -> None:
    """An interface address that no interface has is left out with a reason (reads only)."""
    usable, problems = scan_interfaces(["203.0.113.77"])
    assert usable == {}
    assert problems == ["203.0.113.77: no interface has this address"]


# -- real mDNS inside a network namespace ------------------------------------------------

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


@pytest.fixture
def make_netns() -> Iterator[Callable[..., str]]:
    """Create network namespaces with only ``lo`` (up); delete them after the test."""
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2) to create a network namespace")
    created: list[str] = []

    def make(*, multicast: bool = True) -> str:
        name = f"ctxsync-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        result = _ip("netns", "add", name)
        if result.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {result.stderr.strip()}")
        created.append(name)
        steps = [["link", "set", "lo", "up", "multicast", "on" if multicast else "off"]]
        if multicast:
            steps.append(["route", "add", "224.0.0.0/4", "dev", "lo"])
        for step in steps:
            result = _ip("-n", name, *step)
            assert result.returncode == 0, f"ip -n {name} {' '.join(step)}: {result.stderr}"
        return name

    try:
        yield make
    finally:
        for name in created:
            _ip("netns", "delete", name)
        assert not any((NETNS_DIR / name).exists() for name in created)


def _enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


def run_in_netns(name: str, main: Callable[[], Awaitable[T]], timeout: float) -> T:
    """
    Run ``main()`` on a new event loop in a thread inside network namespace ``name``.

    Returns what it returns and raises what it raises; fails if it takes over ``timeout``
    seconds. Every socket it opens (zeroconf's included) belongs to the namespace.
    """
    outcome: dict[str, Any] = {}

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    def target() -> None:
        try:
            _enter_netns(name)
        except OSError as exc:
            outcome["skip"] = f"cannot enter the network namespace: {exc}"
            return
        try:
            outcome["value"] = asyncio.run(bounded())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout + 10)
    assert not thread.is_alive(), f"still running after {timeout + 10:.1f} s"
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def test_two_nodes_find_each_other(make_netns: Callable[..., str]) -> None:
    """Two nodes with no address configured learn each other's node id, address and port."""
    ns = make_netns()
    calls_a, on_found_a = recorder()
    calls_b, on_found_b = recorder()

    async def main() -> tuple[float, float]:
        a = Discovery(ID_A, 7001, on_found=on_found_a)  # every interface
        b = Discovery(ID_B, 7002, on_found=on_found_b, interfaces=["127.0.0.1"])
        try:
            await asyncio.gather(a.start(), b.start())
            await wait_until(lambda: ID_B in a.addresses() and ID_A in b.addresses(), FOUND_S)
            assert a.addresses() == {ID_B: [("127.0.0.1", 7002)]}
            assert b.addresses() == {ID_A: [("127.0.0.1", 7001)]}
        finally:
            started = time.monotonic()
            await a.stop()
            stop_s = time.monotonic() - started
            await b.stop()
            started = time.monotonic()
            await a.stop()
            again_s = time.monotonic() - started
        return stop_s, again_s

    with structlog.testing.capture_logs() as logs:
        stop_s, again_s = run_in_netns(ns, main, 20 * FOUND_S)
    assert calls_a[0] == (ID_B, [("127.0.0.1", 7002)])
    assert calls_b[0] == (ID_A, [("127.0.0.1", 7001)])
    assert {peer for peer, _ in calls_a + calls_b} == {ID_A, ID_B}  # never our own id
    assert stop_s < 1500 * MS and again_s < 50 * MS
    started = [e for e in logs if e["event"] == "discovery.started"]
    assert sorted(e["port"] for e in started) == [7001, 7002]
    assert all(e["interfaces"] == ["127.0.0.1"] and e["log_level"] == "info" for e in started)
    found = {e["peer_id"]: e["addrs"] for e in logs if e["event"] == "discovery.found"}
    assert found == {ID_A: ["127.0.0.1:7001"], ID_B: ["127.0.0.1:7002"]}
    assert [e["event"] for e in logs].count("discovery.stopped") == 2
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


def test_stop_is_bounded_by_its_timeout(make_netns: Callable[..., str]) -> None:
    """A stop() whose goodbyes overrun stop_timeout gives up on them but still closes the sockets."""
    ns = make_netns()

    async def main() -> float:
        d = Discovery(ID_A, 7001, on_found=lambda peer, addrs: None, stop_timeout=0.01)
        await d.start()
        started = time.monotonic()
        await d.stop()
        return time.monotonic() - started

    with structlog.testing.capture_logs() as logs:
        stop_s = run_in_netns(ns, main, 20 * FOUND_S)
    assert stop_s < 0.01 + 500 * MS + 200 * MS
    timeouts = [e for e in logs if e["event"] == "discovery.stop_timeout"]
    assert [e["step"] for e in timeouts] == ["goodbye"]
    assert "discovery.stopped" in [e["event"] for e in logs]


def test_a_moved_node_is_found_at_its_new_port(make_netns: Callable[..., str]) -> None:
    """After a node says goodbye and comes back on another port, its peer learns the new port."""
    ns = make_netns()
    calls, on_found = recorder()

    async def main() -> None:
        a = Discovery(ID_A, 7001, on_found=on_found)
        b = Discovery(ID_B, 7002, on_found=lambda peer, addrs: None)
        b2 = Discovery(ID_B, 7003, on_found=lambda peer, addrs: None)
        try:
            await asyncio.gather(a.start(), b.start())
            await wait_until(lambda: ID_B in a.addresses(), FOUND_S)
            await b.stop()
            await b2.start()
            await wait_until(lambda: a.addresses().get(ID_B) == [("127.0.0.1", 7003)], FOUND_S)
        finally:
            await asyncio.gather(a.stop(), b.stop(), b2.stop())

    with structlog.testing.capture_logs() as logs:
        run_in_netns(ns, main, 20 * FOUND_S)
    assert calls[0] == (ID_B, [("127.0.0.1", 7002)])
    assert calls[-1] == (ID_B, [("127.0.0.1", 7003)])
    assert "discovery.goodbye" in [e["event"] for e in logs]
    found = [e["addrs"] for e in logs if e["event"] == "discovery.found"]
    assert found[-1] == ["127.0.0.1:7003"] and ["127.0.0.1:7002"] in found


def test_start_fails_clearly_without_multicast(make_netns: Callable[..., str]) -> None:
    """With multicast off on every interface, start() raises DiscoveryError and sends nothing."""
    ns = make_netns(multicast=False)

    async def main() -> list[str]:
        errors = []
        for interfaces in (None, ["127.0.0.1"]):
            d = Discovery(ID_A, 7001, on_found=lambda peer, addrs: None, interfaces=interfaces)
            with pytest.raises(DiscoveryError, match="multicast") as info:
                await d.start()
            errors.append(str(info.value))
            await d.stop()
            with pytest.raises(InvalidState):
                await d.start()
        return errors

    with structlog.testing.capture_logs() as logs:
        errors = run_in_netns(ns, main, 20 * FOUND_S)
    assert all("lo has multicast off" in e for e in errors)
    failed = [e for e in logs if e["event"] == "discovery.failed"]
    assert [e["error"] for e in failed] == errors
    assert "discovery.started" not in [e["event"] for e in logs]


def test_start_fails_when_the_node_id_is_already_announced(make_netns: Callable[..., str]) -> None:
    """A second node with the same id is refused: the same identity must not run twice."""
    ns = make_netns()

    async def main() -> None:
        first = Discovery(ID_A, 7001, on_found=lambda peer, addrs: None)
        second = Discovery(ID_A, 7002, on_found=lambda peer, addrs: None)
        try:
            await first.start()
            with pytest.raises(DiscoveryError, match="already running with this identity"):
                await second.start()
        finally:
            await asyncio.gather(first.stop(), second.stop())

    run_in_netns(ns, main, 20 * FOUND_S)


def test_start_fails_clearly_on_an_unknown_interface(make_netns: Callable[..., str]) -> None:
    """An interface address that no interface has makes start() raise DiscoveryError."""
    ns = make_netns()

    async def main() -> None:
        d = Discovery(ID_A, 7001, on_found=lambda peer, addrs: None, interfaces=["192.0.2.1"])
        with pytest.raises(DiscoveryError, match="192.0.2.1: no interface has this address"):
            await d.start()

    run_in_netns(ns, main, 20 * FOUND_S)


# A discovery node as its own process: prints one JSON line per event, stops when stdin closes.
NODE_SCRIPT = r"""
import asyncio, json, sys
import structlog
from ctxsync.discovery import Discovery

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    node = Discovery(sys.argv[1], int(sys.argv[2]), on_found=lambda peer, addrs: say(peer=peer, addrs=addrs))
    await node.start()
    say(started=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await node.stop()
    say(stopped=True)

asyncio.run(main())
"""


class NodeProcess:
    """One discovery node run by ``ip netns exec``; its JSON lines are collected by a thread."""

    def __init__(self, ns: str, node_id: str, port: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-W", "error", "-c", NODE_SCRIPT, node_id, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def found(self, node_id: str) -> list[list[Any]] | None:
        """Addresses last reported for ``node_id``, as JSON lists, or None."""
        reports = [line["addrs"] for line in self.lines if line.get("peer") == node_id]
        return reports[-1] if reports else None

    def stop(self, timeout: float) -> int:
        """Close stdin (the node stops), wait for the exit, and return the exit code."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout)
            for thread in self._threads:
                thread.join(timeout)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        return code


def test_two_processes_find_each_other(make_netns: Callable[..., str]) -> None:
    """Two node processes on one machine share the mDNS port and find each other."""
    ns = make_netns()
    a = NodeProcess(ns, ID_A, 7001)
    b = NodeProcess(ns, ID_B, 7002)
    try:
        wait_until_sync(lambda: a.found(ID_B) is not None and b.found(ID_A) is not None, FOUND_S)
        assert a.found(ID_B) == [["127.0.0.1", 7002]]
        assert b.found(ID_A) == [["127.0.0.1", 7001]]
    finally:
        codes = [a.stop(FOUND_S), b.stop(FOUND_S)]
    assert codes == [0, 0], a.stderr + b.stderr
    for node in (a, b):
        assert {"started": True} in node.lines and node.lines[-1] == {"stopped": True}
        assert "Traceback" not in node.stderr and "Warning" not in node.stderr, node.stderr


def test_a_new_address_is_announced(make_netns: Callable[..., str]) -> None:
    """When a node's machine gets a new address, its peer learns it without a restart."""
    ns = make_netns()

    async def main() -> None:
        a = Discovery(ID_A, 7001, on_found=lambda peer, addrs: None, refresh_interval=50 * MS)
        b = Discovery(ID_B, 7002, on_found=lambda peer, addrs: None)
        try:
            await asyncio.gather(a.start(), b.start())
            await wait_until(lambda: b.addresses().get(ID_A) == [("127.0.0.1", 7001)], FOUND_S)
            result = await asyncio.to_thread(_ip, "-n", ns, "addr", "add", "127.0.0.2/8", "dev", "lo")
            assert result.returncode == 0, result.stderr
            want = {("127.0.0.1", 7001), ("127.0.0.2", 7001)}
            await wait_until(lambda: set(b.addresses().get(ID_A, [])) == want, FOUND_S)
        finally:
            await asyncio.gather(a.stop(), b.stop())

    with structlog.testing.capture_logs() as logs:
        run_in_netns(ns, main, 20 * FOUND_S)
    readdressed = [e for e in logs if e["event"] == "discovery.readdressed"]
    assert readdressed and readdressed[0]["addrs"] == ["127.0.0.1", "127.0.0.2"]
