"""Tests of ctxsync.alerts: rules, samples from a status object, evaluation windows, config parsing."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

import pytest

from tests.helpers import SAMPLE_BOB, SAMPLE_CAROL, sample_status

from ctxsync.alerts import (
    DEFAULT_RULES,
    METRICS,
    Alert,
    AlertEvaluator,
    AlertRule,
    Sample,
    Transition,
    parse_rules,
    samples,
)
from ctxsync.errors import ConfigError

BOB = SAMPLE_BOB
CAROL = SAMPLE_CAROL
T0 = 1_800_000_000.0


def status(**changes: Any) -> dict[str, Any]:
    """A realistic status object: two peers (bob connected, carol not), two contexts."""
    doc = sample_status()
    doc.update(changes)
    return doc


def rule(**changes: Any) -> AlertRule:
    values: dict[str, Any] = {
        "name": "lag",
        "metric": "replication_lag_ms",
        "threshold": 100.0,
        "window_s": 30.0,
        "severity": "warning",
    }
    values.update(changes)
    return AlertRule(**values)


def lag(value: float, peer: str = BOB, context: str = "tasks") -> Sample:
    return Sample("replication_lag_ms", (("peer", peer), ("context", context)), value)


# --------------------------------------------------------------------------------------------
# samples()


def test_samples_reads_a_realistic_status() -> None:
    """Reads every alertable metric, labelled by peer node id and context, skipping None values."""
    got = {(s.metric, s.labels): s.value for s in samples(status())}
    bob, carol = (("peer", BOB),), (("peer", CAROL),)
    assert got == {
        ("peer_disconnected", bob): 0.0,
        ("rtt_p99_ms", bob): 20.0,
        ("queued_bytes", bob): 0.0,
        ("replication_lag_ms", (*bob, ("context", "tasks"))): 12.5,
        ("ack_lag_ms", (*bob, ("context", "tasks"))): 7.0,
        ("peer_out_of_sync_s", (*bob, ("context", "tasks"))): 0.0,
        ("peer_out_of_sync_s", (*bob, ("context", "notes"))): 4.0,
        ("peer_disconnected", carol): 1.0,
        ("queued_bytes", carol): 2048.0,
        ("peer_out_of_sync_s", (*carol, ("context", "tasks"))): 75.0,
        ("rss_bytes", ()): 49_799_168.0,
        ("cpu_percent", ()): 1.5,
        ("loop_lag_ms", ()): 0.8,
        ("store_failing", ()): 0.0,
    }


def test_samples_label_names_match_the_metric_table() -> None:
    """Every sample's metric is in METRICS and carries exactly its label names, in order."""
    for sample in samples(status()):
        assert tuple(name for name, _ in sample.labels) == METRICS[sample.metric]


@pytest.mark.parametrize(
    ("failing", "expected"),
    [(True, 1.0), ("disk I/O error", 1.0), (False, 0.0), (None, 0.0), ("", 0.0)],
)
def test_samples_store_failing(failing: object, expected: float) -> None:
    """store.failing true or an error text is 1; false or None (a working store) is 0."""
    doc = status()
    doc["store"]["failing"] = failing
    assert [s.value for s in samples(doc) if s.metric == "store_failing"] == [expected]


def test_samples_of_a_sparse_status() -> None:
    """Missing sections, a peer without contexts and unknown values give no sample and no error."""
    doc = {"node_id": "A", "peers": [{"node_id": BOB, "connected": None}], "process": {"rss_bytes": None}}
    assert samples(doc) == []
    assert samples({}) == []


# --------------------------------------------------------------------------------------------
# AlertRule


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"metric": "replication_lag"}, "metric"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"window_s": -1.0}, "window_s"),
        ({"window_s": float("inf")}, "window_s"),
        ({"severity": "fatal"}, "severity"),
        ({"op": ">="}, "op"),
    ],
)
def test_rule_rejects_invalid_fields(changes: dict[str, Any], key: str) -> None:
    """An invalid field raises ConfigError naming the field."""
    with pytest.raises(ConfigError) as info:
        rule(**changes)
    assert info.value.key == key


def test_rule_suggests_a_close_metric_name() -> None:
    """A misspelt metric name gets a suggestion."""
    with pytest.raises(ConfigError, match="did you mean 'rtt_p99_ms'"):
        rule(metric="rtt_p99")


