"""Tests of ctxsync.exposition: the status object rendered as Prometheus text and parsed back."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.helpers import SAMPLE_BOB, SAMPLE_CAROL, sample_status
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ctxsync.alerts import DEFAULT_RULES, AlertEvaluator
from ctxsync.exposition import CONTENT_TYPE, StatusCollector, render

BOB = SAMPLE_BOB
CAROL = SAMPLE_CAROL

def _status() -> dict[str, Any]:
    doc = sample_status()
    doc["store"].update(appends=5, compactions=1)
    doc["peers"][0].update(queued_bytes=64, queued_frames=1, reconnects=2, protocol_errors=1)
    doc["peers"][1]["protocol_errors"] = 0
    return doc


STATUS: dict[str, Any] = _status()


def parse(text: bytes) -> dict[str, Metric]:
    """Parse exposition text back into families by name."""
    return {family.name: family for family in text_string_to_metric_families(text.decode("utf-8"))}


def values(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the text as {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode("utf-8"))
        for sample in family.samples
    }


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (metric, frozenset(labels.items()))


def test_content_type_is_prometheus_text() -> None:
    """CONTENT_TYPE is prometheus-client's latest text format type."""
    assert CONTENT_TYPE.startswith("text/plain; version=")


def test_node_process_and_store_values() -> None:
    """Node-level metrics carry the status values, ms converted to seconds."""
    got = values(render(STATUS))
    assert got[key("ctxsync_node_info", node_id="IAR6I7S-ALICE", name="alice", version="0.1.0",
                   listen="127.0.0.1:47101")] == 1.0  # fmt: skip
    assert got[key("ctxsync_process_resident_memory_bytes")] == 49_799_168
    assert got[key("ctxsync_process_cpu_percent")] == 1.5
    assert got[key("ctxsync_process_open_fds")] == 16
    assert got[key("ctxsync_process_threads")] == 2
    assert got[key("ctxsync_process_uptime_seconds")] == 9.7
    assert got[key("ctxsync_event_loop_lag_seconds")] == pytest.approx(0.0008)
    assert got[key("ctxsync_event_loop_stalls_total")] == 2
    assert got[key("ctxsync_event_loop_last_stall_seconds")] == 6.25
    assert got[key("ctxsync_updates_in_total")] == 40
    assert got[key("ctxsync_updates_out_total")] == 7
    assert got[key("ctxsync_contexts_loaded")] == 3
    assert got[key("ctxsync_context_loads_total")] == 11
    assert got[key("ctxsync_context_unloads_total")] == 12
    assert got[key("ctxsync_store_size_bytes")] == 131_440
    assert got[key("ctxsync_store_failing")] == 0
    assert got[key("ctxsync_store_commits_total")] == 4
    assert got[key("ctxsync_store_appends_total")] == 5
    assert got[key("ctxsync_store_compactions_total")] == 1
    assert got[key("ctxsync_store_compaction_failures_total")] == 0
    assert got[key("ctxsync_context_entries", context="tasks")] == 2
    assert got[key("ctxsync_context_tombstones", context="tasks")] == 1
    assert key("ctxsync_context_tombstones", context="notes") not in got  # unknown: no sample
    assert got[key("ctxsync_context_version", context="notes")] == 1


