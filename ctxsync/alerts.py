"""
Threshold alerts over the daemon's status object: rules, samples and a deterministic evaluator.

A rule (:class:`AlertRule`) watches one metric of the closed set below. :func:`samples` reads the
metric values out of the status object (the JSON-ready dict of ``ctxsync status --json``) as
:class:`Sample` series, one per label set. :class:`AlertEvaluator` keeps, for every
``(rule, labels)`` series, when it first went past its threshold, raises an :class:`Alert` once the
series has stayed past it for the rule's ``window_s``, and clears the alert when the series comes
back. It returns the raised and cleared alerts as :class:`Transition` values; the caller logs them
and puts :meth:`AlertEvaluator.active` into the status object's ``alerts``.

Metrics a rule can watch (:data:`METRICS`). Labels are stable ids only: ``peer`` is the peer's
node id, ``context`` the context's name (its ``doc_id``). Node metrics have no labels. A field that
is ``None`` (unknown) or missing gives no sample:

======================  ==============  =====================================================
metric                  labels          value (unit), from the status object
======================  ==============  =====================================================
``replication_lag_ms``  peer, context   ``peers[].contexts[].replication_lag_ms``: origin
                                        commit to apply here, last seen (milliseconds)
``ack_lag_ms``          peer, context   ``peers[].contexts[].ack_lag_ms``: our send to the
                                        peer's acknowledgement (milliseconds)
``rtt_p99_ms``          peer            ``peers[].rtt_p99_ms``: ping round trip, 99th
                                        percentile (milliseconds)
``peer_out_of_sync_s``  peer, context   ``peers[].contexts[].out_of_sync_s``: how long the
                                        context has been continuously out of sync with the
                                        peer, 0 when in sync (seconds)
``peer_disconnected``   peer            1 if the paired peer has no open session, else 0
                                        (from ``peers[].connected``)
``queued_bytes``        peer            ``peers[].queued_bytes``: queued, unsent (bytes)
``rss_bytes``           (none)          ``process.rss_bytes``: resident memory (bytes)
``cpu_percent``         (none)          ``process.cpu_percent``: since the previous sample,
                                        100 = one core busy (percent)
``loop_lag_ms``         (none)          ``node.loop_lag_ms``: asyncio event loop lag
                                        (milliseconds)
``store_failing``       (none)          1 if ``store.failing`` is true or an error text, 0 if
                                        it is false or ``None`` (``None`` is how the status
                                        object reports a working store)
======================  ==============  =====================================================

Evaluation rules (:meth:`AlertEvaluator.observe`):

1. A series is *past* the threshold when ``value > threshold`` (``op = ">"``) or
   ``value < threshold`` (``op = "<"``). Equal is within.
2. The first observation past the threshold starts the series' window. The alert is raised at the
   first observation at which the series has been past the threshold for at least ``window_s``
   seconds, counted from that start; with ``window_s = 0`` it is raised at once. One observation
   within the threshold resets the window.
3. An active alert is cleared by the first observation in which its series is within the
   threshold, **or in which the series is absent** (peer removed, context deleted, value unknown
   such as ``rtt_p99_ms`` while disconnected). A stale alert never outlives its series; a series
   that comes back starts a new window.
4. Time comes only from the ``now_s`` argument, so evaluation is deterministic.

``peer_out_of_sync_s`` already measures a duration, so "out of sync for longer than a minute" is
``peer_out_of_sync_s > 60`` with ``window_s = 0`` (the default rule ``peer_out_of_sync``): it is
raised on the first observation after the minute even if the evaluator started later or observes
rarely, and a resync in between (the value drops back to 0) is never missed. Watching
``> 0`` for 60 s instead would miss resyncs between two observations.

Rules come from the defaults (:data:`DEFAULT_RULES`) and the ``[[alert]]`` tables of the
configuration, merged by :func:`parse_rules`.

This module is pure: it imports nothing but the standard library and :mod:`ctxsync.errors`; no
``asyncio``, ``structlog``, ``psutil`` or I/O. It returns values and raises errors; the caller logs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, NoReturn, TypeAlias, get_args

from .errors import ConfigError

__all__ = [
    "DEFAULT_RULES",
    "METRICS",
    "OPS",
    "SEVERITIES",
    "Alert",
    "AlertEvaluator",
    "AlertRule",
    "Labels",
    "Op",
    "Sample",
    "Severity",
    "Transition",
    "parse_rules",
    "samples",
]

Severity: TypeAlias = Literal["info", "warning", "critical"]
"""How bad an alert is."""

SEVERITIES: tuple[Severity, ...] = get_args(Severity)
"""Accepted severities, mildest first."""

Op: TypeAlias = Literal[">", "<"]
"""Comparison of a value with a rule's threshold: past it when ``value OP threshold``."""

