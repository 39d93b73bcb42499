"""Running the emulator: under uvicorn in a thread of its own, or in the foreground.

A thread with its own event loop serves the same under asyncio, trio or synchronous code, and
keeps the emulator's work off the caller's loop (as a real server would be).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import anyio
import uvicorn
from starlette.requests import ClientDisconnect

from .app import DroppedConnection, EmulatorState, create_app
from .catalog import Catalog, ModelDef, load_catalog
from .faults import Faults
from .store import Store

__all__ = [
    "DEFAULT_TOKEN",
    "Emulator",
    "emulator",
    "emulator_process",
    "running_emulator",
    "serve_forever",
]

DEFAULT_TOKEN = "emulator-token"
_BACKLOG = 2048  # uvicorn's


class _HideDroppedConnections(logging.Filter):
    """A dropped connection is not an error worth a traceback: an injected fault, or a
    client gone before its request arrived whole (a publisher cancelling a request at its
    close deadline, while a slow emulator waits before reading the body)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection | ClientDisconnect)


logging.getLogger("uvicorn.error").addFilter(_HideDroppedConnections())


class Emulator:
    """A running emulator: its ``url`` and ``token``, and what it has received."""

    def __init__(self, state: EmulatorState, url: str) -> None:
        self.state = state
        self.url = url

    @property
    def token(self) -> str:
        return self.state.token or DEFAULT_TOKEN

    @property
    def catalog(self) -> Catalog:
        return self.state.catalog

    def model(self, project: str = "bank_churn", model: str = "bank_churn") -> ModelDef:
        found = self.state.catalog.find(project, model)
        if found is None:
            raise KeyError(f"the emulator serves no model {project}/{model}")
        return found

    def events(
        self, project: str = "bank_churn", model: str = "bank_churn"
    ) -> list[dict[str, Any]]:
        """Every event stored for the model, in arrival order."""
        return self.state.store.events(self.model(project, model).id)

    def count(self, project: str | None = None, model: str | None = None) -> int:
        if project is None and model is None:
            return self.state.store.count()
        return self.state.store.count(self.model(project or "bank_churn", model or "bank_churn").id)

    def duplicates(self, project: str = "bank_churn", model: str = "bank_churn") -> dict[str, int]:
        return self.state.store.duplicates(self.model(project, model).id)

    def pending_updates(
        self, project: str = "bank_churn", model: str = "bank_churn"
    ) -> list[dict[str, Any]]:
        """Updates of no stored event yet (not events: :meth:`events` leaves them out), kept
        to be merged into the event with their id when it comes."""
        return self.state.store.pending(self.model(project, model).id)

    def early_updates(self) -> int:
        """Updates that arrived before the event they update (merged once it came)."""
        return self.state.store.early_updates_seen

    def requests(self) -> list[dict[str, Any]]:
        """The requests received (newest last), without their Authorization header."""
        return list(self.state.requests)

    def set_faults(self, **changes: Any) -> None:
        """Change the faults while running, e.g. ``set_faults(error_503=0.2, script=["drop"])``."""
        self.state.faults.update(changes)


def _state(
    token: str | None,
    db: str | Path,
    models: str | Path | None,
    faults: Faults | None,
    count_only: bool,
) -> EmulatorState:
    return EmulatorState(
        catalog=load_catalog(models),
        store=Store(str(db), count_only=count_only),
        faults=faults or Faults(),
        token=token,
    )


class ListenError(OSError):
    """The emulator cannot listen where it was asked to: the port is taken, or the host is not
    this machine's."""


