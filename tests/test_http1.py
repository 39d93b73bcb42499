"""fiddler_async.http1, the publisher's HTTP/1.1 transport, against real loopback servers: a
strict one that reads each request with h11 (a malformed request fails the test) and answers
with scripted bytes, one over TLS, and the emulator over HTTP and HTTPS."""

from __future__ import annotations

import os
import random
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import httpx
import pytest
import trustme
from anyio.streams.tls import TLSListener

from fiddler_async import AsyncPublisher, ConfigurationError
from fiddler_async.emulator import running_emulator
from fiddler_async.http1 import (
    BROKEN_BODY,
    HEAD_IS_ENOUGH,
    MAX_HEAD_BYTES,
    HTTP1Transport,
    transport_for,
)

from .conftest import MODELS, TOKEN, bank_event, config, eventually

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HANG = "hang"  # read the request, never answer
DROP = "drop"  # read the request, close without answering
SHORT = {"pool": 5.0, "connect": 5.0, "read": 5.0, "write": 5.0}


PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def no_proxy_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own proxy settings would hand the publisher's requests to httpx."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


class Close(bytes):
    """An answer after which the server closes the connection (saying nothing about it)."""


class StrictServer:
    """Answers the requests it reads, in turn, with ``answers``: bytes (sent in ``pieces``
    writes), ``Close`` bytes, a list of bytes (one write each: over TLS, one record each),
    ``HANG`` or ``DROP``."""

    def __init__(self, *answers: bytes | str | list[bytes], pieces: int = 1) -> None:
        self.answers = list(answers)
        self.pieces = pieces
        self.connections = 0
        self.open_connections = 0
        self.answered = 0  # answers sent whole
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.url = ""

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            async with stream:
                while (received := await _read_request(stream)) is not None:
                    self.requests.append(received)
                    answer = self.answers.pop(0)
                    if answer == HANG:
                        await anyio.sleep_forever()
                    if answer == DROP:
                        return
                    for piece in (
                        answer if isinstance(answer, list) else _split(answer, self.pieces)
                    ):
                        await stream.send(piece)
                    self.answered += 1
                    if isinstance(answer, Close):
                        return
        finally:
            self.open_connections -= 1


