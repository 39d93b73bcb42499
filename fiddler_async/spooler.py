"""The spool's two background tasks: the writer, which puts spilled events on disk, and the
replayer, which sends them once the backend answers again (see :mod:`fiddler_async.spool`).

Spilling happens where events would otherwise be lost: in a publish call that overflows the
queue, in a batch whose retries ran out, at the close deadline. None of those may wait on a
disk, so they hand the events to the writer, which writes in a worker thread. Until written,
those events are still in memory: the writer holds at most ``TRANSIT_BATCHES`` batches' worth;
beyond that (a disk slower than the incoming events) an event is dropped, reason
``spool_behind``, and counted. An event is settled ``spooled`` once its file is on disk.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson

from ._logging import RateLimitedLog, event, logger
from .buffer import EventBuffer, Item, Lane
from .config import PublisherConfig
from .destination import Destination
from .exceptions import (
    APIError,
    EventError,
    NotFoundError,
    PermissionDeniedError,
    PublisherClosedError,
)
from .flusher import DeliveryFailure, Exporter, items_without
from .spool import Spool, SpoolCorruptError, SpooledBatch, SpoolFullError, SpoolKey, replay_key
from .stats import Ledger
from .wire import POISON_STATUSES

__all__ = ["ReplayResult", "Replayer", "SpoolWriter", "dead_letter_lines"]

TRANSIT_BATCHES = 4
"""Batches' worth of bytes (``max_batch_bytes`` each) that may wait for the disk."""


