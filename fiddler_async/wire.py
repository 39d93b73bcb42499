"""Fiddler's v3 REST protocol: name resolution, request bodies, answers and errors.

This is the only module that knows httpx and Fiddler's wire format. The flusher hands it a batch
of queued events for a destination; it resolves the model (once, then cached), places the event
id and timestamp into the model's own columns, sends one ``POST``/``PATCH /v3/events`` per batch
with the retry policy, and turns every failure into a :mod:`fiddler_async.exceptions` error.
"""

from __future__ import annotations

import datetime as dt
import decimal
import email.utils
import json
import math
import platform
import re
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import anyio
import httpx
import orjson

from ._cancel import cancellations, is_ours
from ._version import __version__
from .buffer import Item
from .destination import Destination, ModelInfo, ModelRef
from .encode import check_event_size, encode_default, event_id_text, is_null, splice_members
from .exceptions import (
    APIError,
    ConnectError,
    ErrorReason,
    EventError,
    FiddlerError,
    NotFoundError,
    PublisherClosedError,
    RateLimitedError,
    RequestTimeoutError,
    SchemaMismatchError,
    ServerError,
    TransportError,
    api_error_class,
)
from .gate import Gate
from .http1 import HEAD_IS_ENOUGH, MAX_ANSWER_BYTES
from .retry import RetryPolicy
from .stats import Ledger

__all__ = ["CLIENT_NAME", "FiddlerV3Exporter", "client_headers", "not_acted_on", "place_columns"]

CLIENT_NAME = "fiddler-async"
EVENTS_PATH = "/v3/events"
POISON_STATUSES = (400, 413, 422)
"""Refusals that may be about some events of a request: the request is split to find them."""

# Fix-up flags of an event queued before its model was resolved.
ID_EXPLICIT = 1
TS_EXPLICIT = 2


def client_headers(token: str) -> dict[str, str]:
    """The headers of every request, as the official client sends them, with our own name."""
    return {
        "Authorization": f"Bearer {token}",
        # Answers uncompressed: they are small, and a compressed one could inflate to any
        # size (see _read_body).
        "Accept-Encoding": "identity",
        "X-Fiddler-Client-Name": CLIENT_NAME,
        "X-Fiddler-Client-Version": __version__,
        "X-Fiddler-Python-Version": platform.python_version(),
    }


def place_columns(
    info: ModelInfo,
    event: Mapping[str, Any],
    *,
    update: bool,
    event_id: str | None,
    id_explicit: bool,
    ts_millis: int | None,
    ts_explicit: bool,
) -> tuple[list[bytes], tuple[str, ...], str | None]:
    """Map the publish call's ``event_id`` and ``event_timestamp`` onto the model's columns.

    Fiddler has no magic keys: the id and the time are ordinary columns named by the model's
    ``event_id_col`` and ``event_ts_col``. Returns the members to splice into the encoded event,
    the keys to remove from it first (a value the caller passed explicitly replaces the event's
    own), and the id the event will carry (None when the model has no id column).

    The rules: an explicit id or time needs the model to have that column. Without an explicit
    id, an id the event already carries in the id column is kept; otherwise the generated one is
    added. An update is keyed by the id, so it needs one. The publish time is added only to new
    events (an update must not move the time of the event it joins) that carry no time.
    """
    members: list[bytes] = []
    remove: tuple[str, ...] = ()
    id_col, ts_col = info.event_id_col, info.event_ts_col
    carried_id: str | None = None
    if id_explicit or (update and id_col is None):
        if id_col is None:
            raise SchemaMismatchError(
                f"model {info.name!r} has no event id column, so "
                + ("an update cannot be keyed" if update else "event_id cannot be sent")
            )
        if id_col in event:
            remove = (id_col,)
        assert event_id is not None
        members.append(info.id_key + orjson.dumps(event_id))
        carried_id = event_id
    elif id_col is not None and not is_null(event.get(id_col)):
        carried_id = event_id_text(event[id_col], id_col)
    elif update:
        raise SchemaMismatchError(
            f"an update needs event_id= or the model's id column {id_col!r} in the event"
        )
    elif id_col is not None and event_id is not None:
        if id_col in event:  # a null id: the generated one takes its place
            remove = (id_col,)
        members.append(info.id_key + orjson.dumps(event_id))
        carried_id = event_id
    if ts_explicit:
        if ts_col is None:
            raise SchemaMismatchError(
                f"model {info.name!r} has no event timestamp column, so "
                "event_timestamp cannot be sent"
            )
        if ts_col in event:
            remove = (*remove, ts_col)
        assert ts_millis is not None
        members.append(info.ts_key + info.timestamp_json(ts_millis))
    elif ts_millis is not None and ts_col is not None and not update and is_null(event.get(ts_col)):
        if ts_col in event:  # a null time: the publish time takes its place, as for an id
            remove = (*remove, ts_col)
        members.append(info.ts_key + info.timestamp_json(ts_millis))
    return members, remove, carried_id


