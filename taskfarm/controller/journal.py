"""The controller's journal: tasks survive a controller crash.

An SQLite database in WAL mode, in the profile.  One writer thread owns the
connection; the reactor only enqueues operations, and everything enqueued
in one reactor turn is committed in one transaction (group commit), so the
reactor never waits on the disk per task.  `sync()` fires once everything
enqueued before it is on disk: the controller answers "accepted" only then.

What is written: each accepted task (its envelope), each requeue (retries
spent, recovery taking over), each final outcome, each clear, and the
submission tokens that make resubmission idempotent.  Running is never
written: after a crash a running task is queued again (at-least-once).
"""

from __future__ import annotations

import itertools
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm.errors import JournalError, ProfileError
from taskfarm.interfaces import IJournal
from taskfarm.services import join_thread

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS tasks (
    taskid INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL,
    submitted REAL NOT NULL,
    state TEXT NOT NULL,
    link INTEGER NOT NULL DEFAULT 0,
    retries_left INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    engine_id INTEGER,
    started REAL,
    completed REAL,
    ok INTEGER,
    data BLOB
);
CREATE INDEX IF NOT EXISTS tasks_completed ON tasks (completed);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    first_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created REAL NOT NULL,
    digest TEXT
);
"""

#: Schema version 1 lacked the digest of each submission's bytes.
_MIGRATIONS = {1: "ALTER TABLE tokens ADD COLUMN digest TEXT"}


class JournalCorrupt(ProfileError):
    """The journal file cannot be read; the controller refuses to start."""


class StoredTask:
    """One task as read back from the journal."""

    __slots__ = (
        "taskid", "envelope", "submitted", "state", "link", "retries_left",
        "attempts", "engine_id", "started", "completed", "ok", "data",
    )

    def __init__(self, row: tuple) -> None:
        (self.taskid, self.envelope, self.submitted, self.state, self.link,
         self.retries_left, self.attempts, self.engine_id, self.started,
         self.completed, self.ok, self.data) = row


_STOP = object()

#: Seconds between attempts to write operations a failed commit kept.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 10.0

#: Outcomes bigger than this many bytes are kept in files beside the
#: journal, not in SQLite (one write each, no WAL copy and checkpoint).
BLOB_FILE_THRESHOLD = 64 * 1024
_FILE_MARK = b"\x00taskfarm:in-file"
_WRITE_FILE = object()
_REMOVE_FILES = object()


def _write_file(path: Path, data) -> None:
    """Write `data` (bytes, or byte strings one after the other: a result's
    frames, never joined in memory) to a new owner-only file."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for part in [data] if isinstance(data, bytes) else data:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _remove_files(paths: list) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@implementer(IJournal)