class SpoolWriter:
    def __init__(
        self,
        spool: Spool,
        ledger: Ledger,
        buffer: EventBuffer,
        log: RateLimitedLog,
        config: PublisherConfig,
    ) -> None:
        self._spool = spool
        self._ledger = ledger
        self._buffer = buffer
        self._log = log
        self._limit = TRANSIT_BATCHES * config.max_batch_bytes
        self._batch_events = config.max_batch_events
        self._chunks: deque[tuple[Destination, list[Item]]] = deque()
        self.transit_bytes = 0
        self.transit_events = 0
        """Events offered and not yet settled (waiting for the disk, or being written)."""
        self.closing = False
        """Set at close: everything offered is kept for :meth:`drain`, whatever its size."""
        self.drained = False
        """Set once :meth:`drain` ran: a later offer is written at once, blocking."""
        self._wakeup: anyio.Event | None = None
        self.written = anyio.Event()
        """Set (and replaced) whenever a batch file is written: the replayer's cue."""
        self._writing: tuple[Destination, list[Item]] | None = None

    def holds_before(self, lane: Lane, seq: int) -> bool:
        """Whether an event of ``lane`` accepted before ``seq`` is on its way to the disk: not
        in memory any more, not in a file yet (what the replayer must wait for too)."""
        chunks = [*self._chunks, self._writing] if self._writing else self._chunks
        return any(
            self._buffer.lane(dest) is lane and items[0][0] < seq for dest, items in chunks if items
        )

    def offer(self, dest: Destination, items: list[Item]) -> None:
        """Spill ``items`` (never waits). Without room in transit they are dropped, reason
        ``spool_behind``, unless closing (then :meth:`drain` writes them all)."""
        if not items:
            return
        size = sum(len(item[1]) for item in items)
        if not self.closing and self.transit_bytes + size > self._limit:
            self._ledger.settle(items, "dropped", "spool_behind")
            self._log.warning(
                "drop:spool_behind",
                f"dropped {len(items)} event(s): the spool's disk is slower than the events "
                "coming in (spool_behind)",
            )
            return
        self.transit_bytes += size
        self.transit_events += len(items)
        if not dest.update:  # from now on, its updates must follow it through the spool
            self._buffer.lane(dest).spooled += len(items)
        if self.drained:  # a delivery cancelled after the close drained the rest
            self._write_and_settle(dest, items)
            return
        self._chunks.append((dest, items))
        if self._wakeup is not None:
            self._wakeup.set()

    def _take(self) -> tuple[Destination, list[Item]]:
        """The oldest chunk, joined with the next ones of the same destination (one file)."""
        dest, items = self._chunks.popleft()
        items = list(items)
        while self._chunks and self._chunks[0][0] is dest:
            if len(items) + len(self._chunks[0][1]) > self._batch_events:
                break
            items.extend(self._chunks.popleft()[1])
        # In acceptance order (a batch that failed in flight came after later ones): two
        # updates of one id in one request go in the order they were published.
        items.sort(key=lambda item: item[0])
        return dest, items

    async def run(self) -> None:
        while True:
            if not self._chunks:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                self._wakeup = None
                continue
            dest, items = self._writing = self._take()
            outcome: list[BaseException | None] = []
            try:
                await anyio.to_thread.run_sync(self._write, dest, items, outcome)
            finally:
                self._writing = None
                # Even when cancelled: a write that ran has finished by now, so settle it;
                # one that never started (cancelled on the way) goes back for drain().
                if outcome:
                    self._settle(dest, items, outcome[0])
                else:
                    self._chunks.appendleft((dest, items))

    def drain(self) -> None:
        """Write every chunk still waiting now, blocking (at close, after the tasks end)."""
        # In replay order (see replay_key): the batches in flight at the deadline were handed
        # over after the queued ones, which may hold their updates.
        self._chunks = deque(sorted(self._chunks, key=_replay_key))
        while self._chunks:
            self._write_and_settle(*self._take())
        self.drained = True

    def _write_and_settle(self, dest: Destination, items: list[Item]) -> None:
        outcome: list[BaseException | None] = []
        self._write(dest, items, outcome)
        self._settle(dest, items, outcome[0])

    def _write(
        self, dest: Destination, items: list[Item], outcome: list[BaseException | None]
    ) -> None:
        try:
            self._spool.write(SpoolKey.of(dest), items)
        except (SpoolFullError, OSError) as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    def _settle(self, dest: Destination, items: list[Item], error: BaseException | None) -> None:
        self.transit_bytes -= sum(len(item[1]) for item in items)
        self.transit_events -= len(items)
        if error is None:
            self._ledger.settle(items, "spooled")
            self.written.set()
            self.written = anyio.Event()
            return
        if not dest.update:
            lane = self._buffer.lane(dest)
            lane.spooled = max(0, lane.spooled - len(items))
        reason = "spool_full" if isinstance(error, SpoolFullError) else "spool_error"
        self._ledger.settle(items, "dropped", reason)
        self._log.error(
            f"drop:{reason}",
            f"dropped {len(items)} event(s) for {dest.describe()}: could not spool them: {error}",
        )


@dataclass(frozen=True)
class ReplayResult:
    """What one pass over the spool did."""

    replayed: int = 0
    """Events delivered from the spool."""
    refused: int = 0
    """Events the server refused (reported to on_error and written as dead letters)."""
    remaining: int = 0
    """Batch files still waiting (the backend stopped answering, or another process holds
    the replay lock)."""
    error: BaseException | None = None
    """Why the pass stopped early: the backend's error, or None."""
    locked: bool = False
    """Another process is replaying this spool; this pass did nothing."""


REFUSED_STATUSES = (*POISON_STATUSES, 409, 501)
"""Answers that refuse a replayed file's events for good: for what they hold (400, 413, 422),
as a conflict, or as a request the server does not implement. Any other failure keeps the file:
one about the token (401) or a proxy (407), a redirect, a timeout may pass."""


def _refused(error: Exception) -> bool:
    """Whether the server refused this event for good (a dead letter, as a live event is
    failed once), rather than the request failing for a reason that may pass."""
    return isinstance(error, EventError) or (
        isinstance(error, APIError) and error.status in REFUSED_STATUSES
    )


