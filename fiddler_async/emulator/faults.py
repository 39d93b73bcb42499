"""Fault injection: what a misbehaving Fiddler does, set at start and changeable while running.

Fractions apply to each publish request (``POST``/``PATCH /v3/events``) independently; the
outage window, the latency and the body size limit apply to every ``/v3`` request. ``script``
forces the answers of the next publish requests, in order, for tests that need determinism:
an error status (``"503"``, 400 to 599), ``"ok"`` (answer normally), ``"drop"`` (close the
connection without an answer, nothing stored), ``"lose"`` (store the events, then close the
connection without an answer: the client cannot know, and a retry makes duplicates), or
``"hang"`` (hold the request until the emulator stops).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["Decision", "Faults"]

Decision = tuple[Literal["ok", "status", "drop", "lose", "hang"], int]
_STEPS = ("ok", "drop", "lose", "hang")
_FRACTIONS = ("error_503", "error_429", "drop", "lose", "spike")
_SECONDS = ("retry_after", "latency", "spike_latency", "outage_seconds")


@dataclass
class Faults:
    error_503: float = 0.0
    """Fraction of publish requests answered 503."""
    error_429: float = 0.0
    """Fraction of publish requests answered 429 with a Retry-After of ``retry_after``."""
    retry_after: float = 1.0
    drop: float = 0.0
    """Fraction of publish requests whose connection is closed without an answer."""
    lose: float = 0.0
    """Fraction of publish requests stored, then answered by a closed connection."""
    latency: float = 0.0
    """Seconds added to every answer."""
    spike: float = 0.0
    """Fraction of requests delayed by ``spike_latency`` more."""
    spike_latency: float = 0.0
    outage_until: float = 0.0
    """Until this time (epoch seconds), every request is answered 503."""
    max_body_bytes: int = 0
    """Requests with larger bodies are answered 413 (0: no limit)."""
    seed: int | None = None
    script: list[str] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The same checks as a change through the admin API (the serve command's flags too).
        known = self._names()
        for name in known:
            setattr(self, name, _parse(name, getattr(self, name), known))
        self._rng = random.Random(self.seed)

    def update(self, changes: Any) -> None:
        """Apply changes (from the admin API: a JSON object), all of them or, if one is
        invalid, none; ``outage_seconds`` starts an outage from now."""
        if not isinstance(changes, dict):
            raise TypeError("faults are a JSON object of name: value")
        known = self._names() | {"outage_seconds"}
        parsed = {key: _parse(key, value, known) for key, value in changes.items()}
        for key, value in parsed.items():
            if key == "outage_seconds":
                self.outage_until = time.time() + value
            else:
                setattr(self, key, value)
            if key == "seed":
                self._rng = random.Random(value)

    def _names(self) -> set[str]:
        return {f.name for f in fields(self) if not f.name.startswith("_")}

    def snapshot(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def in_outage(self) -> bool:
        return time.time() < self.outage_until

    def delay(self) -> float:
        extra = self.spike_latency if self.spike and self._rng.random() < self.spike else 0.0
        return self.latency + extra

    def decide_publish(self) -> Decision:
        if self.script:
            forced = self.script.pop(0)
            if forced in _STEPS:
                return (forced, 0)  # type: ignore[return-value]
            return ("status", int(forced))
        draw = self._rng.random()
        for decision, fraction in (
            (("drop", 0), self.drop),
            (("lose", 0), self.lose),
            (("status", 503), self.error_503),
            (("status", 429), self.error_429),
        ):
            if draw < fraction:
                return decision  # type: ignore[return-value]
            draw -= fraction
        return ("ok", 0)


def _parse(key: str, value: Any, known: set[str]) -> Any:
    if key not in known:
        raise ValueError(f"unknown fault {key!r}; known: {sorted(known)}")
    if key == "script":
        if not isinstance(value, list):
            raise ValueError('script is a list of steps, e.g. ["503", "drop"]')
        steps = [str(step) for step in value]
        for step in steps:
            if step not in _STEPS and not (step.isdigit() and 400 <= int(step) <= 599):
                raise ValueError(f"script step {step!r}: an error status 400-599 or {_STEPS}")
        return steps
    if key == "seed":
        return None if value is None else int(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if key in _FRACTIONS and not 0 <= number <= 1:
        raise ValueError(f"{key} is a fraction from 0 to 1, not {value!r}")
    if number < 0:
        raise ValueError(f"{key} must not be negative, got {value!r}")
    return int(number) if key == "max_body_bytes" else number