def test_peer_values_and_labels() -> None:
    """Peer metrics are labelled by node id; the name is only on ctxsync_peer_connected."""
    got = values(render(STATUS))
    assert got[key("ctxsync_peer_connected", peer=BOB, peer_name="bob")] == 1
    assert got[key("ctxsync_peer_connected", peer=CAROL, peer_name="carol")] == 0
    assert got[key("ctxsync_peer_last_rtt_seconds", peer=BOB)] == pytest.approx(0.005)
    assert got[key("ctxsync_peer_rtt_seconds", peer=BOB, quantile="0.5")] == pytest.approx(0.004)
    assert got[key("ctxsync_peer_rtt_seconds", peer=BOB, quantile="0.9")] == pytest.approx(0.0095)
    assert got[key("ctxsync_peer_rtt_seconds", peer=BOB, quantile="0.99")] == pytest.approx(0.02)
    assert got[key("ctxsync_peer_sent_bytes_total", peer=BOB)] == 217
    assert got[key("ctxsync_peer_received_bytes_total", peer=BOB)] == 416
    assert got[key("ctxsync_peer_sent_updates_total", peer=BOB)] == 1
    assert got[key("ctxsync_peer_received_updates_total", peer=BOB)] == 3
    assert got[key("ctxsync_peer_queued_bytes", peer=CAROL)] == 2048
    assert got[key("ctxsync_peer_queued_frames", peer=CAROL)] == 2
    assert got[key("ctxsync_peer_reconnects_total", peer=CAROL)] == 4
    assert got[key("ctxsync_peer_protocol_errors_total", peer=BOB)] == 1
    assert got[key("ctxsync_peer_context_in_sync", peer=BOB, context="tasks")] == 1
    assert got[key("ctxsync_peer_context_in_sync", peer=BOB, context="notes")] == 0
    assert got[key("ctxsync_peer_context_updates_behind", peer=BOB, context="notes")] == 3
    assert got[key("ctxsync_peer_context_behind_bytes", peer=BOB, context="notes")] == 120
    assert got[key("ctxsync_peer_context_replication_lag_seconds", peer=BOB, context="tasks")] == 0.0125
    assert got[key("ctxsync_peer_context_ack_lag_seconds", peer=BOB, context="tasks")] == 0.007
    assert got[key("ctxsync_peer_context_out_of_sync_seconds", peer=CAROL, context="tasks")] == 75


def test_types_and_units() -> None:
    """Counters are counters named *_total; families with a unit end with it."""
    families = parse(render(STATUS))
    counters = {name for name, family in families.items() if family.type == "counter"}
    assert counters == {
        "ctxsync_updates_in",
        "ctxsync_context_loads",
        "ctxsync_context_unloads",
        "ctxsync_updates_out",
        "ctxsync_event_loop_stalls",
        "ctxsync_store_commits",
        "ctxsync_store_appends",
        "ctxsync_store_compactions",
        "ctxsync_store_compaction_failures",
        "ctxsync_peer_sent_bytes",
        "ctxsync_peer_received_bytes",
        "ctxsync_peer_sent_updates",
        "ctxsync_peer_received_updates",
        "ctxsync_peer_reconnects",
        "ctxsync_peer_protocol_errors",
    }
    assert all(s.name.endswith("_total") for name in counters for s in families[name].samples)
    assert {family.type for name, family in families.items() if name not in counters} == {"gauge"}
    assert all(name.startswith("ctxsync_") for name in families)
    # The unit is declared on the families themselves (prometheus-client puts it in OpenMetrics).
    units = {m.name: m.unit for m in StatusCollector(lambda: STATUS).collect()}
    assert {name for name, unit in units.items() if unit == "seconds"} == {
        "ctxsync_process_uptime_seconds",
        "ctxsync_event_loop_lag_seconds",
        "ctxsync_event_loop_last_stall_seconds",
        "ctxsync_peer_last_rtt_seconds",
        "ctxsync_peer_rtt_seconds",
        "ctxsync_peer_context_replication_lag_seconds",
        "ctxsync_peer_context_ack_lag_seconds",
        "ctxsync_peer_context_out_of_sync_seconds",
    }
    assert {name for name, unit in units.items() if unit == "bytes"} == {
        "ctxsync_process_resident_memory_bytes",
        "ctxsync_store_size_bytes",
        "ctxsync_peer_sent_bytes",
        "ctxsync_peer_received_bytes",
        "ctxsync_peer_queued_bytes",
        "ctxsync_peer_context_behind_bytes",
    }


def test_none_values_are_skipped() -> None:
    """None fields give no sample: a disconnected peer has no RTT, unknown lags are absent."""
    got = values(render(STATUS))
    names_for_carol = {name for (name, labels) in got if ("peer", CAROL) in labels}
    assert "ctxsync_peer_last_rtt_seconds" not in names_for_carol
    assert "ctxsync_peer_rtt_seconds" not in names_for_carol
    assert "ctxsync_peer_context_updates_behind" not in names_for_carol
    assert key("ctxsync_peer_context_replication_lag_seconds", peer=BOB, context="notes") not in got
    assert key("ctxsync_peer_context_ack_lag_seconds", peer=BOB, context="notes") not in got