def finalize_event(info: ModelInfo, update: bool, body: bytes, fixup: tuple[Any, ...]) -> bytes:
    """Place the columns of an event that was queued before its model was resolved."""
    event_id, ts_millis, flags = fixup
    event = orjson.loads(body)
    members, remove, _ = place_columns(
        info,
        event,
        update=update,
        event_id=event_id,
        id_explicit=bool(flags & ID_EXPLICIT),
        ts_millis=ts_millis,
        ts_explicit=bool(flags & TS_EXPLICIT),
    )
    if remove:
        if orjson.dumps(event) != body:
            # Read again with its numbers exact: orjson reads a wide integer or a long decimal
            # (a Decimal's exact text, as encode_default writes it) as a double, rounding it.
            event = json.loads(body, parse_float=decimal.Decimal, parse_int=decimal.Decimal)
        body = orjson.dumps(
            {k: v for k, v in event.items() if k not in remove}, default=encode_default
        )
    return splice_members(body, members)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # the asctime form has no zone: HTTP dates are all GMT
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_from_response(response: httpx.Response, body: bytes | None, secret: str = "") -> APIError:
    """The exception for an error answer, from Fiddler's error envelope where there is one;
    ``body`` None when it could not be decoded (then from the status alone). ``secret`` (the
    token) is blotted out of what the server wrote: an error page may echo the request's
    headers, and this text goes to logs, ``on_error`` and the stats."""
    status = response.status_code
    code, message = status, response.reason_phrase or f"HTTP {status}"
    reasons: list[ErrorReason] = []
    try:
        payload = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        payload = None
        # Blotted before it is cut: a token the cut splits would no longer match whole.
        text = _blot(body.decode("utf-8", "replace"), secret).strip() if body else ""
        if text:
            message = text[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        if isinstance(error.get("code"), int):
            code = error["code"]
        items = error.get("errors")
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                reasons.append(
                    ErrorReason(
                        reason=_blot(str(item.get("reason") or ""), secret),
                        message=_blot(str(item.get("message") or ""), secret),
                        help=_blot(str(item.get("help") or ""), secret),
                    )
                )
    return api_error_class(status)(
        _blot(message, secret),
        status=status,
        code=code,
        reasons=reasons,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


# A secret is blotted where it stands whole, not inside a longer word (a short token would
# otherwise mangle every message); punctuation around it ("token=X.") does not hide it.
_TOKEN_CHARS = r"[A-Za-z0-9_]"


def _blot(text: str, secret: str) -> str:
    if not secret:
        return text
    whole = rf"(?<!{_TOKEN_CHARS}){re.escape(secret)}(?!{_TOKEN_CHARS})"
    return re.sub(whole, "[token]", text)


def parse_model(data: Mapping[str, Any]) -> ModelInfo:
    """The publisher's view of a ``GET /v3/models/{id}`` answer's ``data``."""
    project = data.get("project") or {}
    schema = data.get("schema") or {}
    spec = data.get("spec") or {}
    columns = tuple(
        (str(column["name"]), str(column.get("data_type") or ""))
        for column in schema.get("columns") or ()
        if isinstance(column, dict) and "name" in column
    )
    return ModelInfo(
        id=str(data["id"]),
        name=str(data.get("name") or ""),
        project_id=str(project.get("id") or ""),
        project_name=str(project.get("name") or ""),
        version=data.get("version"),
        event_id_col=data.get("event_id_col") or None,
        event_ts_col=data.get("event_ts_col") or None,
        event_ts_format=data.get("event_ts_format") or None,
        columns=columns,
        inputs=tuple(spec.get("inputs") or ()),
        outputs=tuple(spec.get("outputs") or ()),
        targets=tuple(spec.get("targets") or ()),
    )


def _name_filter(**equals: str) -> str:
    rules = [{"field": f, "operator": "equal", "value": v} for f, v in equals.items()]
    return orjson.dumps({"condition": "AND", "rules": rules}).decode()


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class FiddlerV3Exporter:
    """Sends batches of queued events to Fiddler's v3 API."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        ledger: Ledger,
        retry: RetryPolicy,
        gate: Gate,
        *,
        max_batch_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = client
        self._transport = transport
        """The client's transport, when it is known (not one httpx picks for a proxy of the
        environment): requests go to it directly, past the client's send."""
        self._prototypes: dict[tuple[str, str], httpx.Request] = {}
        self._gate = gate
        self._max_batch_bytes = max_batch_bytes
        self._ledger = ledger
        self._retry = retry
        self._resolving: dict[int, anyio.Lock] = {}
        self._lookup_failures: dict[int, tuple[float, Exception]] = {}
        self._lookup_news: dict[int, anyio.Event] = {}

    # Requests

    async def _request(
        self,
        method: str,
        path: str,
        *,
        retry: int,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        files: Mapping[str, tuple[str, bytes]] | None = None,
        answer_needed: bool = True,
    ) -> bytes:
        """One attempt, through the gate (shared pause, circuit breaker); returns the body of
        a 2xx answer. Without ``answer_needed``, a 2xx whose body did not arrive is success
        (b""): the server took the request, and sending it again would store it twice."""
        probe = await self._gate.enter()
        try:
            body = await self._attempt(
                method,
                path,
                retry,
                content=content,
                params=params,
                files=files,
                answer_needed=answer_needed,
            )
        except FiddlerError as exc:
            self._gate.failed(exc, probe)
            raise
        except BaseException:
            self._gate.abandoned(probe)
            raise
        self._gate.passed(probe)
        return body

    async def _attempt(
        self,
        method: str,
        path: str,
        retry: int,
        *,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        files: Mapping[str, tuple[str, bytes]] | None,
        answer_needed: bool,
    ) -> bytes:
        """One request. A 2xx counts once it has arrived whole, or once its head has when
        its body is not ``answer_needed`` (over our own transport: :data:`HEAD_IS_ENOUGH`): a
        connection dropped (or timed out) after the status line is otherwise a ConnectError
        (retried)."""
        if retry:
            self._ledger.retries += 1
        self._ledger.requests += 1
        where = f"{method} {path}"
        if content is not None and params is None and files is None:
            request = self._json_request(method, path, content)
        else:
            request = self._client.build_request(
                method, path, content=content, params=params, files=files
            )
        if retry:
            request.headers["X-Fiddler-Client-Retry"] = str(retry)
        if not answer_needed:
            request.extensions[HEAD_IS_ENOUGH] = True
        started = time.perf_counter()
        try:
            try:
                response = await self._transmit(request)
                try:
                    body = await _read_body(response)
                finally:
                    await response.aclose()
            except cancellations() as exc:
                if is_ours(exc):
                    raise
                # A transport given raised it (asyncio lets any code), sending or answering:
                # a failure of this request, not a cancellation of the task sending it,
                # which would end delivery.
                raise RuntimeError(f"the transport raised {exc!r}") from exc
        except httpx.TimeoutException as exc:
            sent = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            error: Exception = RequestTimeoutError(f"{where}: timed out", sent=sent)
            raise self._failed("Timeout", error, started) from exc
        except httpx.HTTPError as exc:  # connection errors, and answers that cannot be read
            sent = not isinstance(exc, httpx.ConnectError)
            error = ConnectError(f"{where}: {str(exc) or type(exc).__name__}", sent=sent)
            raise self._failed("ConnectError", error, started) from exc
        except RuntimeError as exc:
            if self._client.is_closed:  # the publisher closed while this request waited
                raise PublisherClosedError(f"{where}: the publisher closed") from exc
            raise
        self._ledger.record_response(str(response.status_code), time.perf_counter() - started)
        if not response.is_success:
            secret = self._client.headers.get("Authorization", "").partition(" ")[2]
            raise self._failed(None, error_from_response(response, body, secret))
        return body or b""

    def _json_request(self, method: str, path: str, content: bytes) -> httpx.Request:
        """A request with a JSON body (the events), as the client's ``build_request`` makes
        it (base URL, default headers, timeouts, the cookies it holds now), copied from one it
        made for the same method and path: merging URL and headers anew for each request cost
        a tenth of a batch's CPU."""
        prototype = self._prototypes.get((method, path))
        if prototype is None:
            prototype = self._client.build_request(
                method, path, headers={"Content-Type": "application/json"}
            )
            prototype.headers.pop("Cookie", None)  # the jar's, as of each request: below
            self._prototypes[method, path] = prototype
        request = httpx.Request(  # which copies the headers (httpx 0.27 keeps extensions as given)
            method,
            prototype.url,
            headers=prototype.headers,
            stream=_Body(content),
            extensions=dict(prototype.extensions),
        )
        request.headers["Content-Length"] = str(len(content))
        if self._client.cookies:  # a load balancer's stickiness, say
            self._client.cookies.set_cookie_header(request)
        return request

    async def _transmit(self, request: httpx.Request) -> httpx.Response:
        """``request`` sent as the client's ``send(stream=True)`` would, but straight to the
        transport when it is known: the client's layers for auth and redirects (which these
        requests do not use), its log line and its timing cost a fifth of each request's CPU.
        Cookies are kept as the client keeps them."""
        transport = self._transport
        if transport is None:
            return await self._client.send(request, stream=True)
        if self._client.is_closed:
            raise RuntimeError("the client is closed")
        try:
            response = await transport.handle_async_request(request)
        except httpx.RequestError as exc:  # as httpx's client sets it: on_error may read it
            exc.request = request
            raise
        response.request = request
        if "set-cookie" in response.headers:
            self._client.cookies.extract_cookies(response)
        return response

    def _failed(self, key: str | None, error: Exception, started: float = 0.0) -> Exception:
        if key is not None:
            self._ledger.record_response(key, time.perf_counter() - started)
        self._ledger.last_error = f"{type(error).__name__}: {error}"
        return error

    async def _get_data(self, path: str, retry: int, **params: str | int) -> Any:
        return self._data("GET", path, await self._request("GET", path, retry=retry, params=params))

    def _data(self, method: str, path: str, body: bytes) -> Any:
        try:
            return orjson.loads(body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise self._failed(
                None, APIError(f"{method} {path}: unexpected answer, no 'data'", status=200)
            ) from exc

    # The file path (backfills): upload, publish the file, follow the job

    async def upload_file(self, name: str, data: bytes) -> str:
        """``POST /v3/files/upload``; the file's id."""
        path = "/v3/files/upload"
        body = await self._retry.call(
            lambda retry: self._request("POST", path, retry=retry, files={"file": (name, data)}),
            what=f"upload {name}",
            kind="upload",
        )
        return str(self._data("POST", path, body)["id"])

    async def publish_file(self, info: ModelInfo, dest: Destination, file_id: str) -> str:
        """``POST``/``PATCH /v3/events`` with the uploaded file as the source; the job's id."""
        payload = orjson.dumps(
            {
                "source": {"type": "FILE", "file_id": file_id},
                "model_id": info.id,
                "env_type": dest.env_type,
                "env_name": dest.env_name,
            }
        )
        # Retried only when the server cannot have started a job: a second job would publish
        # the file twice, and its rows may carry no ids to tell the copies apart.
        body = await self._retry.call(
            lambda retry: self._request(dest.method, EVENTS_PATH, retry=retry, content=payload),
            what=f"{dest.describe()} from file {file_id}",
            kind="publish-file",
            retryable=not_acted_on,
        )
        return str(self._data(dest.method, EVENTS_PATH, body)["job"]["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v3/jobs/{id}``: status, progress, error_message, error_reason, info."""
        path = f"/v3/jobs/{job_id}"
        data: dict[str, Any] = await self._retry.call(
            lambda retry: self._get_data(path, retry), what=f"job {job_id}", kind="job"
        )
        return data

    # Name resolution

    async def resolve(self, ref: ModelRef) -> ModelInfo:
        """The model's schema, looked up once (one lookup at a time per model) and cached."""
        if ref.info is not None:
            return ref.info
        lock = self._resolving.setdefault(id(ref), anyio.Lock())
        began = anyio.current_time()
        async with lock:
            if ref.info is None:
                self._raise_if_failed_since(ref, began)
                try:
                    ref.info = await self._retry.call(
                        lambda retry: self._attempt_lookup(ref, retry),
                        what=f"resolve {ref.label}",
                    )
                except Exception as exc:
                    self._lookup_failures[id(ref)] = (anyio.current_time(), exc)
                    raise
                else:
                    self._lookup_failures.pop(id(ref), None)
                finally:
                    self._tell_lookup_waiters(ref)
        return ref.info

    def _raise_if_failed_since(self, ref: ModelRef, began: float) -> None:
        """A lookup that failed while we waited for the lock is our answer too: each waiting
        batch retrying it in turn would hold them all for its retry budget. (A function of
        its own: a local of resolve's holding the last failure would be kept by the next
        one's traceback, and so on, each with its batch: memory without bound for a model
        whose lookup always fails.)"""
        failed_at, error = self._lookup_failures.get(id(ref), (-math.inf, None))
        if error is not None and failed_at >= began:
            raise error.with_traceback(None)  # raised again: else its traceback grows

    async def _attempt_lookup(self, ref: ModelRef, retry: int) -> ModelInfo:
        try:
            return await self._lookup(ref, retry)
        except Exception:
            self._tell_lookup_waiters(ref)  # the server is not answering well now
            raise

    def _tell_lookup_waiters(self, ref: ModelRef) -> None:
        news = self._lookup_news.pop(id(ref), None)
        if news is not None:
            news.set()

    @property
    def backend_down(self) -> bool:
        """Whether the circuit breaker is open: requests are failing for want of the backend."""
        return self._gate.open

    def looking_up(self, ref: ModelRef) -> bool:
        lock = self._resolving.get(id(ref))
        return lock is not None and lock.locked()

    async def lookup_news(self, ref: ModelRef) -> None:
        """Wait until a lookup of ``ref`` under way (or the next to start) ends, either way,
        or one of its attempts fails; without taking part in it, so that a waiter giving up
        cancels nothing."""
        news = self._lookup_news.setdefault(id(ref), anyio.Event())
        await news.wait()

    def lookup_failure(self, ref: ModelRef) -> Exception | None:
        """Why the last lookup of ``ref`` failed, if it did."""
        return self._lookup_failures.get(id(ref), (0.0, None))[1]

    async def _lookup(self, ref: ModelRef, retry: int) -> ModelInfo:
        try:
            return await self._find_model(ref, retry)
        except FiddlerError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            # An answer of another shape than Fiddler's (a proxy's page, another API).
            error = APIError(
                f"looking up {ref.project}/{ref.model}: unexpected answer ({exc!r})", status=200
            )
            raise self._failed(None, error) from exc

    async def _find_model(self, ref: ModelRef, retry: int) -> ModelInfo:
        if _is_uuid(ref.model):  # written as the server does (see model_uuid)
            return parse_model(await self._get_data(f"/v3/models/{ref.model}", retry))
        projects = await self._get_data(
            "/v3/projects", retry, filter=_name_filter(name=ref.project)
        )
        if not projects.get("items"):
            raise NotFoundError(f"project {ref.project!r} not found", status=404)
        project_id = str(projects["items"][0]["id"])
        models = await self._get_data(
            "/v3/models",
            retry,
            filter=_name_filter(name=ref.model, project_id=project_id),
            limit=1,
            ordering="created_at",
        )
        if not models.get("items"):
            raise NotFoundError(
                f"model {ref.model!r} not found in project {ref.project!r}", status=404
            )
        model_id = str(models["items"][0]["id"])
        return parse_model(await self._get_data(f"/v3/models/{model_id}", retry))

    # Publishing

    async def export(
        self,
        dest: Destination,
        items: Sequence[Item],
        on_delivered: Callable[[Sequence[Item]], None] | None = None,
    ) -> list[tuple[Item, Exception]]:
        """Deliver ``items`` to ``dest``; returns the events that were not delivered, each with
        its error (the final error of its request, or why the event itself was refused).
        ``on_delivered`` is given the events of each request as its 2xx arrives."""
        try:
            info = await self.resolve(dest.model)
        except Exception as exc:  # whatever it is, it is this batch's outcome
            return [(item, exc) for item in items]
        failed: list[tuple[Item, Exception]] = []
        if not any(map(itemgetter(2), items)):  # all final: the usual case, no loop of ours
            ready, bodies = list(items), list(map(itemgetter(1), items))
        else:
            ready, bodies = [], []
            for item in items:
                body, fixup = item[1], item[2]
                try:
                    if fixup is not None:
                        # Measured at the call with a placeholder id and time: it may have
                        # grown past what a request can carry (as refused at the call now).
                        body = finalize_event(info, dest.update, body, fixup)
                        check_event_size(body, self._max_batch_bytes, placed=True)
                except EventError as exc:
                    failed.append((item, exc))
                else:
                    ready.append(item)
                    bodies.append(body)
        # Events queued before the model was known grew when their id and time were placed,
        # so a batch can outgrow the byte limit here: then it goes out as several requests.
        for start, end in _split_by_bytes(bodies, self._max_batch_bytes):
            count = end - start
            budget = [4 * math.ceil(math.log2(count)) + 4] if count > 1 else [0]
            failed.extend(
                await self._send_isolating(
                    info,
                    dest,
                    ready[start:end],
                    bodies[start:end],
                    budget,
                    on_delivered=on_delivered,
                )
            )
        return failed

    async def _send_isolating(
        self,
        info: ModelInfo,
        dest: Destination,
        items: list[Item],
        bodies: list[bytes],
        budget: list[int],
        *,
        on_delivered: Callable[[Sequence[Item]], None] | None,
    ) -> list[tuple[Item, Exception]]:
        """Send ``items`` (encoded as ``bodies``); if the server refuses them as a whole for
        what they hold (400, 413, 422), send each half on its own, down to the events it
        refuses, so that one bad event does not sink the others. Returns the events not
        delivered, with their errors.

        ``budget`` bounds the extra requests per batch: about 4 per halving level to start
        with, and 2 more for each event delivered (a delivered half shows the refusals are
        about some events). So bad events scattered among good ones are found one by one, and
        few if any good events fail with them (bad events packed at the front of a batch
        spend the budget before the first half is delivered); while a refusal of the whole
        request, or of nearly every event, stops after a few dozen requests instead of sending
        each event alone."""
        try:
            await self._send(info, dest, bodies)
        except Exception as exc:  # one chunk's failure leaves the others delivered
            isolating = (
                isinstance(exc, APIError)
                and exc.status in POISON_STATUSES
                and len(items) > 1
                and budget[0] >= 2
            )
            if not isolating:
                return [(item, exc) for item in items]
            budget[0] -= 2
            mid = len(items) // 2
            halves = ((items[:mid], bodies[:mid]), (items[mid:], bodies[mid:]))
            failed: list[tuple[Item, Exception]] = []
            for half, encoded in halves:
                failed += await self._send_isolating(
                    info, dest, half, encoded, budget, on_delivered=on_delivered
                )
            return failed
        budget[0] += 2 * len(items)
        if on_delivered is not None:
            on_delivered(items)
        return []

    async def _send(self, info: ModelInfo, dest: Destination, bodies: list[bytes]) -> None:
        head = b'{"source":{"type":"EVENTS","events":['
        tail = b"".join(
            (
                b']},"model_id":',
                orjson.dumps(info.id),
                b',"env_type":',
                orjson.dumps(dest.env_type),
                b',"env_name":',
                orjson.dumps(dest.env_name),
                b"}",
            )
        )
        # The events joined once with head and tail (a copy: the caller's list may be sent
        # again in halves): they are most of the payload, hundreds of KB, and copying that a
        # second time cost ~8% of a request's CPU.
        parts = list(bodies)
        parts[0] = head + parts[0]
        parts[-1] += tail
        payload = b",".join(parts)
        await self._retry.call(
            lambda retry: self._request(
                dest.method, EVENTS_PATH, retry=retry, content=payload, answer_needed=False
            ),
            what=dest.describe(),
        )


async def _read_body(response: httpx.Response) -> bytes | None:
    """The answer's body; None when it cannot be undone: a compression other than gzip or
    deflate, a damaged one, or one that would inflate past MAX_ANSWER_BYTES. The requests ask
    for none; httpx would undo one a server sends anyway without a bound, on the event loop
    (a megabyte of gzip can hold a gigabyte)."""
    if response.is_stream_consumed:  # read by the transport (httpx.MockTransport does)
        return response.content
    raw = b"".join([chunk async for chunk in response.aiter_raw()])
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        return raw
    # zlib's window bits: gzip's framing; deflate in zlib's framing, or bare as some send it.
    for window in {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}.get(coding, ()):
        inflater = zlib.decompressobj(window)
        members = window == 31  # gzip
        try:
            body = inflater.decompress(raw, MAX_ANSWER_BYTES)
            # gzip may come as several members, one after another (RFC 1952 2.2): only the
            # first was read, the rest of the body dropped without a word.
            while (
                members and inflater.eof and inflater.unused_data and len(body) < MAX_ANSWER_BYTES
            ):
                rest, inflater = inflater.unused_data, zlib.decompressobj(window)
                body += inflater.decompress(rest, MAX_ANSWER_BYTES - len(body))
        except zlib.error:
            continue
        whole = inflater.eof and not inflater.unconsumed_tail
        return body if whole and not (members and inflater.unused_data) else None  # and bounded
    return None


class _Body(httpx.AsyncByteStream):
    """A request body sent as one chunk by a plain iterator. httpx's own is an async
    generator: a request cancelled while sending (a close deadline) leaves it unfinished, and
    trio warns when the garbage collector finds it after the run."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise StopAsyncIteration
        return data


def not_acted_on(error: BaseException) -> bool:
    """A failure after which the server surely did nothing: the request never left, or the
    server turned it away (429, 503)."""
    if isinstance(error, TransportError):
        return not error.sent
    return isinstance(error, RateLimitedError | ServerError) and error.status in (429, 503)


def _split_by_bytes(bodies: list[bytes], limit: int) -> list[tuple[int, int]]:
    """``bodies`` cut into runs (start, end) that each fit a request of ``limit`` bytes."""
    if sum(map(len, bodies)) + len(bodies) <= limit:  # the usual case: one request
        return [(0, len(bodies))] if bodies else []
    runs: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, body in enumerate(bodies):
        grown = len(body) + 1  # and a comma
        if index > start and size + grown > limit:
            runs.append((start, index))
            start, size = index, 0
        size += grown
    runs.append((start, len(bodies)))
    return runs
