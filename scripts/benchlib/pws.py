"""The pycrdt-websocket side of ``scripts/bench``: a server and clients in child processes."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.util import (
    BenchTimeout,
    JsonChild,
    Procs,
    child_env,
    cpu_s,
    free_port,
    open_log,
    pct_summary_ms,
    rss_mib,
    say,
    wait_until,
)

ROOM = "/bench"


async def spawn(procs: Procs, root: Path, name: str, *args: str) -> JsonChild:
    err = open_log(root / f"pws-{name}.log")
    try:
        proc = await procs.spawn(
            sys.executable, "-m", "benchlib.pws_child", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, env=child_env(),
        )  # fmt: skip
    finally:
        err.close()
    child = JsonChild(name, proc)
    await child.expect("ready", timeout=30)
    return child


async def connect(c: JsonChild, max_size: int | None | str = "default") -> float:
    await c.send(op="connect", max_size=max_size)
    return float((await c.expect("connected", timeout=30))["t"])


async def server_count(server: JsonChild, root: str) -> int:
    await server.send(op="count", room=ROOM, root=root)
    return int((await server.expect("count", timeout=30))["n"])


async def catch_up(
    c: JsonChild, root: str, n: int, timeout: float, max_size: int | None | str, t0: float | None = None
) -> dict[str, Any]:
    """Connect ``c`` and wait until its ``root`` map has ``n`` keys, the link drops, or ``timeout``."""
    await c.send(op="expect", root=root, n=n)
    await c.expect("ok", timeout=10)
    t_connect = await connect(c, max_size)
    t0 = t_connect if t0 is None else t0
    try:
        ev = await c.expect("reached", "closed", timeout=timeout)
    except BenchTimeout:
        return {"converged": False, "why": f"not converged after {timeout:.0f} s"}
    if ev["ev"] == "reached":
        return {"converged": True, "seconds": ev["t"] - t0}
    code, reason = ev.get("code"), ev.get("reason") or ""
    m = re.search(r"frame with (\d+) bytes exceeds limit of (\d+) bytes", reason)
    if code == 1009 and m:
        why = f"link closed 1009, a {int(m.group(1)):,} B message > max_size {int(m.group(2)):,} B"
    else:
        why = f"link closed {code} ({reason})"
    return {"converged": False, "why": why, "closed_after_s": time.monotonic() - t0}


@dataclass
class PwsResults:
    idle_rss: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    tput: dict[str, Any] = field(default_factory=dict)
    catchup: dict[str, Any] = field(default_factory=dict)
    catchup_unlimited: dict[str, Any] = field(default_factory=dict)
    join: dict[str, Any] = field(default_factory=dict)
    join_unlimited: dict[str, Any] = field(default_factory=dict)
    big_rss: dict[str, float] = field(default_factory=dict)


async def run_pws(cfg: Any, procs: Procs, root: Path) -> PwsResults:
    r = PwsResults()
    children: list[JsonChild] = []
    try:
        # -- phase 1: server S, clients A and B ----------------------------------------
        port = free_port()
        url = f"ws://127.0.0.1:{port}{ROOM}"
        say("pycrdt-websocket: server and two clients")
        s = await spawn(procs, root, "s", "server", str(port))
        children.append(s)
        a, b = await asyncio.gather(
            spawn(procs, root, "a", "client", url), spawn(procs, root, "b", "client", url)
        )
        children += [a, b]
        await connect(a)
        await connect(b)
        await asyncio.sleep(cfg.settle_s)
        r.idle_rss = {"server": rss_mib(s.pid), "a": rss_mib(a.pid), "b": rss_mib(b.pid)}

        say(f"pycrdt-websocket: latency, {cfg.latency_writes} sequential transactions a -> b")
        await b.send(op="watch", root="lat")
        await b.expect("ok", timeout=10)
        conv = []
        for i in range(cfg.warmup + cfg.latency_writes):
            key = f"l{i:07d}"
            await a.send(op="write", root="lat", key=key, value=i)
            t0 = (await a.expect("wrote", timeout=10))["t"]
            while (ev := await b.expect("seen", timeout=10))["key"] != key:
                pass
            if i >= cfg.warmup:
                conv.append(ev["t"] - t0)
        r.latency = pct_summary_ms(conv)

        n = cfg.tput_writes
        say(f"pycrdt-websocket: throughput, {n} single-key transactions as fast as client a makes them")
        await b.send(op="expect", root="tput", n=n)
        await b.expect("ok", timeout=10)
        pids = {"server": s.pid, "a": a.pid, "b": b.pid}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        await a.send(op="write_many", root="tput", prefix="t", n=n, batch=1)
        w = await a.expect("wrote_many", timeout=cfg.tput_timeout_s)
        try:
            reached = await b.expect("reached", timeout=cfg.tput_timeout_s)
        except BenchTimeout:
            r.tput = {
                "writes": n,
                "converged": False,
                "why": f"b did not see all {n} writes within {cfg.tput_timeout_s:.0f} s",
            }
        else:
            cpu1 = {k: cpu_s(p) for k, p in pids.items()}
            secs = reached["t"] - w["t0"]
            r.tput = {
                "writes": n,
                "converged": True,
                "seconds": secs,
                "writes_per_s": n / secs,
                "written_per_s": n / (w["t1"] - w["t0"]),
                "cpu_us_per_write": {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in pids},
            }

        n = cfg.catchup_keys
        say(f"pycrdt-websocket: catch-up, b disconnected while a writes {n} keys, then b reconnects")
        await b.send(op="disconnect")
        await b.expect("disconnected", timeout=30)
        await a.send(op="write_many", root="catchup", prefix="c", n=n, batch=1000)
        await a.expect("wrote_many", timeout=120)
        await wait_until(
            lambda: _count_is(s, "catchup", n), 120, f"the server to hold {n} keys", interval=0.02
        )
        r.catchup = await catch_up(b, "catchup", n, cfg.pws_timeout_s, "default")
        if not r.catchup["converged"]:
            say(f"pycrdt-websocket: catch-up did not converge ({r.catchup['why']}); again with max_size=None")
            await b.send(op="disconnect")
            await b.expect("disconnected", timeout=30)
            r.catchup_unlimited = await catch_up(b, "catchup", n, cfg.pws_timeout_s, None)
        for c in children:
            await c.close()
        await asyncio.gather(*(procs.stop(c.proc) for c in children))
        children.clear()

        # -- phase 2: a room with many keys; a new client joins -------------------------
        n = cfg.join_keys
        say(f"pycrdt-websocket: new client, a room with {n} keys")
        port = free_port()
        url = f"ws://127.0.0.1:{port}{ROOM}"
        s = await spawn(procs, root, "s2", "server", str(port))
        children.append(s)
        a, b = await asyncio.gather(
            spawn(procs, root, "a2", "client", url), spawn(procs, root, "b2", "client", url)
        )
        children += [a, b]
        await connect(a)
        await connect(b)
        await b.send(op="expect", root="big", n=n)
        await b.expect("ok", timeout=10)
        await a.send(op="write_many", root="big", prefix="k", n=n, batch=1000)
        await a.expect("wrote_many", timeout=120)
        await b.expect("reached", timeout=120)
        await wait_until(lambda: _count_is(s, "big", n), 120, f"the server to hold {n} keys", interval=0.02)
        await asyncio.sleep(cfg.settle_s)
        r.big_rss = {"server": rss_mib(s.pid), "a": rss_mib(a.pid), "b": rss_mib(b.pid)}
        t0 = time.monotonic()
        c = await spawn(procs, root, "c", "client", url)
        children.append(c)
        r.join = await catch_up(c, "big", n, cfg.pws_timeout_s, "default", t0=t0)
        r.join["start_s"] = None
        if r.join["converged"]:
            await asyncio.sleep(cfg.settle_s)
            r.big_rss["c"] = rss_mib(c.pid)
        else:
            say(f"pycrdt-websocket: new client did not converge ({r.join['why']}); again with max_size=None")
            t0 = time.monotonic()
            c2 = await spawn(procs, root, "c2", "client", url)
            children.append(c2)
            r.join_unlimited = await catch_up(c2, "big", n, cfg.pws_timeout_s, None, t0=t0)
            if r.join_unlimited["converged"]:
                await asyncio.sleep(cfg.settle_s)
                r.big_rss["c (max_size=None)"] = rss_mib(c2.pid)
    finally:
        for c in children:
            await c.close()
        await asyncio.gather(*(procs.stop(c.proc) for c in children), return_exceptions=True)
    return r


async def _count_is(server: JsonChild, root: str, n: int) -> bool:
    return await server_count(server, root) >= n
