"""The emulator as a server: Fiddler's v3 envelopes, lookups, validation, storage, faults."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from fiddler_async import AsyncPublisher
from fiddler_async.emulator import (
    Emulator,
    Faults,
    Store,
    emulator,
    load_catalog,
    running_emulator,
)
from fiddler_async.emulator import app as app_module
from fiddler_async.emulator.server import ListenError, _listeners, serve_forever

from .in_process import MODELS, TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(fiddler: Emulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fiddler.url, headers=AUTH) as client:
        yield client


def name_filter(**equals: str) -> str:
    rules = [{"field": f, "operator": "equal", "value": v} for f, v in equals.items()]
    return json.dumps({"condition": "AND", "rules": rules})


def publish(client: httpx.Client, model_id: str, events: list[Any], **extra: Any) -> httpx.Response:
    method = extra.pop("method", "POST")
    body = {"source": {"type": "EVENTS", "events": events}, "model_id": model_id, **extra}
    return client.request(method, "/v3/events", json={"env_type": "PRODUCTION", **body})


def test_connecting(client: httpx.Client) -> None:
    info = client.get("/v3/server-info").json()
    assert info["kind"] == "NORMAL"
    assert info["api_version"] == "3.0"
    assert set(info["data"]) == {"feature_flags", "server_version", "organization"}
    compat = client.get("/v3/version-compatibility", params={"client_version": "3.14.1"})
    assert compat.status_code == 200


def test_lookups_with_the_filter_syntax(client: httpx.Client, fiddler: Emulator) -> None:
    projects = client.get("/v3/projects", params={"filter": name_filter(name="bank_churn")}).json()
    assert projects["kind"] == "PAGINATED"
    page = projects["data"]
    assert {"page_size", "total", "item_count", "page_count", "page_index", "offset"} <= set(page)
    assert page["total"] == 1
    project_id = page["items"][0]["id"]
    nothing = client.get("/v3/projects", params={"filter": name_filter(name="nope")}).json()
    assert nothing["data"]["total"] == 0

    wanted = name_filter(name="bank_churn_v2", project_id=project_id)
    models = client.get("/v3/models", params={"filter": wanted, "limit": 1}).json()["data"]
    assert [m["name"] for m in models["items"]] == ["bank_churn_v2"]
    either = {
        "condition": "OR",
        "rules": [
            {"field": "name", "operator": "equal", "value": "m"},
            {"field": "name", "operator": "equal", "value": "noid"},
        ],
    }
    found = client.get("/v3/models", params={"filter": json.dumps(either)}).json()["data"]
    assert sorted(m["name"] for m in found["items"]) == ["m", "noid"]

    detail = client.get(f"/v3/models/{fiddler.model().id}").json()["data"]
    assert (detail["event_id_col"], detail["event_ts_col"]) == ("event_id", "timestamp")
    assert detail["project"] == {"id": project_id, "name": "bank_churn"}
    age = {"name": "age", "data_type": "int", "min": None, "max": None, "categories": None}
    assert age in detail["schema"]["columns"]  # every column field of the protocol
    assert "age" in detail["spec"]["inputs"]
    assert detail["spec"]["custom_features"] == []  # every spec key of the protocol


def test_errors_use_fiddlers_envelope(client: httpx.Client, fiddler: Emulator) -> None:
    missing = client.get("/v3/models/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    body = missing.json()
    assert body["kind"] == "ERROR"
    assert set(body["error"]) == {"code", "message", "errors"}
    assert set(body["error"]["errors"][0]) == {"reason", "message", "help"}

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.get(f"{fiddler.url}/v3/server-info", headers=headers)
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == 401


def test_publishing_validates_and_stores(client: httpx.Client, fiddler: Emulator) -> None:
    model_id = fiddler.model().id
    ok = publish(client, model_id, [{"event_id": "a", "age": 40}, {"event_id": "b", "age": 41}])
    assert ok.status_code == 202
    assert ok.json()["data"] == {"source_type": "EVENTS", "event_ids": ["a", "b"]}

    integral = publish(client, model_id, [{"event_id": "c", "age": 42.0}])  # a pandas int + NaN
    assert integral.status_code == 202
    # Events without an id get one from the server, as Fiddler assigns them: a new random UUID.
    mixed = publish(client, model_id, [{"age": 1}, {"event_id": "d", "age": 2}, {"age": 3}])
    first, given, third = mixed.json()["data"]["event_ids"]
    assert given == "d"
    assert first != third
    for assigned in (first, third):
        assert uuid.UUID(assigned).version == 4
        assert str(uuid.UUID(assigned)) == assigned
    bad = publish(client, model_id, [{"age": 1}, {"age": "x"}, {"balance": True}, {"age": 4.5}])
    assert bad.status_code == 400
    reasons = [e["message"] for e in bad.json()["error"]["errors"]]
    assert reasons == [
        "events[1].age: expected int, got str 'x'",
        "events[2].balance: expected float, got bool True",
        "events[3].age: expected int, got float 4.5",
    ]
    # A time: epoch ms, or text that reads as one (ISO 8601); not a repr, not a bool.
    times = [1700000000000, "2024-01-02 03:04:05.678000", "2024-01-02T03:04:05+05:30"]
    timed = [{"event_id": f"t{i}", "timestamp": value} for i, value in enumerate(times)]
    assert publish(client, model_id, timed).status_code == 202
    untimed = [{"timestamp": "<built-in method now>"}, {"timestamp": True}, {"timestamp": "soon"}]
    untimed += [{"timestamp": "2024-02-30"}, {"timestamp": 1704067200}]
    reasons = [e["message"] for e in publish(client, model_id, untimed).json()["error"]["errors"]]
    assert reasons == [
        "events[0].timestamp: expected a time, got str '<built-in method now>'",
        "events[1].timestamp: expected a time, got bool True",
        "events[2].timestamp: expected a time, got str 'soon'",
        "events[3].timestamp: expected a time, got str '2024-02-30'",
        "events[4].timestamp: 1704067200 looks like epoch seconds; the model's times are epoch "
        "milliseconds",
    ]
    assert publish(client, model_id, [{"age": 1}] * 1001).status_code == 400
    assert publish(client, model_id, []).status_code == 400
    assert publish(client, "not-a-model", [{"age": 1}]).status_code == 404
    assert publish(client, model_id, [{"age": 1}], env_type="STAGING").status_code == 400
    assert publish(client, model_id, [{"age": 1}], env_type="PRE_PRODUCTION").status_code == 400
    no_id = publish(client, model_id, [{"churn": "yes"}], method="PATCH")
    assert no_id.status_code == 400
    assert fiddler.count() == 9  # nothing of the refused requests was stored


def test_updates_merge_and_duplicates_are_counted(client: httpx.Client, fiddler: Emulator) -> None:
    model_id = fiddler.model().id
    publish(client, model_id, [{"event_id": "late", "churn": "yes"}], method="PATCH")
    # An update of no event yet is kept, but is no event: it cannot stand in for a lost insert.
    assert (fiddler.count(), fiddler.events()) == (0, [])
    assert fiddler.pending_updates() == [{"event_id": "late", "churn": "yes"}]
    publish(client, model_id, [{"event_id": "a", "age": 40}, {"event_id": "late", "age": 50}])
    assert fiddler.pending_updates() == []
    publish(client, model_id, [{"event_id": "a", "churn": "no"}], method="PATCH")
    publish(client, model_id, [{"event_id": "a", "age": 40}])  # a duplicate insert
    assert fiddler.events() == [
        {"event_id": "late", "age": 50, "churn": "yes"},
        {"event_id": "a", "age": 40, "churn": "no"},
        {"event_id": "a", "age": 40},
    ]
    assert fiddler.early_updates() == 1
    assert fiddler.duplicates() == {"a": 2}
    summary = client.get("/_emulator/summary").json()
    bank = next(m for m in summary["models"] if m["model"] == "bank_churn")
    assert (bank["events"], bank["distinct_ids"], bank["duplicates"]) == (3, 2, 1)


def test_events_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with running_emulator(db=db) as first:
        model_id = first.model().id
        with httpx.Client(
            base_url=first.url, headers={"Authorization": f"Bearer {first.token}"}
        ) as c:
            assert publish(c, model_id, [{"event_id": "kept", "age": 3}]).status_code == 202
    with running_emulator(db=db) as second:
        assert second.model().id == model_id  # ids derive from names: stable across restarts
        assert second.events() == [{"event_id": "kept", "age": 3}]


def job_when_done(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """A job runs after its publish request is answered (pending until then), as Fiddler's."""
    deadline = time.monotonic() + 30
    while (job := client.get(f"/v3/jobs/{job_id}").json()["data"])["status"] == "PENDING":
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.01)
    return dict(job)


