"""When and how long to retry a request, built on tenacity (its types stay in this module).

- Retried: 429, every 5xx but 501, connection errors and timeouts. Other answers are final.
- Wait: full-jitter exponential backoff, a uniform draw in ``[0, cap)`` where the cap starts at
  ``retry_backoff_initial`` and doubles per retry up to ``retry_backoff_max``. Spreading retries
  over the whole interval is what keeps many clients from retrying in lockstep.
- A ``Retry-After`` from the server replaces the backoff (capped at ``retry_after_max``), plus a
  little jitter so that every client told "10 s" does not come back in the same millisecond.
  One of 0 (some proxies send it; a date already past) counts as none, and so does every one
  when ``retry_after_max`` is 0: retried at once, a request would spend its whole budget of
  attempts in a millisecond.
- Stop: after ``retry_max_attempts`` attempts, or when the next attempt would start later than
  ``retry_max_elapsed`` after the first; the last error is raised as it was. A retry waiting
  for its turn at the gate (an open circuit breaker) waits until then at most, too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from ._logging import RateLimitedLog
from .config import PublisherConfig
from .exceptions import APIError, RateLimitedError, ServerError, TransportError

__all__ = ["RetryBudgetSpent", "RetryPolicy", "is_retryable", "retry_deadline"]

T = TypeVar("T")

retry_deadline: ContextVar[float] = ContextVar("fiddler_async_retry_deadline", default=math.inf)
"""In a retry: the latest time (the event loop's clock) its request may go out, which the gate
keeps to; infinity for a first attempt."""


class RetryBudgetSpent(Exception):
    """A retry could not go out within ``retry_max_elapsed``; the policy raises the error
    that led to it instead."""


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, TransportError | RateLimitedError):
        return True
    return isinstance(exc, ServerError) and exc.status != 501


class RetryPolicy:
    def __init__(self, config: PublisherConfig, log: RateLimitedLog) -> None:
        self._config = config
        self._log = log

    def backoff(self, retry_number: int, error: BaseException | None) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry)."""
        config = self._config
        if isinstance(error, APIError) and error.retry_after:
            wait = min(error.retry_after, config.retry_after_max)
            if wait > 0:
                return wait + random.uniform(0, min(1.0, 0.1 * wait))
        # The exponent bounded: past ~1000 retries 2**n no longer fits a float.
        doubling = 2.0 ** min(retry_number - 1, 64)
        cap = min(config.retry_backoff_max, config.retry_backoff_initial * doubling)
        return random.uniform(0, cap)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return self.backoff(state.attempt_number, error)

    async def call(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        what: str,
        kind: str | None = None,
        retryable: Callable[[BaseException], bool] = is_retryable,
    ) -> T:
        """Run ``attempt(n)`` (n = 0 for the first try, then the retry number) until it succeeds,
        fails for good, or the budget runs out; then the last error is raised as it was. Its
        retries are logged as ``what``, rate-limited together with all of the same ``kind``
        (default ``what``): a kind per job or file would keep a log key for each, and limit
        nothing."""
        config = self._config

        last: list[BaseException] = []  # the error a retry follows

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if error is not None:
                last[:] = [error]
            self._log.warning(
                f"retry:{kind or what}",
                f"{what} failed ({error}); retry {state.attempt_number} of "
                f"{config.retry_max_attempts - 1} in {state.upcoming_sleep:.2f} s",
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(config.retry_max_attempts)
            | stop_before_delay(config.retry_max_elapsed),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            sleep=anyio.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        deadline = anyio.current_time() + config.retry_max_elapsed
        try:
            async for try_ in retrying:
                with try_:
                    number = try_.retry_state.attempt_number - 1
                    token = retry_deadline.set(deadline if number else math.inf)
                    try:
                        return await attempt(number)
                    finally:
                        retry_deadline.reset(token)
        except RetryBudgetSpent:
            if not last:
                raise
            error = last[0]
            raise error from error.__cause__  # as it was: its cause kept
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