OPS: tuple[Op, ...] = get_args(Op)
"""Accepted comparison operators."""

Labels: TypeAlias = tuple[tuple[str, str], ...]
"""Labels of a series as ``((name, value), ...)``, in the order :data:`METRICS` lists the names."""

METRICS: Mapping[str, tuple[str, ...]] = {
    "replication_lag_ms": ("peer", "context"),
    "ack_lag_ms": ("peer", "context"),
    "rtt_p99_ms": ("peer",),
    "peer_out_of_sync_s": ("peer", "context"),
    "peer_disconnected": ("peer",),
    "queued_bytes": ("peer",),
    "rss_bytes": (),
    "cpu_percent": (),
    "loop_lag_ms": (),
    "store_failing": (),
}
"""The metrics a rule can watch, each with its label names (see the table in the module docstring)."""

RULE_NAME_MAX_CHARS = 64
"""Longest rule name, in characters."""

_RULE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class _RuleError(ConfigError):
    """A rule field is invalid; :func:`parse_rules` re-raises it with the table's key and path."""

    def __init__(self, reason: str, *, key: str) -> None:
        super().__init__(reason, key=key)
        self.reason = reason


def _invalid(key: str, reason: str) -> NoReturn:
    raise _RuleError(reason, key=key)


def _one_of(value: object, allowed: Sequence[str]) -> str:
    hint = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
    also = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"got {value!r}, expected one of: {', '.join(allowed)}{also}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True, slots=True)
class AlertRule:
    """
    One threshold rule: alert when ``metric`` stays past ``threshold`` for ``window_s`` seconds.

    Raises:
        ConfigError: On construction, if a field is invalid (``key`` names the field: ``name``,
            ``metric``, ``threshold``, ``window_s``, ``severity`` or ``op``).

    """

    name: str
    """Unique rule name, e.g. ``"replication_lag"``: 1..64 of ``A-Z a-z 0-9 _ . -``."""
    metric: str
    """Watched metric, a key of :data:`METRICS`."""
    threshold: float
    """Threshold, in the metric's unit (the suffix of its name: ms, s, bytes, percent, 0/1)."""
    window_s: float
    """How long the metric must stay past the threshold before the alert is raised, in seconds (>= 0)."""
    severity: Severity
    """``"info"``, ``"warning"`` or ``"critical"``."""
    op: Op = ">"
    """``">"``: alert when the value is above the threshold; ``"<"``: below it."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _invalid("name", f"expected a non-empty string, got {self.name!r}")
        if len(self.name) > RULE_NAME_MAX_CHARS or not _RULE_NAME_RE.fullmatch(self.name):
            _invalid(
                "name",
                f"must be 1..{RULE_NAME_MAX_CHARS} of A-Z a-z 0-9 _ . - (not starting with . or -), "
                f"got {self.name!r}",
            )
        if self.metric not in METRICS:
            _invalid("metric", f"unknown metric: {_one_of(self.metric, list(METRICS))}")
        if not _is_number(self.threshold) or not math.isfinite(self.threshold):
            _invalid("threshold", f"expected a finite number, got {self.threshold!r}")
        if not _is_number(self.window_s) or not math.isfinite(self.window_s):
            _invalid("window_s", f"expected a finite number of seconds, got {self.window_s!r}")
        if self.window_s < 0:
            _invalid("window_s", f"must be >= 0, got {self.window_s!r}")
        if self.severity not in SEVERITIES:
            _invalid("severity", _one_of(self.severity, SEVERITIES))
        if self.op not in OPS:
            _invalid("op", _one_of(self.op, OPS))

    def is_past(self, value: float) -> bool:
        """
        Tell whether a value is past this rule's threshold.

        Args:
            value: A sample value, in the metric's unit.

        Returns:
            ``value > threshold`` for ``op = ">"``, ``value < threshold`` for ``op = "<"``.

        """
        return value > self.threshold if self.op == ">" else value < self.threshold


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule("replication_lag", "replication_lag_ms", 5000.0, 30.0, "warning"),
    AlertRule("rtt_p99", "rtt_p99_ms", 500.0, 60.0, "warning"),
    AlertRule("rss", "rss_bytes", float(512 * 1024 * 1024), 60.0, "warning"),
    AlertRule("peer_out_of_sync", "peer_out_of_sync_s", 60.0, 0.0, "warning"),
)
"""Rules in force unless the configuration replaces or disables them (see :func:`parse_rules`):

