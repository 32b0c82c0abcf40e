"""
Logging setup: structlog, one JSON object per line.

The only module that configures logging. Everyone else does
``log = structlog.get_logger(__name__)`` and logs dotted events (``peer.connected``) with
fields whose names carry units (``rtt_ms``, ``rss_bytes``). Standard-library loggers
(``websockets``, ``asyncio``) are routed through the same renderer with
``structlog.stdlib.ProcessorFormatter`` (structlog ``docs/standard-library.md``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(
    *, level: str = "info", json: bool = True, stream: TextIO | None = None, node_id: str | None = None
) -> None:
    """
    Configure structlog and the standard library's logging once for this process.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        json: One JSON object per line when true, a console renderer otherwise.
        stream: Where lines go; standard output by default (the daemon's contract).
        node_id: Bound into every event as ``node_id``.
    """
    stream = stream or sys.stdout
    lvl = LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if node_id:
        shared.insert(0, _bind_node(node_id))
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _rename_stdlib_event,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # websockets logs every failed handshake and keepalive at INFO/DEBUG; our own events
    # say the same with peer ids, so keep only its warnings.
    logging.getLogger("websockets").setLevel(max(lvl, logging.WARNING))


def _bind_node(node_id: str) -> Any:
    def processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("node_id", node_id)
        return event_dict

    return processor


def _rename_stdlib_event(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Lines from stdlib loggers carry free text in "event"; keep our dotted names in "event".
    name = event_dict.get("logger")
    if name and not str(name).startswith("ctxsync"):
        event_dict["message"] = event_dict.get("event")
        event_dict["event"] = f"lib.{str(name).split('.')[0]}"
    return event_dict
