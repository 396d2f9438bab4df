"""MultiEngine `interrupt`, `abort` and `timeout=` on a `task.Clock`: the
real client, Referenceable and controller `MultiEngine`, with in-process
engines (`LocalGrid`), and the version-4 messages that carry them.

tests/test_engine_interrupt.py shows the same against real engine
processes (a real runaway loop, a real kill).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from taskfarm import exitcodes, wire
from taskfarm.controller.registry import DEFAULT_TIMEOUT_GRACE
from taskfarm.engine.namespace import Namespace
from taskfarm.engine.worker import CommandWorker
from taskfarm.errors import (
    BadRequest,
    CompositeError,
    NoEnginesRegistered,
    ProtocolVersionError,
    QueueCleared,
    TaskAborted,
    TaskfarmError,
    WaitTimeout,
    from_wire,
)
from taskfarm.multiengineclient import ENGINE_ANSWER_MARGIN
from taskfarm.task import Task
from taskfarm.testing.grid import LocalGrid
from taskfarm.testing.helpers import assert_composite, async_test


class WireTests(unittest.SynchronousTestCase):
    def test_engine_call_and_command_carry_a_timeout(self):
        """Without a timeout both stay version 1 (as an older peer sends);
        with one they are version 4, and parse back to the same."""
        call = wire.EngineCall("execute", "all", ("a = 1",))
        self.assertEqual(call.plain(), ("execute", "all", ("a = 1",), None))
        timed = wire.EngineCall("execute", [0], ("a = 1",), None, 2.5)
        self.assertEqual(timed.plain(), ("execute", [0], ("a = 1",), None, 4, 2.5))
        self.assertEqual(wire.EngineCall.parse(timed.plain()), timed)
        self.assertIsNone(wire.EngineCall.parse(call.plain()).timeout)
        command = wire.Command(3, "execute", ("a = 1",), 0.5)
        self.assertEqual(command.plain(), (3, "execute", ("a = 1",), 4, 0.5))
        self.assertEqual(wire.Command.parse(command.plain()), command)
        self.assertEqual(wire.Command.parse((3, "keys", ())).timeout, None)

    def test_bad_and_newer_messages(self):
        """A bad timeout names the field; a control op takes nothing; a
        newer version is refused as such."""
        for bad in (0, -1, "1", True, float("nan")):
            with self.subTest(timeout=bad):
                with self.assertRaisesRegex(BadRequest, "timeout"):
                    wire.EngineCall.parse(("execute", "all", ("x",), None, 4, bad))
                with self.assertRaisesRegex(BadRequest, "timeout"):
                    wire.Command.parse((1, "execute", ("x",), 4, bad))
        self.assertEqual(wire.EngineCall.parse(("interrupt", [0], (), None)).op, "interrupt")
        for call in (("abort", "all", ("x",), None), ("interrupt", "all", (), None, 4, 1.0)):
            with self.assertRaisesRegex(BadRequest, "takes no arguments"):
                wire.EngineCall.parse(call)
        newer = wire.WIRE_VERSION + 1
        self.assertRaises(
            ProtocolVersionError, wire.EngineCall.parse, ("keys", "all", (), None, newer, 1)
        )
        self.assertRaises(ProtocolVersionError, wire.Command.parse, (1, "keys", (), newer, 1))

    def test_wait_timeout_is_a_timeout_error(self):
        self.assertTrue(issubclass(WaitTimeout, TaskfarmError))
        self.assertTrue(issubclass(WaitTimeout, TimeoutError))


class ControlTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.channels = [self.grid.add_engine() for _ in range(2)]
        self.mec = self.grid.multiengine_client()

    def settle(self, d: defer.Deferred | None = None) -> None:
        self.grid.settle(0.2, 0.001, until=d)

    def value(self, d):
        self.settle(d)
        return self.successResultOf(d)

    def error(self, d, *types):
        self.settle(d)
        return self.failureResultOf(d, *types).value

    def test_interrupt_stops_only_the_running_command(self):
        """interrupt answers, per target, the op it interrupted; only the
        head of the stream is interrupted: the queued command then runs,
        and an idle engine answers None."""
        busy = self.channels[0]
        busy.hold()
        running = self.mec.execute("a = 1", targets=0, block=False)
        queued = self.mec.execute("b = 2", targets=0, block=False)
        self.settle()
        self.assertEqual(self.value(self.mec.interrupt()), ["execute", None])
        busy.release()
        pending = self.value(running)
        assert_composite(
            self, self.error(pending.get_result(), CompositeError), "execute", {0: TaskAborted}
        )
        self.value(self.value(queued).get_result())
        self.assertEqual(self.value(self.mec.keys(targets=0)), [["b", "id"]])

    def test_a_running_task_is_left_alone(self):
        """A Task-interface task at the head is not the MultiEngine
        interface's to interrupt: interrupt answers None and it completes."""
        for channel in self.channels:
            channel.hold()
        tc = self.grid.task_client()
        taskid = self.value(tc.run(Task("t = 1", pull="t")))
        self.settle()
        self.assertEqual(self.value(self.mec.interrupt()), [None, None])
        for channel in self.channels:
            channel.release()
        result = self.value(tc.get_task_result(taskid, block=True))
        self.assertIsNone(result.failure)
        self.assertEqual(result.ns.t, 1)

    def test_abort_clears_the_queue_too(self):
        """abort: the running command is interrupted, the queued ones fail
        with QueueCleared and never run."""
        busy = self.channels[0]
        busy.hold()
        running = self.mec.execute("a = 1", targets=0, block=False)
        queued = self.mec.execute("b = 2", targets=0, block=False)
        self.settle()
        self.assertEqual(self.value(self.mec.abort(targets=[0])), ["execute"])
        assert_composite(
            self, self.error(self.value(queued).get_result(), CompositeError),
            "execute", {0: QueueCleared},
        )
        busy.release()
        assert_composite(
            self, self.error(self.value(running).get_result(), CompositeError),
            "execute", {0: TaskAborted},
        )
        self.assertEqual(self.value(self.mec.keys(targets=0)), [["id"]])

    def test_timeout_travels_to_the_engine_and_the_controller_backs_it(self):
        """The command carries the call's timeout to the engine (which
        interrupts it there).  An engine that does not answer: the client
        gives up a margin after the timeout (WaitTimeout); the registry's
        own answer after its grace and the engine's late reply harm
        nothing, and the engine goes on serving."""
        busy = self.channels[0]
        busy.hold()
        d = self.mec.execute("a = 1", targets=[0, 1], timeout=1.5)
        self.settle()
        self.assertEqual(busy._held[0][3:], (4, 1.5))
        self.assertFalse(d.called)
        self.grid.clock.advance(1.5 + ENGINE_ANSWER_MARGIN + 0.1)
        self.error(d, WaitTimeout)
        self.grid.clock.advance(DEFAULT_TIMEOUT_GRACE)
        self.settle()
        busy.release()
        self.settle()
        self.assertEqual(self.value(self.mec.pull("a")), [1, 1])

    def test_bad_timeout_is_refused_before_anything_runs(self):
        # The client checks it before sending (the controller's parse
        # would refuse it too: `WireTests`).
        error = self.error(self.mec.execute("a = 1", timeout=-1), ValueError)
        self.assertIn("timeout", str(error))
        self.assertEqual(self.value(self.mec.keys()), [["id"], ["id"]])


