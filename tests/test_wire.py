"""The Fiddler v3 wire, through httpx.MockTransport: headers, bodies, lookups, errors."""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import gc
import gzip
import json
import platform
import time
import tracemalloc
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import numpy as np
import pandas as pd
import pytest

import fiddler_async
from fiddler_async import (
    APIError,
    AsyncPublisher,
    AuthenticationError,
    BadRequestError,
    DeliveryFailure,
    NotFoundError,
    RateLimitedError,
    SchemaMismatchError,
    ServerError,
)
from fiddler_async.retry import is_retryable
from fiddler_async.wire import client_headers, error_from_response, parse_retry_after

from .conftest import bank_event, config, eventually, mock_publisher
from .in_process import TOKEN, InProcessFiddler, body

pytestmark = pytest.mark.anyio


async def test_request_headers_and_body(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        eid = pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).complete
    (request,) = inproc.event_requests()
    assert request.method == "POST"
    headers = request.headers
    assert headers["authorization"] == "Bearer test-token"
    assert headers["x-fiddler-client-name"] == "fiddler-async"
    assert headers["x-fiddler-client-version"] == fiddler_async.__version__
    assert headers["x-fiddler-python-version"] == platform.python_version()
    assert headers["content-type"] == "application/json"
    assert "x-fiddler-client-retry" not in headers
    sent = body(request)
    assert sent["model_id"] == inproc.model_id()
    assert sent["env_type"] == "PRODUCTION"
    assert sent["env_name"] is None
    assert sent["source"]["type"] == "EVENTS"
    (event,) = sent["source"]["events"]
    assert event["event_id"] == eid
    assert isinstance(event["timestamp"], int)  # the publish time, in epoch ms
    assert {k: v for k, v in event.items() if k not in ("event_id", "timestamp")} == bank_event(1)


@pytest.mark.parametrize("path", ["", "/fiddler"])
async def test_requests_sent_past_the_client_are_the_ones_it_would_send(path: str) -> None:
    """Requests go straight to a known transport, and event requests are copied from one the
    client built: each must be what httpx's client builds (URL under a base path; headers:
    Host, httpx's defaults, ours, a retry's; the timeouts), sent straight or through the
    client's own send (as where a proxy is configured), delivered either way, and carrying
    the cookie the answers set (a load balancer's stickiness) as the client does, until one
    deletes it."""
    sent: dict[str, list[httpx.Request]] = {}
    sends: dict[str, int] = {}
    cfg = config()
    for way in ("direct", "client"):
        inproc = InProcessFiddler()
        inner = inproc.transport()

        async def handler(
            request: httpx.Request, seen: list[httpx.Request], inner: httpx.MockTransport
        ) -> httpx.Response:
            seen.append(request)
            url = request.url.copy_with(path=request.url.path.removeprefix(path))
            content = await request.aread()
            response = await inner.handle_async_request(
                httpx.Request(request.method, url, headers=request.headers, content=content)
            )
            cookie = f"lb={len(seen)}" if len(seen) != 5 else "lb=; Max-Age=0"
            response.headers["Set-Cookie"] = cookie + "; Path=/"
            return response

        seen = sent[way] = []
        transport = httpx.MockTransport(functools.partial(handler, seen=seen, inner=inner))
        pub = AsyncPublisher(f"https://fiddler.test{path}", TOKEN, config=cfg, transport=transport)
        async with pub:
            client = pub._client
            assert client is not None
            client_send = client.send

            async def counted(
                request: httpx.Request, way: str = way, send: Any = client_send, **kwargs: Any
            ) -> httpx.Response:
                sends[way] = sends.get(way, 0) + 1
                return await send(request, **kwargs)  # type: ignore[no-any-return]

            client.send = counted  # type: ignore[method-assign]
            if way == "client":
                pub._exporter._transport = None  # type: ignore[union-attr]
            await pub.resolve("bank_churn", "bank_churn")
            inproc.fail_next = 1  # the first publish: a retry
            await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(1)])
            assert (await pub.flush(5)).complete
            await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(2)])
            assert (await pub.flush(5)).complete
    assert sends == {"client": 6}  # and none past the client where its transport is known

    def shape(request: httpx.Request) -> tuple[Any, ...]:
        headers = sorted(kv for kv in request.headers.multi_items() if kv[0] != "cookie")
        timeout = request.extensions.get("timeout")
        return request.method, str(request.url), headers, len(request.content), timeout

    timeouts = httpx.Timeout(cfg.request_timeout, connect=cfg.connect_timeout)
    with httpx.Client(
        base_url=f"https://fiddler.test{path}", headers=client_headers(TOKEN), timeout=timeouts
    ) as reference:
        for way, requests in sent.items():
            assert [r.url.path for r in requests] == [
                f"{path}/v3/projects",
                f"{path}/v3/models",
                f"{path}/v3/models/{inproc.model_id()}",
            ] + [f"{path}/v3/events"] * 3
            for request, retry in zip(requests[3:], [None, "1", None], strict=True):
                extra = {"Content-Type": "application/json"}
                if retry:
                    extra["X-Fiddler-Client-Retry"] = retry
                expected = reference.build_request(
                    request.method, "/v3/events", content=request.content, headers=extra
                )
                assert shape(request) == shape(expected)
            cookies = [request.headers.get("cookie") for request in requests]
            assert cookies == [None, "lb=1", "lb=2", "lb=3", "lb=3", None], way
    assert list(map(shape, sent["direct"][:3])) == list(map(shape, sent["client"][:3]))


