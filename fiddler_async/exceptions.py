"""Every error fiddler_async raises or reports descends from :class:`FiddlerError`.

The tree::

    FiddlerError
    ├── ConfigurationError        (also ValueError) a setting is missing or invalid
    ├── PublisherClosedError      (also RuntimeError) publishing before start() or after aclose()
    ├── QueueFullError            the `raise` overflow policy, or `block` waited past its timeout
    ├── EventError                (also ValueError) this event cannot be published as given
    │   ├── EventEncodeError      (also TypeError) a value cannot be encoded; names the field
    │   ├── EventTooLargeError    the encoded event is larger than one request may carry
    │   ├── SchemaMismatchError   the event does not fit the model (e.g. no event id column)
    │   └── EventBatchError       some events of a publish_events_batch call are invalid
    ├── FileJobError              the server's job publishing an uploaded file failed
    ├── FileJobTimeoutError       (also TimeoutError) publish_file ran past its timeout
    ├── TransportError            never got an answer from the server
    │   ├── ConnectError          could not connect, or the connection dropped
    │   └── RequestTimeoutError   no answer within the configured timeout
    └── APIError                  the server answered with an error (status, code, message, reasons)
        ├── BadRequestError             400
        ├── AuthenticationError         401
        ├── PermissionDeniedError       403
        ├── NotFoundError               404, and a project or model name that does not exist
        ├── ConflictError               409
        ├── PayloadTooLargeError        413
        ├── UnprocessableEntityError    422
        ├── RateLimitedError            429
        └── ServerError                 5xx

Errors raised at the caller are the first four branches. Delivery errors (TransportError and
APIError) never reach the caller of ``publish_event``: the background flusher counts them in
``stats()``, logs them, and hands them to the ``on_error`` callback with the events they concern.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "ErrorReason",
    "EventBatchError",
    "EventEncodeError",
    "EventError",
    "EventTooLargeError",
    "FiddlerError",
    "FileJobError",
    "FileJobTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublisherClosedError",
    "QueueFullError",
    "RateLimitedError",
    "RequestTimeoutError",
    "SchemaMismatchError",
    "ServerError",
    "TransportError",
    "UnprocessableEntityError",
]


class FiddlerError(Exception):
    """The root of every fiddler_async error."""


class ConfigurationError(FiddlerError, ValueError):
    """A setting is missing or invalid (the message names it)."""


class PublisherClosedError(FiddlerError, RuntimeError):
    """The publisher is not running: not started yet, closing, or closed."""


class QueueFullError(FiddlerError):
    """The queue is full and the overflow policy says to tell the caller."""


class FileJobError(FiddlerError):
    """The server's job that publishes an uploaded file ended in failure (``publish_file``);
    or whether it started is not known: the answer to the request starting it was lost
    (``job_id`` empty, ``reason`` the error's kind); or it started and could not be followed
    (its status requests failed past their retries: ``job_id`` set, ``reason`` the error's
    kind; it may still finish). ``file_id`` is the uploaded file's."""

    def __init__(
        self, message: str, *, job_id: str = "", reason: str = "", file_id: str = ""
    ) -> None:
        # (Defaults: an exception is rebuilt from its message alone when unpickled, its
        # attributes then restored.)
        super().__init__(message)
        self.job_id = job_id
        self.reason = reason
        self.file_id = file_id


class FileJobTimeoutError(FiddlerError, TimeoutError):
    """``publish_file`` ran past its ``timeout``. ``job_id`` is the server's job when it was
    started (it may still finish: do not publish the file again before looking), and
    ``file_id`` the uploaded file's; None for what did not happen."""

    def __init__(
        self, message: str, *, job_id: str | None = None, file_id: str | None = None
    ) -> None:  # (defaults: see FileJobError)
        super().__init__(message)
        self.job_id = job_id
        self.file_id = file_id


class EventError(FiddlerError, ValueError):
    """This event cannot be published as given. Nothing of it was queued."""

    field: str | None = None
    """The value at fault, where one is (see :class:`EventEncodeError`)."""


class EventEncodeError(EventError, TypeError):
    """A value of the event cannot be encoded to JSON.

    ``field`` is the path of the offending value, e.g. ``"features.embedding[3]"``.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EventTooLargeError(EventError):
    """The encoded event is larger than ``max_batch_bytes``: no request could carry it."""


class SchemaMismatchError(EventError):
    """The event does not fit the model, e.g. an ``event_id`` for a model without an id column."""


class EventBatchError(EventError):
    """Some events given to ``publish_events_batch`` are invalid; none of the call was queued.

    ``errors`` maps the position of each invalid event to its error.
    """

    def __init__(self, errors: Mapping[int, EventError]) -> None:
        self.errors = dict(errors)
        shown = "; ".join(f"events[{i}]: {e}" for i, e in list(self.errors.items())[:5])
        more = len(self.errors) - 5
        tail = f"; and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.errors)} invalid event(s), nothing queued: {shown}{tail}")


class TransportError(FiddlerError):
    """The request got no answer from the server. ``sent`` is False when it never left (the
    connection could not be made), so the server cannot have acted on it."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectError(TransportError):
    """Could not connect to the server, or the connection dropped before an answer."""


class RequestTimeoutError(TransportError):
    """The server did not answer within the configured timeout."""


@dataclass(frozen=True)
class ErrorReason:
    """One item of the ``errors`` list of a Fiddler error body."""

    reason: str
    message: str
    help: str = ""


class APIError(FiddlerError):
    """The server answered with an error status.

    Carries the HTTP ``status``, the ``code`` and ``message`` of Fiddler's error envelope, the
    server's ``reasons``, and ``retry_after`` (seconds) when the server sent a ``Retry-After``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | None = None,
        reasons: Sequence[ErrorReason] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = status if code is None else code
        self.reasons = tuple(reasons)
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"HTTP {self.status}: {self.message}"
        reasons = [f"{r.reason}: {r.message}" for r in self.reasons if r.message != self.message]
        if len(reasons) > 3:  # the rest stay in .reasons: a log line is no place for 1000
            reasons[3:] = [f"and {len(reasons) - 3} more"]
        return f"{text} ({'; '.join(reasons)})" if reasons else text


class BadRequestError(APIError):
    """400: the server rejected the request as malformed."""


class AuthenticationError(APIError):
    """401: the token is missing, wrong or expired."""


class PermissionDeniedError(APIError):
    """403: the token may not do this."""


class NotFoundError(APIError):
    """404: no such resource; also a project or model name that does not exist."""


class ConflictError(APIError):
    """409: the request conflicts with the server's state."""


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the server accepts."""


class UnprocessableEntityError(APIError):
    """422: the request is well formed but its content is invalid."""


class RateLimitedError(APIError):
    """429: too many requests; retried after ``retry_after`` when the server says."""


class ServerError(APIError):
    """5xx: the server failed; retried unless the status is 501."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitedError,
}


def api_error_class(status: int) -> type[APIError]:
    """The most specific :class:`APIError` subclass for an HTTP status."""
    if 500 <= status <= 599:  # past 599 is no status HTTP defines: not retried as a 5xx
        return ServerError
    return _BY_STATUS.get(status, APIError)
