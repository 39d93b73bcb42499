"""Backfills by file: Fiddler's v3 file path instead of streaming, for large historical loads.

``AsyncPublisher.publish_file`` uploads a file (``POST /v3/files/upload``), publishes it as the
source of an events request (``POST``/``PATCH /v3/events`` with ``{"type": "FILE"}``), and
follows the server's job (``GET /v3/jobs/{id}``) until it ends, reporting progress. The events
do not pass through the queue: this is one awaited operation, with the same retries, shared
pause and circuit breaker as every other request.

The source is a DataFrame or Arrow table (written to Parquet, with the model's event id and
timestamp columns placed as ``publish_events_batch`` would, so the ids are returned), or a
``.csv``, ``.parquet`` or ``.jsonl`` file sent as it is.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .destination import Destination, ModelInfo
from .exceptions import APIError, FileJobError, FileJobTimeoutError, ServerError, TransportError
from .frames import frame_to_parquet, is_frame
from .wire import FiddlerV3Exporter, not_acted_on

__all__ = ["FileJob", "ProgressCallback", "check_options", "publish_file"]

ProgressCallback = Callable[[str, float], object]
"""Called with a stage (``"upload"``, then ``"job"``) and how far it is, from 0.0 to 1.0."""

FILE_SUFFIXES = (".csv", ".parquet", ".jsonl")
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
"""Fiddler takes a file under 100 MB in one upload; larger ones go in parts
(``/v3/files/multipart-init``), which this library does not do yet."""


@dataclass(frozen=True)
class FileJob:
    """A file's publication, once the server's job ended successfully."""

    job_id: str
    file_id: str
    status: str
    event_ids: tuple[str, ...] = ()
    """The ids of the events, in order (known when the source was a DataFrame)."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the server says of the job (e.g. the number of events)."""


async def publish_file(
    exporter: FiddlerV3Exporter,
    dest: Destination,
    source: Any,
    *,
    event_ids: list[str | None] | None,
    stamp_publish_time: bool,
    progress: ProgressCallback | None,
    poll_interval: float,
    timeout: float,
) -> FileJob:
    report = progress or (lambda stage, done: None)
    path = await _path_of(source, event_ids)  # what needs no server is checked first
    file_id = job_id = status = None
    with anyio.move_on_after(timeout) as deadline:  # the upload, the publish and the job's run
        info = await exporter.resolve(dest.model)
        stamp = int(time.time() * 1000) if stamp_publish_time and not dest.update else None
        ids: list[str] = []  # known when the rows are ours to place (a frame)
        if path is not None:
            name, data = path.name, await anyio.Path(path).read_bytes()
        else:
            name, data, ids = await _frame_file(source, info, dest.update, event_ids, stamp)
        report("upload", 0.0)
        file_id = await exporter.upload_file(name, data)
        report("upload", 1.0)
        try:
            job_id = await exporter.publish_file(info, dest, file_id)
        except (TransportError, ServerError) as exc:
            if not_acted_on(exc):
                raise
            raise FileJobError(
                f"publishing file {file_id} to {dest.describe()} failed "
                f"({str(exc).rstrip('.')}), but the server may have started its job: look "
                "(GET /v3/jobs) before publishing the file again",
                file_id=file_id,
                reason=type(exc).__name__,
            ) from exc
        while True:
            try:
                job = await exporter.job(job_id)
            except (TransportError, APIError) as exc:  # after its retries
                raise FileJobError(
                    f"following job {job_id} of {dest.describe()} failed "
                    f"({str(exc).rstrip('.')}); the job may still finish: look (GET "
                    f"/v3/jobs/{job_id}) before publishing the file again",
                    job_id=job_id,
                    reason=type(exc).__name__,
                    file_id=file_id,
                ) from exc
            status = str(job.get("status", "")).upper()
            report("job", min(1.0, float(job.get("progress") or 0) / 100))
            if status in ("SUCCESS", "SUCCESSFUL"):
                return FileJob(job_id, file_id, status, tuple(ids), dict(job.get("info") or {}))
            if status in ("FAILURE", "FAILED", "REVOKED"):
                raise FileJobError(
                    f"job {job_id} of {dest.describe()} failed: "
                    f"{job.get('error_reason') or status}: {job.get('error_message') or ''}",
                    job_id=job_id,
                    reason=str(job.get("error_reason") or ""),
                    file_id=file_id,
                )
            await anyio.sleep(poll_interval)
    assert deadline.cancelled_caught  # the loop above ends only by returning or raising
    if job_id is not None:
        state = f"was {status}" if status else "was started, its state not known yet"
        where = f"job {job_id} {state}: it may still finish (GET /v3/jobs/{job_id})"
    elif file_id is not None:
        where = f"file {file_id} was uploaded; its job may or may not have been started"
    else:
        where = "nothing was published"
    raise FileJobTimeoutError(
        f"publish_file to {dest.describe()} ran past its timeout ({timeout} s): {where}",
        job_id=job_id,
        file_id=file_id,
    )


async def _path_of(source: Any, event_ids: list[str | None] | None) -> Path | None:
    """The file to send as it is, checked; None for a DataFrame or Arrow table."""
    if is_frame(source):
        return None
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source must be a DataFrame, an Arrow table or a file path, "
            f"got {type(source).__qualname__!r}"
        )
    path = Path(source)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"{path}: a file to publish is one of {', '.join(FILE_SUFFIXES)}")
    if event_ids is not None:
        raise ValueError(
            "event_ids= places ids in a DataFrame's rows; a file is sent as it is: put "
            "the ids in the file's id column"
        )
    _check_size(str(path), (await anyio.Path(path).stat()).st_size)
    return path


async def _frame_file(
    frame: Any, info: ModelInfo, update: bool, event_ids: list[str | None] | None, stamp: int | None
) -> tuple[str, bytes, list[str]]:
    """The frame as a Parquet file to upload: (name, content, the ids placed in it)."""
    # On a worker thread: for millions of rows this takes a second (polars lets go of the
    # GIL while it writes). The caller awaits, so the frame is not changed meanwhile.
    data, ids = await anyio.to_thread.run_sync(
        functools.partial(
            frame_to_parquet, frame, info, update=update, event_ids=event_ids, stamp_millis=stamp
        )
    )
    _check_size("the DataFrame as Parquet", len(data))
    return "events.parquet", data, ids


def check_options(progress: object, poll_interval: object, timeout: object) -> None:
    """``publish_file``'s options, checked before anything is sent (a wrong one found after
    the upload would leave a job started and no id of it)."""
    _check_seconds("poll_interval", poll_interval, infinite=False)
    _check_seconds("timeout", timeout, infinite=True)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable or None, got {type(progress).__qualname__!r}")


def _check_seconds(name: str, value: object, *, infinite: bool) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__qualname__!r}")
    seconds = float(value)
    if not seconds > 0 or (math.isinf(seconds) and not infinite):  # (NaN is not > 0)
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _check_size(what: str, size: int) -> None:
    if size >= MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{what} is {size / 1024**2:.0f} MB: Fiddler takes files under 100 MB in one "
            "upload, and the upload in parts is not supported yet: publish it in smaller files"
        )
