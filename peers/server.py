"""The peer's HTTP server: its app (peers/app.py) with the peer's life attached, joining and
loading as the server starts, leaving and closing as it stops."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from peers.app import build_app
from peers.node import PeerNode

log = logging.getLogger("layerswarm.server")


def create_app(node: PeerNode, on_start_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The peer's app; `on_start_failure(exc)` is called if joining or loading fails."""

    def started(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the peer failed to start: %s", task.exception())
            if on_start_failure is not None:
                on_start_failure(task.exception())

    node.on_fatal = on_start_failure

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(node.start())
        starting.add_done_callback(started)
        try:
            yield
        finally:
            starting.cancel()
            await node.leave()
            await node.close()

    return build_app(node, lifespan)
