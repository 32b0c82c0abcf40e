"""
Command line: ``ctxsync COMMAND [--home DIR] ...`` (the contract in DESIGN.md).

Machine-readable output is JSON. Errors go to stderr as one line that says what is wrong
and what to do; the exit code is 1 for a failed request and 2 for bad usage (argparse).
Commands that talk to the daemon (set, get, del, keys, watch, status) go through
:class:`ctxsync.client.Client`; init, id, export and peer work on the home's files and tell
a running daemon about peer changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctxsync.errors import ApiError, CtxSyncError, NotFound
from ctxsync.types import NodeId

DEFAULT_LISTEN = "0.0.0.0:47100"
DEFAULT_API = "127.0.0.1:47200"


class _Fail(Exception):
    """A failed request: message for stderr, exit 1."""


def _home(args: argparse.Namespace) -> Path:
    h = getattr(args, "home", None) or os.environ.get("CTXSYNC_HOME") or "~/.ctxsync"
    return Path(h).expanduser()


def _json_value(text: str) -> str:
    """VALUE as JSON text: the text itself if it is valid JSON, else the JSON string of it."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=no_constants)
        return text.strip()
    except ValueError:
        return json.dumps(text)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- commands on the home's files ------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from ctxsync import config
    from ctxsync.crypto import generate_identity
    from ctxsync.home import CERT_FILE, KEY_FILE, STORE_FILE, STORE_KEY_FILE, TOKEN_FILE
    from ctxsync.seal import AeadCipher, create_key_file

    home = _home(args)
    if (home / config.CONFIG_FILE).exists() or (home / KEY_FILE).exists():
        raise _Fail(f"{home} already holds a ctxsync node; refusing to replace its identity (use another --home)")
    base: config.NodeConfig | None = None
    if args.config:
        try:
            base = config.parse(Path(args.config).read_text(), {}, path=args.config)
        except OSError as exc:
            raise _Fail(f"cannot read {args.config}: {exc.strerror}") from None
    name = args.name or (base.name if base else None) or _default_name()
    listen = config.parse_hostport(args.listen, key="--listen") if args.listen else (base.listen if base else config.parse_hostport(DEFAULT_LISTEN))
    api = config.parse_hostport(args.api, key="--api") if args.api else (base.api if base else config.parse_hostport(DEFAULT_API))
    if base is not None:
        import dataclasses

        cfg = dataclasses.replace(base, name=name, listen=listen, api=api, peers=())
    else:
        cfg = config.NodeConfig(name=name, listen=listen, api=api)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    ident = generate_identity(name)
    config.write_atomic(home / KEY_FILE, ident.key_pem.decode(), mode=0o600)
    config.write_atomic(home / CERT_FILE, ident.cert_pem.decode(), mode=0o644)
    config.write_atomic(home / TOKEN_FILE, secrets.token_urlsafe(32) + "\n", mode=0o600)
    config.write_atomic(home / config.CONFIG_FILE, config.dump_node(cfg), mode=0o600)
    from ctxsync.store import Store

    cipher: AeadCipher | None = None
    if not cfg.store.key_env and not cfg.store.key_file:
        cipher = AeadCipher(create_key_file(home / STORE_KEY_FILE))

    async def create_store() -> None:
        # With a key given elsewhere (key_file / key_env), the daemon seals the store at its first start.
        async with Store(home / STORE_FILE, cipher=cipher):
            pass

    asyncio.run(create_store())
    os.chmod(home / STORE_FILE, 0o600)
    print(ident.node_id)
    return 0


def _default_name() -> str:
    import socket

    return socket.gethostname().split(".")[0][:64] or "node"


def _identity(home: Path) -> tuple[str, bytes]:
    from ctxsync.crypto import node_id_from_cert
    from ctxsync.home import CERT_FILE

    try:
        cert = (home / CERT_FILE).read_bytes()
    except FileNotFoundError:
        raise _Fail(f"{home} is not a ctxsync home: run `ctxsync init --home {home}` first") from None
    return node_id_from_cert(cert), cert


def cmd_id(args: argparse.Namespace) -> int:
    print(_identity(_home(args))[0])
    return 0


