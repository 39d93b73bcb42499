"""The ``fiddler-async`` command: publish files, run the emulator, look at what it holds.

    fiddler-async publish FILE --project P --model M [--update] [--url U --token T]
    fiddler-async serve [--host H] [--port P] [--token T] [--db FILE] [--models FILE] [faults]
    fiddler-async inspect [--db FILE | --url U] [--project P --model M] [--events N] [--duplicates]
    fiddler-async replay DIR [--url U --token T]

Without a URL (``--url`` or ``FIDDLER_URL``), ``publish`` starts the emulator in-process and
stores the events in ``./fiddler-emulator.db``, then says how to look at them.
Exit status: 0 all delivered; 1 some rows were bad or events were not delivered; 2 nothing could
be done (a wrong name, an unreachable server, a missing file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._version import __version__
from .config import PublisherConfig
from .exceptions import (
    ConfigurationError,
    EventError,
    FiddlerError,
    NotFoundError,
    QueueFullError,
)
from .flusher import DeliveryFailure
from .http1 import is_loopback
from .publisher import AsyncPublisher
from .rows import RowError, coerce_row, count_rows, file_format, read_rows
from .spool import Spool, is_spool_entry
from .spooler import ReplayResult
from .stats import StatsSnapshot

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]

DEFAULT_DB = "fiddler-emulator.db"
SHOWN_PROBLEMS = 20
_Row = tuple[int, dict[str, Any] | RowError]  # (line, row) as read_rows gives them
LOOKUP_TIMEOUT = 15.0
"""Seconds ``publish`` waits for the model's lookup (``--timeout`` if shorter)."""
INSECURE_HELP = "send the token over plain http:// to another machine (a network you trust)"


class _Fatal(Exception):
    """Nothing could be published; the message says why."""


def _console() -> tuple[Console, Console]:
    try:
        from rich.console import Console  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        raise _Fatal(
            "this command needs the cli extra: pip install 'fiddler-async[cli]' "
            "(from a clone: '.[cli]')"
        ) from None
    return Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


def _emulator_module() -> Any:
    try:
        from . import emulator  # noqa: PLC0415
    except ImportError:
        raise _Fatal(
            "the emulator needs the server extra: pip install 'fiddler-async[server]' "
            "(from a clone: '.[server]')"
        ) from None
    return emulator


# publish


async def _publish(args: argparse.Namespace) -> int:
    out, err = _console()
    path = Path(args.file)
    if not await anyio.Path(path).is_file():
        raise _Fatal(f"no such file: {path}")
    try:
        fmt = file_format(path)
    except ValueError as exc:
        raise _Fatal(str(exc)) from None
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise _Fatal(
            "Parquet files need pyarrow: pip install 'fiddler-async[parquet]' "
            "(from a clone: '.[parquet]')"
        )
    job = _FileJob(args, path, fmt, err)
    phases = [anyio.CancelScope()]
    stopped: _Fatal | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_on_ctrl_c, job, phases)  # to the end: the summary comes all the same
        try:  # (raised out of the group, it would come wrapped in an exception group)
            code = await _publish_file(job, phases, out, err)
        except _Fatal as exc:
            stopped = exc
        tasks.cancel_scope.cancel()
    if stopped is not None:
        raise stopped
    return code