def test_file_upload_publish_job(client: httpx.Client, fiddler: Emulator) -> None:
    model_id = fiddler.model().id
    csv = b"event_id,age,balance,geography\nf1,40,10.5,France\nf2,41,,Spain\n"
    upload = client.post("/v3/files/upload", files={"file": ("events.csv", csv)})
    assert upload.status_code == 200
    file_id = upload.json()["data"]["id"]
    started = client.post(
        "/v3/events",
        json={"source": {"type": "FILE", "file_id": file_id}, "model_id": model_id,
              "env_type": "PRODUCTION", "env_name": None},
    )  # fmt: skip
    assert started.status_code == 202
    job = started.json()["data"]
    assert job["source_type"] == "FILE"
    status = job_when_done(client, job["job"]["id"])
    assert (status["status"], status["progress"]) == ("SUCCESS", 100.0)
    assert fiddler.events() == [
        {"event_id": "f1", "age": 40, "balance": 10.5, "geography": "France"},
        {"event_id": "f2", "age": 41, "balance": None, "geography": "Spain"},
    ]
    bad = client.post("/v3/files/upload", files={"file": ("bad.csv", b"event_id,age\nx,old\n")})
    failed = client.post(
        "/v3/events",
        json={"source": {"type": "FILE", "file_id": bad.json()["data"]["id"]},
              "model_id": model_id, "env_type": "PRODUCTION"},
    ).json()["data"]  # fmt: skip
    status = job_when_done(client, failed["job"]["id"])
    assert status["status"] == "FAILURE"
    assert "line 2, column 'age'" in status["error_message"]


