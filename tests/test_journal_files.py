"""Big results in files beside the journal, and the journal's compaction.

Unit tests run a real SQLite journal in a temporary folder with the real
reactor (its writer thread answers through ``callFromThread``); one test
kills a real process that is writing a big result (`KillMidWriteTests`).
"""

from __future__ import annotations

import array
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller import journal as journal_module
from taskfarm.controller import resultfiles
from taskfarm.controller.journal import BLOB_FILE_THRESHOLD, Journal
from taskfarm.controller.resultfiles import ResultFileError, StoredResult
from taskfarm.controller.store import TaskStore
from taskfarm.controller.tasks import TaskRecord, TaskSpec
from taskfarm.errors import JournalError, UnknownTask
from taskfarm.task import Task
from taskfarm.testing.helpers import async_test, temp_dir, wait_until

MiB = 1 << 20
#: The file threshold of the journals of most tests (small: fast tests).
SMALL = 64 * 1024


def _envelope(pad: int = 0) -> object:
    push = {"pad": os.urandom(pad)} if pad else None
    return Task("a = 1", push=push).to_envelope()


def _finish(journal: Journal, taskid: int, value: object, pad: int = 0,
            accept: bool = True) -> None:
    """Accept task `taskid` (with an envelope of about `pad` bytes) unless
    told not to, and journal it as succeeded with `value`."""
    envelope = _envelope(pad)
    if accept:
        journal.accept_batch([(taskid, serialization.pack(envelope), 1.0, 0)])
    record = TaskRecord(taskid, TaskSpec.from_envelope(envelope), 1.0)
    record.start(engine_id=0, seq=taskid)
    record.succeed(value, 1.0, 2.0)
    journal.finished(record, record.link)


class _JournalCase(unittest.TestCase):
    timeout = 60

    def open_journal(self, path: Path | None = None, threshold: int = SMALL) -> Journal:
        if path is None:
            path = temp_dir(self, "taskfarm-journal-") / "journal.sqlite"
        journal = Journal(path, reactor)
        journal.file_threshold = threshold
        journal.vacuum_step_pages = 64
        journal.open()
        self.addCleanup(journal.close)
        return journal

    def reopen(self, journal: Journal) -> Journal:
        journal.close()
        return self.open_journal(journal.path)

    def files(self, journal: Journal) -> list[str]:
        return sorted(p.name for p in journal.blob_dir.iterdir())


class ResultFileTests(unittest.TestCase):
    """`resultfiles` on its own: shapes kept, partial files refused."""

    def setUp(self):
        self.dir = temp_dir(self, "taskfarm-resultfiles-")

    def test_round_trip_of_every_shape(self):
        """One string comes back as bytes; a list of bytes, bytearray,
        memoryview (of a typed array too) and empty strings comes back as a
        list of bytes with the same contents; the file is 0600 and holds
        the header plus exactly the strings' bytes."""
        doubles = array.array("d", [1.5, -2.0, 3.25])
        cases = [
            b"one string",
            b"",
            [b"header", bytearray(b"buffer"), memoryview(b"view"), memoryview(doubles), b""],
            [],
        ]
        for i, value in enumerate(cases):
            path = self.dir / ("%d.frames" % i)
            written = resultfiles.write(path, value)
            self.assertEqual(path.stat().st_size, written)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            back = resultfiles.read(path)
            if isinstance(value, bytes):
                self.assertEqual(back, value)
            else:
                self.assertEqual(back, [bytes(memoryview(v).cast("B")) for v in value])
                self.assertTrue(all(type(part) is bytes for part in back))
            self.assertEqual(resultfiles.decode(resultfiles.encode(value)), back)

    def test_partial_or_foreign_file_refused(self):
        """A file cut short by one byte, one with a byte too many, one cut
        inside its header, an empty one and one that is not ours are each
        a ResultFileError, never a value."""
        path = self.dir / "0.frames"
        resultfiles.write(path, [b"x" * 1000, b"y" * 1000])
        whole = path.read_bytes()
        for broken in (whole[:-1], whole + b"z", whole[:20], b"", b"\x80\x05pickle" * 10):
            path.write_bytes(broken)
            self.assertRaises(ResultFileError, resultfiles.read, path)
        self.assertRaises(ResultFileError, resultfiles.read, self.dir / "missing.frames")

    def test_failed_write_leaves_nothing(self):
        """A value that is not bytes is refused before any file is made."""
        path = self.dir / "0.frames"
        self.assertRaises(TypeError, resultfiles.write, path, ["text, not bytes"])
        self.assertFalse(path.exists())


