"""``Publisher``: the same publisher for synchronous code (Flask, Django, Celery, gunicorn sync
workers, scripts), with the same methods without ``await``.

The async pipeline runs on one background thread of its own, with its own event loop, reached
through an anyio blocking portal. The queue is only ever touched by that thread, so any number
of threads may publish at once, and no call waits on the network.

``publish_event`` under the drop policies (the default) does not even wait for that thread: it
encodes the event on the caller's thread (errors raise there), appends it to a hand-off deque,
and wakes the loop only if the deque was empty; the loop moves the events into the queue. A
thread hop per event would cost more than the rest of the publish call together. Every other
call (and ``publish_event`` under ``block`` or ``raise``, whose answer depends on the queue)
runs on the loop's thread through the portal, after the hand-off is drained, so it sees every
event published before it.

A plain ``on_error`` function runs on a daemon thread of its own, one failure at a time: one
that blocks (a post to an alerting service) holds up neither the deadlines of ``flush`` and
``close``, nor ``stats``, nor the interpreter's exit; delivery, only by the slot its batch
keeps until it returns (as for every callback). The calls it makes carry its report with
them to the loop, where one that waits for room gives that slot back first.

The thread is a daemon: a script that ends without ``close()`` does not hang. Instead, at
interpreter exit every publisher still open is closed, waiting at most ``exit_timeout`` seconds
(default ``config.close_timeout``) for its events; with a spool, what is left by then goes to
disk. In a forked child (gunicorn ``--preload``, multiprocessing) the thread did not survive the
fork: the first call there starts a fresh pipeline, and the parent's queue stays the parent's.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook before ours
import contextlib
import inspect
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar

import anyio
import httpx
from anyio.from_thread import BlockingPortal

from ._logging import event, logger
from .backfill import FileJob, ProgressCallback
from .buffer import Fixup, Lane
from .config import PublisherConfig, seconds_or
from .destination import ModelInfo
from .exceptions import ConfigurationError, PublisherClosedError
from .flusher import DeliveryFailure, ReportUnderWay, report_under_way, resume_report
from .publisher import (
    AsyncPublisher,
    DataFrameLike,
    ErrorCallback,
    Event,
    EventId,
    EventTime,
    check_callback,
)
from .spooler import ReplayResult
from .stats import FlushResult, StatsSnapshot

__all__ = ["Publisher"]

T = TypeVar("T")

# Held strongly: a publisher nobody refers to any more must still be closed at exit.
_open_publishers: set[Publisher] = set()


_exit_close_ran = False
_exit_lock = threading.Lock()
"""Between the close at exit taking its list and a publisher being added to it."""


def _close_at_exit() -> None:
    global _exit_close_ran  # noqa: PLW0603  (once a process)
    with _exit_lock:
        _exit_close_ran = True
        publishers = list(_open_publishers)
    for publisher in publishers:
        publisher._close_at_exit()


def _register_exit_close() -> None:
    """Close open publishers at interpreter exit, *before* concurrent.futures refuses new work
    (asyncio resolves host names in its executor): threading's own exit hooks run before
    the atexit ones, the ones registered last first, and ``concurrent.futures.thread`` (imported
    above) registered its own already. Plain atexit where that private hook is missing."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover
        atexit.register(_close_at_exit)
    else:
        register(_close_at_exit)


_register_exit_close()


