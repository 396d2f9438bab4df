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

Results over `BLOB_FILE_THRESHOLD` go to files of their own beside the
database (`resultfiles`), fsynced before the row that names them commits;
at open, files no row names (a crash mid-write) are removed.  After a
commit that deleted rows, the writer gives the freed pages back when it is
idle, in bounded steps (`_compact_step`: incremental_vacuum, then a
TRUNCATE checkpoint of the WAL), so the disk use follows the live tasks.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from taskfarm.controller import resultfiles
from taskfarm.controller.resultfiles import StoredResult
from taskfarm.errors import JournalError, ProfileError
from taskfarm.interfaces import IJournal
from taskfarm.services import join_thread

SCHEMA_VERSION = 3

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
    data BLOB,
    output BLOB
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

#: Schema version 1 lacked the digest of each submission's bytes; version 2
#: the output (stdout, stderr) of each finished task.  Each step takes a
#: journal from its version to the next.
_MIGRATIONS = {
    1: "ALTER TABLE tokens ADD COLUMN digest TEXT",
    2: "ALTER TABLE tasks ADD COLUMN output BLOB",
}


class JournalCorrupt(ProfileError):
    """The journal file cannot be read; the controller refuses to start."""


class StoredTask:
    """One task as read back from the journal."""

    __slots__ = (
        "taskid", "envelope", "submitted", "state", "link", "retries_left",
        "attempts", "engine_id", "started", "completed", "ok", "data", "output",
    )

    def __init__(self, row: tuple) -> None:
        # A row of schema version 2 has no output.
        row = tuple(row) + (None,) * (len(self.__slots__) - len(row))
        (self.taskid, self.envelope, self.submitted, self.state, self.link,
         self.retries_left, self.attempts, self.engine_id, self.started,
         self.completed, self.ok, self.data, self.output) = row


_STOP = object()

#: Seconds between attempts to write operations a failed commit kept.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 10.0

#: Results bigger than this many bytes are kept in files beside the
#: journal, not in SQLite: written once, no WAL copy and checkpoint, and
#: deleted outright on clear (`resultfiles`).
BLOB_FILE_THRESHOLD = 1 << 20
#: What a row's data holds for a result in a file of the old format (the
#: pickle alone, journals before the framed files; still read).
_FILE_MARK = b"\x00taskfarm:in-file"
#: ... for a result in a framed file (`resultfiles`, a string or a list).
_FRAMED_FILE_MARK = b"\x00taskfarm:in-file:framed"
#: Prefix of an inline result that is a list of byte strings (framed).
_FRAMED_INLINE = b"\x00taskfarm:framed:"
_WRITE_FILE = object()
_REMOVE_FILES = object()

#: Compaction (after clears): pages freed per incremental_vacuum step
#: (2 MiB of 4 KiB pages: the step writes about as many to the WAL, some
#: 10 ms), how long the writer must have been idle before a step, and the
#: longest it waits for idleness while there is compaction to do.
VACUUM_STEP_PAGES = 512
QUIET_SECONDS = 0.05
COMPACT_AT_LEAST_EVERY = 1.0
#: The pause between two steps while the writer stays idle.
STEP_PAUSE = 0.002
#: The WAL is cut back to this size once checkpointed.
WAL_SIZE_LIMIT = 4 << 20