async def _read_request(stream: anyio.abc.ByteStream) -> tuple[h11.Request, bytes] | None:
    """One request, parsed by h11; None when the client closed the connection."""
    connection = h11.Connection(h11.SERVER)
    request, body = None, b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                connection.receive_data(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                connection.receive_data(b"")
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            assert request is None, "the client closed the connection in mid-request"
            return None


def _split(data: bytes, pieces: int) -> list[bytes]:
    if pieces == 1 or len(data) < 2:
        return [data]
    cuts = sorted(random.Random(len(data)).sample(range(1, len(data)), min(pieces, len(data)) - 1))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@asynccontextmanager
async def serving(
    server: StrictServer, tls: ssl.SSLContext | None = None
) -> AsyncIterator[StrictServer]:
    listener: anyio.abc.Listener[Any] = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    scheme = "http"
    if tls is not None:
        listener, scheme = TLSListener(listener, tls, standard_compatible=False), "https"
    server.url = f"{scheme}://127.0.0.1:{port}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


async def send(
    transport: HTTP1Transport, url: str, method: str = "POST", **options: Any
) -> httpx.Response:
    timeout = options.pop("timeout", SHORT)
    request = httpx.Request(method, url, extensions={"timeout": timeout}, **options)
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


# What goes out


async def test_requests_arrive_whole_over_one_kept_connection() -> None:
    big = bytes(random.Random(1).randrange(256) for _ in range(300_000))  # above the join size
    async with serving(StrictServer(OK, OK, OK)) as server:
        transport = HTTP1Transport()
        answers = [
            await send(transport, server.url + "/v3/events?x=1", content=b'{"a":1}'),
            await send(transport, server.url + "/upload", content=big),
            await send(transport, server.url + "/v3/models", "GET", headers={"X-Token": "t"}),
        ]
        await transport.aclose()
    assert [(a.status_code, a.content, a.http_version) for a in answers] == [
        (200, b"ok", "HTTP/1.1")
    ] * 3
    assert server.connections == 1
    (first, body1), (second, body2), (third, body3) = server.requests
    assert (first.method, first.target, body1) == (b"POST", b"/v3/events?x=1", b'{"a":1}')
    assert (second.target, body2) == (b"/upload", big)
    assert (third.method, body3) == (b"GET", b"")
    assert (b"host", f"127.0.0.1:{server.url.rsplit(':', 1)[1]}".encode()) in first.headers
    assert (b"x-token", b"t") in third.headers


async def test_a_body_of_unknown_length_goes_chunked() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    async with serving(StrictServer(OK)) as server:
        transport = HTTP1Transport()
        await send(transport, server.url, content=pieces())
        await transport.aclose()
    ((request, body),) = server.requests
    assert (b"transfer-encoding", b"chunked") in request.headers
    assert body == b"abcdefg"


async def test_a_header_that_would_split_the_request_is_refused() -> None:
    async with serving(StrictServer(OK)) as server:
        transport = HTTP1Transport()
        with pytest.raises(httpx.LocalProtocolError, match="X-Evil"):
            await send(transport, server.url, headers={"X-Evil": "a\r\nX-Injected: 1"})
        await transport.aclose()
    assert server.requests == []


# What comes back


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "body", "reused"),  # the server closes only where the end of the body needs it
    [
        (OK, b"ok", True),
        (
            CHUNKED + b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            b"abc0123456789",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nto the end", b"to the end", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", b"x", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", b"x", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", b"x", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"ok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", b"ok", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw", b"raw", False),
    ],
    ids=["length", "chunked", "to-close", "close", "1.0", "1.0-keep", "204", "100", "dup", "te"],
)
@pytest.mark.parametrize("pieces", [1, 7])
async def test_answer_framings(answer: bytes, body: bytes, reused: bool, pieces: int) -> None:
    read_to_close = b"Content-Length" not in answer and b"chunked" not in answer
    follow = Close(answer) if read_to_close and body else answer
    async with serving(StrictServer(follow, OK, pieces=pieces)) as server:
        transport = HTTP1Transport()
        first = await send(transport, server.url)
        second = await send(transport, server.url)
        await transport.aclose()
    assert (first.content, second.content) == (body, b"ok")
    assert server.connections == (1 if reused else 2)


@pytest.mark.parametrize(
    "answer",
    [
        OK + b"HTTP/1.1 200 OK\r\n",  # bytes nobody asked for after the answer
        CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n") + b"1\r\nx\r\n0\r\n\r\n",
    ],
    ids=["trailing-bytes", "two-framings"],
)
async def test_a_doubtful_connection_is_not_reused_though_the_server_keeps_it(
    answer: bytes,
) -> None:
    async with serving(StrictServer(answer, OK)) as server:
        transport = HTTP1Transport()
        first = await send(transport, server.url)
        second = await send(transport, server.url)
        await transport.aclose()
    assert (first.status_code, second.content) == (200, b"ok")
    assert server.connections == 2


async def test_a_request_saying_close_does_not_keep_its_connection() -> None:
    async with serving(StrictServer(OK, OK)) as server:
        transport = HTTP1Transport()
        await send(transport, server.url, headers={"Connection": "close"})
        await send(transport, server.url)
        await transport.aclose()
    assert server.connections == 2