def test_default_rules_are_valid() -> None:
    """The defaults have unique names, known metrics and the documented thresholds."""
    assert [r.name for r in DEFAULT_RULES] == ["replication_lag", "rtt_p99", "rss", "peer_out_of_sync"]
    by_name = {r.name: r for r in DEFAULT_RULES}
    assert by_name["replication_lag"] == rule(name="replication_lag", threshold=5000.0, window_s=30.0)
    assert (by_name["rtt_p99"].metric, by_name["rtt_p99"].threshold, by_name["rtt_p99"].window_s) == (
        "rtt_p99_ms",
        500.0,
        60.0,
    )
    assert by_name["rss"].threshold == 512 * 1024 * 1024
    oos = by_name["peer_out_of_sync"]
    assert (oos.metric, oos.op, oos.threshold, oos.window_s) == ("peer_out_of_sync_s", ">", 60.0, 0.0)
    for r in DEFAULT_RULES:
        assert dataclasses.replace(r) == r  # revalidates
    AlertEvaluator(DEFAULT_RULES)


# --------------------------------------------------------------------------------------------
# AlertEvaluator


def test_raises_after_the_window_not_before() -> None:
    """A series past the threshold is raised once it has stayed there for window_s."""
    ev = AlertEvaluator([rule()])
    assert ev.observe([lag(150.0)], T0) == []
    assert ev.observe([lag(300.0)], T0 + 29.9) == []
    assert ev.active() == []
    [(kind, alert)] = ev.observe([lag(250.0)], T0 + 30.0)
    assert kind == "raised"
    assert alert == Alert(
        name="lag",
        metric="replication_lag_ms",
        labels=(("peer", BOB), ("context", "tasks")),
        value=250.0,
        threshold=100.0,
        op=">",
        severity="warning",
        since_s=T0 + 30.0,
        window_s=30.0,
    )
    assert ev.active() == [alert]


def test_raised_once_and_value_tracks_latest() -> None:
    """An active alert is not raised again; active() shows the latest value."""
    ev = AlertEvaluator([rule(window_s=0.0)])
    assert [t.kind for t in ev.observe([lag(150.0)], T0)] == ["raised"]
    assert ev.observe([lag(900.0)], T0 + 10) == []
    [alert] = ev.active()
    assert (alert.value, alert.since_s) == (900.0, T0)


def test_zero_window_raises_at_once() -> None:
    """With window_s = 0 the first observation past the threshold raises."""
    ev = AlertEvaluator([rule(window_s=0.0)])
    assert [t.kind for t in ev.observe([lag(101.0)], T0)] == ["raised"]


def test_threshold_itself_is_within() -> None:
    """A value equal to the threshold is not past it."""
    ev = AlertEvaluator([rule(window_s=0.0)])
    assert ev.observe([lag(100.0)], T0) == []


def test_dip_resets_the_window() -> None:
    """One observation within the threshold restarts the window."""
    ev = AlertEvaluator([rule()])
    ev.observe([lag(150.0)], T0)
    ev.observe([lag(150.0)], T0 + 20)
    ev.observe([lag(50.0)], T0 + 25)
    assert ev.observe([lag(150.0)], T0 + 30) == []
    assert ev.observe([lag(150.0)], T0 + 59) == []
    assert [t.kind for t in ev.observe([lag(150.0)], T0 + 60)] == ["raised"]


def test_clears_when_back_within_threshold() -> None:
    """An active alert clears on the first observation within the threshold, with that value."""
    ev = AlertEvaluator([rule(window_s=0.0)])
    ev.observe([lag(150.0)], T0)
    [transition] = ev.observe([lag(20.0)], T0 + 10)
    assert transition.kind == "cleared"
    assert (transition.alert.since_s, transition.alert.value) == (T0, 20.0)
    assert ev.active() == []
    assert ev.observe([lag(20.0)], T0 + 20) == []


