"""The durable spool: events that cannot be delivered in time wait on disk instead of being lost.

With ``PublisherConfig(spool_dir=...)``, events go to the spool instead of being dropped or
failed when the backend stays down beyond the retry budget, when the queue is over its memory
budget, or when the close deadline comes. A replayer sends them, oldest first, once the backend
answers again, in this process or in the next one that opens the same directory.

On disk, one file per spilled batch::

    spool_dir/
        00001764278000123456789-4242-000001.events    a batch, named so that names sort by age
        .replay.lock                                  held by the one process replaying
        dead-letters.jsonl                            events the server refused, with why

A batch file is written to a hidden temporary name, synced (``spool_fsync``), then renamed:
a process killed at any moment leaves either the whole file or none of it (a temporary left
behind is removed later). Each file starts with a checksum; a file that fails it (a damaged
disk) is renamed ``*.corrupt`` and reported, never half-sent. The directory and its files are
readable by their owner only, and hold event data and model names: no token, no header.

The file format, text, one batch::

    FIDDLER-SPOOL 1 <crc32 of the rest, 8 hex digits> <event count>\\n
    {"project": ..., "model": ..., "env_type": ..., "env_name": ..., "update": ...}\\n
    <fix-up JSON or null>\\t<event JSON>\\n        (one line per event)

Event JSON as encoded by orjson holds no raw newline or tab, so lines and fields split safely.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX: the spool's replay lock
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from .buffer import Fixup, Item
from .destination import Destination

__all__ = [
    "Spool",
    "SpoolCorruptError",
    "SpoolFullError",
    "SpoolKey",
    "SpooledBatch",
    "is_spool_entry",
    "iter_dead_letters",
    "replay_key",
]

MAGIC = b"FIDDLER-SPOOL 1"
SUFFIX = ".events"
DEAD_LETTERS = "dead-letters.jsonl"
LOCK = ".replay.lock"
STALE_TEMP_SECONDS = 600.0
"""A temporary file lives for one write; one older than this was left by a killed process."""
RECOUNT_SECONDS = 1.0
RECOUNT_EVERY_WRITE_BELOW = 1000
"""How long, and below how many files, a write trusts its count of the bytes on disk (see
:meth:`Spool.write`)."""
_TEMPORARY = re.compile(r"\.\d+-\d+-\d+\.events\.\d+\.tmp")
"""The name of a batch file being written (see :meth:`Spool._write_atomically`)."""


def is_spool_entry(name: str) -> bool:
    """Whether a name in a directory is one a spool puts there."""
    return (
        name in (DEAD_LETTERS, LOCK)
        or name.endswith((SUFFIX, SUFFIX + ".corrupt"))
        or _TEMPORARY.fullmatch(name) is not None
    )


def replay_key(update: bool, first: int, last: int) -> int:
    """Where a batch of this process goes in the replay, from the sequence numbers of its
    events: inserts by their first, updates by their last. So an update goes after every
    insert accepted before it, even one spooled in a later file (an update batch may span
    an insert that failed on its own), and two updates of one id keep their order."""
    return last if update else first


class Written(NamedTuple):
    """A batch file this process wrote, as it remembers it."""

    place: int
    """Its place in the replay (:func:`replay_key`)."""
    last_seq: int
    """The sequence number of its last event."""
    key: SpoolKey
    events: int


class SpoolFullError(Exception):
    """Writing would take the spool over ``spool_max_bytes``."""


class SpoolCorruptError(Exception):
    """A spool file does not pass its checksum (it was damaged after it was written)."""


@dataclass(frozen=True)
class SpoolKey:
    """Where a spilled batch goes: what a Destination says, in plain names."""

    project: str
    model: str
    env_type: str
    env_name: str | None
    update: bool

    @classmethod
    def of(cls, dest: Destination) -> SpoolKey:
        return cls(dest.model.project, dest.model.model, dest.env_type, dest.env_name, dest.update)


@dataclass(frozen=True)
class SpooledBatch:
    path: Path
    key: SpoolKey
    items: list[Item]
    """The events, as queue items (sequence number 0: they belong to no ledger of this run)."""


class Spool:
    """Blocking file operations on a spool directory. Writes may come from several threads;
    a lock keeps the byte count right."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, fsync: bool) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._counter = 0
        self._lock_file: IO[bytes] | None = None
        self.used_bytes = 0
        """The bytes of the batch files on disk, as last counted, and of this object's
        written since."""
        self._reserved = 0
        """The bytes of this object's writes in progress (not on disk under their name yet)."""
        self._writing: set[str] = set()
        self._counted_at = -math.inf
        self._files_counted = 0
        self.written_here: dict[str, Written] = {}
        """The batch files this object wrote that are still on disk (or being written), by
        name. The others in the directory are earlier or other processes'."""

    def open(self) -> None:
        """Create the directory (owner only), remove temporaries of killed writers, and count
        the bytes already in use."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.stat().st_uid == os.getuid():
            self.directory.chmod(0o700)
        now = time.time()
        for entry in os.scandir(self.directory):
            if _TEMPORARY.fullmatch(entry.name):  # ours only: never a file of someone else's
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                        os.unlink(entry.path)
        self._recount()

    def _recount(self) -> None:
        """Count the bytes of the batch files on disk: other processes sharing the directory
        add and remove files this one does not see."""
        self._counted_at = time.monotonic()
        used = files = 0
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    used += entry.stat().st_size
                    files += 1
        self.used_bytes, self._files_counted = used, files

    # Batches

    def write(self, key: SpoolKey, items: Sequence[Item]) -> Path:
        """Write one batch file, all or nothing. SpoolFullError if over the disk bound."""
        data = _encode(key, items)
        with self._lock:
            # Other processes sharing the directory add files this one does not see: counted
            # afresh before each write. A scan costs ~5 µs a file, so a big spool (of
            # RECOUNT_EVERY_WRITE_BELOW files or more) is counted afresh only near the bound
            # (within a tenth of it), and else at least every RECOUNT_SECONDS.
            if (
                self._files_counted < RECOUNT_EVERY_WRITE_BELOW
                or self.used_bytes + self._reserved + len(data) > self.max_bytes * 0.9
                or time.monotonic() - self._counted_at > RECOUNT_SECONDS
            ):
                self._recount()
            if self.used_bytes + self._reserved + len(data) > self.max_bytes:
                raise SpoolFullError(
                    f"spool {self.directory} holds {self.used_bytes + self._reserved} bytes; "
                    f"{len(data)} more would pass spool_max_bytes ({self.max_bytes})"
                )
            self._reserved += len(data)
            self._counter += 1
            name = f"{time.time_ns():023d}-{os.getpid()}-{self._counter:06d}{SUFFIX}"
            # Known as ours before it is on disk: a replay may send it before this returns.
            seqs = [item[0] for item in items]
            place = replay_key(key.update, min(seqs), max(seqs))
            self.written_here[name] = Written(place, max(seqs), key, len(items))
            self._writing.add(name)
        path = self.directory / name
        written = False
        try:
            self._write_atomically(path, data)
            written = True
        finally:
            with self._lock:
                self._reserved -= len(data)
                self._writing.discard(name)
                if written:
                    self.used_bytes += len(data)
                else:
                    self.written_here.pop(name, None)
        return path

    def rewrite(self, path: Path, key: SpoolKey, items: Sequence[Item]) -> None:
        """Replace a batch file by what is left of it (same name, so same place in line)."""
        old = path.stat().st_size
        data = _encode(key, items)
        self._write_atomically(path, data)
        with self._lock:
            self.used_bytes += len(data) - old

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(fd, "wb", closefd=True) as file:
                file.write(data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if self.fsync:
            self._sync_directory()  # so that the rename itself survives a power cut

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def batches(self) -> list[Path]:
        """The batch files waiting, oldest first: the other processes' in the order they were
        written, then this one's by :func:`replay_key` (a batch that failed in flight is
        written after later events that overflowed meanwhile)."""
        names = sorted(
            name
            for name in os.listdir(self.directory)
            if name.endswith(SUFFIX) and not name.startswith(".")
        )
        own = dict(self.written_here)  # a copy: writer threads add to it meanwhile
        ordered = [n for n in names if n not in own]
        ordered += sorted((n for n in names if n in own), key=lambda n: own[n].place)
        return [self.directory / name for name in ordered]

    def written_before(self, name: str, listed: set[str]) -> bool:
        """Whether this object wrote, since the batch files ``listed`` were listed, one that
        goes before its file ``name`` in the replay (a batch that failed in flight after
        later events were spooled)."""
        with self._lock:
            own = list(self.written_here.items())
        mine = self.written_here.get(name)
        return mine is not None and any(
            other not in listed and written.place < mine.place for other, written in own
        )

    def forget_gone(self) -> list[Written]:
        """This object's batch files that left the disk without its doing (another process
        sharing the directory replayed them or set them aside, or someone removed them):
        forgotten here, and returned."""
        with self._lock:
            done = [name for name in self.written_here if name not in self._writing]
        on_disk = set(os.listdir(self.directory))
        with self._lock:
            return [
                self.written_here.pop(name)
                for name in done
                if name not in on_disk and name in self.written_here
            ]

    def read(self, path: Path) -> SpooledBatch:
        data = path.read_bytes()
        return SpooledBatch(path, *_decode(data, path))

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.written_here.pop(path.name, None)
        with self._lock:
            self.used_bytes -= size
            if self.used_bytes < 0:  # it was another process's file
                self._recount()

    def quarantine(self, path: Path) -> Path:
        """Set a damaged file aside (``*.corrupt``), out of the replay's way."""
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        return target

    # Dead letters

    def write_dead_letters(self, lines: list[bytes]) -> None:
        """Append refused events, one JSON object a line. The file has a bound of its own (an
        eighth of the spool's), so that refusals never crowd out the events still to send;
        what would pass it raises SpoolFullError and is only logged."""
        data = b"".join(line + b"\n" for line in lines)
        path = self.directory / DEAD_LETTERS
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "ab", closefd=True) as file:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a line cut short (a crash): not glued to it
            if size + len(data) > self.max_bytes // 8:
                raise SpoolFullError(
                    f"{path} has reached its bound ({self.max_bytes // 8} bytes); "
                    f"{len(lines)} dead letter(s) not written"
                )
            file.write(data)  # one write: with O_APPEND, lines of several processes never mix
            if self.fsync:
                file.flush()
                os.fsync(file.fileno())

    # The replay lock: one process replays a directory at a time

    def try_lock(self) -> bool:
        """Take the replay lock if no other process holds it. Released by :meth:`unlock`, or
        by the system when this process ends however it ends."""
        if self._lock_file is not None:
            return True
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        file = open(fd, "r+b", closefd=True)  # noqa: SIM115  (held open while the lock is)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        self._lock_file = file
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            # Explicitly: a forked child may still hold a copy of the descriptor.
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def abandon_lock(self) -> None:
        """In a forked child: close our copy of the lock's descriptor without unlocking, which
        would release the parent's lock; once closed, the parent's release is the last word."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _encode(key: SpoolKey, items: Sequence[Item]) -> bytes:
    header = orjson.dumps(
        {
            "project": key.project,
            "model": key.model,
            "env_type": key.env_type,
            "env_name": key.env_name,
            "update": key.update,
        }
    )
    lines = [header]
    for _, body, fixup in items:
        lines.append(orjson.dumps(fixup) + b"\t" + body)
    rest = b"\n".join(lines) + b"\n"
    return b"%s %08x %d\n%s" % (MAGIC, zlib.crc32(rest), len(items), rest)


def _decode(data: bytes, path: Path) -> tuple[SpoolKey, list[Item]]:
    first, _, rest = data.partition(b"\n")
    parts = first.split(b" ")
    if len(parts) != 4 or b" ".join(parts[:2]) != MAGIC or parts[2] != b"%08x" % zlib.crc32(rest):
        raise SpoolCorruptError(f"{path}: damaged (its checksum does not match)")
    try:
        count = int(parts[3])
        lines = rest.split(b"\n")
        header: dict[str, Any] = orjson.loads(lines[0])
        key = SpoolKey(
            str(header["project"]),
            str(header["model"]),
            str(header["env_type"]),
            header["env_name"],
            bool(header["update"]),
        )
        items: list[Item] = []
        for line in lines[1 : count + 1]:
            fixup_json, _, body = line.partition(b"\t")
            fixup = orjson.loads(fixup_json)
            items.append((0, body, None if fixup is None else _fixup(fixup)))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise SpoolCorruptError(f"{path}: not a valid spool file ({exc})") from None
    if len(items) != count:
        raise SpoolCorruptError(f"{path}: {len(items)} events where the header says {count}")
    return key, items


def _fixup(value: list[Any]) -> Fixup:
    event_id, millis, flags = value
    return (event_id, millis, int(flags))


def iter_dead_letters(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The dead letters of a spool directory, oldest first."""
    path = Path(directory) / DEAD_LETTERS
    if not path.exists():
        return
    with path.open("rb") as file:
        for line in file:
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:  # a line cut short by a crash or a full disk
                continue
