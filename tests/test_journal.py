"""The controller's journal: what survives a restart, what is forgotten, and
a corrupted journal refused with a clear message.

`Journal` is tested on its own with the real reactor (its writer thread
answers through ``callFromThread``); restarts use an in-process controller
on one profile (`RealCluster`), with engine processes where tasks must run.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller.journal import Journal, JournalCorrupt
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.service import create_controller
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.controller.tasks import TaskRecord, TaskSpec
from taskfarm.errors import TaskAborted, UnknownTask, to_wire
from taskfarm.profile import Profile
from taskfarm.task import Task
from taskfarm.testing import ScriptedChannel
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test as _deferred
from taskfarm.testing.helpers import temp_dir


def _envelope_blob(expression: str = "a = 1", retries: int = 0) -> bytes:
    return serialization.pack(Task(expression, retries=retries).to_envelope())


def _record(taskid: int, blob: bytes, submitted: float) -> TaskRecord:
    return TaskRecord(taskid, TaskSpec.from_envelope(serialization.unpack(blob)), submitted)


class JournalTests(unittest.TestCase):
    """The journal on its own, with the real reactor."""

    timeout = 60

    def open_journal(self, path: Path | None = None) -> Journal:
        """An open journal at `path` (a fresh one by default), closed at cleanup."""
        if path is None:
            path = temp_dir(self, "taskfarm-journal-") / "journal.sqlite"
        journal = Journal(path, reactor)
        journal.open()
        self.addCleanup(journal.close)
        return journal

    def reopen(self, journal: Journal) -> Journal:
        journal.close()
        return self.open_journal(journal.path)

    @_deferred
    async def test_big_results_live_in_files(self):
        """An outcome over the file threshold is kept in a file (0600) beside
        the journal, read back after reopening, and removed when cleared."""
        from taskfarm.controller import resultfiles
        from taskfarm.controller.journal import BLOB_FILE_THRESHOLD

        journal = self.open_journal()
        blob = _envelope_blob()
        big = b"r" * (BLOB_FILE_THRESHOLD + 1)
        journal.accept_batch([(0, blob, 100.0, 0)])
        record = _record(0, blob, 100.0)
        record.start(engine_id=0, seq=0)
        record.succeed(big, 101.0, 102.0)
        journal.finished(record, record.link)
        await journal.sync()
        path = journal.blob_dir / "0.frames"
        self.assertEqual(resultfiles.read(path), big)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)

        journal = self.reopen(journal)
        (stored,) = journal.tasks()
        self.assertEqual(journal.stored_data(stored), big)
        journal.cleared([0])
        await journal.sync()
        self.assertFalse(path.exists())
        self.assertEqual(list(journal.tasks()), [])

    @_deferred
    async def test_round_trip(self):
        """Accepted, requeued, finished and cleared tasks and submission
        tokens read back the same after close and reopen."""
        journal = self.open_journal()
        blob = _envelope_blob(retries=2)
        for taskid in range(4):
            journal.accept_batch([(taskid, blob, 100.0 + taskid, 2)])
        journal.next_id_is(4)
        journal.requeued(0, 0, 1, 1)
        succeeded = _record(1, blob, 101.0)
        succeeded.start(engine_id=3, seq=7)
        succeeded.succeed(b"pickled result", 102.0, 103.0)
        journal.finished(succeeded, succeeded.link)
        aborted = _record(2, blob, 102.0)
        aborted.abort(to_wire(TaskAborted("task 2 was aborted")), 104.0)
        journal.finished(aborted, aborted.link)
        journal.cleared([3])
        journal.accept_batch([], ("a-token", 0, 4, "8:0badcafe", 100.0))
        await journal.sync()

        journal = self.reopen(journal)
        stored = {s.taskid: s for s in journal.tasks()}
        self.assertEqual(sorted(stored), [0, 1, 2])
        self.assertEqual(
            (stored[0].state, stored[0].retries_left, stored[0].attempts, stored[0].envelope),
            ("queued", 1, 1, blob),
        )
        one = stored[1]
        self.assertEqual(
            (one.state, one.ok, one.data, one.engine_id, one.started, one.completed, one.submitted),
            ("succeeded", 1, b"pickled result", 3, 102.0, 103.0, 101.0),
        )
        two = stored[2]
        self.assertEqual((two.state, two.ok, two.completed), ("aborted", 0, 104.0))
        self.assertEqual(serialization.unpack(two.data), ("TaskAborted", "task 2 was aborted"))
        self.assertEqual(journal.next_id(), 4)
        self.assertEqual(journal.tokens(), [("a-token", 0, 4, "8:0badcafe")])

    @_deferred
    async def test_ids_never_reused(self):
        """After every task was cleared, the next id still continues from
        the highest ever handed out, across a reopen."""
        journal = self.open_journal()
        blob = _envelope_blob()
        for taskid in range(5):
            journal.accept_batch([(taskid, blob, 1.0, 0)])
        journal.next_id_is(5)
        journal.cleared(list(range(5)))
        await journal.sync()
        journal = self.reopen(journal)
        self.assertEqual(list(journal.tasks()), [])
        self.assertEqual(journal.next_id(), 5)

    @_deferred
    async def test_sync_fires_after_commit(self):
        """Operations are only enqueued in the reactor turn that makes them;
        sync() fires once they are committed, where another connection to
        the file sees them."""
        journal = self.open_journal()
        blob = _envelope_blob()
        journal.accept_batch([(0, blob, 1.0, 0)])
        journal.next_id_is(1)
        self.assertEqual(journal.committed, 0)
        await journal.sync()
        self.assertEqual(journal.committed, 2)
        reader = sqlite3.connect(str(journal.path))
        self.addCleanup(reader.close)
        rows = reader.execute("SELECT taskid, state FROM tasks").fetchall()
        self.assertEqual(rows, [(0, "queued")])

    @_deferred
    async def test_group_commit(self):
        """Hundreds of operations enqueued in one reactor turn are written in
        one transaction."""
        journal = self.open_journal()
        commits: list[int] = []
        commit = journal._commit

        def counting_commit(carried, batches):
            commits.append(len(carried) + sum(len(operations) for operations, _ in batches))
            return commit(carried, batches)

        journal._commit = counting_commit  # the writer thread looks it up per commit
        blob = _envelope_blob()
        for taskid in range(500):
            journal.accept_batch([(taskid, blob, 1.0, 0)])
        journal.next_id_is(500)
        await journal.sync()
        self.assertEqual(commits, [501])
        self.assertEqual(journal.committed, 501)

    def test_close_writes_pending(self):
        """close() writes what was enqueued but not yet committed."""
        journal = self.open_journal()
        journal.accept_batch([(0, _envelope_blob(), 1.0, 0)])
        journal.next_id_is(1)
        journal = self.reopen(journal)
        self.assertEqual([s.taskid for s in journal.tasks()], [0])


class CorruptJournalTests(unittest.TestCase):
    """A journal that cannot be read stops the controller from starting."""

    timeout = 120

    def corrupt_profile(self) -> Profile:
        """A profile whose journal once held a task and now holds garbage."""
        profile = Profile(temp_dir(self, "taskfarm-journal-") / "profile")
        profile.ensure()
        journal = Journal(profile.journal_file, reactor)
        journal.open()
        journal.accept_batch([(0, _envelope_blob(), 1.0, 0)])
        journal.close()
        profile.journal_file.write_bytes(b"this is not a journal\n" * 500)
        return profile

    def test_create_controller_refuses(self):
        """create_controller raises JournalCorrupt naming the journal file."""
        profile = self.corrupt_profile()
        error = self.assertRaises(
            JournalCorrupt,
            create_controller,
            profile,
            reactor,
            listen="tcp:0:interface=127.0.0.1",
        )
        self.assertIn(str(profile.journal_file), str(error))
        self.assertIn("cannot be read", str(error))

    def test_twistd_exits_with_the_message(self):
        """`twistd -n taskcontroller` on that profile exits non-zero at once,
        printing which journal cannot be read."""
        profile = self.corrupt_profile()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        finished = subprocess.run(
            [sys.executable, "-m", "twisted", "taskcontroller", "--profile-dir", str(profile.root)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=str(profile.root),
        )
        output = finished.stdout + finished.stderr
        self.assertNotEqual(finished.returncode, 0, output)
        expected = "refusing to start: the journal %s cannot be read" % profile.journal_file
        self.assertIn(expected, output)
        self.assertFalse(profile.furl_file("task").exists())


class _RestartTestCase(unittest.TestCase):
    """In-process controllers stopped and started again on one profile."""

    timeout = 120

    def setUp(self):
        self.root = str(temp_dir(self, "taskfarm-journal-"))

    async def start(self, n_engines: int = 0, **options) -> RealCluster:
        """A controller on this test's profile (stopped at cleanup if the
        test did not stop it)."""
        cluster = RealCluster(reactor, profile_root=self.root, **options)
        cluster.stopped = False

        async def stop():
            if not cluster.stopped:
                cluster.stopped = True
                await cluster.stop()

        cluster.stop_once = stop
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        await cluster.start(n_engines)
        return cluster


class RestartTests(_RestartTestCase):
    """An in-process controller stopped and started again on one profile."""

    @_deferred
    async def test_tasks_and_results_survive_restarts(self):
        """Tasks accepted with no engine come back queued with the same ids
        after a restart and run once engines join; their results come back
        after a further restart; clear() removes them from the journal; and
        no id is ever handed out again."""
        first = await self.start()
        client = first.task_client()
        ids = await client.run_many([Task("a = %d" % i, pull="a") for i in range(5)])
        await first.stop_once()
        self.assertIsNone(first.controller.journal._thread, "the journal was not closed")

        second = await self.start()
        status = second.controller.tasks.queue_status(verbose=True)
        self.assertEqual(status["scheduled"], ids)
        await second.add_engines(1)
        client = second.task_client()
        results = await client.get_task_results(ids, block=True)
        self.assertEqual([r.ns.a for r in results], list(range(5)))
        later = await client.run(Task("b = 1"))
        self.assertGreater(later, max(ids))
        await client.barrier(later)
        await second.stop_once()

        third = await self.start()
        client = third.task_client()
        again = await client.get_task_results(ids)
        self.assertEqual([r.ns.a for r in again], list(range(5)))
        self.assertEqual([r.engineid for r in again], [r.engineid for r in results])
        self.assertEqual([r.completed for r in again], [r.completed for r in results])
        self.assertEqual(await client.clear(ids[:2]), 2)
        await third.stop_once()
        with sqlite3.connect(str(third.profile.journal_file)) as reader:
            kept = {row[0] for row in reader.execute("SELECT taskid FROM tasks")}
        reader.close()
        self.assertEqual(kept & set(ids), set(ids[2:]))

        fourth = await self.start()
        client = fourth.task_client()
        for taskid in ids[:2]:
            with self.assertRaises(UnknownTask):
                await client.get_task_result(taskid)
        self.assertEqual((await client.get_task_result(ids[2])).ns.a, 2)
        self.assertGreater(await client.run(Task("c = 1")), later)

    @_deferred
    async def test_long_wait_rides_out_a_restart(self):
        """A barrier that has waited longer than the client's reconnect
        timeout when the controller restarts still returns once the restarted
        controller has the answer: the reconnect window opens at the break,
        not when the call began (found by bench/durability.py)."""
        from taskfarm.asyncclient import TaskClient
        from taskfarm.profile import TASK
        from taskfarm.remote.tub import new_tub
        from taskfarm.testing.helpers import sleep

        first = await self.start(1)
        port = first.controller.server.location.rsplit(":", 1)[1]
        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        client = TaskClient(first.profile.furl_file(TASK), reactor, tub=tub, reconnect_timeout=2.0)
        self.addCleanup(client.disconnect)
        # Its engine goes with the first controller: the retry runs on the next.
        taskid = await client.run(Task("import time\ntime.sleep(4)\na = 1", pull="a", retries=1))
        waiting = client.barrier(taskid)
        await sleep(3.0)
        self.assertFalse(waiting.called)
        await first.stop_once()
        second = await self.start(1, listen="tcp:%s:interface=127.0.0.1" % port)
        await waiting
        self.assertEqual((await client.get_task_result(taskid)).ns.a, 1)
        await second.stop_once()

    @_deferred
    async def test_without_journal_nothing_survives(self):
        """With journal=False (--no-journal) no journal file is written and a
        restart starts empty."""
        first = await self.start(journal=False)
        client = first.task_client()
        ids = await client.run_many([Task("a = 1"), Task("a = 2")])
        await first.stop_once()
        self.assertFalse(first.profile.journal_file.exists())

        second = await self.start(journal=False)
        client = second.task_client()
        self.assertEqual(second.controller.tasks.queue_status()["scheduled"], 0)
        for taskid in ids:
            with self.assertRaises(UnknownTask):
                await client.get_task_result(taskid)
        await client.run_many([Task("a = 3")])
        self.assertEqual(second.controller.tasks.queue_status()["scheduled"], 1)

    @_deferred
    async def test_tokens_survive_restart(self):
        """A batch sent again with the same token after a restart gets the
        ids it got before and is not queued twice."""
        first = await self.start()
        envelopes = [Task("a = %d" % i).to_envelope() for i in range(3)]
        ids = await first.controller.tasks.submit_durably(envelopes, token="resent")
        await first.stop_once()

        second = await self.start()
        again = await second.controller.tasks.submit_durably(envelopes, token="resent")
        self.assertEqual(again, ids)
        self.assertEqual(second.controller.tasks.queue_status(verbose=True)["scheduled"], ids)


class InMemoryControllerTests(unittest.TestCase):
    """Retention and tokens on a TaskController driven by a task.Clock."""

    def controller(self, **options) -> tuple[TaskController, ScriptedChannel]:
        self.clock = task.Clock()
        registry = EngineRegistry(self.clock, heartbeat_period=None)
        controller = TaskController(
            registry, FIFOScheduler(), self.clock, unmet_timeout=None, **options
        )
        controller.start()
        self.addCleanup(controller.stop)
        channel = ScriptedChannel()
        channel.engine = registry.register(channel, {"hostname": "here"})
        return controller, channel

    def test_retention(self):
        """With retention=10, a finished task is forgotten (UnknownTask) once
        the controller's clock is 10 s past its completion, whatever time
        the engine's own clock stamped on the reply; a task still queued is
        kept."""
        controller, channel = self.controller(retention=10.0)
        self.clock.advance(1000.0)
        envelopes = [Task("a = %d" % i).to_envelope() for i in range(4)]
        done, *waiting = controller.submit(envelopes)
        self.clock.advance(0)
        seq = channel.pending()[0][0]
        # A real engine stamps its reply with its own wall clock.
        now = time.time()
        channel.reply(seq, True, serialization.dumps({}), started=now - 1.0, finished=now)
        self.clock.advance(0)
        self.assertIsNotNone(controller.results([done]).result[0])
        self.clock.advance(9.0)
        self.assertIsNotNone(controller.results([done]).result[0])
        self.clock.advance(2.0)
        self.assertRaises(UnknownTask, controller.results, [done])
        self.assertEqual(len(controller.results(waiting).result), 3)

    def test_submission_token(self):
        """Submitting the same (token, batch) twice gives the same ids and
        queues the tasks once; another token queues them again."""
        controller, _ = self.controller(retention=None)
        envelopes = [Task("a = %d" % i).to_envelope() for i in range(3)]
        ids = controller.submit(envelopes, token="t-1")
        self.assertEqual(controller.submit(envelopes, token="t-1"), ids)
        self.assertEqual(_unfinished(controller), 3)
        other = controller.submit(envelopes, token="t-2")
        self.assertEqual(other, [i + 3 for i in ids])
        self.assertEqual(_unfinished(controller), 6)


def _unfinished(controller: TaskController) -> int:
    status = controller.queue_status()
    return status["scheduled"] + status["pending"]


#: A task that waits (at most 60 s) for the file `gate` to exist, then
#: returns a result big enough to go to a file beside the journal.
_GATED = """\
import os, time
deadline = time.time() + 60
while not os.path.exists(gate) and time.time() < deadline:
    time.sleep(0.02)