@implementer(IJournal)
class Journal:
    """Durable record of the controller's tasks, written by one thread."""

    _log = Logger()

    def __init__(self, path: Path, reactor) -> None:
        self.path = Path(path)
        #: Big outcomes live here, one file per task.
        self.blob_dir = self.path.with_name(self.path.name + "-results")
        #: The result file of each task that has one (written or to be).
        self._blob_files: dict[int, Path] = {}
        #: Called in the reactor with the ids of tasks whose result files
        #: are durable (file fsynced, row committed): the store may then
        #: drop its copy of those results.
        self.on_result_durable: Callable[[list[int]], None] | None = None
        #: The last compaction steps: (kind, pages, seconds), kind being
        #: "vacuum" (incremental_vacuum: pages freed) or "checkpoint"
        #: (TRUNCATE).
        self.compaction_steps: collections.deque = collections.deque(maxlen=1024)
        #: Result files of earlier runs removed at open (no row names them).
        self.orphans_removed = 0
        #: Results of more bytes than this go to files of their own.
        self.file_threshold = BLOB_FILE_THRESHOLD
        #: The most pages one compaction step frees.
        self.vacuum_step_pages = VACUUM_STEP_PAGES
        #: Seconds before a failed commit's first retry (doubling after).
        self.retry_first_delay = RETRY_FIRST_DELAY
        self._compact_due = False
        self._compact_since = 0.0
        self._busy_checkpoints = 0
        self._incremental = True
        self._last_free: int | None = None
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
        #: Called in the writer thread as ``on_commit(seconds, operations)``
        #: after each commit (`monitor.Monitor.journal_committed`), or None.
        self.on_commit = None

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
            self._incremental_vacuum(connection)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA journal_size_limit=%d" % WAL_SIZE_LIMIT)
            # Some builds (Debian's) zero every deleted byte: a clear of 200 MB
            # would write 200 MB of zeros to the WAL.  FAST zeroes only where
            # that costs no I/O; freed pages leave the file by the vacuum.
            connection.execute("PRAGMA secure_delete=FAST")
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
                    step = version[0]
                    while step in _MIGRATIONS:
                        connection.execute(_MIGRATIONS[step])
                        step += 1
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
        self._remove_orphans()
        # Space freed before a crash or stop is given back once quiet.
        self._compact_due = connection.execute("PRAGMA freelist_count").fetchone()[0] > 0
        self._compact_since = time.monotonic()
        self._thread = threading.Thread(
            target=self._write_loop, name="taskfarm-journal", daemon=True
        )
        self._thread.start()

    def _incremental_vacuum(self, connection: sqlite3.Connection) -> None:
        # Pages freed by a clear go back to the file system step by step
        # (`_compact_step`), not in one VACUUM.  A journal made before this
        # mode existed is rebuilt in it once, here, before anyone is served.
        self._incremental = True
        if connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if connection.execute("PRAGMA page_count").fetchone()[0] == 0:
            return  # a new file: the mode holds from its first table
        started = time.monotonic()
        try:
            connection.execute("VACUUM")
        except sqlite3.OperationalError as e:
            # No room for the copy (a full disk): run as before, without
            # giving space back, and try again at the next start.
            self._incremental = False
            self._log.warn(
                "the journal {path} could not be rebuilt for incremental "
                "compaction ({error}); cleared space stays in it until a later start",
                path=str(self.path), error=str(e),
            )
            return
        self._log.info(
            "rebuilt the journal {path} for incremental compaction in {seconds:.3f} s",
            path=str(self.path), seconds=time.monotonic() - started,
        )

    def _remove_orphans(self) -> None:
        # A crash between writing a result file and committing the row that
        # names it leaves a file nobody names: remove it (and anything else
        # in the folder no row names).
        named = {}
        rows = self._connection.execute(
            "SELECT taskid, data FROM tasks WHERE typeof(data)='blob'"
            " AND length(data) <= 64 AND data IN (?, ?)",
            (_FILE_MARK, _FRAMED_FILE_MARK),
        )
        for taskid, mark in rows:
            path = self._blob_files[taskid] = self._file_path(taskid, mark)
            named[path.name] = taskid
        removed = 0
        for entry in os.scandir(self.blob_dir):
            if entry.name not in named and entry.is_file(follow_symlinks=False):
                resultfiles.remove(Path(entry.path))
                removed += 1
        self.orphans_removed = removed
        if removed:
            self._log.warn(
                "removed {count} result files of {path} that no task names "
                "(a crash while they were written)",
                count=removed, path=str(self.path),
            )

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
            " engine_id, started, completed, ok, data, output FROM tasks ORDER BY taskid"
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
        if record.ok and resultfiles.nbytes(data) > self.file_threshold:
            # Written once, from the strings the engine sent, to its own
            # file; the row that names it commits after the file is fsynced.
            path = self._file_path(record.taskid, _FRAMED_FILE_MARK)
            self._pending.append((_WRITE_FILE, (record.taskid, path, data), None))
            self._blob_files[record.taskid] = path
            data = _FRAMED_FILE_MARK
        elif record.ok and not isinstance(data, bytes):
            data = _inline(data)
        self._enqueue(
            "UPDATE tasks SET state=?, link=?, retries_left=?, attempts=?, engine_id=?,"
            " started=?, completed=?, ok=?, data=?, output=? WHERE taskid=?",
            (
                record.state.name.lower(), link, record.retries_left, record.attempts,
                record.engine_id, record.started, record.completed, int(record.ok),
                data, _output_blob(record), record.taskid,
            ),
        )

    def cleared(self, taskids: list[int]) -> None:
        for taskid in taskids:
            self._enqueue("DELETE FROM tasks WHERE taskid=?", (taskid,))
        files = self._blob_files
        if files:
            paths = [files.pop(t) for t in taskids if t in files]
            if paths:
                self._pending.append((_REMOVE_FILES, paths, None))

    def _file_path(self, taskid: int, mark: bytes) -> Path:
        if mark == _FILE_MARK:
            return self.blob_dir / ("%d.result" % taskid)  # the old format
        return self.blob_dir / ("%d.frames" % taskid)

    def stored_data(self, stored: StoredTask) -> bytes | list | None:
        """A stored task's outcome, read from its file when it is big:
        bytes, or a list of bytes for a result stored as several strings."""
        data = stored.data
        if data == _FILE_MARK:
            path = self._blob_files[stored.taskid] = self._file_path(stored.taskid, data)
            return path.read_bytes()
        if data == _FRAMED_FILE_MARK:
            path = self._blob_files[stored.taskid] = self._file_path(stored.taskid, data)
            return resultfiles.read(path)
        if isinstance(data, bytes) and data.startswith(_FRAMED_INLINE):
            return resultfiles.decode(memoryview(data)[len(_FRAMED_INLINE):])
        return data

    def stored_result(self, stored: StoredTask) -> object:
        """Like `stored_data`, but a result in a framed file stays there: a
        `StoredResult` to `read_result` when a client asks for it."""
        if stored.data == _FRAMED_FILE_MARK and stored.ok:
            path = self._blob_files[stored.taskid] = self._file_path(stored.taskid, stored.data)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            return StoredResult(stored.taskid, size)
        return self.stored_data(stored)

    def read_result(self, taskid: int) -> defer.Deferred:
        """The result in the file of task `taskid`, read in a thread (not
        the reactor): bytes or a list of bytes.  Fails with `JournalError`
        if the file is gone or partial."""
        path = self._blob_files.get(taskid)
        if path is None:
            return defer.fail(JournalError("task %d has no result file in %s" % (taskid, self.blob_dir)))

        def read():
            try:
                return resultfiles.read(path)
            except OSError as e:
                raise JournalError("the result of task %d cannot be read: %s" % (taskid, e)) from None

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)

    def disk_use(self) -> dict[str, int]:
        """Bytes on disk: the database, its WAL, the result files, and their total."""
        return disk_use(self.path)

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
        delay = self.retry_first_delay
        idle = False  # nothing came for QUIET_SECONDS since the last commit
        while True:
            if carried:
                timeout = delay
            elif self._compact_due:
                timeout = STEP_PAUSE if idle else QUIET_SECONDS
            else:
                timeout = None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                if not carried:
                    self._compact_step()  # idle: give freed space back
                    idle = True
                    continue
                item = ([], [])
            idle = False
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
            delay = min(delay * 2, RETRY_MAX_DELAY) if carried else self.retry_first_delay
            # Never idle, still compact now and then (one bounded step).
            if (
                self._compact_due
                and not carried
                and not stopping
                and time.monotonic() - self._compact_since > COMPACT_AT_LEAST_EVERY
            ):
                self._compact_step()
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
        began = time.perf_counter()
        written = []
        deleted = False  # frees pages: compaction is due after this commit
        try:
            # Big results go to files first, each fsynced, and the folder
            # too: the rows that name them commit after, so a row never
            # names a missing or partial file.
            for sql, params, _ in operations:
                if sql is _WRITE_FILE:
                    taskid, path, value = params
                    resultfiles.write(path, value)
                    written.append(taskid)
            if written:
                resultfiles.fsync_dir(self.blob_dir)
            with self._connection:
                # Runs of one statement go in one executemany: the loop
                # runs in C, not in Python holding the GIL.
                for sql, group in itertools.groupby(operations, key=lambda op: op[0]):
                    if sql is not _WRITE_FILE and sql is not _REMOVE_FILES:
                        self._connection.executemany(sql, [params for _, params, _ in group])
                        deleted = deleted or sql.startswith("DELETE")
            # Files of cleared tasks go once their rows are gone for good.
            for sql, paths, _ in operations:
                if sql is _REMOVE_FILES:
                    for path in paths:
                        resultfiles.remove(path)
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
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - began, len(operations))
        if deleted and not self._compact_due:
            self._compact_due = True
            self._compact_since = time.monotonic()
            self._busy_checkpoints = 0
            self._last_free = None
        if written and self.on_result_durable is not None:
            self._reactor.callFromThread(self.on_result_durable, written)
        if self.trouble is not None:
            self.trouble = None
            self._reactor.callFromThread(
                self._log.info, "the journal {path} is written again", path=str(self.path)
            )
        if waiters:
            self._reactor.callFromThread(_fire, waiters)
        return []

    def _compact_step(self) -> None:
        """One bounded step of giving freed space back (writer thread):
        an incremental_vacuum of at most VACUUM_STEP_PAGES pages while the
        database has free pages, then a TRUNCATE checkpoint of the WAL.
        (One VACUUM would copy only the live pages, but the checkpoint after
        it truncates the whole freed size at once: 180 ms for 200 MB.)"""
        started = time.monotonic()
        connection = self._connection
        try:
            free = connection.execute("PRAGMA freelist_count").fetchone()[0]
            # Vacuum while it frees pages (and the file is in that mode).
            if free and self._incremental and (self._last_free is None or free < self._last_free):
                self._last_free = free
                # executescript steps the pragma to its end (execute frees
                # one page: the pragma frees a page per step).
                pages = self.vacuum_step_pages
                connection.executescript("PRAGMA incremental_vacuum(%d);" % pages)
                step = ("vacuum", min(free, pages))
            else:
                busy = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                step = ("checkpoint", 0)
                self._busy_checkpoints += 1 if busy else 0
                # A reader in the way: try again later, a bounded number of times.
                if not busy or self._busy_checkpoints > 20:
                    self._compact_due = False
                    self._last_free = None
        except (sqlite3.Error, OSError) as e:
            # Not worth a failure: the space is given back after a later clear.
            self._compact_due = False
            self._last_free = None
            self._reactor.callFromThread(
                self._log.warn, "compacting the journal {path} failed: {error}",
                path=str(self.path), error="%s: %s" % (type(e).__name__, e),
            )
            return
        now = time.monotonic()
        self._compact_since = now
        self.compaction_steps.append((step[0], step[1], now - started))

    @property
    def compacting(self) -> bool:
        """Whether freed space is still being given back."""
        return self._compact_due

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
    #: Never called: no result is kept in a file.
    on_result_durable = None

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

    def stored_result(self, stored: StoredTask) -> object:
        return stored.data

    def read_result(self, taskid: int) -> defer.Deferred:
        """Never called: a NullJournal keeps no result in a file."""
        return defer.fail(JournalError("task %d has no result file (no journal)" % taskid))

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


