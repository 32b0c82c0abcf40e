"""
Prometheus exposition of the daemon's status object, built with prometheus-client.

:class:`StatusCollector` turns the status object (the JSON-ready dict of ``ctxsync status --json``)
into metric families at each scrape; :func:`render` writes them in the Prometheus text format with
``prometheus_client.generate_latest``, served with :data:`CONTENT_TYPE`. Nothing here formats
the text by hand, so names, label values (quotes, backslashes, new lines) and numbers are escaped
by prometheus-client.

Conventions:

* Every name starts with ``ctxsync_`` and ends with its base unit (``_seconds``, ``_bytes``);
  counters end with ``_total``. Milliseconds of the status object are divided by 1000 for the
  ``_seconds`` metrics, and ``bytes_behind`` becomes ``ctxsync_peer_context_behind_bytes`` so that
  the unit ends the name (prometheus-client enforces it for families with a unit).
* Labels are stable ids: ``peer`` is the peer's node id, ``context`` the context's name. The
  peer's name is only on ``ctxsync_peer_connected`` (``peer_name``), to join on.
* A field that is ``None`` (unknown), missing or not a number gives no sample; booleans are 1/0.
* The per-session peer counters (``ctxsync_peer_sent_bytes_total`` …) start again at 0 when a new
  session opens; Prometheus' ``rate()`` and ``increase()`` treat that as a counter reset.
* The RTT percentiles are a gauge family with a ``quantile`` label, not a summary: the status
  object has no ping count or sum, which a summary needs.
* prometheus-client's default process and platform collectors are **not** included (each call of
  :func:`render` uses its own registry); the ``ctxsync_process_*`` metrics come from the status
  object's ``process`` section, sampled by :mod:`ctxsync.metrics`.

Metric families (type; labels; source in the status object):

======================================================  =======  =========================================
name                                                    type     labels; source
======================================================  =======  =========================================
``ctxsync_node_info``                                   gauge 1  node_id, name, version, listen
``ctxsync_process_resident_memory_bytes``               gauge    ``process.rss_bytes``
``ctxsync_process_cpu_percent``                         gauge    ``process.cpu_percent`` (100 = one core,
                                                                 since the previous sample)
``ctxsync_process_open_fds``                            gauge    ``process.num_fds`` (skipped if < 0)
``ctxsync_process_threads``                             gauge    ``process.num_threads``
``ctxsync_process_uptime_seconds``                      gauge    ``process.uptime_s``
``ctxsync_event_loop_lag_seconds``                      gauge    ``node.loop_lag_ms``
``ctxsync_event_loop_stalls_total``                     counter  ``node.loop_stalls_total``
``ctxsync_event_loop_last_stall_seconds``               gauge    ``node.last_loop_stall_s``
``ctxsync_updates_in_total``                            counter  ``node.updates_in_total``
``ctxsync_updates_out_total``                           counter  ``node.updates_out_total``
``ctxsync_contexts_loaded``                             gauge    ``node.contexts_loaded``: contexts in memory
                                                                 (the others are unloaded)
``ctxsync_context_loads_total``                         counter  ``node.context_loads_total``
``ctxsync_context_unloads_total``                       counter  ``node.context_unloads_total``
``ctxsync_store_size_bytes``                            gauge    ``store.size_bytes``
``ctxsync_store_failing``                               gauge    ``store.failing``: 1 if true or an error
                                                                 text, 0 if false or ``None``
``ctxsync_store_commits_total``                         counter  ``store.commits``
``ctxsync_store_appends_total``                         counter  ``store.appends``
``ctxsync_store_compactions_total``                     counter  ``store.compactions``
``ctxsync_store_compaction_failures_total``             counter  ``store.compaction_failures``
``ctxsync_context_entries``                             gauge    context; ``contexts[].entries``
``ctxsync_context_tombstones``                          gauge    context; ``contexts[].tombstones``
``ctxsync_context_version``                             gauge    context; ``contexts[].version``
``ctxsync_peer_connected``                              gauge    peer, peer_name; ``peers[].connected``
``ctxsync_peer_last_rtt_seconds``                       gauge    peer; ``peers[].rtt_ms``
``ctxsync_peer_rtt_seconds``                            gauge    peer, quantile (0.5, 0.9, 0.99);
                                                                 ``peers[].rtt_p50_ms`` …
``ctxsync_peer_sent_bytes_total``                       counter  peer; ``peers[].sent_bytes``
``ctxsync_peer_received_bytes_total``                   counter  peer; ``peers[].received_bytes``
``ctxsync_peer_sent_updates_total``                     counter  peer; ``peers[].sent_updates``
``ctxsync_peer_received_updates_total``                 counter  peer; ``peers[].received_updates``
``ctxsync_peer_queued_bytes``                           gauge    peer; ``peers[].queued_bytes``
``ctxsync_peer_queued_frames``                          gauge    peer; ``peers[].queued_frames``
``ctxsync_peer_reconnects_total``                       counter  peer; ``peers[].reconnects``
``ctxsync_peer_protocol_errors_total``                  counter  peer; ``peers[].protocol_errors``
``ctxsync_peer_context_in_sync``                        gauge    peer, context; ``in_sync``
``ctxsync_peer_context_updates_behind``                 gauge    peer, context; ``updates_behind``
``ctxsync_peer_context_behind_bytes``                   gauge    peer, context; ``bytes_behind``
``ctxsync_peer_context_replication_lag_seconds``        gauge    peer, context; ``replication_lag_ms``
``ctxsync_peer_context_ack_lag_seconds``                gauge    peer, context; ``ack_lag_ms``
``ctxsync_peer_context_out_of_sync_seconds``            gauge    peer, context; ``out_of_sync_s``
``ctxsync_alerts_active``                               gauge    name, severity; number of ``alerts[]``
                                                                 (0 for each known rule without any)
======================================================  =======  =========================================

The ``ctxsync_peer_context_*`` families come from ``peers[].contexts[CONTEXT]``.

This module does no I/O and keeps no state between scrapes. It imports prometheus-client and
:mod:`ctxsync.alerts` (for rule names); no ``asyncio``, ``structlog`` or ``psutil``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .alerts import AlertRule

__all__ = ["CONTENT_TYPE", "RTT_QUANTILES", "StatusCollector", "render"]

CONTENT_TYPE: str = CONTENT_TYPE_LATEST
"""``Content-Type`` of :func:`render`'s output (prometheus-client's ``CONTENT_TYPE_LATEST``)."""

RTT_QUANTILES: tuple[tuple[str, str], ...] = (
    ("0.5", "rtt_p50_ms"),
    ("0.9", "rtt_p90_ms"),
    ("0.99", "rtt_p99_ms"),
)
"""``quantile`` label values of ``ctxsync_peer_rtt_seconds`` and the peer fields they come from."""

_MS = 1000.0


def _number(value: object) -> float | None:
    """A status field as a float; ``None`` for ``None``, missing or non-numeric values."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _section(mapping: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = mapping.get(key)
    return value if isinstance(value, Mapping) else {}


