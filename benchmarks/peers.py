"""fiddler_async side by side with what users would otherwise pick, in one run on this machine.

    python -m benchmarks.peers [--events 100000] [--repeats 3] [--out benchmarks/RESULTS.md]
        (with --out, the medians go beside it too: RESULTS.jsonl)
    nox -s bench [-- --events 100000 --repeats 3]

Rows: ``fiddler_async`` (``publish_event_nowait`` and ``await publish_event``); the official
``fiddler-client`` 3.x (``publish_stream`` per event, and 1000 events per call);
``segment-analytics-python``, ``posthog``, ``libhoney``, OpenTelemetry's
``BatchLogRecordProcessor`` with the OTLP/HTTP log exporter, each with its defaults but a batch
size of 1000 (ours); and a naive ``await httpx.AsyncClient.post`` per event. The peers are
benchmark-only dependencies (the ``peers`` dependency group). One more row is not a peer but a
yardstick, ``floor`` (see :class:`Floor`): the bulk rows' bare work, healthy sink only; and
one more, ``ceiling`` (see :class:`Ceiling`): the sink's own limit.

The sink is the emulator in count-only mode in another process (``fiddler-async serve
--count-only``, on httptools): it answers Fiddler's v3 lookups and each peer's ingestion
endpoint, and counts events (see ``fiddler_async/emulator/peers.py``), reading of each v3
event only its id (msgspec), which doubled the events/s it takes in. Three sinks: healthy,
slow (each answer held 200 ms), down (a closed port). Every row and sink runs in a fresh
process, so that its threads, CPU time and memory are its own. Each row publishes the same
12-field bank-churn event ``--events`` times from a loop that yields to the event loop every 100
events, timing every call (the bulk rows gather 1000 events into a list, then time the call that
takes it); then, with the sink healthy, flushes and waits until the sink has counted them.

Columns: per-call latency (p50, p99, p99.9, max, µs) as the caller sees it, per sink;
delivered events/s end to end (healthy); client CPU µs per delivered event (healthy);
resident memory per buffered event (down: RSS growth over the events the client holds);
events dropped (healthy: published but never counted by the sink, after a 30 s wait).

Rows whose every call waits on the network (``fiddler-client`` per event, the naive post)
publish fewer events: ``--sync-events`` (2000) healthy, 50 when slow or down; a call that
blocks past ``--call-timeout`` (20 s) ends the row, reported as blocked; a close that does
not end in 10 s is reported too.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .publish import EVENT, TOKEN, closed_port_url, percentiles, sink

ROWS = {
    "fiddler_async nowait": "`fiddler_async` `publish_event_nowait`",
    "fiddler_async await": "`fiddler_async` `await publish_event`",
    "fiddler_async batch": "`fiddler_async` `await publish_events_batch`, 1000 events per call",
    "fiddler-client stream": "`fiddler-client` `publish_stream`, 1 event per call",
    "fiddler-client chunks": "`fiddler-client` `publish_stream`, 1000 events per call",
    "segment": "`segment-analytics-python` (`upload_size=1000`)",
    "posthog": "`posthog` (`flush_at=1000`)",
    "libhoney": "`libhoney` (`max_batch_size=1000`)",
    "otel": "OpenTelemetry `BatchLogRecordProcessor` + OTLP/HTTP (`max_export_batch_size=1000`)",
    "naive httpx": "naive `await httpx.AsyncClient.post` per event",
    "floor": "reference, not a peer: the bulk rows' bare work (our encode, raw HTTP/1.1)",
    "ceiling": "reference, not a peer: the sink's limit (the floor's requests, encoded once)",
}
PER_CALL_NETWORK = {"fiddler-client stream", "naive httpx"}
SYNC_EVENTS = 2000
"""Events a row in PER_CALL_NETWORK publishes with the sink healthy (50 otherwise)."""
CALL_TIMEOUT = 20.0
"""A call that blocks longer ends its row, reported as blocked."""
BULK = {"fiddler-client chunks", "fiddler_async batch"}
OURS = ("fiddler_async nowait", "fiddler_async await", "fiddler_async batch")
REFERENCE = {"floor", "ceiling"}
"""Rows that are not peers: in the table, but in no comparison of the bars; run healthy only."""


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_admin = httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"})


def sink_count(url: str, row: str) -> int:
    """Events the sink has counted for this row's protocol."""
    summary = _admin.get(f"{url}/_emulator/summary").json()
    peer = {"segment": "segment", "posthog": "posthog", "libhoney": "libhoney", "otel": "otlp"}
    if row in peer:
        return int(summary["peers"].get(peer[row], 0))
    return int(summary["events"])