async def _publish_file(
    job: _FileJob, phases: list[anyio.CancelScope], out: Console, err: Console
) -> int:
    """:func:`_publish` once the file is known: the publishing, the close, the summary."""
    args = job.args
    url = args.url or os.environ.get("FIDDLER_URL")
    token = args.token or os.environ.get("FIDDLER_TOKEN")
    async with contextlib.AsyncExitStack() as stack:
        embedded: Any = None
        if not url:
            try:
                embedded = await stack.enter_async_context(_emulator_module().emulator(db=args.db))
            except (sqlite3.Error, OSError) as exc:
                raise _Fatal(f"cannot open the emulator's database {args.db}: {exc}") from None
            url, token = embedded.url, embedded.token
            err.print(f"No Fiddler URL given: publishing to an embedded emulator at {url}")
        if not token:
            raise _Fatal("no token: pass --token or set FIDDLER_TOKEN")
        # A command line shows retries as they go: a warning every 5 s, not every 30 s.
        config = PublisherConfig(
            overflow="block",
            block_timeout=args.timeout,
            log_interval=5,
            allow_insecure_http=args.allow_insecure_http,
        )
        pub = await stack.enter_async_context(_publisher(url, token, config, job.failures))
        with phases[0]:
            await job.run(pub, url)
        await _close(pub, job, phases, min(config.close_timeout, args.timeout), err)
        stats = pub.stats()
        holdings = _holdings(embedded, args) if embedded is not None else ""
    job.report(out, err, url, stats)
    if job.interrupted:
        return 130
    if embedded is not None:
        out.print(
            f"The events went to the embedded Fiddler emulator, stored in {args.db}.\n"
            f"{holdings}"
            f"Look at them:  {_program()} inspect --db {args.db} --events 5",
            highlight=False,
        )
    complete = (
        job.complete
        and job.stopped_at is None
        and job.read_error is None
        and not stats.failed
        and not stats.dropped_total
    )
    return 0 if complete and not job.bad else 1


def _publisher(
    url: str, token: str | None, config: PublisherConfig, failures: list[DeliveryFailure]
) -> AsyncPublisher:
    """The command's publisher; a URL or token it cannot use stops the command, saying why."""
    try:
        return AsyncPublisher(url, token, config=config, on_error=failures.append)
    except ConfigurationError as exc:
        hint = " (here: --allow-insecure-http)" if "allow_insecure_http" in str(exc) else ""
        raise _Fatal(f"{exc}{hint}") from None


async def _close(
    pub: AsyncPublisher,
    job: _FileJob,
    phases: list[anyio.CancelScope],
    deadline: float,
    err: Console,
) -> None:
    """Interrupted: what is queued goes within the close's usual deadline, unless Ctrl-C
    comes again. Incomplete, --timeout spent (publishing stopped, or the flush ran out): the
    close drops the rest (counted) at once rather than wait."""
    if job.interrupted and pub.stats().pending:
        err.print(
            f"Interrupted: sending what is queued, for {deadline:g} s at most; "
            "Ctrl-C again to drop it (counted)"
        )
        phases.append(anyio.CancelScope())
        if job.interrupted > 1:  # pressed again already, while the publishing stopped
            phases[-1].cancel()
        with phases[-1]:  # a close is not cut short by a cancellation; a flush is
            await pub.flush(deadline)
    await pub.aclose(None if job.complete else 0)


async def _on_ctrl_c(job: _FileJob, phases: list[anyio.CancelScope]) -> None:
    """Ctrl-C (SIGINT) ends the phase under way: the first stops the publishing, the next
    one the close that sends what is queued. The report comes all the same."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only: Ctrl-C stays a KeyboardInterrupt
    with anyio.open_signal_receiver(signal.SIGINT) as interrupts:
        async for _ in interrupts:
            job.interrupted += 1
            phases[-1].cancel()


def _holdings(embedded: Any, args: argparse.Namespace) -> str:
    """What the embedded emulator's file holds now, if it held events from earlier runs."""
    try:
        total = embedded.count(args.project, args.model)
        repeated = sum(n - 1 for n in embedded.duplicates(args.project, args.model).values())
    except KeyError:
        return ""
    if not repeated:
        return ""
    return (
        f"It now holds {total:,} events for {args.project}/{args.model}, {repeated:,} of them "
        f"with an id it already had (published before?); delete {args.db} to start afresh.\n"
    )