def _after_fork_in_child() -> None:
    global _exit_close_ran, _exit_lock  # noqa: PLW0603  (the child's own)
    _exit_close_ran = False  # forked by a thread that outlived the parent's main one
    _exit_lock = threading.Lock()
    for publisher in list(_open_publishers):
        publisher._lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class _LoopThread:
    """An event loop on a daemon thread, and the portal into it."""

    def __init__(self, backend: Literal["asyncio", "trio"]) -> None:
        self.portal: BlockingPortal | None = None
        self.call_soon: Callable[[Callable[[], object]], object] = _never
        """Schedule a function on the loop, from any thread, without waiting for it."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            async with BlockingPortal() as portal:
                self.portal = portal
                if backend == "trio":
                    import trio  # noqa: PLC0415  (only when asked for)

                    self.call_soon = trio.lowlevel.current_trio_token().run_sync_soon
                else:
                    self.call_soon = asyncio.get_running_loop().call_soon_threadsafe
                ready.set()
                await portal.sleep_until_stopped()

        def main() -> None:
            options = {"loop_factory": _asyncio_loop} if backend == "asyncio" else {}
            try:
                anyio.run(serve, backend=backend, backend_options=options)
            except BaseException as exc:  # e.g. trio asked for but not installed
                failure.append(exc)
                ready.set()

        self.thread = threading.Thread(target=main, name="fiddler_async", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        """End the loop; calls other threads still wait for in it (a lookup, a flush) are
        cancelled: their callers get PublisherClosedError."""
        if self.portal is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self.portal.call(self.portal.stop, True)
        self.thread.join(5.0)


class _DaemonExecutor(concurrent.futures.ThreadPoolExecutor):  # asyncio wants that kind
    """The loop thread's default executor under asyncio, which resolves host names in it:
    each call on a daemon thread of its own, never waited for. A lookup that hangs (a
    resolver that does not answer: glibc takes 20 s) then holds neither ``close()``, when the
    loop ends and asyncio shuts its executor down, nor the interpreter's exit, which joins the
    threads of every ``ThreadPoolExecutor`` it started (this one starts none of its own)."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the waiting coroutine, as an executor does
                future.set_exception(exc)

        threading.Thread(target=run, name="fiddler_async-executor", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: the threads end with their calls, or with the process."""


def _asyncio_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_default_executor(_DaemonExecutor())
    return loop


def _never(fn: Callable[[], object]) -> None:
    raise PublisherClosedError("the publisher's loop is not running")


class _CallbackThread:
    """Runs jobs (the ``on_error`` calls) one at a time, in order, on a daemon thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._work, name="fiddler_async-on_error", daemon=True
        )
        self.thread.start()
        self.report: ReportUnderWay | None = None
        """The report whose callback runs now (see :meth:`Publisher._await`)."""

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """The thread ends once the jobs submitted before are done."""
        self._jobs.put(None)