async def test_over_tls_a_record_nobody_asked_for_is_seen_before_reuse(ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nfresh"
    async with serving(StrictServer([OK, stale], fresh), tls=_server_context(ca)) as server:
        transport = HTTP1Transport(verify=client)
        first = await send(transport, server.url)
        await eventually(lambda: server.answered == 1)  # the stale record has left too
        second = await send(transport, server.url)
        await transport.aclose()
    assert (first.content, second.status_code, second.content) == (b"ok", 201, b"fresh")
    assert server.connections == 2


async def test_over_tls_records_that_came_with_the_answer_are_seen_before_reuse(
    ca: trustme.CA,
) -> None:
    """The answer and a record nobody asked for leave in one write, so that they arrive in
    one read: the second waits in the client's TLS layer, where no poll of the socket sees it."""
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    connections = []

    async def serve(stream: anyio.abc.ByteStream) -> None:
        connections.append(stream)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = _server_context(ca).wrap_bio(incoming, outgoing, server_side=True)

        async def pump(step: Any) -> Any:
            while True:
                try:
                    return step()
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        await stream.send(outgoing.read())
                    incoming.write(await stream.receive())

        async with stream:
            await pump(tls.do_handshake)
            if outgoing.pending:
                await stream.send(outgoing.read())
            while b"\r\n\r\n" not in await pump(lambda: tls.read(65536)):
                pass
            tls.write(OK)
            tls.write(stale)
            await stream.send(outgoing.read())  # two records, one write
            await anyio.sleep_forever()

    client = ssl.create_default_context()
    ca.configure_trust(client)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        transport = HTTP1Transport(verify=client, max_connections=1)
        first = await send(transport, f"https://127.0.0.1:{port}")
        second = await send(transport, f"https://127.0.0.1:{port}")
        await transport.aclose()
        tg.cancel_scope.cancel()
    assert (first.content, second.content) == (b"ok", b"ok")
    assert len(connections) == 2


async def test_a_head_answer_has_no_body_whatever_its_length_says() -> None:
    async with serving(
        StrictServer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", OK)
    ) as server:
        transport = HTTP1Transport()
        head = await send(transport, server.url, "HEAD")
        after = await send(transport, server.url)
        await transport.aclose()
    assert (head.content, head.headers["content-length"], after.content) == (b"", "50", b"ok")
    assert server.connections == 1


def _h11_answer(rng: random.Random) -> tuple[int, list[tuple[bytes, bytes]], bytes, bytes]:
    """A random answer as h11 writes it: status, headers, body, and the bytes on the wire."""
    status = rng.choice([200, 201, 202, 207, 400, 404, 409, 429, 500, 503])
    body = rng.randbytes(rng.choice([0, 1, 17, 1000, 70_000]))
    headers = [(b"x-field-%d" % i, b"v %d" % rng.randrange(10**6)) for i in range(rng.randrange(5))]
    chunked = rng.random() < 0.5
    headers.append(
        (b"transfer-encoding", b"chunked") if chunked else (b"content-length", b"%d" % len(body))
    )
    writer = h11.Connection(h11.SERVER)
    writer.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    writer.next_event(), writer.next_event()
    wire = writer.send(h11.Response(status_code=status, headers=headers)) or b""
    at = 0
    while at < len(body):  # as several chunks when chunked
        step = rng.randrange(1, len(body) - at + 1)
        wire += writer.send(h11.Data(data=body[at : at + step])) or b""
        at += step
    wire += writer.send(h11.EndOfMessage()) or b""
    return status, headers, body, wire


async def test_answers_written_by_h11_read_back_the_same() -> None:
    rng = random.Random(5)
    cases = [_h11_answer(rng) for _ in range(60)]
    async with serving(StrictServer(*(wire for *_, wire in cases), pieces=5)) as server:
        transport = HTTP1Transport()
        for status, headers, body, _ in cases:
            answer = await send(transport, server.url)
            assert (answer.status_code, answer.content) == (status, body)
            assert [(name.lower(), value) for name, value in answer.headers.raw] == headers
        await transport.aclose()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (DROP, "without sending a response"),
        (Close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"), "5 bytes short"),
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 099 Odd\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "Content-Length"),
        (CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n", "chunk size"),
        (CHUNKED + b"3\r\nabcd\r\n0\r\n\r\n", "CRLF"),
        # A chunk's framing takes CRLF only, unlike a head's lines (RFC 9112 7.1).
        (CHUNKED + b"2\r\nok\n0\r\n\r\n", "CRLF"),
        (CHUNKED + b"2\nok\r\n0\r\n\r\n", "chunk size"),
        (Close(CHUNKED + b"3\r\nab"), "short"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "header line"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "switched"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", "exceed"),
    ],
)
async def test_a_broken_answer_is_a_protocol_error_and_costs_only_its_connection(
    answer: bytes | str, message: str
) -> None:
    async with serving(StrictServer(answer, OK)) as server:
        transport = HTTP1Transport()
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await send(transport, server.url)
        after = await send(transport, server.url)
        await transport.aclose()
    assert after.content == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "connections"),
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 1),  # bare LF ends lines: RFC 9112 2.2
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok", 1),
        (CHUNKED + b"000000000000000000002\r\nok\r\n0\r\n\r\n", 1),  # leading zeros: legal
        (b"HTTP/1.1 200 OK\r\nX-Odd: a\rb\x00c\r\nContent-Length: 2\r\n\r\nok", 1),
        # HTTP/1.0 with a transfer coding: its framing is not to be trusted (RFC 9112 6.1).
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            2,
        ),
    ],
    ids=["LF", "LF-then-CRLF", "zeros", "CR-NUL", "1.0-chunked"],
)
async def test_answers_loose_in_ways_the_rfc_allows_are_read(
    answer: bytes, connections: int
) -> None:
    """Refused, a 2xx was retried (the events stored again, and then failed); a CR or NUL
    kept in a cookie's value made every later request unsendable."""
    async with serving(StrictServer(answer, OK)) as server:
        transport = HTTP1Transport()
        first = await send(transport, server.url)
        after = await send(transport, server.url)
        await transport.aclose()
    assert (first.content, after.content) == (b"ok", b"ok")
    if b"X-Odd" in answer:
        assert first.headers["x-odd"] == "a b c"  # CR and NUL are spaces
    assert server.connections == connections


