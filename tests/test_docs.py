"""The troubleshooting page documents every log line and every error a user can meet."""

from __future__ import annotations

import re
from pathlib import Path

import fiddler_async.exceptions

ROOT = Path(__file__).parent.parent
PAGE = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")


def logged_events() -> set[str]:
    """Every ``fiddler_event`` the package can log: the names given to ``event(...)``, and
    the kinds of the rate-limited keys (``"drop:..."`` is ``drop``)."""
    events: set[str] = set()
    for path in (ROOT / "fiddler_async").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        events |= set(re.findall(r'event\("([a-z-]+)"\)', source))
        for call in re.finditer(r"(?:_log\.(?:warning|error)|_warn)\(\s*f?\"([a-z-]+)", source):
            events.add(call.group(1))
    return events


def test_every_log_event_is_documented() -> None:
    events = logged_events()
    assert {"drop", "retry", "failed", "breaker-open", "close-deadline"} <= events
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", PAGE, re.MULTILINE))
    assert events <= documented, events - documented


def test_every_error_is_documented() -> None:
    errors = {
        name
        for name in fiddler_async.exceptions.__all__
        if name not in {"FiddlerError", "APIError", "TransportError", "ErrorReason"}
    }
    assert {name for name in errors if f"`{name}`" not in PAGE} == set()
