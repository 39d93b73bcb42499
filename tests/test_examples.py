"""The example apps, run for real: each serves on loopback in its own process (uvicorn for
FastAPI, aiohttp's own server), gets real HTTP requests, and publishes to the emulator. Its
predictions keep succeeding while Fiddler is down or hangs; SIGTERM closes it cleanly, sending
what was queued, and saying what it could not send."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fiddler_async.emulator import Emulator

from .conftest import bank_event
from .in_process import TOKEN

EXAMPLES = Path(__file__).parent.parent / "examples"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGTERM")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["fastapi_app.py", "aiohttp_app.py"])
def app(
    request: pytest.FixtureRequest, fiddler: Emulator
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    pytest.importorskip("fastapi" if request.param.startswith("fastapi") else "aiohttp")
    port = free_port()
    env = {**os.environ, "FIDDLER_URL": fiddler.url, "FIDDLER_TOKEN": TOKEN, "PORT": str(port)}
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / request.param)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, process)
            yield process, url
        finally:
            if process.poll() is None:
                process.kill()


def wait_until_serving(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
        else:
            return
    raise AssertionError(f"{url} did not start serving")


def predict(client: httpx.Client, i: int) -> str:
    response = client.post("/predict", json=bank_event(i))
    assert response.status_code == 200, response.text
    assert 0 <= response.json()["predicted_churn"] <= 1
    return str(response.json()["event_id"])


def assert_closed_cleanly(process: subprocess.Popen[str], stderr: str) -> None:
    # uvicorn ends by raising the signal again once shut down, as servers should.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "accepted=" in stderr  # the app logged its publisher's stats after closing it


def stored(fiddler: Emulator) -> set[str]:
    return {str(e["event_id"]) for e in fiddler.events()}


def test_the_example_app_publishes_whatever_fiddler_does(
    app: tuple[subprocess.Popen[str], str], fiddler: Emulator
) -> None:
    process, url = app
    with httpx.Client(base_url=url, timeout=10) as client:
        healthy = [predict(client, i) for i in range(20)]
        fiddler.set_faults(outage_seconds=1, retry_after=0.1)  # down for a second
        during_outage = [predict(client, i) for i in range(20, 40)]
        deadline = time.monotonic() + 30
        while not set(healthy + during_outage) <= stored(fiddler):
            assert time.monotonic() < deadline, "events sent during the outage never arrived"
            time.sleep(0.05)
        fiddler.set_faults(script=["hang"] * 4)  # now Fiddler accepts requests, never answers
        while_hung = [predict(client, i) for i in range(40, 60)]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert_closed_cleanly(process, stderr)
    assert not set(while_hung) & stored(fiddler)
    # The close waited its 5 s for the hung request, then said what it could not send.
    assert "20 event(s) dropped" in stderr
    assert "'shutdown': 20" in stderr


def test_sigterm_sends_what_is_queued(
    app: tuple[subprocess.Popen[str], str], fiddler: Emulator
) -> None:
    process, url = app
    with httpx.Client(base_url=url, timeout=10) as client:
        ids = [predict(client, i) for i in range(30)]
    process.send_signal(signal.SIGTERM)  # within the linger: the close sends them
    _, stderr = process.communicate(timeout=60)
    assert_closed_cleanly(process, stderr)
    assert set(ids) <= stored(fiddler)


@pytest.mark.parametrize("token", [TOKEN, "wrong-token"])
def test_the_fastapi_app_does_not_start_with_a_wrong_token(fiddler: Emulator, token: str) -> None:
    """Fiddler answered that the token is wrong: every event would fail, so the app stops at
    startup, as for a wrong model name (the right token, the control, serves)."""
    pytest.importorskip("fastapi")
    port = free_port()
    env = {**os.environ, "FIDDLER_URL": fiddler.url, "FIDDLER_TOKEN": token, "PORT": str(port)}
    command = [sys.executable, str(EXAMPLES / "fastapi_app.py")]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            if token == TOKEN:
                wait_until_serving(f"http://127.0.0.1:{port}", process)
            else:
                _, stderr = process.communicate(timeout=30)
                assert process.returncode != 0
                assert "AuthenticationError" in stderr
        finally:
            if process.poll() is None:
                process.kill()