# Timeouts, failures and cancellation


async def test_an_answer_that_never_comes_is_a_read_timeout() -> None:
    async with serving(StrictServer(HANG, OK)) as server:
        transport = HTTP1Transport()
        with pytest.raises(httpx.ReadTimeout, match="waiting for the answer"):
            await send(transport, server.url, timeout={**SHORT, "read": 0.1})
        after = await send(transport, server.url)
        await transport.aclose()
    assert (after.content, server.connections) == (b"ok", 2)


async def test_a_server_that_does_not_read_is_a_write_timeout() -> None:
    # A socket that listens and never accepts: the kernel takes the connection and a small
    # window of bytes, then the client's writes wait. (An asyncio server reads eagerly.)
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        transport = HTTP1Transport()
        with pytest.raises(httpx.WriteTimeout, match="sending the request"):
            await send(
                transport,
                f"http://127.0.0.1:{silent.getsockname()[1]}",
                content=bytes(16 << 20),
                timeout={**SHORT, "write": 0.2},
            )
        await transport.aclose()


async def test_a_port_nobody_listens_on_is_a_connect_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    transport = HTTP1Transport()
    with pytest.raises(httpx.ConnectError):
        await send(transport, f"http://127.0.0.1:{port}")
    await transport.aclose()


async def test_requests_wait_for_a_free_connection_up_to_the_pool_timeout() -> None:
    async with serving(StrictServer(HANG, OK)) as server:
        transport = HTTP1Transport(max_connections=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send, transport, server.url)
            await eventually(lambda: len(server.requests) == 1)
            with pytest.raises(httpx.PoolTimeout, match="waiting for a connection"):
                await send(transport, server.url, timeout={**SHORT, "pool": 0.1})
            tg.cancel_scope.cancel()  # the hung request: its connection closes, its slot frees
        after = await send(transport, server.url)
        await transport.aclose()
    assert (after.content, server.connections) == (b"ok", 2)


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with serving(StrictServer(Close(OK), OK)) as server:
        transport = HTTP1Transport()
        await send(transport, server.url)
        await eventually(lambda: server.open_connections == 0)
        await eventually(
            lambda: not transport._idle[("http", "127.0.0.1", _port(server))][-1].is_open()
        )
        after = await send(transport, server.url)
        await transport.aclose()
    assert (after.content, server.connections) == (b"ok", 2)


