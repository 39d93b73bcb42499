"""Where the emulator keeps what it receives: SQLite, in a file or in memory.

A restart on the same file keeps every event. An update (``PATCH``) merges its columns into the
stored events with the same id (by the model's event id column). An update whose id matches no
stored event yet is kept as a row of its own, and the insert that comes later with that id is
merged into it (the update's columns win), so nothing sent is lost and arrival order does not
create duplicates. Until then it is a pending update, not an event: the counts and listings of
events leave it out (an update cannot stand in for a lost insert). Only two inserts with the
same id make a duplicate. Uploaded files and
publish jobs are kept here too. One connection, guarded by a lock: the server thread writes and
a test or the CLI may read at the same time.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..encode import encode_event

__all__ = ["Store"]

# The rows of one event: same model, environment and id.
_SAME_EVENT = "model_id = ? AND env_type = ? AND env_name IS ? AND event_id = ?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id TEXT NOT NULL,
    env_type TEXT NOT NULL,
    env_name TEXT,
    event_id TEXT,
    data TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL,
    origin TEXT NOT NULL DEFAULT 'insert'
);
CREATE INDEX IF NOT EXISTS events_by_id ON events (model_id, event_id);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    content BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL,
    info TEXT NOT NULL,
    error_message TEXT,
    error_reason TEXT,
    created_at REAL NOT NULL
);
"""


