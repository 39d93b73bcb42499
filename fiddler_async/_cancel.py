"""Telling a cancellation of our own task from a ``CancelledError`` that code we call raised.

asyncio lets any code raise ``CancelledError`` (an awaited future that another task
cancelled, a transport's bug), and our task is then not being cancelled: taken for a
cancellation, it would end the background task, and delivery with it, silently. trio's
``Cancelled`` is only ever trio's.
"""

from __future__ import annotations

import asyncio

import anyio

__all__ = ["cancellations", "is_ours"]


def cancellations() -> tuple[type[BaseException], ...]:
    """The classes to catch to see every cancellation exception, on the running backend."""
    return (anyio.get_cancelled_exc_class(), asyncio.CancelledError)


def is_ours(exc: BaseException) -> bool:
    """Whether a cancellation exception cancels the running task (a cancel scope's deadline,
    the event loop ending), rather than having been raised by code it called. Python 3.10's
    asyncio cannot tell the two apart: then it is ours."""
    if not isinstance(exc, asyncio.CancelledError):
        return True  # trio's Cancelled
    if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
        return False  # asyncio's, raised under trio: only code raises it there
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0