async def test_the_expired_idle_connection_is_closed_and_the_fresh_one_reused() -> None:
    async with serving(StrictServer(OK, OK, OK)) as server:
        transport = HTTP1Transport(max_connections=2)
        async with anyio.create_task_group() as tg:  # two requests at once: two connections
            tg.start_soon(send, transport, server.url)
            tg.start_soon(send, transport, server.url)
        older, _newer = transport._idle[("http", "127.0.0.1", _port(server))]
        older.idle_since -= 10  # past the 5 s expiry; the newer one is not
        await send(transport, server.url)
        await eventually(lambda: server.open_connections == 1)
        await transport.aclose()
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_idle_connections_expire() -> None:
    async with serving(StrictServer(OK, OK)) as server:
        transport = HTTP1Transport(keepalive_expiry=0.0)
        await send(transport, server.url)
        await send(transport, server.url)
        await transport.aclose()
    assert server.connections == 2


async def test_closing_the_transport_closes_idle_connections_and_refuses_requests() -> None:
    async with serving(StrictServer(OK)) as server:
        transport = HTTP1Transport()
        await send(transport, server.url)
        assert server.open_connections == 1
        await transport.aclose()
        await eventually(lambda: server.open_connections == 0)
        with pytest.raises(RuntimeError, match="closed"):
            await send(transport, server.url)


def _port(server: StrictServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


# TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_tls_with_a_trusted_certificate(ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with serving(StrictServer(OK, OK), tls=_server_context(ca)) as server:
        transport = HTTP1Transport(verify=client)
        answers = [await send(transport, server.url) for _ in range(2)]
        await transport.aclose()
    assert [a.content for a in answers] == [b"ok", b"ok"]
    assert server.connections == 1


async def test_tls_sends_no_http1_request_to_a_server_that_chose_h2(ca: trustme.CA) -> None:
    """A context of the caller's that offers h2 (as httpx leaves one it used for HTTP/2):
    a server that picks h2 gets no HTTP/1.1 request, and the failure is a connect error
    (nothing sent, so safe to retry)."""
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2", "http/1.1"])
    server_context = _server_context(ca)
    server_context.set_alpn_protocols(["h2"])
    async with serving(StrictServer(OK), tls=server_context) as server:
        transport = HTTP1Transport(verify=client)
        with pytest.raises(httpx.ConnectError, match="chose 'h2'"):
            await send(transport, server.url)
        await transport.aclose()
    assert server.requests == []


async def test_tls_refuses_a_certificate_nobody_vouches_for(ca: trustme.CA) -> None:
    async with serving(StrictServer(OK), tls=_server_context(ca)) as server:
        transport = HTTP1Transport()  # the usual trust store, which does not know this CA
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await send(transport, server.url)
        await transport.aclose()
    assert server.requests == []


async def test_a_handshake_the_server_cuts_short_is_a_connect_error() -> None:
    async def cut(stream: anyio.abc.ByteStream) -> None:
        await stream.receive()  # the ClientHello
        await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, cut)
        transport = HTTP1Transport()
        with pytest.raises(httpx.ConnectError):  # retried by the publisher: nothing was sent
            await send(transport, f"https://127.0.0.1:{port}")
        await transport.aclose()
        tg.cancel_scope.cancel()


# Limits


def _answer_of(size: int, framing: str) -> bytes:
    body = b"x" * size
    if framing == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, body)
    if framing == "chunked":  # in two chunks
        return CHUNKED + b"40\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (body[:64], size - 64, body[64:])
    return Close(b"HTTP/1.1 200 OK\r\n\r\n" + body)


