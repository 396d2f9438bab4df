"""Task output comes back (issue 13 item 5): a Task's and a MapTask's stdout
and stderr are captured per task on the engine, bounded (``--max-task-output``,
1 MiB per stream by default, what is cut said as ``[... N bytes cut]``),
returned as ``tr.stdout`` / ``tr.stderr`` and kept in the journal.

Unit tests run the engine's `Namespace` and a whole `LocalGrid` on a Clock;
`OutputRestartTests` runs engine processes and restarts the controller.
"""

from __future__ import annotations

import sqlite3

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.controller.journal import Journal
from taskfarm.engine import tap as engine_tap
from taskfarm.engine.namespace import DEFAULT_MAX_TASK_OUTPUT, BoundedOutput, Namespace
from taskfarm.errors import BadRequest, RemoteTaskError
from taskfarm.task import MapTask, Task, result_from_envelope
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.grid import LocalGrid
from taskfarm.testing.helpers import async_test, temp_dir


def shout(word, times):
    import sys

    for _ in range(times):
        print(word)
    print("done", file=sys.stderr)
    return len(word) * times


def _task_args(task) -> tuple:
    envelope = wire.TaskEnvelope.parse(task.to_envelope())
    return tuple(wire.TaskArgs(envelope.kind, envelope.payload, False, False, None))


class BoundedOutputTests(unittest.SynchronousTestCase):
    def test_kept_under_the_limit(self):
        out = BoundedOutput(10)
        self.assertEqual(out.write("abc"), 3)
        out.write("defghij")
        self.assertEqual(out.getvalue(), "abcdefghij")
        self.assertEqual(out.cut, 0)

    def test_cut_with_the_count_of_bytes(self):
        """What passes the limit is cut; the notice counts the bytes cut."""
        out = BoundedOutput(10)
        out.write("abcdefgh\n")
        out.write("0123456789\n")
        out.write("more\n")
        self.assertEqual(out.getvalue(), "abcdefgh\n0\n[... 15 bytes cut]\n")
        self.assertEqual(out.cut, 15)

    def test_limit_counts_utf8_bytes(self):
        """The limit is in UTF-8 bytes, and a character is never split."""
        out = BoundedOutput(5)
        out.write("ééé")  # 6 bytes
        self.assertEqual(out.getvalue(), "éé\n[... 2 bytes cut]\n")

    def test_default_limit(self):
        self.assertEqual(DEFAULT_MAX_TASK_OUTPUT, 1024 * 1024)


class NamespaceCaptureTests(unittest.SynchronousTestCase):
    def test_task_output_captured_per_task(self):
        """A task's prints and stderr writes are its own; the next task
        starts empty; other commands capture nothing."""
        namespace = Namespace()
        code = "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n"
        ok, _ = namespace.run("task", _task_args(Task(code)))
        self.assertTrue(ok)
        self.assertEqual(namespace.take_output(), ("hello\n", "oops\n"))
        self.assertIsNone(namespace.take_output())
        namespace.run("task", _task_args(Task("x = 1")))
        self.assertEqual(namespace.take_output(), ("", ""))
        namespace.run("push", (serialization.dumps({"a": 1}),))
        self.assertIsNone(namespace.take_output())

    def test_bounded_and_kept_on_failure(self):
        """Output beyond max_task_output is cut with the notice; a task that
        raises keeps what it printed."""
        namespace = Namespace(max_task_output=100)
        ok, _ = namespace.run("task", _task_args(Task("print('x' * 250)\nraise ValueError(1)")))
        self.assertFalse(ok)
        out, err = namespace.take_output()
        self.assertEqual(out, "x" * 100 + "\n[... 151 bytes cut]\n")
        self.assertEqual(err, "")

    def test_threads_a_task_starts_are_not_captured(self):
        """Only the task's own thread is captured: a thread it starts writes
        to the engine's stream, not into the task's output."""
        import io
        import sys

        from taskfarm.engine import namespace as namespace_module

        real = io.StringIO()
        self.patch(sys, "stdout", real)
        self.patch(namespace_module, "_streams", None)
        namespace = Namespace()
        code = (
            "import threading\nprint('mine')\n"
            "t = threading.Thread(target=print, args=('theirs',))\nt.start()\nt.join()\n"
        )
        namespace.run("task", _task_args(Task(code)))
        self.assertEqual(namespace.take_output(), ("mine\n", ""))
        self.assertEqual(real.getvalue(), "theirs\n")

    def test_map_task_output(self):
        namespace = Namespace()
        ok, data = namespace.run("task", _task_args(MapTask(shout, ("hi", 2))))
        self.assertTrue(ok)
        self.assertEqual(serialization.loads(data), 4)
        self.assertEqual(namespace.take_output(), ("hi\nhi\n", "done\n"))


