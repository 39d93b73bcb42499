"""Caller-side latency of publishing, and delivered events/s end to end, against a loopback sink.

    python -m benchmarks.publish [--events 100000] [--repeats 3] [--backend asyncio|trio]

The sink is the project's Fiddler emulator in its count-only mode (``fiddler-async serve
--count-only``), in a separate process, so the client's CPU is measured alone. Each scenario
publishes the same 12-field bank-churn event ``--events`` times from an inference-like loop
(it yields to the event loop every ``--yield-every`` events, as a service awaiting requests
does), timing every call with ``perf_counter_ns``. Scenarios:

- ``nowait``/``await`` healthy: ``publish_event_nowait`` / ``await publish_event``; then
  ``flush()``; events/s is accepted events over the time from the first call to the end of
  the flush (all delivered), CPU is the process time over the same span per delivered event.
- ``nowait`` slow: the sink holds each answer 200 ms; the events are delivered all the same
  (at most ``max_in_flight`` batches per 200 ms).
- ``nowait`` down: nothing listens on the port (connections refused, retried); the events are
  dropped, and counted, at the benchmark's 1 s close deadline.
- ``nowait`` down, queue full: as down, with the queue bounded at 20,000 events and filled
  first, so that every timed call drops the oldest event to make room (``drop_oldest``, the
  default): an outage longer than the queue.

Each row is the median over ``--repeats`` runs; one JSON line per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel

from fiddler_async import AsyncPublisher, PublisherConfig
from fiddler_async.emulator import emulator_process

TOKEN = "bench-token"

EVENT = {
    "customer_id": "c-1842",
    "creditscore": 619,
    "geography": "France",
    "gender": "Female",
    "age": 42,
    "tenure": 2,
    "balance": 0.0,
    "numofproducts": 1,
    "hascrcard": "yes",
    "isactivemember": "yes",
    "estimatedsalary": 101348.88,
    "predicted_churn": 0.21,
}
# What a later update joins to an event by its id: the outcome, once known.
TARGET = {"churn": "yes"}


def sink(delay: float = 0.0) -> contextlib.AbstractContextManager[str]:
    """The emulator, counting events without storing them, answering after ``delay`` s."""
    return emulator_process("--count-only", "--latency", str(delay), token=TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000

    return {
        "p50_us": at(0.5),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": ordered[-1] / 1000,
    }


# The queue bound of the "queue full" row: filled before the timed calls, so that every one of
# them makes room (an outage longer than the queue).
FULL_QUEUE = 20_000


async def run_once(
    url: str, mode: str, events: int, yield_every: int, deliver: bool, *, full: bool = False
) -> dict[str, Any]:
    bound = {"max_queue_events": FULL_QUEUE} if full else {}
    config = PublisherConfig(close_timeout=1.0, **bound)
    async with AsyncPublisher(url, TOKEN, config=config) as pub:
        if deliver:
            await pub.resolve("bank_churn", "bank_churn")
        for _ in range(FULL_QUEUE if full else 0):
            pub.publish_event_nowait("bank_churn", "bank_churn", EVENT)
        samples = [0] * events
        # The caller's own ids (e.g. request ids) and times, made before timing as a server
        # has them: Fiddler's publish_event(event, event_id, event_timestamp).
        own_ids = [f"request-{i}" for i in range(events)] if mode.startswith("nowait ") else []
        own_times = [int(time.time() * 1000) + i for i in range(events)]
        update = mode == "nowait update"
        clock = time.perf_counter_ns
        publish_nowait = pub.publish_event_nowait
        publish = pub.publish_event
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(events):
            if mode == "nowait":
                t0 = clock()
                publish_nowait("bank_churn", "bank_churn", EVENT)
                samples[i] = clock() - t0
            elif own_ids:
                event_id, when = own_ids[i], own_times[i]
                t0 = clock()
                if update:  # the target, joined later to the prediction with that id
                    publish_nowait(
                        "bank_churn", "bank_churn", TARGET, event_id=event_id, update_event=True
                    )
                else:
                    publish_nowait(
                        "bank_churn",
                        "bank_churn",
                        EVENT,
                        event_id=event_id,
                        event_timestamp=when,
                    )
                samples[i] = clock() - t0
            else:
                t0 = clock()
                await publish("bank_churn", "bank_churn", EVENT)
                samples[i] = clock() - t0
            if i % yield_every == yield_every - 1:
                await anyio.lowlevel.checkpoint()
        row: dict[str, Any] = percentiles(samples)
        if deliver:
            await pub.flush(120)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            delivered = pub.stats().delivered
            row["events_per_s"] = round(delivered / wall)
            row["cpu_us_per_event"] = round(cpu / max(1, delivered) * 1e6, 2)
    # Read after close: events still undelivered at the close deadline count as dropped.
    stats = pub.stats()
    row["dropped"] = stats.dropped_total
    row["delivered"] = stats.delivered
    return row


CALLS = {
    "nowait": "publish_event_nowait",
    "nowait id": "publish_event_nowait(..., event_id=, event_timestamp=)",
    "nowait update": "publish_event_nowait(target, event_id=, update_event=True)",
    "await": "await publish_event",
}


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--yield-every", type=int, default=100)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()

    scenarios: list[tuple[str, str, float | None, bool]] = [
        ("nowait", "healthy", 0.0, True),
        ("nowait id", "healthy", 0.0, True),
        ("nowait update", "healthy", 0.0, True),
        ("await", "healthy", 0.0, True),
        ("nowait", "slow (200 ms)", 0.2, True),
        ("nowait", "down", None, False),
        ("nowait", "down, queue full", None, False),
    ]
    table = []
    for mode, sink_state, delay, deliver in scenarios:
        runs = []
        for _ in range(args.repeats):
            if delay is None:
                down = functools.partial(run_once, full=sink_state.endswith("queue full"))
                runs.append(
                    anyio.run(
                        down,
                        closed_port_url(),
                        mode,
                        args.events,
                        args.yield_every,
                        deliver,
                        backend=args.backend,
                    )
                )
                continue
            with sink(delay) as url:
                runs.append(
                    anyio.run(
                        run_once,
                        url,
                        mode,
                        args.events,
                        args.yield_every,
                        deliver,
                        backend=args.backend,
                    )
                )
        row = {"call": mode, "sink": sink_state, "backend": args.backend, **median_row(runs)}
        print(json.dumps(row), flush=True)
        table.append(row)

    print(
        f"\n{args.events} events, median of {args.repeats}; {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}\n"
    )
    print(
        "| call | sink | p50 µs | p99 µs | p99.9 µs | max µs | events/s | CPU µs/event | dropped |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        eps = f"{r['events_per_s']:,.0f}" if "events_per_s" in r else "-"
        cpu = f"{r['cpu_us_per_event']:.2f}" if "cpu_us_per_event" in r else "-"
        print(
            f"| `{CALLS[r['call']]}` "
            f"| {r['sink']} | {r['p50_us']:.2f} | {r['p99_us']:.2f} | {r['p999_us']:.2f} "
            f"| {r['max_us']:.0f} | {eps} | {cpu} | {r['dropped']:.0f} |"
        )


if __name__ == "__main__":
    main()