class NoEnginesTests(unittest.SynchronousTestCase):
    """What docs/multiengine-guide.md section 12 says of a cluster without
    engines: ``kill()`` raises `NoEnginesRegistered`, ``kill(controller=True)``
    still stops the controller (and so the cluster)."""

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.mec = self.grid.multiengine_client()

    def settle(self, d):
        for _ in range(200):
            if d.called:
                return
            self.grid.clock.advance(0.001)

    def controller_stops(self) -> list:
        return [
            call for call in self.grid.clock.getDelayedCalls()
            if call.func is exitcodes.stop_reactor_and_exit
        ]

    def test_kill_without_engines(self):
        for d in (self.mec.kill(), self.mec.interrupt(), self.mec.abort()):
            self.settle(d)
            self.failureResultOf(d, NoEnginesRegistered)
        self.assertEqual(self.controller_stops(), [])
        d = self.mec.kill(controller=True)
        self.settle(d)
        self.assertIsNone(self.successResultOf(d))
        (stop,) = self.controller_stops()
        # Never run here: it would end the test process.
        stop.cancel()


class WorkerControlTests(unittest.TestCase):
    """The engine's `CommandWorker` (its real thread, the real reactor, no
    process): a ``kill`` is done on arrival, and a command's version-4
    timeout interrupts it with `WaitTimeout`."""

    timeout = 60
    #: Ends on its own after 30 s, so a broken interrupt cannot hang the run.
    LOOP = "started = 1\nimport time\nt = time.time()\nwhile time.time() - t < 30: pass\nfinished = True"

    def setUp(self):
        self.killed = []
        self.worker = CommandWorker(
            Namespace(), reactor, stuck_grace=10.0,
            on_stuck=lambda: self.fail("the worker gave up on a command"),
            on_kill=lambda: self.killed.append(True),
        )
        self.replies = []
        self.worker.start()
        self.worker.begin_session(0, self.replies.extend)
        self.addCleanup(self.worker.stop)

    async def until(self, condition, what):
        for _ in range(1000):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("timed out waiting for " + what)

    def by_seq(self):
        return {seq: (ok, data) for seq, ok, data, _, _ in self.replies}

    @async_test
    async def test_kill_is_done_on_arrival(self):
        """A kill behind a running loop and a queued command is answered at
        once; the loop is interrupted (TaskAborted), the queued command
        never runs, and the worker then ends the engine."""
        self.worker.receive([(0, "execute", (self.LOOP,)), (1, "execute", ("ran = 1",))])
        await self.until(lambda: "started" in self.worker.namespace.user_ns, "the loop to start")
        self.worker.receive([(2, "kill", ())])
        await self.until(lambda: {0, 2} <= set(self.by_seq()), "the kill and the loop to answer")
        self.assertEqual(self.by_seq()[2], (True, b""))
        self.assertIsInstance(from_wire(self.by_seq()[0][1]), TaskAborted)
        await self.until(lambda: self.killed, "the worker to end the engine")
        self.assertNotIn(1, self.by_seq())
        self.assertNotIn("ran", self.worker.namespace.user_ns)
        self.assertNotIn("finished", self.worker.namespace.user_ns)

    @async_test
    async def test_a_command_past_its_timeout_answers_wait_timeout(self):
        """A version-4 command carries its timeout: past it the running code
        is interrupted and answers WaitTimeout; the next command runs."""
        self.worker.receive([(0, "execute", (self.LOOP,), 4, 0.2), (1, "execute", ("after = 1",), 4, 30.0)])
        await self.until(lambda: len(self.replies) == 2, "both commands to answer")
        error = from_wire(self.by_seq()[0][1])
        self.assertIsInstance(error, WaitTimeout)
        self.assertIn("execute command ran past its timeout of 0.2 s", str(error))
        self.assertTrue(self.by_seq()[1][0])
        self.assertNotIn("finished", self.worker.namespace.user_ns)
        self.assertEqual(self.killed, [])
