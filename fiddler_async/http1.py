"""A lean HTTP/1.1 transport for httpx: the publisher's requests without httpcore's cost.

httpx's own transport (httpcore over anyio) spends about 0.35 ms of CPU on each request on a
2-core machine, most of it in per-operation cancel scopes, locks and backend lookups; a
publisher sending 1000-event batches pays that once per batch, in the process that serves
predictions. This transport does the same work in under a third of that: one anyio byte
stream per keep-alive connection, one deadline per phase of a request, and a parser for the
answers a JSON API gives.

It speaks what the publisher needs and nothing more: HTTP/1.1 with keep-alive, over TCP or
TLS, answers framed by Content-Length, chunked, or the end of the connection, and httpx's own
exceptions (ConnectError, ReadTimeout, RemoteProtocolError...) so that callers cannot tell it
from httpx's transport. Two differences: the read timeout bounds the whole answer, not each
read of it (stricter, and what the publisher's ``request_timeout`` promises), and an answer
larger than ``max_answer_bytes`` is refused. No proxies and no HTTP/2: the publisher uses
httpx's transport when a proxy is configured, and a caller who wants httpx's anyway passes
``transport=httpx.AsyncHTTPTransport()``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import ssl
import time
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import anyio
import anyio.abc
import httpx
from anyio.streams.tls import TLSAttribute

__all__ = ["HTTP1Transport", "transport_for"]

MAX_HEAD_BYTES = 64 * 1024
"""Largest status line and headers of an answer; a server sending more is broken."""
MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The default bound of an answer's body (and of what a compressed one inflates to)."""
_HEAD_SEARCH = MAX_HEAD_BYTES + 4  # the head and the blank line that ends it
_RECEIVE_BYTES = 256 * 1024
_JOIN_BELOW = 16 * 1024
"""Bodies this small are sent in one write with the head: one syscall, a cheap copy."""
_NO_BODY_STATUS = frozenset({204, 304})
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2: methods, field names
# The blank line that ends a head; a bare LF ends a head's line too (RFC 9112 2.2 lets a
# recipient take it so, as h11 does): refused, a 2xx of a server writing them was retried. A
# chunked body's framing still takes CRLF only (see _read_line).
_HEAD_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_CONNECTION_ERRORS = (OSError, anyio.EndOfStream, anyio.BrokenResourceError)

Origin = tuple[str, str, int]