async def test_a_transport_error_names_its_request() -> None:
    """An error a transport raises without its request (as httpx's own transport does, and
    MockTransport here) reaches on_error with it, as httpx's client would have set it."""
    inproc = InProcessFiddler()
    inner = inproc.transport()

    async def refuse_events(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/events":
            raise httpx.ConnectError("refused")
        return await inner.handle_async_request(request)

    failures: list[DeliveryFailure] = []
    async with AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(retry_max_attempts=1),
        transport=httpx.MockTransport(refuse_events),
        on_error=failures.append,
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).failed == 1
    [failure] = failures
    cause = failure.error.__cause__
    assert isinstance(cause, httpx.ConnectError)
    assert (cause.request.method, cause.request.url.path) == ("POST", "/v3/events")


async def test_event_id_and_timestamp_go_into_the_models_columns(inproc: InProcessFiddler) -> None:
    # tests/models.toml: model p/m keeps its id in "row_id" and its time in "at" (strftime).
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    async with mock_publisher(inproc) as pub:
        returned = pub.publish_event_nowait(
            "p", "m", {"x": 1}, event_id="e-1", event_timestamp=when
        )
        assert returned == "e-1"
        await pub.flush(5)
        # Once the model is known, the same rules apply at publish time.
        pub.publish_event_nowait(
            "p", "m", {"x": 2}, event_id="e-2", event_timestamp=1_704_164_645_000
        )
        await pub.flush(5)
    first, second = inproc.stored("p", "m")
    assert first == {"row_id": "e-1", "at": "2024-01-02 03:04:05", "x": 1}
    assert second == {"row_id": "e-2", "at": "2024-01-02 03:04:05", "x": 2}


async def test_an_id_the_event_carries_is_kept(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        info = await pub.resolve("bank_churn", "bank_churn")
        assert info.event_id_col == "event_id"
        returned = pub.publish_event_nowait(
            "bank_churn", "bank_churn", {**bank_event(), "event_id": "mine"}
        )
        assert returned == "mine"
        overridden = pub.publish_event_nowait(
            "bank_churn", "bank_churn", {**bank_event(), "event_id": "old"}, event_id="new"
        )
        assert overridden == "new"
        await pub.flush(5)
    assert [e["event_id"] for e in inproc.stored()] == ["mine", "new"]


async def test_update_is_a_patch_keyed_by_the_id_column(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        eid = await pub.publish_event("bank_churn", "bank_churn", bank_event())
        await pub.publish_event(
            "bank_churn", "bank_churn", {"churn": "yes"}, event_id=eid, update_event=True
        )
        assert (await pub.flush(5)).delivered == 2
    insert, update = inproc.event_requests()
    assert insert.method == "POST"
    assert update.method == "PATCH"
    # The update carries the id and the new column, and no publish time (that would move
    # the time of the event it joins).
    assert body(update)["source"]["events"] == [{"event_id": eid, "churn": "yes"}]


async def test_update_without_id_before_resolution_is_refused_at_the_caller(
    inproc: InProcessFiddler,
) -> None:
    async with mock_publisher(inproc) as pub:
        with pytest.raises(SchemaMismatchError, match="event_id"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {"churn": 1}, update_event=True)
        await pub.resolve("bank_churn", "bank_churn")
        # Once resolved, the id column of the event keys the update.
        got = pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"event_id": "e9", "churn": 1}, update_event=True
        )
        assert got == "e9"
        with pytest.raises(SchemaMismatchError, match="'event_id'"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {"churn": 1}, update_event=True)
        assert pub.stats().accepted == 1