class BigResultTests(_JournalCase):
    """Where results go, around the threshold, and back."""

    @async_test
    async def test_values_around_the_threshold(self):
        """Results of threshold-1 and threshold bytes stay in SQLite; one of
        threshold+1 bytes, and a list of strings whose sum is threshold+1,
        go to files; all read back the same (a list as a list) after a
        reopen; a small list is kept inline and comes back as a list (at
        the default threshold, 1 MiB)."""
        journal = self.open_journal(threshold=BLOB_FILE_THRESHOLD)
        values = {
            0: b"a" * (BLOB_FILE_THRESHOLD - 1),
            1: b"b" * BLOB_FILE_THRESHOLD,
            2: b"c" * (BLOB_FILE_THRESHOLD + 1),
            3: [b"header", b"d" * (BLOB_FILE_THRESHOLD + 1 - 6)],
            4: [b"header", b"e" * (BLOB_FILE_THRESHOLD - 6)],
            5: [b"small", b"list"],
        }
        for taskid, value in values.items():
            _finish(journal, taskid, value)
        await journal.sync()
        self.assertEqual(self.files(journal), ["2.frames", "3.frames"])

        journal = self.reopen(journal)
        stored = {s.taskid: s for s in journal.tasks()}
        self.assertEqual(stored[0].data, values[0])  # raw bytes in the row, as ever
        for taskid, value in values.items():
            self.assertEqual(journal.stored_data(stored[taskid]), value)
        self.assertEqual(self.files(journal), ["2.frames", "3.frames"])

    @async_test
    async def test_files_deleted_on_clear(self):
        """Clearing tasks deletes their result files once the rows are gone;
        the files of tasks not cleared stay."""
        journal = self.open_journal()
        for taskid in range(3):
            _finish(journal, taskid, [b"h", b"r" * (SMALL + taskid)])
        await journal.sync()
        self.assertEqual(self.files(journal), ["0.frames", "1.frames", "2.frames"])
        journal.cleared([0, 2])
        await journal.sync()
        self.assertEqual(self.files(journal), ["1.frames"])
        journal = self.reopen(journal)
        journal.cleared([1])
        await journal.sync()
        self.assertEqual(self.files(journal), [])

    @async_test
    async def test_orphans_removed_on_open(self):
        """Files no row names (a crash between a file's write and its row's
        commit, or a result written for a task that was then not final) are
        removed when the journal opens; files rows name are kept."""
        journal = self.open_journal()
        _finish(journal, 0, b"r" * (SMALL + 1))
        await journal.sync()
        journal.close()
        resultfiles.write(journal.blob_dir / "7.frames", [b"half", b"written"])
        (journal.blob_dir / "8.frames").write_bytes(b"TFRF\x01")
        journal = self.open_journal(journal.path)
        self.assertEqual(journal.orphans_removed, 2)
        self.assertEqual(self.files(journal), ["0.frames"])
        (stored,) = journal.tasks()
        self.assertEqual(journal.stored_data(stored), b"r" * (SMALL + 1))

    @async_test
    async def test_old_format_still_read(self):
        """A journal of the earlier format (no incremental vacuum, a big
        result as a raw pickle file named N.result) opens: it is rebuilt for
        incremental vacuum, its result is read and not taken for an orphan,
        and clearing removes that file."""
        journal = self.open_journal()
        _finish(journal, 3, b"small")
        await journal.sync()
        journal.close()
        old = b"\x80\x05old pickle" * 10000
        (journal.blob_dir / "3.result").write_bytes(old)
        with sqlite3.connect(str(journal.path)) as db:
            db.execute("UPDATE tasks SET data=? WHERE taskid=3", (b"\x00taskfarm:in-file",))
        db.execute("PRAGMA auto_vacuum=NONE")
        db.execute("VACUUM")
        self.assertEqual(db.execute("PRAGMA auto_vacuum").fetchone()[0], 0)
        db.close()

        journal = self.open_journal(journal.path)
        self.assertEqual(journal.orphans_removed, 0)
        self.assertEqual(journal._connection.execute("PRAGMA auto_vacuum").fetchone()[0], 2)
        (stored,) = journal.tasks()
        self.assertEqual(journal.stored_data(stored), old)
        journal.cleared([3])
        await journal.sync()
        self.assertEqual(self.files(journal), [])

    @async_test
    async def test_failed_file_write_is_retried_and_not_durable(self):
        """If a result file cannot be written (here: a folder stands in its
        place), the commit fails with a JournalError noted in `trouble`,
        the row is not committed, nobody is told the result is durable; once
        the cause is gone the write is retried and then it is."""
        journal = self.open_journal()
        journal.retry_first_delay = 0.05
        durable: list[int] = []
        journal.on_result_durable = durable.extend
        journal.accept_batch([(0, serialization.pack(_envelope()), 1.0, 0)])
        await journal.sync()
        blocker = journal.blob_dir / "0.frames"
        blocker.mkdir()
        _finish(journal, 0, b"r" * (SMALL + 1), accept=False)
        with self.assertRaises(JournalError):
            await journal.sync()
        self.assertIsNotNone(journal.trouble)
        self.assertEqual(durable, [])
        with sqlite3.connect(str(journal.path)) as reader:
            self.assertEqual(reader.execute("SELECT state FROM tasks").fetchall(), [("queued",)])
        reader.close()
        blocker.rmdir()
        await wait_until(lambda: journal.trouble is None, "the retried write", 20, interval=0.01)
        await journal.sync()
        self.assertEqual(durable, [0])
        journal = self.reopen(journal)
        (stored,) = journal.tasks()
        self.assertEqual(journal.stored_data(stored), b"r" * (SMALL + 1))


