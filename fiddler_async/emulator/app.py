"""The emulator's ASGI app: the part of Fiddler's v3 REST API that publishing uses.

Served: ``/v3/server-info``, ``/v3/version-compatibility``, project and model lookup with the
filter syntax, model detail, ``POST``/``PATCH /v3/events`` (a list of events, or an uploaded
file), ``/v3/files/upload`` and ``/v3/jobs/{id}``; every answer in Fiddler's envelopes
(``NORMAL``, ``PAGINATED``, ``ERROR``) and behind bearer-token auth. Under ``/_emulator`` an
admin API reads what was stored and changes the faults while running.
"""

from __future__ import annotations

import functools
import io
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backfill import MAX_UPLOAD_BYTES
from ..destination import ENV_TYPES
from ..encode import encode_event
from ..exceptions import EventEncodeError
from ..rows import RowError, coerce_row, file_format, read_rows, type_problem
from .catalog import ORGANIZATION, USER, Catalog, ModelDef
from .faults import Faults
from .peers import peer_of, peer_response
from .store import Store

__all__ = ["EmulatorState", "create_app"]

SERVER_VERSION = "25.2.0"
MAX_EVENTS = 1000


@dataclass
class EmulatorState:
    catalog: Catalog
    store: Store
    faults: Faults = field(default_factory=Faults)
    token: str | None = None
    """The token every /v3 request must carry; None accepts any bearer token."""
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=10_000))
    stopping: anyio.Event | None = None
    """Set when the server stops: ends the requests held by a `hang` fault."""
    peer_events: dict[str, int] = field(default_factory=dict)
    """Events received through the benchmark's peer doors (see peers.py), by library."""
    running_jobs: set[str] = field(default_factory=set)
    """File jobs answered and not ended yet (they run after their answer)."""
    jobs_ended: threading.Condition = field(default_factory=threading.Condition)

    def close(self, wait: float = 30.0) -> None:
        """Close the store once the file jobs still running have ended (at most ``wait``
        seconds): a job that did not end by then (its task cancelled before it ran, or still
        working) is saved as failed, not left pending for the next emulator on the file."""
        with self.jobs_ended:
            self.jobs_ended.wait_for(lambda: not self.running_jobs, wait)
            unfinished, self.running_jobs = self.running_jobs, set()
        for job_id in unfinished:
            job = self.store.job(job_id)
            if job is not None and job["status"] == "PENDING":
                reason = {"error_reason": "EmulatorStopped", "status": "FAILURE"}
                message = "the emulator stopped before this job ended"
                self.store.save_job({**job, **reason, "error_message": message})
        self.store.close()


class BadRequest(Exception):
    """A request the emulator cannot make sense of: answered 400 in Fiddler's envelope."""


class DroppedConnection(Exception):
    """Raised after the response started: the server closes the connection mid-answer."""


# Envelopes