def test_clears_when_series_disappears() -> None:
    """An active alert clears when its series is absent (peer removed); a pending window is dropped."""
    ev = AlertEvaluator([rule(window_s=0.0), rule(name="slow", window_s=60.0)])
    ev.observe([lag(150.0), lag(150.0, peer=CAROL)], T0)
    transitions = ev.observe([lag(150.0)], T0 + 10)
    assert [(t.kind, t.alert.name, dict(t.alert.labels)["peer"], t.alert.value) for t in transitions] == [
        ("cleared", "lag", CAROL, 150.0)
    ]
    assert [dict(a.labels)["peer"] for a in ev.active()] == [BOB]
    # carol comes back: a new window for the 60 s rule, a new alert for the 0 s one.
    transitions = ev.observe([lag(150.0), lag(150.0, peer=CAROL)], T0 + 61)
    assert [(t.alert.name, dict(t.alert.labels)["peer"]) for t in transitions] == [
        ("lag", CAROL),
        ("slow", BOB),
    ]


def test_series_are_independent() -> None:
    """Each label set has its own window and alert."""
    ev = AlertEvaluator([rule()])
    ev.observe([lag(150.0, context="tasks")], T0)
    ev.observe([lag(150.0, context="tasks"), lag(150.0, context="notes")], T0 + 20)
    transitions = ev.observe([lag(150.0, context="tasks"), lag(150.0, context="notes")], T0 + 30)
    assert [dict(t.alert.labels)["context"] for t in transitions] == ["tasks"]
    transitions = ev.observe([lag(10.0, context="tasks"), lag(150.0, context="notes")], T0 + 50)
    assert [(t.kind, dict(t.alert.labels)["context"]) for t in transitions] == [
        ("cleared", "tasks"),
        ("raised", "notes"),
    ]


def test_op_less_than() -> None:
    """op '<' alerts on values below the threshold."""
    ev = AlertEvaluator([AlertRule("no_memory", "rss_bytes", 1000.0, 0.0, "critical", op="<")])
    assert ev.observe([Sample("rss_bytes", (), 1000.0)], T0) == []
    [(kind, alert)] = ev.observe([Sample("rss_bytes", (), 999.0)], T0 + 1)
    assert (kind, alert.op, alert.severity) == ("raised", "<", "critical")
    assert [t.kind for t in ev.observe([Sample("rss_bytes", (), 5000.0)], T0 + 2)] == ["cleared"]


def test_observes_a_status_object() -> None:
    """observe() accepts a status object; carol out of sync for 75 s raises at once."""
    ev = AlertEvaluator(DEFAULT_RULES)
    [transition] = ev.observe(status(), T0)
    assert isinstance(transition, Transition)
    kind, alert = transition
    assert kind == "raised"
    assert alert.to_json() == {
        "name": "peer_out_of_sync",
        "metric": "peer_out_of_sync_s",
        "labels": {"peer": CAROL, "context": "tasks"},
        "value": 75.0,
        "threshold": 60.0,
        "op": ">",
        "severity": "warning",
        "since_s": T0,
        "window_s": 0.0,
    }


def test_out_of_sync_rule_catches_a_resync_between_observations() -> None:
    """A resync between two observations restarts the out-of-sync duration, so no alert is raised."""
    ev = AlertEvaluator(DEFAULT_RULES)
    labels = (("peer", BOB), ("context", "tasks"))
    assert ev.observe([Sample("peer_out_of_sync_s", labels, 50.0)], T0) == []
    # Back in sync at T0 + 15, out of sync again since T0 + 40: 20 s, not 70 s.
    assert ev.observe([Sample("peer_out_of_sync_s", labels, 20.0)], T0 + 60) == []
    assert [t.kind for t in ev.observe([Sample("peer_out_of_sync_s", labels, 61.0)], T0 + 101)] == ["raised"]


def test_unknown_value_clears_alert() -> None:
    """rtt_p99_ms becoming None (peer disconnected) removes the series and clears its alert."""
    ev = AlertEvaluator([AlertRule("rtt", "rtt_p99_ms", 10.0, 0.0, "warning")])
    assert [t.kind for t in ev.observe(status(), T0)] == ["raised"]
    doc = status()
    doc["peers"][0]["rtt_p99_ms"] = None
    assert [t.kind for t in ev.observe(doc, T0 + 10)] == ["cleared"]


def test_duplicate_rule_names_are_refused() -> None:
    """Two rules with one name are a ValueError."""
    with pytest.raises(ValueError, match="duplicate"):
        AlertEvaluator([rule(), rule(metric="ack_lag_ms")])


# --------------------------------------------------------------------------------------------
# parse_rules()


def alert_tables(toml_text: str) -> object:
    return tomllib.loads(toml_text).get("alert", [])