class Journal:
    """Durable record of the controller's tasks, written by one thread."""

    _log = Logger()

    def __init__(self, path: Path, reactor) -> None:
        self.path = Path(path)
        #: Big outcomes live here, one file per task.
        self.blob_dir = self.path.with_name(self.path.name + "-results")
        self._blob_ids: set[int] = set()
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: list = []
        self._flush_call = None
        self._sync_waiters: list[defer.Deferred] = []
        #: The `JournalError` of the last failed commit, until one succeeds.
        self.trouble: JournalError | None = None
        #: Operations committed so far (for tests and benchmarks).
        self.committed = 0

    # -- opening and reading (before the reactor serves anyone) -----------------------

    def open(self) -> None:
        """Open (or create) the journal and check it; `JournalCorrupt` if bad."""
        connection = None
        # Tasks and results are secrets too: owner-only, like the furls.
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self.blob_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            connection = sqlite3.connect(str(self.path), check_same_thread=False)
            check = connection.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            version = connection.execute(
                "SELECT value FROM meta WHERE key='schema'"
            ).fetchone()
            if version is None:
                connection.execute(
                    "INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,)
                )
                connection.commit()
            elif version[0] in _MIGRATIONS:
                with connection:
                    connection.execute(_MIGRATIONS[version[0]])
                    connection.execute(
                        "UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,)
                    )
            elif version[0] != SCHEMA_VERSION:
                raise sqlite3.DatabaseError("schema version %r" % (version[0],))
        except sqlite3.DatabaseError as e:
            if connection is not None:
                connection.close()
            raise JournalCorrupt(
                "refusing to start: the journal %s cannot be read (%s). Move it "
                "aside to start with an empty journal; the tasks it holds would "
                "be lost." % (self.path, e)
            ) from None
        self._connection = connection
        self._thread = threading.Thread(
            target=self._write_loop, name="taskfarm-journal", daemon=True
        )
        self._thread.start()

    def incarnation(self) -> str:
        """This journal's identity: the same across controller restarts."""
        row = self._connection.execute(
            "SELECT value FROM meta WHERE key='incarnation'"
        ).fetchone()
        if row is not None:
            return row[0]
        value = uuid.uuid4().hex
        with self._connection:
            self._connection.execute("INSERT INTO meta VALUES ('incarnation', ?)", (value,))
        return value

    def next_id(self) -> int:
        """The first task id never handed out."""
        row = self._connection.execute(
            "SELECT value FROM meta WHERE key='next_id'"
        ).fetchone()
        stored = row[0] if row else 0
        highest = self._connection.execute("SELECT MAX(taskid) FROM tasks").fetchone()[0]
        return max(stored, -1 if highest is None else highest + 1, 0)

    def tasks(self) -> Iterator[StoredTask]:
        """Every stored task, in id order."""
        cursor = self._connection.execute(
            "SELECT taskid, envelope, submitted, state, link, retries_left, attempts,"
            " engine_id, started, completed, ok, data FROM tasks ORDER BY taskid"
        )
        for row in cursor:
            yield StoredTask(row)

    def tokens(self) -> list[tuple[str, int, int, str | None]]:
        """Stored submission tokens (token, first id, count, digest), oldest first."""
        return self._connection.execute(
            "SELECT token, first_id, count, digest FROM tokens ORDER BY created"
        ).fetchall()

    # -- writing (reactor thread enqueues) -------------------------------------------

    def accept_batch(self, rows: Iterable[tuple], token: tuple | None = None) -> defer.Deferred:
        """Journal one submission: `rows` of (taskid, envelope, submitted,
        retries), and its `token` row (token, first id, count, digest, now).
        `rows` is read here, once (it may be a generator).

        Fires once committed.  If the commit fails, the batch is dropped
        whole and the Deferred fails with `JournalError`: the caller must
        refuse it, since nothing of it would survive a restart.
        """
        batch = _Batch()
        insert = (
            "INSERT OR REPLACE INTO tasks (taskid, envelope, submitted, state, link,"
            " retries_left) VALUES (?, ?, ?, 'queued', 0, ?)"
        )
        self._pending.extend((insert, row, batch) for row in rows)
        if token is not None:
            self._pending.append((
                "INSERT OR REPLACE INTO tokens (token, first_id, count, digest, created)"
                " VALUES (?, ?, ?, ?, ?)",
                token,
                batch,
            ))
        self._sync_waiters.append(batch.deferred)
        self._schedule_flush()
        return batch.deferred

    def next_id_is(self, next_id: int) -> None:
        self._enqueue("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (next_id,))

    def requeued(self, taskid: int, link: int, retries_left: int, attempts: int) -> None:
        self._enqueue(
            "UPDATE tasks SET link=?, retries_left=?, attempts=? WHERE taskid=?",
            (link, retries_left, attempts, taskid),
        )

    def finished(self, record, link: int) -> None:
        data = _blob(record)
        if isinstance(data, list):
            # A result's frames: written part by part, joined only if small.
            if sum(map(len, data)) <= BLOB_FILE_THRESHOLD:
                data = b"".join(data)
        if data is not None and (isinstance(data, list) or len(data) > BLOB_FILE_THRESHOLD):
            path = self._blob_path(record.taskid)
            self._pending.append((_WRITE_FILE, (path, data), None))
            self._blob_ids.add(record.taskid)
            data = _FILE_MARK
        self._enqueue(
            "UPDATE tasks SET state=?, link=?, retries_left=?, attempts=?, engine_id=?,"
            " started=?, completed=?, ok=?, data=? WHERE taskid=?",
            (
                record.state.name.lower(), link, record.retries_left, record.attempts,
                record.engine_id, record.started, record.completed, int(record.ok),
                data, record.taskid,
            ),
        )

    def cleared(self, taskids: list[int]) -> None:
        for taskid in taskids:
            self._enqueue("DELETE FROM tasks WHERE taskid=?", (taskid,))
        files = [self._blob_path(t) for t in taskids if t in self._blob_ids]
        if files:
            self._blob_ids.difference_update(taskids)
            self._pending.append((_REMOVE_FILES, files, None))

    def _blob_path(self, taskid: int) -> Path:
        return self.blob_dir / ("%d.result" % taskid)

    def stored_data(self, stored: StoredTask) -> bytes | None:
        """A stored task's outcome, read from its file when it is big."""
        if stored.data == _FILE_MARK:
            self._blob_ids.add(stored.taskid)
            return self._blob_path(stored.taskid).read_bytes()
        return stored.data

    def forget_tokens(self, older_than: float) -> None:
        self._enqueue("DELETE FROM tokens WHERE created < ?", (older_than,))

    def sync(self) -> defer.Deferred:
        """Fires once everything enqueued so far is committed; fails with
        `JournalError` if the commit that carries it fails."""
        d: defer.Deferred = defer.Deferred()
        self._sync_waiters.append(d)
        self._schedule_flush()
        return d

    def _enqueue(self, sql: str, params: tuple) -> None:
        self._pending.append((sql, params, None))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        operations, self._pending = self._pending, []
        waiters, self._sync_waiters = self._sync_waiters, []
        self._queue.put((operations, waiters))

    # -- the writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        # Operations of a failed commit that must not be lost (outcomes,
        # requeues, clears, the id counter) are carried into the next one,
        # ahead of anything newer, so they land in order once space is back.
        carried: list = []
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                item = self._queue.get(timeout=delay if carried else None)
            except queue.Empty:
                item = ([], [])
            batches = [item]
            stopping = item is _STOP
            # Group commit: take whatever else is already waiting.
            while not stopping:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                stopping = more is _STOP
                batches.append(more)
            batches = [b for b in batches if b is not _STOP]
            carried = self._commit(carried, batches)
            delay = min(delay * 2, RETRY_MAX_DELAY) if carried else RETRY_FIRST_DELAY
            if stopping:
                if carried:
                    self._reactor.callFromThread(self._log.critical,
                        "closing with {count} journal operations unwritten: {error}",
                        count=len(carried), error=self.trouble)
                return

    def _commit(self, carried: list, batches: list) -> list:
        """Commit `carried` then `batches`; returns what must be carried on."""
        waiters = [w for _, ws in batches for w in ws]
        operations = carried + [op for ops, _ in batches for op in ops]
        if not operations and not waiters:
            return []
        try:
            # Big results go to files first: the rows that point at them
            # commit after, so a row never points at a missing file.
            for sql, params, _ in operations:
                if sql is _WRITE_FILE:
                    _write_file(*params)
            with self._connection:
                # Runs of one statement go in one executemany: the loop
                # runs in C, not in Python holding the GIL.
                for sql, group in itertools.groupby(operations, key=lambda op: op[0]):
                    if sql is not _WRITE_FILE and sql is not _REMOVE_FILES:
                        self._connection.executemany(sql, [params for _, params, _ in group])
            # Files of cleared tasks go once their rows are gone for good.
            for sql, paths, _ in operations:
                if sql is _REMOVE_FILES:
                    _remove_files(paths)
        except (sqlite3.Error, OSError) as e:
            error = JournalError(
                "the journal %s cannot be written: %s: %s" % (self.path, type(e).__name__, e)
            )
            # A submission is refused whole; everything else is kept.
            keep = [op for op in operations if op[2] is None]
            first = self.trouble is None
            self.trouble = error
            self._reactor.callFromThread(self._report_failure, error, waiters, len(keep), first)
            return keep
        self.committed += len(operations)
        if self.trouble is not None:
            self.trouble = None
            self._reactor.callFromThread(
                self._log.info, "the journal {path} is written again", path=str(self.path)
            )
        if waiters:
            self._reactor.callFromThread(_fire, waiters)
        return []

    def _report_failure(self, error: JournalError, waiters: list, kept: int, first: bool) -> None:
        if first:
            self._log.critical(
                "{error}; refusing submissions, and keeping {kept} operations in "
                "memory to write once it can",
                error=str(error),
                kept=kept,
            )
        for waiter in waiters:
            waiter.errback(error)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then close (blocks up to `timeout`: for
        use without a running reactor; a running controller uses `stop`)."""
        thread = self._stopping()
        if thread is not None:
            thread.join(timeout)
            self._connection.close()

    def stop(self, timeout: float = 10.0) -> defer.Deferred:
        """Write what is pending, then close; fires once the writer thread
        has ended (or after `timeout`), and never blocks the reactor."""
        return defer.Deferred.fromCoroutine(self._stop(timeout))

    async def _stop(self, timeout: float) -> None:
        thread = self._stopping()
        if thread is None:
            return
        if not await join_thread(self._reactor, thread, timeout):
            self._log.warn(
                "the journal writer did not end within {timeout} s; closing anyway",
                timeout=timeout,
            )
        self._connection.close()

    def _stopping(self) -> threading.Thread | None:
        # Hands the writer everything pending and its stop mark; the
        # writer thread to wait for, or None if already closed.
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()
        self._queue.put(_STOP)
        return thread


@implementer(IJournal)
class NullJournal:
    """The journal of a controller that keeps nothing (``--no-journal``).

    It has `Journal`'s interface and commits every write at once, so the
    controller takes one path with or without a journal.  Nothing survives
    a restart: each NullJournal is a new incarnation, with no tasks, no
    tokens and ids from 0.
    """

    #: No file: nothing is kept.
    path = None
    #: A NullJournal never fails to write.
    trouble = None

    def __init__(self) -> None:
        self._incarnation = uuid.uuid4().hex

    def incarnation(self) -> str:
        """A new identity per NullJournal: clients see each start as new."""
        return self._incarnation

    def next_id(self) -> int:
        return 0

    def tasks(self) -> Iterator[StoredTask]:
        return iter(())

    def tokens(self) -> list[tuple[str, int, int, str | None]]:
        return []

    def stored_data(self, stored: StoredTask) -> bytes | None:
        return stored.data

    def accept_batch(self, rows: Iterable[tuple], token: tuple | None = None) -> defer.Deferred:
        """Committed at once; `rows` is not even read (no packing cost)."""
        return defer.succeed(None)

    def next_id_is(self, next_id: int) -> None:
        pass

    def requeued(self, taskid: int, link: int, retries_left: int, attempts: int) -> None:
        pass

    def finished(self, record, link: int) -> None:
        pass

    def cleared(self, taskids: list[int]) -> None:
        pass

    def forget_tokens(self, older_than: float) -> None:
        pass

    def sync(self) -> defer.Deferred:
        return defer.succeed(None)

    def close(self, timeout: float = 10.0) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> defer.Deferred:
        """Nothing to write or join."""
        return defer.succeed(None)


class _Batch:
    """The operations of one submission: committed together or refused."""

    __slots__ = ("deferred",)

    def __init__(self) -> None:
        self.deferred: defer.Deferred = defer.Deferred()


def _fire(waiters: list) -> None:
    for waiter in waiters:
        waiter.callback(None)


def _blob(record) -> bytes | None:
    from taskfarm import serialization

    if record.ok:
        if serialization.is_frames(record.data):
            return serialization.frames_record(record.data)
        return record.data
    return serialization.pack(record.data)