class HTTP1Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections: at most ``max_connections`` requests at once (one
    more waits for a free slot up to the pool timeout), idle connections closed after
    ``keepalive_expiry`` seconds. ``verify``: an SSL context, or whether to verify the server's
    certificate with httpx's defaults (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``)."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        max_connections: int = 10,
        keepalive_expiry: float = 5.0,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._ssl_context = verify if isinstance(verify, ssl.SSLContext) else None
        self._verify = verify is not False  # made into a context on the first https request
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._max_answer_bytes = max_answer_bytes
        self._slots: anyio.Semaphore | None = None  # made in the event loop, on first use
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"{url.scheme!r} URLs are not supported", request=request
            )
        timeouts = request.extensions.get("timeout", {})
        head, body, keep = await _serialize(request)
        if self._slots is None:
            self._slots = anyio.Semaphore(self._max_connections)
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            with _raising(httpx.PoolTimeout, request, timeouts.get("pool")):
                await self._slots.acquire()
        try:
            origin = (url.scheme, url.raw_host.decode("ascii"), url.port or _PORTS[url.scheme])
            connection = await self._reusable(origin) or await self._connect(
                origin, request, timeouts
            )
            answer = await connection.exchange(request, head, body, timeouts)
            if keep and answer.reusable and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(origin, []).append(connection)
            else:
                await connection.aclose()
        finally:
            self._slots.release()
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1", "reason_phrase": answer.reason}
        if answer.broken is not None:
            extensions[BROKEN_BODY] = answer.broken
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=httpx.ByteStream(answer.body),
            extensions=extensions,
        )

    async def _reusable(self, origin: Origin) -> _Connection | None:
        """The most recently used idle connection that is still open. The expired ones, oldest
        first, and any found closed are closed on the way."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired = time.monotonic() - self._keepalive_expiry
        while idle and idle[0].idle_since <= expired:
            await idle.pop(0).aclose()
        while idle:
            connection = idle.pop()
            if connection.is_open():
                return connection
            await connection.aclose()
        return None

    async def _connect(
        self, origin: Origin, request: httpx.Request, timeouts: dict[str, Any]
    ) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl_context is None:  # outside the try: a bad CA file is not a ConnectError
                self._ssl_context = tls_context(self._verify)
            context = self._ssl_context
        stream: anyio.abc.ByteStream
        with _raising(httpx.ConnectTimeout, request, timeouts.get("connect")):
            try:
                if context is not None:
                    stream = await anyio.connect_tcp(
                        host,
                        port,
                        ssl_context=context,
                        tls_hostname=host,
                        tls_standard_compatible=False,  # servers often close without close_notify
                    )
                else:
                    stream = await anyio.connect_tcp(host, port)
            except _CONNECTION_ERRORS as exc:
                # refused, unreachable, unknown host, a certificate not trusted, a handshake
                # the server cut short: nothing of the request has left
                raise httpx.ConnectError(_describe(exc), request=request) from exc
        # A context of the caller's may offer h2 too (httpx sets that on one it used for
        # HTTP/2): this transport speaks HTTP/1.1 only, so a server that chose another
        # protocol gets no request.
        chosen = stream.extra(TLSAttribute.alpn_protocol, None) if context else None
        if chosen not in (None, "http/1.1"):
            await anyio.aclose_forcefully(stream)
            raise httpx.ConnectError(
                f"the server chose {chosen!r} in the TLS handshake; this transport speaks "
                "HTTP/1.1 only (offer ALPN 'http/1.1' alone, or none)",
                request=request,
            )
        return _Connection(stream, self._max_answer_bytes)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        with anyio.CancelScope(shield=True):  # every socket closes, also when cancelled
            for connections in idle.values():
                for connection in list(connections):  # a sweep may be taking from it
                    await connection.aclose()


_PORTS = {"http": 80, "https": 443}


def tls_context(verify: bool) -> ssl.SSLContext:
    """httpx's context for ``verify`` (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), offering
    HTTP/1.1 by ALPN as httpx does."""
    try:
        context = httpx.create_ssl_context(verify=verify)
    except OSError as exc:  # the messages of a missing file name no file
        where = os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR") or "certifi"
        raise OSError(exc.errno, f"cannot load trusted certificates from {where}: {exc}") from exc
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Answer(NamedTuple):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reusable: bool
    broken: str | None = None
    """Why the body is missing: the head came, the rest did not (the status stands)."""


HEAD_IS_ENOUGH = "fiddler_async.head_is_enough"
"""A request extension: True when a 2xx status is all its sender needs of the answer (the
events of a POST are stored once the server says 2xx; the body only lists their ids). Such
an answer whose body then fails to arrive is returned without it, rather than raised: a
sender retrying it would store the events twice."""
BROKEN_BODY = "fiddler_async.broken_body"
"""The response extension that says why such an answer has no body."""


class _Connection:
    """One keep-alive connection: a byte stream and the bytes received but not yet read."""

    def __init__(self, stream: anyio.abc.ByteStream, max_answer_bytes: int) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max_answer_bytes = max_answer_bytes
        self._socket = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._tls = stream.extra(TLSAttribute.ssl_object, None)
        self.idle_since = 0.0
        self._head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None
        """The head of the answer being read, once it has come."""

    def is_open(self) -> bool:
        """Whether the server left this idle connection as it was: nothing has come since
        the last answer, not even its end. Bytes nobody asked for make it as unusable as a
        close. Over TLS they may already sit decrypted-to-be in the TLS layer, where no poll
        of the socket sees them: a read of the TLS object that must not block tells."""
        if self._socket is None or self._socket.fileno() < 0:
            return False
        if self._tls is not None:
            try:
                self._tls.read(1)
            except ssl.SSLWantReadError:
                pass  # nothing buffered: the socket tells the rest
            except (ssl.SSLError, OSError):
                return False  # closed, or broken
            else:
                return False  # a record nobody asked for (or its close_notify: b"")
        return not _readable(self._socket)

    async def exchange(
        self, request: httpx.Request, head: bytes, body: bytes, timeouts: dict[str, Any]
    ) -> _Answer:
        """Sends one request and reads its whole answer. Any failure, cancellation included,
        closes the connection: what is left in it is unknown. Two failures still give the
        answer, not reusable: one the server sent before it stopped reading the request (a
        413 from a proxy, say); and, without the body (``broken`` saying why), a 2xx whose
        body did not come, for a request that says :data:`HEAD_IS_ENOUGH`, and an error
        answer whose body did not (its status and headers, a Retry-After, are the answer: as
        a dropped connection it was retried at once, the 400 of a bad event never seen)."""
        self._head = None
        try:
            unsent = None
            with _raising(httpx.WriteTimeout, request, timeouts.get("write")):
                try:
                    if len(body) < _JOIN_BELOW:
                        await self._stream.send(head + body)
                    else:
                        await self._stream.send(head)
                        await self._stream.send(body)
                except (*_CONNECTION_ERRORS, anyio.ClosedResourceError) as exc:
                    unsent = httpx.WriteError(_describe(exc), request=request)
                    unsent.__cause__ = exc
            try:
                with _raising(httpx.ReadTimeout, request, timeouts.get("read")):
                    answer = await self._read_answer(request)
            except httpx.HTTPError as exc:
                answered = self._head
                if unsent is not None or answered is None:
                    raise unsent or exc  # noqa: B904  (the write's failure, when it failed)
                enough = 200 <= answered[0] < 300 and request.extensions.get(HEAD_IS_ENOUGH)
                if not enough and answered[0] < 400:
                    raise
                await self.aclose()
                return _Answer(*answered, b"", False, _describe(exc))
        except BaseException:
            await self.aclose()
            raise
        if unsent is None:
            return answer
        if 200 <= answer.status < 300:  # it did not read all the request: no telling what
            await self.aclose()  # it kept of it, the write's failure stands
            raise unsent
        return answer._replace(reusable=False)

    async def _read_answer(self, request: httpx.Request) -> _Answer:
        def broken(message: str) -> NoReturn:
            raise httpx.RemoteProtocolError(message, request=request)

        buffer = self._buffer
        while True:  # informational answers (100 Continue...) come before the real one
            line_end = -1
            while True:
                if line_end < 0 and (line_end := buffer.find(b"\n", 0, _HEAD_SEARCH)) >= 0:
                    # Known before the rest of the head, which may then turn out broken (too
                    # long, a bad line): a 2xx has arrived, and may be all a request needs.
                    status, reason, http11 = _parse_status(bytes(buffer[:line_end]), broken)
                    if status >= 200:
                        self._head = (status, reason, [])
                # (The status line's end comes first: it was found when this is.)
                if (end := _HEAD_END.search(buffer, 0, _HEAD_SEARCH)) is not None:
                    break
                if len(buffer) >= _HEAD_SEARCH:
                    broken(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes")
                if not await self._receive(request):
                    broken("Server disconnected without sending a response.")
            lines = bytes(buffer[line_end + 1 : end.start()])
            headers, keep_alive = _parse_headers(lines, http11, broken)
            del buffer[: end.end()]
            if status >= 200:
                self._head = (status, reason, headers)
                break
            if status == 101:
                broken("the server switched protocols, which was not asked for")

        fields: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        encodings = _tokens(fields.get(b"transfer-encoding", []))
        lengths = fields.get(b"content-length")
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            body = b""
        elif encodings:
            if encodings[-1] == b"chunked":
                body = await self._read_chunked(request, broken)
            else:
                body, keep_alive = await self._read_to_end(request, broken), False
            keep_alive = keep_alive and lengths is None  # both framings: RFC 9112 6.3 (3)
        elif lengths is not None:
            values = {value.strip() for value in b",".join(lengths).split(b",")}
            if len(values) != 1 or not (size := values.pop()).isdigit():
                broken(f"invalid Content-Length: {b','.join(lengths)!r}")
            if int(size) > self._max_answer_bytes:
                broken(f"the answer's body ({int(size)} bytes) exceeds {self._max_answer_bytes}")
            body = await self._read_exactly(int(size), request, broken)
        else:
            body, keep_alive = await self._read_to_end(request, broken), False
        return _Answer(status, reason, headers, body, keep_alive and not buffer)

    async def _receive(self, request: httpx.Request) -> bool:
        """More bytes into the buffer; False at the end of the stream."""
        try:
            self._buffer += await self._stream.receive(_RECEIVE_BYTES)
        except anyio.EndOfStream:
            return False
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.ReadError(_describe(exc), request=request) from exc
        return True

    async def _read_exactly(
        self, size: int, request: httpx.Request, broken: Callable[[str], NoReturn]
    ) -> bytes:
        while len(self._buffer) < size:
            if not await self._receive(request):
                broken(f"the server closed the connection {size - len(self._buffer)} bytes short")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_line(self, request: httpx.Request, broken: Callable[[str], NoReturn]) -> bytes:
        """A line of a chunked body: its framing takes CRLF only (RFC 9112 7.1), a bare LF
        being where two parsers could disagree on where a chunk ends."""
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                broken("a chunk's size line or a trailer is too long")
            if not await self._receive(request):
                broken("the server closed the connection in a chunked body")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _read_chunked(
        self, request: httpx.Request, broken: Callable[[str], NoReturn]
    ) -> bytes:
        chunks: list[bytes] = []
        received = 0
        while True:
            size_text = (await self._read_line(request, broken)).split(b";", 1)[0].strip(b" \t")
            size_text = size_text.lstrip(b"0") or size_text[:1]  # leading zeros are legal
            if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                broken(f"invalid chunk size: {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                trailers = 0
                while line := await self._read_line(request, broken):
                    trailers += len(line)  # trailer fields, up to the empty line; not kept
                    if trailers > MAX_HEAD_BYTES:
                        broken(f"the answer's trailers exceed {MAX_HEAD_BYTES} bytes")
                return b"".join(chunks)
            received += size
            if received > self._max_answer_bytes:
                broken(f"the answer's body exceeds {self._max_answer_bytes} bytes")
            chunks.append(await self._read_exactly(size, request, broken))
            if await self._read_exactly(2, request, broken) != b"\r\n":
                broken("a chunk does not end with CRLF")

    async def _read_to_end(
        self, request: httpx.Request, broken: Callable[[str], NoReturn]
    ) -> bytes:
        while await self._receive(request):
            if len(self._buffer) > self._max_answer_bytes:
                break
        if len(self._buffer) > self._max_answer_bytes:  # also what came with the head
            broken(f"the answer's body exceeds {self._max_answer_bytes} bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def aclose(self) -> None:
        """Closes at once, also when cancelled: the connection is being thrown away."""
        self._socket = None
        await anyio.aclose_forcefully(self._stream)


async def _serialize(request: httpx.Request) -> tuple[bytes, bytes, bool]:
    """The request line and headers, the body, and whether the request lets the connection
    be kept. Refuses what would let one request be read as two (a field with CR, LF or NUL,
    a name or method that is not a token, framing other than one Content-Length that covers
    the body or a Transfer-Encoding ending in chunked)."""
    body = await request.aread()
    method = request.method.encode("ascii", "replace")
    if not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError(f"invalid method {method!r}", request=request)
    lines = [b"%s %s HTTP/1.1" % (method, request.url.raw_path)]
    keep, encodings, lengths = True, [], []
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or b"\r" in value or b"\n" in value or b"\0" in value:
            raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            encodings.append(value)
        elif lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"connection":
            keep = keep and b"close" not in _tokens([value])
        lines.append(name + b": " + value)

    def refuse(framing: str) -> NoReturn:
        raise httpx.LocalProtocolError(
            f"{framing} for a body of {len(body)} bytes", request=request
        )

    if encodings:  # a body of unknown length, which has been read whole: one chunk and the end
        if lengths or _tokens(encodings)[-1:] != [b"chunked"]:
            refuse(f"Transfer-Encoding {b','.join(encodings)!r} with Content-Length {lengths!r}")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif not lengths:
        if body:
            lines.append(b"Content-Length: %d" % len(body))
    elif len(lengths) > 1 or not lengths[0].isdigit() or int(lengths[0]) != len(body):
        refuse(f"Content-Length {b','.join(lengths)!r}")
    lines.append(b"\r\n")
    return b"\r\n".join(lines), body, keep


def _parse_headers(
    head: bytes, http11: bool, broken: Callable[[str], NoReturn]
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers, and whether the connection may be kept: from a head's header lines
    (after its status line, without its final blank line)."""
    lines = _LINE_END.split(head.removesuffix(b"\r")) if head else []
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding: one value
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            broken(f"invalid header line: {line[:100]!r}")
        # A CR or NUL in a value is replaced by a space (RFC 9110 5.5): kept, it went on into
        # the cookie jar, and every later request carrying it was refused before it left.
        headers.append((name, value.replace(b"\r", b" ").replace(b"\0", b" ").strip(b" \t")))
    tokens = _tokens([value for name, value in headers if name.lower() == b"connection"])
    if http11:
        keep_alive = b"close" not in tokens
    else:  # HTTP/1.0: kept only if asked, and never with a transfer coding (RFC 9112 6.1)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        keep_alive = b"keep-alive" in tokens and not chunked
    return headers, keep_alive


