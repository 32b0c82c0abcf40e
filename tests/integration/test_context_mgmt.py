"""
End to end, through the CLI and real daemons: history and audit, the changes cursor, snapshots
and restore, conflicts and strategies, the lineage guard, and watch filters (issue 6).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.nodes import Node, wait_for

pytestmark = pytest.mark.integration

MakeNode = Callable[..., Node]


def js(node: Node, *args: str) -> Any:
    """Run a CLI command and parse its JSON stdout."""
    return json.loads(node.cli(*args).stdout)


def set_config(node: Node, section: str, **values: object) -> None:
    """Set keys of one table of the node's config.toml (before its next start)."""
    path = node.home / "config.toml"
    lines = path.read_text().splitlines()
    header = f"[{section}]"
    out: list[str] = []
    in_section = False
    for line in lines:
        if line.startswith("["):
            in_section = line.strip() == header
        key = line.split("=", 1)[0].strip()
        if in_section and key in values:
            continue
        out.append(line)
        if line.strip() == header:
            out += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    if header not in lines:
        out += [header, *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    path.write_text("\n".join(out) + "\n")


def mesh(make_node: MakeNode, *names: str, contexts: str | None = None) -> list[Node]:
    nodes = [make_node(n) for n in names]
    for i, x in enumerate(nodes):
        for y in nodes[i + 1 :]:
            extra = ["--contexts", contexts] if contexts else []
            x.cli("peer", "add", y.card(), *extra)
            y.cli("peer", "add", x.card(), *extra)
    for n in nodes:
        n.start()
    wait_for(lambda: all(n.connected_to(*[o for o in nodes if o is not n]) for n in nodes))
    return nodes


def history(node: Node, context: str, *extra: str) -> list[dict[str, Any]]:
    return list(js(node, "history", context, "--json", *extra)["records"])


def test_history_records_origin_and_previous_value_on_every_node(make_node: MakeNode) -> None:
    """Every node that applies a change records its version, time, origin, key, value and the value it replaced."""
    a, b, c = mesh(make_node, "alice", "bob", "carol")
    a.cli("set", "notes", "k", "1")
    wait_for(lambda: b.get("notes", "k") == 1 and c.get("notes", "k") == 1)
    b.cli("set", "notes", "k", '{"n": 2}')
    wait_for(lambda: a.get("notes", "k") == {"n": 2} and c.get("notes", "k") == {"n": 2})
    c.cli("set", "notes", "other", '"x"')
    c.cli("del", "notes", "k")
    wait_for(lambda: a.get("notes", "k") is None and b.get("notes", "k") is None and a.get("notes", "other") == "x")
    expected = [
        (a.node_id, "k", 1, None, False),
        (b.node_id, "k", {"n": 2}, 1, False),
        (c.node_id, "other", "x", None, False),
        (c.node_id, "k", None, {"n": 2}, True),
    ]
    for node in (a, b, c):
        records = history(node, "notes")
        assert [(r["origin"], r["key"], r["value"], r["previous"], r["deleted"]) for r in records] == expected, node.name
        versions = [r["version"] for r in records]
        assert versions == sorted(versions) and len(set(versions)) == 4, versions
        assert all(r["time"].endswith("Z") and r["t_ms"] > 0 and len(r["hlc"]) == 16 for r in records)
    only_k = history(b, "notes", "--key", "k")
    assert [r["value"] for r in only_k] == [1, {"n": 2}, None]
    after = history(b, "notes", "--since", str(only_k[1]["version"]))
    assert [r["key"] for r in after] == ["other", "k"]
    table = b.cli("history", "notes").stdout
    assert "(deleted)" in table and c.node_id[:7] in table


def test_history_is_bounded_and_the_cursor_says_what_it_missed(make_node: MakeNode) -> None:
    """history_limit bounds the records; a cursor from before the bound is told it missed changes, never silently skips."""
    (a,) = [make_node("alice")]
    set_config(a, "contexts", history_limit=5)
    a.start()
    for i in range(12):
        a.cli("set", "log", f"k{i}", str(i))
    records = history(a, "log", "--limit", "100")
    assert [r["key"] for r in records] == [f"k{i}" for i in range(7, 12)]
    stale = a.cli("changes", "log", "--since", "2")
    page = json.loads(stale.stdout)
    assert page["truncated"] is True and page["missed"] == [3, 7] and page["history_from"] == 8
    assert "have left the history" in stale.stderr
    assert [c["key"] for c in page["changes"]] == [f"k{i}" for i in range(7, 12)]
    fresh = js(a, "changes", "log", "--since", "9")
    assert fresh["truncated"] is False and [c["key"] for c in fresh["changes"]] == ["k9", "k10", "k11"]
    assert fresh["next"] == 12


def test_changes_cursor_never_skips_across_restarts(make_node: MakeNode) -> None:
    """A pull cursor picks up exactly the new changes after a daemon restart, in pages of whole versions."""
    (a,) = [make_node("alice")]
    a.start()
    for i in range(5):
        a.cli("set", "feed", f"k{i}", str(i))
    first = js(a, "changes", "feed", "--since", "0", "--limit", "3")
    assert [c["key"] for c in first["changes"]] == ["k0", "k1", "k2"] and first["next"] == 3
    assert a.stop() == 0
    a.start()
    a.cli("set", "feed", "k5", "5")
    seen: list[str] = [c["key"] for c in first["changes"]]
    cursor = first["next"]
    for _ in range(10):  # bounded: 3 changes left, 2 per page
        page = js(a, "changes", "feed", "--since", str(cursor), "--limit", "2")
        seen += [c["key"] for c in page["changes"]]
        assert page["truncated"] is False
        if page["next"] == cursor:
            break
        cursor = page["next"]
    assert seen == ["k0", "k1", "k2", "k3", "k4", "k5"]


def test_snapshots_restore_converges_on_three_nodes_and_is_undone(make_node: MakeNode) -> None:
    """Snapshot create/list/show/diff; a restore is one write that reaches every node; the recovery point undoes it."""
    a, b, c = mesh(make_node, "alice", "bob", "carol")
    a.cli("set", "plan", "step", '"design"')
    a.cli("set", "plan", "owner", '"ann"')
    wait_for(lambda: c.get("plan", "owner") == "ann")
    snap = js(a, "snapshot", "create", "plan", "--label", "before refactor", "--meta", '{"ticket": 42}')
    assert snap["label"] == "before refactor" and snap["meta"] == {"ticket": 42} and snap["auto"] is False
    assert snap["id"].startswith("snap-") and snap["version"] >= 2
    listed = js(a, "snapshot", "list", "plan", "--json")
    assert [s["id"] for s in listed] == [snap["id"]]
    assert js(a, "snapshot", "show", snap["id"])["content"] == {"owner": "ann", "step": "design"}

    b.cli("set", "plan", "step", '"build"')
    c.cli("set", "plan", "risk", '"high"')
    b.cli("del", "plan", "owner")
    wait_for(lambda: a.get("plan") == {"step": "build", "risk": "high"})
    diff = js(a, "snapshot", "diff", snap["id"])
    assert diff["added"] == {"risk": "high"} and diff["removed"] == {"owner": "ann"}
    assert diff["changed"] == {"step": {"from": "design", "to": "build"}}

    restored = a.cli("restore", "plan", snap["id"])
    result = json.loads(restored.stdout)
    assert result["changed"] == 3 and result["recovery_point"].startswith("snap-")
    assert f"ctxsync restore plan {result['recovery_point']}" in restored.stderr
    for node in (a, b, c):
        wait_for(lambda node=node: node.get("plan") == {"owner": "ann", "step": "design"})  # type: ignore[misc]
    # One forward change: a single new version on the restoring node, with history records.
    restore_records = [r for r in history(a, "plan") if r["version"] == result["version"]]
    assert sorted(r["key"] for r in restore_records) == ["owner", "risk", "step"]
    # The automatic recovery point holds the state just before the restore, and undoes it.
    assert js(a, "snapshot", "show", result["recovery_point"])["content"] == {"step": "build", "risk": "high"}
    undo = js(a, "restore", "plan", result["recovery_point"])
    assert undo["changed"] == 3
    for node in (a, b, c):
        wait_for(lambda node=node: node.get("plan") == {"step": "build", "risk": "high"})  # type: ignore[misc]
    kinds = {(s["auto"], s["reason"]) for s in js(a, "snapshot", "list", "plan", "--json")}
    assert (True, "before restore") in kinds and (False, "requested") in kinds
    js(a, "snapshot", "diff", snap["id"], result["recovery_point"])  # two snapshots of one context diff too
    a.cli("snapshot", "delete", snap["id"])
    gone = a.cli("snapshot", "show", snap["id"], check=False)
    assert gone.returncode == 1 and "no snapshot" in gone.stderr


def test_automatic_snapshots_every_n_changes_are_kept_within_retention(make_node: MakeNode) -> None:
    """snapshot_every takes recovery points on its own; snapshot_keep bounds them."""
    (a,) = [make_node("alice")]
    set_config(a, "contexts", snapshot_every=3, snapshot_keep=2)
    a.start()
    for i in range(10):
        a.cli("set", "auto", "k", str(i))
    wait_for(lambda: len(js(a, "snapshot", "list", "auto", "--json")) == 2)
    snaps = js(a, "snapshot", "list", "auto", "--json")
    assert all(s["auto"] and s["reason"] == "every 3 changes" for s in snaps)
    assert [s["version"] for s in snaps] == [6, 9]
    assert js(a, "snapshot", "show", snaps[-1]["id"])["content"] == {"k": 8}


def split(x: Node, y: Node, context: str) -> None:
    """Stop syncing ``context`` between two running nodes (x unshares it; the session is redialed)."""
    x.cli("unshare", context, y.node_id)
    wait_for(lambda: x.connected_to(y) and context not in _peer(x, y)["contexts"])


def join(x: Node, y: Node, context: str) -> None:
    x.cli("share", context, y.node_id)
    wait_for(lambda: x.connected_to(y) and _peer(x, y)["contexts"].get(context, {}).get("in_sync") is True)


def _peer(x: Node, y: Node) -> dict[str, Any]:
    return next(p for p in x.status()["peers"] if p["node_id"] == y.node_id)


def test_conflicts_are_listed_logged_resolved_and_origin_priority_converges(make_node: MakeNode) -> None:
    """Concurrent writes show as a conflict with every value, log context.conflict, and settle by resolve or by strategy."""
    a, b = mesh(make_node, "alice", "bob", contexts="team,other")
    a.cli("set", "team", "lead", '"nobody"')
    wait_for(lambda: b.get("team", "lead") == "nobody")
    split(a, b, "team")
    a.cli("set", "team", "lead", '"ann"')
    b.cli("set", "team", "lead", '"bo"')  # later HLC: wins under latest-wins
    join(a, b, "team")
    for node in (a, b):
        wait_for(lambda node=node: len(js(node, "get", "team", "lead", "--conflicts")["conflicts"]) == 1)  # type: ignore[misc]
        entry = js(node, "get", "team", "lead", "--conflicts")
        assert entry["value"] == "bo" and entry["writer"] == b.node_id
        assert [(x["writer"], x["value"]) for x in entry["conflicts"]] == [(a.node_id, "ann")]
        assert len(entry["conflicts"][0]["t"]) == 16
    wait_for(lambda: any(e.get("key") == "lead" for e in a.events("context.conflict") + b.events("context.conflict")))
    assert js(a, "status", "--json")["contexts"]["team"]["conflicts"] == 1
    none = a.cli("resolve", "team", "missing", "1", check=False)
    assert none.returncode == 1
    settled = js(a, "resolve", "team", "lead", '"ann and bo"')
    assert settled["replaced"] == 2
    for node in (a, b):
        wait_for(lambda node=node: js(node, "get", "team", "lead", "--conflicts") == {  # type: ignore[misc]
            **js(node, "get", "team", "lead", "--conflicts"), "value": "ann and bo", "conflicts": []})
    # origin-priority: bob's writes win whatever the clocks say, on every node.
    js(a, "context", "strategy", "team", "origin-priority", "--priority", f"{b.node_id},{a.node_id}")
    wait_for(lambda: js(b, "context", "strategy", "team")["name"] == "origin-priority")
    split(a, b, "team")
    b.cli("set", "team", "budget", "100")
    a.cli("set", "team", "budget", "200")  # later, but a ranks after b
    join(a, b, "team")
    for node in (a, b):
        wait_for(lambda node=node: len(js(node, "get", "team", "budget", "--conflicts")["conflicts"]) == 1)  # type: ignore[misc]
        assert node.get("team", "budget") == 100, node.name


def test_lineage_mismatch_is_refused_then_adopted(make_node: MakeNode) -> None:
    """Two nodes that made the same context apart do not merge; adopt takes the peer's, keeping ours in a snapshot."""
    a, b = make_node("alice"), make_node("bob")
    for n in (a, b):
        n.start()
    a.cli("set", "cfg", "mode", '"a-mode"')
    a.cli("set", "cfg", "only-a", "1")
    b.cli("set", "cfg", "mode", '"b-mode"')
    a.pair(b)
    wait_for(lambda: a.connected_to(b) and b.connected_to(a))
    wait_for(lambda: len(b.status()["lineage_mismatches"]) == 1)
    mismatch = b.status()["lineage_mismatches"][0]
    assert mismatch["context"] == "cfg" and mismatch["peer_id"] == a.node_id
    assert _peer(b, a)["contexts"]["cfg"]["lineage_mismatch"] is True
    assert "context adopt cfg" in b.cli("status").stdout
    wait_for(lambda: len(b.events("context.lineage_mismatch")) >= 1)
    assert b.get("cfg") == {"mode": "b-mode"} and a.get("cfg") == {"mode": "a-mode", "only-a": 1}
    adopted = b.cli("context", "adopt", "cfg", "--from", a.node_id)
    result = json.loads(adopted.stdout)
    assert result["dropped_entries"] == 1 and result["from"] == a.node_id
    wait_for(lambda: b.get("cfg") == {"mode": "a-mode", "only-a": 1})
    assert b.status()["lineage_mismatches"] == [] and b.status()["contexts"]["cfg"]["lineage"] == a.status()["contexts"]["cfg"]["lineage"]
    assert js(b, "snapshot", "show", result["recovery_point"])["content"] == {"mode": "b-mode"}
    b.cli("set", "cfg", "mode", '"agreed"')
    wait_for(lambda: a.get("cfg", "mode") == "agreed")
    assert b.stop() == 0  # the adopted lineage is durable
    b.start()
    wait_for(lambda: b.connected_to(a))
    a.cli("set", "cfg", "after", "1")
    wait_for(lambda: b.get("cfg", "after") == 1)
    assert b.status()["lineage_mismatches"] == []


def test_watch_glob_and_batches(make_node: MakeNode) -> None:
    """watch --glob keeps only matching keys; --batch-ms prints arrays of changes."""
    (a,) = [make_node("alice")]
    a.start()

    def watcher(*extra: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "ctxsync", "watch", "jobs", "--home", str(a.home), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=a.env,
        )  # fmt: skip
        assert p.stderr is not None and "watching jobs" in p.stderr.readline()
        return p

    globbed = watcher("--glob", "job/*/state")
    batched = watcher("--batch-ms", "300")
    try:
        a.cli("set", "jobs", "job/1/state", '"queued"')
        a.cli("set", "jobs", "job/1/log", '"..."')
        a.cli("set", "jobs", "other", "1")
        a.cli("set", "jobs", "job/2/state", '"done"')
        assert globbed.stdout is not None and batched.stdout is not None
        first, second = json.loads(globbed.stdout.readline()), json.loads(globbed.stdout.readline())
        assert [(first["key"], first["value"]), (second["key"], second["value"])] == [
            ("job/1/state", "queued"), ("job/2/state", "done"),
        ]  # fmt: skip
        got: list[str] = []
        for _ in range(4):  # bounded: 4 changes in at most 4 arrays
            batch = json.loads(batched.stdout.readline())
            assert isinstance(batch, list) and batch
            got += [c["key"] for c in batch]
            if len(got) == 4:
                break
        assert got == ["job/1/state", "job/1/log", "other", "job/2/state"]
    finally:
        for p in (globbed, batched):
            p.terminate()
            p.communicate(timeout=10)  # also closes the pipes


class _Receiver:
    """A local HTTP receiver for webhook POSTs: records each request; answers 500 while ``failing``."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.failing = False
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if receiver.failing else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def changes(self) -> list[dict[str, Any]]:
        return [c for _, body in self.requests for c in json.loads(body)["changes"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_delivers_signed_batches_retries_dead_letters_and_survives_restart(make_node: MakeNode) -> None:
    """webhook add: each change batch is POSTed signed; failures are retried then dead-lettered; the cursor survives a restart."""
    import hashlib
    import hmac

    (a,) = [make_node("alice")]
    set_config(a, "webhooks", max_attempts=2, backoff_s=0.05, max_backoff_s=0.1, timeout_s=2.0)
    a.start()
    rx = _Receiver()
    try:
        a.cli("set", "jobs", "seed", "0")
        hook = js(a, "webhook", "add", "jobs", rx.url, "--prefix", "job/", "--secret", "s3cret")
        assert hook["secret"] == "s3cret" and hook["id"].startswith("wh-")
        a.cli("set", "jobs", "job/1", '{"state": "queued"}')
        a.cli("set", "jobs", "other", "1")
        a.cli("set", "jobs", "job/1", '{"state": "done"}')
        wait_for(lambda: [c["key"] for c in rx.changes()] == ["job/1", "job/1"])
        for headers, body in rx.requests:
            expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            assert headers["x-ctxsync-signature"] == expected
            assert headers["x-ctxsync-webhook"] == hook["id"]
        assert [c["value"] for c in rx.changes()] == [{"state": "queued"}, {"state": "done"}]
        assert rx.changes()[1]["previous"] == {"state": "queued"} and rx.changes()[0]["origin"] == a.node_id

        # A receiver that keeps failing: retried, then dead-lettered, and delivery moves on.
        rx.failing = True
        posts = len(rx.requests)
        a.cli("set", "jobs", "job/2", '"lost"')
        wait_for(lambda: len(js(a, "webhook", "failures", hook["id"])) == 1)
        assert len(rx.requests) == posts + 2  # max_attempts
        failure = js(a, "webhook", "failures")[0]
        assert failure["attempts"] == 2 and [c["key"] for c in failure["body"]["changes"]] == ["job/2"]
        rx.failing = False

        # Delivery state survives a restart: changes made while stopped... are made after it, and
        # nothing acknowledged is sent twice.
        assert a.stop() == 0
        a.start()
        a.cli("set", "jobs", "job/3", '"after restart"')
        wait_for(lambda: [c["key"] for c in rx.changes()][-1:] == ["job/3"])
        delivered = [c["key"] for _, body in rx.requests if json.loads(body)["changes"] for c in json.loads(body)["changes"]]
        assert delivered.count("job/3") == 1 and delivered.count("job/1") == 2
        listed = js(a, "webhook", "list")
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        a.cli("webhook", "remove", hook["id"])
        assert js(a, "webhook", "list") == []
    finally:
        rx.close()
