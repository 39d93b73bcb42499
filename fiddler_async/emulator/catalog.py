"""The projects and models an emulator serves, from a small declarative TOML file.

Ids are derived from the names (UUID v5), so an emulator restarted on the same database file
serves the same ids, and the events stored under them stay reachable.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DATA_TYPES", "Catalog", "ModelDef", "load_catalog"]

DATA_TYPES = ("int", "float", "bool", "str", "category", "timestamp", "vector")
SPEC_KEYS = ("inputs", "outputs", "targets", "decisions", "metadata")
_NAMESPACE = uuid.UUID("6f1d4c1e-2b0a-4d59-9a57-5b0f4f4b7c11")
_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).isoformat()
ORGANIZATION = {"id": str(uuid.uuid5(_NAMESPACE, "org:emulator")), "name": "emulator"}
USER = {"id": str(uuid.uuid5(_NAMESPACE, "user:emulator")), "full_name": "Emulator", "email": ""}


@dataclass(frozen=True)
class ModelDef:
    project: str
    name: str
    columns: tuple[tuple[str, str], ...]
    version: str = "v1"
    task: str = "NOT_SET"
    event_id_col: str | None = None
    event_ts_col: str | None = None
    event_ts_format: str | None = None
    spec: dict[str, list[str]] = field(default_factory=dict, hash=False)

    @functools.cached_property  # looked up on every request
    def project_id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"project:{self.project}"))

    @functools.cached_property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"model:{self.project}/{self.name}/{self.version}"))

    @property
    def types(self) -> dict[str, str]:
        return dict(self.columns)

    def project_record(self) -> dict[str, Any]:
        return {
            "id": self.project_id,
            "name": self.project,
            "created_at": _EPOCH,
            "updated_at": _EPOCH,
            "organization": ORGANIZATION,
        }

    def compact_record(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "version": self.version}

    def record(self) -> dict[str, Any]:
        """The model as ``GET /v3/models/{id}`` answers it."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "input_type": "structured",
            "task": self.task,
            "task_params": {},
            "schema": {
                "schema_version": 1,
                "columns": [
                    {"name": n, "data_type": t, "min": None, "max": None, "categories": None}
                    for n, t in self.columns
                ],
            },
            "spec": {
                "schema_version": 1,
                **{k: self.spec.get(k, []) for k in SPEC_KEYS},
                "custom_features": [],  # (none emulated)
            },
            "description": None,
            "event_id_col": self.event_id_col,
            "event_ts_col": self.event_ts_col,
            "event_ts_format": self.event_ts_format,
            "xai_params": None,
            "artifact_status": "no_model",
            "artifact_files": [],
            "created_at": _EPOCH,
            "updated_at": _EPOCH,
            "created_by": USER,
            "updated_by": USER,
            "organization": ORGANIZATION,
            "project": {"id": self.project_id, "name": self.project},
            "is_binary_ranking_model": False,
        }


@dataclass
class Catalog:
    models: list[ModelDef]

    def projects(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for model in self.models:
            seen.setdefault(model.project_id, model.project_record())
        return list(seen.values())

    def model(self, model_id: str) -> ModelDef | None:
        return next((m for m in self.models if m.id == model_id), None)

    def find(self, project: str, name: str) -> ModelDef | None:
        return next((m for m in self.models if m.project == project and m.name == name), None)


def _model_from_table(table: dict[str, Any], where: str) -> ModelDef:
    try:
        project, name, columns = table["project"], table["name"], table["columns"]
    except KeyError as exc:
        raise ValueError(
            f"{where}: a model needs project, name and [columns]; {exc} missing"
        ) from None
    if not isinstance(columns, dict):
        raise ValueError(f"{where}: [columns] must be a table of column = type")  # noqa: TRY004
    if not isinstance(table.get("spec", {}), dict) or not all(
        isinstance(names, list) and all(isinstance(name, str) for name in names)
        for names in table.get("spec", {}).values()
    ):
        raise ValueError(f"{where}: [spec] must be a table of lists of column names")
    for key in ("project", "name", "event_id_col", "event_ts_col", "event_ts_format"):
        if table.get(key) is not None and not isinstance(table[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {table[key]!r}")
    for column, data_type in columns.items():
        if data_type not in DATA_TYPES:
            raise ValueError(f"{where}: column {column!r} has unknown type {data_type!r}")
    spec = {k: list(v) for k, v in table.get("spec", {}).items()}
    for key, names in spec.items():
        unknown = [n for n in names if n not in columns]
        if key not in SPEC_KEYS or unknown:
            raise ValueError(f"{where}: spec.{key} names unknown columns {unknown}")
    for key in ("event_id_col", "event_ts_col"):
        if table.get(key) is not None and table[key] not in columns:
            raise ValueError(f"{where}: {key} {table[key]!r} is not a column")
    return ModelDef(
        project=str(project),
        name=str(name),
        version=str(table.get("version", "v1")),
        task=str(table.get("task", "NOT_SET")),
        columns=tuple((str(k), str(v)) for k, v in columns.items()),
        event_id_col=table.get("event_id_col"),
        event_ts_col=table.get("event_ts_col"),
        event_ts_format=table.get("event_ts_format"),
        spec=spec,
    )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read a models file; without one, the bank-churn model that ships with the package."""
    if path is None:
        text = resources.files(__package__).joinpath("bank_churn.toml").read_text("utf-8")
        where = "bank_churn.toml"
    else:
        text = Path(path).read_text("utf-8")
        where = str(path)
    tables = tomllib.loads(text).get("models", [])
    if not tables:
        raise ValueError(f"{where}: no [[models]] defined")
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ValueError(f"{where}: each model is a [[models]] table")
    return Catalog([_model_from_table(t, f"{where}: models[{i}]") for i, t in enumerate(tables)])
