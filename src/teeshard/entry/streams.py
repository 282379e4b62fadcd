"""Streams of a response: several choices run together, and a stream that always
releases what it holds.

``run_all`` and ``merged`` run one coroutine or stream per choice at once (the
node schedulers batch their steps); the first failure cancels the others, whose
own cleanup releases their sessions and charges.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
_DONE = object()


async def run_all(jobs: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the choices together; the first failure cancels the rest (each releases)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several streams as they come; the first failure ends it (and the rest)."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(_DONE)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is _DONE:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SessionStream(StreamingResponse):
    """A stream whose generation is released however the response ends.

    A client that goes away mid-stream surfaces as a failed send or a cancelled
    task, and the body's generator is then left suspended until garbage
    collection: its own cleanup cannot be relied on. This runs ``on_close`` in the
    request's task once the response is over (idempotent: a generation that
    finished was released already, and settled).
    """

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