async def test_explicit_id_for_a_model_without_id_column(inproc: InProcessFiddler) -> None:
    failures: list[DeliveryFailure] = []
    async with mock_publisher(inproc, on_error=failures.append) as pub:
        # Not resolved yet: accepted, then refused alone when the schema is known.
        pub.publish_event_nowait("p", "noid", {"x": 1}, event_id="e1")
        pub.publish_event_nowait("p", "noid", {"x": 2})
        result = await pub.flush(5)
        assert (result.delivered, result.failed) == (1, 1)
        # Resolved now: refused at the caller, nothing queued.
        with pytest.raises(SchemaMismatchError, match="no event id column"):
            pub.publish_event_nowait("p", "noid", {"x": 3}, event_id="e3")
        with pytest.raises(SchemaMismatchError, match="no event timestamp column"):
            pub.publish_event_nowait("p", "noid", {"x": 3}, event_timestamp=0)
    (failure,) = failures
    assert isinstance(failure.error, SchemaMismatchError)
    assert failure.event_ids == ("e1",)
    assert failure.events() == [{"x": 1}]
    assert inproc.stored("p", "noid") == [{"x": 2}]


async def test_names_are_resolved_once_and_cached(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc, max_batch_events=100) as pub:
        for i in range(1000):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"churn": 1}, event_id="x", update_event=True
        )
        assert (await pub.flush(5)).delivered == 1001
    paths = [r.url.path for r in inproc.lookups()]
    assert paths == ["/v3/projects", "/v3/models", f"/v3/models/{inproc.model_id()}"]
    projects = inproc.lookups()[0]
    assert projects.headers["authorization"] == "Bearer test-token"
    assert len(inproc.event_requests()) == 11


async def test_model_uuid_is_accepted(inproc: InProcessFiddler) -> None:
    """In any of its written forms (upper case, no hyphens), with any project: one model,
    looked up once, as the server writes it."""
    model_id = inproc.model_id()
    async with mock_publisher(inproc) as pub:
        pub.publish_event_nowait("bank_churn", model_id, bank_event())
        pub.publish_event_nowait("other", model_id.upper().replace("-", ""), bank_event())
        assert (await pub.flush(5)).delivered == 2
    assert [r.url.path for r in inproc.lookups()] == [f"/v3/models/{model_id}"]


async def test_a_name_that_is_never_found_keeps_none_of_its_events(
    inproc: InProcessFiddler,
) -> None:
    """A misspelt model, its lookup failing for good again and again: each failure's
    traceback held the lookup before it (a local of that frame held its failure), and so on
    back to the first, each with its batch. Every event sent to the name was kept."""

    async def send_some() -> None:
        for i in range(50):
            pub.publish_event_nowait("bank_churn", "nope", {**bank_event(i), "note": "x" * 500})
        await pub.flush(5)

    async with mock_publisher(inproc, linger=0) as pub:
        for _ in range(3):  # the caches and the logs settle
            await send_some()
        gc.collect()
        tracemalloc.start()
        try:
            for _ in range(20):  # 1000 events
                await send_some()
            gc.collect()
            made_here = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, __file__)]
            )
        finally:
            tracemalloc.stop()
    kept = sum(stat.size for stat in made_here.statistics("filename"))
    assert kept < 200_000  # the last batch may be kept (with its failure): 50 events