r = n * 200_000 * b"r"
"""


class FullDiskTests(_RestartTestCase):
    """Case 12: the journal on a small tmpfs that fills up (root only)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root (CI runs as root)")
        outside = temp_dir(self, "taskfarm-disk-")
        self.root = str(outside / "profile")
        os.mkdir(self.root)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", self.root],
                       check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.root], check=False)
        # Logs stay off the small disk: only the journal and furls live there.
        (outside / "log").mkdir()
        os.symlink(outside / "log", Path(self.root) / "log")
        self.gate = outside / "gate"
        self.filler = Path(self.root) / "filler"

    def fill_disk(self) -> None:
        fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            for size in (65536, 4096, 512):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free_disk(self) -> None:
        self.filler.unlink()

    @_deferred
    async def test_full_disk_refuses_submissions_and_keeps_results(self):
        """With the disk full, a submission is refused whole with a
        JournalError naming the cause and none of it runs; results that
        arrive meanwhile reach the client at once; once space is back they
        are written, and a restart keeps them."""
        from taskfarm.errors import JournalError
        from taskfarm.testing.helpers import wait_until

        first = await self.start(1)
        client = first.task_client()
        gated = await client.run_many(
            [Task(_GATED, push={"gate": str(self.gate), "n": n}, pull="r") for n in range(1, 5)]
        )
        self.fill_disk()

        marker = Path(self.root).parent / "ran"
        refused = [
            Task("open(marker + str(i), 'w').close()", push={"marker": str(marker),
                 "i": i, "pad": os.urandom(300_000)})
            for i in range(4)
        ]
        with self.assertRaises(JournalError) as caught:
            await client.run_many(refused)
        self.assertIn("full", str(caught.exception))
        status = first.controller.tasks.queue_status(verbose=True)
        del status["engines"]  # per-engine counts, not id lists
        self.assertEqual(sorted(status["pending"] + status["scheduled"]), gated)
        self.assertEqual(sum(len(v) for v in status.values()), len(gated))

        self.gate.touch()
        results = await client.get_task_results(gated, block=True)
        self.assertEqual([len(r.ns.r) for r in results], [n * 200_000 for n in range(1, 5)])
        journal = first.controller.journal
        await wait_until(lambda: journal.trouble is not None, "the journal to notice", 10)

        self.free_disk()
        await wait_until(lambda: journal.trouble is None, "the journal to recover", 30)
        later = await client.run(Task("x = 1", pull="x"))
        self.assertEqual((await client.get_task_result(later, block=True)).ns.x, 1)
        self.assertEqual([p for p in marker.parent.iterdir() if p.name.startswith("ran")], [])
        await first.stop_once()

        second = await self.start()
        again = await second.task_client().get_task_results(gated)
        self.assertEqual([r.ns.r for r in again], [r.ns.r for r in results])