def _gauge(name: str, documentation: str, labels: Iterable[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels), unit=unit)


def _counter(
    name: str, documentation: str, labels: Iterable[str] = (), unit: str = ""
) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=list(labels), unit=unit)


def _add(
    family: GaugeMetricFamily | CounterMetricFamily,
    labels: Iterable[str],
    value: object,
    scale: float = 1.0,
) -> None:
    """Add a sample unless the value is unknown; ``scale`` divides it (1000 for ms → s)."""
    number = _number(value)
    if number is not None:
        family.add_metric(list(labels), number / scale)


_Family = Callable[[str, str, Iterable[str], str], GaugeMetricFamily | CounterMetricFamily]

_PEER_FAMILIES: tuple[tuple[str, float, _Family, str, str, str], ...] = (
    # (status field, divisor, family, name, help, unit), labels: peer
    ("rtt_ms", _MS, _gauge, "ctxsync_peer_last_rtt_seconds", "Latest websocket ping round trip.", "seconds"),
    ("sent_bytes", 1.0, _counter, "ctxsync_peer_sent_bytes_total",
     "Frame bytes sent to the peer in the current session.", "bytes"),
    ("received_bytes", 1.0, _counter, "ctxsync_peer_received_bytes_total",
     "Frame bytes received from the peer in the current session.", "bytes"),
    ("sent_updates", 1.0, _counter, "ctxsync_peer_sent_updates_total",
     "Updates sent to the peer in the current session.", ""),
    ("received_updates", 1.0, _counter, "ctxsync_peer_received_updates_total",
     "Updates received from the peer in the current session.", ""),
    ("queued_bytes", 1.0, _gauge, "ctxsync_peer_queued_bytes",
     "Bytes queued for the peer, not yet handed to the writer.", "bytes"),
    ("queued_frames", 1.0, _gauge, "ctxsync_peer_queued_frames", "Frames queued for the peer.", ""),
    ("reconnects", 1.0, _counter, "ctxsync_peer_reconnects_total",
     "Sessions with the peer opened since start, minus one.", ""),
    ("protocol_errors", 1.0, _counter, "ctxsync_peer_protocol_errors_total",
     "Protocol errors with the peer since start.", ""),
)  # fmt: skip