def test_faults_set_at_start_and_changed_while_running(
    client: httpx.Client, fiddler: Emulator
) -> None:
    model_id = fiddler.model().id
    event = [{"event_id": "x", "age": 1}]
    client.put("/_emulator/faults", json={"error_503": 1.0, "retry_after": 2})
    refused = publish(client, model_id, event)
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "2")
    client.put("/_emulator/faults", json={"error_503": 0, "error_429": 1.0})
    assert publish(client, model_id, event).status_code == 429
    client.put("/_emulator/faults", json={"error_429": 0, "max_body_bytes": 50})
    assert publish(client, model_id, event * 5).status_code == 413
    client.put("/_emulator/faults", json={"max_body_bytes": 0, "outage_seconds": 60})
    assert client.get("/v3/server-info").status_code == 503  # an outage stops everything
    client.put("/_emulator/faults", json={"outage_seconds": 0, "script": ["drop", "502"]})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # a reset, or cut short
        publish(client, model_id, event)
    assert publish(client, model_id, event).status_code == 502
    assert publish(client, model_id, event).status_code == 202
    assert client.put("/_emulator/faults", json={"nonsense": 1}).status_code == 400
    assert fiddler.count() == 1
    log = client.get("/_emulator/requests").json()["requests"]
    assert all("authorization" not in r["headers"] for r in log)
    assert [r["status"] for r in log if r["path"] == "/v3/events"] == [
        503, 429, 413, "drop", 502, 202,
    ]  # fmt: skip


def test_fractions_are_drawn_from_the_seed() -> None:
    def statuses() -> list[int]:
        with running_emulator() as em:
            em.set_faults(error_503=0.3, error_429=0.2, seed=42)
            with httpx.Client(
                base_url=em.url, headers={"Authorization": f"Bearer {em.token}"}
            ) as c:
                return [publish(c, em.model().id, [{"age": 1}]).status_code for _ in range(40)]

    first = statuses()
    assert first == statuses()
    assert {202, 429, 503} == set(first)