def _own_card(home: Path, addr: str | None = None) -> str:
    """This node's one-line peer card; ``addr`` (HOST:PORT) overrides the address peers dial."""
    from ctxsync import config
    from ctxsync.crypto import PeerCard, encode_peer_card
    from ctxsync.home import advertised_host

    node_id, cert = _identity(home)
    cfg = config.load(home, os.environ)
    if addr is None:
        host = advertised_host(cfg.listen[0])
        addr = config.format_hostport(host, cfg.listen[1]) if host else None
    return encode_peer_card(PeerCard(node_id=NodeId(node_id), name=cfg.name, addr=addr, cert_pem=cert))


def cmd_export(args: argparse.Namespace) -> int:
    print(_own_card(_home(args), args.addr))
    return 0


def _notify_daemon(home: Path) -> str:
    from ctxsync.client import Client

    async def go() -> int:
        async with Client.for_home(home, env=os.environ, open_timeout=2.0) as c:
            return await c.reload_peers()

    try:
        asyncio.run(go())
        return " (the running daemon applied it)"
    except ApiError as exc:
        if exc.code == "unavailable":
            return " (daemon not running: it applies this when started)"
        return f" (daemon not told: {exc}; it re-reads peers.toml within seconds)"


def cmd_peer_add(args: argparse.Namespace) -> int:
    import dataclasses

    from ctxsync import config
    from ctxsync.crypto import decode_peer_card
    from ctxsync.home import pair_card

    home = _home(args)
    own_id, _ = _identity(home)
    card = decode_peer_card(args.card)
    if card.node_id == own_id:
        raise _Fail("that card is this node's own: add the card printed by `ctxsync export` on the other node")
    if args.addr:
        config.parse_hostport(args.addr, key="--addr")
        card = dataclasses.replace(card, addr=args.addr)
    contexts = tuple(c.strip() for c in args.contexts.split(",") if c.strip()) if args.contexts else ("*",)
    known = config.load(home, os.environ).peer(card.node_id) is not None
    peer = pair_card(home, os.environ, card, contexts=contexts, read_only=args.read_only)
    print(f"peer {'updated' if known else 'added'}: {peer.name} {peer.node_id}{_notify_daemon(home)}", file=sys.stderr)
    return 0


def cmd_peer_list(args: argparse.Namespace) -> int:
    from ctxsync import config

    cfg = config.load(_home(args), os.environ)
    rows = [
        {
            "node_id": p.node_id,
            "name": p.name,
            "addr": config.format_hostport(*p.addr) if p.addr else None,
            "contexts": list(p.contexts),
            "read_only": p.read_only,
            "read_only_contexts": list(p.read_only_contexts),
        }
        for p in cfg.peers
    ]
    if args.json:
        _print_json(rows)
    else:
        for p in cfg.peers:
            ro = " read-only" if p.read_only else ""
            addr = config.format_hostport(*p.addr) if p.addr else "-"
            print(f"{p.name:<16} {p.node_id}  {addr:<22} {','.join(p.contexts)}{ro}")
    return 0


def _find_peer(peers: Sequence[Any], text: str) -> Any:
    """The one paired peer named by a node id or a peer name."""
    from ctxsync.crypto import parse_node_id

    try:
        target = parse_node_id(text)
        match = [p for p in peers if p.node_id == target]
    except CtxSyncError:
        match = [p for p in peers if p.name == text]
    if not match:
        raise _Fail(f"no paired peer {text!r} (see `ctxsync peer list`)")
    if len(match) > 1:
        raise _Fail(f"{text!r} names several peers: give the node id")
    return match[0]


def _replace_peer(home: Path, peers: Sequence[Any], new: Any) -> str:
    """Write peers.toml with ``new`` in place of the peer of the same node id; tell the daemon."""
    from ctxsync import config

    updated = [new if p.node_id == new.node_id else p for p in peers]
    config.write_atomic(home / config.PEERS_FILE, config.dump_peers(updated), mode=0o600)
    return _notify_daemon(home)


