"""
Unit tests of the API's per-request helpers on the ``set`` fast path (ctxsync/api.py): the
value check (the C scanner first, json.loads for the rest) must accept and refuse exactly what
json.loads does, and a set's response must be valid JSON whatever the request id.
"""

from __future__ import annotations

import json

import pytest

from ctxsync.api import _BadRequest, _set_args, _set_json

ACCEPTED = ["12", "-0.5e3", '"text é"', "null", "true", "[1, [2, {}]]", '{"a": {"b": null}}', " 7 ", "\n[]\t", "NaN"]
REFUSED = ["", " ", "12abc", "{bad", "[1,", '"unterminated', "1 2", "'single'", "[" * 100_000]


@pytest.mark.parametrize("text", ACCEPTED)
def test_set_accepts_what_json_loads_accepts(text: str) -> None:
    json.loads(text)  # the reference
    doc_id, pairs = _set_args({"context": "c", "items": [["k", text], ["gone", None]]})
    assert doc_id == "c" and pairs == [("k", text), ("gone", None)]


@pytest.mark.parametrize("text", REFUSED)
def test_set_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises((ValueError, RecursionError)):
        json.loads(text)  # the reference
    with pytest.raises(_BadRequest, match="not JSON text"):
        _set_args({"context": "c", "items": [["ok", "1"], ["k", text]]})


@pytest.mark.parametrize("req_id", [0, 7, -3, 10**30, "abc", 'q"uote', None, True, 1.5])
def test_set_response_is_json_for_any_id(req_id: object) -> None:
    answer = json.loads(_set_json(req_id, 12, 3))
    assert answer == {"id": req_id, "ok": True, "result": {"version": 12, "changed": 3}}
    assert type(answer["id"]) is type(req_id)