def _program() -> str:
    """How to run this command again, as the user ran it (for the hints it prints)."""
    argv0 = sys.argv[0]
    if argv0.endswith(".py"):
        return f"{sys.executable} -m fiddler_async.cli"
    if os.sep in argv0 and shutil.which(Path(argv0).name) != str(Path(argv0).resolve()):
        return argv0  # as typed, e.g. .venv/bin/fiddler-async: not on PATH
    return "fiddler-async"


class _FileJob:
    """One file through the publisher: rows read (off the event loop), typed, published."""

    def __init__(self, args: argparse.Namespace, path: Path, fmt: str, err: Console) -> None:
        self.args, self.path, self.fmt, self.err = args, path, fmt, err
        self.bad: list[RowError] = []
        self.failures: list[DeliveryFailure] = []
        self.latencies: list[int] = []
        self.seconds = 0.0
        self.complete = False
        self.id_col: str | None = None
        self.ts_format: str | None = None
        """The model's time format, that text in its time column is read by."""
        self.stopped_at: int | None = None
        """The row at which publishing stopped: the queue stayed full for --timeout."""
        self.read_error: str | None = None
        """Why the file could not be read to its end (a damaged page, a disk error)."""
        self.unread = 0
        """Rows not published from there on."""
        self.interrupted = 0
        """How many times Ctrl-C was pressed."""
        self.total = 0
        self.handled = 0
        """Rows of the file, and those published or found bad so far."""

    async def run(self, pub: AsyncPublisher, url: str) -> None:
        args = self.args
        # A command waits less than a service for a server that does not answer at all: the
        # usual cause is a wrong URL, which the retry budget would take 45 s to tell.
        lookup_timeout = min(args.timeout, LOOKUP_TIMEOUT)
        try:
            with anyio.fail_after(lookup_timeout):
                info = await pub.resolve(args.project, args.model)
        except NotFoundError as exc:
            raise _Fatal(f"{exc.message} at {url}") from None
        except anyio.get_cancelled_exc_class():
            if self.interrupted:  # before anything was read: the whole file
                with anyio.CancelScope(shield=True):
                    self.unread = await anyio.to_thread.run_sync(count_rows, self.path)
            raise
        except (FiddlerError, TimeoutError) as exc:
            why = str(exc)
            if not why:  # the deadline: say what the server did meanwhile (503s, say)
                last = pub.stats().last_error
                why = f"no answer in {lookup_timeout:g} s" + (f" (last: {last})" if last else "")
            raise _Fatal(f"cannot use {url}: {why}") from None
        types = dict(info.columns)
        if args.update:
            if not info.event_id_col:
                raise _Fatal(f"model {args.model!r} has no event id column: it cannot be updated")
            required: tuple[str, ...] = (info.event_id_col,)
        else:
            required = tuple(c for c in (*info.inputs, *info.outputs) if c in types)
        self.id_col = info.event_id_col if args.update else None
        self.ts_format = info.event_ts_format
        started = time.perf_counter()
        try:
            await self._publish_rows(pub, types, required)
            if self.stopped_at is None:  # else --timeout is spent: the close drops what is left
                self.complete = await _flush_while_sending(pub, args.timeout)
        finally:
            self.seconds = time.perf_counter() - started
            if (self.interrupted or self.read_error) and self.stopped_at is None:
                self.unread = max(0, self.total - self.handled)  # (the total is counted apart)

    async def _publish_rows(
        self, pub: AsyncPublisher, types: dict[str, str], required: tuple[str, ...]
    ) -> None:
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        args, clock = self.args, time.perf_counter_ns
        try:
            self.total = total = await anyio.to_thread.run_sync(count_rows, self.path)
        except Exception as exc:  # a corrupt file: pyarrow and the OS have many errors
            raise _Fatal(f"cannot read {self.path}: {exc}") from None
        columns = (
            TextColumn("[bold]publishing"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} events/s"),
            TimeRemainingColumn(),
        )
        stream = await anyio.to_thread.run_sync(self.path.open, "rb")
        rows = read_rows(stream, self.fmt)
        done, begun = 0, time.perf_counter()
        # The rows' reader ends before its file closes.
        with Progress(*columns, console=self.err) as progress, stream, contextlib.closing(rows):
            task = progress.add_task("publish", total=total, rate="-")
            while True:
                chunk, failure = await anyio.to_thread.run_sync(_take, rows, 1000)
                if failure is not None:  # the file broke partway: what was read still goes
                    self.read_error = f"cannot read {self.path} after row {done + len(chunk):,}"
                    self.read_error += f": {failure}"
                if not chunk:
                    return
                for index, (line, row) in enumerate(chunk):
                    try:
                        event = self._event(line, row, types, required)
                        t0 = clock()
                        await pub.publish_event(
                            args.project, args.model, event, update_event=args.update
                        )
                        self.latencies.append(clock() - t0)
                    except RowError as exc:
                        self.bad.append(exc)
                    except EventError as exc:  # e.g. a value JSON cannot carry
                        self.bad.append(RowError(line, str(exc)))
                    except QueueFullError:  # the server took nothing for --timeout seconds
                        self.stopped_at = line
                        rest = await anyio.to_thread.run_sync(lambda: sum(1 for _ in rows))
                        self.unread = len(chunk) - index + rest
                        return
                    self.handled += 1
                done += len(chunk)
                rate = done / max(time.perf_counter() - begun, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f}")
                if failure is not None:
                    return

    def _event(
        self,
        line: int,
        row: dict[str, Any] | RowError,
        types: dict[str, str],
        required: tuple[str, ...],
    ) -> dict[str, Any]:
        """The row as an event of the model, or RowError saying what is wrong with it."""
        if isinstance(row, RowError):
            raise row
        event = coerce_row(line, row, types, required, self.ts_format)
        if self.id_col and event[self.id_col] is None:
            raise RowError(line, "an update needs an event id", self.id_col)
        return event

    def report(self, out: Console, err: Console, url: str, stats: StatsSnapshot) -> None:
        for problem in self.bad[:SHOWN_PROBLEMS]:
            err.print(f"[red]bad row[/red] {problem}", highlight=False)
        if len(self.bad) > SHOWN_PROBLEMS:
            err.print(f"... and {len(self.bad) - SHOWN_PROBLEMS} more bad rows")
        for failure in self.failures[:SHOWN_PROBLEMS]:
            shown = ", ".join(map(str, failure.event_ids[:3]))
            ids = shown + (", ..." if len(failure.event_ids) > 3 else "")
            err.print(
                f"[red]not delivered[/red] {len(failure.bodies)} event(s) ({ids}): {failure.error}"
            )
        if len(self.failures) > SHOWN_PROBLEMS:
            err.print(f"... and {len(self.failures) - SHOWN_PROBLEMS} more failed requests")
        if self.interrupted:
            err.print(
                f"[red]interrupted[/red] (Ctrl-C): {self.unread:,} row(s) not read", highlight=False
            )
        if self.stopped_at is not None:
            err.print(
                f"[red]stopped[/red] at line {self.stopped_at}: the server took no events for "
                f"{self.args.timeout:g} s (--timeout); {self.unread:,} row(s) from there on "
                "not sent",
                highlight=False,
            )
        if self.read_error is not None:
            err.print(
                f"[red]stopped[/red]: {self.read_error}; {self.unread:,} row(s) not read",
                highlight=False,
            )
        if not self.complete and not self.interrupted and self.stopped_at is None:
            err.print(
                f"[red]stopped[/red]: the server took no events for {self.args.timeout:g} s "
                "(--timeout); what was still queued was dropped",
                highlight=False,
            )
        latencies = sorted(self.latencies)
        p99 = latencies[int(len(latencies) * 0.99)] / 1000 if latencies else 0.0
        rate = stats.delivered / max(self.seconds, 1e-9)
        args = self.args
        out.print(f"Published {self.path} to {args.project}/{args.model} at {url}", highlight=False)
        for name, value in (
            ("delivered", f"{stats.delivered:,}"),
            ("failed", f"{stats.failed:,}"),
            ("dropped", f"{stats.dropped_total:,}"),
            ("bad rows", f"{len(self.bad):,}"),
            *([("not sent", f"{self.unread:,}")] if self.unread else []),
            ("seconds", f"{self.seconds:.2f} ({rate:,.0f} events/s)"),
            ("p99 enqueue", f"{p99:.1f} µs"),
        ):
            out.print(f"  {name:<12} {value}", highlight=False)