* ``replication_lag``: ``replication_lag_ms > 5000`` for 30 s;
* ``rtt_p99``: ``rtt_p99_ms > 500`` for 60 s;
* ``rss``: ``rss_bytes > 512 MiB`` for 60 s;
* ``peer_out_of_sync``: a context out of sync with a peer for more than 60 s
  (``peer_out_of_sync_s > 60``, window 0: the metric is already a duration).

All are ``warning``.
"""

_RULE_KEYS = ("name", "metric", "threshold", "window_s", "severity", "op", "enabled")


def parse_rules(
    raw: object, *, defaults: Iterable[AlertRule] = DEFAULT_RULES, path: str | None = None
) -> tuple[AlertRule, ...]:
    """
    Parse the ``[[alert]]`` tables of the configuration and merge them with the default rules.

    Each table has the keys ``name`` (string), ``metric`` (string, see :data:`METRICS`),
    ``threshold`` (number, in the metric's unit), ``window_s`` (number of seconds, default 0),
    ``severity`` (``"info"``, ``"warning"`` (default) or ``"critical"``), ``op`` (``">"`` (default)
    or ``"<"``) and ``enabled`` (boolean, default true).

    Merging with ``defaults``:

    * A table whose ``name`` is a default rule's name *overrides* that rule: the keys it gives
      replace the default's values, the others are kept. ``[[alert]] name = "rss"
      threshold = 1073741824`` only raises the RSS threshold.
    * ``enabled = false`` drops the rule: ``[[alert]] name = "rtt_p99" enabled = false`` disables a
      default. A disabled table that names no default must still be a complete, valid rule, so a
      misspelt default name is reported instead of silently disabling nothing.
    * Any other table is a new rule and needs at least ``name``, ``metric`` and ``threshold``.

    Args:
        raw: The value of the ``alert`` key of the parsed TOML: a list of tables (dicts).
        defaults: The default rules; pass ``()`` to use the configured rules only.
        path: The configuration file, for error messages.

    Returns:
        The rules in force: the defaults in their order (overridden ones in place, disabled ones
        left out), then the new rules in file order.

    Raises:
        ConfigError: If ``raw`` is not a list of tables, a table has an unknown key or lacks a
            required one, a value has the wrong type or is invalid, or two tables have the same
            name. The key is named like ``alert[2].metric``.

    """

    def fail(key: str, reason: str) -> NoReturn:
        raise ConfigError(reason, path=path, key=key)

    if not isinstance(raw, list):
        fail("alert", f"expected an array of tables [[alert]], got {type(raw).__name__}")
    by_default_name = {rule.name: rule for rule in defaults}
    overrides: dict[str, AlertRule | None] = {}
    added: list[AlertRule] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(raw):
        prefix = f"alert[{i}]"
        if not isinstance(table, dict):
            fail(prefix, f"expected a table, got {type(table).__name__}")
        for key in table:
            if key not in _RULE_KEYS:
                fail(f"{prefix}.{key}", f"unknown key: {_one_of(key, _RULE_KEYS)}")
        if "name" not in table:
            fail(f"{prefix}.name", "missing required key")
        name = table["name"]
        if not isinstance(name, str):
            fail(f"{prefix}.name", f"expected a string, got {type(name).__name__}")
        if name in seen:
            fail(f"{prefix}.name", f"duplicate rule name {name!r} (also alert[{seen[name]}])")
        seen[name] = i
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            fail(f"{prefix}.enabled", f"expected true or false, got {type(enabled).__name__}")
        values: dict[str, Any] = {}
        for key in ("metric", "severity", "op"):
            if key in table:
                if not isinstance(table[key], str):
                    fail(f"{prefix}.{key}", f"expected a string, got {type(table[key]).__name__}")
                values[key] = table[key]
        for key in ("threshold", "window_s"):
            if key in table:
                if not _is_number(table[key]):
                    fail(f"{prefix}.{key}", f"expected a number, got {type(table[key]).__name__}")
                values[key] = float(table[key])
        base = by_default_name.get(name)
        if base is None:
            for key in ("metric", "threshold"):
                if key not in values:
                    fail(f"{prefix}.{key}", f"missing required key (no default rule is named {name!r})")
            values = {"window_s": 0.0, "severity": "warning", "op": ">", **values}
        try:
            rule = AlertRule(name=name, **values) if base is None else dataclasses.replace(base, **values)
        except _RuleError as exc:
            fail(f"{prefix}.{exc.key}", exc.reason)
        if base is not None:
            overrides[name] = rule if enabled else None
        elif enabled:
            added.append(rule)
    merged = [overrides.get(rule.name, rule) for rule in by_default_name.values()]
    return tuple(rule for rule in merged if rule is not None) + tuple(added)


# --------------------------------------------------------------------------------------------
# Samples


class Sample(NamedTuple):
    """One value of one series, read from the status object."""

    metric: str
    """A key of :data:`METRICS`."""
    labels: Labels
    """The series' labels, e.g. ``(("peer", node_id), ("context", doc_id))``; ``()`` for node metrics."""
    value: float
    """The value, in the metric's unit."""


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _section(status: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = status.get(key)
    return value if isinstance(value, Mapping) else {}


def samples(status: Mapping[str, Any]) -> list[Sample]:
    """
    Read the alertable metrics out of a status object.

    Args:
        status: The daemon's status object (``ctxsync status --json``): ``peers``, ``process``,
            ``node``, ``store``. Missing sections or fields, ``None`` values and values that are
            not finite numbers give no sample.

    Returns:
        Samples in status order: per peer ``peer_disconnected``, ``rtt_p99_ms``, ``queued_bytes``,
        then per shared context ``replication_lag_ms``, ``ack_lag_ms``, ``peer_out_of_sync_s``;
        then ``rss_bytes``, ``cpu_percent``, ``loop_lag_ms``, ``store_failing``.

    """
    out: list[Sample] = []

    def add(metric: str, labels: Labels, raw: object) -> None:
        value = _number(raw)
        if value is not None:
            out.append(Sample(metric, labels, value))

    peers = status.get("peers")
    for peer in peers if isinstance(peers, list) else ():
        if not isinstance(peer, Mapping) or not isinstance(peer.get("node_id"), str):
            continue
        peer_labels: Labels = (("peer", peer["node_id"]),)
        connected = peer.get("connected")
        if isinstance(connected, bool):
            add("peer_disconnected", peer_labels, not connected)
        add("rtt_p99_ms", peer_labels, peer.get("rtt_p99_ms"))
        add("queued_bytes", peer_labels, peer.get("queued_bytes"))
        for doc_id, context in _section(peer, "contexts").items():
            if not isinstance(context, Mapping):
                continue
            labels: Labels = (*peer_labels, ("context", str(doc_id)))
            add("replication_lag_ms", labels, context.get("replication_lag_ms"))
            add("ack_lag_ms", labels, context.get("ack_lag_ms"))
            add("peer_out_of_sync_s", labels, context.get("out_of_sync_s"))
    process = _section(status, "process")
    add("rss_bytes", (), process.get("rss_bytes"))
    add("cpu_percent", (), process.get("cpu_percent"))
    add("loop_lag_ms", (), _section(status, "node").get("loop_lag_ms"))
    store = _section(status, "store")
    if "failing" in store:
        failing = store["failing"]
        add("store_failing", (), failing is True or (isinstance(failing, str) and failing != ""))
    return out


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert: one series of one rule past its threshold for the rule's window."""

    name: str
    """The rule's name."""
    metric: str
    """The watched metric."""
    labels: Labels
    """The series' labels."""
    value: float
    """The latest observed value, in the metric's unit. For a cleared alert: the value that cleared
    it, or the last value past the threshold if the series disappeared."""
    threshold: float
    """The rule's threshold, in the metric's unit."""
    op: Op
    """The rule's comparison."""
    severity: Severity
    """The rule's severity."""
    since_s: float
    """When the alert was raised: the ``now_s`` of that observation (Unix time, seconds)."""
    window_s: float
    """The rule's window, in seconds."""

    def to_json(self) -> dict[str, Any]:
        """
        Return the alert as a JSON-ready dict, as in the status object's ``alerts``.

        Returns:
            ``{"name", "metric", "labels": {name: value}, "value", "threshold", "op", "severity",
            "since_s", "window_s"}``.

        """
        return {
            "name": self.name,
            "metric": self.metric,
            "labels": dict(self.labels),
            "value": self.value,
            "threshold": self.threshold,
            "op": self.op,
            "severity": self.severity,
            "since_s": self.since_s,
            "window_s": self.window_s,
        }


class Transition(NamedTuple):
    """An alert raised or cleared by one :meth:`AlertEvaluator.observe`; unpacks as ``(kind, alert)``."""

    kind: Literal["raised", "cleared"]
    """``"raised"`` or ``"cleared"``."""
    alert: Alert
    """The alert, with the value of this observation."""


class AlertEvaluator:
    """
    Evaluate rules over successive status objects and keep the active alerts.

    Feed it with :meth:`observe` once per sampling period; it never reads the clock.

    Args:
        rules: The rules in force, e.g. from :func:`parse_rules`.

    Raises:
        ValueError: If two rules have the same name.

    """

    def __init__(self, rules: Iterable[AlertRule] = DEFAULT_RULES) -> None:
        self.rules: tuple[AlertRule, ...] = tuple(rules)
        """The rules, in evaluation order."""
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate alert rule names: {', '.join(duplicates)}")
        self._pending: dict[str, dict[Labels, float]] = {rule.name: {} for rule in self.rules}
        self._active: dict[tuple[str, Labels], Alert] = {}

    def observe(self, status: Mapping[str, Any] | Iterable[Sample], now_s: float) -> list[Transition]:
        """
        Evaluate every rule against one observation.

        Args:
            status: A status object (read with :func:`samples`) or samples. If a series appears
                more than once, its last sample counts.
            now_s: Time of the observation (Unix time, seconds); call with non-decreasing values.

        Returns:
            The alerts raised and cleared by this observation, rule by rule in rule order; within a
            rule, series in sample order, then the clears of series that disappeared. Log each one
            (e.g. ``alert.raised`` / ``alert.cleared``), then publish :meth:`active`.

        """
        observed = samples(status) if isinstance(status, Mapping) else status
        by_metric: dict[str, dict[Labels, float]] = {}
        for sample in observed:
            by_metric.setdefault(sample.metric, {})[sample.labels] = sample.value
        transitions: list[Transition] = []
        for rule in self.rules:
            pending = self._pending[rule.name]
            series = by_metric.get(rule.metric, {})
            for labels, value in series.items():
                key = (rule.name, labels)
                active = self._active.get(key)
                if not rule.is_past(value):
                    pending.pop(labels, None)
                    if active is not None:
                        del self._active[key]
                        transitions.append(Transition("cleared", dataclasses.replace(active, value=value)))
                elif active is not None:
                    self._active[key] = dataclasses.replace(active, value=value)
                elif now_s - pending.setdefault(labels, now_s) >= rule.window_s:
                    alert = Alert(
                        name=rule.name,
                        metric=rule.metric,
                        labels=labels,
                        value=value,
                        threshold=rule.threshold,
                        op=rule.op,
                        severity=rule.severity,
                        since_s=now_s,
                        window_s=rule.window_s,
                    )
                    self._active[key] = alert
                    transitions.append(Transition("raised", alert))
            for labels in [labels for labels in pending if labels not in series]:
                del pending[labels]
                active = self._active.pop((rule.name, labels), None)
                if active is not None:
                    transitions.append(Transition("cleared", active))
        return transitions

    def active(self) -> list[Alert]:
        """
        Return the active alerts.

        Returns:
            The alerts raised and not yet cleared, oldest first, each with its latest value. Use
            :meth:`Alert.to_json` for the status object's ``alerts``.

        """
        return list(self._active.values())
