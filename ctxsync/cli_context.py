"""
CLI commands for managing a context beyond get/set: history and the changes cursor, snapshots
and restore, conflicts and strategies, lineage adoption, and webhooks.

Every command talks to the running daemon through :class:`ctxsync.client.Client`; JSON goes to
stdout, one-line errors to stderr (exit 1), as for the rest of the CLI (:mod:`ctxsync.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parsers"]


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_history(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    result = _with_client(args, lambda c: c.history(args.context, key=args.key, since=args.since, limit=args.limit))
    if args.json:
        _print_json(result)
        return 0
    if not result["records"]:
        print(f"no recorded changes of {args.context} (version {result['version']}, history from {result['history_from']})")
        return 0
    print(f"{'VERSION':>7}  {'TIME (UTC)':<23}  {'ORIGIN':<8} {'KEY':<24} VALUE (WAS)")
    for r in result["records"]:
        value = "(deleted)" if r["deleted"] else _short(r["value"])
        print(f"{r['version']:>7}  {r['time']:<23}  {r['origin'][:7]:<8} {r['key'][:24]:<24} {value} (was {_short(r['previous'], 24)})")
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    result = _with_client(args, lambda c: c.changes(args.context, args.since, limit=args.limit))
    if result["truncated"]:
        lo, hi = result["missed"]
        print(
            f"ctxsync: warning: versions {lo}..{hi} of {args.context} have left the history (history_limit);"
            " read the whole context with `ctxsync get` and go on from 'next'",
            file=sys.stderr,
        )
    _print_json(result)
    return 0


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from ctxsync.cli import _Fail, _print_json, _with_client

    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            raise _Fail(f"--meta must be JSON: {exc}") from None
    _print_json(_with_client(args, lambda c: c.snapshot(args.context, label=args.label, meta=meta)))
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    snaps = _with_client(args, lambda c: c.snapshots(args.context))
    if args.json:
        _print_json(snaps)
        return 0
    if not snaps:
        print("no snapshots")
        return 0
    print(f"{'ID':<27} {'CONTEXT':<16} {'TIME (UTC)':<23} {'VERSION':>7} {'ENTRIES':>7}  KIND  LABEL")
    for s in snaps:
        kind = "auto" if s["auto"] else "named"
        label = s["label"] or f"({s['reason']})"
        print(f"{s['id']:<27} {s['context'][:16]:<16} {s['time']:<23} {s['version']:>7} {s['entries']:>7}  {kind:<5} {label}")
    return 0


def cmd_snapshot_show(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    _print_json(_with_client(args, lambda c: c.snapshot_show(args.snapshot_id)))
    return 0


def cmd_snapshot_diff(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    _print_json(_with_client(args, lambda c: c.snapshot_diff(args.snapshot_id, args.other_id)))
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    from ctxsync.cli import _with_client

    _with_client(args, lambda c: c.snapshot_delete(args.snapshot_id))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    result = _with_client(args, lambda c: c.restore(args.context, args.snapshot_id))
    _print_json(result)
    if result["recovery_point"]:
        print(f"ctxsync: undo with: ctxsync restore {args.context} {result['recovery_point']}", file=sys.stderr)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    from ctxsync.cli import _json_value, _print_json, _with_client

    value = _json_value(args.value)
    _print_json(_with_client(args, lambda c: c.resolve(args.context, args.key, value)))
    return 0


def cmd_context_adopt(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    result = _with_client(args, lambda c: c.adopt(args.context, args.from_node))
    _print_json(result)
    if result.get("recovery_point"):
        print(
            f"ctxsync: this node's own content of {args.context} is in snapshot {result['recovery_point']}"
            f" (ctxsync snapshot show / restore {args.context} {result['recovery_point']})",
            file=sys.stderr,
        )
    return 0


def cmd_context_strategy(args: argparse.Namespace) -> int:
    from ctxsync.cli import _Fail, _print_json, _with_client

    if args.name is None:
        if args.priority:
            raise _Fail("--priority needs a strategy name (origin-priority)")
        _print_json(_with_client(args, lambda c: c.strategy(args.context)))
        return 0
    priority = [p for p in (args.priority or "").split(",") if p]
    _print_json(_with_client(args, lambda c: c.set_strategy(args.context, args.name, priority)))
    return 0


def cmd_webhook_add(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    _print_json(_with_client(args, lambda c: c.webhook_add(args.context, args.url, prefix=args.prefix, secret=args.secret)))
    return 0


def cmd_webhook_list(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    _print_json(_with_client(args, lambda c: c.webhooks()))
    return 0


def cmd_webhook_remove(args: argparse.Namespace) -> int:
    from ctxsync.cli import _with_client

    _with_client(args, lambda c: c.webhook_remove(args.webhook_id))
    return 0


def cmd_webhook_failures(args: argparse.Namespace) -> int:
    from ctxsync.cli import _print_json, _with_client

    _print_json(_with_client(args, lambda c: c.webhook_failures(args.webhook_id)))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the CLI's subparsers (``sub``), each with the ``common`` options."""

    def add(parent: Any, name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, parents=[common], description=help)
        sp.set_defaults(fn=fn)
        return sp

    def group(name: str, help: str) -> Any:
        sp = sub.add_parser(name, help=help, parents=[common], description=help)
        return sp.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    sp = add(sub, "history", cmd_history, "show who changed CONTEXT, when, and what each value replaced")
    sp.add_argument("context")
    sp.add_argument("--key", help="only changes of this key")
    sp.add_argument("--since", type=int, metavar="VERSION", help="only changes after this version (oldest first)")
    sp.add_argument("--limit", type=int, default=100, metavar="N", help="most changes shown (default 100)")
    sp.add_argument("--json", action="store_true")
    sp = add(sub, "changes", cmd_changes, "print the changes of CONTEXT after VERSION as JSON (a cursor: pass 'next' back)")
    sp.add_argument("context")
    sp.add_argument("--since", type=int, default=0, metavar="VERSION", help="last version already seen (default 0)")
    sp.add_argument("--limit", type=int, default=1000, metavar="N", help="about this many changes at most (whole versions)")

    snap = group("snapshot", "named recovery points of a context: create, list, show, diff, delete")
    sp = add(snap, "create", cmd_snapshot_create, "snapshot CONTEXT now and print it as JSON")
    sp.add_argument("context")
    sp.add_argument("--label", help="a name for people")
    sp.add_argument("--meta", metavar="JSON", help="any JSON value kept with the snapshot")
    sp = add(snap, "list", cmd_snapshot_list, "list snapshots (of CONTEXT, or all)")
    sp.add_argument("context", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp = add(snap, "show", cmd_snapshot_show, "print a snapshot with the context as it was ('content')")
    sp.add_argument("snapshot_id", metavar="ID")
    sp = add(snap, "diff", cmd_snapshot_diff, "keys added, removed and changed from snapshot ID to ID2 (default: now)")
    sp.add_argument("snapshot_id", metavar="ID")
    sp.add_argument("other_id", metavar="ID2", nargs="?")
    sp = add(snap, "delete", cmd_snapshot_delete, "delete a snapshot")
    sp.add_argument("snapshot_id", metavar="ID")

    sp = add(sub, "restore", cmd_restore, "make CONTEXT equal to a snapshot, as one new write that reaches every peer")
    sp.add_argument("context")
    sp.add_argument("snapshot_id", metavar="SNAPSHOT_ID")
    sp = add(sub, "resolve", cmd_resolve, "settle a conflict on KEY with VALUE (JSON if it parses, else a string)")
    sp.add_argument("context")
    sp.add_argument("key")
    sp.add_argument("value")

    ctx = group("context", "settings of a context: conflict strategy, lineage adoption")
    sp = add(ctx, "strategy", cmd_context_strategy, "show or set how concurrent writes of CONTEXT are resolved")
    sp.add_argument("context")
    sp.add_argument("name", nargs="?", choices=["latest-wins", "origin-priority"])
    sp.add_argument("--priority", metavar="ID,ID", help="origin-priority: node ids, most preferred first")
    sp = add(ctx, "adopt", cmd_context_adopt, "take a peer's CONTEXT after a lineage mismatch (this node's own is snapshotted, then dropped)")
    sp.add_argument("context")
    sp.add_argument("--from", dest="from_node", required=True, metavar="NODE_ID", help="the peer (node id or name)")

    hooks = group("webhook", "POST each batch of changes of a context to a URL (signed, retried, dead-lettered)")
    sp = add(hooks, "add", cmd_webhook_add, "register URL for the changes of CONTEXT; prints the id and secret")
    sp.add_argument("context")
    sp.add_argument("url")
    sp.add_argument("--prefix", default="", help="only keys starting with it")
    sp.add_argument("--secret", help="HMAC-SHA256 key of the signature header (default: a random one, printed)")
    add(hooks, "list", cmd_webhook_list, "list webhooks and their delivery state")
    sp = add(hooks, "remove", cmd_webhook_remove, "remove a webhook")
    sp.add_argument("webhook_id", metavar="ID")
    sp = add(hooks, "failures", cmd_webhook_failures, "list batches that failed after the last retry (dead letters)")
    sp.add_argument("webhook_id", metavar="ID", nargs="?")
