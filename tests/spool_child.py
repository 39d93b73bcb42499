"""A process that publishes to a backend in an outage with a spool, for the SIGKILL test.

Usage: python spool_child.py URL TOKEN SPOOL_DIR

It publishes events ``e0``, ``e1``, ... forever, and after every 250 it flushes: once the flush
completes, each event before it is on disk in the spool, and it prints ``synced N`` (N events
so far). The test kills it with SIGKILL at some moment after a few of those lines.
"""

from __future__ import annotations

import sys

import anyio

from fiddler_async import AsyncPublisher, PublisherConfig


def event(i: int) -> dict[str, object]:
    return {"customer_id": f"c{i}", "creditscore": 600 + i % 200, "age": 30 + i % 40}


async def main(url: str, token: str, spool_dir: str) -> None:
    config = PublisherConfig(
        spool_dir=spool_dir,
        max_batch_events=50,
        linger=0.01,
        retry_max_attempts=2,
        retry_backoff_initial=0.01,
        retry_backoff_max=0.02,
        breaker_probe_interval=0.02,
    )
    async with AsyncPublisher(url, token, config=config) as pub:
        i = 0
        while True:
            for _ in range(250):
                pub.publish_event_nowait("bank_churn", "bank_churn", event(i), event_id=f"e{i}")
                i += 1
            result = await pub.flush(60)
            if not result.complete or result.spooled + result.delivered != 250:
                print(f"unexpected flush result {result}", flush=True)
                sys.exit(3)
            print(f"synced {i}", flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