def cmd_peer_remove(args: argparse.Namespace) -> int:
    from ctxsync import config

    home = _home(args)
    cfg = config.load(home, os.environ)
    gone = _find_peer(cfg.peers, args.node_id)
    peers = [p for p in cfg.peers if p.node_id != gone.node_id]
    config.write_atomic(home / config.PEERS_FILE, config.dump_peers(peers), mode=0o600)
    print(f"peer removed: {gone.name} {gone.node_id}{_notify_daemon(home)}", file=sys.stderr)
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    import dataclasses

    from ctxsync import config

    home = _home(args)
    cfg = config.load(home, os.environ)
    peer = _find_peer(cfg.peers, args.node_id)
    ctx = args.context
    contexts = peer.contexts if peer.shares(ctx) else (*peer.contexts, ctx)
    read_only = tuple(c for c in peer.read_only_contexts if c != ctx) + ((ctx,) if args.read_only else ())
    new = dataclasses.replace(peer, contexts=contexts, read_only_contexts=read_only)
    if new == peer:
        print(f"{ctx!r} was already shared with {peer.name}{' read-only' if args.read_only else ''}", file=sys.stderr)
        return 0
    mode = "read-only" if args.read_only or peer.read_only else "read-write"
    print(f"shared {ctx!r} with {peer.name} {peer.node_id} ({mode}){_replace_peer(home, cfg.peers, new)}", file=sys.stderr)
    return 0


