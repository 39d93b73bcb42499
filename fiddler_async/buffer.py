"""The bounded in-memory queue: one FIFO lane per destination, bounds over all lanes together.

The queue is bounded by events and by bytes of encoded events. When a new event does not fit,
the overflow policy decides: ``drop_oldest`` evicts the oldest queued events (across lanes)
until it fits, ``drop_newest`` discards the new event, ``raise`` refuses it with
:class:`QueueFullError`, and ``block`` makes an awaiting caller wait for room. Every drop is
settled in the ledger with its reason; nothing leaves the queue uncounted. With a spool, the
events the two drop policies push out are spilled to it instead.

All of this runs on the event loop's thread without awaiting, so no lock is needed and a
caller cancelled while waiting for room leaves the queue untouched.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, islice, repeat
from typing import Any

import anyio
import orjson

from .config import PublisherConfig
from .destination import Destination
from .exceptions import PublisherClosedError, QueueFullError
from .stats import Ledger

__all__ = ["EventBuffer", "Fixup", "Item", "Lane", "pack"]

Fixup = tuple[str | None, int | None, int]
"""For an event queued before its model was resolved: (event id, timestamp in epoch ms, flags),
applied by the exporter once the model's id and timestamp columns are known."""

Item = tuple[int, bytes, Fixup | None]
"""An event taken from the queue: (sequence number, encoded JSON object, fix-up or None when
final)."""


def pack(body: bytes, fixup: Fixup | None) -> bytes:
    """An event as a lane stores it: a final body as it is, or a pending one behind its fix-up
    as ``NUL [id, ms, flags] NUL``. One bytes object per queued event, instead of a tuple, an
    id string and two ints, is what keeps a buffered event under 400 bytes of memory. A JSON
    body starts with ``{`` and orjson escapes every NUL, so the markers are unambiguous."""
    if fixup is None:
        return body
    return b"".join((b"\0", orjson.dumps(fixup), b"\0", body))


def _nothing() -> None:
    return None


def unpack(seq: int, stored: bytes) -> Item:
    """The :data:`Item` of an event stored by :func:`pack`."""
    if stored[0] != 0:
        return (seq, stored, None)
    end = stored.index(0, 1)
    event_id, millis, flags = orjson.loads(stored[1:end])
    return (seq, stored[end + 1 :], (event_id, millis, flags))