# replay


async def _replay(args: argparse.Namespace) -> int:
    out, err = _console()
    directory = Path(args.dir)
    if not await anyio.Path(directory).is_dir():
        raise _Fatal(f"no such directory: {directory}")
    url = args.url or os.environ.get("FIDDLER_URL")
    token = args.token or os.environ.get("FIDDLER_TOKEN")
    if not url or not token:
        raise _Fatal("replay needs a server: pass --url and --token (or FIDDLER_URL/_TOKEN)")
    # No request, retry or close may outlast --timeout, which bounds a silence of the server
    # (see _extend_while_sending).
    config = PublisherConfig(
        spool_dir=directory,
        log_interval=5,
        retry_max_elapsed=args.timeout,
        request_timeout=min(30.0, args.timeout),
        connect_timeout=min(5.0, args.timeout),
        close_timeout=1.0,  # nothing is queued: the close only ends the replay
        allow_insecure_http=args.allow_insecure_http,
    )
    refused: list[DeliveryFailure] = []
    publisher = _publisher(url, token, config, refused)  # a bad URL is said first
    names = await anyio.to_thread.run_sync(os.listdir, directory)
    if not any(map(is_spool_entry, names)):
        # Opening a spool changes its directory (owner-only, a lock file): not someone else's.
        if names:
            raise _Fatal(f"{directory} is not a spool directory (no spool file in it): not used")
        out.print(f"nothing to replay: {directory} is empty", highlight=False)
        return 0
    async with publisher as pub:
        result = ReplayResult(error=TimeoutError(f"no progress in {args.timeout:g} s"))
        with anyio.CancelScope(deadline=anyio.current_time() + args.timeout) as scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_extend_while_sending, pub, scope, args.timeout)
                result = await pub.replay_spool()
                tasks.cancel_scope.cancel()
    # Once closed: a pass cut short counts what it delivered as it ends (the background may
    # have sent some first, too).
    replayed = publisher.stats().replayed
    if scope.cancelled_caught:  # cut short: what waits is on disk
        waiting = await anyio.to_thread.run_sync(Spool(directory, 0, fsync=False).batches)
        result = ReplayResult(remaining=len(waiting), error=result.error)
    out.print(f"replayed {replayed:,} event(s) from {directory} to {url}", highlight=False)
    for failure in refused:
        err.print(
            f"refused {len(failure.bodies)} event(s) for {failure.project}/{failure.model}: "
            f"{failure.error}  (kept in {directory / 'dead-letters.jsonl'})",
            highlight=False,
        )
    if result.locked:
        err.print(f"another process is replaying {directory}; nothing done here")
        return 1
    if result.error is not None:
        err.print(
            f"not sent: {type(result.error).__name__}: {result.error}; "
            f"{result.remaining} file(s) still wait in {directory}",
            highlight=False,
        )
        return 1
    return 1 if refused else 0


