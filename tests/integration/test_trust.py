"""
Trust between nodes, through the CLI and real daemons: invite/join pairing and each way it
fails, per-context sharing (a context not shared never reaches a peer, not even its name),
read-only peers and contexts, revocation, file permissions, encryption at rest.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from ctxsync.client import SyncClient
from ctxsync.pairing import TOKEN_PREFIX, decode_token, encode_token
from tests.integration.nodes import Node, wait_for

MakeNode = Callable[..., Node]


def invite(node: Node, *args: str) -> str:
    """``ctxsync invite --addr 127.0.0.1 ARGS`` on a running node; return the token."""
    cp = node.cli("invite", "--addr", "127.0.0.1", *args)
    token = cp.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and "ctxsync join" in cp.stderr
    return token


def peers_of(node: Node) -> dict[str, dict[str, object]]:
    return {p["node_id"]: p for p in json.loads(node.cli("peer", "list", "--json").stdout)}


def denied(node: Node, reason: str) -> list[dict[str, object]]:
    return [e for e in node.events("peer.denied") if e.get("reason") == reason]


def test_invite_join_pairs_both_sides(make_node: MakeNode) -> None:
    """`invite` on A and `join TOKEN` on B pair both sides, which then sync, with no other step."""
    a, b = make_node("a"), make_node("b")
    a.start()
    b.start()
    token = invite(a, "--contexts", "notes,plans", "--ttl-s", "60")
    assert len(token) < 120  # one short line
    joined = b.cli("join", token)
    assert "paired with a" in joined.stderr and "notes, plans" in joined.stderr
    assert peers_of(b)[a.node_id]["contexts"] == ["notes", "plans"]
    wait_for(lambda: b.node_id in peers_of(a))
    assert peers_of(a)[b.node_id]["contexts"] == ["notes", "plans"]
    assert peers_of(a)[b.node_id]["read_only"] is False
    wait_for(lambda: a.connected_to(b) and b.connected_to(a))
    a.cli("set", "notes", "from-a", "1")
    b.cli("set", "plans", "from-b", "2")
    wait_for(lambda: b.get("notes", "from-a") == 1 and a.get("plans", "from-b") == 2)
    (ev,) = a.events("pairing.joined")
    assert ev["peer_id"] == b.node_id and ev["contexts"] == ["notes", "plans"]
    # The secret never appears in either log.
    secret = decode_token(token).secret.hex()
    assert secret not in a.log_path.read_text() and secret not in b.log_path.read_text()


def test_invite_failures_are_clear(make_node: MakeNode) -> None:
    """A token reused, expired, with a wrong secret, for the wrong node or mangled fails, saying why."""
    a, b, c, d = make_node("a"), make_node("b"), make_node("c"), make_node("d")
    a.start()
    d.start()
    # Reused: the second join with the same token is refused.
    token = invite(a)
    b.cli("join", token)
    again = c.cli("join", token, check=False)
    assert again.returncode == 1 and "already used" in again.stderr
    assert c.node_id not in peers_of(a) and peers_of(c) == {}
    # Expired.
    short = invite(a, "--ttl-s", "1")
    expires = datetime.fromisoformat(a.events("pairing.invited")[-1]["timestamp"].replace("Z", "+00:00"))
    wait_for(lambda: datetime.now(expires.tzinfo).timestamp() > expires.timestamp() + 1.2)
    late = c.cli("join", short, check=False)
    assert late.returncode == 1 and "expired" in late.stderr
    # Wrong secret: the token's secret altered.
    good = decode_token(invite(a))
    forged = encode_token(type(good)(good.fingerprint, good.invite_id, bytes(16), good.host, good.port))
    wrong = c.cli("join", forged, check=False)
    assert wrong.returncode == 1 and "wrong secret" in wrong.stderr
    # Wrong fingerprint / wrong node: D's invite, pointed at A's pairing listener.
    other = decode_token(invite(d))
    misdirected = encode_token(type(other)(other.fingerprint, other.invite_id, other.secret, good.host, good.port))
    mis = c.cli("join", misdirected, check=False)
    assert mis.returncode == 1 and "not the one that made this invite" in mis.stderr and "nothing was sent" in mis.stderr
    # Mangled and foreign tokens.
    for bad in ("hello", TOKEN_PREFIX + "!!!", TOKEN_PREFIX + base64.urlsafe_b64encode(b"x" * 10).decode()):
        cp = c.cli("join", bad, check=False)
        assert cp.returncode == 1 and ("invite token" in cp.stderr or "not an invite" in cp.stderr), cp.stderr
    # Nothing was paired by any failed attempt, and the one good token still works.
    assert set(peers_of(a)) == {b.node_id} and peers_of(c) == {}
    c.cli("join", encode_token(good))
    wait_for(lambda: c.node_id in peers_of(a))
    reasons = [e["reason"] for e in a.events("pairing.refused")]
    assert {"used", "expired", "wrong_secret"} <= set(reasons)


def test_pairing_listener_on_the_configured_port(make_node: MakeNode) -> None:
    """
    ``[pairing] port``: invites are served on that port (a firewall can let it through); a port
    already taken fails the invite with a message naming it, and the daemon runs on.
    """
    import socket

    from tests.integration.nodes import free_ports

    a, b, c = make_node("a"), make_node("b"), make_node("c")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = free_ports(1)[0]
        for node, configured in ((a, port), (c, taken.getsockname()[1])):
            cfg = node.home / "config.toml"
            text = cfg.read_text()
            assert "[pairing]\nport = 0\n" in text  # init writes the default
            cfg.write_text(text.replace("[pairing]\nport = 0\n", f"[pairing]\nport = {configured}\n"))
            node.start()
        token = decode_token(invite(a))
        assert token.port == port
        assert decode_token(invite(a)).port == token.port  # the listener stays on it
        b.start()
        b.cli("join", encode_token(token))
        wait_for(lambda: b.node_id in peers_of(a))
        busy = c.cli("invite", "--addr", "127.0.0.1", check=False)
        assert busy.returncode == 1 and f"cannot open the pairing listener on 127.0.0.1:{taken.getsockname()[1]}" in busy.stderr
        assert c.status()["node_id"] == c.node_id  # still running
    finally:
        taken.close()


def test_join_without_running_inviter_fails_clearly(make_node: MakeNode) -> None:
    """Joining when the inviter is down says it cannot reach it; invite needs the daemon."""
    a, b = make_node("a"), make_node("b")
    a.start()
    token = invite(a)
    a.stop()
    cp = b.cli("join", token, check=False)
    assert cp.returncode == 1 and "cannot reach the inviting node" in cp.stderr
    cp = a.cli("invite", check=False)
    assert cp.returncode == 1 and "daemon" in cp.stderr


def test_unshared_context_never_reaches_peer(make_node: MakeNode) -> None:
    """A context shared with B but not C never reaches C, not even its name; C's updates to it are refused."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    secret_ctx, secret_value = "payroll-q3", "salary-table-7731"
    a.cli("peer", "add", b.card(), "--contexts", f"public,{secret_ctx}")
    b.cli("peer", "add", a.card(), "--contexts", f"public,{secret_ctx}")
    a.cli("peer", "add", c.card(), "--contexts", "public")
    c.cli("peer", "add", a.card(), "--contexts", "public")
    for n in (a, b, c):
        n.start()
    wait_for(lambda: a.connected_to(b, c))
    a.cli("set", secret_ctx, "k", json.dumps(secret_value))
    a.cli("set", "public", "marker", "1")
    wait_for(lambda: b.get(secret_ctx, "k") == secret_value and c.get("public", "marker") == 1)
    # Writes after C is in sync with "public" still do not reach it.
    a.cli("set", secret_ctx, "k2", "2")
    wait_for(lambda: b.get(secret_ctx, "k2") == 2)
    a.cli("set", "public", "marker2", "2")
    wait_for(lambda: c.get("public", "marker2") == 2)
    assert secret_ctx not in c.status()["contexts"]
    assert all(secret_ctx not in json.dumps(p) for p in c.status()["peers"])
    c.stop()
    c_files = [p for p in c.home.iterdir() if p.is_file()] + [c.log_path]
    for path in c_files:
        data = path.read_bytes()
        assert secret_ctx.encode() not in data and secret_value.encode() not in data, path.name
    # C now shares the context with A from its side and writes to it: A refuses and logs it.
    c.cli("peer", "add", a.card(), "--contexts", f"public,{secret_ctx}")
    c.start()
    c.cli("set", secret_ctx, "k", '"overwritten-by-c"')
    wait_for(lambda: any(e.get("doc_id") == secret_ctx for e in denied(a, "context not shared")))
    assert a.get(secret_ctx, "k") == secret_value and b.get(secret_ctx, "k") == secret_value


