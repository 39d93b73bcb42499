"""The background batching loop: turns queued events into requests, and settles every outcome.

A lane (one destination's queue) is sent when it holds a full batch (``max_batch_events`` events
or ``max_batch_bytes`` bytes), when its oldest event has waited ``linger`` seconds, or at once
while a flush is under way or the queue is full. Up to ``max_in_flight`` requests run at the
same time; while all are busy, events stay in the queue, where the overflow policy bounds them.

The flusher knows an :class:`Exporter`, never HTTP. Whatever an export does (succeed, fail,
raise a bug, be cancelled at the close deadline), every event of the batch is settled exactly
once, and the loop goes on: a failing batch or a raising callback never stops the flusher.
With a spool, events whose retries ran out for want of the backend, and a batch cancelled at
the close deadline, are spilled to it instead of failed or dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import anyio
import anyio.abc
import orjson

from ._cancel import cancellations, is_ours
from ._logging import event, logger
from .buffer import EventBuffer, Item, Lane
from .config import PublisherConfig
from .destination import Destination, ModelInfo, ModelRef
from .retry import is_retryable
from .stats import Ledger

ReportUnderWay: TypeAlias = "tuple[Flusher, int, _Slot]"
"""In an on_error callback: the flusher reporting, the batch (its oldest event), and the
delivery slot its reports hold."""

_report_under_way: ContextVar[ReportUnderWay | None] = ContextVar(
    "fiddler_async_report_under_way", default=None
)


def report_under_way() -> ReportUnderWay | None:
    """The on_error report this code runs in, if any (for the sync Publisher, whose plain
    callbacks run on a thread of their own, to carry to the calls they make)."""
    return _report_under_way.get()


def resume_report(report: ReportUnderWay) -> None:
    """In a task that a callback's call runs in (the sync Publisher's): as in the callback."""
    _report_under_way.set(report)


def give_back_report_slot() -> None:
    """Called before waiting for a publisher (a flush, a close, room in its queue): from an
    on_error callback still under way, of any publisher, its batch's delivery slot goes back
    now, since what it waits for may need slots to send. With ``max_in_flight=1`` it would
    wait for itself; two publishers' callbacks waiting for room in each other's queue would
    wait for each other."""
    current = _report_under_way.get()
    if current is not None:  # (once the batch's reports are over, its slot is back already)
        current[2].release()


__all__ = ["DeliveryFailure", "Exporter", "Flusher", "items_without"]


class Exporter(Protocol):
    async def export(
        self,
        dest: Destination,
        items: Sequence[Item],
        on_delivered: Callable[[Sequence[Item]], None] | None = None,
    ) -> list[tuple[Item, Exception]]:
        """Deliver ``items``; return those not delivered, each with its error. A batch may
        go as several requests: ``on_delivered`` is given each request's events as its 2xx
        arrives, so that what was acknowledged before a cancellation is known."""
        ...

    async def resolve(self, ref: ModelRef) -> ModelInfo:
        """Look a model up (once; later calls answer from the cache)."""
        ...


@dataclass(frozen=True)
class DeliveryFailure:
    """Events that could not be delivered, and why; what an ``on_error`` callback receives."""

    error: BaseException
    """The final error: an APIError or TransportError, or an EventError for one event."""
    project: str
    model: str
    env_type: str
    env_name: str | None
    update: bool
    bodies: tuple[bytes, ...]
    """The events as encoded JSON."""
    event_ids: tuple[str | None, ...]
    """The event ids, where known."""

    def events(self) -> list[dict[str, Any]]:
        """The events, decoded."""
        return [orjson.loads(body) for body in self.bodies]

    @classmethod
    def of(cls, dest: Destination, items: Sequence[Item], error: BaseException) -> DeliveryFailure:
        info = dest.model.info
        id_col = info.event_id_col if info is not None else None
        ids: list[str | None] = []
        for _, body, fixup in items:
            if fixup is not None:
                ids.append(fixup[0])
            elif id_col is not None:
                try:  # what we encoded reads back; should it not, the report still goes
                    value = orjson.loads(body).get(id_col)
                except orjson.JSONDecodeError:
                    value = None
                ids.append(None if value is None else str(value))
            else:
                ids.append(None)
        return cls(
            error=error,
            project=dest.model.project,
            model=dest.model.model,
            env_type=dest.env_type,
            env_name=dest.env_name,
            update=dest.update,
            bodies=tuple(item[1] for item in items),
            event_ids=tuple(ids),
        )

    @classmethod
    def grouped(
        cls, dest: Destination, failed: Sequence[tuple[Item, Exception]]
    ) -> list[DeliveryFailure]:
        """One failure per distinct error, with the events that met it."""
        by_error: dict[int, tuple[Exception, list[Item]]] = {}
        for item, error in failed:
            by_error.setdefault(id(error), (error, []))[1].append(item)
        return [cls.of(dest, items, error) for error, items in by_error.values()]


class _Slot:
    """A delivery slot (of ``max_in_flight``) that a failed batch keeps while its failures
    are reported, given back once: a slow ``on_error`` then holds back delivery as a slow
    server does, rather than failures (all their events' bytes) piling up in memory while
    they wait for it."""

    __slots__ = ("_held", "_slots")

    def __init__(self, slots: anyio.Semaphore) -> None:
        self._slots = slots
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class Flusher:
    def __init__(
        self,
        config: PublisherConfig,
        buffer: EventBuffer,
        ledger: Ledger,
        exporter: Exporter,
        on_failure: Callable[[DeliveryFailure], Awaitable[None]],
        *,
        spill: Callable[[Destination, list[Item]], None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._spill = spill
        self._ledger = ledger
        self._exporter = exporter
        self._on_failure = on_failure
        self._slots = anyio.Semaphore(config.max_in_flight)
        self._tasks: anyio.abc.TaskGroup | None = None
        self._flushing = 0
        self._reporting: list[int] = []
        """For each failure being reported, the oldest event of its batch (its sequence
        number): a flush waits for the reports of its own events, not for later ones."""
        self._reported: anyio.Event | None = None
        self._waiting: list[int] = []
        """The batches (their oldest events) whose callback waits in :meth:`reports_done`."""
        self.in_flight_requests = 0
        self.in_flight_events = 0

    def look_up_soon(self, ref: ModelRef) -> None:
        """Start looking a model up now, at its first event, rather than at its first batch:
        until its schema is known, an id the event carries cannot be returned by publish."""
        if self._tasks is None:
            return
        try:
            anyio.get_current_task()
        except RuntimeError:  # a plain asyncio callback: no task to start one from
            return  # (the first batch looks the model up)
        self._tasks.start_soon(self._look_up, ref)

    async def _look_up(self, ref: ModelRef) -> None:
        with contextlib.suppress(Exception):  # a failure shows when the first batch is sent
            await self._exporter.resolve(ref)

    def begin_flush(self) -> None:
        """Send partial batches at once until :meth:`end_flush`."""
        give_back_report_slot()
        self._flushing += 1
        self._buffer.wake()

    def end_flush(self) -> None:
        self._flushing -= 1

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            task_status.started()
            while True:
                try:
                    await self._cycle(tg)
                except Exception:  # a bug here must not end delivery for the process
                    logger.exception(
                        "fiddler_async flusher error; continuing in 1 s",
                        extra=event("flusher-error"),
                    )
                    await anyio.sleep(1.0)

    async def _cycle(self, tg: anyio.abc.TaskGroup) -> None:
        buffer = self._buffer
        if buffer.next_lane(anyio.current_time(), self._flushing > 0) is None:
            await buffer.wait(buffer.seconds_to_next_linger(anyio.current_time()))
            return
        await self._slots.acquire()
        # Look again: while we waited for a slot, the queue may have changed (evictions, more).
        lane = buffer.next_lane(anyio.current_time(), self._flushing > 0)
        if lane is None:
            self._slots.release()
            return
        batch = buffer.take_batch(lane)
        if self._spill is not None and lane.follows_spooled():
            # Updates whose inserts may be in the spool follow them there, so that the
            # replay, oldest first, sends each insert before the updates that join it.
            self._spill(lane.dest, batch)
            buffer.sent(lane, batch)
            self._slots.release()
            return
        self.in_flight_requests += 1
        self.in_flight_events += len(batch)
        tg.start_soon(self._deliver_or_log, lane, batch)

    async def _deliver_or_log(self, lane: Lane, batch: list[Item]) -> None:
        """:meth:`_deliver`, in a task of the flusher's group: a bug in it, as in a cycle,
        must not end delivery for the process (its bookkeeping is done in any case)."""
        try:
            await self._deliver(lane, batch)
        except Exception:
            logger.exception(
                "fiddler_async flusher error while delivering a batch; continuing",
                extra=event("flusher-error"),
            )

    async def _deliver(self, lane: Lane, batch: list[Item]) -> None:
        ledger, dest = self._ledger, lane.dest
        failures: list[DeliveryFailure] = []
        acknowledged: list[Sequence[Item]] = []

        def delivered(items: Sequence[Item]) -> None:
            # Settled as each request's 2xx arrives: a batch split into several requests
            # (a refused event isolated, a byte limit) may be cut short by the close deadline
            # after some were acknowledged, which must count as delivered, not be sent again.
            ledger.settle(items, "delivered")
            self.in_flight_events -= len(items)
            acknowledged.append(items)

        try:
            failed = await self._exporter.export(dest, batch, delivered)
        except anyio.get_cancelled_exc_class():
            # Only aclose() cancels a delivery, at its deadline. A request under way may or
            # may not have reached the server; we cannot know, so its events are spilled
            # (sent again from the spool: a duplicate at worst) or else count as dropped.
            unsettled = items_without(batch, acknowledged)
            if self._spill is not None:
                self._spill(dest, unsettled)
            else:
                ledger.settle(unsettled, "dropped", "shutdown")
            raise
        except Exception as exc:
            unsettled = items_without(batch, acknowledged)
            ledger.settle(unsettled, "failed")
            ledger.last_error = f"{type(exc).__name__}: {exc}"
            if unsettled:
                failures.append(DeliveryFailure.of(dest, unsettled, exc))
        else:
            if self._spill is not None:  # what only the backend's absence failed waits on disk
                later = [item for item, error in failed if is_retryable(error)]
                if later:
                    self._spill(dest, later)
                    failed = [(item, error) for item, error in failed if not is_retryable(error)]
            ledger.settle([item for item, _ in failed], "failed")
            failures = DeliveryFailure.grouped(dest, failed)
            if failures:
                error = failures[-1].error
                ledger.last_error = f"{type(error).__name__}: {error}"
        finally:
            # Settled and no longer in flight in the same step, so stats always add up.
            self.in_flight_requests -= 1
            self.in_flight_events -= len(batch) - sum(map(len, acknowledged))
            # In the same step, so that a flush waits for them.
            self._reporting += [batch[0][0]] * len(failures)
            self._buffer.sent(lane, batch)
            if not failures:
                self._slots.release()
        if failures:
            await self._report_all(failures, batch[0][0])

    async def _report_all(self, failures: list[DeliveryFailure], oldest: int) -> None:
        """Report a batch's failures one after the other, its delivery slot kept meanwhile
        (see :class:`_Slot` and :func:`give_back_report_slot`)."""
        slot, begun = _Slot(self._slots), 0
        try:
            for failure in failures:
                begun += 1
                await self._report(failure, oldest, slot)
        finally:
            # Cut short (a close from one of these callbacks): the rest are not reported.
            for _ in range(len(failures) - begun):
                self._reporting.remove(oldest)
            slot.release()
            self._reports_changed()

    async def _report(self, failure: DeliveryFailure, oldest: int, slot: _Slot) -> None:
        under_way = _report_under_way.set((self, oldest, slot))
        try:
            await self._on_failure(failure)
        except cancellations() as exc:
            if is_ours(exc):
                raise
            logger.exception(  # an on_error raising CancelledError itself (asyncio lets it)
                "fiddler_async: reporting a delivery failure raised a cancellation",
                extra=event("on-error-raised"),
            )
        except BaseException:  # a callback's error, even SystemExit, must not end delivery
            logger.exception(
                "fiddler_async: reporting a delivery failure raised", extra=event("on-error-raised")
            )
        finally:
            _report_under_way.reset(under_way)
            self._reporting.remove(oldest)
            self._reports_changed()

    def _reports_changed(self) -> None:
        if self._reported is not None:  # the waiting flushes and closes look again
            self._reported.set()
            self._reported = None

    def reporting_here(self) -> bool:
        """Whether this runs in an on_error callback of this flusher's that is still under
        way (not in a task it started, once it has returned)."""
        return self._own_report() is not None

    def _own_report(self) -> int | None:
        """The batch (its oldest event) whose callback this runs in, if :meth:`reporting_here`."""
        current = _report_under_way.get()
        if current is not None and current[0] is self and current[1] in self._reporting:
            return current[1]
        return None

    async def reports_done(self, up_to: int | None = None) -> None:
        """Return once no failure of the events up to sequence number ``up_to`` (of any, when
        None) is being reported: no on_error callback of theirs is running or due.

        Called from a callback (a flush or close there): not for the failures of its own
        batch, which are reported one after the other in its task, after it; and, for a
        flush, not for callbacks that are themselves waiting here (two callbacks flushing
        would wait for each other until their timeouts). A close waits for them."""
        own = self._own_report()
        if own is not None:
            self._waiting.append(own)
            self._reports_changed()
        try:
            while any(
                (up_to is None or oldest <= up_to)
                and oldest != own
                and (up_to is None or oldest not in self._waiting)
                for oldest in self._reporting
            ):
                if self._reported is None:
                    self._reported = anyio.Event()
                await self._reported.wait()
        finally:
            if own is not None:
                self._waiting.remove(own)


def items_without(batch: list[Item], settled: list[Sequence[Item]]) -> list[Item]:
    """The events of ``batch`` not among the ``settled`` parts of it (each request's events,
    acknowledged before a delivery was cut short)."""
    if not settled:
        return batch
    gone = {id(item) for part in settled for item in part}
    return [item for item in batch if id(item) not in gone]