class FastJSON(JSONResponse):
    """Rendered by orjson: the stdlib encoder took a benchmark sink ~5% of its time, listing
    a thousand event ids per answer."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def ok(data: Any, status: int = 200) -> JSONResponse:
    return FastJSON({"data": data, "api_version": "3.0", "kind": "NORMAL"}, status)


def paginated(items: list[Any], offset: int, limit: int) -> JSONResponse:
    page = items[offset : offset + limit]
    data = {
        "page_size": limit,
        "total": len(items),
        "item_count": len(page),
        "page_count": max(1, -(-len(items) // max(1, limit))),
        "page_index": offset // max(1, limit) + 1,
        "offset": offset,
        "items": page,
    }
    return FastJSON({"data": data, "api_version": "3.0", "kind": "PAGINATED"})


def error(
    status: int,
    message: str,
    reasons: list[tuple[str, str]] | None = None,
    *,
    retry_after: float | None = None,
) -> JSONResponse:
    errors = [
        {"reason": reason, "message": text, "help": ""}
        for reason, text in (reasons or [(_REASONS.get(status, "Error"), message)])
    ]
    body = {
        "error": {"code": status, "message": message, "errors": errors},
        "api_version": "3.0",
        "kind": "ERROR",
    }
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return FastJSON(body, status, headers=headers)


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "RequestEntityTooLarge",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}


# Filters: {"condition": "AND"|"OR", "rules": [{"field", "operator", "value"} | a group]}


def _matches(item: Mapping[str, Any], group: Mapping[str, Any]) -> bool:
    results = []
    for rule in group.get("rules", []):
        if "rules" in rule:
            results.append(_matches(item, rule))
            continue
        value, wanted, operator = (
            item.get(rule.get("field")),
            rule.get("value"),
            rule.get("operator"),
        )
        if operator == "equal":
            results.append(str(value) == str(wanted))
        elif operator == "not_equal":
            results.append(str(value) != str(wanted))
        elif operator == "in":
            results.append(str(value) in [str(w) for w in wanted or []])
        elif operator == "not_in":
            results.append(str(value) not in [str(w) for w in wanted or []])
        elif operator == "contains":
            results.append(str(wanted) in str(value))
        else:
            raise ValueError(f"unsupported filter operator {operator!r}")
    return any(results) if group.get("condition", "AND").upper() == "OR" else all(results)


def _filtered(
    request: Request,
    items: list[dict[str, Any]],
    flat: Callable[[dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    raw = request.query_params.get("filter")
    if not raw:
        return items
    try:
        group = json.loads(raw)
        return [item for item in items if _matches(flat(item), group)]
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadRequest(f"invalid filter: {exc}") from None


def _page_args(request: Request) -> tuple[int, int]:
    try:
        offset = int(request.query_params.get("offset", 0))
        limit = int(request.query_params.get("limit", 50))
    except ValueError:
        raise BadRequest("offset and limit must be whole numbers") from None
    return max(0, offset), max(1, limit)


def validate_events(
    model: ModelDef, events: list[Any], update: bool, *, values: bool = True
) -> list[str]:
    """Why each bad event is bad, one line per problem, naming its position and column;
    without the values' types unless ``values``."""
    types = model.types if values else {}
    problems: list[str] = []
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            problems.append(f"events[{index}]: an event must be an object")
            continue
        if update and event.get(model.event_id_col or "") is None:
            problems.append(
                f"events[{index}]: an update needs the id column {model.event_id_col!r}"
            )
        for column, value in event.items():
            data_type = types.get(column)
            problem = type_problem(data_type, value, model.event_ts_format) if data_type else None
            if problem:
                problems.append(f"events[{index}].{column}: {problem}")
    return problems


def _env_problem(env_type: object, env_name: object) -> str | None:
    """Why a publish body's environment is refused, or None."""
    if env_type not in ENV_TYPES:
        return f"env_type must be one of {list(ENV_TYPES)}"
    if env_name is not None and not isinstance(env_name, str):
        return f"env_name must be a string or null, got {type(env_name).__name__}"
    if env_type == "PRE_PRODUCTION" and not env_name:
        return "env_name (the dataset name) is required for PRE_PRODUCTION"
    return None


class _BodyHead(msgspec.Struct):
    model_id: str
    source: msgspec.Raw
    env_type: Any = "PRODUCTION"
    env_name: Any = None


_BODY_HEAD = msgspec.json.Decoder(_BodyHead)


@functools.cache
def _events_reader(id_col: str | None) -> msgspec.json.Decoder[Any]:
    """A decoder of a publish body's ``source`` that keeps of each event only its value in
    ``id_col``. It reads a body about twice as fast as ``orjson.loads``, which builds every value:
    that took most of a count-only sink's time, and left it barely faster than the clients
    it measures."""
    fields: list[Any] = [] if id_col is None else [("id", Any, None)]
    rename = None if id_col is None else {"id": id_col}
    event: Any = msgspec.defstruct("Event", fields, rename=rename)  # an object: checked
    source = msgspec.defstruct("Source", [("type", str), ("events", list[event], [])])
    return msgspec.json.Decoder(source)