class Lane:
    """The queued events of one destination, oldest first.

    Stored compactly, since a queue can hold millions: the packed bodies in a deque, and
    their sequence numbers (increasing, with gaps where other lanes took numbers) as machine
    integers in an array read from ``head``, 8 bytes each rather than 40 for a Python int.
    """

    __slots__ = (
        "after",
        "bodies",
        "bytes",
        "dest",
        "head",
        "in_flight",
        "pending",
        "seqs",
        "since",
        "spooled",
    )

    def __init__(self, dest: Destination, after: Lane | None = None) -> None:
        self.dest = dest
        self.bodies: deque[bytes] = deque()
        self.seqs = array("q")
        self.head = 0
        self.pending = 0
        """How many queued events are pending (packed with a fix-up): while none are, events
        are taken without looking at each."""
        self.bytes = 0
        self.since: float | None = None
        """When the oldest event still waiting here was queued (monotonic), None when empty."""
        self.in_flight: list[int] = []
        """The first sequence number of each batch of this lane being sent."""
        self.after = after
        """For an update lane, the insert lane of the same model and environment: an update
        is not sent while an insert accepted before it is still queued or in flight, so that
        it never reaches the server ahead of the event it joins."""
        self.spooled = 0
        """For an insert lane: its events this process put in the spool and has not replayed
        yet. While there are some, this model's updates go to the spool too, behind them."""

    def first(self) -> int:
        """The sequence number of the oldest queued event (the lane must hold one)."""
        return self.seqs[self.head]

    def extend(self, first: int, stored: Iterable[bytes]) -> None:
        """Queue events numbered from ``first`` in order."""
        before = len(self.bodies)
        self.bodies.extend(stored)
        self.seqs.extend(range(first, first + len(self.bodies) - before))

    def take(self, count: int) -> list[Item]:
        """Remove and return the ``count`` oldest queued events."""
        any_pending = self.pending
        seqs, taken = self.pop(count)
        if not any_pending:
            return list(zip(seqs, taken, repeat(None)))
        return [unpack(seq, stored) for seq, stored in zip(seqs, taken, strict=True)]

    def pop(self, count: int) -> tuple[array[int], list[bytes]]:
        """Remove the ``count`` oldest queued events: their sequence numbers, and their
        bytes as stored (see :func:`pack`)."""
        head = self.head
        seqs = self.seqs[head : head + count]
        popleft = self.bodies.popleft
        taken = [popleft() for _ in range(count)]
        self._advance(count)
        if self.pending:
            self.pending -= sum(1 for stored in taken if stored[0] == 0)
        return seqs, taken

    def pop_oldest(self) -> tuple[int, bytes]:
        """:meth:`pop` of one event, without the lists."""
        seq = self.seqs[self.head]
        stored = self.bodies.popleft()
        self._advance(1)
        if stored[0] == 0:
            self.pending -= 1
        return seq, stored

    def _advance(self, count: int) -> None:
        self.head = head = self.head + count
        if head == len(self.seqs):
            # Empty: an idle lane keeps none of its past numbers, nor the blocks its deque
            # keeps for reuse (up to 16 of 512 bytes: an idle lane held 9 KB, not 1 KB).
            self.seqs = array("q")
            self.bodies = deque()
            self.head = 0
        elif head >= 4096 and head * 2 >= len(self.seqs):
            del self.seqs[:head]  # amortised: drops at least as many as it moves
            self.head = 0

    def oldest_unsent(self) -> int | None:
        """The sequence number of the oldest event queued or in flight here; None if none."""
        oldest = min(self.in_flight, default=None)
        if self.bodies and (oldest is None or self.first() < oldest):
            oldest = self.first()
        return oldest

    def inserts_unsent(self) -> int | None:
        """For an update lane: the oldest insert still queued or in flight, that the updates
        accepted after it wait for."""
        return None if self.after is None else self.after.oldest_unsent()

    def blocked(self) -> bool:
        """An update lane waits while its oldest update may join an insert not sent yet, and
        while a batch of it is in flight: two updates of one id must not swap places (the
        later value would be overwritten by the earlier one)."""
        inserts = self.after
        if inserts is None:
            return False
        if self.in_flight:
            return True
        first = self.seqs[self.head]  # inlined: the flusher asks this of every busy lane
        return bool(inserts.bodies and inserts.seqs[inserts.head] < first) or any(
            seq < first for seq in inserts.in_flight
        )

    def sendable(self, count: int) -> int:
        """Of the ``count`` oldest queued events, how many may go in one request: for an update
        lane, those accepted before every insert it waits for (see :meth:`blocked`)."""
        inserts = self.inserts_unsent()
        if inserts is None or self.seqs[self.head + count - 1] < inserts:
            return count
        return bisect_right(self.seqs, inserts, self.head, self.head + count) - self.head

    def follows_spooled(self) -> bool:
        """For an update lane: whether inserts of its model may be in the spool, not sent yet
        (then its updates follow them there)."""
        return self.after is not None and self.after.spooled > 0


