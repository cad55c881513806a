"""A client that leaves before its answer: the work for it is cancelled as soon as the connection closes."""

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer (nobody reads it)


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client disconnects first: then `work` is cancelled (a generation's
    rows leave the decoder at its next step), and nobody reads an answer."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, or this request is being cancelled: let `work` clean up
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the connection closes: once the body is read, the server's next message says so (an
    event, not a poll)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
