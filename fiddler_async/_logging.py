"""The library's logger, with repeats of the same warning limited to one per interval.

A full queue or a down backend can produce the same warning thousands of times a second; a log
flood is its own outage. Each kind of message (a key) is logged at most once per interval, and
the next line says how many were held back.

Every record is structured: ``record.fiddler_event`` names what happened (``drop``,
``retry``, ``failed``, ``breaker-open``, ...; each is documented in docs/troubleshooting.md),
and rate-limited records also carry ``fiddler_key`` (the kind of message) and
``fiddler_held`` (how many like it were held back). A JSON log formatter can pick them up.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("fiddler_async")

__all__ = ["RateLimitedLog", "event", "logger"]


class RateLimitedLog:
    def __init__(self, interval: float, log: logging.Logger = logger) -> None:
        self._interval = interval
        self._log = log
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        self.emit(logging.WARNING, key, message, *args)

    def error(self, key: str, message: str, *args: object) -> None:
        self.emit(logging.ERROR, key, message, *args)

    def emit(self, level: int, key: str, message: str, *args: object) -> None:
        """Log ``message`` (``%``-formatted with ``args``, only if it is logged)."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        if args:
            message = message % args
        held = self._held.pop(key, 0)
        if held:
            message = f"{message} (and {held} more like this since the last report)"
        extra = {"fiddler_event": key.partition(":")[0], "fiddler_key": key, "fiddler_held": held}
        self._log.log(level, message, extra=extra)


def event(name: str) -> dict[str, str]:
    """``extra=`` for a record that is not rate-limited: ``logger.warning(..., extra=event(n))``."""
    return {"fiddler_event": name}