def _listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` stands for, as asyncio's ``create_server``
    makes them (``localhost``: IPv4 and IPv6 where it means both; ``""``: every interface);
    port 0: a free one, the same for all. Each names TCP as its protocol, as getaddrinfo
    gives it: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    socket says TCP, and accepted ones inherit it. With Nagle on, a benchmark's client spent a
    third more CPU per event (2.1 -> 2.8 us)."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, found_address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: an IPv4 address gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            address = found_address
            if len(sockets) > 1:  # the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(_BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sockets


def _url(host: str, sock: socket.socket, scheme: str = "http") -> str:
    """How to reach ``sock``: by ``host`` as given (a name stays a name), or by the address
    it is bound to when given none."""
    shown = host or sock.getsockname()[0]
    return f"{scheme}://{f'[{shown}]' if ':' in shown else shown}:{sock.getsockname()[1]}"


class _EmulatorServer(uvicorn.Server):
    """uvicorn's server which, asked to stop (``stop()`` from any thread, Ctrl-C, SIGTERM),
    first ends the requests that a ``hang`` fault holds, so that it can stop at all."""

    def __init__(self, state: EmulatorState, **config: Any) -> None:
        super().__init__(
            uvicorn.Config(
                create_app(state),
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=2,
                access_log=False,
                # The tests meet one HTTP parser whatever is installed; a count-only emulator
                # (a benchmark's sink, which must keep up) takes httptools where it is there.
                http="auto" if state.store.count_only else "h11",
                **config,
            )
        )
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.state.stopping = anyio.Event()
        await super().serve(sockets)

    def stop(self) -> None:
        self.should_exit = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(self._release_hung_requests)

    def _release_hung_requests(self) -> None:
        if self.state.stopping is not None:
            self.state.stopping.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.stop()


@contextlib.contextmanager
def running_emulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = DEFAULT_TOKEN,
    db: str | Path = ":memory:",
    models: str | Path | None = None,
    faults: Faults | None = None,
    count_only: bool = False,
    tls: tuple[str | Path, str | Path] | None = None,
) -> Iterator[Emulator]:
    """Start an emulator in a background thread (port 0: a free one); stop it on exit.
    ``tls``: a certificate chain file and its key file, to serve HTTPS."""
    state = _state(token, db, models, faults, count_only)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(state.close)
        sockets = _listeners(host, port)
        for sock in sockets:
            cleanup.callback(sock.close)
        https = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        server = _EmulatorServer(state, **https)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": sockets}, name="fiddler-emulator", daemon=True
        )
        thread.start()
        cleanup.callback(thread.join, 10)
        cleanup.callback(server.stop)
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the emulator did not start")
            time.sleep(0.005)
        yield Emulator(state, _url(host, sockets[0], "https" if tls else "http"))


@contextlib.asynccontextmanager
async def emulator(**options: Any) -> AsyncIterator[Emulator]:
    """``running_emulator`` for async code (asyncio or trio): start and stop off the loop."""
    manager = running_emulator(**options)
    handle = await anyio.to_thread.run_sync(manager.__enter__)
    try:
        yield handle
    finally:
        await anyio.to_thread.run_sync(manager.__exit__, None, None, None)


def serve_forever(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = DEFAULT_TOKEN,
    db: str | Path = ":memory:",
    models: str | Path | None = None,
    faults: Faults | None = None,
    count_only: bool = False,
    listening: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until interrupted (``fiddler-async serve``). ``listening`` is
    called with the URL once the server listens (port 0: on a free port), before it serves;
    where it cannot listen, ListenError (an OSError) is raised instead."""
    state = _state(token, db, models, faults, count_only)
    try:
        sockets = _listeners(host, port)
        try:
            if listening is not None:
                listening(_url(host, sockets[0]))
            _EmulatorServer(state).run(sockets=sockets)
        finally:
            for sock in sockets:
                sock.close()
    finally:
        state.close()


@contextlib.contextmanager
def emulator_process(*serve_args: str, token: str = DEFAULT_TOKEN) -> Iterator[str]:
    """Run ``fiddler-async serve`` in a separate process on a free loopback port; yields its
    URL once it listens. For benchmarks (the client's CPU measured alone) and CLI tests.
    ``serve_args`` are more flags of ``serve``, e.g. ``"--count-only", "--latency", "0.2"``.
    What the server writes to stderr (warnings) is passed on to ours when it stops, or in the
    error if it does not start."""
    command = [sys.executable, "-m", "fiddler_async.cli", "serve", "--port", "0", "--token", token]
    # Port 0: it takes a free one and names it in the line it prints once it listens (its
    # only output on stdout), so that no other process can take the port in between.
    # Its stderr goes to a file, not a pipe: nobody reads a pipe while it serves, and a full
    # one would stall it.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([*command, *serve_args], stdout=subprocess.PIPE, stderr=errors)
        stdout = process.stdout
        assert stdout is not None
        announced: list[bytes] = []
        reader = threading.Thread(
            target=lambda: announced.append(stdout.readline()),
            daemon=True,  # blocked until the process ends, if it never announces
        )
        reader.start()
        reader.join(30)
        started = False
        try:
            words = announced[0].decode().split() if announced else []
            if words[:3] != ["Fiddler", "emulator", "on"]:
                _end(process)  # before reading its errors: it writes to the same file offset
                said = _read_back(errors).strip()[-500:] or "it said nothing"
                why = f"exit code {process.returncode}" if announced else "not listening in 30 s"
                raise RuntimeError(f"the emulator did not start ({why}): {said}")
            started = True
            yield words[3]
        finally:
            _end(process)
            reader.join(10)  # the process has ended: its stdout is at its end
            stdout.close()
            if started:
                sys.stderr.write(_read_back(errors))


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read_back(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