def test_read_only_peer_receives_but_cannot_write(make_node: MakeNode) -> None:
    """A read-only peer gets every update; its own are refused (not applied, stored or relayed) and logged."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    a.start()
    b.start()
    c.start()
    b.cli("join", invite(a, "--read-only"))
    c.cli("join", invite(a, "--contexts", "notes,docs"))
    wait_for(lambda: a.connected_to(b, c))
    assert peers_of(a)[b.node_id]["read_only"] is True
    a.cli("set", "notes", "k", '"from-a"')
    wait_for(lambda: b.get("notes", "k") == "from-a")
    b.cli("set", "notes", "k", '"from-b"')
    b.cli("set", "notes", "only-b", "1")
    wait_for(lambda: any(e.get("doc_id") == "notes" for e in denied(a, "read-only peer")))
    assert a.get("notes", "k") == "from-a" and a.get("notes", "only-b") is None
    assert c.get("notes", "k") == "from-a" and c.get("notes", "only-b") is None  # not relayed
    # Per context: C may read "docs" but not write it, and still writes "notes".
    a.cli("share", "docs", c.node_id, "--read-only")
    assert peers_of(a)[c.node_id]["read_only_contexts"] == ["docs"]
    wait_for(lambda: a.connected_to(c))
    a.cli("set", "docs", "readme", '"v1"')
    wait_for(lambda: c.get("docs", "readme") == "v1")
    c.cli("set", "docs", "readme", '"v2-from-c"')
    c.cli("set", "notes", "from-c", "3")
    wait_for(lambda: a.get("notes", "from-c") == 3)
    wait_for(lambda: any(e.get("doc_id") == "docs" for e in denied(a, "read-only context")))
    assert a.get("docs", "readme") == "v1"
    # Unshare: C no longer gets "docs" updates; sharing '*' cannot be narrowed by unshare.
    a.cli("unshare", "docs", c.node_id)
    assert peers_of(a)[c.node_id]["contexts"] == ["notes"]
    cp = a.cli("unshare", "notes", b.node_id, check=False)
    assert cp.returncode == 1 and "every context" in cp.stderr


def test_revocation_closes_live_connection_within_a_second(make_node: MakeNode) -> None:
    """`peer remove` cuts the live connection at once and refuses every reconnect."""
    a, b = make_node("a"), make_node("b")
    a.pair(b)
    a.start()
    b.start()
    wait_for(lambda: a.connected_to(b) and b.connected_to(a))
    a.cli("peer", "remove", b.node_id)
    wait_for(lambda: not b.connected_to(a))
    (removed,) = a.events("peer.removed")
    closed = [e for e in a.events("peer.disconnected") if e.get("reason") == "peer removed"]
    assert closed, a.events("peer.disconnected")
    t0 = datetime.fromisoformat(removed["timestamp"].replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(closed[0]["timestamp"].replace("Z", "+00:00"))
    assert (t1 - t0).total_seconds() <= 1.0
    # B keeps redialing; A's TLS refuses each attempt, and B stays out.
    wait_for(lambda: len(a.events("peer.rejected")) >= 2)
    b.cli("set", "notes", "after", "1")
    assert a.get("notes", "after") is None and not a.connected_to(b)


@pytest.mark.parametrize("target", ["home", "node.key", "api.token", "store.key", "store.db", "peers.toml"])
def test_daemon_refuses_readable_secrets(make_node: MakeNode, target: str) -> None:
    """The daemon refuses to start, saying why and how to fix it, while others can read a secret."""
    a, b = make_node("a"), make_node("b")
    a.pair(b)
    path = a.home if target == "home" else a.home / target
    good = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, 0o755 if target == "home" else 0o644)
    cp = a.cli("run", check=False, timeout=30)
    assert cp.returncode == 1
    assert "refusing to start" in cp.stderr and f"chmod {'700' if target == 'home' else '600'} {path}" in cp.stderr
    os.chmod(path, good)
    a.start()
    assert good == (0o700 if target == "home" else 0o600)


def test_store_holds_no_plaintext(make_node: MakeNode) -> None:
    """A known secret value written through the daemon is in no file of the store, open or stopped."""
    a, b = make_node("a"), make_node("b")
    (a.home / "config.toml").write_text((a.home / "config.toml").read_text().replace("compact_threshold = 2000", "compact_threshold = 10"))
    a.pair(b)
    a.start()
    b.start()
    secret = "TOPSECRET-4c1e-value"
    with SyncClient.for_home(a.home) as client:  # one version each, without a CLI process each
        for i in range(40):  # enough for compactions: checkpoints are sealed too
            client.set_value("vault", f"key{i}", f"{secret}-{i}")
    assert a.get("vault", "key0") == f"{secret}-0"
    assert a.status()["store"]["compactions"] >= 2  # the checkpoints below were written (and sealed)
    wait_for(lambda: b.get("vault", "key39") == f"{secret}-39")

    def store_files(node: Node) -> list[tuple[str, bytes]]:
        return [(p.name, p.read_bytes()) for p in node.home.glob("store.db*")]

    running = store_files(a) + store_files(b)
    assert any(name == "store.db-wal" for name, _ in running)
    a.stop()
    b.stop()
    for name, data in running + store_files(a) + store_files(b):
        assert secret.encode() not in data and b"TOPSECRET" not in data, name
    key = a.home / "store.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) == 44
    # Without its key the store is refused, untouched; with it, everything is there.
    key.rename(a.home / "store.key.bak")
    cp = a.cli("run", check=False, timeout=30)
    assert cp.returncode == 1 and "is encrypted" in cp.stderr and "store.key" in cp.stderr
    (a.home / "store.key.bak").rename(key)
    a.start()
    assert a.get("vault", "key7") == f"{secret}-7"


def test_store_key_from_environment(make_node: MakeNode) -> None:
    """[store] key_env takes the key from a variable; unset or wrong, the daemon refuses to start."""
    a = make_node("a")
    key = (a.home / "store.key").read_text().strip()
    (a.home / "store.key").unlink()
    cfg = (a.home / "config.toml").read_text()
    assert 'key_env = ""' in cfg
    (a.home / "config.toml").write_text(cfg.replace('key_env = ""', 'key_env = "VAULT_KEY"'))
    cp = a.cli("run", check=False, timeout=30)
    assert cp.returncode == 1 and "$VAULT_KEY" in cp.stderr and "not set" in cp.stderr
    a.env["VAULT_KEY"] = base64.urlsafe_b64encode(bytes(32)).decode()
    cp = a.cli("run", check=False, timeout=30)
    assert cp.returncode == 1 and "does not open this store" in cp.stderr
    assert a.env["VAULT_KEY"] not in cp.stderr
    a.env["VAULT_KEY"] = key
    a.start()
    a.cli("set", "n", "k", "1")
    assert a.get("n", "k") == 1


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with only ``lo`` (up, multicast on), deleted after the test."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("mDNS between daemons runs in a network namespace of its own: needs Linux, root and ip")
    name = f"ctxsync-disc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        for step in (["link", "set", "lo", "up", "multicast", "on"], ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            r = subprocess.run(["ip", "-n", name, *step], capture_output=True, text=True, timeout=10, check=False)
            assert r.returncode == 0, r.stderr
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10, check=False)


def test_discovery_starts_once_multicast_comes_up(tmp_path: Path, netns: str) -> None:
    """
    A daemon started before its network can carry mDNS (lo with multicast off) runs on, and
    starts discovery by itself once multicast is on: it retries instead of giving up for good.
    """
    for step in (["route", "del", "224.0.0.0/4", "dev", "lo"], ["link", "set", "lo", "multicast", "off"]):
        r = subprocess.run(["ip", "-n", netns, *step], capture_output=True, text=True, timeout=10, check=False)
        assert r.returncode == 0, r.stderr
    a = Node(tmp_path, "a", netns=netns, env={"CTXSYNC_DISCOVERY": "on"})
    try:
        a.init()
        a.start()
        wait_for(lambda: len(a.events("discovery.retry")) >= 2, timeout=30)
        retries = a.events("discovery.retry")
        assert [r["attempt"] for r in retries[:2]] == [1, 2] and "multicast off" in retries[1]["error"]
        # One ERROR for the first failure; the retries say they failed at INFO (no error every 5 minutes).
        failed = a.events("discovery.failed")
        assert len(failed) == 1 and failed[0]["level"] == "error" and "multicast off" in failed[0]["error"]
        assert not a.events("discovery.started")
        a.cli("set", "notes", "k", "1")  # the daemon works meanwhile
        for step in (["link", "set", "lo", "multicast", "on"], ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            r = subprocess.run(["ip", "-n", netns, *step], capture_output=True, text=True, timeout=10, check=False)
            assert r.returncode == 0, r.stderr
        wait_for(lambda: a.events("discovery.started"), timeout=30)
        assert a.get("notes", "k") == 1
    finally:
        a.kill()


def test_discovery_finds_paired_peer_without_address(tmp_path: Path, netns: str) -> None:
    """Two paired daemons with no address for each other find and connect by mDNS (inside a netns)."""
    from ctxsync import config

    nodes = [Node(tmp_path, name, netns=netns, env={"CTXSYNC_DISCOVERY": "on"}) for name in ("a", "b")]
    try:
        a, b = nodes
        a.init()
        b.init()
        a.pair(b)
        for n in nodes:  # forget the addresses the cards carried: discovery must find them
            path = n.home / config.PEERS_FILE
            peers = [dataclasses.replace(p, addr=None) for p in config.parse_peers(path.read_text())]
            config.write_atomic(path, config.dump_peers(peers))
        assert all(p["addr"] is None for n in nodes for p in peers_of(n).values())
        a.start()
        b.start()
        wait_for(lambda: a.connected_to(b) and b.connected_to(a), timeout=30)
        # The link may be b's dial (b heard a first); a still hears b's announcement on its own.
        wait_for(lambda: a.status()["peers"][0]["addr_source"] == "discovered", timeout=30)
        peer = a.status()["peers"][0]
        assert peer["addr"] == f"127.0.0.1:{b.listen_port}"
        assert any(e["peer_id"] == b.node_id for e in a.events("peer.discovered"))
        a.cli("set", "notes", "found", "1")
        wait_for(lambda: b.get("notes", "found") == 1)
        # Announcements carry no context names.
        found = a.events("discovery.found")
        assert found and all("notes" not in json.dumps(e) for e in found)
    finally:
        for n in nodes:
            n.kill()