class StoreTests(_JournalCase):
    """The task store with a real journal: bounded memory for big results."""

    def store(self, journal: Journal, limit: int) -> TaskStore:
        return TaskStore(reactor, journal, retention=None, resident_limit=limit)

    async def finish(self, store: TaskStore, taskid: int, value: object) -> TaskRecord:
        envelope = _envelope()
        (record,) = store.add([taskid], [TaskSpec.from_envelope(envelope)], 1.0)
        await store.accept([record], [envelope], None)
        store.move(record, record.start, 0, taskid)
        store.move(record, record.succeed, value, 1.0, 2.0)
        store.finished(record)
        return record

    @async_test
    async def test_a_result_dropped_to_its_file_during_a_read(self):
        """A result still in memory when a results() call begins, but
        dropped to its file while that call reads another from disk, is
        answered whole (was: its StoredResult stand-in went out)."""
        journal = self.open_journal()
        store = self.store(journal, 3 * SMALL)
        values = {t: [b"head%d" % t, bytes([t]) * (2 * SMALL)] for t in range(2)}
        records = [await self.finish(store, t, v) for t, v in values.items()]
        await journal.sync()
        self.assertEqual([isinstance(r.data, StoredResult) for r in records], [True, False])
        d = store.results([0, 1])
        # Task 1's bytes leave memory before the read of task 0 is done.
        store._resident_limit = 0
        store._results_durable([])
        self.assertIsInstance(records[1].data, StoredResult)
        envelopes = await d
        self.assertEqual([_parts(e[3]) for e in envelopes], list(values.values()))

    @async_test
    async def test_memory_bounded_and_results_read_back(self):
        """With room for two results of 128 KiB in memory, the oldest of four is
        held on disk only once durable; results() gives every value back
        whole, from memory or file, before and after a restore; clearing a
        task deletes its file and forgets its bytes."""
        journal = self.open_journal()
        store = self.store(journal, 5 * SMALL)
        values = {t: [b"head%d" % t, bytes([t]) * (2 * SMALL)] for t in range(4)}
        records = [await self.finish(store, t, v) for t, v in values.items()]
        await journal.sync()
        self.assertEqual([isinstance(r.data, StoredResult) for r in records],
                         [True, True, False, False])
        self.assertLessEqual(store.resident_bytes, 5 * SMALL)
        envelopes = await store.results(list(values))
        # Read back from a file, a list of byte strings comes back as frames.
        self.assertEqual([_parts(e[3]) for e in envelopes], list(values.values()))
        self.assertEqual(await store.results([3], block=True), [records[3].result_envelope()])

        self.assertEqual(store.clear([0, 3]), 2)
        await journal.sync()
        self.assertEqual(self.files(journal), ["1.frames", "2.frames"])
        self.assertNotIn(3, store.resident)

        journal = self.reopen(journal)
        store = self.store(journal, 5 * SMALL)
        self.assertEqual(store.restore(), [])
        self.assertIsInstance(store.tasks[1].data, StoredResult)
        envelopes = await store.results([1, 2])
        self.assertEqual([_parts(e[3]) for e in envelopes], [values[1], values[2]])

    @async_test
    async def test_result_file_gone(self):
        """A result whose file vanished is a JournalError naming the task;
        one cleared while it was read is UnknownTask."""
        journal = self.open_journal()
        store = self.store(journal, 0)
        await self.finish(store, 0, b"r" * (SMALL + 1))
        await self.finish(store, 1, b"s" * (SMALL + 1))
        await journal.sync()
        (journal.blob_dir / "0.frames").unlink()
        with self.assertRaises(JournalError) as caught:
            await store.results([0])
        self.assertIn("task 0", str(caught.exception))
        reading = store.results([1])
        store.clear([1])
        await journal.sync()
        try:
            envelopes = await reading
        except UnknownTask:
            pass
        else:  # read before the file went: whole
            self.assertEqual(envelopes[0][3], b"s" * (SMALL + 1))


