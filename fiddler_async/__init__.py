"""fiddler_async: publish model events to Fiddler without making a prediction wait.

>>> async with AsyncPublisher("https://acme.fiddler.ai", token) as pub:
...     event_id = pub.publish_event_nowait("bank_churn", "bank_churn", {"age": 42, "churn": 0.1})
"""

from ._version import __version__
from .backfill import FileJob, ProgressCallback
from .config import OverflowPolicy, PublisherConfig
from .destination import ModelInfo
from .exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ConnectError,
    ErrorReason,
    EventBatchError,
    EventEncodeError,
    EventError,
    EventTooLargeError,
    FiddlerError,
    FileJobError,
    FileJobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublisherClosedError,
    QueueFullError,
    RateLimitedError,
    RequestTimeoutError,
    SchemaMismatchError,
    ServerError,
    TransportError,
    UnprocessableEntityError,
)
from .flusher import DeliveryFailure
from .publisher import AsyncPublisher, DataFrameLike, ErrorCallback, Event, EventId, EventTime
from .spooler import ReplayResult
from .stats import FlushResult, StatsSnapshot
from .sync import Publisher

__all__ = [
    "APIError",
    "AsyncPublisher",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "DataFrameLike",
    "DeliveryFailure",
    "ErrorCallback",
    "ErrorReason",
    "Event",
    "EventBatchError",
    "EventEncodeError",
    "EventError",
    "EventId",
    "EventTime",
    "EventTooLargeError",
    "FiddlerError",
    "FileJob",
    "FileJobError",
    "FileJobTimeoutError",
    "FlushResult",
    "ModelInfo",
    "NotFoundError",
    "OverflowPolicy",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProgressCallback",
    "Publisher",
    "PublisherClosedError",
    "PublisherConfig",
    "QueueFullError",
    "RateLimitedError",
    "ReplayResult",
    "RequestTimeoutError",
    "SchemaMismatchError",
    "ServerError",
    "StatsSnapshot",
    "TransportError",
    "UnprocessableEntityError",
    "__version__",
]