def _is_async(fn: object) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class Publisher:
    """Publishes Fiddler events from synchronous code without waiting on the network.

    Takes the arguments of :class:`AsyncPublisher`, plus ``backend`` (the background loop's:
    ``"asyncio"`` or ``"trio"``) and ``exit_timeout`` (the longest wait for events at
    interpreter exit; default ``config.close_timeout``). It starts at once; use it as a context
    manager, or call :meth:`close` on shutdown (else it is closed at interpreter exit).
    ``on_error``, a plain function, is called on a thread of its own, one failure at a time
    (a coroutine function runs on the background loop); ``flush`` and ``close`` wait for it
    within their deadline, as for :class:`AsyncPublisher`.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        config: PublisherConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_error: ErrorCallback | None = None,
        backend: Literal["asyncio", "trio"] = "asyncio",
        exit_timeout: float | None = None,
    ) -> None:
        self._callbacks: _CallbackThread | None = None
        check_callback(on_error)  # before it is wrapped into one
        if on_error is not None and not _is_async(on_error):
            on_error = self._off_loop(on_error)
        # Bad arguments raise here, before any thread starts.
        self._publisher = AsyncPublisher(
            url, token, config=config, transport=transport, on_error=on_error
        )
        config_ = self._publisher.config
        self._backend = backend
        try:
            self._exit_timeout = seconds_or(config_.close_timeout, exit_timeout, "exit_timeout")
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        # Serialises the publishing threads and close(). Reentrant: a signal handler that
        # closes the publisher may interrupt this thread inside a publish. The loop's thread
        # never takes it (see _drain).
        self._lock = threading.RLock()
        self._handoff: deque[tuple[Lane, bytes, Fixup | None]] = deque()
        # Counted in and out apart, each by one side only (publishers under the lock, the
        # loop in _drain), so that no update of either is lost without a shared lock.
        self._handoff_bytes_in = 0
        self._handoff_bytes_out = 0
        self._handoff_dropped = {"queue_full": 0, "queue_bytes": 0}
        """Events the hand-off itself dropped (it was full), by reason; _drain counts them
        settled (and remembers how many in the next)."""
        self._handoff_dropped_settled = dict.fromkeys(self._handoff_dropped, 0)
        self._drain_scheduled = False
        self._closing: threading.Event | None = None
        self._closing_thread: int | None = None
        """The thread of the first ``close()``."""
        self._first_close_running = False
        """The first close() call is still on its caller's stack (not interrupted)."""
        self._close_result = FlushResult()
        self._fast = self._publisher.config.overflow in ("drop_oldest", "drop_newest")
        self._loop: _LoopThread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._start()

    def _start(self) -> None:
        # Made after the close at exit (in an atexit hook): its daemon thread would die.
        if _exit_close_ran and threading.current_thread() is threading.main_thread():
            raise PublisherClosedError(
                "the interpreter is exiting: a publisher made now could send nothing"
            )
        self._loop = _LoopThread(self._backend)
        assert self._loop.portal is not None
        try:
            self._loop.portal.call(self._publisher.start)
        except BaseException:
            self._loop.stop()
            raise
        with _exit_lock:
            _open_publishers.add(self)
            late = _exit_close_ran
        if late:  # by a thread still running: closed once it, and the others, have ended
            atexit.register(self._close_at_exit)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Publisher {self._publisher!r} {state}>"

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def config(self) -> PublisherConfig:
        return self._publisher.config

    def _portal(self) -> BlockingPortal:
        if os.getpid() != self._pid:
            self._restart_in_child()
        loop = self._loop
        if self._closed or loop is None or loop.portal is None:
            raise PublisherClosedError("the publisher is closed")
        return loop.portal

    def _on_loop_thread(self) -> bool:
        """Whether we run on the loop's own thread (an async ``on_error`` callback does)."""
        loop = self._loop
        return loop is not None and threading.current_thread() is loop.thread

    def _refuse_waiting_for_itself(self, what: str, reports: bool) -> None:
        """RuntimeError for a call that would wait for the thread it runs on: the loop's, or,
        for a call that waits for reports (``flush``, ``close``, ``replay_spool``), the
        ``on_error`` callbacks'."""
        callbacks = self._callbacks
        if self._on_loop_thread() or (
            reports and callbacks is not None and threading.current_thread() is callbacks.thread
        ):
            raise RuntimeError(
                f"{what}() waits on the thread where this code runs (an on_error "
                "callback?): it would wait for itself"
            )

    def _off_loop(self, callback: Callable[[DeliveryFailure], object]) -> ErrorCallback:
        """``on_error`` as the async publisher calls it, running ``callback`` on the
        callbacks' thread. Waiting for it can be cancelled (at a deadline): the thread goes
        on with it, and the callbacks after it, on its own."""

        async def report(failure: DeliveryFailure) -> None:
            loop = self._loop
            assert loop is not None
            if self._callbacks is None:
                self._callbacks = _CallbackThread()
            done = anyio.Event()
            outcome: list[object] = []
            raised: list[BaseException] = []
            callbacks, under_way = self._callbacks, report_under_way()

            def run() -> None:
                callbacks.report = under_way
                try:
                    outcome.append(callback(failure))
                except BaseException as exc:  # the publisher logs it, as for an inline call
                    raised.append(exc)
                finally:
                    callbacks.report = None
                    with contextlib.suppress(Exception):  # the loop has ended meanwhile
                        loop.call_soon(done.set)

            self._callbacks.submit(run)
            await done.wait()
            if raised:
                if isinstance(raised[0], anyio.get_cancelled_exc_class()):
                    # Nothing cancelled this task: raised as such, it would end the flusher.
                    raise RuntimeError("on_error raised a cancellation") from raised[0]
                raise raised[0]
            if outcome and inspect.isawaitable(outcome[0]):  # a lambda calling an async def
                await outcome[0]

        return report

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the loop's thread, after the hand-off; its result or its error."""

        def run() -> T:
            self._drain()
            return fn(*args, **kwargs)

        if self._on_loop_thread():
            return run()
        portal = self._portal()
        try:
            return portal.call(run)
        except RuntimeError as exc:
            raise self._closed_meanwhile_error(exc) from None

    def _await(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn`` on the loop's thread, after the hand-off; its result or its error.
        (A call that waits for reports checks first that it is not in a callback.)"""

        callbacks, report = self._callbacks, None
        if callbacks is not None and threading.current_thread() is callbacks.thread:
            report = callbacks.report  # from an on_error callback: its report comes along

        async def run() -> T:
            if report is not None:
                resume_report(report)
            self._drain()
            return await fn(*args, **kwargs)

        self._refuse_waiting_for_itself(getattr(fn, "__name__", "this"), reports=False)
        portal = self._portal()
        try:
            return portal.call(run)
        except concurrent.futures.CancelledError:  # the publisher closed while it waited
            raise PublisherClosedError("the publisher closed") from None
        except RuntimeError as exc:
            raise self._closed_meanwhile_error(exc) from None

    def _closed_meanwhile_error(self, exc: RuntimeError) -> Exception:
        """What a RuntimeError from a portal call means: the publisher closed (its loop
        ended) between the check in :meth:`_portal` and the call; else the error itself."""
        if self._closed and "not running" in str(exc):  # anyio's words for a stopped portal
            return PublisherClosedError("the publisher closed")
        return exc

    def _drain(self) -> None:
        """On the loop's thread: move the handed-off events into the queue, in order.

        It takes no lock: a publishing thread may hold it, interrupted by a signal handler
        that closes the publisher and waits for this. The flag goes down before the taking:
        a publisher that adds an event after the last one taken sees it down and schedules
        another drain."""
        self._drain_scheduled = False
        handoff, offer = self._handoff, self._publisher._offer_prepared
        while True:
            try:
                prepared = handoff.popleft()  # atomic, as the publishers' appends are
            except IndexError:
                break
            self._handoff_bytes_out += len(prepared[1])
            offer(*prepared)
        for reason, count in self._handoff_dropped.items():
            dropped = count - self._handoff_dropped_settled[reason]
            if dropped:
                self._handoff_dropped_settled[reason] += dropped
                self._publisher._count_dropped(dropped, reason)

    def _restart_in_child(self) -> None:
        """In a forked child: the loop thread stayed in the parent. Start ours."""
        with self._lock:
            if os.getpid() == self._pid:
                return
            # Until the child's loop runs, other threads must not see the pid as ours: they
            # would take the parent's loop, which is not in this process (and wait forever).
            # They wait for this lock instead.
            self._callbacks = None  # its thread stayed in the parent too
            self._handoff.clear()  # the parent's, and the parent sends them
            self._handoff_bytes_in = self._handoff_bytes_out = 0
            self._handoff_dropped = dict.fromkeys(self._handoff_dropped, 0)
            self._handoff_dropped_settled = dict.fromkeys(self._handoff_dropped, 0)
            self._drain_scheduled = False
            if self._closed:
                # The parent's loop is not here to ask, nor to finish a close it had begun.
                self._loop = None
                if self._closing is not None and not self._closing.is_set():
                    self._close_result = FlushResult()
                    self._closing.set()
                self._pid = os.getpid()
                return
            # The AsyncPublisher reset itself at the fork (its queue is the parent's).
            self._start()
            self._pid = os.getpid()

    # The calls of AsyncPublisher, without await

    def publish_event(
        self,
        project_id: str,
        model_id: str,
        event: Event,
        *,
        event_id: EventId | None = None,
        update_event: bool = False,
        event_timestamp: EventTime | None = None,
        env_type: str = "PRODUCTION",
        env_name: str | None = None,
    ) -> str:
        """Queue one event and return its id; see :meth:`AsyncPublisher.publish_event`.
        Waits only when the queue is full and the overflow policy is ``block``."""
        if self._fast:
            prepared = self._publisher._prepare_off_loop(
                project_id,
                model_id,
                event,
                event_id=event_id,
                update_event=update_event,
                event_timestamp=event_timestamp,
                env_type=env_type,
                env_name=env_name,
            )
            if prepared is not None:  # else a new destination: the loop's path sets it up
                item, event_id = prepared[:3], prepared[3]
                with self._lock:
                    if not self._closed and os.getpid() == self._pid and self._loop:
                        self._hand_off(item)
                        try:
                            if not self._drain_scheduled:
                                self._drain_scheduled = True
                                self._loop.call_soon(self._drain)
                        except BaseException as exc:
                            # Not scheduled: the next call tries again. (A signal handler may
                            # raise between the flag and the scheduling: Celery's time limit.)
                            self._drain_scheduled = False
                            if not isinstance(exc, Exception) or not self._closed:
                                raise
                            # Else the loop has ended: closed by a signal handler that
                            # interrupted us.
                        if self._closed:
                            self._closed_meanwhile(item)
                        return event_id
        kwargs = {
            "event_id": event_id,
            "update_event": update_event,
            "event_timestamp": event_timestamp,
            "env_type": env_type,
            "env_name": env_name,
        }
        if self.config.overflow == "block":
            return self._await(self._publisher.publish_event, project_id, model_id, event, **kwargs)
        return self._call(
            self._publisher.publish_event_nowait, project_id, model_id, event, **kwargs
        )

    def publish_events_batch(
        self,
        project_id: str,
        model_id: str,
        events: Iterable[Event] | DataFrameLike,
        *,
        update_event: bool = False,
        event_ids: Iterable[EventId | None] | None = None,
        event_timestamps: Iterable[EventTime | None] | None = None,
        env_type: str = "PRODUCTION",
        env_name: str | None = None,
    ) -> list[str]:
        """Queue many events; see :meth:`AsyncPublisher.publish_events_batch`."""
        return self._await(
            self._publisher.publish_events_batch,
            project_id,
            model_id,
            events,
            update_event=update_event,
            event_ids=event_ids,
            event_timestamps=event_timestamps,
            env_type=env_type,
            env_name=env_name,
        )

    def publish_file(
        self,
        project_id: str,
        model_id: str,
        source: Any,
        *,
        update_event: bool = False,
        event_ids: Iterable[EventId | None] | None = None,
        env_type: str = "PRODUCTION",
        env_name: str | None = None,
        progress: ProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float = 3600.0,
    ) -> FileJob:
        """Publish through Fiddler's file path; see :meth:`AsyncPublisher.publish_file`."""
        return self._await(
            self._publisher.publish_file,
            project_id,
            model_id,
            source,
            update_event=update_event,
            event_ids=event_ids,
            env_type=env_type,
            env_name=env_name,
            progress=progress,
            poll_interval=poll_interval,
            timeout=timeout,
        )

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send what is queued and wait for it, at most ``timeout`` seconds. Once closed,
        what is still pending, as :meth:`AsyncPublisher.flush` says."""
        self._refuse_waiting_for_itself("flush", reports=True)
        if not self._closed:
            try:
                return self._await(self._publisher.flush, timeout)
            except PublisherClosedError:
                if not self._closed:
                    raise
        return FlushResult(pending=self.stats().pending)

    def resolve(self, project_id: str, model_id: str) -> ModelInfo:
        return self._await(self._publisher.resolve, project_id, model_id)

    def replay_spool(self) -> ReplayResult:
        self._refuse_waiting_for_itself("replay_spool", reports=True)
        return self._await(self._publisher.replay_spool)

    def stats(self) -> StatsSnapshot:
        """A snapshot of the counters (taken on the loop's thread, so it adds up)."""
        closing = self._closing
        if closing is None:
            try:
                return self._call(self._publisher.stats)
            except PublisherClosedError:  # closed by another thread meanwhile: as closing
                return self.stats() if self._closing is not None else self._publisher.stats()
        if os.getpid() != self._pid:  # forked while closing: the child has no loop to ask
            return self._publisher.stats()
        loop = self._loop
        if not closing.is_set() and loop is not None and loop.portal is not None:
            # Closing: the loop is still changing the counters.
            with contextlib.suppress(RuntimeError):  # it ended meanwhile
                if self._on_loop_thread():
                    return self._publisher.stats()
                return loop.portal.call(self._publisher.stats)
        return self._publisher.stats()

    def _closed_meanwhile(self, item: tuple[Lane, bytes, Fixup | None]) -> None:
        """A close on this thread (a signal handler's) ran inside ``publish_event``: if it
        took the event, the event is published (the loop's end, which makes scheduling the
        drain fail, is no error of the call); if the event came after it, it never will be."""
        with contextlib.suppress(ValueError):
            self._handoff.remove(item)
            raise PublisherClosedError("the publisher is closed")

    def _hand_off(self, prepared: tuple[Lane, bytes, Fixup | None]) -> None:
        """Under the lock: append for the loop. The hand-off has the queue's bounds: while the
        loop is busy (a slow on_error, a big batch), memory stays bounded all the same, and
        what the drop policy pushes out is counted."""
        config = self._publisher.config
        handoff, dropped = self._handoff, self._handoff_dropped
        size = len(prepared[1])
        while handoff:
            if len(handoff) >= config.max_queue_events:
                reason = "queue_full"
            elif self._handoff_bytes_in - self._handoff_bytes_out + size > config.max_queue_bytes:
                reason = "queue_bytes"
            else:
                break
            if config.overflow == "drop_newest":
                dropped[reason] += 1
                return
            try:  # drop_oldest: until both bounds hold (a big event may push out many)
                oldest = handoff.popleft()
            except IndexError:  # the loop took the rest meanwhile
                break
            self._handoff_bytes_in -= len(oldest[1])
            dropped[reason] += 1
        handoff.append(prepared)
        self._handoff_bytes_in += size

    def close(self, timeout: float | None = None) -> FlushResult:
        """Send what is queued (at most ``timeout`` seconds; default ``config.close_timeout``),
        then stop the background thread. Safe to call again, and from several threads (the
        later calls wait for the first, up to their own timeout)."""
        timeout = seconds_or(self.config.close_timeout, timeout)
        self._refuse_waiting_for_itself("close", reports=True)
        with self._lock:
            closing = self._closing
            first = closing is None
            if closing is None:
                self._closing = closing = threading.Event()
                self._closing_thread = threading.get_ident()
                self._closed = True
        if not first:
            if os.getpid() != self._pid:  # forked while the parent closed: nothing of ours
                return FlushResult()
            loop = self._loop
            if (
                self._first_close_running
                and self._closing_thread == threading.get_ident()
                and not closing.is_set()
                and loop is not None
                and loop.portal is not None
            ):
                # The first call is on this very thread, interrupted by a signal handler
                # making this one: it cannot finish until we return. Close through the loop
                # (this one only waits there; the first call's close still ends the close).
                with contextlib.suppress(RuntimeError, concurrent.futures.CancelledError):
                    return loop.portal.call(self._close_on_loop, timeout, None)
            if closing.wait(None if math.isinf(timeout) else timeout):
                if loop is not None and not self._first_close_running:
                    loop.stop()  # left running by a first call that was interrupted (Ctrl-C)
                return self._close_result
            return FlushResult(pending=self.stats().pending)  # still closing, as aclose says
        self._first_close_running = True
        try:
            return self._first_close(closing, timeout)
        finally:
            self._first_close_running = False

    def _first_close(self, closing: threading.Event, timeout: float) -> FlushResult:
        loop = self._loop
        if loop is None or loop.portal is None or os.getpid() != self._pid:
            self._closed_now(closing)
            return self._close_result
        try:
            loop.portal.call(self._close_on_loop, timeout, closing)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Ctrl-C (or an exit) in the middle: it reaches the caller at once, while
                # the close goes on in the loop's thread to its deadline; a later close(), or
                # the one at exit, waits for it, gets what it settled, and stops the thread.
                raise
            loop.stop()
            self._closed_now(closing)
            raise
        loop.stop()
        return self._close_result

    async def _close_on_loop(self, timeout: float, closing: threading.Event | None) -> FlushResult:
        """The close, on the loop. The first close() ends it (``closing``), there, whether
        or not its caller still waits: an interrupted one does not."""
        try:
            self._drain()  # what was handed off before the close is the close's to send
            return await self._publisher.aclose(timeout)
        finally:
            if closing is not None:
                self._closed_now(closing)

    def _closed_now(self, closing: threading.Event) -> None:
        """The close is over: record what it settled (from the async publisher, not a
        call's return, which an interrupted call never gets) and let the waiting calls go."""
        if closing.is_set():
            return
        if self._callbacks is not None:
            self._callbacks.stop()
        self._close_result = self._publisher._close_result
        _open_publishers.discard(self)
        closing.set()

    def _close_at_exit(self) -> None:
        try:
            result = self.close(self._exit_timeout)
        except Exception:
            logger.exception(
                "fiddler_async: closing at interpreter exit failed",
                extra=event("exit-close-failed"),
            )
            return
        if not result.complete or result.dropped or result.spooled:
            logger.warning(
                "fiddler_async: closed at interpreter exit: of the events still to send, "
                "%d delivered, %d spooled, %d dropped at the deadline, %d unaccounted for",
                result.delivered,
                result.spooled,
                result.dropped,
                result.pending,
                extra=event("exit-close"),
            )