async def test_unknown_names_fail_with_not_found(inproc: InProcessFiddler) -> None:
    failures: list[DeliveryFailure] = []
    async with mock_publisher(inproc, on_error=failures.append) as pub:
        with pytest.raises(NotFoundError, match="project 'nope' not found"):
            await pub.resolve("nope", "bank_churn")
        with pytest.raises(NotFoundError, match="model 'nope' not found"):
            await pub.resolve("bank_churn", "nope")
        pub.publish_event_nowait("bank_churn", "nope", {"x": 1})
        result = await pub.flush(5)
    assert result.failed == 1
    assert isinstance(failures[0].error, NotFoundError)
    assert failures[0].model == "nope"


async def test_a_batch_for_an_unknown_model_raises_at_the_caller(inproc: InProcessFiddler) -> None:
    """A lookup refused for good is the batch call's answer, each time; nothing is queued."""
    async with mock_publisher(inproc) as pub:
        for _ in range(2):
            with pytest.raises(NotFoundError, match="model 'nope' not found"):
                await pub.publish_events_batch("bank_churn", "nope", [bank_event(1)])
        assert pub.stats().accepted == 0


async def test_api_error_body_is_parsed_into_the_exception(inproc: InProcessFiddler) -> None:
    failures: list[DeliveryFailure] = []
    async with mock_publisher(inproc, on_error=failures.append) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", {**bank_event(), "age": "x"})
        result = await pub.flush(5)
        stats = pub.stats()
    assert result.failed == 1
    error = failures[0].error
    assert isinstance(error, BadRequestError)
    assert (error.status, error.code) == (400, 400)
    assert "events[0].age: expected int, got str 'x'" in error.message
    assert error.reasons[0].reason == "ValidationError"
    assert "events[0].age" in error.reasons[0].message
    assert stats.responses == {"200": 3, "400": 1}
    assert stats.last_error is not None
    assert "events[0].age" in stats.last_error


def test_error_parsing_without_an_envelope() -> None:
    response = httpx.Response(502, text="<html>bad gateway</html>")
    error = error_from_response(response, response.content)
    assert isinstance(error, ServerError)
    assert error.status == 502
    assert "bad gateway" in error.message
    assert error.reasons == ()

    limited = httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"code": 429}})
    error = error_from_response(limited, limited.content)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 7.0
    assert type(error_from_response(httpx.Response(418), b"")) is APIError


def test_error_parsing_of_a_malformed_envelope() -> None:
    """An envelope whose reasons are not a list, and a body that could not be decoded (None),
    still give the error of the status, never a TypeError."""
    odd = httpx.Response(400, json={"error": {"code": 400, "message": "no", "errors": 3}})
    error = error_from_response(odd, odd.content)
    assert isinstance(error, BadRequestError)
    assert (error.message, error.reasons) == ("no", ())
    undecodable = error_from_response(httpx.Response(401, content=b"\x1f\x8b junk"), None)
    assert isinstance(undecodable, AuthenticationError)
    assert undecodable.message == "Unauthorized"


