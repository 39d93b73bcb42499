"""How fast a DataFrame becomes queued events: ``publish_events_batch`` on 100,000 rows.

    python -m benchmarks.frames [--rows 100000] [--repeats 3]

Rows, all in the same run, each the median of ``--repeats``: the same 12-field bank-churn rows
as a list of dicts made by ``DataFrame.to_dict(orient="records")`` (what users did before; the
conversion is timed too), as a pandas DataFrame, a polars DataFrame and a pyarrow Table (encoded
by polars without a Python loop over rows). The sink is the emulator in count-only mode, in
another process; only the call is timed (the events are delivered after).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio

from fiddler_async import AsyncPublisher, PublisherConfig

from .publish import EVENT, TOKEN, sink


def frames(rows: int) -> dict[str, Callable[[], Any]]:
    import numpy as np
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    frame = pd.DataFrame([EVENT] * rows)
    frame["creditscore"] = np.arange(rows, dtype=np.int64) % 200 + 600
    frame["geography"] = frame["geography"].astype("category")
    polars_frame, table = pl.from_pandas(frame), pa.Table.from_pandas(frame)
    return {
        "list of dicts (to_dict)": lambda: frame.to_dict(orient="records"),
        "pandas DataFrame": lambda: frame,
        "polars DataFrame": lambda: polars_frame,
        "pyarrow Table": lambda: table,
    }


async def time_one(url: str, make: Callable[[], Any]) -> float:
    config = PublisherConfig(linger=3600, close_timeout=30)
    async with AsyncPublisher(url, TOKEN, config=config) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        start = time.perf_counter()
        await pub.publish_events_batch("bank_churn", "bank_churn", make())
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with sink() as url:
        for name, make in frames(args.rows).items():
            results[name] = statistics.median(
                anyio.run(time_one, url, make) for _ in range(args.repeats)
            )
    base = results["list of dicts (to_dict)"]
    print(
        f"\n{args.rows} rows, median of {args.repeats}; {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores\n"
    )
    print("| events given as | seconds | rows/s | speed-up |")
    print("|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {args.rows / seconds:,.0f} | {base / seconds:.1f}x |")


if __name__ == "__main__":
    main()
