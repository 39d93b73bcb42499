"""One gate in front of every request to the backend: a shared pause and a circuit breaker.

- **Shared pause.** A 429 or 503 that says ``Retry-After`` pauses *every* request until then
  (capped at ``retry_after_max``), not only the retry of the request that got it: the server
  asked the client to slow down, and every batch in flight hearing it is what keeps a backend
  that is shedding load from being hammered.
- **Circuit breaker.** After ``breaker_threshold`` attempts in a row fail for want of the backend
  (429, a 5xx but 501, no answer), the breaker opens: one request at a time goes out as a probe,
  at most one every ``breaker_probe_interval`` seconds, while the others wait here (they keep
  their events; the queue's bounds and overflow policy hold the rest). The first answer that
  shows the backend is back (any answer but those) closes it, and the waiting requests go,
  ``max_in_flight`` at a time as always: no retry storm on recovery.

Waiting here is cancellable, so flush and close deadlines hold.
"""

from __future__ import annotations

import math

import anyio

from ._logging import event, logger
from .config import PublisherConfig
from .exceptions import APIError
from .retry import RetryBudgetSpent, is_retryable, retry_deadline

__all__ = ["Gate"]


class Gate:
    def __init__(self, config: PublisherConfig) -> None:
        self._config = config
        self._not_before = -math.inf
        """The shared pause a Retry-After asked for."""
        self._next_probe = -math.inf
        """While the breaker is open: no probe before this. Not a pause of the server's, so
        it ends with the breaker: a late failure of a request sent before the outage, pushing
        it forward while the probe was out, must not hold requests once the probe passed."""
        self._failures = 0
        self._probing = False
        self._changed: anyio.Event | None = None

    @property
    def open(self) -> bool:
        """True while the breaker is open (the backend is taken to be down)."""
        return self._failures >= self._config.breaker_threshold

    async def enter(self) -> bool:
        """Wait until a request may go: past any pause, and as the one probe while open.
        Returns whether this request is the probe; pass it to the outcome's call. A retry
        that could not go out before its :data:`retry_deadline` raises RetryBudgetSpent."""
        deadline = retry_deadline.get()
        while True:
            now = anyio.current_time()
            not_before = max(self._not_before, self._next_probe if self.open else -math.inf)
            if now < not_before:
                if not_before > deadline:
                    raise RetryBudgetSpent
                await self._wait(not_before - now)
            elif self.open and self._probing:
                if now >= deadline:
                    raise RetryBudgetSpent
                await self._wait(deadline - now)
            else:
                self._probing = self.open
                return self._probing

    def passed(self, probe: bool) -> None:
        """The request got an answer showing the backend is up (a success, or a refusal)."""
        if self.open:
            logger.warning(
                "fiddler_async: the backend answers again; sending resumes",
                extra=event("breaker-closed"),
            )
        self._failures = 0
        self._release(probe)

    def failed(self, error: BaseException, probe: bool) -> None:
        """The request failed; ``error`` says whether the backend is struggling or down."""
        if not is_retryable(error):
            self.passed(probe)  # a 4xx is an answer: the backend is up
            return
        was_open = self.open
        self._failures += 1
        now = anyio.current_time()
        pause = error.retry_after if isinstance(error, APIError) else None
        if pause is not None:
            self._not_before = max(self._not_before, now + min(pause, self._config.retry_after_max))
        if self.open:
            if not was_open:
                logger.warning(
                    "fiddler_async: %d requests in a row failed (%s); probing the backend with "
                    "one request every %.3g s until it answers",
                    self._failures,
                    error,
                    self._config.breaker_probe_interval,
                    extra=event("breaker-open"),
                )
            self._next_probe = max(self._next_probe, now + self._config.breaker_probe_interval)
        self._release(probe)

    def abandoned(self, probe: bool) -> None:
        """The request was cancelled before its outcome was known."""
        self._release(probe)

    def _release(self, probe: bool) -> None:
        if probe:
            self._probing = False
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._changed.wait()
