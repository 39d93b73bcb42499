"""Fault injection: what a misbehaving Fiddler does, set at start and changeable while running.

Fractions apply to each publish request (``POST``/``PATCH /v3/events``) independently; the
outage window, the latency and the body size limit apply to every ``/v3`` request. ``script``
forces the answers of the next publish requests, in order, for tests that need determinism:
a status code (``"503"``), ``"drop"`` (close the connection without an answer) or ``"hang"``
(hold the request until the emulator stops).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["Decision", "Faults"]

Decision = tuple[Literal["ok", "status", "drop", "hang"], int]


@dataclass
class Faults:
    error_503: float = 0.0
    """Fraction of publish requests answered 503."""
    error_429: float = 0.0
    """Fraction of publish requests answered 429 with a Retry-After of ``retry_after``."""
    retry_after: float = 1.0
    drop: float = 0.0
    """Fraction of publish requests whose connection is closed without an answer."""
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
        self._rng = random.Random(self.seed)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply changes from the admin API; ``outage_seconds`` starts an outage from now."""
        known = {f.name for f in fields(self) if not f.name.startswith("_")} | {"outage_seconds"}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r}; known: {sorted(known)}")
            if key == "outage_seconds":
                self.outage_until = time.time() + float(value)
            elif key == "script":
                self.script = [str(step) for step in value]
            elif key == "seed":
                self.seed = value
                self._rng = random.Random(value)
            elif key == "max_body_bytes":
                self.max_body_bytes = int(value)
            else:
                setattr(self, key, float(value))

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
            if forced in ("drop", "hang"):
                return (forced, 0)  # type: ignore[return-value]
            return ("status", int(forced))
        draw = self._rng.random()
        for kind, fraction in (
            ("drop", self.drop),
            ("503", self.error_503),
            ("429", self.error_429),
        ):
            if draw < fraction:
                return ("drop", 0) if kind == "drop" else ("status", int(kind))
            draw -= fraction
        return ("ok", 0)