def _event_ids(model: ModelDef, events: list[dict[str, Any]]) -> list[str]:
    """The id of each event: its id column's, or a new one for the server to assign."""
    column = model.event_id_col
    given = [None if column is None else e.get(column) for e in events]
    new = iter(_random_uuids(sum(value is None for value in given)))
    return [next(new) if value is None else str(value) for value in given]


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _random_uuids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as text, from one ``os.urandom`` call: 4x cheaper
    than ``uuid.uuid4()`` each, which took half a benchmark sink's time for a peer that sends
    no ids (so the peer waited on the sink rather than the sink keeping up with it)."""
    digits = os.urandom(16 * count).hex()
    return [
        f"{digits[i : i + 8]}-{digits[i + 8 : i + 12]}-4{digits[i + 13 : i + 16]}-"
        f"{_VARIANT[digits[i + 16]]}{digits[i + 17 : i + 20]}-{digits[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def _file_rows(
    model: ModelDef, name: str, content: bytes
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of an uploaded file, typed by the model's schema, and what is wrong with any."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        read = list(read_rows(io.BytesIO(content), file_format(name)))
    except (ValueError, ImportError) as exc:
        return [], [f"cannot read {name}: {exc}"]
    for line, row in read:
        try:
            if isinstance(row, RowError):
                raise row
            typed = coerce_row(line, row, model.types, ts_format=model.event_ts_format)
            try:
                encode_event(typed)  # what the store cannot hold, Fiddler cannot take either
            except EventEncodeError as exc:
                raise RowError(line, str(exc)) from None
            rows.append(typed)
        except RowError as exc:
            problems.append(str(exc))
    return rows, problems


class _Api:
    """The routes' handlers, over one emulator's state."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.store = state.store
        self.catalog = state.catalog

    # Connecting and looking up

    async def server_info(self, request: Request) -> Response:
        return ok(
            {"feature_flags": {}, "server_version": SERVER_VERSION, "organization": ORGANIZATION}
        )

    async def version_compatibility(self, request: Request) -> Response:
        return ok({})

    async def projects(self, request: Request) -> Response:
        items = _filtered(request, self.catalog.projects(), lambda p: p)
        return paginated(items, *_page_args(request))

    async def project(self, request: Request) -> Response:
        wanted = request.path_params["project_id"]
        found = [p for p in self.catalog.projects() if p["id"] == wanted]
        return ok(found[0]) if found else error(404, "project not found")

    async def models(self, request: Request) -> Response:
        by_id = {m.id: m for m in self.catalog.models}

        def flat(record: dict[str, Any]) -> dict[str, Any]:
            model = by_id[record["id"]]
            return {**record, "project_id": model.project_id, "project_name": model.project}

        items = _filtered(request, [m.compact_record() for m in self.catalog.models], flat)
        if request.query_params.get("ordering", "").startswith("-"):
            items.reverse()  # the models file lists versions in the order they were created
        return paginated(items, *_page_args(request))

    async def model(self, request: Request) -> Response:
        found = self.catalog.model(request.path_params["model_id"])
        return ok(found.record()) if found else error(404, "model not found")

    # Publishing

    async def publish(self, request: Request) -> Response:
        update = request.method == "PATCH"
        entry = request.scope.get("fiddler_log", {})
        try:
            body = await request.body()
            entry["bytes"] = len(body)
            if self.store.count_only:
                counted = self._count_events(body, update, entry)
                if counted is not None:
                    return counted
            payload = orjson.loads(body)
            model_id = str(payload["model_id"])
            source = payload["source"]
            kind = source["type"]
        except (ValueError, KeyError, TypeError):  # orjson's decode error is a ValueError
            return error(400, "the body must be JSON with model_id and source.type")
        model = self.catalog.model(model_id)
        if model is None:
            return error(404, f"model {model_id} not found")
        env_type, env_name = payload.get("env_type", "PRODUCTION"), payload.get("env_name")
        events = source.get("events")
        entry.update(
            model=model.name,
            project=model.project,
            env_type=env_type,
            env_name=env_name,
            events=len(events) if isinstance(events, list) else None,
        )
        problem = _env_problem(env_type, env_name)
        if problem is not None:
            return error(400, problem)
        if env_type == "PRODUCTION":
            env_name = None  # one production environment a model, whatever a client names
        if update and not model.event_id_col:
            return error(400, f"model {model.name!r} has no event id column: cannot update")
        if kind == "EVENTS":
            return self._publish_events(model, env_type, env_name, events, update)
        if kind == "FILE":
            return self._publish_file(model, env_type, env_name, str(source.get("file_id")), update)
        return error(400, f"source.type must be EVENTS or FILE, got {kind!r}")

    def _publish_events(
        self, model: ModelDef, env_type: str, env_name: str | None, events: Any, update: bool
    ) -> Response:
        if not isinstance(events, list) or not 0 < len(events) <= MAX_EVENTS:
            return error(400, f"source.events must be a list of 1 to {MAX_EVENTS} events")
        # A count-only emulator (a benchmark's sink) must not be the bottleneck: the shapes
        # alone, as its own way checks them (_count_events).
        problems = validate_events(model, events, update, values=not self.store.count_only)
        if problems:
            return error(
                400,
                f"{len(problems)} invalid value(s): {problems[0]}",
                [("ValidationError", p) for p in problems],
            )
        self._store(model, env_type, env_name, events, update)
        return ok({"source_type": "EVENTS", "event_ids": _event_ids(model, events)}, 202)

    def _count_events(self, body: bytes, update: bool, entry: dict[str, Any]) -> Response | None:
        """A count-only emulator's (a benchmark sink's) way with a list of events: each
        event's id read and the rest of it skipped unread (see :func:`_events_reader`); new
        events counted, and all answered with their ids. None for what the full way answers:
        a file, an unknown model, a wrong environment, a body it cannot read, an update
        without an id."""
        try:
            head = _BODY_HEAD.decode(body)
            model = self.catalog.model(head.model_id)
            if model is None or _env_problem(head.env_type, head.env_name) is not None:
                return None
            source = _events_reader(model.event_id_col).decode(head.source)
        except msgspec.MsgspecError:
            return None
        events = source.events
        if source.type != "EVENTS" or not 0 < len(events) <= MAX_EVENTS:
            return None
        entry.update(
            model=model.name,
            project=model.project,
            env_type=head.env_type,
            env_name=head.env_name,
            events=len(events),
        )
        given = [event.id for event in events] if model.event_id_col else [None] * len(events)
        if update:
            if None in given:
                return None  # an update without an id: refused there
        else:
            self.store.add_count(model.id, len(events))
        new = iter(_random_uuids(given.count(None)))
        ids = [next(new) if value is None else str(value) for value in given]
        return ok({"source_type": "EVENTS", "event_ids": ids}, 202)

    def _publish_file(
        self, model: ModelDef, env_type: str, env_name: str | None, file_id: str, update: bool
    ) -> Response:
        uploaded = self.store.file(file_id)
        if uploaded is None:
            return error(404, f"file {file_id} not found")
        job: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "name": "Publish events",
            "status": "PENDING",
            "progress": 0.0,
            "info": {"model_id": model.id, "env_type": env_type},
        }
        self.store.save_job(job)
        state = self.state
        with state.jobs_ended:
            state.running_jobs.add(job["id"])

        def run_job() -> None:
            try:
                rows, problems = _file_rows(model, *uploaded)
                if not problems:
                    problems = validate_events(model, rows, update)
                if problems:
                    job.update(
                        status="FAILURE", error_message=problems[0], error_reason="ValidationError"
                    )
                else:
                    with state.jobs_ended:
                        if job["id"] not in state.running_jobs:
                            return  # the emulator stopped meanwhile: store nothing more
                    self._store(model, env_type, env_name, rows, update)
                    job["info"]["events"] = len(rows)
                    job.update(status="SUCCESS", progress=100.0)
            except Exception as exc:  # a job that breaks ends, as a failure, rather than hang
                job.update(
                    status="FAILURE", error_message=str(exc), error_reason=type(exc).__name__
                )
            with state.jobs_ended:
                if job["id"] in state.running_jobs:  # else the emulator stopped: not saved
                    self.store.save_job(job)
                    state.running_jobs.discard(job["id"])
                state.jobs_ended.notify_all()

        answer = ok({"source_type": "FILE", "job": {"id": job["id"], "name": job["name"]}}, 202)
        # The work after the answer, on a worker thread, as Fiddler runs its jobs apart: the
        # emulator goes on answering meanwhile, and a client sees the job pending first.
        answer.background = BackgroundTask(run_job)
        return answer

    def _store(
        self,
        model: ModelDef,
        env_type: str,
        env_name: str | None,
        events: list[dict[str, Any]],
        update: bool,
    ) -> None:
        if update:
            assert model.event_id_col is not None
            self.store.update(model.id, env_type, env_name, model.event_id_col, events)
        else:
            self.store.insert(model.id, env_type, env_name, model.event_id_col, events)

    async def upload(self, request: Request) -> Response:
        async with request.form() as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error(400, "multipart field 'file' is required")
            name = upload.filename or "upload.csv"
            content = await upload.read()
            if len(content) >= MAX_UPLOAD_BYTES:
                return error(
                    413,
                    f"a file of {len(content)} bytes is sent in parts "
                    "(/v3/files/multipart-init), which the emulator does not serve",
                )
            file_id = self.store.add_file(name, content)
        now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        return ok(
            {
                "id": file_id,
                "filename": name,
                "status": "SUCCESSFUL",
                "type": name.rsplit(".", 1)[-1].upper(),
                "created_at": now,
                "updated_at": now,
                "created_by": USER,
                "updated_by": USER,
            }
        )

    async def job(self, request: Request) -> Response:
        found = self.store.job(request.path_params["job_id"])
        return ok({**found, "extras": {}}) if found else error(404, "job not found")

    # The admin API: what was stored, and the faults

    def _admin_model(self, request: Request) -> ModelDef | Response:
        project, name = request.query_params.get("project"), request.query_params.get("model")
        if project is None and name is None and len(self.catalog.models) == 1:
            return self.catalog.models[0]
        found = self.catalog.find(project or "", name or "")
        return found or error(404, f"no model {project}/{name}")

    async def summary(self, request: Request) -> Response:
        store = self.store
        models = []
        for m in self.catalog.models:
            duplicates = {} if store.count_only else store.duplicates(m.id)
            models.append(
                {
                    "project": m.project,
                    "model": m.name,
                    "model_id": m.id,
                    "events": store.count(m.id),
                    "distinct_ids": None if store.count_only else store.distinct_ids(m.id),
                    "duplicates": sum(n - 1 for n in duplicates.values()),
                    "pending_updates": store.pending_updates(m.id),
                }
            )
        return JSONResponse(
            {
                "models": models,
                "events": store.count(),
                "early_updates": store.early_updates_seen,
                "pending_updates": store.pending_updates(),
                "db": store.path,
                "peers": dict(self.state.peer_events),
            }
        )

    async def events(self, request: Request) -> Response:
        model = self._admin_model(request)
        if isinstance(model, Response):
            return model
        offset, limit = _page_args(request)
        events = self.store.events(model.id, limit=limit, offset=offset)
        return JSONResponse({"events": events, "total": self.store.count(model.id)})

    async def duplicates(self, request: Request) -> Response:
        model = self._admin_model(request)
        if isinstance(model, Response):
            return model
        return JSONResponse({"duplicates": self.store.duplicates(model.id)})

    async def faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                self.state.faults.update(await request.json())
            except (ValueError, TypeError) as exc:
                return error(400, str(exc))
        return JSONResponse(self.state.faults.snapshot())

    async def reset(self, request: Request) -> Response:
        self.store.clear()
        self.state.requests.clear()
        self.state.peer_events.clear()
        return JSONResponse({"events": 0})

    async def requests(self, request: Request) -> Response:
        return JSONResponse({"requests": list(self.state.requests)})