_PEER_CONTEXT_FAMILIES: tuple[tuple[str, float, _Family, str, str, str], ...] = (
    # (status field, divisor, family, name, help, unit), labels: peer, context
    ("in_sync", 1.0, _gauge, "ctxsync_peer_context_in_sync",
     "1 if the context is in sync with the peer, else 0.", ""),
    ("updates_behind", 1.0, _gauge, "ctxsync_peer_context_updates_behind",
     "Updates of the context not yet replicated between this node and the peer.", ""),
    ("bytes_behind", 1.0, _gauge, "ctxsync_peer_context_behind_bytes",
     "Update bytes of the context not yet replicated between this node and the peer.", "bytes"),
    ("replication_lag_ms", _MS, _gauge, "ctxsync_peer_context_replication_lag_seconds",
     "Time from an update's commit on its origin to its apply here, last seen.", "seconds"),
    ("ack_lag_ms", _MS, _gauge, "ctxsync_peer_context_ack_lag_seconds",
     "Time from sending an update to the peer's acknowledgement, last seen.", "seconds"),
    ("out_of_sync_s", 1.0, _gauge, "ctxsync_peer_context_out_of_sync_seconds",
     "How long the context has been continuously out of sync with the peer (0 when in sync).", "seconds"),
)  # fmt: skip