def test_partial_status_and_unknown_fds() -> None:
    """Missing sections and num_fds = -1 give no samples but keep the families."""
    text = render({"node_id": "A", "process": {"rss_bytes": None, "num_fds": -1}})
    families = parse(text)
    assert "ctxsync_process_open_fds" in families
    assert families["ctxsync_process_open_fds"].samples == []
    assert families["ctxsync_process_resident_memory_bytes"].samples == []
    assert families["ctxsync_store_failing"].samples == []
    assert [s.labels for s in families["ctxsync_node_info"].samples] == [
        {"node_id": "A", "name": "", "version": "", "listen": ""}
    ]
    assert render({})  # nothing at all still renders


def test_empty_peers() -> None:
    """With no peers the peer families are present and empty."""
    families = parse(render({**STATUS, "peers": []}))
    peer_families = [name for name in families if name.startswith("ctxsync_peer_")]
    assert len(peer_families) == 17
    assert all(families[name].samples == [] for name in peer_families)
    assert families["ctxsync_context_entries"].samples


@pytest.mark.parametrize(
    "doc_id",
    ['say "hi"', "back\\slash", "two\nlines", "trailing\\", 'mixed \\"\n\\n', "ünïcødé ☃", "a{b}=c,d"],
)
def test_label_values_are_escaped(doc_id: str) -> None:
    """Context names with quotes, backslashes, new lines and non-ASCII survive a round trip."""
    status = copy.deepcopy(STATUS)
    status["contexts"] = {doc_id: {"entries": 7, "version": 9}}
    status["peers"][0]["contexts"] = {doc_id: STATUS["peers"][0]["contexts"]["tasks"]}
    status["peers"][0]["name"] = f'bob "{doc_id}"'
    text = render(status)
    got = values(text)
    assert got[key("ctxsync_context_entries", context=doc_id)] == 7
    assert got[key("ctxsync_peer_context_in_sync", peer=BOB, context=doc_id)] == 1
    assert got[key("ctxsync_peer_connected", peer=BOB, peer_name=f'bob "{doc_id}"')] == 1
    # One sample per line: a new line in a value never breaks the text.
    entries_lines = [
        line for line in text.decode().splitlines() if line.startswith("ctxsync_context_entries{")
    ]
    assert len(entries_lines) == 1


def test_alerts_active_counts_per_rule() -> None:
    """ctxsync_alerts_active counts active alerts per rule and shows known rules at 0."""
    evaluator = AlertEvaluator(DEFAULT_RULES)
    status = copy.deepcopy(STATUS)
    status["peers"][0]["contexts"]["notes"]["out_of_sync_s"] = 90.0
    evaluator.observe(status, 1_800_000_000.0)
    status["alerts"] = [alert.to_json() for alert in evaluator.active()]
    assert len(status["alerts"]) == 2  # bob/notes and carol/tasks
    got = values(render(status, rules=DEFAULT_RULES))
    active = {dict(labels)["name"]: v for (name, labels), v in got.items() if name == "ctxsync_alerts_active"}
    assert active == {"replication_lag": 0, "rtt_p99": 0, "rss": 0, "peer_out_of_sync": 2}
    assert got[key("ctxsync_alerts_active", name="peer_out_of_sync", severity="warning")] == 2


def test_collector_reads_status_at_each_scrape() -> None:
    """A registered collector calls get_status once per scrape, never at registration."""
    calls: list[int] = []
    current = copy.deepcopy(STATUS)

    def get_status() -> dict[str, Any]:
        calls.append(1)
        return current

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(get_status))
    assert calls == []
    assert values(generate_latest(registry))[key("ctxsync_updates_in_total")] == 40
    current["node"]["updates_in_total"] = 41
    assert values(generate_latest(registry))[key("ctxsync_updates_in_total")] == 41
    assert len(calls) == 2
    # Also with an auto-describing registry (like prometheus-client's global one).
    auto = CollectorRegistry(auto_describe=True)
    auto.register(StatusCollector(get_status))
    assert len(calls) == 2


def test_label_escaping_in_text() -> None:
    """Quotes, backslashes and new lines in label values are escaped as the text format requires."""
    status = {"contexts": {'a"b\\c\nd': {"entries": 1, "version": 1}}}
    lines = render(status).decode().splitlines()
    assert 'ctxsync_context_entries{context="a\\"b\\\\c\\nd"} 1.0' in lines


def test_daemon_loads_prometheus_client_only_when_scraped() -> None:
    """prometheus-client (~2 MiB) is imported by the first GET /metrics, not at daemon start."""
    import subprocess
    import sys

    code = "import sys, ctxsync.daemon; assert 'prometheus_client' not in sys.modules, 'imported at start'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
