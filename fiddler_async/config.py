"""Every knob of the publisher, in one frozen object with documented defaults.

The defaults are chosen so that a burst of 100,000 typical events (a few hundred bytes each) to a
healthy server fits in the queue and loses nothing, while memory stays bounded when the server
is down: the queue holds at most ``max_queue_events`` events and ``max_queue_bytes`` bytes of
encoded events, whichever is reached first.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .exceptions import ConfigurationError

__all__ = ["OverflowPolicy", "PublisherConfig"]

OverflowPolicy = Literal["drop_oldest", "drop_newest", "block", "raise"]

MAX_EVENTS_PER_REQUEST = 1000
"""Fiddler's v3 API takes at most 1000 events in one request."""


class PublisherConfig(BaseModel):
    """Configuration of :class:`~fiddler_async.AsyncPublisher`. Immutable; times are in seconds.

    Build one with keywords, e.g. ``PublisherConfig(linger=0.1, overflow="block")``, or derive a
    variant with ``config.model_copy(update={...})``. A setting out of its range, of the wrong
    type or unknown raises ConfigurationError naming it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The queue
    max_queue_events: int = Field(default=250_000, ge=1)
    """Most events held in memory waiting to be sent."""
    max_queue_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    """Most bytes of encoded events held in memory waiting to be sent."""
    overflow: OverflowPolicy = "drop_oldest"
    """What a full queue does: ``drop_oldest`` evicts the oldest queued event, ``drop_newest``
    discards the new one, ``raise`` raises QueueFullError at the caller, ``block`` makes
    ``publish_event`` wait up to ``block_timeout`` for room (then raise QueueFullError).
    Every drop is counted by reason in ``stats()``."""
    block_timeout: float = Field(default=5.0, ge=0)
    """Longest wait of ``publish_event`` for room under the ``block`` policy."""
    lookup_wait: float = Field(default=1.0, ge=0)
    """Longest time ``publish_events_batch`` calls wait, all together, for a model's first
    lookup (so that the ids they return are exact from the first batch); a failed attempt of
    the lookup ends the wait at once. Past it, their events
    are queued the way ``publish_event`` queues them, with the id and time columns placed once
    the model is known, so that a server that does not answer never holds the caller. An
    update batch with rows keyed by the id column (no ``event_ids``, or ``None`` entries)
    waits for the lookup regardless: it needs that column."""

    # Batching
    max_batch_events: int = Field(default=MAX_EVENTS_PER_REQUEST, ge=1, le=MAX_EVENTS_PER_REQUEST)
    """Events per request; a batch this full is sent at once."""
    max_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Bytes of events per request; a batch this large is sent at once. Also the largest event."""
    linger: float = Field(default=0.5, ge=0)
    """Longest time an event waits for its batch to fill before the batch is sent anyway; none
    at all once the queue is full (a bound reached, or a caller waiting for room)."""
    max_in_flight: int = Field(default=4, ge=1, le=64)
    """Requests sent concurrently."""

    # HTTP
    connect_timeout: float = Field(default=5.0, gt=0)
    request_timeout: float = Field(default=30.0, gt=0)
    """Longest wait for a response to one request (read, write and pool)."""

    # Retry
    retry_max_attempts: int = Field(default=8, ge=1)
    """Attempts per request, the first one included."""
    retry_max_elapsed: float = Field(default=120.0, gt=0)
    """No retry starts after this long since the first attempt of a request."""
    retry_backoff_initial: float = Field(default=0.5, gt=0)
    """Cap of the first backoff; it doubles per retry (full jitter: a uniform draw below it)."""
    retry_backoff_max: float = Field(default=30.0, gt=0)
    """Largest backoff cap."""
    retry_after_max: float = Field(default=60.0, ge=0)
    """Largest wait honoured from a server's Retry-After header."""

    # The backend's health (see fiddler_async.gate)
    breaker_threshold: int = Field(default=5, ge=1)
    """Attempts failing in a row for want of the backend that open the circuit breaker."""
    breaker_probe_interval: float = Field(default=5.0, gt=0)
    """While the breaker is open: one probe request at most this often."""

    # The durable spool (see fiddler_async.spool)
    spool_dir: str | Path | None = None
    """A directory for events that cannot be delivered in time (the backend down past the
    retry budget, the queue over its memory budget, the close deadline): they are written
    there instead of being failed or dropped, and sent from there once the backend answers,
    also by the next process that opens the directory. None: no spool."""
    spool_max_bytes: int = Field(default=1024**3, ge=1024)
    """Most bytes the spool directory may hold; what would pass it is dropped and counted."""
    spool_fsync: bool = True
    """Sync each spool file to the disk before counting its events spooled, so that they
    survive a power cut, not just the process's death. Off: the OS writes them when it will."""

    # Lifecycle
    flush_timeout: float = Field(default=30.0, gt=0)
    """Deadline of ``flush()`` when called without one."""
    close_timeout: float = Field(default=10.0, gt=0)
    """Deadline of ``aclose()`` when called without one."""

    # Transport security
    allow_insecure_http: bool = False
    """Allow a plain ``http://`` URL to a host other than this machine (loopback is always
    allowed). Off by default: the token would cross the network in clear text."""
    tls_verify: bool = True
    """Verify the server's TLS certificate (turn off only for a test server you trust)."""

    # Events
    stamp_publish_time: bool = True
    """Write the publish time into the model's timestamp column when the event has none."""

    # Logs
    log_interval: float = Field(default=30.0, ge=0)
    """Repeated warnings (drops, failed batches) are logged at most once per interval."""

    if not TYPE_CHECKING:  # (to mypy, pydantic's own signatures)

        def __init__(self, **settings: Any) -> None:
            with _named_errors():
                super().__init__(**settings)

        # Settings read from a file or a mapping: the same error (pydantic wraps the one
        # __init__ raises in its own).
        @classmethod
        def model_validate(cls, *args: Any, **options: Any) -> PublisherConfig:
            with _named_errors():
                return super().model_validate(*args, **options)

        @classmethod
        def model_validate_json(cls, *args: Any, **options: Any) -> PublisherConfig:
            with _named_errors():
                return super().model_validate_json(*args, **options)

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> PublisherConfig:
        """A copy with the settings in ``update`` changed, checked as the constructor checks
        them (pydantic's own copy does not check them)."""
        if update:
            given = {name: getattr(self, name) for name in self.model_fields_set}
            return type(self)(**{**given, **update})
        return super().model_copy(deep=deep)

    @model_validator(mode="after")
    def _check_bounds(self) -> PublisherConfig:
        if self.max_batch_bytes > self.max_queue_bytes:
            raise ValueError(
                f"max_batch_bytes ({self.max_batch_bytes}) must not exceed "
                f"max_queue_bytes ({self.max_queue_bytes})"
            )
        if self.retry_backoff_initial > self.retry_backoff_max:
            raise ValueError("retry_backoff_initial must not exceed retry_backoff_max")
        return self