class CompactionTests(_JournalCase):
    """After a clear the journal gives its space back, step by step."""

    @async_test
    async def test_disk_use_after_clear_within_ten_percent_of_live_need(self):
        """Twenty live tasks (about 20 KB of envelope each, two with results
        in files) next to ten dead tasks with 400 KB envelopes in SQLite and
        ten with 200 KB results in files: after the dead ones are cleared
        and the journal is quiet, the database, WAL and files together take
        at most 10% more than a freshly packed copy of the live rows plus
        their files; every vacuum step freed at most its 64 pages; the WAL
        is truncated."""
        journal = self.open_journal()
        for taskid in range(20):
            _finish(journal, taskid, b"live" * (1 if taskid > 1 else 20_000), pad=20_000)
        for taskid in range(20, 30):
            _finish(journal, taskid, b"dead", pad=400_000)
        for taskid in range(30, 40):
            _finish(journal, taskid, [b"h", b"r" * 200_000])
        await journal.sync()
        before = journal.disk_use()

        journal.cleared(list(range(20, 40)))
        await journal.sync()
        await wait_until(lambda: not journal.compacting, "compaction", 30)
        after = journal.disk_use()
        live = journal_module.live_need(journal.path)
        self.assertEqual(after["files"], 2 * (80_000 + 12 + 8))
        self.assertEqual(after["wal"], 0)
        self.assertLessEqual(after["total"], 1.10 * live, (before, after, live))
        self.assertGreater(before["total"], 10 * live)
        steps = list(journal.compaction_steps)
        vacuums = [s for s in steps if s[0] == "vacuum"]
        self.assertGreater(len(vacuums), 1)
        self.assertTrue(all(pages <= 64 for _, pages, _ in vacuums))
        self.assertEqual(steps[-1][0], "checkpoint")
        self.assertEqual(len(list(journal.tasks())), 20)

    @async_test
    async def test_compaction_resumes_after_reopen(self):
        """Space freed but not yet given back when the journal closed is
        given back after it opens again."""
        journal = self.open_journal()
        for taskid in range(5):
            _finish(journal, taskid, b"dead", pad=200_000)
        _finish(journal, 5, b"live", pad=10_000)
        await journal.sync()
        # Freed pages without compaction: a plain connection deletes the rows.
        journal.close()
        with sqlite3.connect(str(journal.path)) as db:
            db.execute("DELETE FROM tasks WHERE taskid < 5")
        db.close()
        journal = self.open_journal(journal.path)
        self.assertTrue(journal.compacting)
        await wait_until(lambda: not journal.compacting, "compaction", 30)
        self.assertLessEqual(journal.disk_use()["total"], 1.10 * journal_module.live_need(journal.path))


#: A process that journals one task, then its 64 MiB result (64 strings),
#: saying "writing" just before; it is killed while the file is written.
_WRITER = """\
import sys
from twisted.internet import reactor
from taskfarm import serialization
from taskfarm.controller.journal import Journal
from taskfarm.controller.tasks import TaskRecord, TaskSpec
from taskfarm.task import Task

def main():
    journal = Journal(sys.argv[1], reactor)
    journal.open()
    envelope = Task("a = 1").to_envelope()
    journal.accept_batch([(0, serialization.pack(envelope), 1.0, 0)])

    def write(_):
        record = TaskRecord(0, TaskSpec.from_envelope(envelope), 1.0)
        record.start(0, 0)
        record.succeed([bytes([i]) * (1 << 20) for i in range(64)], 1.0, 2.0)
        print("writing", flush=True)
        journal.finished(record, 0)

    journal.sync().addCallback(write)

reactor.callWhenRunning(main)
reactor.callLater(60, reactor.stop)
reactor.run()
"""


