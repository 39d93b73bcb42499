"""A small Fiddler v3 stand-in for the tests: one request handler, served two ways.

- ``FakeFiddler.mock_transport()``: an ``httpx.MockTransport`` for protocol details.
- ``serve(fake)``: a real HTTP/1.1 server on a loopback port, in a thread (so it works the same
  under asyncio and trio), with faults a mock cannot make: dropped connections and hangs.

It answers the lookups (projects, models, model detail) with the paginated envelope, stores the
events of ``POST``/``PATCH /v3/events``, and answers errors with Fiddler's error envelope.
Faults are scripted per ``/v3/events`` request: ``fake.script(503, 503)`` makes the next two
answer 503, then the server behaves again.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

TOKEN = "test-token"

BANK_CHURN_COLUMNS = [
    ("customer_id", "str"),
    ("creditscore", "int"),
    ("geography", "category"),
    ("gender", "category"),
    ("age", "int"),
    ("tenure", "int"),
    ("balance", "float"),
    ("numofproducts", "int"),
    ("hascrcard", "category"),
    ("isactivemember", "category"),
    ("estimatedsalary", "float"),
    ("predicted_churn", "float"),
    ("churn", "category"),
    ("event_id", "str"),
    ("timestamp", "timestamp"),
]


def model_record(
    project: dict[str, str],
    name: str,
    *,
    event_id_col: str | None = "event_id",
    event_ts_col: str | None = "timestamp",
    event_ts_format: str | None = None,
    columns: list[tuple[str, str]] = BANK_CHURN_COLUMNS,
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": name,
        "version": "v1",
        "project": project,
        "schema": {"columns": [{"name": n, "data_type": t} for n, t in columns]},
        "spec": {"inputs": [n for n, _ in columns[1:11]], "outputs": ["predicted_churn"]},
        "event_id_col": event_id_col,
        "event_ts_col": event_ts_col,
        "event_ts_format": event_ts_format,
    }


@dataclass
class Fault:
    status: int | None = None  # answer with this status and an error envelope
    retry_after: str | None = None
    drop: bool = False  # close the connection without an answer (real server only)
    hang: bool = False  # hold the request until released (real server only)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeFiddler:
    token: str = TOKEN
    requests: list[Recorded] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    projects: dict[str, dict[str, str]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    reject_if: Any = None  # a callable(event) -> reason or None: answers 400 naming the reason
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.add_model("bank_churn", "bank_churn")

    def add_model(self, project_name: str, model_name: str, **kwargs: Any) -> dict[str, Any]:
        project = self.projects.setdefault(
            project_name, {"id": str(uuid.uuid4()), "name": project_name}
        )
        record = model_record(project, model_name, **kwargs)
        self.models[record["id"]] = record
        return record

    def script(self, *faults: int | Fault) -> None:
        with self.lock:
            self.faults.extend(Fault(status=f) if isinstance(f, int) else f for f in faults)

    # What the tests read

    def event_requests(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == "/v3/events"]

    def lookups(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET"]

    def stored(self, method: str = "POST") -> list[dict[str, Any]]:
        with self.lock:
            return [event for m, event in self.events if m == method]

    # The handler

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes] | Fault:
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.lock:
            self.requests.append(Recorded(method, url.path, headers, body))
            if headers.get("authorization") != f"Bearer {self.token}":
                return _error(401, "Unauthorized", "invalid token")
            if url.path == "/v3/events" and self.faults:
                fault = self.faults.pop(0)
                if fault.status is not None:
                    extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    status, hdrs, payload = _error(fault.status, "Injected", "injected fault")
                    return status, {**hdrs, **extra}, payload
                return fault
            return self._route(method, url.path, query, body)

    def _route(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET" and path == "/v3/projects":
            name = _filter_value(query, "name")
            items = [p for p in self.projects.values() if p["name"] == name]
            return _paginated(items)
        if method == "GET" and path == "/v3/models":
            name, project_id = _filter_value(query, "name"), _filter_value(query, "project_id")
            items = [
                {"id": m["id"], "name": m["name"], "version": m["version"]}
                for m in self.models.values()
                if m["name"] == name and m["project"]["id"] == project_id
            ]
            return _paginated(items[: int(query.get("limit", 100))])
        if method == "GET" and path.startswith("/v3/models/"):
            model = self.models.get(path.rsplit("/", 1)[1])
            if model is None:
                return _error(404, "NotFound", "model not found")
            return _ok(model)
        if path == "/v3/events" and method in ("POST", "PATCH"):
            return self._publish(method, body)
        return _error(404, "NotFound", f"no route {method} {path}")

    def _publish(self, method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            payload = json.loads(body)
            source = payload["source"]
            model = self.models[payload["model_id"]]
            events = source["events"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "BadRequest", "malformed publish request")
        if source.get("type") != "EVENTS" or not 0 < len(events) <= 1000:
            return _error(400, "BadRequest", "source.events must hold 1 to 1000 events")
        if payload.get("env_type") not in ("PRODUCTION", "PRE_PRODUCTION"):
            return _error(400, "BadRequest", "bad env_type")
        if self.reject_if is not None:
            for event in events:
                reason = self.reject_if(event)
                if reason:
                    return _error(400, "BadRequest", reason)
        for event in events:
            self.events.append((method, {"__model": model["name"], **event}))
        ids = [str(e.get(model["event_id_col"] or "", uuid.uuid4())) for e in events]
        return _ok({"source_type": "EVENTS", "event_ids": ids}, status=202)

    def mock_transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            target = request.url.raw_path.decode()
            answer = self.handle(request.method, target, dict(request.headers), request.read())
            if isinstance(answer, Fault):
                raise httpx.ConnectError("injected: connection dropped", request=request)
            status, headers, payload = answer
            return httpx.Response(status, headers=headers, content=payload)

        return httpx.MockTransport(handler)


def _filter_value(query: dict[str, str], name: str) -> str | None:
    rules = json.loads(query.get("filter", "{}")).get("rules", [])
    return next((r["value"] for r in rules if r["field"] == name), None)


def _json(status: int, payload: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _ok(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return _json(status, {"data": data, "api_version": "3.0", "kind": "NORMAL"})


def _paginated(items: list[Any]) -> tuple[int, dict[str, str], bytes]:
    data = {
        "page_size": 100,
        "total": len(items),
        "item_count": len(items),
        "page_count": 1,
        "page_index": 1,
        "offset": 0,
        "items": items,
    }
    return _json(200, {"data": data, "api_version": "3.0", "kind": "PAGINATED"})


def _error(status: int, reason: str, message: str) -> tuple[int, dict[str, str], bytes]:
    error = {
        "code": status,
        "message": message,
        "errors": [{"reason": reason, "message": message, "help": ""}],
    }
    return _json(status, {"error": error, "api_version": "3.0", "kind": "ERROR"})


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeFiddler

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.fake.handle(self.command, self.path, headers, body)
        if isinstance(answer, Fault):
            if answer.hang:
                self.fake.release.wait(30)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, hdrs, payload = answer
        self.send_response(status)
        for name, value in hdrs.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = _serve


@contextlib.contextmanager
def serve(fake: FakeFiddler) -> Iterator[str]:
    """Serve ``fake`` on a free loopback port; yields its base URL."""
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