@pytest.mark.parametrize("framing", ["length", "chunked", "to-close"])
@pytest.mark.parametrize("size", [100, 101])
async def test_answers_are_read_up_to_the_limit_and_refused_past_it(
    size: int, framing: str
) -> None:
    async with serving(StrictServer(_answer_of(size, framing))) as server:
        transport = HTTP1Transport(max_answer_bytes=100)
        if size > 100:
            with pytest.raises(httpx.RemoteProtocolError, match="exceeds 100"):
                await send(transport, server.url)
        else:
            assert (await send(transport, server.url)).content == b"x" * size
        await transport.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        Close(b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\n\r\nshort"),
        CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 101\r\n\r\n",
        [b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\n\r\n", b"short"],  # then silence
        b"HTTP/1.1 202 Accepted\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\nno colon\r\n\r\n",
    ],
    ids=["cut", "bad-chunk", "too-long", "silent", "head-too-long", "bad-header"],
)
async def test_a_2xx_whose_head_is_enough_stands_without_its_body(answer: Any) -> None:
    """Events are stored once the server says 2xx; a body that then fails to come must not
    make the publisher send them again. Only a request that says so gets such an answer."""
    server = StrictServer(answer, answer, OK)
    async with serving(server):
        transport = HTTP1Transport(max_answer_bytes=100)
        options: dict[str, Any] = {"timeout": {**SHORT, "read": 0.2}}
        with pytest.raises(httpx.HTTPError):
            await send(transport, server.url, **options)
        enough = {"extensions": {"timeout": options["timeout"], HEAD_IS_ENOUGH: True}}
        request = httpx.Request("POST", server.url, **enough)
        response = await transport.handle_async_request(request)
        assert response.is_success
        assert await response.aread() == b""
        assert response.extensions[BROKEN_BODY]
        assert (await send(transport, server.url)).content == b"ok"  # on a new connection
        await transport.aclose()
    assert server.connections == 3


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Close(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 99\r\n\r\nshort"), 503),
        (b"HTTP/1.1 400 Bad\r\nContent-Length: 101\r\n\r\n", 400),  # past the bound
        (Close(b"HTTP/1.1 302 Found\r\nContent-Length: 99\r\n\r\nshort"), None),
    ],
    ids=["cut-503", "long-400", "cut-302"],
)
async def test_an_error_answer_whose_body_breaks_is_still_the_answer(
    answer: bytes, status: int | None
) -> None:
    """Its status and headers say it: as a dropped connection, a 503's Retry-After was
    ignored and the request sent again at once, and a 400 (a bad event among good ones) was
    retried, then failed whole rather than split. Anything else stays a protocol error."""
    async with serving(StrictServer(answer, OK)) as server:
        transport = HTTP1Transport(max_answer_bytes=100)
        if status is None:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(transport, server.url)
        else:
            response = await send(transport, server.url)
            assert (response.status_code, response.content) == (status, b"")
            assert response.extensions[BROKEN_BODY]
            assert response.headers.get("Retry-After", "7") == "7"
        assert (await send(transport, server.url)).content == b"ok"  # on a new connection
        await transport.aclose()
    assert server.connections == 2


# On asyncio the answer is lost, as with httpx's own transport: a failed write closes the
# asyncio transport, which then reads nothing more of what the kernel holds.
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_an_answer_sent_before_the_request_was_read_is_not_lost() -> None:
    """A server (a proxy's size limit) that answers 413 to the head and stops reading,
    closing the connection: the publisher gets the 413 (and splits the batch) rather than
    a broken connection (retried, then failed whole)."""

    refusal = b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    async with answering_the_head(refusal) as url:
        transport = HTTP1Transport()
        answer = await send(transport, url, content=bytes(8 << 20))
        await transport.aclose()
    assert (answer.status_code, answer.content) == (413, b"no")


