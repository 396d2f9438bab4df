"""Unit tests of where user code runs on an engine: `Namespace` (called
directly) and `CommandWorker` (its thread, with the real reactor trial runs)."""

import sys
import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.engine.namespace import Namespace
from taskfarm.engine.worker import CommandWorker
from taskfarm.errors import RemoteTaskError, TaskAborted, TaskfarmError, TaskTimeout, from_wire
from taskfarm.task import CALL, EXEC, MapTask, Task

ENGINE_ID = 3


def _divide(a, b):
    return a / b


def _add(a, b=0):
    return a + b


def _task_args(t, timeout=None):
    """The args of a "task" command, as the controller sends them."""
    kind, payload, options, _, _ = t.to_envelope()
    clear_before, clear_after = options[0], options[1]
    return (kind, payload, clear_before, clear_after, timeout if timeout is not None else options[4])


class NamespaceTests(unittest.TestCase):
    """`Namespace.run`: each operation answers ``(ok, data)`` and never raises."""

    def setUp(self):
        self.ns = Namespace(ENGINE_ID)

    def ok(self, op, *args):
        ok, data = self.ns.run(op, args)
        if not ok:
            self.fail("%s failed: %r" % (op, from_wire(data)))
        return data

    def error(self, op, *args):
        ok, data = self.ns.run(op, args)
        self.assertFalse(ok, "%s should have failed" % op)
        return from_wire(data)

    def run_task(self, t, **kw):
        return self.ns.run("task", _task_args(t, **kw))

    def test_id_is_engine_id(self):
        """The namespace holds the engine's id as `id`."""
        self.ok("execute", "a = id")
        self.assertEqual(self.ns.user_ns["a"], ENGINE_ID)

    def test_execute_persists(self):
        """Names set by one execute are seen by the next."""
        self.ok("execute", "a = 2")
        self.ok("execute", "b = a * 21")
        self.assertEqual(self.ns.user_ns["b"], 42)

    def test_execute_captures_stdout_and_stderr(self):
        """execute returns what the code printed, stdout and stderr apart."""
        result = serialization.unpack(
            self.ok("execute", "import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
        )
        self.assertEqual(result["stdout"], "hello\n")
        self.assertEqual(result["stderr"], "oops\n")

    def test_stdout_capture_survives_stdout_swap(self):
        """Capture still works after someone else (a logger, a test runner) replaced sys.stdout."""
        self.ok("execute", "print('first')")
        sink = _Sink()
        saved = sys.stdout
        sys.stdout = sink
        self.addCleanup(setattr, sys, "stdout", saved)
        result = serialization.unpack(self.ok("execute", "print('second')"))
        self.assertEqual(result["stdout"], "second\n")
        self.assertEqual(sink.getvalue(), "")

    def test_capture_is_per_thread(self):
        """Output written by another thread during an execute is not captured."""
        code = (
            "import threading\n"
            "t = threading.Thread(target=print, args=('not mine',))\n"
            "t.start(); t.join()\n"
            "print('mine')"
        )
        sink = _Sink()
        saved = sys.stdout
        sys.stdout = sink
        self.addCleanup(setattr, sys, "stdout", saved)
        result = serialization.unpack(self.ok("execute", code))
        self.assertEqual(result["stdout"], "mine\n")
        self.assertEqual(sink.getvalue(), "not mine\n")

    def test_push_pull(self):
        """push puts values in the namespace; pull gives them back, in order."""
        self.ok("push", serialization.dumps({"x": 1, "y": [2, 3]}))
        blobs = serialization.unpack(self.ok("pull", ("y", "x")))
        self.assertEqual([serialization.loads(b) for b in blobs], [[2, 3], 1])

    def test_pull_missing_name(self):
        """Pulling a name that is not there is a NameError naming it and the engine."""
        error = self.error("pull", ("nothere",))
        self.assertIsInstance(error, RemoteTaskError)
        self.assertEqual(error.ename, "NameError")
        self.assertIn("'nothere'", error.evalue)
        self.assertIn("engine %d" % ENGINE_ID, error.evalue)
        self.assertEqual(error.engine_id, ENGINE_ID)

    def test_pull_unpicklable(self):
        """Pulling a value that cannot be pickled names the variable."""
        self.ok("execute", "import threading\nlock = threading.Lock()")
        error = self.error("pull", ("lock",))
        self.assertEqual(error.ename, "SerializationError")
        self.assertIn("'lock'", error.evalue)

    def test_task_exec(self):
        """A code task pushes, runs and pulls; its answer is the pulled dict."""
        data = self.ok("task", *_task_args(Task("c = a + b", pull=["c", "a"], push={"a": 1, "b": 2})))
        self.assertEqual(serialization.loads(data), {"c": 3, "a": 1})

    def test_task_call(self):
        """A function task calls the function; its answer is the return value."""
        data = self.ok("task", *_task_args(MapTask(_add, (2,), {"b": 5})))
        self.assertEqual(serialization.loads(data), 7)

    def test_task_call_lambda(self):
        """A lambda with a closure runs on the engine."""
        k = 10
        data = self.ok("task", *_task_args(MapTask(lambda x: x * k, (4,))))
        self.assertEqual(serialization.loads(data), 40)

    def test_task_pull_missing(self):
        """A task pulling a name its code did not set fails with NameError naming the engine."""
        ok, data = self.run_task(Task("a = 1", pull="b"))
        self.assertFalse(ok)
        error = from_wire(data)
        self.assertEqual(error.ename, "NameError")
        self.assertIn("'b'", error.evalue)
        self.assertIn("engine %d" % ENGINE_ID, error.evalue)

    def test_task_pull_unpicklable_named(self):
        """A task pulling an unpicklable value fails naming that variable, not just 'the pulled values'."""
        ok, data = self.run_task(Task("import threading\nlock = threading.Lock()\nfine = 1", pull=["fine", "lock"]))
        self.assertFalse(ok)
        error = from_wire(data)
        self.assertIsInstance(error, RemoteTaskError)
        self.assertEqual(error.ename, "SerializationError")
        self.assertIn("pulled name 'lock'", error.evalue)

    def test_task_unpicklable_return_value(self):
        """A function returning something unpicklable fails saying it is the return value."""
        ok, data = self.run_task(MapTask(threading.Lock))
        self.assertFalse(ok)
        self.assertIn("return value", from_wire(data).evalue)

    def test_clear_before(self):
        """clear_before empties the namespace (except `id`) before the task runs."""
        self.ok("execute", "old = 1")
        ok, data = self.run_task(Task("found = 'old' in globals()\nmine = id", pull=["found", "mine"], clear_before=True))
        self.assertTrue(ok)
        self.assertEqual(serialization.loads(data), {"found": False, "mine": ENGINE_ID})

    def test_without_clear_before(self):
        """Without clear_before the task sees what earlier commands left."""
        self.ok("execute", "old = 1")
        ok, data = self.run_task(Task("found = 'old' in globals()", pull="found"))
        self.assertEqual(serialization.loads(data), {"found": True})

    def test_clear_after(self):
        """clear_after empties the namespace once the task ran, its result intact."""
        ok, data = self.run_task(Task("a = 5", pull="a", push={"p": 1}, clear_after=True))
        self.assertTrue(ok)
        self.assertEqual(serialization.loads(data), {"a": 5})
        self.assertNotIn("a", self.ns.user_ns)
        self.assertNotIn("p", self.ns.user_ns)
        self.assertEqual(self.ns.user_ns["id"], ENGINE_ID)

    def test_clear_after_even_on_failure(self):
        """clear_after runs even when the task failed."""
        ok, _ = self.run_task(Task("a = 5\n1/0", clear_after=True))
        self.assertFalse(ok)
        self.assertNotIn("a", self.ns.user_ns)

    def test_user_error(self):
        """A user exception comes back as RemoteTaskError with name, message and engine id."""
        ok, data = self.run_task(Task("x = 1/0"))
        error = from_wire(data)
        self.assertEqual((error.ename, error.evalue), ("ZeroDivisionError", "division by zero"))
        self.assertEqual(error.engine_id, ENGINE_ID)

    def test_traceback_without_engine_frames(self):
        """The traceback text shows the user's code and none of the engine's own frames."""
        ok, data = self.run_task(Task("def inner():\n    return 1/0\n\ninner()"))
        tb = from_wire(data).traceback
        self.assertIn("Traceback (most recent call last)", tb)
        self.assertIn('File "<engine %d>", line 4' % ENGINE_ID, tb)
        self.assertIn("in inner", tb)
        self.assertIn("ZeroDivisionError: division by zero", tb)
        self.assertNotIn("namespace.py", tb)
        self.assertNotIn("taskfarm", tb)

    def test_function_traceback_without_engine_frames(self):
        """A failing function task's traceback starts at the user's function."""
        ok, data = self.run_task(MapTask(_divide, (1, 0)))
        error = from_wire(data)
        self.assertEqual(error.ename, "ZeroDivisionError")
        self.assertIn("_divide", error.traceback)
        self.assertIn("test_engine_namespace.py", error.traceback)
        self.assertNotIn("engine/namespace.py", error.traceback)
        self.assertNotIn("/taskfarm/", error.traceback)

    def test_syntax_error(self):
        """Code that does not compile is a SyntaxError naming the engine's pseudo-file."""
        ok, data = self.run_task(Task("a = = 1"))
        self.assertFalse(ok)
        error = from_wire(data)
        self.assertEqual(error.ename, "SyntaxError")
        self.assertIn("<engine %d>" % ENGINE_ID, error.traceback)
        self.assertNotIn("namespace.py", error.traceback)

    def test_system_exit_is_an_error(self):
        """User code calling sys.exit fails its task; the engine does not exit."""
        ok, data = self.run_task(Task("import sys\nsys.exit(3)"))
        self.assertFalse(ok)
        self.assertEqual(from_wire(data).ename, "SystemExit")
        self.ok("execute", "still = 'here'")

    def test_unknown_operation(self):
        """An operation the engine does not know is refused as data."""
        error = self.error("format_disk")
        self.assertIsInstance(error, TaskfarmError)
        self.assertIn("format_disk", str(error))

    def test_unknown_task_kind(self):
        """A task kind the engine does not know is refused."""
        ok, data = self.ns.run("task", ("shell", b"", False, False))
        self.assertFalse(ok)
        self.assertIn("shell", str(from_wire(data)))

    def test_keys_and_reset(self):
        """keys lists user names; reset leaves only `id`."""
        self.ok("execute", "a = 1\nb = 2")
        self.assertEqual(serialization.unpack(self.ok("keys")), ["a", "b", "id"])
        self.ok("reset")
        self.assertEqual(serialization.unpack(self.ok("keys")), ["id"])


class _Sink:
    """A stand-in stdout that someone else (a logger, a test runner) installed."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)
        return len(text)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.text)


class CommandWorkerTests(unittest.TestCase):
    """`CommandWorker`: one thread runs commands in order; interrupts and timeouts stop them."""

    timeout = 60

    #: A loop that ends on its own after 30 s, so a broken interrupt cannot hang the run.
    LONG = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\nfinished = True"

    def setUp(self):
        # A worker that gives up on a stuck command records it (the default
        # would exit this process).
        self.stuck = []
        self.worker = CommandWorker(
            Namespace(), reactor, stuck_grace=10.0, on_stuck=lambda: self.stuck.append(True)
        )
        self.replies = []
        self._waiting = []
        self.worker.start()
        self.worker.begin_session(ENGINE_ID, self._sink)
        self.addCleanup(self.worker.stop)
        self.addCleanup(lambda: self.assertEqual(self.stuck, [], "the worker gave up on a command"))

    def _sink(self, replies):
        self.replies.extend(replies)
        for count, d in list(self._waiting):
            if len(self.replies) >= count:
                self._waiting.remove((count, d))
                d.callback(self.replies)

    def until(self, count):
        """A Deferred that fires once `count` replies have come back."""
        if len(self.replies) >= count:
            return defer.succeed(self.replies)
        d = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def send(self, *commands):
        self.worker.receive(list(commands))

    def by_seq(self):
        return {seq: (ok, data) for seq, ok, data, *_ in self.replies}

    def error_of(self, seq):
        ok, data = self.by_seq()[seq]
        self.assertFalse(ok)
        return from_wire(data)

    async def _started(self, name="started"):
        """Wait until the worker thread has set `name` in the namespace."""
        for _ in range(500):
            if name in self.worker.namespace.user_ns:
                return
            d = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            await d
        self.fail("the command never started")

    def test_commands_run_in_order(self):
        """Commands run one after the other, in the order received, and answer in that order."""
        self.send(
            (0, "execute", ("log = [0]",)),
            (1, "execute", ("log.append(1)",)),
            (2, "task", _task_args(Task("log.append(2)", pull="log"))),
            (3, "pull", (("log",),)),
        )

        async def check():
            await self.until(4)
            self.assertEqual([r[0] for r in self.replies], [0, 1, 2, 3])
            self.assertTrue(all(r[1] for r in self.replies))
            self.assertEqual(serialization.loads(self.by_seq()[2][1]), {"log": [0, 1, 2]})
            started, finished = self.replies[0][3], self.replies[0][4]
            self.assertLessEqual(started, finished)

        return defer.Deferred.fromCoroutine(check())

    def test_interrupt_queued_command(self):
        """Interrupting a queued command answers TaskAborted without running it."""
        self.send(
            (0, "execute", ("started = 1\n" + self.LONG,)),
            (1, "execute", ("ran = True",)),
        )

        async def check():
            await self._started()
            self.worker.interrupt(1)
            self.worker.interrupt(0)
            await self.until(2)
            self.assertIsInstance(self.error_of(1), TaskAborted)
            self.assertIsInstance(self.error_of(0), TaskAborted)
            self.assertNotIn("ran", self.worker.namespace.user_ns)

        return defer.Deferred.fromCoroutine(check())

    def test_interrupt_running_loop(self):
        """A running ``while True: pass`` loop is stopped, and the worker keeps working."""
        self.send((0, "execute", ("started = 1\nwhile True: pass",)))

        async def check():
            await self._started()
            self.worker.interrupt(0)
            await self.until(1)
            self.assertIsInstance(self.error_of(0), TaskAborted)
            self.send((1, "execute", ("after = 'ok'",)))
            await self.until(2)
            self.assertTrue(self.by_seq()[1][0])
            self.assertEqual(self.worker.namespace.user_ns["after"], "ok")

        return defer.Deferred.fromCoroutine(check())

    def test_interrupt_not_swallowed_by_except(self):
        """User code with a bare ``except Exception`` cannot swallow the interrupt."""
        code = (
            "started = 1\nimport time\nt = time.time()\n"
            "while time.time() - t < 30:\n"
            "    try:\n        sum(range(1000))\n    except Exception:\n        pass\n"
            "survived = True"
        )
        self.send((0, "execute", (code,)))

        async def check():
            await self._started()
            self.worker.interrupt(0)
            await self.until(1)
            self.assertIsInstance(self.error_of(0), TaskAborted)
            self.assertNotIn("survived", self.worker.namespace.user_ns)

        return defer.Deferred.fromCoroutine(check())

    def test_task_timeout(self):
        """A task running past its timeout (args[4]) is stopped with TaskTimeout."""
        self.send((0, "task", _task_args(Task(self.LONG, pull="finished"), timeout=0.3)))
        self.send((1, "task", _task_args(Task("b = 2", pull="b"), timeout=5)))

        async def check():
            await self.until(2)
            self.assertIsInstance(self.error_of(0), TaskTimeout)
            self.assertNotIn("finished", self.worker.namespace.user_ns)
            ok, data = self.by_seq()[1]
            self.assertTrue(ok)
            self.assertEqual(serialization.loads(data), {"b": 2})

        return defer.Deferred.fromCoroutine(check())

    def test_task_output_in_replies_also_when_stopped(self):
        """A task's reply carries its own output (`wire.Reply` version 4),
        also when its timeout stopped it; other commands' replies carry none."""
        self.send((0, "task", _task_args(Task("print('before')\n" + self.LONG), timeout=0.3)))
        self.send((1, "task", _task_args(Task("print('next')"), timeout=5)))
        self.send((2, "push", (serialization.dumps({"a": 1}),)))

        async def check():
            await self.until(3)
            replies = {r[0]: wire.Reply.parse(r) for r in self.replies}
            self.assertIsInstance(self.error_of(0), TaskTimeout)
            self.assertEqual((replies[0].stdout, replies[0].stderr), ("before\n", ""))
            self.assertEqual(replies[1].stdout, "next\n")
            self.assertIsNone(replies[2].stdout)

        return defer.Deferred.fromCoroutine(check())

    def test_timeout_does_not_hit_next_command(self):
        """A task that ends before its timeout leaves no timer to stop the next command."""
        self.send((0, "task", _task_args(Task("a = 1"), timeout=0.2)))
        self.send((1, "execute", ("started = 1\nimport time\ntime.sleep(0.5)\ndone = True",)))

        async def check():
            await self.until(2)
            self.assertTrue(self.by_seq()[0][0])
            self.assertTrue(self.by_seq()[1][0], self.by_seq()[1])
            self.assertTrue(self.worker.namespace.user_ns.get("done"))

        return defer.Deferred.fromCoroutine(check())

    def test_end_session_drops_queued(self):
        """A new session drops the old session's queued commands and interrupts the running one."""
        self.send(
            (0, "execute", ("started = 1\n" + self.LONG,)),
            (1, "execute", ("stale = True",)),
        )

        async def check():
            await self._started()
            old_replies = list(self.replies)
            self.worker.begin_session(ENGINE_ID + 1, self._sink)
            self.send((0, "execute", ("fresh = id",)))
            await self.until(len(old_replies) + 1)
            self.assertEqual(self.replies[-1][:2], (0, True))
            self.assertEqual(self.worker.namespace.user_ns["fresh"], ENGINE_ID + 1)
            self.assertNotIn("stale", self.worker.namespace.user_ns)
            self.assertNotIn("finished", self.worker.namespace.user_ns)

        return defer.Deferred.fromCoroutine(check())

    def test_task_kinds_through_worker(self):
        """Both kinds of task run through the worker thread."""
        self.send(
            (0, "task", _task_args(Task("a = 6 * 7", pull="a"))),
            (1, "task", _task_args(MapTask(_add, (1, 2)))),
        )

        async def check():
            await self.until(2)
            self.assertEqual(serialization.loads(self.by_seq()[0][1]), {"a": 42})
            self.assertEqual(serialization.loads(self.by_seq()[1][1]), 3)

        return defer.Deferred.fromCoroutine(check())


class EnvelopeKindTests(unittest.TestCase):
    """The engine reads the same kinds the client writes."""

    def test_kinds(self):
        """Task encodes as exec and MapTask as call."""
        self.assertEqual(Task("a").to_envelope()[0], EXEC)
        self.assertEqual(MapTask(_add, (1,)).to_envelope()[0], CALL)