def _take(rows: Iterator[_Row], count: int) -> tuple[list[_Row], Exception | None]:
    """Up to ``count`` rows, and what stopped the reading short: the rows read before a
    failure are kept."""
    taken: list[_Row] = []
    try:
        taken.extend(islice(rows, count))
    except Exception as exc:  # a damaged file: pyarrow's errors, the disk's, many kinds
        return taken, exc
    return taken, None


async def _flush_while_sending(pub: AsyncPublisher, seconds: float) -> bool:
    """Flush, for as long as the server takes events (see :func:`_extend_while_sending`);
    whether all went."""
    complete = False
    with anyio.CancelScope(deadline=anyio.current_time() + seconds) as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_extend_while_sending, pub, scope, seconds)
            complete = (await pub.flush(math.inf)).complete
            tasks.cancel_scope.cancel()
    return complete


async def _extend_while_sending(
    pub: AsyncPublisher, scope: anyio.CancelScope, seconds: float
) -> None:
    """Push a flush's or a replay's deadline on while events go: --timeout bounds a
    silence of the server, not a long queue or spool it is taking."""

    def settled() -> int:
        stats = pub.stats()
        return stats.delivered + stats.replayed + stats.failed

    seen = settled()
    while True:
        await anyio.sleep(0.05)
        if settled() != seen:
            seen = settled()
            scope.deadline = anyio.current_time() + seconds


