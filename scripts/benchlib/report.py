"""The one results table of ``scripts/bench``: rows, targets (PASS/MISS), text and markdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from benchlib.ctx import CtxResults
from benchlib.pws import PwsResults


@dataclass
class Row:
    metric: str
    ctxsync: str
    pws: str
    ratio: str
    target: str
    result: str  # PASS, MISS, or "" (no target)


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _procs(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items()) or "-"


def build_rows(cfg: Any, c: CtxResults | None, p: PwsResults | None) -> list[Row]:
    rows: list[Row] = []
    n_lat = f"{cfg.latency_writes:,}"
    # convergence latency
    for q, target in (("p50", True), ("p90", False), ("p99", True)):
        cv = c.latency.get(f"{q}_ms") if c else None
        pv = p.latency.get(f"{q}_ms") if p else None
        ok = cv is not None and pv is not None and cv <= pv
        rows.append(
            Row(
                f"convergence latency {q}, {n_lat} sequential writes (ms)",
                _f(cv, 2), _f(pv, 2), _ratio(cv, pv),
                "<= pycrdt-websocket" if target else "",
                _verdict(ok) if target and cv is not None and pv is not None else "",
            )
        )  # fmt: skip
    floor = c.hop_floor if c else {}
    if floor:  # runs from before this row have none
        for q in ("p50", "p99"):
            f3, f2 = floor["3"].get(f"{q}_ms"), floor["2"].get(f"{q}_ms")
            rows.append(
                Row(
                    f"of which the hops alone: bare relays, 3 hops / 2 hops, {q} (ms)",
                    _f(f3, 2), _f(f2, 2), _ratio(f3, f2), "", "",
                )
            )  # fmt: skip
    elif c and c.hop_floor_error:
        rows.append(Row("of which the hops alone: bare relays, 3 hops / 2 hops (ms)", f"not measured: {c.hop_floor_error}", "-", "-", "", ""))
    # throughput
    ct = c.tput.get("writes_per_s") if c else None
    pt = p.tput.get("writes_per_s") if p else None
    pws_ok = p is None or p.tput.get("converged", False)
    verdict = ""
    if c and p:
        verdict = _verdict(not pws_ok or (ct is not None and pt is not None and ct >= 5 * pt))
    rows.append(
        Row(
            f"converged throughput, {cfg.tput_writes:,} writes, all pipelined (writes/s)",
            _f(ct, 0), _f(pt, 0) if pws_ok else f"did not converge: {p.tput.get('why')}" if p else "-",
            _ratio(ct, pt), ">= 5x (aim 10x)", verdict,
        )
    )  # fmt: skip
    if c and c.tput_window:  # runs from before this row have none
        cw = c.tput_window.get("writes_per_s")
        rows.append(
            Row(
                f"converged throughput, {c.tput_window['window']:,} sets in flight (writes/s)",
                _f(cw, 0), _f(pt, 0) if p and pws_ok else "-", _ratio(cw, pt) if pws_ok else "-", "", "",
            )
        )  # fmt: skip
    # CPU per replicated write
    ccpu = c.tput.get("cpu_us_per_write", {}) if c else {}
    pcpu = p.tput.get("cpu_us_per_write", {}) if p else {}
    for who, label in (("a", "writer (ctxsync a / client a)"), ("b", "receiver (ctxsync b / client b)")):
        cv, pv = ccpu.get(who), pcpu.get(who)
        rows.append(
            Row(
                f"CPU per replicated write, {label} (µs)",
                _f(cv),
                _f(pv),
                _ratio(cv, pv),
                "< 25 per daemon",
                _verdict(cv < 25) if cv is not None else "",
            )
        )
    if pcpu:
        rows.append(
            Row(
                "CPU per replicated write, pycrdt-websocket server (µs)",
                "-",
                _f(pcpu.get("server")),
                "-",
                "",
                "",
            )
        )
    # catch-up after being offline
    rows += _catchup_rows(
        f"catch-up of {cfg.catchup_keys:,} keys after being offline (s)",
        c.catchup if c else None, p.catchup if p else None, p.catchup_unlimited if p else None,
        "<= pycrdt-websocket", lambda cv, pv: pv is None or cv <= pv, needs_pws=True,
    )  # fmt: skip
    rows += _catchup_rows(
        f"new node catches up {cfg.join_keys:,} keys (s)",
        c.join if c else None, p.join if p else None, p.join_unlimited if p else None,
        "< 1 s", lambda cv, pv: cv < 1.0, needs_pws=False,
    )  # fmt: skip
    # memory
    if c or p:
        cmax = max(c.idle_rss.values()) if c and c.idle_rss else None
        ps = p.idle_rss.get("server") if p else None
        rows.append(
            Row(
                "idle RSS (MiB)",
                _procs(c.idle_rss) if c else "-",
                _procs(p.idle_rss) if p else "-",
                _ratio(cmax, ps) + (" vs server" if cmax and ps else ""),
                "< 45 per daemon",
                _verdict(cmax < 45) if cmax is not None else "",
            )
        )
        if c and c.import_rss is not None:
            rows.append(
                Row(
                    "of which imports: the daemon's modules imported, nothing run (MiB)",
                    f"{c.import_rss:.1f}",
                    "-",
                    "-",
                    "",
                    "",
                )
            )
        cmax = max(c.big_rss.values()) if c and c.big_rss else None
        ps = p.big_rss.get("server") if p else None
        rows.append(
            Row(
                f"RSS holding {cfg.join_keys:,} keys (MiB)",
                _procs(c.big_rss) if c else "-",
                _procs(p.big_rss) if p else "-",
                _ratio(cmax, ps) + (" vs server" if cmax and ps else ""),
                "< 100 per daemon",
                _verdict(cmax < 100) if cmax is not None else "",
            )
        )
    # ctxsync only
    if c:
        rows.append(
            Row(
                "durable write latency p50, set acknowledged (ms)",
                _f(c.ack.get("p50_ms"), 2),
                "n/a (not durable)",
                "-",
                "",
                "",
            )
        )
        rows.append(
            Row(
                "durable write latency p99, set acknowledged (ms)",
                _f(c.ack.get("p99_ms"), 2),
                "n/a (not durable)",
                "-",
                "",
                "",
            )
        )
        m = c.mesh.get("nodes", cfg.mesh_nodes)
        for q in ("p50", "p99"):
            rows.append(
                Row(
                    f"{m}-node full mesh convergence {q} to all {m - 1} peers, {cfg.mesh_writes} writes (ms)",
                    _f(c.mesh.get(f"{q}_ms"), 2),
                    "n/a",
                    "-",
                    "",
                    "",
                )
            )
    return rows


def _catchup_rows(
    label: str,
    c: dict[str, Any] | None,
    p: dict[str, Any] | None,
    p_unl: dict[str, Any] | None,
    target: str,
    ok: Any,
    *,
    needs_pws: bool,
) -> list[Row]:
    cv = c.get("seconds") if c else None
    ctxt = "-" if cv is None else f"{cv:.2f} (start {c['start_s']:.2f})"
    if p is None:
        ptxt, pv = "-", None
    elif p.get("converged"):
        pv = p["seconds"]
        ptxt = f"{pv:.2f}"
    else:
        pv = None
        ptxt = f"did not converge: {p['why']}"
    verdict = _verdict(bool(ok(cv, pv))) if cv is not None and (p is not None or not needs_pws) else ""
    rows = [Row(label, ctxt, ptxt, _ratio(cv, pv), target, verdict)]
    if p_unl:
        uv = p_unl.get("seconds") if p_unl.get("converged") else None
        utxt = f"{uv:.2f}" if uv is not None else f"did not converge: {p_unl.get('why')}"
        rows.append(
            Row("  same, pycrdt-websocket client with max_size=None (s)", ctxt, utxt, _ratio(cv, uv), "", "")
        )
    return rows


HEADERS = ("metric", "ctxsync", "pycrdt-websocket", "ratio", "target", "result")


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS] + [(r.metric, r.ctxsync, r.pws, r.ratio, r.target, r.result) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        result = f"**{r.result}**" if r.result else ""
        lines.append(
            "| "
            + " | ".join(esc(x) for x in (r.metric.strip(), r.ctxsync, r.pws, r.ratio, r.target, result))
            + " |"
        )
    return "\n".join(lines)


def machine_text(m: dict[str, Any], markdown: bool) -> str:
    items = [
        ("date", m["date"]),
        ("CPU", f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM"),
        ("OS", m["os"]),
        ("temp dir file system", m["tmp_fs"]),
        ("Python", m["python"]),
        ("ctxsync under test", m.get("ctxsync_source", "-")),
        (
            "versions",
            f"ctxsync {m['ctxsync']}, pycrdt {m['pycrdt']}, pycrdt-websocket {m['pycrdt-websocket']}, websockets {m['websockets']}",
        ),
        ("load average (1/5/15 min) before / after", f"{m['load_before']} / {m.get('load_after', '-')}"),
        ("mode", m.get("mode", "")),
        ("extra environment of the ctxsync processes", m.get("daemon_env", "-")),
        ("ctxsync bytecode", m.get("bytecode", "not recorded (runs before it was compiled first)")),
    ]
    if markdown:
        return "\n".join(f"- {k}: {v}" for k, v in items)
    w = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in items)


def as_json(
    cfg: Any, machine: dict[str, Any], c: CtxResults | None, p: PwsResults | None, rows: list[Row]
) -> dict[str, Any]:
    return {
        "machine": machine,
        "config": asdict(cfg),
        "ctxsync": asdict(c) if c else None,
        "pycrdt_websocket": asdict(p) if p else None,
        "rows": [asdict(r) for r in rows],
    }
