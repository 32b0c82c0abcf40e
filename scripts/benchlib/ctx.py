"""The ctxsync side of ``scripts/bench``: real daemons (``ctxsync run``) driven through the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

from benchlib.floor import hop_floor
from benchlib.profiling import Profiler, pyspy_argv
from benchlib.util import (
    BenchTimeout,
    Procs,
    child_env,
    cpu_s,
    free_ports,
    open_log,
    pct_summary_ms,
    rss_mib,
    say,
    wait_until,
)
from ctxsync.client import Client
from ctxsync.errors import ApiError

BULK_BATCH = 1000  # keys per set_many when filling a context (catch-up and new-node workloads)
BULK_IN_FLIGHT = 4  # set_many requests in flight while filling
TPUT_POLL_S = 0.025  # status polls of the receiver during the throughput run (each costs it ~0.3 ms)


class CtxNode:
    """One node: a home under the run's temp dir and, while running, its ``ctxsync run`` process."""

    extra_env: ClassVar[dict[str, str]] = {}  # set once per run (--daemon-env)

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.home = root / name
        self.listen_port, self.api_port = free_ports(2)
        self.log_path = root / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.daemon_pid = 0
        self.node_id = ""
        self.spawned_at = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.api_port}/"

    def client(self, open_timeout: float = 5.0) -> Client:
        token = (self.home / "api.token").read_text().strip()
        return Client(self.url, token, open_timeout=open_timeout)

    def init_steps(self) -> list[dict[str, Any]]:
        listen, api = f"127.0.0.1:{self.listen_port}", f"127.0.0.1:{self.api_port}"
        return [
            {
                "argv": [
                    "init",
                    "--home",
                    str(self.home),
                    "--name",
                    self.name,
                    "--listen",
                    listen,
                    "--api",
                    api,
                ],
                "save": f"id:{self.name}",
            },
            {"argv": ["export", "--home", str(self.home)], "save": f"card:{self.name}"},
        ]

    async def start(self, procs: Procs, *, profile: Path | None = None) -> None:
        """Spawn ``ctxsync run`` (under ``py-spy record`` when ``profile`` names an output file)."""
        assert self.proc is None or self.proc.returncode is not None, f"{self.name} already running"
        argv = [sys.executable, "-m", "ctxsync", "run", "--home", str(self.home)]
        if profile is not None:
            argv = [*pyspy_argv(profile), "--", *argv]
        log = open_log(self.log_path)
        try:
            self.spawned_at = time.monotonic()
            self.proc = await procs.spawn(
                *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, env={**child_env(), **CtxNode.extra_env}
            )
        finally:
            log.close()
        if profile is None:
            self.daemon_pid = self.proc.pid
        else:  # the daemon is py-spy's child
            parent = psutil.Process(self.proc.pid)

            def child() -> bool:
                kids = parent.children()
                if kids:
                    self.daemon_pid = kids[0].pid
                return bool(kids)

            await wait_until(child, 10, f"{self.name} to start under py-spy", interval=0.002)

    async def stop(self, procs: Procs) -> None:
        """SIGTERM the daemon (by its PID) and wait for it to exit."""
        if self.proc is None:
            return
        if self.daemon_pid != self.proc.pid:  # under py-spy: stop the daemon, py-spy then writes its file
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(self.daemon_pid).send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 30)
            await procs.stop(self.proc, sig=signal.SIGINT)
        else:
            await procs.stop(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    async def wait_api(self, timeout: float) -> float:
        """Wait until the API accepts a connection; return when it did (monotonic)."""

        async def up() -> bool:
            if not self.alive():
                raise BenchTimeout(
                    f"{self.name} exited {self.proc.returncode if self.proc else '?'}: {self.log_tail()}"
                )
            try:
                async with self.client(open_timeout=1.0):
                    return True
            except ApiError:
                return False

        return await wait_until(up, timeout, f"{self.name}'s API", interval=0.005)


async def ctx_setup(procs: Procs, new: list[CtxNode], pairs: list[tuple[CtxNode, CtxNode]]) -> dict[str, str]:
    """
    ``ctxsync init`` + ``export`` for each new node, then ``peer add`` both ways for each pair.

    All in one ``benchlib.ctxsetup`` process (the CLI's own code, one interpreter start).
    ``peer add`` tells a running daemon, as the CLI does. Returns the saved ids and cards.
    """
    steps: list[dict[str, Any]] = []
    for n in new:
        steps += n.init_steps()
    for a, b in pairs:
        steps.append({"argv": ["peer", "add", f"@card:{b.name}", "--home", str(a.home)]})
        steps.append({"argv": ["peer", "add", f"@card:{a.name}", "--home", str(b.home)]})
    # cards of nodes set up by an earlier call are passed back in as export steps
    known = {n.name for n in new}
    pre = []
    for a, b in pairs:
        for n in (a, b):
            if n.name not in known:
                known.add(n.name)
                pre.append({"argv": ["export", "--home", str(n.home)], "save": f"card:{n.name}"})
    proc = await procs.spawn(
        sys.executable,
        "-m",
        "benchlib.ctxsetup",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**child_env(), **CtxNode.extra_env},
    )
    out, _ = await asyncio.wait_for(proc.communicate(json.dumps(pre + steps).encode()), 120)
    res = json.loads(out or b"{}")
    if "error" in res or proc.returncode != 0:
        raise RuntimeError(f"ctxsync setup failed: {res.get('error', proc.returncode)}")
    saved: dict[str, str] = res["saved"]
    for n in new:
        n.node_id = saved[f"id:{n.name}"]
    return saved