def test_parse_adds_new_rules_after_defaults() -> None:
    """A table with a new name adds a rule; window_s, severity and op have defaults."""
    rules = parse_rules(
        alert_tables(
            """
            [[alert]]
            name = "queue"
            metric = "queued_bytes"
            threshold = 1048576

            [[alert]]
            name = "store"
            metric = "store_failing"
            threshold = 0.5
            window_s = 5
            severity = "critical"
            op = ">"
            """
        )
    )
    assert rules[: len(DEFAULT_RULES)] == DEFAULT_RULES
    assert rules[len(DEFAULT_RULES) :] == (
        AlertRule("queue", "queued_bytes", 1048576.0, 0.0, "warning"),
        AlertRule("store", "store_failing", 0.5, 5.0, "critical"),
    )
    assert isinstance(rules[-1].window_s, float)


def test_parse_overrides_and_disables_defaults() -> None:
    """A table naming a default overrides the keys it gives; enabled = false drops the rule."""
    rules = parse_rules(
        alert_tables(
            """
            [[alert]]
            name = "rss"
            threshold = 1073741824
            severity = "critical"

            [[alert]]
            name = "rtt_p99"
            enabled = false
            """
        )
    )
    assert [r.name for r in rules] == ["replication_lag", "rss", "peer_out_of_sync"]
    rss = rules[1]
    assert (rss.metric, rss.threshold, rss.window_s, rss.severity) == (
        "rss_bytes",
        1073741824.0,
        60.0,
        "critical",
    )


def test_parse_without_defaults() -> None:
    """defaults=() gives only the configured rules; an empty list gives none."""
    assert parse_rules([], defaults=()) == ()
    assert parse_rules([]) == DEFAULT_RULES


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"name": "x"}, "alert", "expected an array of tables"),
        ([1], "alert[0]", "expected a table"),
        ([{"metric": "rss_bytes", "threshold": 1}], "alert[0].name", "missing required key"),
        ([{"name": "x", "threshold": 1}], "alert[0].metric", "missing required key"),
        ([{"name": "x", "metric": "rss_bytes"}], "alert[0].threshold", "missing required key"),
        (
            [
                {"name": "a", "metric": "rss_bytes", "threshold": 1},
                {"name": "x", "metric": "rss_byte", "threshold": 1},
            ],
            "alert[1].metric",
            "did you mean 'rss_bytes'",
        ),
        ([{"name": "x", "metric": "rss_bytes", "threshold": "1"}], "alert[0].threshold", "expected a number"),
        (
            [{"name": "x", "metric": "rss_bytes", "threshold": True}],
            "alert[0].threshold",
            "expected a number",
        ),
        ([{"name": "x", "metric": "rss_bytes", "threshold": 1, "window_s": -5}], "alert[0].window_s", ">= 0"),
        (
            [{"name": "x", "metric": "rss_bytes", "threshold": 1, "severity": "high"}],
            "alert[0].severity",
            "info",
        ),
        (
            [{"name": "x", "metric": "rss_bytes", "threshold": 1, "op": "<="}],
            "alert[0].op",
            "expected one of: >, <; did you mean '<'?",
        ),
        (
            [{"name": "x", "metric": "rss_bytes", "threshold": 1, "windows": 5}],
            "alert[0].windows",
            "window_s",
        ),
        ([{"name": 3}], "alert[0].name", "expected a string"),
        ([{"name": "rss", "enabled": "no"}], "alert[0].enabled", "expected true or false"),
        ([{"name": "rss", "metric": 5}], "alert[0].metric", "expected a string"),
        ([{"name": "rss", "metric": "nope"}], "alert[0].metric", "unknown metric"),
        (
            [{"name": "rss", "enabled": False}, {"name": "rss", "threshold": 1}],
            "alert[1].name",
            "duplicate rule name 'rss' (also alert[0])",
        ),
        ([{"name": "rtt_p90", "enabled": False}], "alert[0].metric", "no default rule is named 'rtt_p90'"),
    ],
)
def test_parse_errors_name_the_key(raw: object, key: str, message: str) -> None:
    """Every invalid table raises ConfigError naming alert[INDEX].KEY and the file."""
    with pytest.raises(ConfigError, match="config.toml") as info:
        parse_rules(raw, path="config.toml")
    assert info.value.key == key
    assert info.value.path == "config.toml"
    assert message in str(info.value)