class KillMidWriteTests(unittest.TestCase):
    """A controller's journal killed (SIGKILL) while it writes a big result."""

    timeout = 60

    def test_kill_while_writing(self):
        """Killed as soon as the result file holds bytes: after the restart the
        task is not final (it runs again; no partial value is ever read) and
        no result file is left; had the row committed, the value would be
        whole."""
        root = temp_dir(self, "taskfarm-kill-")
        path = root / "journal.sqlite"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        self.addCleanup(lambda: child.stdout.close())
        target = root / "journal.sqlite-results" / "0.frames"
        whole = 64 << 20
        seen = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.poll() is None:
            try:
                seen = target.stat().st_size
            except FileNotFoundError:
                continue
            if seen == 0:
                continue  # created, not yet written to
            child.send_signal(signal.SIGKILL)
            break
        child.wait(10)
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stdout.read())
        self.assertIsNotNone(seen, "the result file never appeared")

        journal = Journal(path, reactor)
        journal.open()
        self.addCleanup(journal.close)
        (stored,) = journal.tasks()
        if stored.state == "queued":
            self.assertEqual(list(journal.blob_dir.iterdir()), [])
        else:  # the row committed before the kill: then the file was whole
            self.assertEqual(stored.state, "succeeded")
            value = journal.stored_data(stored)
            self.assertEqual(sum(map(len, value)), whole)
        if seen < whole:
            self.assertEqual(stored.state, "queued")


class ControllerBigResultTests(unittest.TestCase):
    """A real controller (in this process) and engine: big results through
    the wire from memory, from their files, and after a restart."""

    timeout = 120

    @async_test
    async def test_big_result_read_back_through_the_controller(self):
        """With no room in memory, a 3 MB result reaches the client whole at
        once (from memory), again once the controller holds it only in its
        file, and after a restart; clear() deletes the file."""
        from twisted.internet import defer

        from taskfarm.testing.cluster import RealCluster

        root = str(temp_dir(self, "taskfarm-journal-"))
        clusters = []

        async def start(engines: int) -> RealCluster:
            cluster = RealCluster(reactor, profile_root=root)
            clusters.append(cluster)
            await cluster.start(engines)
            cluster.controller.tasks.store._resident_limit = 0
            return cluster

        async def stop_all():
            while clusters:
                await clusters.pop().stop()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop_all()))
        first = await start(1)
        client = first.task_client()
        taskid = await client.run(Task("r = bytes(range(256)) * 12288", pull="r"))
        expected = bytes(range(256)) * 12288
        self.assertEqual((await client.get_task_result(taskid, block=True)).ns.r, expected)
        journal = first.controller.journal
        await journal.sync()
        record = first.controller.tasks.store.tasks[taskid]
        self.assertIsInstance(record.data, StoredResult)
        self.assertEqual((await client.get_task_result(taskid)).ns.r, expected)
        await stop_all()

        second = await start(0)
        client = second.task_client()
        self.assertEqual((await client.get_task_result(taskid)).ns.r, expected)
        journal = second.controller.journal
        self.assertEqual(len(list(journal.blob_dir.iterdir())), 1)
        self.assertEqual(await client.clear([taskid]), 1)
        await journal.sync()
        self.assertEqual(list(journal.blob_dir.iterdir()), [])


class FullDiskFileTests(_JournalCase):
    """A big result on a full disk: a small tmpfs (root only, as CI runs)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root (CI runs as root)")
        self.disk = temp_dir(self, "taskfarm-disk-") / "disk"
        self.disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                        str(self.disk)], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", str(self.disk)], check=False)

    @async_test
    async def test_result_file_on_a_full_disk(self):
        """A 3 MiB result on a disk with 1 MiB free fails the commit with a
        JournalError naming the cause, leaves no partial file, is not
        reported durable; once space is back it is written whole."""
        journal = self.open_journal(self.disk / "journal.sqlite", threshold=BLOB_FILE_THRESHOLD)
        journal.retry_first_delay = 0.05
        durable: list[int] = []
        journal.on_result_durable = durable.extend
        journal.accept_batch([(0, serialization.pack(_envelope()), 1.0, 0)])
        await journal.sync()
        filler = self.disk / "filler"
        free = os.statvfs(self.disk).f_bavail * os.statvfs(self.disk).f_frsize
        filler.write_bytes(b"\0" * (free - MiB))
        value = [b"header", os.urandom(3 * MiB)]
        _finish(journal, 0, value, accept=False)
        with self.assertRaises(JournalError) as caught:
            await journal.sync()
        self.assertIn("No space left", str(caught.exception))
        self.assertEqual(self.files(journal), [])
        self.assertEqual(durable, [])
        filler.unlink()
        await wait_until(lambda: journal.trouble is None, "the retried write", 20, interval=0.01)
        await journal.sync()
        self.assertEqual(durable, [0])
        journal = self.reopen(journal)
        (stored,) = journal.tasks()
        self.assertEqual(journal.stored_data(stored), value)


def _parts(value):
    """A result as its list of byte strings (frames or a list alike)."""
    return serialization.frames_parts(value) if isinstance(value, (list, tuple)) else value
