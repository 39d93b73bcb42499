"""``AsyncPublisher``: the public face. Publishing is a few microseconds of CPU; the rest runs in
the background.

Lifecycle: ``unopened`` -> ``open`` (``start()`` or ``async with``) -> ``closing`` -> ``closed``
(``aclose()``). The background work (the flusher and its requests) runs in a task of its own,
spawned by ``start()`` and ended by ``aclose()``, so the two may be called from different tasks:
a framework's startup hook and shutdown hook, for example. It never raises into your tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import os
import sys
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from threading import get_ident
from typing import TYPE_CHECKING, Any, Protocol, SupportsIndex, TypeAlias, TypeVar, cast

import anyio
import httpx
import orjson

from ._logging import RateLimitedLog, event, logger
from .backfill import FileJob, ProgressCallback, check_options, publish_file
from .buffer import EventBuffer, Fixup, Item, Lane, pack
from .config import PublisherConfig, seconds_or
from .destination import ENV_TYPES, Destination, ModelInfo, ModelRef, model_uuid
from .encode import (
    ENCODE_OPTIONS,
    check_event_size,
    compact,
    encode_default,
    encode_event,
    epoch_millis,
    event_id_text,
    is_null,
    new_event_id,
    splice_members,
)
from .exceptions import (
    ConfigurationError,
    EventBatchError,
    EventError,
    PublisherClosedError,
    SchemaMismatchError,
)
from .flusher import DeliveryFailure, Flusher, give_back_report_slot
from .frames import (
    check_columns,
    encode_frame,
    frame_library,
    import_libraries,
    is_frame,
    libraries_tried,
    polars_rows,
)
from .gate import Gate
from .http1 import is_loopback, transport_for
from .retry import RetryPolicy, is_retryable
from .spool import Spool, SpoolKey
from .spooler import Replayer, ReplayResult, SpoolWriter, dead_letter_lines
from .stats import FlushResult, Ledger, StatsSnapshot
from .wire import ID_EXPLICIT, TS_EXPLICIT, FiddlerV3Exporter, client_headers, place_columns

if TYPE_CHECKING:
    import datetime as dt

    import numpy as np

__all__ = ["AsyncPublisher", "DataFrameLike", "ErrorCallback", "Event", "EventId", "EventTime"]

ErrorCallback: TypeAlias = Callable[[DeliveryFailure], object]
"""Called with every delivery failure; may be a plain function (what it returns is ignored)
or a coroutine function (awaited)."""

Event: TypeAlias = "Mapping[str, Any] | Mapping[Hashable, Any]"
"""An event: column names and values, e.g. a dict (or a row of ``df.to_dict(orient="records")``,
whose keys pandas types as ``Hashable``). The names must be strings, at run time."""

EventTime: TypeAlias = "float | SupportsIndex | dt.date | np.datetime64"
"""A time given for an event: epoch milliseconds (numpy's numbers too), or a ``datetime`` or
``date`` (pandas' ``Timestamp``, numpy's ``datetime64``); naive means UTC."""

EventId: TypeAlias = "str | SupportsIndex | uuid.UUID"
"""An id given for an event: text, an integer (numpy's too) or a UUID; sent and returned as
text (see :func:`~.encode.event_id_text`)."""


class DataFrameLike(Protocol):
    """A pandas or polars DataFrame, or a pyarrow Table, as the batch calls take them."""

    @property
    def shape(self) -> tuple[int, ...]: ...


_T = TypeVar("_T")


class _State(enum.Enum):
    UNOPENED = "unopened"
    STARTING = "starting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# (millis, model, id prefix, head, between, empty, stamped): see AsyncPublisher._id_time_parts.
_IdTimeParts = tuple[int, "ModelInfo | None", bytes, bytes, bytes, bytes, bytes]
_NO_PARTS: _IdTimeParts = (-1, None, b"", b"", b"", b"", b"")
_IdHigh = tuple[int, bytes, bytes, str]
_LOW, _LOW_TEXT = new_event_id.LOW, new_event_id.LOW_TEXT

# The publisher whose background task this is (and the tasks it starts, e.g. an on_error
# callback), so that its aclose() called from there does not wait for the task it runs in.
_in_background: ContextVar[object] = ContextVar("fiddler_async_in_background", default=None)

# Publishers that were started, so that a forked child can reset them (see _forget_parent).
_started_publishers: weakref.WeakSet[AsyncPublisher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for publisher in list(_started_publishers):
        publisher._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)

# Tasks spawned on asyncio are kept here so the loop cannot garbage-collect them mid-flight.
_background_tasks: set[asyncio.Task[None]] = set()


def _running_trio() -> Any:
    """The trio module if we run under trio, else None (trio is imported only if in use)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return None
    return trio


def _loop_clock() -> Callable[[], float]:
    """The running loop's clock (what anyio.current_time reads), usable from its callbacks."""
    trio = _running_trio()
    if trio is not None:
        clock: Callable[[], float] = trio.current_time
        return clock
    return asyncio.get_running_loop().time


def _spawn_detached(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run ``fn(*args)`` in a task owned by no caller, so that any task may later stop it."""
    trio = _running_trio()
    if trio is not None:
        trio.lowlevel.spawn_system_task(fn, *args, name="fiddler_async")
    else:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            fn(*args),  # type: ignore[arg-type]
            name="fiddler_async",
        )
        _background_tasks.add(task)
        task.add_done_callback(_background_tasks.discard)


class AsyncPublisher:
    """Publishes Fiddler events from async code without waiting on the network.

    ``url`` and ``token`` default to the ``FIDDLER_URL`` and ``FIDDLER_TOKEN`` environment
    variables. ``config`` holds every other knob (see :class:`PublisherConfig`); ``transport``
    replaces the HTTP transport (``fiddler_async.http1``'s, or httpx's where a proxy is set in
    the environment), e.g. ``httpx.MockTransport`` in tests; ``on_error`` is called
    with a :class:`DeliveryFailure` for every event that could not be delivered.

    Use ``async with AsyncPublisher() as pub:``, or ``await pub.start()`` and later
    ``await pub.aclose()``, from any task.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        config: PublisherConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_error: ErrorCallback | None = None,
    ) -> None:
        url = url if url is not None else os.environ.get("FIDDLER_URL")
        token = token if token is not None else os.environ.get("FIDDLER_TOKEN")
        if config is not None and not isinstance(config, PublisherConfig):
            raise ConfigurationError(
                f"config must be a PublisherConfig, got {type(config).__qualname__!r}: "
                "e.g. config=PublisherConfig(linger=0.1)"
            )
        self._config = config if config is not None else PublisherConfig()
        url, token = _checked_server(url, token, self._config.allow_insecure_http)
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigurationError(
                "transport must be an httpx.AsyncBaseTransport, got "
                f"{type(transport).__qualname__!r}"
            )
        check_callback(on_error)
        self._url = url.rstrip("/")
        self._token = token
        self._transport = transport
        self._on_error = on_error
        self._ledger = Ledger()
        self._log = RateLimitedLog(self._config.log_interval)
        self._last_stamp: tuple[int, ModelInfo | None, bytes] = (-1, None, b"")
        self._parts = _NO_PARTS
        self._high: _IdHigh = (-1, b"", b"", "")
        # Read on the hot path: plain attributes are quicker than the config's.
        self._stamping = self._config.stamp_publish_time
        self._max_event_bytes = self._config.max_batch_bytes  # an event and its comma must fit
        self._spool = self._new_spool()
        self._writer: SpoolWriter | None = None
        self._replayer: Replayer | None = None
        self._buffer = self._new_buffer()
        self._routes: dict[tuple[str, str, str, str | None, bool], tuple[Destination, Lane]] = {}
        self._models: dict[tuple[str, str], ModelRef] = {}
        self._state = _State.UNOPENED
        self._thread: int | None = None
        """The thread whose event loop started the publisher, the one it runs on."""
        self._client: httpx.AsyncClient | None = None
        self._exporter: FiddlerV3Exporter | None = None
        self._flusher: Flusher | None = None
        # Made by start(): they need a running event loop.
        self._runner_scope: anyio.CancelScope | None = None
        self._started: anyio.Event | None = None
        self._runner_done: anyio.Event | None = None
        self._closed: anyio.Event | None = None
        self._close_result = FlushResult()

    def __repr__(self) -> str:
        return f"<AsyncPublisher url={self._url!r} state={self._state.value}>"

    @property
    def config(self) -> PublisherConfig:
        return self._config

    # Lifecycle

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the background flusher. Call once; then publish; then ``aclose()``."""
        if self._state is not _State.UNOPENED:
            raise PublisherClosedError(f"start() on a publisher that is {self._state.value}")
        config = self._config
        slots = config.max_in_flight + 2  # and room for name lookups beside the publishes
        # A loopback URL names this machine: never through a proxy of the environment, which
        # would carry the token in clear text over the network (http is allowed only there).
        direct = is_loopback(httpx.URL(self._url).host)
        try:  # first: TLS that cannot be set up (an unreadable SSL_CERT_FILE) stops start() here
            transport = self._transport or transport_for(
                self._url, verify=config.tls_verify, max_connections=slots, direct=direct
            )
            client = httpx.AsyncClient(  # with httpx's transport too, where a proxy is set
                trust_env=not direct,
                base_url=self._url,
                headers=client_headers(self._token),
                timeout=httpx.Timeout(config.request_timeout, connect=config.connect_timeout),
                limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
                transport=transport,
                verify=config.tls_verify,
            )
        except OSError as exc:
            raise ConfigurationError(f"TLS cannot be set up for {self._url}: {exc}") from None
        if self._spool is not None:  # a directory we cannot use stops start() here too
            try:
                # Blocking (a directory scan), once at start: no await before the state
                # changes, so two concurrent start() calls cannot both get past the check.
                self._spool.open()
            except OSError as exc:
                raise ConfigurationError(
                    f"spool_dir {str(self._spool.directory)!r} cannot be used: {exc}"
                ) from None
        self._state = _State.STARTING
        self._thread = get_ident()
        _started_publishers.add(self)
        self._runner_scope = anyio.CancelScope()
        self._started, self._runner_done, self._closed = anyio.Event(), anyio.Event(), anyio.Event()
        self._buffer.clock = _loop_clock()
        self._client = client
        self._exporter = FiddlerV3Exporter(
            self._client,
            self._ledger,
            RetryPolicy(config, self._log),
            Gate(config),
            max_batch_bytes=config.max_batch_bytes,
            transport=transport,
        )
        self._flusher = Flusher(
            config,
            self._buffer,
            self._ledger,
            self._exporter,
            self._report_failure,
            spill=self._spill if self._spool is not None else None,
        )
        self._buffer.before_waiting = give_back_report_slot
        if self._spool is not None:
            self._writer = SpoolWriter(self._spool, self._ledger, self._buffer, self._log, config)
            self._replayer = Replayer(
                self._spool,
                self._exporter,
                self._buffer,
                route=self._spool_route,
                report=self._report_failure,
                config=config,
                log=self._log,
                writer=self._writer,
            )
        _spawn_detached(self._run, self._flusher, self._runner_scope)
        try:
            await self._started.wait()
        except BaseException:
            # Cancelled while starting: stop what was spawned, so that nothing runs unowned.
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            raise
        if self._state is _State.STARTING:  # unless aclose() came meanwhile
            self._state = _State.OPEN

    def _forget_parent(self) -> None:
        """In a process forked from the one that started this publisher: the background task
        and the connections stayed behind. Make it a fresh, unstarted publisher, so the child
        can ``start()`` its own pipeline. What was queued or in flight is the parent's to send
        (the parent still has it); the child counts it as dropped, reason ``forked``."""
        if self._state in (_State.UNOPENED, _State.CLOSED):
            return
        inherited = self._pending()
        on_response = self._ledger.on_response
        self._ledger = Ledger()
        self._ledger.on_response = on_response
        self._ledger.accepted = inherited
        if inherited:
            self._ledger.dropped["forked"] = inherited
        if self._spool is not None:
            self._spool.abandon_lock()  # the parent's to hold and release
        self._spool = self._new_spool()
        self._writer = self._replayer = None
        self._buffer = self._new_buffer()
        self._routes.clear()  # their lanes belonged to the old queue
        for ref in self._models.values():
            ref.batch_wait_until = None  # a time on the parent's loop clock
        self._client = self._exporter = self._flusher = None
        self._runner_scope = self._started = self._runner_done = self._closed = None
        self._state = _State.UNOPENED
        self._thread = None

    async def _run(self, flusher: Flusher, scope: anyio.CancelScope) -> None:
        assert self._started is not None
        assert self._runner_done is not None
        _in_background.set(self)
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(flusher.run)
                    if self._writer is not None and self._replayer is not None:
                        tg.start_soon(self._writer.run)
                        tg.start_soon(self._replayer.run, self._writer)
                    self._started.set()
        except anyio.get_cancelled_exc_class():
            # Not our own close (that cancel stays inside `scope`): the event loop is ending
            # under an open publisher (asyncio.run returning, a trio run finishing).
            if self._state in (_State.STARTING, _State.OPEN):
                self._abandoned()
            raise
        except BaseException:  # never raise into the caller's world (nor crash a trio run)
            logger.exception(
                "fiddler_async background task failed; events are no longer sent",
                extra=event("background-failed"),
            )
        finally:
            self._started.set()
            self._runner_done.set()

    async def aclose(self, timeout: float | None = None) -> FlushResult:
        """Send what is queued, waiting at most ``timeout`` seconds (default
        ``config.close_timeout``), then stop. At the deadline, requests in flight are cancelled
        and they and the events still queued are dropped (reason ``shutdown``); the result says
        what became of the events that were pending. Safe to call again, or concurrently (the
        later calls wait for the first, up to their own timeout), and from any task of the
        event loop it runs on (once closed, from anywhere).
        """
        timeout = seconds_or(self._config.close_timeout, timeout)
        if self._state is _State.CLOSED:
            return self._close_result
        if self._elsewhere():
            raise self._not_open()
        if self._state is _State.UNOPENED:
            self._state = _State.CLOSED
            return self._close_result
        if self._state is _State.STARTING:
            assert self._started is not None
            with anyio.move_on_after(timeout):
                await self._started.wait()
        if self._state not in (_State.STARTING, _State.OPEN):
            return await self._await_close(timeout)
        assert self._flusher is not None
        deadline = anyio.current_time() + timeout
        self._state = _State.CLOSING
        self._buffer.close()
        watch = self._ledger.watch(self._pending())
        self._flusher.begin_flush()
        try:
            # Closing is cleanup: it runs to its deadline even if the caller is cancelled.
            with anyio.CancelScope(deadline=deadline, shield=True):
                await watch.done.wait()
                await self._flusher.reports_done()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            self._ledger.unwatch(watch)
            self._close_result = watch.result()
        if self._close_result.dropped:
            logger.warning(
                "fiddler_async closed at its %.3g s deadline: %d event(s) dropped",
                timeout,
                self._close_result.dropped,
                extra=event("close-deadline"),
            )
        return self._close_result

    async def _shutdown(self) -> None:
        """Stop the background task and the HTTP client; what is still queued is dropped, or
        written to the spool. Events in flight are settled by their own tasks as they are
        cancelled."""
        assert self._runner_scope is not None
        assert self._runner_done is not None
        assert self._closed is not None
        if self._replayer is not None:
            self._replayer.stop()
        self._runner_scope.cancel()
        self._empty_queue()
        if _in_background.get() is not self:  # else it would wait for the task it runs in
            with anyio.move_on_after(1.0):
                await self._runner_done.wait()
        if self._writer is not None and self._spool is not None:
            # Blocking, on purpose: this is the last chance to keep these events.
            self._writer.drain()
        if self._client is not None:
            with anyio.move_on_after(1.0):
                await self._client.aclose()
        self._state = _State.CLOSED
        self._closed.set()

    def _empty_queue(self) -> None:
        """At the end: hand what is still queued to the spool (which from now on keeps all it
        is given, for its final drain), or count it dropped."""
        if self._writer is not None:
            self._writer.closing = True
        for lane, items in self._buffer.take_all():
            if self._writer is not None:
                self._writer.offer(lane.dest, items)
            else:
                self._ledger.settle(items, "dropped", "shutdown")
                self._ledger.dropped_unsent += len(items)

    def _abandoned(self) -> None:
        """The loop ends without ``aclose()``: nothing can be sent any more. Spool what is
        queued (blocking: it is the last chance) or count it dropped, and say so."""
        self._state = _State.CLOSED
        self._buffer.close()
        self._empty_queue()
        if self._writer is not None:
            self._writer.drain()
        if self._replayer is not None:
            self._replayer.stop()
        stats = self.stats()
        logger.warning(
            "fiddler_async: the event loop ended without aclose(): %d event(s) spooled, "
            "%d dropped in all; close the publisher before the loop ends (async with, or "
            "aclose() in your shutdown hook)",
            stats.spooled,
            stats.dropped_total,
            extra=event("loop-ended"),
        )
        if self._closed is not None:
            self._closed.set()

    async def _await_close(self, timeout: float) -> FlushResult:
        """Another call is closing: wait for it to finish, up to our own ``timeout``; not
        from an on_error callback of ours, which that close waits for."""
        flusher = self._flusher
        if self._closed is not None and not (flusher is not None and flusher.reporting_here()):
            with anyio.move_on_after(timeout):
                await self._closed.wait()
        if self._state is _State.CLOSED:
            return self._close_result
        return FlushResult(pending=self._pending())

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything queued now, without waiting for batches to fill, and wait until the
        events accepted before this call are settled (and their failures reported to
        ``on_error``) or ``timeout`` seconds (default ``config.flush_timeout``) have passed.
        Returns on time, with what became of them; during a close, what became of the events
        the close sends (it waits for the close, up to ``timeout``). From an ``on_error``
        callback, it does not wait for the reports of the callback's own batch."""
        if self._elsewhere() and self._state is not _State.CLOSED:
            raise self._not_open()
        if self._state in (_State.UNOPENED, _State.STARTING):
            raise PublisherClosedError("flush() before start()")
        timeout = seconds_or(self._config.flush_timeout, timeout)
        if self._state is _State.CLOSING:  # it sends what is queued: the close's result
            return await self._await_close(timeout)
        if self._flusher is None or self._state is not _State.OPEN:
            return FlushResult(pending=self._pending())
        watch = self._ledger.watch(self._pending())
        self._flusher.begin_flush()
        try:
            with anyio.move_on_after(timeout):
                await watch.done.wait()
                await self._flusher.reports_done(watch.last_seq)
        finally:
            self._flusher.end_flush()
            self._ledger.unwatch(watch)
        return watch.result()

    # Publishing

    def publish_event_nowait(
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
        """Queue one event and return its id, never waiting. For fire-and-forget from any
        coroutine. A full queue applies the overflow policy; under ``block``, which cannot wait
        here, a full queue raises QueueFullError. Bad input raises at once and queues nothing.
        """
        # The publish hot path: _require_open() inlined.
        if self._state is not _State.OPEN or get_ident() != self._thread:
            raise self._not_open()
        try:
            route = self._routes.get((project_id, model_id, env_type, env_name, update_event))
        except TypeError:  # an argument that is no key: _route names it
            route = None
        if route is None:
            route = self._route(project_id, model_id, env_type, env_name, update_event)
        dest, lane = route
        new = (
            self._prepare_update(dest, event, event_id, event_timestamp)
            if update_event
            else self._prepare_new(dest, event, event_id, event_timestamp)
        )
        if new is not None:
            self._buffer.offer(lane, new[0], None)
            return new[1]
        body, fixup, returned_id = self._prepare(dest, event, event_id, event_timestamp)
        self._buffer.offer(lane, body, fixup)
        return returned_id

    async def publish_event(
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
        """Queue one event and return its id (Fiddler's ``publish_event``, without the wait).

        ``project_id`` and ``model_id`` are names (a model's UUID is accepted as ``model_id``).
        ``event_id`` and ``event_timestamp`` (epoch milliseconds, not seconds; or a datetime)
        are written into the model's event id and timestamp columns; without an ``event_id`` one is
        generated. ``update_event=True`` sends the event as an update (PATCH) of the event with
        that id. Waits only when the queue is full and the overflow policy is ``block``.
        """
        if self._config.overflow != "block":
            return self.publish_event_nowait(
                project_id,
                model_id,
                event,
                event_id=event_id,
                update_event=update_event,
                event_timestamp=event_timestamp,
                env_type=env_type,
                env_name=env_name,
            )
        if self._state is not _State.OPEN or get_ident() != self._thread:  # (inlined too)
            raise self._not_open()
        dest, lane = self._route(project_id, model_id, env_type, env_name, update_event)
        new = (
            self._prepare_update(dest, event, event_id, event_timestamp)
            if update_event
            else self._prepare_new(dest, event, event_id, event_timestamp)
        )
        if new is not None:
            await self._buffer.put(lane, new[0], None, self._config.block_timeout)
            return new[1]
        body, fixup, returned_id = self._prepare(dest, event, event_id, event_timestamp)
        await self._buffer.put(lane, body, fixup, self._config.block_timeout)
        return returned_id

    async def publish_events_batch(
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
        """Queue many events and return their ids: an iterable of dicts, or a pandas or polars
        DataFrame or a pyarrow Table (encoded without a Python loop over rows when polars is
        installed: see :mod:`fiddler_async.frames`).

        All events are checked before any is queued: if some are invalid, EventBatchError
        lists each by position and nothing is queued. The first calls for a model wait for the
        model's lookup (then cached), so that the ids returned are the ones the events carry in
        the model's id column, and updates without ``event_ids`` are keyed by that column; but
        for ``lookup_wait`` at most, except those updates (see :class:`PublisherConfig`).
        """
        self._require_open()
        dest, lane = self._route(project_id, model_id, env_type, env_name, update_event)
        if is_frame(events):
            check_columns(events)
        event_ids = _listed(event_ids, "event_ids")
        event_timestamps = _listed(event_timestamps, "event_timestamps")
        if dest.model.info is None:
            # Rows of an update without an id of their own are keyed by the id column.
            keyed = update_event and (event_ids is None or None in event_ids)
            await self._await_lookup(dest.model, keyed)
        if is_frame(events) and event_timestamps is None and dest.model.info is not None:
            if not libraries_tried():
                await anyio.to_thread.run_sync(import_libraries)
            frame_ids = await self._queue_frame(dest, lane, events, event_ids)
            if frame_ids is not None:
                return frame_ids
        # A frame is made rows on the worker thread too; an iterator is read here (it may be
        # the caller's, of this loop), and has no length before.
        source: Any = events if is_frame(events) else _rows(events)
        prepare = functools.partial(
            self._prepare_all, dest, source, event_ids, event_timestamps, update_event
        )
        bodies, fixups, returned = await _off_the_loop_if_many(len(source), prepare)
        await self._queue_all(lane, bodies, fixups)
        return returned

    def _prepare_all(
        self,
        dest: Destination,
        events: Any,
        event_ids: list[Any] | None,
        event_timestamps: list[Any] | None,
        update_event: bool,
    ) -> tuple[list[bytes], list[Fixup | None] | None, list[str]]:
        """A batch call's rows as events to queue: bodies, fix-ups (None when all are
        final), ids. All at once where they allow it (:meth:`_prepare_rows`), else one by one;
        EventBatchError lists every bad row."""
        rows = _rows(events) if is_frame(events) else events
        new = self._prepare_rows(dest, rows, event_ids, event_timestamps)
        if new is not None:
            return new[0], None, new[1]
        ids = _aligned(event_ids, len(rows), "event_ids")
        times = _aligned(event_timestamps, len(rows), "event_timestamps")
        bodies: list[bytes] = []
        fixups: list[Fixup | None] = []
        returned: list[str] = []
        errors: dict[int, EventError] = {}
        for index, row in enumerate(rows):
            try:
                short = self._prepare_update if update_event else self._prepare_new
                one = short(dest, row, ids[index], times[index])
                if one is not None:
                    bodies.append(one[0])
                    fixups.append(None)
                    returned.append(one[1])
                    continue
                body, fixup, returned_id = self._prepare(dest, row, ids[index], times[index])
            except EventError as exc:
                errors[index] = exc
            else:
                bodies.append(body)
                fixups.append(fixup)
                returned.append(returned_id)
        if errors:
            raise EventBatchError(errors)
        return bodies, fixups, returned

    async def _await_lookup(self, model: ModelRef, keyed: bool) -> None:
        """Wait for ``model``'s first lookup, so that ids the events carry are the ids
        returned: all batch calls together at most ``lookup_wait``, and none once an attempt
        of it failed (then their events are queued to be completed once it is known), or for
        as long as it takes when ``keyed`` (updates keyed by the id column, which cannot be
        found without it). A lookup that failed for good (a wrong name, a refused token)
        raises here."""
        exporter, flusher = self._exporter, self._flusher
        assert exporter is not None
        assert flusher is not None
        if keyed:
            await exporter.resolve(model)
        else:
            now = anyio.current_time()
            if model.batch_wait_until is None:
                model.batch_wait_until = now + self._config.lookup_wait
            if exporter.backend_down:
                model.batch_wait_until = now  # requests are failing: the lookup would too
            if not exporter.looking_up(model):
                flusher.look_up_soon(model)
            # Waiting for the background lookup, not running one here: giving up at the
            # deadline then cancels nothing of it. A failed attempt ends the wait too: the
            # server is not answering well, and waiting for its retries would hold the caller.
            with anyio.move_on_after(model.batch_wait_until - now):
                await exporter.lookup_news(model)
            if model.info is None:
                model.batch_wait_until = now  # an attempt failed: later calls do not wait
        self._require_open()
        failure = exporter.lookup_failure(model)
        if model.info is None and failure is not None and not is_retryable(failure):
            raise failure.with_traceback(None)  # raised again and again: else its traceback grows

    async def _queue_frame(
        self, dest: Destination, lane: Lane, frame: Any, given: list[Any] | None
    ) -> list[str] | None:
        """Queue a DataFrame's rows, encoded all at once; None if they must go row by row."""
        info = dest.model.info
        assert info is not None
        event_ids = None if given is None else _id_texts(given)
        stamp = None
        if self._config.stamp_publish_time and not dest.update:
            stamp = int(time.time() * 1000)  # one publish time for the batch
        encode = functools.partial(
            encode_frame, frame, info, update=dest.update, event_ids=event_ids, stamp_millis=stamp
        )
        encoded = await _off_the_loop_if_many(len(frame), encode)
        if encoded is None:
            return None
        _aligned(event_ids, len(encoded.bodies), "event_ids")
        errors: dict[int, EventError] = {}
        for index, body in enumerate(encoded.bodies):
            try:
                self._check_size(body)
            except EventError as exc:
                errors[index] = exc
        if errors:
            raise EventBatchError(errors)
        await self._queue_all(lane, encoded.bodies)
        return encoded.ids

    async def _queue_all(
        self, lane: Lane, bodies: list[bytes], fixups: list[Fixup | None] | None = None
    ) -> None:
        """Queue a batch call's events (``fixups`` beside ``bodies``; None when all are final)
        under the overflow policy: ``block`` waits for room for all of them and ``raise``
        refuses all unless all fit (so a timeout, a cancellation or a refusal leaves none
        queued); the drop policies apply event by event. Events that could not fit even an
        empty queue are refused whole under every policy."""
        self._require_open()  # a close may have come while they were prepared
        buffer = self._buffer
        policy = self._config.overflow
        if policy in ("block", "raise"):
            if fixups is None:
                size = sum(map(len, bodies))
            else:  # as the queue counts them
                size = sum(len(pack(b, f)) for b, f in zip(bodies, fixups, strict=True))
            if policy == "block":
                await buffer.wait_for_room(len(bodies), size, self._config.block_timeout)
            else:
                buffer.require_room(len(bodies), size)
        buffer.offer_all(lane, bodies, fixups)  # (which refuses what could never fit)

    async def publish_file(
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
        """Publish many events through Fiddler's file path (upload, then a server-side job)
        rather than the queue: for large backfills. ``source`` is a DataFrame or Arrow table
        (sent as Parquet, ids placed as by :meth:`publish_events_batch`; needs the
        ``dataframes`` extra) or a ``.csv``/``.parquet``/``.jsonl`` path. ``progress`` is
        called with a stage (``"upload"``, ``"job"``) and a fraction. Returns once the job
        succeeded; FileJobError if it failed, FileJobTimeoutError (a TimeoutError, with the job's
        id) after ``timeout`` seconds. See
        :mod:`fiddler_async.backfill`."""
        self._require_open()
        assert self._exporter is not None
        check_options(progress, poll_interval, timeout)
        listed = _listed(event_ids, "event_ids")
        ids = None if listed is None else _id_texts(listed)
        if is_frame(source) and not len(source):  # the server would run a job of nothing
            raise ValueError("the DataFrame has no rows: there is nothing to publish")
        dest, _ = self._route(project_id, model_id, env_type, env_name, update_event)
        return await publish_file(
            self._exporter,
            dest,
            source,
            event_ids=ids,
            stamp_publish_time=self._config.stamp_publish_time,
            progress=progress,
            poll_interval=poll_interval,
            timeout=timeout,
        )

    async def replay_spool(self) -> ReplayResult:
        """Send what waits in the spool now, oldest first, stopping at the backend's first
        error (the background does the same on its own; this is for scripts and the
        ``fiddler-async replay`` command). Needs ``spool_dir``."""
        self._require_open()
        if self._replayer is None:
            raise ConfigurationError("replay_spool() needs PublisherConfig(spool_dir=...)")
        return await self._replayer.replay_pass()

    async def resolve(self, project_id: str, model_id: str) -> ModelInfo:
        """Look the model up now (normally done in the background on first use) and return its
        schema facts. Useful at startup to fail fast on a wrong name, and to make the ids
        returned for events that carry their own id column exact from the first event."""
        self._require_open()
        assert self._exporter is not None
        return await self._exporter.resolve(self._model_ref(project_id, model_id))

    def stats(self) -> StatsSnapshot:
        """A snapshot of the counters. ``accepted == delivered + failed + spooled +
        dropped_total + pending`` holds in every snapshot."""
        ledger, flusher = self._ledger, self._flusher
        return StatsSnapshot(
            accepted=ledger.accepted,
            delivered=ledger.delivered,
            failed=ledger.failed,
            spooled=ledger.spooled,
            replayed=self._replayer.replayed if self._replayer else 0,
            spool_bytes=self._spool.used_bytes if self._spool else 0,
            dropped=dict(ledger.dropped),
            rejected=ledger.rejected,
            queued_events=self._buffer.events,
            queued_bytes=self._buffer.bytes,
            in_flight_requests=flusher.in_flight_requests if flusher else 0,
            in_flight_events=flusher.in_flight_events if flusher else 0,
            spilling_events=self._writer.transit_events if self._writer else 0,
            requests=ledger.requests,
            retries=ledger.retries,
            responses=dict(ledger.responses),
            last_error=ledger.last_error,
        )

    # For the synchronous Publisher, whose callers are on other threads than the loop's

    def _prepare_off_loop(
        self,
        project_id: str,
        model_id: str,
        event: Event,
        *,
        event_id: EventId | None,
        update_event: bool,
        event_timestamp: EventTime | None,
        env_type: str,
        env_name: str | None,
    ) -> tuple[Lane, bytes, Fixup | None, str] | None:
        """The part of ``publish_event_nowait`` that may run on any thread (it reads shared
        state, never changes it): the event encoded for its lane, and its id. None for a
        destination not seen yet: the caller must take the loop's path."""
        try:
            route = self._routes.get((project_id, model_id, env_type, env_name, update_event))
        except TypeError:  # an argument that is no key: the loop's path names it
            return None
        if route is None:
            return None
        dest, lane = route
        body, fixup, returned_id = self._prepare(dest, event, event_id, event_timestamp)
        return lane, body, fixup, returned_id

    def _count_dropped(self, count: int, reason: str) -> None:
        """On the loop's thread: ``count`` events were accepted (ids returned) and dropped
        before they reached the queue (the sync Publisher's hand-off was full)."""
        first = self._ledger.reserve(count)
        seqs = [(seq,) for seq in range(first, first + count)]
        self._ledger.settle(seqs, "dropped", reason)
        self._log.warning(
            f"drop:{reason}", f"dropped {count} event(s): {reason} (waiting for the loop)"
        )

    def _offer_prepared(self, lane: Lane, body: bytes, fixup: Fixup | None) -> None:
        """On the loop's thread: queue what :meth:`_prepare_off_loop` made. Its caller has
        its id already, so it is accepted whatever happens; if the publisher stopped in the
        meantime, it is counted dropped at shutdown."""
        if self._state is _State.OPEN:
            self._buffer.offer(lane, body, fixup)
        else:
            self._ledger.settle([(self._ledger.next_seq(),)], "dropped", "shutdown")
            self._ledger.dropped_unsent += 1

    # Internals

    def _pending(self) -> int:
        in_flight = self._flusher.in_flight_events if self._flusher else 0
        spilling = self._writer.transit_events if self._writer else 0
        return self._buffer.events + in_flight + spilling

    def _new_spool(self) -> Spool | None:
        config = self._config
        if config.spool_dir is None:
            return None
        return Spool(config.spool_dir, config.spool_max_bytes, config.spool_fsync)

    def _new_buffer(self) -> EventBuffer:
        spill = self._spill if self._spool is not None else None
        return EventBuffer(self._config, self._ledger, self._log.warning, spill)

    def _spill(self, dest: Destination, items: list[Item]) -> None:
        assert self._writer is not None
        self._writer.offer(dest, items)

    def _spool_route(self, key: SpoolKey) -> Destination:
        return self._route(key.project, key.model, key.env_type, key.env_name, key.update)[0]

    def _not_open(self) -> PublisherClosedError:
        if self._elsewhere():
            return PublisherClosedError(
                "this publisher runs on the event loop of the thread that started it: use it "
                "there (from another thread, use the sync Publisher, which is thread-safe)"
            )
        if self._state is _State.UNOPENED:
            return PublisherClosedError("the publisher is not started: use `async with` or start()")
        if self._state is _State.STARTING:
            return PublisherClosedError("the publisher is starting: await start() first")
        return PublisherClosedError(f"the publisher is {self._state.value}")

    def _require_open(self) -> None:
        """PublisherClosedError unless open, and called on the thread whose loop runs it."""
        if self._state is not _State.OPEN or get_ident() != self._thread:
            raise self._not_open()

    def _elsewhere(self) -> bool:
        """Called from a thread other than the one whose event loop runs the publisher:
        its queue and events belong to that loop (and would be raced for, never sent)."""
        return self._thread is not None and get_ident() != self._thread

    def _model_ref(self, project_id: str, model_id: str) -> ModelRef:
        for name, value in (("project_id", project_id), ("model_id", model_id)):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
        key = (project_id, model_id)
        ref = self._models.get(key)
        if ref is None:
            # A model's UUID, however written and with whatever project, is one model (one
            # ordering of its inserts and updates).
            given_uuid = model_uuid(model_id)
            same = ("", given_uuid) if given_uuid else key
            ref = self._models.get(same)
            if ref is None:
                ref = self._models[same] = ModelRef(project_id, given_uuid or model_id)
                if self._flusher is not None:
                    self._flusher.look_up_soon(ref)
            self._models[key] = ref
        return ref

    def _route(
        self, project_id: str, model_id: str, env_type: str, env_name: str | None, update: bool
    ) -> tuple[Destination, Lane]:
        key = (project_id, model_id, env_type, env_name, update)
        try:
            route = self._routes.get(key)
        except TypeError:  # an argument that is no key (a list): named below
            route = None
        if route is None:
            if env_type not in ENV_TYPES:
                raise ConfigurationError(f"env_type must be one of {ENV_TYPES}, got {env_type!r}")
            if env_name is not None and (not isinstance(env_name, str) or not env_name):
                raise ConfigurationError(f"env_name must be a non-empty string, got {env_name!r}")
            if (env_type == "PRE_PRODUCTION") != (env_name is not None):
                raise ConfigurationError(
                    "env_name names a PRE_PRODUCTION dataset: required for PRE_PRODUCTION, "
                    "and only for it"
                )
            dest = Destination(
                self._model_ref(project_id, model_id), env_type, env_name, bool(update)
            )
            route = (dest, self._buffer.lane(dest))
            with contextlib.suppress(TypeError):  # an update_event that is no key: not kept
                self._routes[key] = route
        return route

    def _prepare_new(
        self, dest: Destination, event: Event, event_id: object, when: object
    ) -> tuple[bytes, str] | None:
        """The common cases of :meth:`_prepare`, made short because they are the hot path: a
        new event (the caller makes sure it is not an update) for a resolved model; the
        shortest without an id or a time of its own (in the arguments, ``event_id`` and
        ``when``, or in the model's columns). None when it is none of these cases."""
        info = dest.model.info
        if info is None or type(event) is not dict:  # the rest, and bad input: the long way
            return None
        id_col, ts_col = info.event_id_col, info.event_ts_col
        if (
            event_id is not None
            or when is not None
            or (id_col is not None and id_col in event)
            or (ts_col is not None and ts_col in event)
        ):
            if id_col is None or ts_col is None or not self._stamping:
                return None
            # Given both an id and a time (Fiddler's seed call), nothing of the parts is used.
            both = event_id is not None and when is not None
            parts = _NO_PARTS if both else self._parts_now(info)
            return self._checked(self._join_own(info, parts, event, event_id, when))
        try:
            encoded = orjson.dumps(event, default=encode_default, option=ENCODE_OPTIONS)
        except TypeError:
            encoded = encode_event(event)  # raises, naming the field
        ids = new_event_id
        number = next(ids.counter) & ids.MASK
        high = self._high  # _id_high, inline
        if high[0] != number >> 8 or high[1] is not ids.prefix_bytes:
            high = self._id_high(number, ids.prefix_bytes)
        low = number & 0xFF
        if id_col is not None and ts_col is not None and self._stamping:
            millis = int(time.time() * 1000)
            parts = self._parts  # _parts_now, inline on the hottest path
            if parts[0] != millis or parts[1] is not info or parts[2] is not ids.prefix_bytes:
                parts = self._id_time_parts(info, millis)
            _, _, _, head, between, empty, _ = parts
            # Joined once into an exact-size object (as _prepare_rows does). The id is
            # ASCII letters, digits and dashes (nothing to escape).
            if len(encoded) > 2:
                body = b"".join((head, high[2], _LOW[low], between, encoded[1:]))
            else:  # {}
                body = b"".join((head, high[2], _LOW[low], empty))
        else:
            members = []
            if id_col is not None:
                digits = ids.prefix_bytes + high[2] + _LOW[low]
                members.append(b'%s"%s"' % (info.id_key, digits))
            if ts_col is not None and self._stamping:
                members.append(info.ts_key + self._stamp(info))
            body = splice_members(encoded, members)
        if len(body) >= self._max_event_bytes:
            self._check_size(body)  # raises, with the message
        return body, high[3] + _LOW_TEXT[low]

    def _prepare_rows(
        self,
        dest: Destination,
        rows: list[Mapping[str, Any]],
        event_ids: list[Any] | None,
        event_timestamps: list[Any] | None,
    ) -> tuple[list[bytes], list[str]] | None:
        """:meth:`_prepare_new` or :meth:`_prepare_update` for all the rows of a batch call
        at once: what is the same for every row is worked out once (for new events, one
        publish time for the call, as for a DataFrame). None unless every row is such a case
        and encodes within the size limit; the rows then go one by one, which names a bad
        one."""
        info = dest.model.info
        if info is None:
            return None
        id_col, ts_col = info.event_id_col, info.event_ts_col
        parts: _IdTimeParts | None = None
        if dest.update:
            if id_col is None:
                return None
        elif id_col is None or ts_col is None or not self._stamping:
            return None
        else:
            parts = self._id_time_parts(info, int(time.time() * 1000))
        nothing = [None] * len(rows)
        event_ids = nothing if event_ids is None else event_ids
        times = nothing if event_timestamps is None else event_timestamps
        if len(event_ids) != len(rows) or len(times) != len(rows):
            return None  # the long way says so
        _, _, prefix_bytes, head, between, empty, _ = parts or _NO_PARTS
        counter, mask, limit = new_event_id.counter, new_event_id.MASK, self._max_event_bytes
        high = self._high
        bodies: list[bytes] = []
        returned: list[str] = []
        join, dumps = b"".join, orjson.dumps
        # A row that turns out not to be such a case sends the call the long way, and the rows
        # before it are encoded twice: the price of a loop without a check per row.
        for row, given, when in zip(rows, event_ids, times, strict=True):
            if type(row) is not dict:
                return None
            if (
                parts is None
                or given is not None
                or when is not None
                or id_col in row
                or ts_col in row
            ):
                own = self._join_own(info, parts, row, given, when)
                if own is None:
                    return None
                body, event_id = own
            else:  # the usual row, inline
                try:
                    encoded = dumps(row, default=encode_default, option=ENCODE_OPTIONS)
                except TypeError:
                    return None
                number = next(counter) & mask
                if high[0] != number >> 8 or high[1] is not prefix_bytes:
                    high = self._id_high(number, prefix_bytes)
                low = number & 0xFF
                body = (
                    join((head, high[2], _LOW[low], between, encoded[1:]))
                    if len(encoded) > 2
                    else join((head, high[2], _LOW[low], empty))
                )
                event_id = high[3] + _LOW_TEXT[low]
            if len(body) >= limit:
                return None
            bodies.append(body)
            returned.append(event_id)
        return bodies, returned

    def _prepare_update(
        self, dest: Destination, event: Event, event_id: object, when: object
    ) -> tuple[bytes, str] | None:
        """The common case of an update (the caller makes sure it is one), made short: for a
        resolved model with an id column, keyed by ``event_id`` or by the event's own id
        column (see :meth:`_join_own`). None otherwise."""
        info = dest.model.info
        if info is None or info.event_id_col is None or type(event) is not dict:
            return None
        return self._checked(self._join_own(info, None, event, event_id, when))

    def _checked(self, prepared: tuple[bytes, str] | None) -> tuple[bytes, str] | None:
        if prepared is not None and len(prepared[0]) >= self._max_event_bytes:
            self._check_size(prepared[0])  # raises, with the message
        return prepared

    def _join_own(
        self,
        info: ModelInfo,
        parts: _IdTimeParts | None,
        event: dict[str, Any],
        given: object,
        when: object,
    ) -> tuple[bytes, str] | None:
        """The body and id of an event that brings its own id (``given``, or a value in the
        model's id column) or its own time (``when``, or a value in the time column): a new
        event, joined from ``parts`` as one without (see :meth:`_id_time_parts`); or an
        update (``parts`` None), which must bring its id and is stamped only with ``when``.
        None, before encoding anything, for what the long way must do: a given id that is not
        non-empty ASCII text (an int or a UUID is made text there), a given id besides an id
        column or a given time besides a time column (each replaces its column), an id column
        whose value is not text or an integer (a null is replaced by a new id, and is an error
        in an update), an update without an id, a time the long way refuses (it says why), a
        model without a time column for ``when``; and after encoding, for an empty event or a
        value orjson cannot encode."""
        id_col = info.event_id_col
        if given is not None:
            if type(given) is not str or not given or not given.isascii() or id_col in event:
                return None
            event_id: str | None = given
        elif id_col in event:
            own = event[id_col]
            if type(own) is str and own:
                event_id = own
            elif type(own) is int:
                event_id = str(own)
            else:
                return None
        elif parts is None:
            return None  # an update keyed by nothing: the long way says why
        else:
            event_id = None  # one is made below
        ts_col = info.event_ts_col
        if when is not None:
            if ts_col is None or ts_col in event:
                return None
            try:
                stamp = info.ts_key + info.timestamp_json(epoch_millis(when)) + b","
            except EventError:
                return None
        elif parts is None:
            stamp = b""
        elif ts_col in event:
            own_time = event[ts_col]
            kind = type(own_time)
            if own_time is None or (kind is not int and kind is not str and is_null(own_time)):
                return None  # the publish time takes the place of a null: the long way
            stamp = b""
        else:
            stamp = parts[6]
        try:
            encoded = orjson.dumps(event, default=encode_default, option=ENCODE_OPTIONS)
        except TypeError:
            return None
        if len(encoded) <= 2:
            return None
        rest = encoded[1:]
        if given is not None:
            return b"".join((b"{", info.id_key, orjson.dumps(given), b",", stamp, rest)), given
        if event_id is not None:  # the id column's
            return (b"".join((b"{", stamp, rest)) if stamp else compact(encoded)), event_id
        assert parts is not None
        _, _, prefix, head, *_ = parts
        number = next(new_event_id.counter) & new_event_id.MASK
        high = self._id_high(number, prefix)
        low = number & 0xFF
        body = b"".join((head, high[2], _LOW[low], b'",', stamp, rest))
        return body, high[3] + _LOW_TEXT[low]

    def _id_high(self, number: int, prefix: bytes) -> _IdHigh:
        """For an id made of ``prefix`` and counter value ``number``: the first ten of its
        twelve counter digits, as bytes, and as the id's text up to them; kept for the next
        ids, which share them up to 255 times (the last two come from a table). The hot paths
        check the kept ones inline, and call this only for new ones."""
        high = self._high
        if high[0] == number >> 8 and high[1] is prefix:
            return high
        digits = b"%010x" % (number >> 8)
        self._high = high = (number >> 8, prefix, digits, (prefix + digits).decode())
        return high

    def _parts_now(self, info: ModelInfo) -> _IdTimeParts:
        """:meth:`_id_time_parts` for the current millisecond, cached."""
        millis = int(time.time() * 1000)
        parts = self._parts
        if parts[0] != millis or parts[1] is not info or parts[2] is not new_event_id.prefix_bytes:
            parts = self._id_time_parts(info, millis)
        return parts

    def _id_time_parts(self, info: ModelInfo, millis: int) -> _IdTimeParts:
        """What the body of a new event is joined from, for ``info`` at ``millis``: the
        head up to its id's counter digits (``{"<id column>":"<id prefix>``); what follows
        them (``","<time column>":<time>,``), the event's own members coming next; what
        follows them in an empty event (``...<time>}``); and the time member alone, for an
        event with an id of its own (``"<time column>":<time>,``). Kept for the calls in
        the same millisecond, for the same model and id prefix (a forked child has its
        own)."""
        prefix = new_event_id.prefix_bytes
        stamp = info.ts_key + info.timestamp_json(millis)
        head = info.new_event_head + prefix
        between, empty = b'",' + stamp + b",", b'",' + stamp + b"}"
        self._parts = parts = (millis, info, prefix, head, between, empty, stamp + b",")
        return parts

    def _stamp(self, info: ModelInfo) -> bytes:
        """The publish time in the model's format; made once per millisecond and model."""
        millis = int(time.time() * 1000)
        cached = self._last_stamp
        if cached[0] == millis and cached[1] is info:
            return cached[2]
        stamp = info.timestamp_json(millis)
        self._last_stamp = (millis, info, stamp)
        return stamp

    def _prepare(
        self,
        dest: Destination,
        event: Event,
        event_id: object,
        event_timestamp: object,
    ) -> tuple[bytes, Fixup | None, str]:
        """Encode one event for ``dest``: (body, fix-up for later or None, the id to return)."""
        id_explicit = event_id is not None
        given: str | None
        if id_explicit:
            given = event_id_text(event_id)
        elif dest.update:
            given = None  # an update joins an existing id; it never gets a new one
        else:
            given = new_event_id()
        ts_explicit = event_timestamp is not None
        if ts_explicit:
            millis: int | None = epoch_millis(event_timestamp)
        elif self._config.stamp_publish_time and not dest.update:
            millis = int(time.time() * 1000)
        else:
            millis = None
        body = encode_event(event)
        named = cast("Mapping[str, Any]", event)  # (encode_event refuses names not text)
        info = dest.model.info
        if info is None:
            # The model's columns are not known yet: the exporter places id and time later.
            if dest.update and not id_explicit:
                raise SchemaMismatchError(
                    "an update needs event_id= until the model is resolved; pass it, or "
                    "`await publisher.resolve(project_id, model_id)` first"
                )
            flags = (ID_EXPLICIT if id_explicit else 0) | (TS_EXPLICIT if ts_explicit else 0)
            fixup = (given, millis, flags)
            # Measured as the queue holds it, behind its fix-up (which the id and time it
            # stands for replace later), so that it fits any queue a request fits; packed
            # here only when that could matter (the fix-up's JSON takes at most 6 bytes per
            # id character and 64 more), as the queue packs it again.
            if len(body) + 6 * len(given or "") + 64 >= self._max_event_bytes:
                self._check_size(pack(body, fixup))
            return compact(body), fixup, given or ""
        members, remove, carried = place_columns(
            info,
            named,
            update=dest.update,
            event_id=given,
            id_explicit=id_explicit,
            ts_millis=millis,
            ts_explicit=ts_explicit,
        )
        if remove:
            body = encode_event({k: v for k, v in named.items() if k not in remove})
        body = splice_members(body, members)
        self._check_size(body)
        return body, None, (given or "") if carried is None else carried

    def _check_size(self, body: bytes) -> None:
        check_event_size(body, self._config.max_batch_bytes)

    async def _report_failure(self, failure: DeliveryFailure) -> None:
        count = len(failure.bodies)
        where = f"{failure.project}/{failure.model}"
        self._log.error(
            f"failed:{where}:{type(failure.error).__name__}",
            f"{count} event(s) for {where} not delivered: "
            f"{type(failure.error).__name__}: {failure.error}",
        )
        if self._spool is not None:
            try:
                await anyio.to_thread.run_sync(
                    self._spool.write_dead_letters, dead_letter_lines(failure)
                )
            except Exception as exc:  # a full disk must not stop the report
                self._log.error("dead-letters", f"could not write dead letters: {exc}")
        if self._on_error is not None:
            outcome = self._on_error(failure)
            if inspect.isawaitable(outcome):
                await outcome


ROWS_OFF_THE_LOOP = 20_000
"""A batch call of this many rows or more is encoded on a worker thread."""


def _checked_server(url: object, token: object, allow_insecure_http: bool) -> tuple[str, str]:
    """``url`` and ``token``, checked: an http(s) URL with a host (plain http only to this
    machine unless allowed) and a token an HTTP header can carry."""
    if not url:
        raise ConfigurationError("no Fiddler URL: pass url= or set FIDDLER_URL")
    if not token:
        raise ConfigurationError("no Fiddler token: pass token= or set FIDDLER_TOKEN")
    if not isinstance(url, str):
        raise ConfigurationError(f"url must be a string, got {type(url).__qualname__!r}")
    if not isinstance(token, str):
        raise ConfigurationError(f"token must be a string, got {type(token).__qualname__!r}")
    if not (token.isascii() and token.isprintable()):
        # A header cannot carry it: every request would fail before it left.
        raise ConfigurationError(
            "the Fiddler token holds a character an HTTP header cannot carry (a line "
            "break read from a file?): strip it"
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"url {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(f"url {url!r} must be an http:// or https:// URL with a host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigurationError(f"url {url!r}: port {parsed.port} is not 1 to 65535")
    if "?" in url or "#" in url:
        raise ConfigurationError(
            f"url {url!r}: the API's paths are added to it, so it takes no query or "
            "fragment (the part from '?' or '#')"
        )
    if parsed.scheme == "http" and not (is_loopback(parsed.host) or allow_insecure_http):
        raise ConfigurationError(
            f"url {url!r}: plain http would send the token in clear text; use https, or "
            "set PublisherConfig(allow_insecure_http=True) for a network you trust"
        )
    return url, token


def check_callback(on_error: object) -> None:
    """An ``on_error`` given: refused at construction unless it can be called."""
    if on_error is not None and not callable(on_error):
        raise ConfigurationError(
            f"on_error must be a callable or None, got {type(on_error).__qualname__!r}"
        )


async def _off_the_loop_if_many(rows: int, encode: Callable[[], _T]) -> _T:
    """``encode()`` of a batch call's ``rows``: here, or for many rows on a worker thread,
    since encoding takes about a microsecond a row, and a call of hundreds of thousands would
    hold the event loop (every request it serves) for as many tenths of a second. The rows
    are queued after, all at once, so they keep together all the same; events published
    meanwhile by other tasks go before them."""
    if rows < ROWS_OFF_THE_LOOP:
        return encode()
    return await anyio.to_thread.run_sync(encode)


def _rows(events: Any) -> list[Mapping[str, Any]]:
    """Events as dicts, one by one: the way without polars, and for what it cannot encode."""
    module = frame_library(events)
    if module is not None:
        if module == "pandas":
            records: list[Mapping[str, Any]] = events.to_dict(orient="records")
        elif module == "polars":
            records = polars_rows(events)
        else:
            records = events.to_pylist()
        return records
    if isinstance(events, Mapping | str | bytes) or not isinstance(events, Iterable):
        raise EventError(
            "events must be an iterable of events (dicts), or a DataFrame, got "
            f"{type(events).__qualname__!r}"
        )
    if isinstance(events, Sequence):
        return list(events)
    # A generator may yield one dict, changed between rows (a buffer reused): each row is
    # copied as it is read, or every event would be the last row. (A list's rows are not.)
    return [dict(row) if type(row) is dict else row for row in events]


def _listed(values: Iterable[Any] | None, name: str) -> list[Any] | None:
    """A batch call's ``event_ids`` or ``event_timestamps``, one for each event, as a list."""
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise EventError(
            f"{name} must be an iterable of one value for each event, got "
            f"{type(values).__qualname__!r}"
        )
    return list(values)


def _id_texts(event_ids: list[Any]) -> list[str | None]:
    """Ids given for the events as the text each is sent as (None stays: an id to make);
    EventBatchError names each bad one by its position."""
    texts: list[str | None] = []
    errors: dict[int, EventError] = {}
    for index, event_id in enumerate(event_ids):
        try:
            texts.append(None if event_id is None else event_id_text(event_id))
        except EventError as exc:
            errors[index] = exc
    if errors:
        raise EventBatchError(errors)
    return texts


def _aligned(values: Iterable[Any] | None, count: int, name: str) -> list[Any]:
    if values is None:
        return [None] * count
    listed = list(values)
    if len(listed) != count:
        raise EventError(f"{name} has {len(listed)} values for {count} events")
    return listed
