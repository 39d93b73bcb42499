"""A model endpoint's latency with Fiddler healthy and hung, side by side.

    python -m benchmarks.endpoint [--requests 2000] [--repeats 3]

Runs ``examples/fastapi_app.py`` under uvicorn in its own process, publishing each prediction
to the emulator (another process), and times ``--requests`` sequential ``POST /predict`` calls
from this process: once with the emulator answering, once with it holding every publish
request unanswered (a ``hang`` fault). Each row is the median over ``--repeats`` runs, each
with a fresh app. If publishing ever waited on Fiddler, the hung row would show it.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from fiddler_async.emulator import emulator_process

from .publish import EVENT, TOKEN, free_port, percentiles

APP = Path(__file__).parent.parent / "examples" / "fastapi_app.py"


def run_once(fiddler_url: str, requests: int) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "FIDDLER_URL": fiddler_url, "FIDDLER_TOKEN": TOKEN, "PORT": str(port)}
    with subprocess.Popen(
        [sys.executable, str(APP)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as app:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.post("/predict", json=EVENT)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            samples = []
            for _ in range(requests):
                start = time.perf_counter_ns()
                response = client.post("/predict", json=EVENT)
                samples.append(time.perf_counter_ns() - start)
                response.raise_for_status()
        app.send_signal(signal.SIGTERM)
        app.wait(30)
    return percentiles(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    with emulator_process("--count-only", token=TOKEN) as fiddler:
        admin = httpx.Client(base_url=fiddler, headers={"Authorization": f"Bearer {TOKEN}"})
        for state, faults in (("healthy", {"script": []}), ("hung", {"script": ["hang"] * 64})):
            admin.put("/_emulator/faults", json=faults).raise_for_status()
            runs = [run_once(fiddler, args.requests) for _ in range(args.repeats)]
            rows[state] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\n{args.requests} sequential POST /predict, median of {args.repeats}; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores\n"
    )
    print("| Fiddler | p50 µs | p99 µs | p99.9 µs | max µs |")
    print("|---|---|---|---|---|")
    for state, r in rows.items():
        print(
            f"| {state} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p999_us']:.0f} "
            f"| {r['max_us']:.0f} |"
        )


if __name__ == "__main__":
    main()
