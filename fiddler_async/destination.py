"""Where an event goes: a model (by name, resolved once to its schema) and a request kind.

A :class:`Destination` is one stream of requests: the same model, environment and method
(``POST`` to insert, ``PATCH`` to update). Events are batched per destination. All destinations
of one model share a :class:`ModelRef`, which holds the model's schema once it is resolved.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from functools import cached_property

import orjson

__all__ = ["ENV_TYPES", "Destination", "ModelInfo", "ModelRef", "model_uuid"]

ENV_TYPES: tuple[str, ...] = ("PRODUCTION", "PRE_PRODUCTION")


def model_uuid(model: str) -> str | None:
    """A model given by its UUID: the UUID as the server writes it (lower case, with hyphens)
    however the caller wrote it; None for a name. A UUID names one model whatever project is
    given with it (the lookup does not use it)."""
    try:
        return str(uuid.UUID(model))
    except ValueError:
        return None


@dataclass(frozen=True)
class ModelInfo:
    """The facts of a resolved model that a publisher needs (from ``GET /v3/models/{id}``)."""

    id: str
    name: str
    project_id: str
    project_name: str
    version: str | None = None
    event_id_col: str | None = None
    event_ts_col: str | None = None
    event_ts_format: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    """The schema's columns: (name, data type), in order."""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    # Computed once per model, for the publish path: `"column":` prefixes and the time format.
    @cached_property
    def id_key(self) -> bytes:
        return orjson.dumps(self.event_id_col) + b":"

    @cached_property
    def ts_key(self) -> bytes:
        return orjson.dumps(self.event_ts_col) + b":"

    @cached_property
    def new_event_head(self) -> bytes:
        """``{"<id column>":"``: how a new event starts, its id next (see _prepare_new)."""
        return b"{" + self.id_key + b'"'

    @cached_property
    def _ts_style(self) -> str:
        return time_style(self.event_ts_format)

    def timestamp_json(self, millis: int) -> bytes:
        """An epoch-milliseconds time as the JSON value the model's timestamp column expects.

        ``event_ts_format`` may be a strftime pattern (the time is written in UTC), ``epoch
        seconds``, or ``epoch milliseconds``/``infer``/unset (epoch milliseconds are sent).
        """
        style = self._ts_style
        if style == "millis":
            return b"%d" % millis
        if style == "seconds":
            seconds, rest = divmod(millis, 1000)
            return b"%d" % seconds if not rest else orjson.dumps(millis / 1000)
        moment = dt.datetime.fromtimestamp(millis / 1000, tz=dt.timezone.utc)
        pattern = self.event_ts_format or ""
        if moment.year < 1000:  # %Y writes "999", which the pattern cannot read back
            year = f"{moment.year:04d}"
            pattern = "%%".join(part.replace("%Y", year) for part in pattern.split("%%"))
        return orjson.dumps(moment.strftime(pattern))


def time_style(event_ts_format: str | None) -> str:
    """How a model's times are written, by its ``event_ts_format``: ``strftime`` (a pattern),
    ``seconds`` (``epoch seconds``) or ``millis`` (anything else: epoch milliseconds)."""
    fmt = (event_ts_format or "").strip()
    if "%" in fmt:
        return "strftime"
    return "seconds" if fmt.lower() == "epoch seconds" else "millis"


@dataclass(eq=False)
class ModelRef:
    """A model as the caller names it; ``info`` is filled in once the name is resolved."""

    project: str
    model: str
    info: ModelInfo | None = None
    batch_wait_until: float | None = None
    """Until when batch calls may wait for the first lookup (set by the first batch call)."""

    @property
    def label(self) -> str:
        return f"{self.project}/{self.model}"


@dataclass(frozen=True, eq=False)
class Destination:
    """One stream of requests: a model, an environment, and insert (POST) or update (PATCH)."""

    model: ModelRef
    env_type: str
    env_name: str | None
    update: bool

    @property
    def method(self) -> str:
        return "PATCH" if self.update else "POST"

    def describe(self) -> str:
        env = self.env_type if self.env_name is None else f"{self.env_type}:{self.env_name}"
        return f"{self.method} {self.model.label} ({env})"
