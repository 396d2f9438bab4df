"""Stopping runaway MultiEngine code, end to end: `interrupt`, `abort`,
`kill` that never waits behind the command it ends, and `timeout=`.

A real controller runs in the test's reactor and real engine processes run
the code (`ClusterTestCase`), through the Deferred MultiEngine client.
A runaway is ``while True: pass`` after touching a marker file, so the test
knows it runs; nothing sleeps for a fixed time.
"""

from __future__ import annotations

from twisted.internet import reactor

from taskfarm import exitcodes
from taskfarm.childprocess import exit_status
from taskfarm.cluster.slots import SlotState
from taskfarm.errors import CompositeError, QueueCleared, TaskAborted, WaitTimeout
from taskfarm.task import Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import assert_composite, wait_until
from taskfarm.testing.helpers import async_test as run

#: The bound the issue sets for stopping a runaway: an interrupt is an
#: exception raised in the engine's worker thread, not an engine restart
#: (which would take the engine's stuck grace of 5 s and more).
INTERRUPT_BOUND = 2.0


def runaway(marker) -> str:
    return "open(%r, 'w').close()\nwhile True:\n    pass\n" % str(marker)


async def failure_of(d, *types):
    try:
        value = await d
    except types as e:
        return e
    raise AssertionError("expected %s, got the value %r" % (types, value))


class InterruptTests(ClusterTestCase):
    folder_prefix = "taskfarm-interrupt-"

    def client(self):
        return self.cluster.multiengine_client()

    async def start_runaway(self, mec, engine_id: int = 0, name: str = "running"):
        marker = self.tmp / name
        pending = await mec.execute(runaway(marker), targets=engine_id, block=False)
        await wait_until(marker.exists, "the runaway command to start")
        return pending

    @run
    async def test_interrupt_stops_a_runaway_execute(self):
        """interrupt(targets) stops ``while True: pass`` within 2 s: its
        caller gets TaskAborted from that engine; the engine is the same
        process, keeps its namespace, and runs the next command and a Task
        sent to it."""
        mec = await self.start_cluster(1)
        tc = self.cluster.task_client()
        pid = self.cluster.engine_pid(0)
        await mec.execute("kept = 41")
        pending = await self.start_runaway(mec)
        started = reactor.seconds()
        self.assertEqual(await mec.interrupt(targets=0), ["execute"])
        error = await failure_of(pending.get_result(), CompositeError)
        elapsed = reactor.seconds() - started
        assert_composite(self, error, "execute", {0: TaskAborted})
        self.assertLess(elapsed, INTERRUPT_BOUND)
        self.assertEqual(self.cluster.engine_pid(0), pid)
        self.assertEqual(await mec.pull("kept", targets=0), [41])
        taskid = await tc.run(Task("t = kept + 1", pull="t"))
        result = await tc.get_task_result(taskid, block=True)
        self.assertIsNone(result.failure)
        self.assertEqual((result.engineid, result.ns.t), (0, 42))
        # Nothing running: nothing interrupted.
        self.assertEqual(await mec.interrupt(), [None])

    @run
    async def test_abort_drops_the_queue_and_interrupts(self):
        """abort fails the queued MultiEngine commands with QueueCleared,
        interrupts the running one, and leaves other engines alone."""
        mec = await self.start_cluster(2)
        pending = await self.start_runaway(mec)
        queued = await mec.execute("never = 1", targets=0, block=False)
        self.assertEqual(await mec.abort(targets=[0]), ["execute"])
        assert_composite(
            self, await failure_of(pending.get_result(), CompositeError), "execute", {0: TaskAborted}
        )
        assert_composite(
            self, await failure_of(queued.get_result(), CompositeError), "execute", {0: QueueCleared}
        )
        self.assertNotIn("never", (await mec.keys(targets=0))[0])
        self.assertEqual([r["id"] for r in await mec.execute("x = id")], [0, 1])

    @run
    async def test_kill_is_not_queued_behind_a_runaway(self):
        """kill(targets) answers while the engine's command still loops:
        the engine interrupts it (its caller hears TaskAborted, not
        silence), runs nothing queued after it, and exits with the status
        that tells its launcher to leave it down."""
        mec = await self.start_cluster(2)
        slot = next(s for s in self.cluster.engines if s.pid == self.cluster.engine_pid(0))
        pending = await self.start_runaway(mec)
        queued = await mec.execute("open(%r, 'w').close()" % str(self.tmp / "ran"), targets=0,
                                   block=False)
        await mec.kill(targets=0)
        # The slot reads the exit status: EXIT_KILLED keeps it down.
        await wait_until(lambda: slot.state is SlotState.KILLED, "engine 0 to exit as killed")
        error = await failure_of(pending.get_result(), CompositeError)
        self.assertIsInstance(error.elist[0][2], TaskAborted)
        await failure_of(queued.get_result(), CompositeError)
        self.assertFalse((self.tmp / "ran").exists())
        await self.cluster.wait_for_engines(1)
        self.assertEqual([r["id"] for r in await mec.execute("x = id")], [1])

    @run
    async def test_timeout_interrupts_each_engine(self):
        """execute(..., timeout=) past its timeout is interrupted on every
        engine it ran on: the CompositeError holds a WaitTimeout (a
        TimeoutError) per engine; the engines then work on; a command
        inside its timeout answers as usual."""
        mec = await self.start_cluster(2)
        error = await failure_of(mec.execute("while True:\n    pass", timeout=0.5), CompositeError)
        assert_composite(self, error, "execute", {0: WaitTimeout, 1: WaitTimeout})
        self.assertIsInstance(error.elist[0][2], TimeoutError)
        self.assertIn("timeout of 0.5 s", str(error))
        results = await mec.execute("y = 2", timeout=30)
        self.assertEqual([r["id"] for r in results], [0, 1])
        self.assertEqual(await mec.pull("y", timeout=30), [2, 2])
        self.assertEqual(await mec.map(lambda v: v * 3, [1, 2, 3], timeout=30), [3, 6, 9])

    @run
    async def test_code_deaf_to_the_interrupt_ends_its_engine(self):
        """A command in C code that the interrupt cannot reach (a long
        ``time.sleep``) is answered TaskAborted after the engine's stuck
        grace, and the engine exits with EXIT_STUCK, the status on which
        `taskfarm cluster` starts a fresh one; the other engine goes on."""
        mec = await self.start_cluster(2)
        slot = next(s for s in self.cluster.engines if s.pid == self.cluster.engine_pid(0))
        statuses = []
        slot.on_ended.append(lambda _slot, reason: statuses.append(exit_status(reason)))
        marker = self.tmp / "sleeping"
        pending = await mec.execute(
            "open(%r, 'w').close()\nimport time\ntime.sleep(60)" % str(marker),
            targets=0, block=False,
        )
        await wait_until(marker.exists, "the sleep to start")
        self.assertEqual(await mec.interrupt(targets=0), ["execute"])
        error = await failure_of(pending.get_result(), CompositeError)
        assert_composite(self, error, "execute", {0: TaskAborted})
        await wait_until(lambda: statuses, "engine 0 to exit", timeout=30)
        self.assertEqual(statuses, [exitcodes.EXIT_STUCK])
        self.assertEqual([r["id"] for r in await mec.execute("x = id", targets="all")], [1])