class StatusCollector(Collector):
    """
    A prometheus-client collector reading the status object at each scrape.

    Register it in a ``CollectorRegistry(auto_describe=False)``. It is *unchecked*
    (:meth:`describe` returns nothing), so registering it never calls ``get_status``.

    Args:
        get_status: Returns the current status object (``ctxsync status --json``); called once
            per :meth:`collect`. Must not block: it runs wherever the scrape is handled.
        rules: The alert rules in force. Each gets a ``ctxsync_alerts_active`` sample, 0 while
            it has no active alert, so that the series exists before the first alert.

    """

    def __init__(
        self, get_status: Callable[[], Mapping[str, Any]], *, rules: Iterable[AlertRule] = ()
    ) -> None:
        self._get_status = get_status
        self.rules: tuple[AlertRule, ...] = tuple(rules)
        """Rules pre-registered at 0 in ``ctxsync_alerts_active``."""

    def describe(self) -> Iterable[Metric]:
        """Describe nothing: the families depend on the status object (an unchecked collector)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """
        Read the status object once and yield its metric families.

        Returns:
            The families of the table in the module docstring, each with the samples whose values
            are known. A family without samples is still yielded (its HELP and TYPE lines).

        """
        status = self._get_status()
        yield from self._node(status)
        yield from self._contexts(status)
        yield from self._peers(status)
        yield self._alerts(status)

    def _node(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        info = InfoMetricFamily("ctxsync_node", "This node: id, name, version, peer listener address.")
        if isinstance(status.get("node_id"), str):
            info.add_metric(
                [],
                {key: str(status.get(key) or "") for key in ("node_id", "name", "version", "listen")},
            )
        yield info

        process = _section(status, "process")
        family = _gauge(
            "ctxsync_process_resident_memory_bytes", "Resident memory of the daemon.", unit="bytes"
        )
        _add(family, [], process.get("rss_bytes"))
        yield family
        family = _gauge(
            "ctxsync_process_cpu_percent",
            "CPU use of the daemon since the previous sample, in percent of one core.",
        )
        _add(family, [], process.get("cpu_percent"))
        yield family
        family = _gauge("ctxsync_process_open_fds", "Open file descriptors of the daemon.")
        fds = _number(process.get("num_fds"))
        if fds is not None and fds >= 0:  # -1: the platform cannot tell
            family.add_metric([], fds)
        yield family
        family = _gauge("ctxsync_process_threads", "Threads of the daemon.")
        _add(family, [], process.get("num_threads"))
        yield family
        family = _gauge("ctxsync_process_uptime_seconds", "Time since the daemon started.", unit="seconds")
        _add(family, [], process.get("uptime_s"))
        yield family

        node = _section(status, "node")
        family = _gauge(
            "ctxsync_event_loop_lag_seconds", "Lag of the daemon's asyncio event loop.", unit="seconds"
        )
        _add(family, [], node.get("loop_lag_ms"), _MS)
        yield family
        counter = _counter(
            "ctxsync_event_loop_stalls_total", "Stalls of the event loop the watchdog saw end (loop.resumed)."
        )
        _add(counter, [], node.get("loop_stalls_total"))
        yield counter
        family = _gauge(
            "ctxsync_event_loop_last_stall_seconds",
            "Length of the event loop's last stall (0 before the first).",
            unit="seconds",
        )
        _add(family, [], node.get("last_loop_stall_s"))
        yield family
        for name, key, documentation in (
            ("ctxsync_updates_in_total", "updates_in_total", "Updates received from peers and applied here."),
            ("ctxsync_updates_out_total", "updates_out_total", "Updates sent to peers."),
            ("ctxsync_context_loads_total", "context_loads_total", "Unloaded contexts loaded back from the store since start."),
            ("ctxsync_context_unloads_total", "context_unloads_total", "Contexts unloaded from memory since start."),
        ):
            counter = _counter(name, documentation)
            _add(counter, [], node.get(key))
            yield counter
        family = _gauge("ctxsync_contexts_loaded", "Contexts whose document is in memory (the others are unloaded).")
        _add(family, [], node.get("contexts_loaded"))
        yield family

        store = _section(status, "store")
        family = _gauge(
            "ctxsync_store_size_bytes", "Size of the SQLite store (db + wal + shm).", unit="bytes"
        )
        _add(family, [], store.get("size_bytes"))
        yield family
        family = _gauge(
            "ctxsync_store_failing", "1 while the store cannot commit (local writes are refused), else 0."
        )
        if "failing" in store:
            failing = store["failing"]
            family.add_metric([], 1.0 if failing is True or (isinstance(failing, str) and failing) else 0.0)
        yield family
        for key, documentation in (
            ("commits", "Write transactions committed to the store since start."),
            ("appends", "Updates appended to the store since start."),
            ("compactions", "Checkpoints written by compaction since start."),
            ("compaction_failures", "Failed compactions since start."),
        ):
            counter = _counter(f"ctxsync_store_{key}_total", documentation)
            _add(counter, [], store.get(key))
            yield counter

    def _contexts(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        entries = _gauge("ctxsync_context_entries", "Live entries of a context.", ["context"])
        tombstones = _gauge(
            "ctxsync_context_tombstones", "Deleted keys of a context, kept as tombstones (they use memory).", ["context"]
        )
        version = _gauge("ctxsync_context_version", "Local change counter of a context.", ["context"])
        for doc_id, context in _section(status, "contexts").items():
            if isinstance(context, Mapping):
                _add(entries, [str(doc_id)], context.get("entries"))
                _add(tombstones, [str(doc_id)], context.get("tombstones"))
                _add(version, [str(doc_id)], context.get("version"))
        yield entries
        yield tombstones
        yield version

    def _peers(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        connected = _gauge(
            "ctxsync_peer_connected",
            "1 if an open session with the paired peer exists, else 0.",
            ["peer", "peer_name"],
        )
        rtt = _gauge(
            "ctxsync_peer_rtt_seconds",
            "Websocket ping round trip percentiles over the recent pings.",
            ["peer", "quantile"],
            unit="seconds",
        )
        per_peer = [
            (field, scale, family(name, documentation, ["peer"], unit))
            for field, scale, family, name, documentation, unit in _PEER_FAMILIES
        ]
        per_context = [
            (field, scale, family(name, documentation, ["peer", "context"], unit))
            for field, scale, family, name, documentation, unit in _PEER_CONTEXT_FAMILIES
        ]
        peers = status.get("peers")
        for peer in peers if isinstance(peers, list) else ():
            if not isinstance(peer, Mapping) or not isinstance(peer.get("node_id"), str):
                continue
            node_id: str = peer["node_id"]
            _add(connected, [node_id, str(peer.get("name") or "")], peer.get("connected"))
            for quantile, field in RTT_QUANTILES:
                _add(rtt, [node_id, quantile], peer.get(field), _MS)
            for field, scale, metric in per_peer:
                _add(metric, [node_id], peer.get(field), scale)
            for doc_id, context in _section(peer, "contexts").items():
                if isinstance(context, Mapping):
                    for field, scale, metric in per_context:
                        _add(metric, [node_id, str(doc_id)], context.get(field), scale)
        yield connected
        yield rtt
        for _, _, metric in per_peer:
            yield metric
        for _, _, metric in per_context:
            yield metric

    def _alerts(self, status: Mapping[str, Any]) -> Metric:
        counts: dict[tuple[str, str], int] = {(rule.name, rule.severity): 0 for rule in self.rules}
        alerts = status.get("alerts")
        for alert in alerts if isinstance(alerts, list) else ():
            if isinstance(alert, Mapping):
                key = (str(alert.get("name", "")), str(alert.get("severity", "")))
                counts[key] = counts.get(key, 0) + 1
        family = _gauge(
            "ctxsync_alerts_active",
            "Active alerts of a rule: one per series (peer, context) past the threshold.",
            ["name", "severity"],
        )
        for (name, severity), count in counts.items():
            family.add_metric([name, severity], count)
        return family


def render(status: Mapping[str, Any], *, rules: Iterable[AlertRule] = ()) -> bytes:
    """
    Render a status object in the Prometheus text exposition format.

    Args:
        status: The daemon's status object (``ctxsync status --json``).
        rules: The alert rules in force, pre-registered at 0 in ``ctxsync_alerts_active``.

    Returns:
        UTF-8 text for an HTTP response with ``Content-Type:`` :data:`CONTENT_TYPE`.

    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status, rules=rules))
    return generate_latest(registry)