# serve


def _faults(args: argparse.Namespace) -> Any:
    try:
        faults = _emulator_module().Faults(
            error_503=args.error_503,
            error_429=args.error_429,
            retry_after=args.retry_after,
            drop=args.drop,
            latency=args.latency,
            spike=args.spike,
            spike_latency=args.spike_latency,
            max_body_bytes=args.max_body_bytes,
            seed=args.seed,
        )
        if args.outage:
            faults.update({"outage_seconds": args.outage})
    except ValueError as exc:
        raise _Fatal(f"a fault flag: {exc}") from None
    return faults


def _catalog(emulator: Any, models: str | None) -> Any:
    try:
        return emulator.load_catalog(models)
    except (OSError, ValueError) as exc:
        raise _Fatal(f"cannot use the models file: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    # Plain print, not rich: serving needs the server extra alone (benchmark sinks, CI).
    emulator = _emulator_module()
    _catalog(emulator, args.models)  # a bad file stops here, with a message
    if args.db != ":memory:" and not Path(args.db).resolve().parent.is_dir():
        raise _Fatal(f"no directory for the database {args.db}")

    def listening(url: str) -> None:
        print(
            f"Fiddler emulator on {url}  (token {args.token!r}, db {args.db}, "
            f"models {args.models or 'bank_churn (built in)'})\n"
            f"Point a publisher at it:  FIDDLER_URL={url} FIDDLER_TOKEN={args.token}",
            flush=True,
        )

    try:
        emulator.serve_forever(
            host=args.host,
            port=args.port,
            token=args.token,
            db=args.db,
            models=args.models,
            faults=_faults(args),
            count_only=args.count_only,
            listening=listening,
        )
    except emulator.ListenError as exc:
        raise _Fatal(str(exc)) from None
    except sqlite3.Error as exc:
        raise _Fatal(f"{args.db} is not an emulator database: {exc}") from None
    return 0


# inspect


def _inspect(args: argparse.Namespace) -> int:
    out, _ = _console()
    if args.url:
        summary, events, duplicates = _inspect_url(args)
    else:
        summary, events, duplicates = _inspect_db(args)
    for model in summary["models"]:
        distinct = model["distinct_ids"]  # None from a count-only emulator
        pending = model.get("pending_updates", 0)  # none from an emulator before 0.1
        out.print(
            f"{model['project']}/{model['model']}: {model['events']:,} events, "
            f"{'-' if distinct is None else format(distinct, ',')} distinct ids, "
            f"{model['duplicates']:,} duplicates"
            + (f", {pending:,} updates of no event yet" if pending else ""),
            highlight=False,
        )
    for event in events:
        out.print(json.dumps(event), highlight=False, soft_wrap=True)
    for event_id, times in list(duplicates.items())[:SHOWN_PROBLEMS]:
        out.print(f"duplicate {event_id}: stored {times} times", highlight=False)
    if len(duplicates) > SHOWN_PROBLEMS:
        out.print(f"... and {len(duplicates) - SHOWN_PROBLEMS:,} more duplicated ids")
    return 0


def _inspect_db(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], dict[str, int]]:
    emulator = _emulator_module()
    db = Path(args.db)
    if not db.is_file():
        raise _Fatal(f"no emulator database at {db} (publish without --url first, or pass --db)")
    catalog = _catalog(emulator, args.models)
    project, model = args.project or "bank_churn", args.model or "bank_churn"
    chosen = catalog.find(project, model)
    if chosen is None:
        if args.project or args.model:
            names = ", ".join(f"{m.project}/{m.name}" for m in catalog.models)
            raise _Fatal(f"no model {project}/{model} in the models ({names})")
        chosen = catalog.models[0]
    try:
        store = emulator.Store(str(db), read_only=True)  # looking changes nothing
        store.count()
    except sqlite3.Error as exc:
        raise _Fatal(f"{db} is not an emulator database: {exc}") from None
    try:
        models = [
            {
                "project": m.project,
                "model": m.name,
                "events": store.count(m.id),
                "distinct_ids": store.distinct_ids(m.id),
                "duplicates": sum(n - 1 for n in store.duplicates(m.id).values()),
                "pending_updates": store.pending_updates(m.id),
            }
            for m in catalog.models
        ]
        events = store.events(chosen.id, limit=args.events) if args.events else []
        duplicates = store.duplicates(chosen.id) if args.duplicates else {}
        # Events of models the catalog does not name (served with another --models file).
        unnamed = store.count() - sum(m["events"] for m in models)
    finally:
        store.close()
    if unnamed:
        _console()[1].print(
            f"{db} also holds {unnamed:,} events of models not in "
            f"{args.models or 'the built-in models'}: pass the --models file they were served with",
            highlight=False,
        )
    return {"models": models}, events, duplicates