# The rows: each a client set up against the sink, a call to time, a flush, what it holds.


class Row:
    batch = 1
    """Events per call: above 1, the harness gathers them into a list, as a caller of a
    bulk call would, and ``publish`` takes the list."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def start(self) -> None:
        return None

    def publish(self, event: Any) -> Any:
        """The call to time: a plain function, or a coroutine function (then awaited)."""
        raise NotImplementedError

    async def flush(self) -> None:
        await asyncio.to_thread(self.flush_blocking)

    def flush_blocking(self) -> None:
        return None

    def buffered(self) -> int | None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self.close_blocking)

    def close_blocking(self) -> None:
        return None


class FiddlerAsync(Row):
    def __init__(self, url: str, call: str) -> None:
        super().__init__(url)
        from fiddler_async import AsyncPublisher, PublisherConfig

        self.pub = AsyncPublisher(url, TOKEN, config=PublisherConfig(close_timeout=1.0))
        # The call itself, timed bare (a wrapper would cost as much as the call).
        method = {
            "nowait": self.pub.publish_event_nowait,
            "await": self.pub.publish_event,
            "batch": self.pub.publish_events_batch,
        }[call]
        if call == "batch":  # like fiddler-client's chunks: 1000 events a call
            self.batch = 1000
        self.publish = functools.partial(method, "bank_churn", "bank_churn")  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.pub.start()
        with contextlib.suppress(Exception), anyio_fail_after(5):
            await self.pub.resolve("bank_churn", "bank_churn")

    def publish(self, event: Any) -> Any:
        raise AssertionError("replaced in __init__ by the publisher's own call")

    async def flush(self) -> None:
        await self.pub.flush(120)

    def buffered(self) -> int:
        return self.pub.stats().pending

    async def close(self) -> None:
        await self.pub.aclose()


def anyio_fail_after(seconds: float) -> Any:
    import anyio

    return anyio.fail_after(seconds)


class FiddlerClient(Row):
    def __init__(self, url: str, chunk: int) -> None:
        super().__init__(url)
        self.batch = chunk

    async def start(self) -> None:
        import fiddler as fdl

        fdl.init(url=self.url, token=TOKEN)
        project = fdl.Project.from_name(name="bank_churn")
        self.model = fdl.Model.from_name(name="bank_churn", project_id=project.id)

    def publish(self, event: Any) -> None:
        self.model.publish_stream(event if self.batch > 1 else [event])


class QueueThreadRow(Row):
    """A client with a queue and a sending thread (Segment, PostHog): the same three calls."""

    client: Any

    def flush_blocking(self) -> None:
        self.client.flush()

    def buffered(self) -> int:
        return int(self.client.queue.qsize())

    def close_blocking(self) -> None:
        self.client.shutdown()


class Segment(QueueThreadRow):
    async def start(self) -> None:
        from segment.analytics import Client

        self.client = Client("write-key", host=self.url, upload_size=1000)

    def publish(self, event: dict[str, Any]) -> None:
        self.client.track("user-1", "prediction", event)


class PostHog(QueueThreadRow):
    async def start(self) -> None:
        from posthog import Posthog

        self.client = Posthog("api-key", host=self.url, flush_at=1000)

    def publish(self, event: dict[str, Any]) -> None:
        self.client.capture("prediction", distinct_id="user-1", properties=event)


class Libhoney(Row):
    async def start(self) -> None:
        import libhoney

        self.client = libhoney.Client(
            writekey="key", dataset="bench", api_host=self.url, max_batch_size=1000
        )

    def publish(self, event: dict[str, Any]) -> None:
        self.client.send_now(event)

    def flush_blocking(self) -> None:
        self.client.flush()

    def buffered(self) -> int:
        return int(self.client.xmit.pending.qsize())

    def close_blocking(self) -> None:
        self.client.close()


class Otel(Row):
    async def start(self) -> None:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter,
        )
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        self.provider = LoggerProvider()
        self.processor = BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=f"{self.url}/v1/logs"), max_export_batch_size=1000
        )
        self.provider.add_log_record_processor(self.processor)
        self.logger = self.provider.get_logger("bench")

    def publish(self, event: dict[str, Any]) -> None:
        self.logger.emit(body="prediction", attributes=event)

    def flush_blocking(self) -> None:
        self.provider.force_flush()

    def buffered(self) -> int | None:
        queue = getattr(getattr(self.processor, "_batch_processor", None), "_queue", None)
        return None if queue is None else len(queue)

    def close_blocking(self) -> None:
        self.provider.shutdown()


class Naive(Row):
    async def start(self) -> None:
        import orjson

        self.dumps = orjson.dumps
        self.client = httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        self.model_id = "unknown"  # a down sink: every post fails to connect all the same
        body = (await self.client.get("/v3/models", params={"limit": 1})).json()
        self.model_id = body["data"]["items"][0]["id"]

    async def publish(self, event: dict[str, Any]) -> None:
        payload = {
            "source": {"type": "EVENTS", "events": [event]},
            "model_id": self.model_id,
            "env_type": "PRODUCTION",
            "env_name": None,
        }
        await self.client.post("/v3/events", content=self.dumps(payload))

    async def close(self) -> None:
        await self.client.aclose()


class Floor(Row):
    """What a bulk row must do at the least, with nothing else: each event encoded as ours
    are (orjson, the id and time joined in front), the events of a call queued as one request,
    sent by as many tasks as our default requests in flight, each over a keep-alive connection
    with hand-written HTTP/1.1; no bounds, retry, error handling, or ids returned. Its
    events/s is about the ceiling for this harness, sink and interpreter on this machine."""

    batch = 1000
    senders = 4  # PublisherConfig().max_in_flight

    async def start(self) -> None:
        import itertools

        import orjson

        self.dumps = orjson.dumps
        self.counter = itertools.count()
        async with httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            body = (await client.get("/v3/models", params={"limit": 1})).json()
        model_id = body["data"]["items"][0]["id"]
        self.head = b'{"event_id":"8c1f0f0e-5d2a-4b7e-9a61-'
        self.between = b'","timestamp":%d,' % int(time.time() * 1000)
        self.envelope = b'{"source":{"type":"EVENTS","events":['
        self.tail = b']},"model_id":"%s","env_type":"PRODUCTION","env_name":null}' % (
            model_id.encode()
        )
        self.queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
        host, port = self.url.removeprefix("http://").split(":")
        self.tasks = [
            asyncio.ensure_future(self.send(host, int(port))) for _ in range(self.senders)
        ]

    def publish(self, events: list[dict[str, Any]]) -> None:
        dumps, join, counter = self.dumps, b"".join, self.counter
        head, between = self.head, self.between
        bodies = [
            join((head, b"%012x" % next(counter), between, dumps(event)[1:])) for event in events
        ]
        self.queue.put_nowait(bodies)

    async def send(self, host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        request = (
            b"POST /v3/events HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %%d\r\n\r\n"
            % (host.encode(), port, TOKEN.encode())
        )
        while True:
            bodies = await self.queue.get()
            bodies[0] = self.envelope + bodies[0]
            bodies[-1] += self.tail
            payload = b",".join(bodies)
            writer.write(request % len(payload))
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 2"):
                raise RuntimeError(f"the sink refused a request: {head[:100]!r}")
            length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
            await reader.readexactly(length)
            self.queue.task_done()

    async def flush(self) -> None:
        """Until the queue is sent; a sender that failed fails the row, instead of leaving
        its events for the harness to count as dropped."""
        joined = asyncio.ensure_future(self.queue.join())
        done, _ = await asyncio.wait([joined, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        if joined not in done:
            joined.cancel()
            for task in done:
                task.result()

    def buffered(self) -> int:
        return self.queue.qsize() * self.batch

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()


class Ceiling(Floor):
    """The floor's requests with the encoding taken out: one call's events encoded once, at
    start, then queued again for every call. The client does next to nothing, so its
    events/s is what the sink can take in: a row near it is held back by the sink."""

    async def start(self) -> None:
        await super().start()
        event = {"customer_id": "c0", **{k: v for k, v in EVENT.items() if k != "customer_id"}}
        self.encoded = [
            b"".join((self.head, b"%012x" % i, self.between, self.dumps(event)[1:]))
            for i in range(self.batch)
        ]

    def publish(self, events: list[dict[str, Any]]) -> None:
        self.queue.put_nowait(self.encoded[: len(events)])  # sliced: a copy, which send changes


def make_row(name: str, url: str) -> Row:
    if name in OURS:
        return FiddlerAsync(url, call=name.rpartition(" ")[2])
    if name.startswith("fiddler-client"):
        return FiddlerClient(url, chunk=1 if name.endswith("stream") else 1000)
    rows: dict[str, type[Row]] = {
        "segment": Segment,
        "posthog": PostHog,
        "libhoney": Libhoney,
        "otel": Otel,
        "naive httpx": Naive,
        "floor": Floor,
        "ceiling": Ceiling,
    }
    return rows[name](url)


# One run, in a child process


async def time_calls(row: Row, samples: array.array[int]) -> None:
    """Make an event per sample slot and publish it, timing each call bare: a ``try`` costs
    nothing until it catches, ``contextlib.suppress`` costs as much as our call, so it is not
    used. A bulk row's events are gathered into a list (the same for every such row), and only
    the call that takes the list is made and timed; the other slots stay 0."""
    clock = time.perf_counter_ns
    publish, batch = row.publish, row.batch
    awaited = asyncio.iscoroutinefunction(getattr(publish, "func", publish))
    gathered: list[dict[str, Any]] = []
    for i in range(len(samples)):
        if i % 100 == 0 and i:
            await asyncio.sleep(0)  # as a service between requests: the background runs
        event: Any = {**EVENT, "customer_id": f"c{i}"}
        if batch > 1:
            gathered.append(event)
            if len(gathered) < batch and i < len(samples) - 1:  # the last goes, full or not
                continue
            event, gathered = gathered, []
        if awaited:
            t0 = clock()
            try:  # noqa: SIM105
                await publish(event)
            except Exception:  # what a peer raises at a down sink: timed all the same
                pass
            t1 = clock()
        else:
            t0 = clock()
            try:  # noqa: SIM105
                publish(event)
            except Exception:
                pass
            t1 = clock()
        samples[i] = t1 - t0


async def run_row(name: str, scenario: str, url: str, events: int) -> dict[str, Any]:
    row = make_row(name, url)
    with contextlib.suppress(Exception):  # a client that cannot start against a down sink
        await row.start()
    before = sink_count(url, name) if scenario == "healthy" else 0
    samples = array.array("q", bytes(8 * events))  # allocated first: no memory per call
    rss0, cpu0, wall0 = rss_bytes(), time.process_time(), time.perf_counter()
    await time_calls(row, samples)
    result: dict[str, Any] = percentiles(list(samples))
    if row.batch > 1:  # a call carries a batch: time the calls that sent one
        result = percentiles([s for i, s in enumerate(samples) if i % row.batch == row.batch - 1])
    result["events"] = events
    if scenario == "down":
        held = row.buffered()
        if held is not None:
            result["buffered"] = held
        if held and held >= min(1000, events // 10):  # too few to measure against the noise
            result["bytes_per_buffered"] = round((rss_bytes() - rss0) / held)
    print(json.dumps(result), flush=True)  # if the flush or the close blocks, this stands
    if scenario == "healthy":
        # Delivery time: until the sink has counted the events, the flush running meanwhile
        # (some clients' flush returns long after the events went, or never).
        # Polled every 50 ms (the polls cost this process some CPU too), and at once when the
        # row's flush returns, so that a short run is not charged for the rest of a poll
        # interval; done when all are counted, or when no more came for 3 s (the rest were
        # dropped), or after 60 s.
        flushing = asyncio.ensure_future(row.flush())
        deadline = time.monotonic() + 60
        delivered = sink_count(url, name) - before
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        while delivered < events and time.monotonic() < deadline:
            if flushing.done():
                await asyncio.sleep(0.05)
            else:
                await asyncio.wait([flushing], timeout=0.05)
            counted = sink_count(url, name) - before
            if counted != delivered:
                delivered = counted
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            elif time.perf_counter() - wall0 - wall > 3:
                break
        result["events_per_s"] = round(delivered / wall)
        result["cpu_us_per_event"] = round(cpu / max(1, delivered) * 1e6, 2)
        result["dropped"] = events - delivered
        print(json.dumps(result), flush=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(flushing, 10)
    try:
        await asyncio.wait_for(row.close(), 10)
    except asyncio.TimeoutError:
        result["stuck_closing"] = 1  # its close (a thread here) did not end in 10 s
    except Exception:  # a peer failing to close is not this benchmark's business
        pass
    return result


# The parent: sinks, rows, repeats, the table


@contextlib.contextmanager
def sinks() -> Iterator[dict[str, str]]:
    with sink(0.0) as healthy, sink(0.2) as slow:
        yield {"healthy": healthy, "slow": slow, "down": closed_port_url()}


def run_child(name: str, scenario: str, url: str, events: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.peers", "--child", name, scenario, url]
    try:
        done = subprocess.run(
            [*command, str(events)], capture_output=True, text=True, timeout=timeout, check=False
        )
        stdout, stderr, failed = done.stdout, done.stderr, done.returncode != 0
        done_in_time = True
    except subprocess.TimeoutExpired as exc:
        done_in_time = False
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, failed = "", False
        if not stdout.strip():
            return {"blocked": True}  # a publish call itself never returned
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if failed and not lines:
        return {"error": stderr.strip().splitlines()[-1:] or ["no output"]}
    result: dict[str, Any] = json.loads(lines[-1])
    if not failed and done_in_time is False:
        result["stuck_closing"] = 1  # the calls returned; its flush or close did not
    return result


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "p50_us" in r]
    if not good:
        return runs[0]
    keys = set.intersection(*(set(r) for r in good))
    return {k: statistics.median(r[k] for r in good) for k in keys}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def run_line(args: argparse.Namespace) -> str:
    """What made a run's figures: the command with its options, the date, the machine."""
    command = f"python -m benchmarks.peers --events {args.events} --repeats {args.repeats}"
    if args.sync_events != SYNC_EVENTS:
        command += f" --sync-events {args.sync_events}"
    if args.call_timeout != CALL_TIMEOUT:
        command += f" --call-timeout {args.call_timeout:g}"
    if list(args.rows) != list(ROWS):
        command += " --rows " + " ".join(shlex.quote(name) for name in args.rows)
    return (
        f"`{command}`, {time.strftime('%Y-%m-%d')}, CPython {platform.python_version()}, "
        f"{os.cpu_count()} cores, {platform.machine()} ({platform.system()}). Medians of "
        f"{args.repeats} runs."
    )