@asynccontextmanager
async def answering_the_head(answer: bytes) -> AsyncIterator[str]:
    """A server that answers once it has the head of a request, then closes with the body
    unread (so the kernel resets the connection); its URL."""

    async def early(stream: anyio.abc.ByteStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
        await stream.send(answer)
        await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, early)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def test_a_2xx_to_a_request_not_sent_whole_closes_its_connection() -> None:
    """A server that answers 200 to the head, then closes with the body unread: the write's
    failure stands (no telling what the server kept), and the socket is closed then, not
    left to the garbage collector. (On trio the early answer is read; on asyncio the reset
    loses it first.)"""

    async with answering_the_head(OK) as url:
        transport = HTTP1Transport()
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(httpx.WriteError) as failure:
            await send(transport, url, content=bytes(8 << 20))
        # The failure (held here, with its frames) must not hold an open socket.
        assert len(os.listdir("/proc/self/fd")) == before, failure.value
        await transport.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"headers": {"Content-Length": "3"}, "content": b"abcdef"}, "Content-Length"),
        ({"headers": [("Content-Length", "9"), ("Content-Length", "3")], "content": b"abc"}, "9"),
        ({"headers": {"Transfer-Encoding": "chunked"}, "content": b"abc"}, "with Content-Length"),
        ({"headers": {"Transfer-Encoding": "gzip"}}, "gzip"),
        ({"headers": {"X Bad": "1"}}, "invalid header"),
        ({"headers": {"X-Nul": "a\0b"}}, "invalid header"),
    ],
    ids=["length", "two-lengths", "both", "not-chunked", "name", "nul"],
)
async def test_a_request_that_could_be_read_as_two_is_refused(
    options: dict[str, Any], message: str
) -> None:
    async with serving(StrictServer(OK)) as server:
        transport = HTTP1Transport()
        with pytest.raises(httpx.LocalProtocolError, match=message):
            await send(transport, server.url, **options)
        with pytest.raises(httpx.LocalProtocolError, match="method"):
            await send(transport, server.url, "GET / HTTP/1.1\r\nX:")
        await transport.aclose()
    assert server.requests == []


# In the publisher


async def test_the_publisher_sends_events_once_when_their_2xx_is_cut_short() -> None:
    model_id = "6f1c2c9e-1a2b-4c3d-9e8f-0123456789ab"
    model = b'{"data":{"id":"%s","name":"m","event_id_col":"id"}}' % model_id.encode()
    lookup = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(model), model)
    cut = Close(b'HTTP/1.1 202 Accepted\r\nContent-Length: 99\r\n\r\n{"data":')
    server = StrictServer(lookup, cut, OK)
    async with serving(server), AsyncPublisher(server.url, TOKEN, config=config()) as pub:
        pub.publish_event_nowait("p", model_id, {"x": 1})
        result = await pub.flush(5)
    assert (result.delivered, result.failed) == (1, 0)
    assert [request.target for request, _ in server.requests] == [
        f"/v3/models/{model_id}".encode(),
        b"/v3/events",
    ]


async def test_the_publisher_delivers_over_https_trusting_ssl_cert_file(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, chain_file = tmp_path / "ca.pem", tmp_path / "chain.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    with running_emulator(models=MODELS, token=TOKEN, tls=(chain_file, chain_file)) as fiddler:
        assert fiddler.url.startswith("https://")
        async with AsyncPublisher(fiddler.url, TOKEN, config=config()) as pub:
            for i in range(50):
                pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
            assert (await pub.flush(10)).complete
            assert isinstance(pub._client._transport, HTTP1Transport)  # type: ignore[union-attr]
        assert fiddler.count() == 50


@pytest.mark.parametrize("proxy", [None, "http://proxy.internal:3128"])
async def test_a_ca_file_that_cannot_be_read_fails_the_start_and_nothing_else(
    proxy: str | None, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if proxy:  # then httpx's own transport makes the context
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    pub = AsyncPublisher("https://fiddler.test", TOKEN, config=config())
    with pytest.raises(ConfigurationError, match="missing" if proxy is None else "TLS"):
        await pub.start()
    ca.cert_pem.write_to_path(str(tmp_path / "missing.pem"))  # fixed: the same publisher starts
    await pub.start()
    assert pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
    await pub.aclose(0.1)


def test_a_configured_proxy_leaves_the_requests_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(
        transport_for("https://acme.ai", verify=True, max_connections=2), HTTP1Transport
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert transport_for("https://acme.ai", verify=True, max_connections=2) is None
    assert isinstance(
        transport_for("http://127.0.0.1:9", verify=True, max_connections=2), HTTP1Transport
    )
    monkeypatch.setenv("ALL_PROXY", "http://proxy.internal:3128")
    assert transport_for("http://127.0.0.1:9", verify=True, max_connections=2) is None