def _inspect_url(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], dict[str, int]]:
    import httpx  # noqa: PLC0415

    token = args.token or os.environ.get("FIDDLER_TOKEN") or "emulator-token"
    params = {"project": args.project or "bank_churn", "model": args.model or "bank_churn"}
    headers = {"Authorization": f"Bearer {token}"}
    direct = is_loopback(httpx.URL(args.url).host)  # never the token via a proxy in clear
    with httpx.Client(base_url=args.url, headers=headers, trust_env=not direct) as client:
        try:
            summary = client.get("/_emulator/summary").raise_for_status().json()
            served = [(m["project"], m["model"]) for m in summary.get("models", [])]
            if served and tuple(params.values()) not in served:
                if args.project or args.model:
                    names = ", ".join(f"{p}/{m}" for p, m in served)
                    raise _Fatal(f"no model {params['project']}/{params['model']} ({names})")
                params = dict(zip(("project", "model"), served[0], strict=True))  # as with --db
            events = (
                client.get("/_emulator/events", params={**params, "limit": args.events})
                .raise_for_status()
                .json()["events"]
                if args.events
                else []
            )
            duplicates = (
                client.get("/_emulator/duplicates", params=params).raise_for_status().json()
                if args.duplicates
                else {"duplicates": {}}
            )["duplicates"]
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            why = "wrong token (--token)" if status == 401 else f"HTTP {status}"
            with contextlib.suppress(ValueError, KeyError, TypeError):  # its envelope says why
                why += f": {exc.response.json()['error']['message']}"
            raise _Fatal(f"the emulator at {args.url} refused: {why}") from None
        except httpx.HTTPError as exc:
            raise _Fatal(f"cannot reach an emulator at {args.url}: {exc}") from None
    return summary, events, duplicates


# The parser


