"""The emulator in-process behind ``httpx.MockTransport``, for tests of protocol details.

The same app as the loopback emulator (``fiddler_async.emulator``), called directly: every
request is recorded whole (headers and body), ``fail_next`` makes the next requests fail
as a dropped connection would, and ``held()`` keeps publishes waiting for their answer, with
no network involved.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from fiddler_async.emulator import EmulatorState, Store, create_app, load_catalog
from fiddler_async.emulator.app import DroppedConnection

TOKEN = "test-token"
MODELS = Path(__file__).with_name("models.toml")


@dataclass
class InProcessFiddler:
    state: EmulatorState = field(
        default_factory=lambda: EmulatorState(
            catalog=load_catalog(MODELS), store=Store(), token=TOKEN
        )
    )
    requests: list[httpx.Request] = field(default_factory=list)
    fail_next: int = 0
    gate: anyio.Event | None = None

    def transport(self) -> httpx.MockTransport:
        app = httpx.ASGITransport(app=create_app(self.state))

        async def handler(request: httpx.Request) -> httpx.Response:
            await request.aread()
            self.requests.append(request)
            if self.gate is not None and request.url.path == "/v3/events":
                await self.gate.wait()
            if self.fail_next:
                self.fail_next -= 1
                raise httpx.ConnectError("injected: connection refused", request=request)
            try:
                return await app.handle_async_request(request)
            except DroppedConnection:
                raise httpx.RemoteProtocolError("injected: dropped", request=request) from None

        return httpx.MockTransport(handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Within: every publish request waits for its answer, as behind a server that has
        stopped answering; on leaving, they are all answered."""
        self.gate = anyio.Event()
        try:
            yield
        finally:
            gate, self.gate = self.gate, None
            gate.set()

    # What the tests read

    def event_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/v3/events"]

    def lookups(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "GET"]

    def stored(
        self, project: str = "bank_churn", model: str = "bank_churn"
    ) -> list[dict[str, Any]]:
        found = self.state.catalog.find(project, model)
        assert found is not None
        return self.state.store.events(found.id)

    def model_id(self, project: str = "bank_churn", model: str = "bank_churn") -> str:
        found = self.state.catalog.find(project, model)
        assert found is not None
        return found.id


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)