def test_a_models_file(tmp_path: Path) -> None:
    catalog = load_catalog(MODELS)
    assert [m.name for m in catalog.models] == [
        *("bank_churn", "bank_churn_v2", "m", "noid", "loose", "idonly")
    ]
    broken = tmp_path / "models.toml"
    broken.write_text('[[models]]\nproject = "p"\nname = "m"\n[models.columns]\nx = "complex"\n')
    with pytest.raises(ValueError, match="column 'x' has unknown type 'complex'"):
        load_catalog(broken)
    broken.write_text('[[models]]\nproject = "p"\nname = "m"\nevent_id_col = "id"\n'
                      '[models.columns]\nx = "int"\n')  # fmt: skip
    with pytest.raises(ValueError, match="event_id_col 'id' is not a column"):
        load_catalog(broken)
    # Tables of the wrong shape: said as such (the command line shows it), not a traceback.
    head = '[[models]]\nproject = "p"\nname = "m"\n'
    for text, said in (
        ('[models]\nproject = "p"\n', "each model is a [[models]] table"),
        ("models = [1]\n", "each model is a [[models]] table"),
        (head + 'columns = ["x"]\n', "[columns] must be a table"),
        (head + 'spec = "x"\n[models.columns]\nx = "int"\n', "[spec] must be a table"),
        (head + '[models.spec]\ninputs = [["x"]]\n[models.columns]\nx = "int"\n', "[spec] must"),
        ('[[models]]\nproject = "p"\nname = ["m"]\n[models.columns]\nx = "int"\n', "name must be"),
        (head + 'event_id_col = ["x"]\n[models.columns]\nx = "int"\n', "event_id_col must be"),
    ):
        broken.write_text(text)
        with pytest.raises(ValueError, match=re.escape(said)):
            load_catalog(broken)


@pytest.mark.anyio
async def test_the_async_context_manager(anyio_backend: str) -> None:
    async with emulator() as fiddler:
        async with AsyncPublisher(fiddler.url, fiddler.token) as pub:
            pub.publish_event_nowait("bank_churn", "bank_churn", {"age": 5})
        assert fiddler.count() == 1
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_the_pytest_fixture(fiddler_emulator: Emulator) -> None:
    async with AsyncPublisher(fiddler_emulator.url, fiddler_emulator.token) as pub:
        await pub.publish_events_batch("bank_churn", "bank_churn", [{"age": i} for i in range(3)])
    assert [e["age"] for e in fiddler_emulator.events()] == [0, 1, 2]


def test_every_error_is_in_the_envelope(client: httpx.Client) -> None:
    for response in (
        client.get("/v3/projects", params={"filter": "{not json"}),
        client.get(
            "/v3/projects", params={"filter": json.dumps({"rules": [{"operator": "like"}]})}
        ),
        client.get("/v3/projects", params={"limit": "abc"}),
        client.get("/v3/events"),
        client.get("/v3/nosuch"),
        client.put("/_emulator/faults", json=["x"]),
    ):
        assert response.status_code in (400, 404, 405), response.text
        assert response.json()["kind"] == "ERROR"
        assert response.json()["error"]["code"] == response.status_code


def test_updates_and_duplicates_keep_to_their_environment(
    client: httpx.Client, fiddler: Emulator
) -> None:
    model_id = fiddler.model().id
    baseline = {"env_type": "PRE_PRODUCTION", "env_name": "baseline"}
    publish(client, model_id, [{"event_id": "x", "age": 1}])
    publish(client, model_id, [{"event_id": "x", "age": 2}], **baseline)
    publish(client, model_id, [{"event_id": "x", "churn": "yes"}], method="PATCH")
    assert fiddler.events() == [
        {"event_id": "x", "age": 1, "churn": "yes"},
        {"event_id": "x", "age": 2},
    ]
    assert fiddler.duplicates() == {}  # one event in each environment
    # Two updates of one id in one request, before its event: the last value wins, once.
    publish(
        client,
        model_id,
        [{"event_id": "b", "churn": "yes"}, {"event_id": "b", "churn": "no"}],
        method="PATCH",
    )
    publish(client, model_id, [{"event_id": "b", "age": 3}])
    assert fiddler.events()[-1] == {"event_id": "b", "churn": "no", "age": 3}
    assert fiddler.count() == 3


