from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.nodes import Node


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Factory of initialised nodes in tmp_path; every daemon started is killed at teardown."""
    nodes: list[Node] = []

    def make(name: str, **kw: object) -> Node:
        node = Node(tmp_path, name, **kw)  # type: ignore[arg-type]
        node.init()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.kill()