class Store:
    def __init__(
        self, path: str = ":memory:", *, count_only: bool = False, read_only: bool = False
    ) -> None:
        """``read_only``: only to look (``fiddler-async inspect``): a file that is not an
        emulator's is left as it was, and raises ``sqlite3.Error`` at the first query."""
        self.path = path
        self.count_only = count_only
        self._lock = threading.Lock()
        if read_only:
            uri = f"{Path(path).resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._refuse_another_database()
            self._db.execute(
                "PRAGMA journal_mode=WAL" if path != ":memory:" else "PRAGMA journal_mode=MEMORY"
            )
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._counts: dict[str, int] = {}
        (self._early_updates,) = self._db.execute(
            "SELECT COUNT(*) FROM events WHERE origin = 'update'"
        ).fetchone()
        self.early_updates_seen = 0
        """Updates that arrived before any event with their id (since this store opened)."""

    def _refuse_another_database(self) -> None:
        """sqlite3.DatabaseError for a file that holds tables but not the emulator's events:
        someone else's database, which the emulator must not add its tables to."""
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        try:
            tables = sorted(name for (name,) in self._db.execute(query))
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        except sqlite3.Error:  # not an SQLite file at all
            self._db.close()
            raise
        if tables and not {"model_id", "event_id", "data"} <= columns:
            self._db.close()
            raise sqlite3.DatabaseError(
                f"it holds other tables ({', '.join(tables[:5])}) and not the emulator's "
                "events: left as it was"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Events

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time, all or nothing: a request's events are stored whole or not at
        all (the connection is in autocommit mode, so the transaction is explicit)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_count(self, model_id: str, events: int) -> None:
        """What a count-only store keeps of new events: how many, by model."""
        with self._lock:
            self._counts[model_id] = self._counts.get(model_id, 0) + events

    def insert(
        self,
        model_id: str,
        env_type: str,
        env_name: str | None,
        id_col: str | None,
        events: Sequence[Mapping[str, Any]],
    ) -> None:
        if self.count_only:
            self.add_count(model_id, len(events))
            return
        where = (model_id, env_type, env_name)
        with self._transaction() as db:
            if self._early_updates:
                events = self._merge_early_updates(db, where, id_col, events)
            self._insert_rows(db, where, id_col, events, "insert")

    def _insert_rows(
        self,
        db: sqlite3.Connection,
        where: tuple[str, str, str | None],
        id_col: str | None,
        events: Sequence[Mapping[str, Any]],
        origin: str,
    ) -> None:
        now = time.time()
        db.executemany(
            "INSERT INTO events (model_id, env_type, env_name, event_id, data, received_at,"
            " origin) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*where, _id_of(e, id_col), _json(e), now, origin) for e in events],
        )
        if origin == "update":
            self._early_updates += len(events)

    def _merge_early_updates(
        self,
        db: sqlite3.Connection,
        where: tuple[str, str, str | None],
        id_col: str | None,
        events: Sequence[Mapping[str, Any]],
    ) -> list[Mapping[str, Any]]:
        """Merge inserts into the updates that arrived before them; return the other inserts."""
        rest: list[Mapping[str, Any]] = []
        for event in events:
            row = db.execute(
                f"SELECT seq, data FROM events WHERE {_SAME_EVENT} AND origin = 'update'",
                (*where, _id_of(event, id_col)),
            ).fetchone()
            if row is None:
                rest.append(event)
                continue
            db.execute(
                "UPDATE events SET data = ?, updated_at = ?, origin = 'insert' WHERE seq = ?",
                (_json({**event, **orjson.loads(row[1])}), time.time(), row[0]),
            )
            self._early_updates -= 1
        return rest

    def update(
        self,
        model_id: str,
        env_type: str,
        env_name: str | None,
        id_col: str,
        events: Sequence[Mapping[str, Any]],
    ) -> int:
        """Merge each event into the stored ones with its id in the same environment; returns
        how many matched none (kept until their event comes)."""
        if self.count_only:
            return 0
        folded: dict[str | None, dict[str, Any]] = {}
        for event in events:  # several updates of one id in one request: the last value wins
            folded.setdefault(_id_of(event, id_col), {}).update(event)
        where = (model_id, env_type, env_name)
        unmatched: list[Mapping[str, Any]] = []
        now = time.time()
        with self._transaction() as db:
            for event_id, event in folded.items():
                rows = db.execute(
                    f"SELECT seq, data FROM events WHERE {_SAME_EVENT}", (*where, event_id)
                ).fetchall()
                if not rows:
                    unmatched.append(event)
                for seq, data in rows:
                    db.execute(
                        "UPDATE events SET data = ?, updated_at = ? WHERE seq = ?",
                        (_json({**orjson.loads(data), **event}), now, seq),
                    )
            self._insert_rows(db, where, id_col, unmatched, "update")
        self.early_updates_seen += len(unmatched)
        return len(unmatched)

    def count(self, model_id: str | None = None) -> int:
        """Events stored (pending updates are not events yet)."""
        with self._lock:
            if self.count_only:
                return sum(n for m, n in self._counts.items() if model_id in (None, m))
            return self._count_rows("insert", model_id)

    def pending_updates(self, model_id: str | None = None) -> int:
        """Updates kept until an event with their id comes."""
        with self._lock:
            return 0 if self.count_only else self._count_rows("update", model_id)

    def pending(self, model_id: str) -> list[dict[str, Any]]:
        """Those updates of the model, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM events WHERE model_id = ? AND origin = 'update' ORDER BY seq",
                (model_id,),
            ).fetchall()
        return [orjson.loads(data) for (data,) in rows]

    def _count_rows(self, origin: str, model_id: str | None) -> int:
        query = "SELECT COUNT(*) FROM events WHERE origin = ?"
        if model_id is None:
            return int(self._db.execute(query, (origin,)).fetchone()[0])
        query += " AND model_id = ?"
        return int(self._db.execute(query, (origin, model_id)).fetchone()[0])

    def events(
        self, model_id: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM events WHERE model_id = ? AND origin = 'insert' ORDER BY seq"
                " LIMIT ? OFFSET ?",
                (model_id, -1 if limit is None else limit, offset),
            ).fetchall()
        return [orjson.loads(data) for (data,) in rows]

    def duplicates(self, model_id: str) -> dict[str, int]:
        """Event ids inserted more than once into one environment of the model, with how many
        times (summed over environments)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, COUNT(*) FROM events WHERE model_id = ? AND event_id IS NOT NULL"
                " AND origin = 'insert' GROUP BY env_type, env_name, event_id HAVING COUNT(*) > 1",
                (model_id,),
            ).fetchall()
        found: dict[str, int] = {}
        for event_id, times in rows:
            found[str(event_id)] = found.get(str(event_id), 0) + int(times)
        return found

    def distinct_ids(self, model_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT event_id) FROM events WHERE model_id = ?"
                " AND origin = 'insert'",
                (model_id,),
            ).fetchone()
        return int(row[0])

    def clear(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM events")
            self._counts.clear()
            self._early_updates = 0

    # Files and jobs

    def add_file(self, name: str, content: bytes) -> str:
        file_id = str(uuid.uuid4())
        with self._transaction() as db:
            db.execute(
                "INSERT INTO files (id, name, content, created_at) VALUES (?, ?, ?, ?)",
                (file_id, name, content, time.time()),
            )
        return file_id

    def file(self, file_id: str) -> tuple[str, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, content FROM files WHERE id = ?", (file_id,)
            ).fetchone()
        return (str(row[0]), bytes(row[1])) if row else None

    def save_job(self, job: Mapping[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs (id, name, status, progress, info, error_message,"
                " error_reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job["id"],
                    job["name"],
                    job["status"],
                    job["progress"],
                    json.dumps(job.get("info", {})),
                    job.get("error_message"),
                    job.get("error_reason"),
                    time.time(),
                ),
            )

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, status, progress, info, error_message, error_reason"
                " FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        keys = ("id", "name", "status", "progress", "info", "error_message", "error_reason")
        job = dict(zip(keys, row, strict=True))
        job["info"] = json.loads(job["info"])
        return job


def _json(event: Mapping[str, Any]) -> str:
    """An event as stored: as JSON, the values of a file's rows (decimals, times) included."""
    return encode_event(event).decode()


def _id_of(event: Mapping[str, Any], id_col: str | None) -> str | None:
    if id_col is None:
        return None
    value = event.get(id_col)
    return None if value is None else str(value)