def table(results: dict[str, dict[str, dict[str, Any]]], run: str, call_timeout: float) -> str:
    lines = [
        run,
        "",
        "Latency per call as the caller sees it, µs: p50 / p99 / p99.9 / max.",
        "",
        "| row | sink healthy | sink slow (200 ms per answer) | sink down |",
        "|---|---|---|---|",
    ]

    def lat(r: dict[str, Any]) -> str:
        if r.get("blocked"):
            return f"a call blocked (> {call_timeout:g} s)"
        stuck = " (then its close hung)" if r.get("stuck_closing") else ""
        if "p50_us" not in r:
            return "error: " + " ".join(r["error"])[:60] if "error" in r else "-"
        parts = [r["p50_us"], r["p99_us"], r["p999_us"], r["max_us"]]
        return " / ".join(f"{p:,.1f}" if p < 100 else f"{p:,.0f}" for p in parts) + stuck

    def memory(down: dict[str, Any]) -> str:
        if "bytes_per_buffered" in down:
            return fmt(down["bytes_per_buffered"], 0)
        held = down.get("buffered")
        return "-" if held is None else f"- (held {held:,})"  # too few to measure

    rows = [(label, results[name]) for name, label in ROWS.items() if name in results]
    for label, row in rows:
        cells = " | ".join(lat(row.get(sink, {})) for sink in ("healthy", "slow", "down"))
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "| row | delivered events/s (healthy) | client CPU µs per delivered event (healthy) "
        "| bytes per buffered event (down) | dropped (healthy) |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows:
        healthy, down = row.get("healthy", {}), row.get("down", {})
        lines.append(
            f"| {label} | {fmt(healthy.get('events_per_s'), 0)} "
            f"| {fmt(healthy.get('cpu_us_per_event'))} | {memory(down)} "
            f"| {fmt(healthy.get('dropped'), 0)} |"
        )
    return "\n".join(lines)