def _blob(record) -> object:
    from taskfarm import serialization

    if record.ok:
        if serialization.is_frames(record.data):
            # Written part by part (a file, or framed inline when small):
            # read back as a list of the same byte strings.  Views, so a
            # frame received into a buffer (the bulk channel) is not copied.
            return serialization.frames_views(record.data)
        return record.data
    return serialization.pack(record.data)


def _inline(value: object) -> bytes:
    # A small result that is not one bytes object: one bytes-like object
    # is kept as bytes, a list of strings framed (read back as a list).
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return _FRAMED_INLINE + resultfiles.encode(value)


def disk_use(path: Path) -> dict[str, int]:
    """Bytes the journal at `path` takes on disk: ``db`` (the database),
    ``wal`` (its write-ahead log), ``files`` (result files) and ``total``."""
    path = Path(path)

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return 0

    blob_dir = path.with_name(path.name + "-results")
    files = sum(size(p) for p in blob_dir.iterdir()) if blob_dir.is_dir() else 0
    use = {"db": size(path), "wal": size(path.with_name(path.name + "-wal")), "files": files}
    use["total"] = sum(use.values())
    return use


def live_need(path: Path) -> int:
    """Bytes the live content of the journal at `path` needs: its tasks'
    rows in a freshly packed copy (``VACUUM INTO``), plus the result files
    its rows name.  What `disk_use` is compared with after a clear."""
    import tempfile

    path = Path(path)
    blob_dir = path.with_name(path.name + "-results")
    with tempfile.TemporaryDirectory(prefix="taskfarm-journal-size-") as scratch:
        packed = Path(scratch) / "packed.sqlite"
        reader = sqlite3.connect(str(path))
        try:
            reader.execute("VACUUM INTO ?", (str(packed),))
            names = [
                ("%d.result" if mark == _FILE_MARK else "%d.frames") % taskid
                for taskid, mark in reader.execute(
                    "SELECT taskid, data FROM tasks WHERE typeof(data)='blob'"
                    " AND length(data) <= 64 AND data IN (?, ?)",
                    (_FILE_MARK, _FRAMED_FILE_MARK),
                )
            ]
        finally:
            reader.close()
        need = packed.stat().st_size
    for name in names:
        try:
            need += (blob_dir / name).stat().st_size
        except FileNotFoundError:
            pass
    return need


def _output_blob(record) -> bytes | None:
    from taskfarm import serialization

    output = getattr(record, "output", None)
    return None if output is None else serialization.pack(tuple(output))
