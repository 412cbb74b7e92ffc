"""Stop work a client no longer waits for.

Starlette cancels a streaming response when its client leaves, but not an endpoint still computing a
whole answer: that keeps running to its end for nobody. `unless_disconnected` races the work against the
client's ``http.disconnect`` message and cancels the work when the client goes first.
"""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but access logs say what happened


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """`work`'s result, or a 499 response (sent to nobody) once the client has gone and `work` is cancelled.

    Call it after the request body has been read: the next ASGI message is then the disconnect.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this request itself is being cancelled: so is its work
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its cleanup runs before the (unread) answer
    return Response(status_code=CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