def cmd_unshare(args: argparse.Namespace) -> int:
    import dataclasses

    from ctxsync import config

    home = _home(args)
    cfg = config.load(home, os.environ)
    peer = _find_peer(cfg.peers, args.node_id)
    ctx = args.context
    if "*" in peer.contexts:
        raise _Fail(
            f"{peer.name} shares every context ('*'): list the ones to share instead, e.g."
            f" `ctxsync peer add CARD --contexts A,B` with its card, or edit peers.toml"
        )
    if ctx not in peer.contexts:
        raise _Fail(f"{ctx!r} is not shared with {peer.name} (shared: {', '.join(peer.contexts) or 'none'})")
    new = dataclasses.replace(
        peer,
        contexts=tuple(c for c in peer.contexts if c != ctx),
        read_only_contexts=tuple(c for c in peer.read_only_contexts if c != ctx),
    )
    print(f"unshared {ctx!r} from {peer.name} {peer.node_id}{_replace_peer(home, cfg.peers, new)}", file=sys.stderr)
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    contexts = [c.strip() for c in args.contexts.split(",") if c.strip()] if args.contexts else ["*"]
    result = _with_client(
        args, lambda c: c.invite(contexts=contexts, read_only=args.read_only, ttl_s=args.ttl_s, addr=args.addr)
    )
    print(result["token"])
    shared = "every context" if contexts == ["*"] else ", ".join(contexts)
    print(
        f"invite for {shared}{' (read-only)' if args.read_only else ''}, single use, expires {result['expires_at']}."
        f" On the other node run: ctxsync join TOKEN",
        file=sys.stderr,
    )
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from ctxsync.home import pair_card
    from ctxsync.pairing import decode_token, join

    home = _home(args)
    token = decode_token(args.token)
    own_id, _ = _identity(home)
    if token.node_id == own_id:
        raise _Fail("this invite was made by this node: run `ctxsync join` on the other node")
    result = asyncio.run(join(token, _own_card(home, args.addr)))
    card = result.card
    pair_card(home, os.environ, card, contexts=result.contexts, read_only=False)
    shared = "every context" if "*" in result.contexts else ", ".join(result.contexts)
    note = " (it accepts no updates from this node)" if result.read_only else ""
    print(f"paired with {card.name} {card.node_id}, sharing {shared}{note}{_notify_daemon(home)}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ctxsync.daemon import run

    return run(_home(args), os.environ)


# -- commands through the API ----------------------------------------------------------


def _with_client(args: argparse.Namespace, fn: Any) -> Any:
    from ctxsync.client import Client

    async def go() -> Any:
        async with Client.for_home(_home(args), env=os.environ) as c:
            return await fn(c)

    return asyncio.run(go())


def cmd_set(args: argparse.Namespace) -> int:
    value = _json_value(args.value)
    _with_client(args, lambda c: c.set(args.context, args.key, value))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.key is None:
        _print_json(_with_client(args, lambda c: c.get_all(args.context)))
        return 0
    entry = _with_client(args, lambda c: c.get(args.context, args.key, conflicts=args.conflicts))
    if args.conflicts:
        _print_json(entry)
    else:
        _print_json(entry["value"])
    return 0


def cmd_del(args: argparse.Namespace) -> int:
    if not _with_client(args, lambda c: c.delete(args.context, args.key)):
        raise NotFound(f"no key {args.key!r} in context {args.context!r}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    _print_json(_with_client(args, lambda c: c.keys(args.context, args.prefix)))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    async def go(c: Any) -> None:
        def ready() -> None:
            print(f"ctxsync: watching {args.context} (Ctrl-C to stop)", file=sys.stderr, flush=True)

        if args.batch_ms:
            async for batch in c.watch_batches(args.context, args.prefix, glob=args.glob, batch_ms=args.batch_ms, on_ready=ready):
                _print_json(batch)
        else:
            async for change in c.watch(args.context, args.prefix, glob=args.glob, on_ready=ready):
                _print_json(change)

    try:
        _with_client(args, go)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _with_client(args, lambda c: c.status())
    if args.json:
        _print_json(st)
        return 0
    proc = st["process"]
    print(f"node     {st['name']}  {st['node_id']}")
    node = st.get("node") or {}
    stalls = node.get("loop_stalls_total") or 0
    stalled = f"   loop stalls {stalls} (last {node.get('last_loop_stall_s', 0):.1f} s)" if stalls else ""
    print(f"listen   {st['listen']}   rss {proc['rss_bytes'] / 2**20:.1f} MiB   cpu {proc['cpu_percent']}%   uptime {proc['uptime_s']} s{stalled}")
    ctxs = ", ".join(
        f"{k} ({v['entries']} entries, v{v['version']}{'' if v.get('loaded', True) else ', unloaded'})" for k, v in st["contexts"].items()
    ) or "none"
    print(f"contexts {ctxs}")
    for m in st.get("lineage_mismatches") or []:
        print(
            f"LINEAGE  {m['context']}: made separately here and on {m['peer_name']} ({m['peer_id'][:7]}); not synced."
            f" To take theirs: ctxsync context adopt {m['context']} --from {m['peer_id'][:7]}"
        )
    print()
    def ms(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "-"

    def sync_state(v: dict[str, Any]) -> str:
        return "yes" if v["in_sync"] else f"no ({v['out_of_sync_s']:.0f} s)"

    print(f"{'PEER':<14} {'NODE':<8} {'CONN':<5} {'RTT_MS':>7} {'P50':>7} {'P99':>7} {'SENT':>10} {'RECEIVED':>10} {'QUEUED':>8}  IN SYNC")
    for p in st["peers"]:
        insync = "  ".join(f"{k}: {sync_state(v)}" for k, v in p["contexts"].items()) or "-"
        print(
            f"{p['name'][:14]:<14} {p['node_id'][:7]:<8} {('yes' if p['connected'] else 'no'):<5} {ms(p['rtt_ms']):>7}"
            f" {ms(p.get('rtt_p50_ms')):>7} {ms(p.get('rtt_p99_ms')):>7} {p['sent_bytes']:>10} {p['received_bytes']:>10}"
            f" {p['queued_bytes']:>8}  {insync}"
        )
    if not st["peers"]:
        print("(no peers: pair with `ctxsync invite` / `ctxsync join`)")
    alerts = st.get("alerts") or []
    print()
    if alerts:
        print(f"ALERTS ({len(alerts)})")
        for a in alerts:
            labels = " ".join(f"{k}={v[:7] if k == 'peer' else v}" for k, v in a["labels"].items())
            print(f"  {a['severity'].upper():<8} {a['name']:<18} {a['metric']} {a['op']} {a['threshold']:g} (now {a['value']:g}) {labels}")
    else:
        print("alerts   none")
    return 0


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ctxsync.cli_context import add_parsers as add_context_parsers

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="node home directory (default $CTXSYNC_HOME, else ~/.ctxsync)")
    p = argparse.ArgumentParser(prog="ctxsync", description="Keep shared key/value contexts in sync between machines.", parents=[common])
    # No p.set_defaults(home=...): the --home action is shared with every subparser through
    # `parents`, so a default set here would make each subparser overwrite a `--home` given
    # before the command.
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, parents=[common], description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("init", cmd_init, "create a node home: identity, API token, config, store; print the node id")
    sp.add_argument("--name", help="human name of this node (default: host name)")
    sp.add_argument("--listen", metavar="HOST:PORT", help=f"peer listener (default {DEFAULT_LISTEN})")
    sp.add_argument("--api", metavar="HOST:PORT", help=f"local API listener (default {DEFAULT_API})")
    sp.add_argument("--config", metavar="FILE", help="start from this config.toml (e.g. peers/alice.toml)")
    add("id", cmd_id, "print this node's id")
    sp = add("export", cmd_export, "print this node's one-line peer card")
    sp.add_argument("--addr", metavar="HOST:PORT", help="address peers should dial (default: the listen address)")

    peer = sub.add_parser("peer", help="pair, list and remove peers", parents=[common])
    psub = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    sp = psub.add_parser("add", help="pair with the node of a peer card", parents=[common])
    sp.set_defaults(fn=cmd_peer_add)
    sp.add_argument("card")
    sp.add_argument("--addr", metavar="HOST:PORT", help="dial this address instead of the card's")
    sp.add_argument("--contexts", metavar="A,B", help="contexts shared with this peer ('*' = all, the default)")
    sp.add_argument("--read-only", action="store_true", help="accept no updates from this peer")
    sp = psub.add_parser("list", help="list paired peers", parents=[common])
    sp.set_defaults(fn=cmd_peer_list)
    sp.add_argument("--json", action="store_true")
    sp = psub.add_parser("remove", help="unpair a peer (by node id or name)", parents=[common])
    sp.set_defaults(fn=cmd_peer_remove)
    sp.add_argument("node_id", metavar="NODE_ID")

    sp = add("invite", cmd_invite, "print a one-time token that pairs the node running `ctxsync join TOKEN`")
    sp.add_argument("--contexts", metavar="A,B", help="contexts to share with the joiner ('*' = all, the default)")
    sp.add_argument("--read-only", action="store_true", help="accept no updates from the joiner")
    sp.add_argument("--ttl-s", type=float, default=300.0, metavar="SECONDS", help="lifetime of the invite (default 300)")
    sp.add_argument("--addr", metavar="HOST", help="address the joiner dials (default: this node's LAN address)")
    sp = add("join", cmd_join, "pair with the node that printed TOKEN (`ctxsync invite`)")
    sp.add_argument("token", metavar="TOKEN")
    sp.add_argument("--addr", metavar="HOST:PORT", help="address the inviter should dial back (default: the listen address)")
    sp = add("share", cmd_share, "share CONTEXT with a paired peer (by node id or name)")
    sp.add_argument("context")
    sp.add_argument("node_id", metavar="NODE_ID")
    sp.add_argument("--read-only", action="store_true", help="the peer may read CONTEXT but its updates are refused")
    sp = add("unshare", cmd_unshare, "stop sharing CONTEXT with a paired peer")
    sp.add_argument("context")
    sp.add_argument("node_id", metavar="NODE_ID")

    add("run", cmd_run, "run the daemon in the foreground (JSON log lines on stdout)")
    sp = add("set", cmd_set, "set KEY of CONTEXT to VALUE (JSON if it parses, else a string); exit 0 once durable")
    sp.add_argument("context")
    sp.add_argument("key")
    sp.add_argument("value")
    sp = add("get", cmd_get, "print KEY's value as JSON, or the whole context as an object")
    sp.add_argument("context")
    sp.add_argument("key", nargs="?")
    sp.add_argument("--conflicts", action="store_true", help="print the entry with every concurrent value")
    sp = add("del", cmd_del, "delete KEY of CONTEXT")
    sp.add_argument("context")
    sp.add_argument("key")
    sp = add("keys", cmd_keys, "print the keys of CONTEXT as a JSON array")
    sp.add_argument("context")
    sp.add_argument("--prefix", default="")
    sp = add("watch", cmd_watch, "print one JSON object per change of CONTEXT")
    sp.add_argument("context")
    sp.add_argument("--prefix", default="", help="only keys starting with it")
    sp.add_argument("--glob", help="only keys matching this shell pattern, e.g. 'tasks/*/state'")
    sp.add_argument("--batch-ms", type=int, default=0, metavar="N", help="print one JSON array per N ms of changes")
    add_context_parsers(sub, common)
    sp = add("status", cmd_status, "show node, peers (connected, rtt, in sync per context) and memory")
    sp.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 failed request, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except NotFound as exc:
        print(f"ctxsync: not found: {exc}", file=sys.stderr)
        return 1
    except (_Fail, CtxSyncError) as exc:
        print(f"ctxsync: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
