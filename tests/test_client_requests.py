"""
Unit tests of how the client library writes requests (ctxsync/client.py): a ``set`` put together
from its strings must be the same JSON as ``json.dumps`` of the request, for any text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxsync.client import _request_text

ANY_TEXT = st.text(st.characters(codec=None), max_size=40)  # control characters, non-ASCII and lone surrogates too


@settings(max_examples=300, deadline=None)
@given(
    rid=st.integers(0, 2**63),
    context=ANY_TEXT,
    items=st.lists(st.tuples(ANY_TEXT, st.none() | ANY_TEXT), min_size=0, max_size=5),
)
def test_set_request_is_the_json_of_the_request(rid: int, context: str, items: list[tuple[str, str | None]]) -> None:
    """The hand-built text parses to exactly the request json.dumps would have sent."""
    fields = {"context": context, "items": [list(it) for it in items]}
    text = _request_text(rid, "set", fields)
    assert json.loads(text) == json.loads(json.dumps({"id": rid, "op": "set", **fields}))
    assert text.isascii()  # escaped like json.dumps' default (ensure_ascii)


@pytest.mark.parametrize(
    "fields",
    [
        {"context": "c", "items": [["k", 1]]},  # a value that is not JSON text
        {"context": "c", "items": [[1, "1"]]},  # a key that is not a string
        {"context": "c", "items": [["k"]]},
        {"context": "c", "items": "k"},
        {"context": 7, "items": [["k", "1"]]},
        {"context": "c", "items": [["k", "1"]], "extra": True},
    ],
)
def test_other_requests_go_through_json_dumps(fields: dict[str, Any]) -> None:
    """Anything the fast path does not cover is sent as json.dumps writes it (the daemon judges it)."""
    assert _request_text(3, "set", fields) == json.dumps({"id": 3, "op": "set", **fields})
    assert _request_text(4, "get", {"context": "c", "key": "k"}) == json.dumps({"id": 4, "op": "get", "context": "c", "key": "k"})