def _seconds(text: str) -> float:
    """A ``--timeout``: a positive, finite number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = low - 1
        if number < low or (high is not None and number > high):
            bounds = f"{low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {bounds}")
        return number

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiddler-async", description="Publish events to Fiddler, or run a local emulator."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    publish = commands.add_parser(
        "publish", help="publish a CSV, JSON Lines or Parquet file of events"
    )
    publish.add_argument("file", help="events: .csv, .jsonl or .parquet (needs pyarrow)")
    publish.add_argument("--project", required=True, help="the project's name")
    publish.add_argument("--model", required=True, help="the model's name (or UUID)")
    publish.add_argument("--update", action="store_true", help="the rows update earlier events")
    publish.add_argument(
        "--url", help="Fiddler's URL (default: FIDDLER_URL, else an embedded emulator)"
    )
    publish.add_argument("--token", help="the API token (default: FIDDLER_TOKEN)")
    publish.add_argument(
        "--db", default=DEFAULT_DB, help="the embedded emulator's database file (%(default)s)"
    )
    publish.add_argument(
        "--timeout", type=_seconds, default=120.0, help="longest wait for delivery (%(default)s s)"
    )
    publish.add_argument("--allow-insecure-http", action="store_true", help=INSECURE_HELP)
    publish.set_defaults(run=lambda a: anyio.run(_publish, a))

    serve = commands.add_parser("serve", help="run the Fiddler emulator")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    serve.add_argument(
        "--port", type=_whole(0, 65535), default=8080, help="port (%(default)s; 0: any free)"
    )
    serve.add_argument(
        "--token", default="emulator-token", help="the token clients must send (%(default)s)"
    )
    serve.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")
    serve.add_argument("--models", help="a TOML file of projects and models (default: bank_churn)")
    serve.add_argument(
        "--count-only", action="store_true", help="count events (read: their ids), store nothing"
    )
    faults = serve.add_argument_group(
        "faults",
        "what the emulator does wrong, from the start (none by default); answers lost after "
        "the work ('lose') and scripted answers are set at run time: PUT /_emulator/faults",
    )
    faults.add_argument("--error-503", type=float, default=0.0, help="fraction answered 503")
    faults.add_argument("--error-429", type=float, default=0.0, help="fraction answered 429")
    faults.add_argument(
        "--retry-after", type=float, default=1.0, help="Retry-After seconds (%(default)s)"
    )
    faults.add_argument("--drop", type=float, default=0.0, help="fraction of connections dropped")
    faults.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    faults.add_argument("--spike", type=float, default=0.0, help="fraction of latency spikes")
    faults.add_argument("--spike-latency", type=float, default=0.0, help="seconds of a spike")
    faults.add_argument("--max-body-bytes", type=int, default=0, help="413 above this (0: none)")
    faults.add_argument("--outage", type=float, default=0.0, help="answer 503 for N seconds")
    faults.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    serve.set_defaults(run=_serve)

    inspect = commands.add_parser("inspect", help="what an emulator holds")
    inspect.add_argument(
        "--db", default=DEFAULT_DB, help="an emulator's database file (%(default)s)"
    )
    inspect.add_argument("--url", help="or a running emulator's URL")
    inspect.add_argument("--token", help="the running emulator's token")
    inspect.add_argument("--models", help="the models file the emulator was started with")
    inspect.add_argument("--project", help="default: bank_churn, or the first model")
    inspect.add_argument("--model", help="default: bank_churn, or the first model")
    inspect.add_argument("--events", type=_whole(0), default=0, help="print the first N events")
    inspect.add_argument("--duplicates", action="store_true", help="list duplicated event ids")
    inspect.set_defaults(run=_inspect)

    replay = commands.add_parser("replay", help="send what waits in a publisher's spool")
    replay.add_argument("dir", help="the spool directory (PublisherConfig.spool_dir)")
    replay.add_argument("--url", help="Fiddler's URL (default: FIDDLER_URL)")
    replay.add_argument("--token", help="the API token (default: FIDDLER_TOKEN)")
    replay.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        help="keep trying an unanswering server this long (%(default)s s)",
    )
    replay.add_argument("--allow-insecure-http", action="store_true", help=INSECURE_HELP)
    replay.set_defaults(run=lambda a: anyio.run(_replay, a))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except _Fatal as exc:
        print(f"fiddler-async: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