def seconds_or(default: float, timeout: object, name: str = "timeout") -> float:
    """A ``timeout`` argument in seconds (``default`` for None; 0 or less: no wait), checked
    before a call does anything with it: NaN, or not a number, raises naming it."""
    if timeout is None:
        return default
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(timeout).__qualname__!r}")
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError(f"{name} must be a number of seconds, got NaN")
    return seconds


@contextlib.contextmanager
def _named_errors() -> Iterator[None]:
    """pydantic's ValidationError as a ConfigurationError (one root of our errors)."""
    try:
        yield
    except ValidationError as exc:
        raise ConfigurationError(_explain(exc)) from None


def _explain(error: ValidationError) -> str:
    """pydantic's errors, one line: each setting named, with the value given."""
    parts = []
    for problem in error.errors():
        # (Through model_validate, pydantic wraps the error __init__ raised: its text once.)
        reason = problem["msg"].removeprefix("Value error, ").removeprefix("PublisherConfig: ")
        if problem["loc"]:
            name = ".".join(map(str, problem["loc"]))
            given = f" (got {problem['input']!r})" if problem["type"] != "missing" else ""
            parts.append(f"{name}: {reason}{given}")
        else:  # a rule between settings: the reason names them
            parts.append(reason)
    return "PublisherConfig: " + "; ".join(parts)