class EventBuffer:
    def __init__(
        self,
        config: PublisherConfig,
        ledger: Ledger,
        warn: Callable[..., None],
        spill: Callable[[Destination, list[Item]], None] | None = None,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._warn = warn
        self._spill = spill
        self._lanes: dict[tuple[int, str, str | None, bool], Lane] = {}
        self._busy: dict[Lane, None] = {}
        """The lanes holding events (an ordered set): eviction looks only at these."""
        self.events = 0
        self.bytes = 0
        self._wakeup: anyio.Event | None = None
        self._room: anyio.Event | None = None
        self._pressed = False
        """The queue met a bound since the flusher last took a batch (see :meth:`full`)."""
        self.closed = False
        self._max_events = config.max_queue_events
        self._max_bytes = config.max_queue_bytes
        self._batch_events = config.max_batch_events
        self._batch_bytes = config.max_batch_bytes
        self.clock: Callable[[], float] = anyio.current_time
        """The event loop's clock. The publisher sets the loop's own at start, so that events
        can also be queued from a plain loop callback (the sync Publisher's hand-off), where
        anyio cannot tell which loop runs."""
        self.before_waiting: Callable[[], None] = _nothing
        """Called as a caller starts to wait for room (the publisher sets the flusher's
        give_back_report_slot: an on_error callback waiting here gives its slot back)."""

    def lane(self, dest: Destination) -> Lane:
        """The lane of ``dest`` (one per model, environment, and insert or update)."""
        key = (id(dest.model), dest.env_type, dest.env_name, dest.update)
        lane = self._lanes.get(key)
        if lane is None:
            inserts = None
            if dest.update:
                inserts = self.lane(Destination(dest.model, dest.env_type, dest.env_name, False))
            lane = self._lanes[key] = Lane(dest, after=inserts)
        return lane

    # The caller's side

    def offer(self, lane: Lane, body: bytes, fixup: Fixup | None) -> None:
        """Queue an event now, applying the overflow policy if it does not fit."""
        stored = body if fixup is None else pack(body, fixup)
        size = len(stored)
        if self.events >= self._max_events or self.bytes + size > self._max_bytes:
            self._press()
            policy = self._config.overflow
            if policy == "drop_newest":
                item = (self._ledger.next_seq(), body, fixup)
                self._drop(lane, [item], self._full_reason())
                return
            if policy == "drop_oldest":
                self._evict_until_fits(size)
            else:  # raise; and block, which cannot wait here
                self._reject()
        if fixup is not None:
            lane.pending += 1
        # The publish hot path: the steps are inlined (each Python call is a tenth of it).
        ledger = self._ledger
        ledger.accepted += 1  # the next sequence number (Ledger.next_seq)
        bodies = lane.bodies
        bodies.append(stored)
        lane.seqs.append(ledger.accepted)
        lane.bytes += size
        self.events += 1
        self.bytes += size
        # Wake the flusher only when there is something new for it to decide: a lane that just
        # got its first event (a linger timer to arm), a batch that just became full, or a
        # queue that is (see :meth:`full`).
        count = len(bodies)
        if count == 1:
            lane.since = self.clock()
            self._busy[lane] = None
            self.wake()
        elif count == self._batch_events or (lane.bytes >= self._batch_bytes > lane.bytes - size):
            self.wake()
        elif self.events >= self._max_events or self.bytes + size > self._max_bytes:
            self._press()

    def offer_all(
        self, lane: Lane, bodies: list[bytes], fixups: list[Fixup | None] | None = None
    ) -> None:
        """Queue many events in order (``fixups`` beside ``bodies``; None when all are
        final): at once when all fit, else one by one under the overflow policy; none if
        they could not fit even an empty queue (:meth:`refuse_never_fitting`)."""
        if fixups is None:
            stored = bodies
        else:
            stored = [pack(body, fixup) for body, fixup in zip(bodies, fixups, strict=True)]
        size = sum(map(len, stored))
        self.refuse_never_fitting(len(stored), size)
        if not self.fits(len(stored), size):
            self._press()
            if self._config.overflow != "drop_oldest":
                for body, fixup in zip(bodies, fixups or [None] * len(bodies), strict=True):
                    self.offer(lane, body, fixup)
                return
            self._evict_until_fits(size, len(stored))  # room for all of them at once
        if not stored:
            return
        lane.extend(self._ledger.reserve(len(stored)), stored)
        if fixups is not None:
            lane.pending += len(fixups) - fixups.count(None)
        lane.bytes += size
        self.events += len(stored)
        self.bytes += size
        if lane.since is None:
            lane.since = self.clock()
            self._busy[lane] = None
        self.wake()

    async def put(self, lane: Lane, body: bytes, fixup: Fixup | None, timeout: float) -> None:
        """Queue an event, waiting up to ``timeout`` seconds for room (the ``block`` policy)."""
        await self.wait_for_room(1, len(pack(body, fixup)), timeout)
        self.offer(lane, body, fixup)  # it fits now

    def require_room(self, events: int, size: int) -> None:
        """QueueFullError (all of them counted as rejected) unless ``events`` events of
        ``size`` bytes in all fit now: the ``raise`` policy for a batch, all or nothing."""
        self.refuse_never_fitting(events, size)  # (saying so, rather than "no room now")
        if not self.fits(events, size):
            self._ledger.rejected += events
            raise QueueFullError(f"queue has no room for {events} events; none queued")

    async def wait_for_room(self, events: int, size: int, timeout: float) -> None:
        """Return once ``events`` events of ``size`` bytes in all fit; QueueFullError (all of
        them counted as rejected) if they do not within ``timeout`` or never could. A caller
        cancelled while waiting has changed nothing."""
        if self.fits(events, size) and not self.closed:
            return  # the usual case: no waiting, so no cancel scope to set up
        self.refuse_never_fitting(events, size)
        self.before_waiting()
        with anyio.move_on_after(timeout):
            while not self.fits(events, size):
                if self.closed:
                    raise PublisherClosedError("the publisher closed while waiting for room")
                if self._room is None:
                    self._room = anyio.Event()
                    self.wake()  # a queue with a caller waiting for room is full
                await self._room.wait()
        if self.closed:
            raise PublisherClosedError("the publisher closed while waiting for room")
        if not self.fits(events, size):
            self._ledger.rejected += events
            raise QueueFullError(
                f"queue full ({self.events} events, {self.bytes} bytes) after waiting "
                f"{timeout:g} s for room for {events} event(s)"
            )

    def refuse_never_fitting(self, events: int, size: int) -> None:
        """QueueFullError (all of them counted as rejected) if ``events`` events of ``size``
        bytes would not fit even an empty queue: a batch call's events would otherwise push
        out its own first ones (the drop policies), or wait for room in vain (``block``)."""
        if events > self._max_events or size > self._max_bytes:
            self._ledger.rejected += events
            raise QueueFullError(
                f"{events} events of {size} bytes can never fit the queue "
                f"({self._max_events} events, {self._max_bytes} bytes): publish them in "
                "parts, raise max_queue_events or max_queue_bytes, or use publish_file"
            )

    def full(self) -> bool:
        """Whether the queue is at a bound: it met one since the flusher last took a batch,
        has no room for one more event (by count, or by bytes for one of the average size),
        or a caller waits for room. Then the flusher sends at once rather than after the
        linger time, so that a queue smaller than a batch, or than what arrives within the
        linger time, does not drop, refuse or hold up events while the server can take them."""
        events = self.events
        return (
            self._pressed
            or events >= self._max_events
            or (events > 0 and self.bytes + self.bytes // events > self._max_bytes)
            or self._room is not None
        )

    def _press(self) -> None:
        """The queue met a bound: wake the flusher, once until it takes a batch (while its
        lanes cannot send, every publish into a full queue would wake it for nothing)."""
        if not self._pressed:
            self._pressed = True
            self.wake()

    def fits(self, events: int, size: int) -> bool:
        """Whether ``events`` more events of ``size`` bytes in all fit without overflow."""
        return self.events + events <= self._max_events and self.bytes + size <= self._max_bytes

    def _full_reason(self) -> str:
        return "queue_full" if self.events >= self._max_events else "queue_bytes"

    def _reject(self) -> None:
        self._ledger.rejected += 1
        bound = "events" if self._full_reason() == "queue_full" else "bytes"
        raise QueueFullError(
            f"queue full ({self.events} events, {self.bytes} bytes; bound hit: {bound})"
        )

    def _evict_until_fits(self, size: int, events: int = 1) -> None:
        """``drop_oldest``: drop the oldest queued events, whichever their lane, until
        ``events`` more events of ``size`` bytes fit. During an outage this runs on every
        publish call, so it drops a run at once from a lone busy lane, and only the stored
        bytes and sequence numbers are handled unless a spool wants the events."""
        busy = self._busy
        one_by_count = (
            events == 1 and self.events >= self._max_events and self.bytes + size <= self._max_bytes
        )
        if one_by_count and len(busy) == 1 and self._spill is None:
            # An outage's usual case: the queue is full by count and one event must go.
            lane = next(iter(busy))
            seq, stored = lane.pop_oldest()
            self._forget(lane, 1, len(stored))
            self._count_dropped(((seq,),), "queue_full")
            return
        while self.events and (
            self.events + events > self._max_events or self.bytes + size > self._max_bytes
        ):
            reason = "queue_full" if self.events + events > self._max_events else "queue_bytes"
            if len(busy) == 1:
                lane = next(iter(busy))
                count = self._excess(lane, size, events)
            else:  # the oldest event of all, one at a time: lanes interleave by age
                lane, count = min(busy, key=Lane.first), 1
            seqs, run = lane.pop(count)
            self._forget(lane, count, sum(map(len, run)))
            if self._spill is not None:
                self._spill(lane.dest, list(map(unpack, seqs, run)))
            else:
                self._count_dropped([(seq,) for seq in seqs], reason)

    def _excess(self, lane: Lane, size: int, events: int) -> int:
        """How many of ``lane``'s oldest events to drop so that ``events`` more events of
        ``size`` bytes fit (all of its events at most)."""
        count = max(1, self.events + events - self._max_events)
        over = self.bytes + size - self._max_bytes
        if over > 0:  # and at least as many as hold that many bytes
            for needed, freed in enumerate(accumulate(map(len, lane.bodies)), 1):
                if freed >= over:
                    count = max(count, needed)
                    break
            else:
                count = len(lane.bodies)
        return min(count, len(lane.bodies))

    def _drop(self, lane: Lane, items: list[Item], reason: str) -> None:
        if self._spill is not None:
            if lane.after is not None:  # an update: what it must follow goes to the spool first
                self._spill_before(lane.after, items[0][0])
                self._spill_before(lane, items[0][0])
            self._spill(lane.dest, items)
            return
        self._count_dropped(items, reason)

    def _spill_before(self, lane: Lane, seq: int) -> None:
        """``drop_newest`` spills a new update: the inserts it may join and the earlier updates
        of its lane, still queued, go to the spool before it, which replays them in that
        order. (``drop_oldest`` evicts them first anyway, being older.)"""
        if not lane.bodies or lane.first() > seq:
            return
        count = bisect_right(lane.seqs, seq, lane.head) - lane.head
        seqs, run = lane.pop(count)
        self._forget(lane, count, sum(map(len, run)))
        assert self._spill is not None
        self._spill(lane.dest, list(map(unpack, seqs, run)))

    def _count_dropped(self, items: Sequence[tuple[Any, ...]], reason: str) -> None:
        """Settle ``items`` (their sequence number first) as dropped, and warn (the message
        is only formatted when the rate limit lets it through)."""
        self._ledger.settle(items, "dropped", reason)
        self._warn(
            f"drop:{reason}",
            "dropped %d event(s): %s (bounds: %d events, %d bytes)",
            len(items),
            reason,
            self._max_events,
            self._max_bytes,
        )

    def _forget(self, lane: Lane, events: int, size: int) -> None:
        """Account for ``events`` events of ``size`` stored bytes having left ``lane``."""
        lane.bytes -= size
        self.events -= events
        self.bytes -= size
        if not lane.bodies:
            lane.since = None
            self._busy.pop(lane, None)
        if self._room is not None:
            self._room.set()
            self._room = None

    # The flusher's side

    def close(self) -> None:
        """Refuse further waiting for room; callers blocked in :meth:`put` get an error."""
        self.closed = True
        if self._room is not None:
            self._room.set()
            self._room = None

    def wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def wait(self, timeout: float) -> None:
        """Sleep until an event arrives, a batch fills, :meth:`wake` is called, or ``timeout``."""
        self._wakeup = anyio.Event()
        try:
            with anyio.move_on_after(timeout):
                await self._wakeup.wait()
        finally:
            self._wakeup = None

    def next_lane(self, now: float, force: bool) -> Lane | None:
        """The lane to send a batch from now: of those with a full batch, a batch that has
        lingered long enough, or (forced, or the queue :meth:`full`) any events, the one whose
        oldest event is oldest, so that a busy destination never starves a quiet one."""
        linger = self._config.linger
        force = force or self.full()
        chosen: Lane | None = None
        for lane in self._busy:
            if lane.blocked():
                continue
            ready = (
                force
                or len(lane.bodies) >= self._batch_events
                or lane.bytes >= self._batch_bytes
                or now - (lane.since or now) >= linger
            )
            if ready and (chosen is None or lane.first() < chosen.first()):
                chosen = lane
        return chosen

    def seconds_to_next_linger(self, now: float) -> float:
        """Time until the earliest linger expires among lanes free to send; infinity if none.
        (A blocked update lane is woken by :meth:`sent` when the inserts before it are.)"""
        starts = [
            lane.since for lane in self._busy if lane.since is not None and not lane.blocked()
        ]
        if not starts:
            return math.inf
        return max(0.0, min(starts) + self._config.linger - now)

    def take_batch(self, lane: Lane) -> list[Item]:
        """Remove up to one request's worth of events from the front of ``lane``."""
        bodies = lane.bodies
        count = min(len(bodies), self._batch_events)
        if not count:
            return []
        count = lane.sendable(count)
        # A request holds the events and a comma each. Sizes are summed in C (accumulate),
        # and only when the whole lane is not known to fit.
        limit = self._batch_bytes
        size = lane.bytes if count == len(bodies) else limit + 1
        if size + count > limit:
            sizes = list(accumulate(map(len, islice(bodies, count))))
            if sizes[-1] + count > limit:  # the first k fit while sizes[k - 1] + k <= limit
                fitting = bisect_right(range(count), limit, key=lambda k: sizes[k] + k + 1)
                count = max(1, fitting)
            size = sizes[count - 1]
        batch = lane.take(count)
        self._pressed = False
        self._forget(lane, count, size)
        lane.in_flight.append(batch[0][0])
        return batch

    def sent(self, lane: Lane, batch: list[Item]) -> None:
        """A batch taken from ``lane`` is settled (whatever its outcome)."""
        if batch:
            lane.in_flight.remove(batch[0][0])
            self.wake()  # an update lane may have been waiting for it

    def take_all(self) -> list[tuple[Lane, list[Item]]]:
        """Empty the queue (at the close deadline), returning what each lane held."""
        taken: list[tuple[Lane, list[Item]]] = []
        for lane in self._lanes.values():
            size = lane.bytes
            batch = lane.take(len(lane.bodies))
            self._forget(lane, len(batch), size)
            if batch:
                taken.append((lane, batch))
        return taken