class EngineOptionTests(unittest.SynchronousTestCase):
    def test_max_task_output_option(self):
        options = engine_tap.Options()
        options.parseOptions(["--max-task-output", "4096", "--furl-file", "x"])
        self.assertEqual(options["max-task-output"], 4096)
        options = engine_tap.Options()
        options.parseOptions(["--furl-file", "x"])
        self.assertEqual(options["max-task-output"], DEFAULT_MAX_TASK_OUTPUT)
        with self.assertRaises(usage.UsageError) as caught:
            engine_tap.Options().parseOptions(["--max-task-output", "-1", "--furl-file", "x"])
        self.assertIn("--max-task-output", str(caught.exception))


class WireTests(unittest.SynchronousTestCase):
    def test_reply_and_result_versions(self):
        """A reply with output is version 4, one without stays version 1; a
        result with output is version 4, and versions 1 and 3 still parse."""
        reply = wire.Reply(3, True, b"r", 1.0, 2.0, "out", "err")
        plain = reply.plain()
        self.assertEqual(plain, (3, True, b"r", 1.0, 2.0, 4, "out", "err"))
        self.assertEqual(wire.Reply.parse(serialization.unpack(serialization.pack(plain))), reply)
        self.assertEqual(wire.Reply(3, True, b"r", 1.0, 2.0).plain(), (3, True, b"r", 1.0, 2.0))
        with self.assertRaises(BadRequest) as caught:
            wire.Reply.parse((3, True, b"r", 1.0, 2.0, 4, b"bytes", "err"))
        self.assertIn("reply: stdout must be a str", str(caught.exception))
        result = wire.ResultEnvelope(1, "exec", True, b"d", 0, 1.0, 2.0, 3.0, 1, "o", "e")
        plain = result.plain()
        self.assertEqual(plain[8:], (4, 1, "o", "e"))
        self.assertEqual(wire.ResultEnvelope.parse(plain), result)
        v3 = (1, "exec", True, serialization.dumps({}), 0, 1.0, 2.0, 3.0, 3, 1)
        self.assertIsNone(wire.ResultEnvelope.parse(v3).stdout)
        self.assertEqual(result_from_envelope(v3).stdout, "")


class ReplyLimitTests(unittest.SynchronousTestCase):
    def test_output_over_the_message_limit_is_dropped_not_the_result(self):
        """A reply that only its output makes too big keeps its result; its
        output says how much was cut."""
        from taskfarm.engine.link import fit_replies

        reply = wire.Reply(1, True, b"small", 1.0, 2.0, "x" * 50_000, "").plain()
        ((fitted,),) = fit_replies([reply], 10_000)
        parsed = wire.Reply.parse(fitted)
        self.assertEqual((parsed.ok, parsed.data), (True, b"small"))
        self.assertEqual(
            parsed.stdout, "[... 50000 bytes cut: over the controller's message limit]\n"
        )
        self.assertEqual(parsed.stderr, "")