class Replayer:
    """Sends spooled batches, oldest first, one request at a time, beside the live traffic.

    Only the process holding the spool's replay lock replays; the others leave their spilled
    files to it (and take over when it ends). A batch file is removed once every event of it
    is settled: delivered, or refused for what it holds and reported as a dead letter. Any
    other failure keeps the file (rewritten without the events already delivered) for the
    next pass: one about the backend or the token stops the pass; one about the file's model
    (not found, not allowed) holds back that model's later files only, so that a misspelt
    name does not stop the others' delivery.
    """

    def __init__(
        self,
        spool: Spool,
        exporter: Exporter,
        buffer: EventBuffer,
        *,
        route: Callable[[SpoolKey], Destination],
        report: Callable[[DeliveryFailure], Awaitable[None]],
        config: PublisherConfig,
        log: RateLimitedLog,
        writer: SpoolWriter | None = None,
    ) -> None:
        self._spool = spool
        self._log = log
        self._writer = writer
        self._exporter = exporter
        self._buffer = buffer
        self._route = route
        self._report = report
        self._config = config
        self._pass = anyio.Lock()
        self.stopped = False
        self.replayed = 0
        self._unsaved: dict[str, list[bytes]] = {}
        """Files whose events were settled but which could not be removed or rewritten
        (a full or read-only disk): by name, the bodies of the events still to send, so that
        this process sends none of the others again."""

    async def run(self, writer: SpoolWriter) -> None:
        """Replay whenever there is something to, backing off while the backend fails."""
        idle = max(self._config.breaker_probe_interval, 1.0)
        failures = 0
        while True:
            try:
                result = await self.replay_pass()
            except Exception:  # a bug here must not end delivery for the process
                logger.exception(
                    "fiddler_async: replaying the spool failed; trying again",
                    extra=event("replay-error"),
                )
                result = ReplayResult(error=RuntimeError("replay failed"))
            if result.error is not None or result.locked:
                failures += 1
                cap = self._config.retry_backoff_initial * 2 ** min(failures, 16)
                await anyio.sleep(min(max(cap, idle), self._config.retry_backoff_max))
                continue
            failures = 0
            # Nothing left: wait for a new spill here, or poll for other processes' files.
            with anyio.move_on_after(idle):
                await writer.written.wait()

    def stop(self) -> None:
        """At close: no further pass, and the replay lock goes to whoever wants it."""
        self.stopped = True
        self._spool.unlock()

    async def replay_pass(self) -> ReplayResult:
        """Send every batch file waiting now, oldest first; stop at the first failure that is
        not a refusal of some events."""
        async with self._pass:
            try:
                return await self._replay_files()
            except OSError as exc:  # the directory went away, a disk error: try later
                logger.error(
                    "fiddler_async: cannot read the spool: %s", exc, extra=event("spool-unreadable")
                )
                return ReplayResult(error=exc)
            finally:
                if self.stopped:
                    self._spool.unlock()

    async def _replay_files(self) -> ReplayResult:
        spool = self._spool
        if self.stopped:
            return ReplayResult(error=PublisherClosedError("the publisher is closed"))
        if not await anyio.to_thread.run_sync(spool.try_lock):
            await self._forget_gone_files()
            paths = await anyio.to_thread.run_sync(spool.batches)
            return ReplayResult(remaining=len(paths), locked=True)
        replayed = refused = 0
        held: dict[tuple[str, str], Exception] = {}  # models whose files wait for a later pass
        while True:
            await self._forget_gone_files()
            paths = await anyio.to_thread.run_sync(spool.batches)
            listed = {path.name for path in paths}
            skipped = 0
            for index, path in enumerate(paths):
                if self.stopped:
                    return ReplayResult(replayed, refused, skipped + len(paths) - index)
                try:
                    batch = await self._read(path)
                    if batch is None:
                        continue
                    if (batch.key.project, batch.key.model) in held:
                        skipped += 1  # behind an earlier file of its model: order holds
                        continue
                    dest = self._route(batch.key)
                except FileNotFoundError:
                    continue
                except (SpoolCorruptError, ValueError, IsADirectoryError) as exc:
                    moved = await anyio.to_thread.run_sync(spool.quarantine, path)
                    logger.error(
                        "fiddler_async: spool file set aside as %s: %s",
                        moved,
                        exc,
                        extra=event("spool-corrupt"),
                    )
                    continue
                if await self._wrote_earlier(path.name, listed):
                    break  # this process spooled events meanwhile that go first: list again
                if await self._waited_for_earlier(path.name, dest):
                    break  # what was accepted before this file's events may be spooled now
                failed = await self._export(batch, dest)
                given_up = [(item, error) for item, error in failed if _refused(error)]
                kept = [item for item, error in failed if not _refused(error)]
                settled = await self._report_and_settle(batch, dest, failed, given_up, kept)
                replayed += settled - len(given_up)
                refused += len(given_up)
                if kept:
                    error = next(error for _, error in failed if not _refused(error))
                    if not isinstance(error, NotFoundError | PermissionDeniedError):
                        left = skipped + len(paths) - index
                        return ReplayResult(replayed, refused, left, error)
                    held[batch.key.project, batch.key.model] = error
                    skipped += 1
                    self._log.warning(
                        f"spool-held:{batch.key.project}/{batch.key.model}",
                        "spooled events for %s/%s wait for a later replay: %s: %s",
                        batch.key.project,
                        batch.key.model,
                        type(error).__name__,
                        error,
                    )
            else:
                first = next(iter(held.values()), None)
                return ReplayResult(replayed, refused, skipped, first)

    async def _report_and_settle(
        self,
        batch: SpooledBatch,
        dest: Destination,
        failed: list[tuple[Item, Exception]],
        given_up: list[tuple[Item, Exception]],
        kept: list[Item],
    ) -> int:
        """Report the events ``given_up`` (dead letters), then keep in the file only those
        ``kept``; how many of its events were settled. Reported first: a crash before the
        file goes repeats a dead letter, never loses one. The file is settled whatever comes
        (the close): what was delivered must leave it, or it would be sent again; refused
        events whose report was cut short stay in it, to be refused again."""
        reported = False
        try:
            for failure in DeliveryFailure.grouped(dest, given_up):
                await self._report(failure)
            reported = True
        finally:
            left = kept if reported else [item for item, _ in failed]
            with anyio.CancelScope(shield=True):
                settled = await self._settle_file(batch, dest, left)
        return settled

    async def _export(self, batch: SpooledBatch, dest: Destination) -> list[tuple[Item, Exception]]:
        """Send a file's events; what was not delivered, with why. Each request's events are
        counted replayed as it is acknowledged (a long file shows progress as it goes). Cut
        short (the close deadline) after the server acknowledged some of its requests, the
        file keeps only the rest, so that they are not sent again."""
        acknowledged: list[Sequence[Item]] = []

        def delivered(items: Sequence[Item]) -> None:
            acknowledged.append(items)
            self.replayed += len(items)

        try:
            return await self._exporter.export(dest, batch.items, delivered)
        except anyio.get_cancelled_exc_class():
            if acknowledged:
                rest = items_without(batch.items, acknowledged)
                with anyio.CancelScope(shield=True):
                    await self._settle_file(batch, dest, rest)
            raise

    async def _settle_file(self, batch: SpooledBatch, dest: Destination, kept: list[Item]) -> int:
        """After a file was sent: remove it, or keep in it the events ``kept`` for a later
        pass. How many of its events were settled."""
        spool, path = self._spool, batch.path
        # Only this process's own inserts count down: replaying an earlier process's file
        # must not let updates go live while this one's inserts are still on disk.
        own = path.name in spool.written_here
        try:
            if not kept:
                await anyio.to_thread.run_sync(spool.remove, path)
            elif len(kept) < len(batch.items):
                await anyio.to_thread.run_sync(spool.rewrite, path, batch.key, kept)
            else:  # nothing settled: the file says what it did, or what _unsaved says
                return 0
        except FileNotFoundError:  # another process replayed it, or someone removed it
            self._unsaved.pop(path.name, None)
        except OSError as exc:
            if path.name not in self._unsaved:
                logger.error(
                    "fiddler_async: cannot change the spool file %s after its events were "
                    "sent: %s; this process will not send them again (another would)",
                    path.name,
                    exc,
                    extra=event("spool-unwritable"),
                )
            self._unsaved[path.name] = [item[1] for item in kept]
        else:
            self._unsaved.pop(path.name, None)
        settled = len(batch.items) - len(kept)
        if own and not dest.update:
            lane = self._buffer.lane(dest)
            lane.spooled = max(0, lane.spooled - settled)
        return settled

    async def _read(self, path: Path) -> SpooledBatch | None:
        """A batch file's events still to send: of a file that could not be changed after
        some were settled, the others (None if none, once it could be removed)."""
        batch = await anyio.to_thread.run_sync(self._spool.read, path)
        unsaved = self._unsaved.get(path.name)
        if unsaved is None:
            return batch
        left = Counter(unsaved)
        items = []
        for item in batch.items:
            if left[item[1]] > 0:
                left[item[1]] -= 1
                items.append(item)
        batch = SpooledBatch(batch.path, batch.key, items)
        if not items:
            await self._settle_file(batch, self._route(batch.key), [])
            return None
        return batch

    async def _wrote_earlier(self, name: str, listed: set[str]) -> bool:
        """Whether this process spooled, since the files ``listed`` were listed, a file that
        goes before its file ``name``; then after a short pause (it may still be being
        written), so that listing again does not spin."""
        if not self._spool.written_before(name, listed):
            return False
        await anyio.sleep(0.01)
        return True

    async def _forget_gone_files(self) -> None:
        """Files of this process that left the disk without its doing (another process
        replayed them, or someone removed them) are forgotten, so that they hold back
        nothing; their inserts no longer hold this process's updates to the spool."""
        for written in await anyio.to_thread.run_sync(self._spool.forget_gone):
            if not written.key.update:
                lane = self._buffer.lane(self._route(written.key))
                lane.spooled = max(0, lane.spooled - written.events)

    async def _waited_for_earlier(self, name: str, dest: Destination) -> bool:
        """Before a file of updates this process spilled: wait while an insert or update
        accepted before its last event is still queued or in flight here, or on its way to the
        disk (it would be sent, or spooled, after; the updates must not go first). Whether it
        waited: the spool may then hold more, to replay before this file."""
        written = self._spool.written_here.get(name)
        if written is None or not dest.update:
            return False
        updates = self._buffer.lane(dest)
        assert updates.after is not None
        lanes, writer, last = (updates.after, updates), self._writer, written.last_seq
        waited = False
        while not self.stopped:
            earlier = [lane.oldest_unsent() for lane in lanes]
            if all(seq is None or seq > last for seq in earlier) and not (
                writer is not None and any(writer.holds_before(lane, last) for lane in lanes)
            ):
                break
            waited = True
            await anyio.sleep(0.05)  # the buffer wakes only the flusher: look again soon
        return waited


def _replay_key(chunk: tuple[Destination, list[Item]]) -> int:
    dest, items = chunk
    return replay_key(dest.update, min(item[0] for item in items), max(item[0] for item in items))


def dead_letter_lines(failure: DeliveryFailure) -> list[bytes]:
    """One JSON line per refused event: where it was going, the server's reason, the event."""
    error = failure.error
    meta = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "project": failure.project,
        "model": failure.model,
        "env_type": failure.env_type,
        "env_name": failure.env_name,
        "update": failure.update,
        "error": type(error).__name__,
        "message": str(error),
        "status": error.status if isinstance(error, APIError) else None,
        "reasons": [r.__dict__ for r in error.reasons] if isinstance(error, APIError) else [],
    }
    lines = []
    for event_id, body in zip(failure.event_ids, failure.bodies, strict=True):
        head = orjson.dumps({**meta, "event_id": event_id})
        lines.append(head[:-1] + b',"event":' + body + b"}")
    return lines