def create_app(state: EmulatorState) -> ASGIApp:
    api = _Api(state)
    routes = [
        Route("/v3/server-info", api.server_info),
        Route("/v3/version-compatibility", api.version_compatibility),
        Route("/v3/projects", api.projects),
        Route("/v3/projects/{project_id}", api.project),
        Route("/v3/models", api.models),
        Route("/v3/models/{model_id}", api.model),
        Route("/v3/events", api.publish, methods=["POST", "PATCH"]),
        Route("/v3/files/upload", api.upload, methods=["POST"]),
        Route("/v3/jobs/{job_id}", api.job),
        Route("/_emulator/summary", api.summary),
        Route("/_emulator/events", api.events),
        Route("/_emulator/duplicates", api.duplicates),
        Route("/_emulator/faults", api.faults, methods=["GET", "PUT"]),
        Route("/_emulator/reset", api.reset, methods=["POST"]),
        Route("/_emulator/requests", api.requests),
    ]
    handlers = {BadRequest: _bad_request, HTTPException: _http_error, Exception: _failure}
    return _Gate(Starlette(routes=routes, exception_handlers=handlers), state)


# Every answer in Fiddler's error envelope, the framework's own (404, 405) and failures too.


async def _bad_request(request: Request, exc: Exception) -> Response:
    return error(400, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, str(exc.detail))