def test_retry_after_forms() -> None:
    assert parse_retry_after("3.5") == 3.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = parse_retry_after(later)
    assert seconds is not None
    assert 25 <= seconds <= 31
    assert parse_retry_after("-4") == 0.0


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York"])
def test_retry_after_in_asctime_form_is_gmt(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third HTTP date form carries no zone; it is GMT all the same, not local time."""
    later = time.asctime(time.gmtime(time.time() + 30))  # e.g. "Sun Nov  6 08:49:37 1994"
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        seconds = parse_retry_after(later)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert seconds is not None
    assert 25 <= seconds <= 31


async def test_numpy_values_arrive_as_numbers(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        await pub.publish_event(
            "bank_churn",
            "bank_churn",
            {"age": np.int64(41), "balance": np.float32(0.5), "churn": float("nan")},
        )
        await pub.flush(5)
    (event,) = inproc.stored()
    assert (event["age"], event["balance"], event["churn"]) == (41, 0.5, None)


async def test_event_is_captured_at_publish_time(inproc: InProcessFiddler) -> None:
    event: dict[str, Any] = {"age": 40, "tags": ["a"], "nested": {"k": 1}}
    async with mock_publisher(inproc, linger=60) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", event, event_id="e")
        event["age"] = 99
        event["tags"].append("b")
        event["nested"]["k"] = 2
        event["new"] = True
        await anyio.lowlevel.checkpoint()
        await pub.flush(5)
    (stored,) = inproc.stored()
    assert {k: stored[k] for k in ("age", "tags", "nested")} == {
        "age": 40,
        "tags": ["a"],
        "nested": {"k": 1},
    }
    assert "new" not in stored


async def test_pre_production_environment(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", bank_event(), env_type="PRE_PRODUCTION", env_name="train"
        )
        await pub.flush(5)
    sent = body(inproc.event_requests()[0])
    assert (sent["env_type"], sent["env_name"]) == ("PRE_PRODUCTION", "train")


async def test_wait_for_is_not_needed_for_each_publish(inproc: InProcessFiddler) -> None:
    """publish_event returns before anything is sent: the network happens later."""
    async with mock_publisher(inproc, linger=60) as pub:
        await pub.publish_event("bank_churn", "bank_churn", bank_event())
        assert inproc.requests == []
        assert pub.stats().queued_events == 1
        await pub.flush(5)
        await eventually(lambda: pub.stats().delivered == 1)


# httpx leaves its decoding generators to the garbage collector after a DecodingError.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_undecodable_success_body_still_counts_as_delivered(
    inproc: InProcessFiddler,
) -> None:
    transport = inproc.transport()

    async def garble(request: httpx.Request) -> httpx.Response:
        response = await transport.handle_async_request(request)
        if request.url.path != "/v3/events":
            return response
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return httpx.Response(
            response.status_code, headers=headers, stream=httpx.ByteStream(b"not gzip")
        )

    async with fiddler_async.AsyncPublisher(
        "https://fiddler.test",
        "test-token",
        config=fiddler_async.PublisherConfig(),
        transport=httpx.MockTransport(garble),
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        result = await pub.flush(5)
    assert (result.delivered, result.failed) == (1, 0)
    assert len(inproc.stored()) == 1


async def test_an_undecodable_error_body_is_the_error_of_its_status(
    inproc: InProcessFiddler,
) -> None:
    """A refusal whose body cannot be decoded is still a refusal: not retried as a dropped
    connection, and reported with the error of its status."""
    transport = inproc.transport()
    sent: list[str] = []

    async def refuse_garbled(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v3/events":
            return await transport.handle_async_request(request)
        sent.append(request.method)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return httpx.Response(401, headers=headers, stream=httpx.ByteStream(b"not gzip"))

    failures: list[DeliveryFailure] = []
    async with fiddler_async.AsyncPublisher(
        "https://fiddler.test",
        "test-token",
        config=fiddler_async.PublisherConfig(retry_backoff_initial=0.01),
        transport=httpx.MockTransport(refuse_garbled),
        on_error=failures.append,
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        result = await pub.flush(5)
    assert (result.delivered, result.failed, len(sent)) == (0, 1, 1)
    assert isinstance(failures[0].error, AuthenticationError)


async def test_answers_come_uncompressed_or_are_undone_within_a_bound(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requests ask for no compression. A server that compresses anyway is undone up to
    the answer bound (past it, a megabyte of gzip can hold a gigabyte): an events answer past
    it still counts (its 2xx says the events are stored), a lookup's cannot be read."""
    monkeypatch.setattr(fiddler_async.wire, "MAX_ANSWER_BYTES", 10_000)
    transport = inproc.transport()
    asked: list[str | None] = []

    async def compress(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        response = await transport.handle_async_request(request)
        body = await response.aread()
        if request.url.path == "/v3/events":
            body = bytes(20_000)  # inflates past the bound
        elif "bomb" in str(request.url):
            body = bytes(20_000)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        half = len(body) // 2  # in two gzip members, as a server may write it (RFC 1952 2.2)
        stream = httpx.ByteStream(gzip.compress(body[:half]) + gzip.compress(body[half:]))
        return httpx.Response(response.status_code, headers=headers, stream=stream)

    class Unread(httpx.AsyncBaseTransport):  # as a network's: httpx.MockTransport reads it
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await compress(request)

    async with fiddler_async.AsyncPublisher(
        "https://fiddler.test", "test-token", transport=Unread()
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")  # compressed lookups, within the bound
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        assert (await pub.flush(5)).delivered == 1
        with pytest.raises(APIError, match="unexpected answer"):
            await pub.resolve("bank_churn", "bomb")
    assert len(inproc.stored()) == 1
    assert set(asked) == {"identity"}


async def test_the_token_is_blotted_out_of_what_the_server_writes(
    inproc: InProcessFiddler, caplog: pytest.LogCaptureFixture
) -> None:
    """An error page that echoes the request's headers must not carry the token into the
    exception, ``on_error``, the stats or the log."""
    transport = inproc.transport()

    async def echo(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v3/events":
            return await transport.handle_async_request(request)
        headers = f"Authorization: {request.headers['Authorization']}; Host: fiddler.test"
        if request.method == "POST":  # the token across the cut of a long text, at 300
            page = f"<html>{'.' * 253} Your headers: {headers}</html>"  # the token at 296
            return httpx.Response(400, text=page)
        envelope = {"code": 422, "message": headers, "errors": [{"reason": headers}]}
        return httpx.Response(422, json={"error": envelope})

    failures: list[DeliveryFailure] = []
    async with fiddler_async.AsyncPublisher(
        "https://fiddler.test",
        "test-token",
        transport=httpx.MockTransport(echo),
        on_error=failures.append,
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(), event_id="e1")
        await pub.flush(5)
        last_insert_error = pub.stats().last_error
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"churn": "yes"}, event_id="e1", update_event=True
        )
        await pub.flush(5)
        last_update_error = pub.stats().last_error
    assert len(failures) == 2
    assert failures[0].error.message.endswith("Authorization: Bearer [tok")
    assert "Authorization: Bearer [token]" in str(failures[1].error)
    shown = [f.error.message for f in failures] + [r.getMessage() for r in caplog.records]
    shown += [str(last_insert_error), str(last_update_error), repr(failures[1].error.reasons)]
    assert all("Bearer te" not in text for text in shown)


async def test_a_lookup_answer_of_another_shape_is_an_api_error(
    inproc: InProcessFiddler,
) -> None:
    transport = inproc.transport()

    async def odd(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/models":
            return httpx.Response(200, json={"data": {"items": [{"no": "id"}]}})
        return await transport.handle_async_request(request)

    async with fiddler_async.AsyncPublisher(
        "https://fiddler.test", "test-token", transport=httpx.MockTransport(odd)
    ) as pub:
        with pytest.raises(APIError, match="unexpected answer") as raised:
            await pub.resolve("bank_churn", "bank_churn")
    assert raised.value.status == 200


def test_a_short_token_is_blotted_where_it_stands_whole() -> None:
    # A token of a few letters used to be cut out of every word: "[token]oken".
    envelope = {"code": 401, "message": "invalid bearer token (Authorization: Bearer tok)"}
    body = json.dumps({"error": envelope}).encode()
    error = error_from_response(httpx.Response(401), body, "tok")
    assert error.message == "invalid bearer token (Authorization: Bearer [token])"
    # Quoted with punctuation around it, a token is blotted all the same.
    secret = "fdl_9f8e7d6c.5b4a-x"
    for said in (f"token={secret} is not valid.", f"?access_token={secret}&", f"bad {secret}."):
        body = json.dumps({"error": {"code": 401, "message": said}}).encode()
        assert secret not in error_from_response(httpx.Response(401), body, secret).message


def test_a_status_past_599_is_no_server_error() -> None:
    error = error_from_response(httpx.Response(999), b"")
    assert type(error) is APIError
    assert not is_retryable(error)


async def test_an_impossible_timestamp_is_refused_at_the_caller(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "m")  # strftime format: a year 10000 would not format
        for events in ([{"x": 1}], [{"x": 2}, {"x": 3}]):
            with pytest.raises(fiddler_async.EventError, match="between years 1 and 9999"):
                pub.publish_event_nowait("p", "m", events[0], event_timestamp=10**18)
            with pytest.raises(fiddler_async.EventBatchError) as info:
                await pub.publish_events_batch(
                    "p", "m", events, event_timestamps=[10**18] * len(events)
                )
            assert sorted(info.value.errors) == list(range(len(events)))
        assert pub.stats().accepted == 0


async def test_epoch_seconds_are_refused_at_the_caller_not_filed_in_1970(
    inproc: InProcessFiddler,
) -> None:
    seconds = [1_764_370_000, 1_764_370_000.25, np.int64(1_764_370_000)]  # time.time()'s kind
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "m")
        for when in seconds:
            with pytest.raises(fiddler_async.EventError, match="looks like epoch seconds"):
                pub.publish_event_nowait("p", "m", {"x": 1}, event_timestamp=when)
            with pytest.raises(fiddler_async.EventError, match=r"2025-11-28.*1970-01-21"):
                await pub.publish_event("p", "m", {"x": 1}, event_id="e", event_timestamp=when)
        with pytest.raises(fiddler_async.EventBatchError) as info:
            await pub.publish_events_batch(
                "p", "m", [{"x": 1}, {"x": 2}], event_timestamps=[1_764_370_000_000, seconds[0]]
            )
        assert list(info.value.errors) == [1]
        assert pub.stats().accepted == 0
        # Milliseconds, and the first day of 1970 (a test's small numbers), go as given.
        for when in (1_764_370_000_000, 5):
            pub.publish_event_nowait("p", "m", {"x": when}, event_timestamp=when)
        assert (await pub.flush(5)).delivered == 2
    assert [event["at"][:10] for event in inproc.stored("p", "m")] == ["2025-11-28", "1970-01-01"]


async def test_a_year_before_1000_is_written_as_the_time_format_reads_it(
    inproc: InProcessFiddler,
) -> None:
    early = (dt.datetime(999, 12, 31, 23, 59, 59), dt.date(1, 1, 1))
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "m")  # "%Y-%m-%d %H:%M:%S"
        for x, when in enumerate(early):
            pub.publish_event_nowait("p", "m", {"x": x}, event_timestamp=when)
        assert (await pub.flush(5)).delivered == 2
    times = [event["at"] for event in inproc.stored("p", "m")]
    assert times == ["0999-12-31 23:59:59", "0001-01-01 00:00:00"]
    for text in times:  # as the model's own format reads it
        dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


async def test_a_model_is_looked_up_at_its_first_event(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc, linger=3600) as pub:
        first = pub.publish_event_nowait("bank_churn", "bank_churn", {"event_id": "own-1"})
        # No batch is sent (linger), but the lookup starts at once...
        await eventually(lambda: len(inproc.lookups()) == 3)
        assert inproc.event_requests() == []
        # ...so from then on an id the event carries is the id returned.
        second = pub.publish_event_nowait("bank_churn", "bank_churn", {"event_id": "own-2"})
        assert second == "own-2"
        await pub.flush(5)
    # The first event kept its own id; the one returned for it was made up before the lookup.
    assert [e["event_id"] for e in inproc.stored()] == ["own-1", "own-2"]
    assert first != "own-1"


async def test_a_first_batch_returns_the_ids_its_events_carry(inproc: InProcessFiddler) -> None:
    frame = pd.DataFrame({"event_id": ["a", "b"], "age": [1, 2]})
    async with mock_publisher(inproc) as pub:
        assert await pub.publish_events_batch("bank_churn", "bank_churn", frame) == ["a", "b"]


async def test_the_last_error_names_a_failure_that_never_reached_http(
    inproc: InProcessFiddler,
) -> None:
    async with mock_publisher(inproc) as pub:
        pub.publish_event_nowait("nope", "bank_churn", {"age": 1})
        assert (await pub.flush(5)).failed == 1
        assert pub.stats().last_error == "NotFoundError: HTTP 404: project 'nope' not found"


def test_an_error_with_many_reasons_stays_one_short_line() -> None:
    reasons = [fiddler_async.ErrorReason("ValidationError", f"events[{i}].age") for i in range(50)]
    text = str(BadRequestError("50 invalid values", status=400, reasons=reasons))
    assert text == (
        "HTTP 400: 50 invalid values (ValidationError: events[0].age; "
        "ValidationError: events[1].age; ValidationError: events[2].age; and 47 more)"
    )