def _parse_status(line: bytes, broken: Callable[[str], NoReturn]) -> tuple[int, bytes, bool]:
    """Status, reason, and whether it is HTTP/1.1, of a status line (its line end removed,
    or not)."""
    line = line.removesuffix(b"\r")
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    reason = reason.replace(b"\r", b" ").replace(b"\0", b" ")  # as in header values
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or code[0] == ord("0")
    ):
        broken(f"invalid status line: {line[:100]!r}")
    return int(code), reason, version == b"HTTP/1.1"


def _tokens(values: list[bytes]) -> list[bytes]:
    """The comma-separated tokens of a field's values, lowered, in order (Connection,
    Transfer-Encoding)."""
    return [token.strip().lower() for value in values for token in value.split(b",")]


def _readable(sock: Any) -> bool:
    try:
        poller = select.poll()
    except AttributeError:  # no poll() (Windows)
        return bool(select.select([sock], [], [], 0)[0])
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _raising:
    """A deadline for one phase of a request, raised as the httpx timeout that names it."""

    __slots__ = ("_error", "_request", "_scope")

    def __init__(
        self, error: type[httpx.TimeoutException], request: httpx.Request, seconds: float | None
    ) -> None:
        self._error = error
        self._request = request
        self._scope = anyio.fail_after(seconds)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._scope.__exit__(*exc_info)
        except TimeoutError as exc:
            raise self._error(_TIMEOUTS[self._error], request=self._request) from exc


_TIMEOUTS: dict[type[httpx.TimeoutException], str] = {
    httpx.PoolTimeout: "timed out waiting for a connection",
    httpx.ConnectTimeout: "timed out connecting",
    httpx.WriteTimeout: "timed out sending the request",
    httpx.ReadTimeout: "timed out waiting for the answer",
}


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (plain http is allowed there, and no proxy)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transport_for(
    url: str, *, verify: bool, max_connections: int, direct: bool = False
) -> httpx.AsyncBaseTransport | None:
    """This transport for ``url``, or None where httpx's own must do: a proxy is configured
    (httpx follows those settings, with their exceptions; this does not), unless ``direct``.
    The TLS context of an https URL is made now, so that a CA file that cannot be read fails
    here."""
    scheme = httpx.URL(url).scheme
    proxies = urllib.request.getproxies()
    if not direct and (scheme in proxies or "all" in proxies):
        return None
    return HTTP1Transport(
        verify=tls_context(verify) if scheme == "https" else verify,
        max_connections=max_connections,
    )