async def _failure(request: Request, exc: Exception) -> Response:
    return error(500, f"emulator failure: {type(exc).__name__}: {exc}")


class _Gate:
    """In front of the routes: auth, the request log, and the faults."""

    def __init__(self, app: ASGIApp, state: EmulatorState) -> None:
        self.app = app
        self.state = state

    async def _peer_door(
        self, request: Request, peer: str, respond: Callable[[Response], Awaitable[None]]
    ) -> None:
        """A benchmark peer's door (see peers.py): its own credentials, none checked."""
        delay = self.state.faults.delay()
        if delay:
            await anyio.sleep(delay)
        try:
            answer = await peer_response(request, peer, self.state.peer_events)
        except ClientDisconnect:  # a benchmark stopped a client mid-request
            return
        await respond(answer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, faults = self.state, self.state.faults
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        entry = {
            "method": method,
            "path": path,
            "headers": {k: v for k, v in headers.items() if k != "authorization"},
            "time": time.time(),
            "status": None,
        }
        state.requests.append(entry)
        scope["fiddler_log"] = entry  # the publish handler adds what the request carried

        async def respond(response: Response) -> None:
            entry["status"] = response.status_code
            await response(scope, receive, send)

        peer = peer_of(path) if method == "POST" else None
        if peer is not None:
            await self._peer_door(Request(scope, receive), peer, respond)
            return
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or (state.token is not None and auth[7:] != state.token):
            await respond(error(401, "missing or invalid bearer token"))
            return
        if path.startswith("/v3/"):
            delay = faults.delay()
            if delay:
                await anyio.sleep(delay)
            if faults.in_outage():
                await respond(error(503, "emulated outage", retry_after=faults.retry_after))
                return
            if faults.max_body_bytes:
                if "content-length" in headers:
                    length = int(headers["content-length"])
                else:  # a chunked body: its length is known once it is read
                    length, receive = await _read_ahead(receive)
                if length > faults.max_body_bytes:
                    await respond(
                        error(413, f"body of {length} bytes exceeds {faults.max_body_bytes}")
                    )
                    return
            if path == "/v3/events" and method in ("POST", "PATCH"):
                kind, status = faults.decide_publish()
                if kind == "status":
                    wait = faults.retry_after if status in (429, 503) else None
                    await respond(error(status, "emulated fault", retry_after=wait))
                    return
                if kind == "hang":
                    entry["status"] = "hang"
                    await _hang(state)
                    kind = "drop"
                if kind == "lose":  # handled (stored), but the answer never arrives
                    await self.app(scope, receive, _discard)
                if kind in ("drop", "lose"):
                    entry["status"] = kind
                    await _drop(send)
                    raise DroppedConnection("emulated dropped connection")

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, send_logged)


async def _discard(message: Message) -> None:
    pass


async def _read_ahead(receive: Receive) -> tuple[int, Receive]:
    """Read a request's whole body; its length, and a ``receive`` that gives it again."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return 0, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    given = False

    async def again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return len(body), again


async def _drop(send: Send) -> None:
    """Close the connection without an answer: by the server's transport where it has one
    (uvicorn's ``send`` is a method of its request cycle, which holds it), as anything sent
    first, even a status line, is an answer to a client that reads only the status. Without
    one (in process, under httpx), a status line promising a body that never comes."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        transport.close()
        return
    start = {"type": "http.response.start", "status": 200}
    await send({**start, "headers": [(b"content-length", b"64")]})


async def _hang(state: EmulatorState) -> None:
    if state.stopping is None:
        state.stopping = anyio.Event()
    await state.stopping.wait()