def test_faults_are_checked_before_any_applies(client: httpx.Client, fiddler: Emulator) -> None:
    for bad in (
        {"script": "503"},
        {"script": ["200"]},
        {"error_503": 1.5},
        {"latency": -1},
        {"latency": "nan"},
    ):
        answer = client.put("/_emulator/faults", json={"error_429": 0.5, **bad})
        assert answer.status_code == 400, bad
    assert client.get("/_emulator/faults").json()["error_429"] == 0
    # Faults made directly (and the serve command's flags) are checked alike.
    for bad in ({"error_503": 7.0}, {"retry_after": -3.0}, {"latency": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Faults(**bad)


def test_a_dropped_connection_sends_nothing(fiddler: Emulator) -> None:
    """Not even a status line: a client reading only the status would take it for success."""
    fiddler.set_faults(script=["drop"])
    body = json.dumps(
        {"source": {"type": "EVENTS", "events": [{"age": 1}]}, "model_id": fiddler.model().id}
    ).encode()
    host, port = httpx.URL(fiddler.url).host, httpx.URL(fiddler.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /v3/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == b""
    assert fiddler.count() == 0


def test_bodies_env_names_and_files_are_checked(
    client: httpx.Client, fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = fiddler.model().id
    # The body limit holds for a chunked body too (its length is not announced).
    fiddler.set_faults(max_body_bytes=1000)
    events = [{"event_id": f"c{i}", "age": i} for i in range(100)]
    payload = {"source": {"type": "EVENTS", "events": events}, "model_id": model_id}
    chunked = client.post("/v3/events", content=iter([json.dumps(payload).encode()]))
    assert chunked.status_code == 413
    fiddler.set_faults(max_body_bytes=0)
    # env_name: text or null; a production event's is not a separate environment.
    assert publish(client, model_id, [{"age": 1}], env_name={"x": 1}).status_code == 400
    assert publish(client, model_id, [{"event_id": "n", "age": 1}], env_name="prod").is_success
    publish(client, model_id, [{"event_id": "n", "churn": "yes"}], method="PATCH")
    assert fiddler.events() == [{"event_id": "n", "age": 1, "churn": "yes"}]
    # A file Fiddler takes only in parts is refused, not kept.
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 100)
    upload = client.post("/v3/files/upload", files={"file": ("big.csv", b"a,b\n" * 40)})
    assert upload.status_code == 413
    assert "multipart-init" in upload.json()["error"]["message"]


def test_a_lost_answer_is_stored_and_retried_into_a_duplicate(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["lose"])

    async def main() -> None:
        async with AsyncPublisher(fiddler.url, TOKEN) as pub:
            pub.publish_event_nowait("bank_churn", "bank_churn", {"event_id": "l1", "age": 1})
            assert (await pub.flush(10)).delivered == 1

    anyio.run(main)
    assert fiddler.duplicates() == {"l1": 2}  # stored, answer lost, retried, stored again
    assert [r["status"] for r in fiddler.requests() if r["path"] == "/v3/events"] == ["lose", 202]


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/batch", {"batch": [{"event": "a"}, {"event": "b"}]}, "segment"),
        ("/batch/", {"api_key": "k", "batch": [{"event": "a"}]}, "posthog"),
        ("/1/batch/bench", [{"data": {"a": 1}}, {"data": {"a": 2}}, {"data": {}}], "libhoney"),
    ],
)
def test_the_benchmark_peers_doors_count_events(
    fiddler: Emulator, path: str, body: Any, expected: str
) -> None:
    """The benchmark's sink takes each peer library's batches (gzipped or not) and counts
    their events; no credentials are checked there."""
    data = json.dumps(body).encode()
    count = len(body) if isinstance(body, list) else len(body["batch"])
    plain = httpx.post(fiddler.url + path, content=data)
    zipped = httpx.post(
        fiddler.url + path, content=gzip.compress(data), headers={"Content-Encoding": "gzip"}
    )
    assert plain.status_code == zipped.status_code == 200
    if expected == "libhoney":
        assert plain.json() == [{"status": 202}] * count
    summary = httpx.get(
        fiddler.url + "/_emulator/summary", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    assert summary["peers"] == {expected: 2 * count}


def test_a_client_gone_mid_request_is_not_logged_as_an_error(
    fiddler: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A publisher cancels a request at its close deadline; a slow emulator reads the body
    after the client left. That is no error of the emulator's (no traceback), as an injected
    dropped connection is not."""
    fiddler.set_faults(latency=0.3)  # before the body is read
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{fiddler.url}/v3/events", content=b"{}", headers=headers, timeout=0.05)
        time.sleep(1.0)  # the emulator's handler, which only then finds the client gone
        assert fiddler.requests()[-1]["path"] == "/v3/events"
    assert not caplog.records


def test_the_emulators_sockets_accept_connections_with_nagle_off() -> None:
    """The sockets the emulator listens on (running_emulator, serve) name TCP, so that asyncio,
    under uvicorn, sets TCP_NODELAY on each connection they accept: with Nagle's algorithm on,
    a benchmark's client spent a third more CPU per event."""
    nodelay: list[int] = []

    async def accept_one() -> None:
        accepted = asyncio.Event()

        class Record(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                accepted.set()

        [listener] = _listeners("127.0.0.1", 0)
        with listener as sock:
            server = await asyncio.get_running_loop().create_server(Record, sock=sock)
            async with server:
                _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
                await asyncio.wait_for(accepted.wait(), 10)
                writer.close()

    asyncio.run(accept_one())
    assert [bool(flag) for flag in nodelay] == [True]  # on, whatever the platform's value


@pytest.mark.parametrize("host", ["localhost", ""])
def test_the_emulator_listens_on_every_address_of_its_host_on_one_port(host: str) -> None:
    # localhost: 127.0.0.1 and ::1 where the machine has both; "": every interface, IPv4 and
    # IPv6 (as asyncio would listen)
    flags = socket.AI_PASSIVE
    found = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=flags)
    expected = {info[4][0] for info in found}
    sockets = _listeners(host, 0)
    try:
        assert {sock.getsockname()[0] for sock in sockets} == expected
        assert len({sock.getsockname()[1] for sock in sockets}) == 1  # port 0: one free port
        with pytest.raises(ListenError, match=rf"cannot listen on {host}:\d+: "):
            _listeners(host, sockets[0].getsockname()[1])  # taken
    finally:
        for sock in sockets:
            sock.close()


def test_serve_announces_its_url_only_once_it_listens() -> None:
    class Connected(Exception):
        pass

    def listening(url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        socket.create_connection((host, int(port)), timeout=5).close()  # refused if not yet
        raise Connected(url)  # and so, stop serving

    with pytest.raises(Connected, match=r"^http://127\.0\.0\.1:\d+$"):
        serve_forever(port=0, listening=listening)


@pytest.fixture
def held_jobs(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """File jobs wait, reading their file, until the event returned is set."""
    release = threading.Event()
    read_rows = app_module._file_rows

    def held_rows(*args: Any) -> Any:
        assert release.wait(30)
        return read_rows(*args)

    monkeypatch.setattr(app_module, "_file_rows", held_rows)
    return release


def test_a_file_job_still_running_when_the_emulator_stops_ends_all_the_same(
    tmp_path: Path, held_jobs: threading.Event
) -> None:
    """Past the server's grace for its tasks (2 s), the job's thread goes on: the store waits
    for it before closing, so the job ends, and is not left pending in the file."""
    db = tmp_path / "jobs.db"
    with (
        running_emulator(db=db, token=TOKEN) as fiddler,
        httpx.Client(base_url=fiddler.url, headers=AUTH) as client,
    ):
        upload = client.post("/v3/files/upload", files={"file": ("e.csv", b"event_id,age\nk,4\n")})
        job_id = client.post(
            "/v3/events",
            json={"source": {"type": "FILE", "file_id": upload.json()["data"]["id"]},
                  "model_id": fiddler.model().id, "env_type": "PRODUCTION"},
        ).json()["data"]["job"]["id"]  # fmt: skip
        threading.Timer(2.5, held_jobs.set).start()  # the server stops meanwhile
    store = Store(str(db), read_only=True)
    try:
        job = store.job(job_id)
        assert job is not None
        assert (job["status"], store.count()) == ("SUCCESS", 1)
    finally:
        store.close()


def test_a_file_job_runs_after_its_answer_and_the_emulator_goes_on_answering(
    client: httpx.Client, fiddler: Emulator, held_jobs: threading.Event
) -> None:
    upload = client.post("/v3/files/upload", files={"file": ("e.csv", b"event_id,age\nj1,40\n")})
    started = client.post(
        "/v3/events",
        json={"source": {"type": "FILE", "file_id": upload.json()["data"]["id"]},
              "model_id": fiddler.model().id, "env_type": "PRODUCTION"},
    )  # fmt: skip
    job_id = started.json()["data"]["job"]["id"]
    assert started.status_code == 202
    assert client.get(f"/v3/jobs/{job_id}").json()["data"]["status"] == "PENDING"
    assert client.get("/v3/server-info").status_code == 200  # not held by the job
    held_jobs.set()
    assert job_when_done(client, job_id)["status"] == "SUCCESS"
    assert fiddler.events() == [{"event_id": "j1", "age": 40}]


def test_a_count_only_emulator_counts_events_and_answers_their_ids() -> None:
    """The benchmark's sink reads only each event's id: it answers the ids (the event's own,
    or new UUIDs), counts new events (not updates), and leaves what is not a list of events
    to the full way, which refuses it as a full emulator does."""
    with running_emulator(count_only=True, models=MODELS, token=TOKEN) as em:

        def publish(model: str, events: Any, method: str = "POST") -> httpx.Response:
            body = {"model_id": em.model("p", model).id, "source": {"type": "EVENTS"}}
            body["source"]["events"] = events
            return httpx.request(method, f"{em.url}/v3/events", json=body, headers=AUTH)

        answer = publish("m", [{"row_id": "a", "x": {"deep": [1]}}, {"x": 2}, {"row_id": 7}])
        assert answer.status_code == 202
        logged = em.requests()[-1]
        assert (logged["model"], logged["env_type"], logged["events"]) == ("m", "PRODUCTION", 3)
        ids = answer.json()["data"]["event_ids"]
        assert (ids[0], ids[2], uuid.UUID(ids[1]).version) == ("a", "7", 4)
        new = publish("noid", [{"x": 1}, {"x": 2}]).json()["data"]["event_ids"]
        assert len({uuid.UUID(text) for text in new}) == 2
        assert publish("m", [{"row_id": "a", "y": 1}], "PATCH").status_code == 202
        assert publish("m", [{"y": 1}], "PATCH").status_code == 400  # keyed by nothing
        assert (em.count("p", "m"), em.count("p", "noid")) == (3, 2)  # the update: not one
        for events in ([], [1, 2], "x", [{"row_id": "r"}] * 1001):
            assert publish("m", events).status_code == 400
        assert publish("noid", [1, "x", None]).status_code == 400  # no id to read: objects
        for env in ({"env_type": "STAGING"}, {"env_type": "PRE_PRODUCTION"}, {"env_name": 5}):
            body = {"model_id": em.model("p", "m").id, **env}
            body["source"] = {"type": "EVENTS", "events": [{"row_id": "e"}]}
            wrong = httpx.post(f"{em.url}/v3/events", json=body, headers=AUTH)
            assert wrong.status_code == 400, env
        unknown = {"model_id": str(uuid.uuid4()), "source": {"type": "EVENTS", "events": [{}]}}
        missing = httpx.post(f"{em.url}/v3/events", json=unknown, headers=AUTH)
        assert missing.status_code == 404
        assert em.count() == 5
