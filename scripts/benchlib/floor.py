"""
The wake-up floor of ``scripts/bench``'s latency workload: bare websocket relays that do no work.

ctxsync's convergence path has three process hops (client -> daemon a -> daemon b -> client), the
pycrdt-websocket one two (client a -> server -> client b). Each hop wakes a sleeping process, and
on a virtual machine that wake-up can cost more than the work done after it. This measures the
same chains with nothing in them: ``websockets`` relays on 127.0.0.1, compression off, no TLS, no
JSON, no CRDT, so the latency rows can be read against what the hops alone cost on this machine.

Run as a child (``python -m benchlib.floor relay [URL]``) it is one relay: it prints
``{"ev": "ready", "port": N}`` and forwards every message it receives to ``URL`` or, without one,
to the connection that sent ``"sink"`` first. It runs until it is signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from benchlib.util import BenchTimeout, JsonChild, Procs, child_env, pct_summary_ms

SINK = "sink"
PAUSE_S = 0.001
"""Pause after each message (seconds), so that every process is asleep again when the next one starts."""


async def _relay(target: str | None) -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    out = await connect(target, compression=None) if target else None
    sink: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if message == SINK and not sink.done():
                sink.set_result(ws)
                await ws.wait_closed()
                return
            await (out if out is not None else await sink).send(message)

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"ev": "ready", "port": port}), flush=True)
        await asyncio.Future()  # until signalled


async def _spawn_relay(procs: Procs, target: str | None) -> tuple[JsonChild, int]:
    argv = [sys.executable, "-m", "benchlib.floor", "relay", *([target] if target else [])]
    proc = await procs.spawn(*argv, stdout=asyncio.subprocess.PIPE, env=child_env())
    child = JsonChild("relay", proc)
    ready = await child.expect("ready", timeout=30)
    return child, int(ready["port"])


async def _chain(procs: Procs, hops: int, messages: int, warmup: int) -> dict[str, float]:
    """
    Round trips through ``hops - 1`` relays and back to the driver: each message is sent to the
    first relay and timed until the driver's sink connection to the last one receives it.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    relays: list[JsonChild] = []
    try:
        last, port = await _spawn_relay(procs, None)
        relays.append(last)
        sink_port = first_port = port
        for _ in range(hops - 2):
            relay, first_port = await _spawn_relay(procs, f"ws://127.0.0.1:{first_port}/")
            relays.append(relay)
        try:
            async with (
                connect(f"ws://127.0.0.1:{sink_port}/", compression=None) as sink,
                connect(f"ws://127.0.0.1:{first_port}/", compression=None) as source,
            ):
                await sink.send(SINK)
                times: list[float] = []
                for i in range(warmup + messages):
                    t0 = time.monotonic()
                    await source.send(f"m{i}")
                    got = await asyncio.wait_for(sink.recv(), 10)
                    if got != f"m{i}":
                        raise BenchTimeout(f"relay chain of {hops} hops returned {got!r} for m{i}")
                    if i >= warmup:
                        times.append(time.monotonic() - t0)
                    await asyncio.sleep(PAUSE_S)
        except (TimeoutError, OSError, ConnectionClosed, InvalidHandshake) as exc:  # a relay died, or a message took over 10 s
            raise BenchTimeout(f"relay chain of {hops} hops failed: {exc!r}") from exc
        return pct_summary_ms(times)
    finally:
        for relay in relays:
            await procs.stop(relay.proc, timeout=5.0)
            await relay.close()


async def hop_floor(procs: Procs, messages: int, warmup: int) -> dict[str, Any]:
    """
    Latency p50/p90/p99 (ms) of bare relay chains of 2 and 3 hops (``{"2": {...}, "3": {...}}``),
    ``messages`` sequential messages each after ``warmup`` uncounted ones. Raises
    :class:`BenchTimeout` if a relay does not start within 30 s, a connection fails, or a message
    takes over 10 s.
    """
    return {str(hops): await _chain(procs, hops, messages, warmup) for hops in (2, 3)}


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(sys.argv[2] if len(sys.argv) > 2 else None))