class GridOutputTests(unittest.TestCase):
    """Through the real controller logic and client, on a Clock."""

    @async_test
    async def test_results_carry_output(self):
        grid = LocalGrid()
        self.addCleanup(grid.stop)
        grid.add_engine()
        tc = grid.task_client()
        d = tc.run_many([
            Task("print('to stdout')\nimport sys\nsys.stderr.write('to stderr')"),
            MapTask(shout, ("ho", 3)),
            Task("print('before')\nraise RuntimeError('no')"),
        ])
        grid.settle()
        code, mapped, failing = self.successResultOf(d)
        d = tc.get_task_result(code, block=True)
        grid.settle()
        tr = self.successResultOf(d)
        self.assertEqual((tr.stdout, tr.stderr), ("to stdout\n", "to stderr"))
        # A MapTask's value comes plain; full=True gives its TaskResult.
        d = defer.gatherResults(
            [tc.get_task_result(mapped, block=True), tc.get_task_result(mapped, True, full=True)]
        )
        grid.settle()
        value, full = self.successResultOf(d)
        self.assertEqual(value, 6)
        self.assertEqual((full.value, full.stdout, full.stderr), (6, "ho\nho\nho\n", "done\n"))
        d = tc.get_task_results([failing])
        grid.settle()
        (tr,) = self.successResultOf(d)
        self.assertIsInstance(tr.failure, RemoteTaskError)
        self.assertEqual(tr.stdout, "before\n")


_SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE tasks (
    taskid INTEGER PRIMARY KEY, envelope BLOB NOT NULL, submitted REAL NOT NULL,
    state TEXT NOT NULL, link INTEGER NOT NULL DEFAULT 0, retries_left INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, engine_id INTEGER, started REAL, completed REAL,
    ok INTEGER, data BLOB
);
CREATE TABLE tokens (token TEXT PRIMARY KEY, first_id INTEGER NOT NULL,
    count INTEGER NOT NULL, created REAL NOT NULL, digest TEXT);
INSERT INTO meta VALUES ('schema', 2);
"""


class JournalOutputTests(unittest.TestCase):
    timeout = 30

    def test_schema_2_journal_gains_the_column(self):
        """A journal written before output was kept opens: its tasks read
        back without output, and new ones keep theirs."""
        path = temp_dir(self, "taskfarm-journal-") / "journal.sqlite"
        connection = sqlite3.connect(str(path))
        connection.executescript(_SCHEMA_2)
        envelope = serialization.pack(Task("a = 1").to_envelope())
        connection.execute(
            "INSERT INTO tasks VALUES (0, ?, 1.0, 'succeeded', 0, 0, 1, 0, 1.0, 2.0, 1, ?)",
            (envelope, b"result"),
        )
        connection.commit()
        connection.close()
        journal = Journal(path, reactor)
        journal.open()
        self.addCleanup(journal.close)
        (stored,) = journal.tasks()
        self.assertIsNone(stored.output)
        self.assertEqual(stored.data, b"result")


class OutputRestartTests(unittest.TestCase):
    """Engine processes print; the output is kept across a controller restart."""

    timeout = 120

    @async_test
    async def test_output_survives_a_restart(self):
        root = str(temp_dir(self, "taskfarm-output-"))
        first = RealCluster(reactor, profile_root=root)
        stopped = []

        async def stop(cluster):
            if cluster not in stopped:
                stopped.append(cluster)
                await cluster.stop()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop(first)))
        await first.start(1)
        tc = first.task_client()
        small = await tc.run(Task("print('kept across restarts')"))
        big = await tc.run(Task("print('y' * (1024 * 1024 + 100))"))
        mapped = await tc.run(MapTask(shout, ("map", 2)))
        await tc.barrier([small, big, mapped])
        tr = await tc.get_task_result(big)
        self.assertEqual(tr.stdout, "y" * (1024 * 1024) + "\n[... 101 bytes cut]\n")
        await stop(first)

        second = RealCluster(reactor, profile_root=root)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop(second)))
        await second.start(0)
        tc = second.task_client()
        results = await tc.get_task_results([small, big])
        self.assertEqual(results[0].stdout, "kept across restarts\n")
        self.assertTrue(results[1].stdout.endswith("[... 101 bytes cut]\n"))
        full = await tc.get_task_result(mapped, full=True)
        self.assertEqual((full.value, full.stdout, full.stderr), (6, "map\nmap\n", "done\n"))
        await stop(second)