def bars(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    ours = results.get("fiddler_async nowait")
    if not ours:
        return ""
    healthy, slow, down = ours["healthy"], ours["slow"], ours["down"]
    rates = {
        name: r["healthy"]["events_per_s"]
        for name, r in results.items()
        if name not in OURS and name not in REFERENCE and "events_per_s" in r["healthy"]
    }
    # A row where the caller gathers 1000 events a call (and waits milliseconds for it) is
    # compared with its kind: our batch call with fiddler-client's chunks, our per-event call
    # with the per-event peers; and our best with the best of any kind, the strictest reading.
    per_event = {name: rate for name, rate in rates.items() if name not in BULK}
    bulk = {name: rate for name, rate in rates.items() if name in BULK}
    ours_rates = {
        name: r["healthy"]["events_per_s"]
        for name, r in results.items()
        if name in OURS and "events_per_s" in r["healthy"]
    }
    lines = [
        "| bar | goal | measured | met |",
        "|---|---|---|---|",
    ]

    def bar(what: str, goal: str, measured: float, ok: bool, unit: str = "") -> None:
        lines.append(f"| {what} | {goal} | {measured:,.2f}{unit} | {'yes' if ok else 'no'} |")

    bar("nowait p50, healthy", "≤ 2 µs", healthy["p50_us"], healthy["p50_us"] <= 2, " µs")
    bar("nowait p99, healthy", "≤ 10 µs", healthy["p99_us"], healthy["p99_us"] <= 10, " µs")
    for label, r in (("slow", slow), ("down", down)):
        if "p50_us" in r:
            bar(f"nowait p50, {label}", "≤ 3 µs", r["p50_us"], r["p50_us"] <= 3, " µs")
            bar(f"nowait p99, {label}", "≤ 15 µs", r["p99_us"], r["p99_us"] <= 15, " µs")
    comparisons = [("nowait", "fiddler_async nowait", "per-event peer", per_event)]
    if "fiddler_async batch" in ours_rates:
        comparisons.append(("batch", "fiddler_async batch", "bulk peer", bulk))
    if ours_rates:
        best_ours = max(ours_rates, key=lambda name: ours_rates[name])
        comparisons.append((best_ours.split()[-1], best_ours, "peer of any kind", rates))
    for short, mine, what, among in comparisons:
        if among and mine in ours_rates:
            best = max(among, key=lambda name: among[name])
            ratio = ours_rates[mine] / among[best]
            label = f"events/s, {short} vs the best {what} ({best})"
            bar(label, "≥ 5x", ratio, ratio >= 5, "x")
    for reference, what in (("floor", "the floor row"), ("ceiling", "the sink's limit")):
        rate = results.get(reference, {}).get("healthy", {}).get("events_per_s")
        if rate and bulk and not results[reference]["healthy"].get("dropped"):
            # what the bulk bar asks, against what this machine allows at all
            best = max(bulk, key=lambda name: bulk[name])
            lines.append(
                f"| events/s, {what} (not ours, for scale) vs the best bulk peer ({best}) "
                f"| - | {rate / bulk[best]:,.2f}x | - |"
            )
    cpu = healthy["cpu_us_per_event"]
    bar("client CPU per delivered event", "≤ 8 µs", cpu, cpu <= 8, " µs")
    if "bytes_per_buffered" in down:
        held = down["bytes_per_buffered"]
        bar("resident memory per buffered event", "≤ 400 B", held, held <= 400, " B")
    bar("dropped (healthy)", "0", healthy.get("dropped", 0), healthy.get("dropped", 0) == 0)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sync-events", type=int, default=SYNC_EVENTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--out", type=Path, default=None, help="write the tables here, the medians beside it"
    )
    parser.add_argument("--child", nargs=4, metavar=("ROW", "SINK", "URL", "EVENTS"))
    parser.add_argument(
        "--tables-from", type=Path, help="only make the tables, from a run's printed lines"
    )
    args = parser.parse_args()
    if args.tables_from is not None:
        results: dict[str, dict[str, dict[str, Any]]] = {}
        run = f"Made from `{args.tables_from}`, which does not say what run it holds."
        for line in args.tables_from.read_text(encoding="utf-8").splitlines():
            if line.startswith('{"row"'):
                row = json.loads(line)
                results.setdefault(row.pop("row"), {})[row.pop("sink")] = row
            elif line.startswith('{"run"'):
                run = json.loads(line)["run"]
        write_tables(results, run, args)
        return
    if args.child:
        name, scenario, url, events = args.child
        # Not asyncio.run: it would wait for a peer's close still stuck in a worker thread.
        loop = asyncio.new_event_loop()
        result = loop.run_until_complete(run_row(name, scenario, url, int(events)))
        print(json.dumps(result), flush=True)
        os._exit(0)  # nor may a peer's own threads, stuck on a down sink, hold the exit
    results = {}
    with sinks() as urls:
        for name in args.rows:
            results[name] = {}
            for scenario, url in urls.items():
                if name in REFERENCE and scenario != "healthy":
                    continue
                events = args.events
                if name in PER_CALL_NETWORK:
                    events = args.sync_events if scenario == "healthy" else 50
                limit = args.call_timeout + 30 + events * 0.0005
                runs = [run_child(name, scenario, url, events, limit) for _ in range(args.repeats)]
                results[name][scenario] = median(runs)
                print(row_line(name, scenario, results[name][scenario]))
    write_tables(results, run_line(args), args)


def row_line(name: str, scenario: str, figures: dict[str, Any]) -> str:
    return json.dumps({"row": name, "sink": scenario, **figures})


def write_tables(
    results: dict[str, dict[str, dict[str, Any]]], run: str, args: argparse.Namespace
) -> None:
    """Print the tables; with ``--out``, write them there and the medians beside them (the
    same name, ``.jsonl``: what ``--tables-from`` reads back)."""
    text = f"{table(results, run, args.call_timeout)}\n\n{bars(results)}\n"
    print("\n" + text)
    out: Path | None = args.out
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        lines = [json.dumps({"run": run})] + [
            row_line(name, scenario, figures)
            for name, sinks_ in results.items()
            for scenario, figures in sinks_.items()
        ]
        out.with_suffix(".jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
