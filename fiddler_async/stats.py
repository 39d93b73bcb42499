"""What happened to every event: the ledger behind ``stats()`` and ``flush()``.

Every accepted event gets a sequence number and ends in exactly one outcome: delivered, failed
(the server refused it or retries ran out), spooled (written to the durable spool, to be sent
from there) or dropped (by a named reason). Until then it is pending (queued, in flight, or on
its way to the spool). So at any moment::

    accepted == delivered + failed + spooled + dropped_total + pending

A flush watches the events accepted before it began: it knows how many were pending then and
counts their outcomes as they settle, so its result speaks of exactly those events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

import anyio

__all__ = ["DropReason", "FlushResult", "StatsSnapshot"]

DropReason = Literal[
    "queue_full", "queue_bytes", "shutdown", "forked", "spool_full", "spool_behind", "spool_error"
]
"""Why an event was dropped: the queue's event bound, its byte bound, the close deadline,
(in a forked child) being the parent's to send; with a spool: its disk bound, a disk slower
than the events coming in, or a failed write."""

Outcome = Literal["delivered", "failed", "spooled", "dropped"]


@dataclass(frozen=True)
class FlushResult:
    """What became of the events that were pending when a flush (or close) began."""

    delivered: int = 0
    failed: int = 0
    spooled: int = 0
    """Written to the spool, to be sent from there (only with ``spool_dir``)."""
    dropped: int = 0
    pending: int = 0
    """Still queued or in flight when the deadline came (0 when the flush completed)."""

    @property
    def complete(self) -> bool:
        """True when every event the flush waited for has an outcome."""
        return self.pending == 0


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent snapshot of the publisher's counters (see ``AsyncPublisher.stats()``)."""

    accepted: int
    """Events that publish calls accepted (returned an id for)."""
    delivered: int
    """Events the server acknowledged."""
    failed: int
    """Events whose request finally failed (non-retryable answer, or retries exhausted)."""
    spooled: int
    """Events written to the spool instead of being failed or dropped (with ``spool_dir``)."""
    replayed: int
    """Events delivered from the spool by this publisher (spilled by it or by an earlier
    process)."""
    spool_bytes: int
    """Bytes the spool directory holds (as this process counts them)."""
    dropped: Mapping[str, int]
    """Events dropped, by reason (see DropReason)."""
    rejected: int
    """Events refused at the caller with QueueFullError (never accepted)."""
    queued_events: int
    queued_bytes: int
    in_flight_requests: int
    in_flight_events: int
    spilling_events: int
    """Events handed to the spool and not yet written."""
    requests: int
    """HTTP requests sent (each attempt counts)."""
    retries: int
    """Attempts that were retries of an earlier one."""
    responses: Mapping[str, int]
    """Answers by HTTP status (``"202"``, ``"503"``) or error kind (``"ConnectError"``)."""
    last_error: str | None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def pending(self) -> int:
        """Events accepted but not yet settled: queued, in flight, or on their way to disk."""
        return self.queued_events + self.in_flight_events + self.spilling_events


@dataclass(eq=False)
class _FlushWatch:
    last_seq: int
    remaining: int
    done: anyio.Event = field(default_factory=anyio.Event)
    delivered: int = 0
    failed: int = 0
    spooled: int = 0
    dropped: int = 0

    def result(self) -> FlushResult:
        return FlushResult(
            self.delivered, self.failed, self.spooled, self.dropped, pending=self.remaining
        )


class Ledger:
    """The counters. Every item passed to :meth:`settle` is a tuple whose first member is its
    sequence number."""

    def __init__(self) -> None:
        self.accepted = 0
        self.delivered = 0
        self.failed = 0
        self.spooled = 0
        self.rejected = 0
        self.dropped: dict[str, int] = {}
        self.dropped_unsent = 0
        """Of the ``shutdown`` drops, the events that never left the queue (for the metrics:
        the queue dropped those, not the exporter)."""
        self.requests = 0
        self.retries = 0
        self.responses: dict[str, int] = {}
        self.last_error: str | None = None
        self.on_response: Callable[[str, float], None] | None = None
        """Told of every answer, with its duration (the OpenTelemetry instrumentation)."""
        self._watches: list[_FlushWatch] = []

    def next_seq(self) -> int:
        self.accepted += 1
        return self.accepted

    def reserve(self, count: int) -> int:
        """Accept ``count`` events at once; the first of their sequence numbers."""
        first = self.accepted + 1
        self.accepted += count
        return first

    def settle(
        self, items: Sequence[tuple[Any, ...]], outcome: Outcome, reason: str | None = None
    ) -> None:
        """Record the outcome of ``items``. Synchronous, so it is safe in a cancelled task."""
        count = len(items)
        if not count:
            return
        if outcome == "delivered":
            self.delivered += count
        elif outcome == "failed":
            self.failed += count
        elif outcome == "spooled":
            self.spooled += count
        else:
            key = reason or "unknown"
            self.dropped[key] = self.dropped.get(key, 0) + count
        newest = max(map(itemgetter(0), items)) if self._watches else 0
        for watch in self._watches:
            if newest <= watch.last_seq:  # the usual case: all of them, without a loop of ours
                mine = count
            else:
                mine = sum(1 for item in items if item[0] <= watch.last_seq)
            if not mine:
                continue
            setattr(watch, outcome, getattr(watch, outcome) + mine)
            watch.remaining -= mine
            if watch.remaining <= 0:
                watch.done.set()

    def record_response(self, key: str, seconds: float) -> None:
        """An answer (its HTTP status) or its absence (an error kind), and how long it took."""
        self.responses[key] = self.responses.get(key, 0) + 1
        if self.on_response is not None:
            self.on_response(key, seconds)

    def watch(self, pending: int) -> _FlushWatch:
        """Start watching the ``pending`` events accepted so far."""
        watch = _FlushWatch(last_seq=self.accepted, remaining=pending)
        if pending:
            self._watches.append(watch)
        else:
            watch.done.set()
        return watch

    def unwatch(self, watch: _FlushWatch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
