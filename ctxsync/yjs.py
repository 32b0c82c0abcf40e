"""
The Yjs endpoint: the y-websocket protocol at ``/yjs/CONTEXT`` on the local API (to be written).
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection

from ctxsync.mesh import Mesh
from ctxsync.types import DocId


async def serve(mesh: Mesh, conn: ServerConnection, doc_id: DocId) -> None:
    """Serve one Yjs client connected to ``/yjs/<doc_id>`` until it disconnects."""
    await conn.close(1011, "the Yjs endpoint is not written yet")