async def entries(c: Client, context: str) -> int:
    st = await c.status()
    return int(st["contexts"].get(context, {}).get("entries", 0))


async def wait_connected(nodes: list[CtxNode], clients: dict[str, Client], timeout: float) -> None:
    """Wait until every node shows every one of its peers connected."""

    async def all_up() -> bool:
        for n in nodes:
            st = await clients[n.name].status()
            if not st["peers"] or not all(p["connected"] for p in st["peers"]):
                return False
        return True

    await wait_until(all_up, timeout, "all peers connected", interval=0.02)


async def fill(c: Client, context: str, prefix: str, n: int) -> None:
    """Write ``n`` keys with ``set_many`` batches (setup of the catch-up and new-node workloads)."""
    batches = iter(range(0, n, BULK_BATCH))

    async def worker() -> None:
        for start in batches:
            await c.set_many(
                context, [(f"{prefix}{j:07d}", str(j)) for j in range(start, min(start + BULK_BATCH, n))]
            )

    await asyncio.gather(*(worker() for _ in range(BULK_IN_FLIGHT)))


IMPORT_FLOOR_SCRIPT = """
import psutil, ctxsync.cli, ctxsync.daemon, ctxsync.mesh, ctxsync.api, ctxsync.store
print(psutil.Process().memory_info().rss / 2**20)
"""


def import_floor_mib() -> float | None:
    """
    RSS in MiB of a fresh interpreter that imported what ``ctxsync run`` imports before it starts
    anything (the CLI, the daemon and their modules: the required libraries included), and ran
    nothing else: the part of a daemon's idle RSS that is code, not state. The same interpreter and
    import path as the daemons; ``None`` (reported as "-") if the child fails or takes over 60 s.
    """
    import subprocess

    try:
        env = {**child_env(), **CtxNode.extra_env}
        argv = [sys.executable, "-c", IMPORT_FLOOR_SCRIPT]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
        return round(float(out.stdout.strip().splitlines()[-1]), 1)
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


@dataclass
class CtxResults:
    idle_rss: dict[str, float] = field(default_factory=dict)
    import_rss: float | None = None
    """RSS (MiB) of an interpreter that imported the daemon's modules and ran nothing (import_floor_mib)."""
    latency: dict[str, float] = field(default_factory=dict)
    hop_floor: dict[str, dict[str, float]] = field(default_factory=dict)
    """Latency (ms) of bare websocket relay chains, by hop count "2" and "3" (benchlib.floor)."""
    hop_floor_error: str = ""
    """Why the relay chains were not measured (a relay did not start, a message was lost); "" if they were."""
    ack: dict[str, float] = field(default_factory=dict)
    tput: dict[str, Any] = field(default_factory=dict)
    tput_window: dict[str, Any] = field(default_factory=dict)
    catchup: dict[str, Any] = field(default_factory=dict)
    join: dict[str, Any] = field(default_factory=dict)
    big_rss: dict[str, float] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)


class Watcher:
    """A ``watch`` on one node: the monotonic time each awaited key was first seen."""

    def __init__(self, client: Client, context: str) -> None:
        self.client = client
        self.context = context
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ch in self.client.watch(self.context, on_ready=self.ready.set):
            t = time.monotonic()
            fut = self.waiting.pop(ch["key"], None)
            if fut is not None and not fut.done():
                fut.set_result(t)

    def expect(self, key: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        return fut

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def run_ctxsync(
    cfg: Any, procs: Procs, root: Path, prof: Profiler | None, extra_env: dict[str, str]
) -> CtxResults:
    r = CtxResults()
    CtxNode.extra_env = extra_env
    say("ctxsync: wake-up floor, bare websocket relays of 2 and 3 hops")
    try:
        r.hop_floor = await hop_floor(procs, cfg.latency_writes, cfg.warmup)
    except BenchTimeout as exc:  # a reading aid only: the workloads below still run
        r.hop_floor_error = str(exc)
        say(f"ctxsync: wake-up floor not measured: {exc}")
    async with contextlib.AsyncExitStack() as stack:
        # -- phase 1: A and B, paired ---------------------------------------------------
        a, b = CtxNode(root, "a"), CtxNode(root, "b")
        say("ctxsync: init and pair a, b")
        await ctx_setup(procs, [a, b], [(a, b)])
        await asyncio.gather(a.start(procs), b.start(procs))
        await asyncio.gather(a.wait_api(30), b.wait_api(30))
        ca = await stack.enter_async_context(a.client())
        cb = await stack.enter_async_context(b.client())
        await wait_connected([a, b], {"a": ca, "b": cb}, 30)
        await asyncio.sleep(cfg.settle_s)
        r.idle_rss = {"a": rss_mib(a.daemon_pid), "b": rss_mib(b.daemon_pid)}
        r.import_rss = await asyncio.to_thread(import_floor_mib)  # a child process: off the loop

        # convergence latency and durable-write latency
        say(f"ctxsync: latency, {cfg.latency_writes} sequential writes a -> b")
        w = Watcher(cb, "lat")
        await asyncio.wait_for(w.ready.wait(), 10)
        conv, ack = [], []
        async with Profiler.maybe(
            prof, "ctxsync-latency-idle", {"a": a.daemon_pid, "b": b.daemon_pid}, idle=True
        ):
            for i in range(cfg.warmup + cfg.latency_writes):
                key = f"l{i:07d}"
                fut = w.expect(key)
                t0 = time.monotonic()
                await ca.set("lat", key, str(i))
                t_ack = time.monotonic()
                t_seen = await asyncio.wait_for(fut, 10)
                if i >= cfg.warmup:
                    conv.append(t_seen - t0)
                    ack.append(t_ack - t0)
        await w.close()
        r.latency = pct_summary_ms(conv)
        r.ack = pct_summary_ms(ack)

        # converged throughput and CPU per replicated write: every write pipelined at once (as
        # the pycrdt-websocket client does), then again with a bounded window in flight
        r.tput = await _throughput(cfg, ca, cb, a, b, prof, "tput", window=cfg.tput_writes)
        r.tput_window = await _throughput(cfg, ca, cb, a, b, None, "tput-window", window=cfg.window)

        # catch-up: b stopped while a writes, then b started
        n = cfg.catchup_keys
        say(f"ctxsync: catch-up, b stopped while a writes {n} keys, then b started")
        await stack.aclose()  # drop clients before b goes away
        ca = await stack.enter_async_context(a.client())
        await b.stop(procs)
        await fill(ca, "catchup", "c", n)
        async with Profiler.maybe(prof, "ctxsync-catchup-a", {"a": a.daemon_pid}):
            await b.start(procs, profile=prof.spawn_file("ctxsync-catchup-b") if prof else None)
            t_api = await b.wait_api(60)
            cb = await stack.enter_async_context(b.client())
            t1 = await wait_until(
                lambda: _has(cb, "catchup", n), cfg.catchup_timeout_s, f"b to hold {n} catch-up keys"
            )
        r.catchup = {"keys": n, "seconds": t1 - b.spawned_at, "start_s": t_api - b.spawned_at}
        await stack.aclose()
        await asyncio.gather(a.stop(procs), b.stop(procs))

        # -- phase 2: P and Q hold a big context; R joins -------------------------------
        n = cfg.join_keys
        p, q, rn = CtxNode(root, "p"), CtxNode(root, "q"), CtxNode(root, "r")
        say(f"ctxsync: new node, p and q hold {n} keys, r pairs with p and starts")
        await ctx_setup(procs, [p, q], [(p, q)])
        await asyncio.gather(p.start(procs), q.start(procs))
        await asyncio.gather(p.wait_api(30), q.wait_api(30))
        cp = await stack.enter_async_context(p.client())
        cq = await stack.enter_async_context(q.client())
        await wait_connected([p, q], {"p": cp, "q": cq}, 30)
        await fill(cp, "big", "k", n)
        await wait_until(lambda: _has(cq, "big", n), 120, f"q to hold {n} keys")
        await asyncio.sleep(cfg.settle_s)
        r.big_rss = {"p": rss_mib(p.daemon_pid), "q": rss_mib(q.daemon_pid)}
        await ctx_setup(procs, [rn], [(p, rn)])  # p is running: `peer add` tells it
        await wait_until(lambda: _peer_known(cp, rn.node_id), 10, "p to apply the new peer")
        async with Profiler.maybe(prof, "ctxsync-join-p", {"p": p.daemon_pid}):
            await rn.start(procs, profile=prof.spawn_file("ctxsync-join-r") if prof else None)
            t_api = await rn.wait_api(60)
            cr = await stack.enter_async_context(rn.client())
            t1 = await wait_until(lambda: _has(cr, "big", n), cfg.catchup_timeout_s, f"r to hold {n} keys")
        r.join = {"keys": n, "seconds": t1 - rn.spawned_at, "start_s": t_api - rn.spawned_at}
        await asyncio.sleep(cfg.settle_s)
        r.big_rss["r"] = rss_mib(rn.daemon_pid)
        await stack.aclose()
        await asyncio.gather(p.stop(procs), q.stop(procs), rn.stop(procs))

        # -- phase 3: full mesh ----------------------------------------------------------
        m = cfg.mesh_nodes
        say(f"ctxsync: {m}-node full mesh, {cfg.mesh_writes} writes, each until all {m - 1} others see it")
        nodes = [CtxNode(root, f"m{i}") for i in range(m)]
        await ctx_setup(procs, nodes, [(x, y) for i, x in enumerate(nodes) for y in nodes[i + 1 :]])
        await asyncio.gather(*(x.start(procs) for x in nodes))
        await asyncio.gather(*(x.wait_api(30) for x in nodes))
        clients = {x.name: await stack.enter_async_context(x.client()) for x in nodes}
        await wait_connected(nodes, clients, 60)
        watchers = {x.name: Watcher(clients[x.name], "mesh") for x in nodes}
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers.values())), 10)
        conv = []
        for i in range(cfg.warmup + cfg.mesh_writes):
            src = nodes[i % m]
            key = f"m{i:07d}"
            futs = [watchers[x.name].expect(key) for x in nodes if x is not src]
            t0 = time.monotonic()
            await clients[src.name].set("mesh", key, str(i))
            seen = await asyncio.wait_for(asyncio.gather(*futs), 10)
            if i >= cfg.warmup:
                conv.append(max(seen) - t0)
        for w in watchers.values():
            await w.close()
        r.mesh = {"nodes": m, **pct_summary_ms(conv)}
        await stack.aclose()
        await asyncio.gather(*(x.stop(procs) for x in nodes))
    return r


async def _throughput(
    cfg: Any, ca: Client, cb: Client, a: CtxNode, b: CtxNode, prof: Profiler | None, context: str, *, window: int
) -> dict[str, Any]:
    """
    ``cfg.tput_writes`` single-key ``set`` requests on a, ``window`` of them in flight at a time;
    timed from the first request until b's ``status`` counts every key. CPU per write: each
    process's user+system CPU time over the run, divided by the writes (µs).
    """
    n = cfg.tput_writes
    say(f"ctxsync: throughput, {n} pipelined single-key writes ({window} in flight)")
    keys = iter(range(n))
    acked_at = 0.0

    async def writer() -> None:
        nonlocal acked_at
        for i in keys:
            await ca.set(context, f"t{i:07d}", str(i))
        acked_at = time.monotonic()

    async with Profiler.maybe(prof, "ctxsync-throughput", {"a": a.daemon_pid, "b": b.daemon_pid}):
        cpu0 = {"a": cpu_s(a.daemon_pid), "b": cpu_s(b.daemon_pid), "driver": cpu_s(os.getpid())}
        t0 = time.monotonic()
        writers = asyncio.gather(*(writer() for _ in range(min(window, n))))
        try:
            t1 = await wait_until(
                lambda: _has(cb, context, n), cfg.tput_timeout_s, f"b to hold {n} {context} keys", interval=TPUT_POLL_S
            )
        finally:
            await writers
        cpu1 = {"a": cpu_s(a.daemon_pid), "b": cpu_s(b.daemon_pid), "driver": cpu_s(os.getpid())}
    return {
        "writes": n,
        "window": window,
        "seconds": t1 - t0,
        "writes_per_s": n / (t1 - t0),
        "acked_writes_per_s": n / (acked_at - t0),
        "cpu_us_per_write": {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu0},
    }


async def _has(c: Client, context: str, n: int) -> bool:
    return await entries(c, context) >= n


async def _peer_known(c: Client, node_id: str) -> bool:
    st = await c.status()
    return any(p["node_id"] == node_id for p in st["peers"])
