"""The Task interface end to end: a real controller, real engine processes,
real Foolscap on 127.0.0.1, and the async `TaskClient`.

Each test starts its own small cluster (`RealCluster`) and stops it, ending
every engine process by PID.  Nothing sleeps for a fixed time: waits poll a
condition under a deadline.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.errors import (
    ControllerUnreachable,
    EngineLost,
    FurlError,
    RecoveryLoopError,
    RemoteTaskError,
    SerializationError,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskTimeout,
    UnknownTask,
    WrongInterface,
)
from taskfarm.profile import ENGINE, MULTIENGINE, TASK
from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import wait_until

#: Code for a task that spins (no sleep, so only an interrupt can stop it)
#: for at most 30 s, after touching the file named `marker`.
BUSY_30_S = """\
import pathlib, time
pathlib.Path(marker).touch()
started = time.monotonic()
while time.monotonic() - started < 30:
    pass
done = True
"""

#: Code for a task that waits (at most 30 s) until the file `gate` exists.
WAIT_FOR_GATE = """\
import os, time
started = time.monotonic()
while not os.path.exists(gate) and time.monotonic() - started < 30:
    time.sleep(0.01)
opened = os.path.exists(gate)
"""


def total(status: dict) -> int:
    """How many tasks a (non-verbose) queue_status accounts for."""
    return sum(status.values())


class _ClusterTestCase(ClusterTestCase):
    """Starts a cluster per test (Task client); the cleanup stops it and
    removes its files."""

    folder_prefix = "taskfarm-it-"

    async def result(self, tc: TaskClient, a_task):
        """Run one task and wait for its result."""
        return await tc.get_task_result(await tc.run(a_task), block=True)


class RetryTests(_ClusterTestCase):
    @run
    async def test_killed_engines_are_retried_then_engine_lost(self):
        """A task that kills its engine, with retries=1, takes down exactly two
        of four engines, then fails with EngineLost; the other two keep
        working."""
        tc = await self.start_cluster(4)
        taskid = await tc.run(Task("import os; os.kill(os.getpid(), 9)", retries=1))
        tr = await tc.get_task_result(taskid, block=True)
        self.assertIsInstance(tr.failure, EngineLost)
        self.assertEqual(tr.results, {})
        with self.assertRaises(EngineLost):
            tr.raise_exception()

        await wait_until(
            lambda: sum(slot.child.ended.called for slot in self.cluster.engines) >= 2,
            "two engine processes to end",
        )
        await self.cluster.wait_for_engines(2)
        ended = [slot for slot in self.cluster.engines if slot.child.ended.called]
        self.assertEqual(len(ended), 2)
        alive_pids = {slot.pid for slot in self.cluster.engines if not slot.child.ended.called}
        survivors = await tc.engine_ids()
        self.assertEqual(len(survivors), 2)
        self.assertEqual({self.cluster.engine_pid(e) for e in survivors}, alive_pids)

        ids = await tc.run_many([Task("a = %d * id" % n, pull=["a", "id"]) for n in range(40)])
        await tc.barrier(ids)
        results = await tc.get_task_results(ids)
        self.assertEqual([r.failure for r in results], [None] * 40)
        self.assertEqual([r.ns.a for r in results], [n * r.ns.id for n, r in enumerate(results)])
        self.assertEqual({r.engineid for r in results}, set(survivors))
        status = await tc.queue_status()
        self.assertEqual((status["succeeded"], status["failed"]), (40, 1))

    @run
    async def test_raising_task_retried_then_remote_task_error(self):
        """User code that raises, with retries=2, is attempted three times and
        then fails with a RemoteTaskError carrying ename, evalue and the
        remote traceback text."""
        tc = await self.start_cluster(2)
        counter = self.tmp / "attempts"
        code = "open(counter, 'a').write('x\\n')\nraise ValueError('bad value %d' % 42)"
        tr = await self.result(tc, Task(code, push={"counter": str(counter)}, retries=2))
        self.assertIsInstance(tr.failure, RemoteTaskError)
        self.assertEqual(tr.failure.ename, "ValueError")
        self.assertEqual(tr.failure.evalue, "bad value 42")
        self.assertIn("Traceback", tr.failure.traceback)
        self.assertIn("line 2", tr.failure.traceback)
        self.assertIn("ValueError: bad value 42", tr.failure.traceback)
        self.assertIn(tr.failure.engine_id, await tc.engine_ids())
        # Issue 11: the failure is a ValueError too, and str() is the original's.
        self.assertIsInstance(tr.failure, ValueError)
        self.assertEqual(str(tr.failure), "bad value 42")
        self.assertEqual(counter.read_text(), "x\n" * 3)
        with self.assertRaises(RemoteTaskError):
            _ = tr.ns.anything
        status = await tc.queue_status()
        self.assertEqual((status["failed"], total(status)), (1, 1))


class RecoveryTests(_ClusterTestCase):
    @run
    async def test_recovery_result_becomes_the_task_result(self):
        """When a task fails for good, its recovery task runs under the same
        id and its result is the task's result."""
        tc = await self.start_cluster(2)
        taskid = await tc.run(
            Task("raise RuntimeError('first')", recovery_task=Task("b = 'recovered'", pull="b"))
        )
        tr = await tc.get_task_result(taskid, block=True)
        self.assertIsNone(tr.failure)
        self.assertEqual(tr.taskid, taskid)
        self.assertEqual(tr.results, {"b": "recovered"})
        status = await tc.queue_status()
        self.assertEqual((status["succeeded"], total(status)), (1, 1))

    @run
    async def test_chain_of_two_recovery_tasks(self):
        """A failing task (with one retry) and a failing recovery task hand
        over to a second recovery task, in order, under one id."""
        tc = await self.start_cluster(2)
        log = str(self.tmp / "log")

        def step(name, fail):
            code = "open(log, 'a').write(%r)" % name
            if fail:
                code += "\nraise RuntimeError(%r)" % name
            return code

        last = Task(step("c", False) + "\nc = 3", pull="c", push={"log": log})
        middle = Task(step("b", True), push={"log": log}, recovery_task=last)
        first = Task(step("a", True), push={"log": log}, retries=1, recovery_task=middle)
        taskid = await tc.run(first)
        tr = await tc.get_task_result(taskid, block=True)
        self.assertIsNone(tr.failure)
        self.assertEqual((tr.taskid, tr.results), (taskid, {"c": 3}))
        self.assertEqual(Path(log).read_text(), "aabc")

    @run
    async def test_exhausted_recovery_chain_fails_with_last_error(self):
        """When the recovery task fails too, the task fails with the
        recovery task's error."""
        tc = await self.start_cluster(1)
        tr = await self.result(
            tc,
            Task("raise ValueError('one')", recovery_task=Task("raise KeyError('two')")),
        )
        self.assertIsInstance(tr.failure, RemoteTaskError)
        self.assertEqual(tr.failure.ename, "KeyError")

    @run
    async def test_recovery_loop_refused_before_sending(self):
        """A recovery chain that loops is refused at run() with
        RecoveryLoopError, and nothing reaches the controller."""
        tc = await self.start_cluster(1)
        first, second = Task("a = 1"), Task("b = 2")
        first.recovery_task = second
        second.recovery_task = first
        with self.assertRaises(RecoveryLoopError):
            await tc.run(first)
        itself = Task("c = 3")
        itself.recovery_task = itself
        with self.assertRaises(RecoveryLoopError):
            await tc.run(itself)
        with self.assertRaises(RecoveryLoopError):
            await tc.run_many([Task("d = 4"), second])
        self.assertEqual(total(await tc.queue_status()), 0)
        # The first task the controller ever sees is the good one.
        good = await tc.run(Task("e = 5", pull="e"))
        self.assertEqual((await tc.get_task_result(good, block=True)).ns.e, 5)
        self.assertEqual(total(await tc.queue_status()), 1)


class DependTests(_ClusterTestCase):
    BIG = {"RAM": 2**33, "role": "big"}
    SMALL = {"RAM": 2**20, "role": "small"}

    async def start(self):
        tc = await self.start_cluster(2, [self.BIG, self.SMALL], unmet_timeout=1.0)
        engines = self.cluster.controller.registry.engines
        by_role = {e.properties["role"]: e.engine_id for e in engines.values()}
        self.assertEqual(set(by_role), {"big", "small"})
        return tc, by_role

    @run
    async def test_depend_selects_engine_by_property(self):
        """Properties given with --property reach the controller; a task
        whose depend wants more than 4 GiB of RAM runs only on the engine
        that has it."""
        tc, by_role = await self.start()
        engines = self.cluster.controller.registry.engines
        self.assertEqual(engines[by_role["big"]].properties["RAM"], 2**33)

        ids = await tc.run_many(
            [
                Task("where = id", pull="where", depend=lambda p: p.get("RAM", 0) > 2**32)
                for _ in range(20)
            ]
            + [
                Task("where = id", pull="where", depend=lambda p: p["role"] == "small")
                for _ in range(20)
            ]
        )
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.failure for r in results], [None] * 40)
        self.assertEqual({r.engineid for r in results[:20]}, {by_role["big"]})
        self.assertEqual({r.ns.where for r in results[:20]}, {by_role["big"]})
        self.assertEqual({r.engineid for r in results[20:]}, {by_role["small"]})

    @run
    async def test_raising_depend_never_runs_and_times_out(self):
        """A depend function that raises counts as False: the task never
        runs, and after the controller's unmet_timeout it fails with
        TaskTimeout instead of waiting forever."""
        tc, _ = await self.start()
        marker = self.tmp / "ran"
        started = reactor.seconds()
        tr = await self.result(
            tc,
            Task(
                "open(marker, 'w').close()",
                push={"marker": str(marker)},
                depend=lambda p: p["no such property"] > 0,
            ),
        )
        self.assertIsInstance(tr.failure, TaskTimeout)
        self.assertIsNone(tr.engineid)
        self.assertLess(reactor.seconds() - started, 30)
        self.assertFalse(marker.exists())
        # Nothing else was held up: a plain task still runs.
        self.assertIsNone((await self.result(tc, Task("x = 1"))).failure)

    @run
    async def test_unmet_depend_hands_over_to_recovery_task(self):
        """A task whose depend no engine meets is replaced by its recovery
        task (without a depend) after the unmet timeout."""
        tc, _ = await self.start()
        tr = await self.result(
            tc,
            Task(
                "a = 1",
                depend=lambda p: p.get("gpu") is True,
                recovery_task=Task("fallback = 'cpu'", pull="fallback"),
            ),
        )
        self.assertIsNone(tr.failure)
        self.assertEqual(tr.results, {"fallback": "cpu"})


class NamespaceTests(_ClusterTestCase):
    @run
    async def test_clear_before_starts_from_a_fresh_namespace(self):
        """Names left by an earlier task are visible to the next one, unless
        it asks for clear_before; `id` survives the reset."""
        tc = await self.start_cluster(1)
        (engine_id,) = await tc.engine_ids()
        await self.result(tc, Task("leftover = 5"))
        probe = "seen = 'leftover' in globals()"
        self.assertTrue((await self.result(tc, Task(probe, pull="seen"))).ns.seen)
        tr = await self.result(tc, Task(probe, pull=["seen", "id"], clear_before=True))
        self.assertEqual(tr.results, {"seen": False, "id": engine_id})

    @run
    async def test_clear_after_resets_once_pulled(self):
        """clear_after resets the namespace after the values were pulled,
        also when the task fails."""
        tc = await self.start_cluster(1)
        tr = await self.result(tc, Task("kept = 7", pull="kept", clear_after=True))
        self.assertEqual(tr.ns.kept, 7)
        tr = await self.result(tc, Task("seen = 'kept' in globals()", pull="seen"))
        self.assertFalse(tr.ns.seen)
        tr = await self.result(tc, Task("junk = 1\nraise ValueError('x')", clear_after=True))
        self.assertIsInstance(tr.failure, RemoteTaskError)
        tr = await self.result(tc, Task("seen = 'junk' in globals()", pull="seen"))
        self.assertFalse(tr.ns.seen)


class AbortTests(_ClusterTestCase):
    @run
    async def test_abort_queued_and_running_tasks(self):
        """With one engine (two task slots) and a spinning task: a task still
        queued on the controller, one sent ahead to the engine, and the
        running one are each aborted; the spin is interrupted well before
        its 30 s and the engine keeps working."""
        tc = await self.start_cluster(1)
        marker = self.tmp / "started"
        running = await tc.run(Task(BUSY_30_S, push={"marker": str(marker)}, pull="done"))
        sent_ahead = await tc.run(Task("ahead = 1", pull="ahead"))
        queued = await tc.run(Task("queued = 1", pull="queued"))

        async def pending_two():
            status = await tc.queue_status(verbose=True)
            return status["pending"] == [running, sent_ahead] and status["scheduled"] == [queued]

        await wait_until(pending_two, "two tasks sent to the engine and one queued")
        await tc.abort(queued)
        tr = await tc.get_task_result(queued)
        self.assertIsInstance(tr.failure, TaskAborted)
        self.assertIsNone(tr.engineid)
        with self.assertRaises(TaskAlreadyAborted) as caught:
            await tc.abort(queued)
        self.assertIsInstance(caught.exception, IndexError)

        await wait_until(marker.exists, "the spinning task to start")
        started = reactor.seconds()
        await tc.abort(sent_ahead)
        await tc.abort(running)
        await tc.barrier([running, sent_ahead])
        for taskid in (running, sent_ahead):
            self.assertIsInstance((await tc.get_task_result(taskid)).failure, TaskAborted)

        # The engine is free again long before the spin would have ended.
        tr = await self.result(tc, Task("names = sorted(globals())", pull="names"))
        self.assertLess(reactor.seconds() - started, 20)
        self.assertIsNone(tr.failure)
        self.assertIn("started", tr.ns.names)  # the spin did begin ...
        self.assertNotIn("done", tr.ns.names)  # ... and was stopped ...
        self.assertNotIn("ahead", tr.ns.names)  # ... and the next never ran
        status = await tc.queue_status()
        self.assertEqual((status["aborted"], status["succeeded"], total(status)), (3, 1, 4))
        self.assertEqual(len(await tc.engine_ids()), 1)

    @run
    async def test_abort_finished_task_is_refused(self):
        """Aborting a finished task (succeeded or failed) raises
        TaskAlreadyCompleted, an IndexError 'Task Already Completed'."""
        tc = await self.start_cluster(1)
        ok = await tc.run(Task("a = 1"))
        failed = await tc.run(Task("raise ValueError()"))
        await tc.barrier([ok, failed])
        for taskid in (ok, failed):
            with self.assertRaises(TaskAlreadyCompleted) as caught:
                await tc.abort(taskid)
            self.assertIsInstance(caught.exception, IndexError)
            self.assertEqual(str(caught.exception), "Task Already Completed")
        with self.assertRaises(UnknownTask):
            await tc.abort(12345)
        status = await tc.queue_status()
        self.assertEqual((status["succeeded"], status["failed"], status["aborted"]), (1, 1, 0))


class BadInputTests(_ClusterTestCase):
    @run
    async def test_user_errors_are_typed_failures(self):
        """A syntax error, a pull of an undefined name and a pulled value or
        return value that cannot be pickled each fail with a typed error
        naming the problem; no task is lost and the controller keeps
        serving."""
        tc = await self.start_cluster(2)
        ids = await tc.run_many(
            [
                Task("a = = 1", pull="a"),
                Task("a = 1", pull=["a", "nope"]),
                Task("import threading\nlock = threading.Lock()", pull=["lock"]),
                MapTask(lambda: threading.Lock()),
            ]
        )
        syntax, missing, unpicklable, returned = await tc.get_task_results(ids, block=True)
        self.assertIsInstance(syntax.failure, RemoteTaskError)
        self.assertEqual(syntax.failure.ename, "SyntaxError")
        self.assertIsInstance(missing.failure, RemoteTaskError)
        self.assertEqual(missing.failure.ename, "NameError")
        self.assertIn("'nope'", missing.failure.evalue)
        self.assertIsInstance(unpicklable.failure, RemoteTaskError)
        self.assertEqual(unpicklable.failure.ename, "SerializationError")
        self.assertIn("'lock'", unpicklable.failure.evalue)
        self.assertIsInstance(returned, RemoteTaskError)
        self.assertEqual(returned.ename, "SerializationError")
        self.assertIn("return value", returned.evalue)

        status = await tc.queue_status()
        self.assertEqual((status["failed"], total(status)), (4, 4))
        tr = await self.result(tc, Task("a = 2", pull="a"))
        self.assertEqual(tr.ns.a, 2)

    @run
    async def test_unpicklable_push_refused_at_run(self):
        """A push value that cannot be pickled (a generator, a lock) raises
        SerializationError at run(); nothing is submitted, not even the
        good tasks of the same batch."""
        tc = await self.start_cluster(1)
        for bad in ((n for n in range(3)), threading.Lock()):
            with self.assertRaises(SerializationError) as caught:
                await tc.run(Task("a = 1", push={"bad": bad}))
            self.assertIn("push", str(caught.exception))
            with self.assertRaises(SerializationError):
                await tc.run_many([Task("b = 1"), Task("a = 1", push={"bad": bad})])
        self.assertEqual(total(await tc.queue_status()), 0)
        good = await tc.run(Task("a = 1", pull="a"))
        self.assertEqual((await tc.get_task_result(good, block=True)).ns.a, 1)
        self.assertEqual(total(await tc.queue_status()), 1)


class ResultTests(_ClusterTestCase):
    @run
    async def test_get_result_barrier_and_clear(self):
        """get_task_result is None until the task ends and waits with
        block=True; barrier takes an id or a list; clear() forgets finished
        tasks only."""
        # One task slot per engine: nothing is sent ahead to wait behind
        # the gated task on its engine.
        tc = await self.start_cluster(2, task_slots=1)
        gate = self.tmp / "gate"
        gated = await tc.run(Task(WAIT_FOR_GATE, push={"gate": str(gate)}, pull="opened"))
        quick = await tc.run_many([Task("v = %d" % n, pull="v") for n in range(10)])
        self.assertIsNone(await tc.get_task_result(gated))

        await tc.barrier(quick[0])
        self.assertEqual((await tc.get_task_result(quick[0])).ns.v, 0)
        await tc.barrier(quick)
        self.assertEqual([r.ns.v for r in await tc.get_task_results(quick)], list(range(10)))
        self.assertIsNone(await tc.get_task_result(gated))

        # clear() keeps the unfinished task.
        self.assertEqual(await tc.clear(), 10)
        status = await tc.queue_status()
        self.assertEqual((status["succeeded"], total(status)), (0, 1))
        with self.assertRaises(UnknownTask):
            await tc.get_task_result(quick[3])

        waiting = tc.get_task_result(gated, block=True)
        gate.touch()
        tr = await waiting
        self.assertTrue(tr.ns.opened)
        self.assertEqual(await tc.clear([gated]), 1)
        self.assertEqual(total(await tc.queue_status()), 0)

    @run
    async def test_unknown_task_id(self):
        """Asking about an id never handed out raises UnknownTask, which is
        an IndexError."""
        tc = await self.start_cluster(1)
        with self.assertRaises(UnknownTask) as caught:
            await tc.get_task_result(999)
        self.assertIsInstance(caught.exception, IndexError)
        with self.assertRaises(UnknownTask):
            await tc.get_task_result(999, block=True)
        with self.assertRaises(UnknownTask):
            await tc.barrier([999])
        with self.assertRaises(UnknownTask):
            await tc.clear([999])
        with self.assertRaises(TypeError):
            await tc.get_task_result("0")


class LoadBalancingTests(_ClusterTestCase):
    @run
    async def test_idle_engine_preferred_over_busy_one(self):
        """Tasks submitted one at a time go to an idle engine, not to the
        spare slot of a busy one (where they would wait behind its task)."""
        tc = await self.start_cluster(2)
        gate = self.tmp / "gate"
        blocked = await tc.run(Task(WAIT_FOR_GATE, push={"gate": str(gate)}, pull="opened"))
        self.addCleanup(gate.touch)

        async def running():
            return (await tc.queue_status())["pending"] == 1

        await wait_until(running, "the gated task to be sent")
        started = reactor.seconds()
        tr = await self.result(tc, Task("x = id", pull="x"))
        self.assertLess(reactor.seconds() - started, 20)
        self.assertIsNone(await tc.get_task_result(blocked))
        gate.touch()
        first = await tc.get_task_result(blocked, block=True)
        self.assertTrue(first.ns.opened)
        self.assertNotEqual(tr.engineid, first.engineid)


class MapTaskTests(_ClusterTestCase):
    @run
    async def test_map_task_value_and_failure(self):
        """A MapTask's result is the function's value; a failing one raises
        its RemoteTaskError from get_task_result."""
        tc = await self.start_cluster(2)
        taskid = await tc.run(MapTask(pow, (2, 10)))
        self.assertEqual(await tc.get_task_result(taskid, block=True), 1024)

        offset = 100
        closure = await tc.run(MapTask(lambda x, y=1: x + y + offset, (1,), {"y": 2}))
        self.assertEqual(await tc.get_task_result(closure, block=True), 103)

        failing = await tc.run(MapTask(pow, (2, "x")))
        with self.assertRaises(RemoteTaskError) as caught:
            await tc.get_task_result(failing, block=True)
        self.assertEqual(caught.exception.ename, "TypeError")
        (as_value,) = await tc.get_task_results([failing])
        self.assertIsInstance(as_value, RemoteTaskError)


class _SilentServer(protocol.Protocol):
    """Accepts a connection and never says a word."""

    def connectionMade(self):
        self.factory.connections.append(self.transport)


class ConnectionTests(_ClusterTestCase):
    def client_tub(self):
        from taskfarm.remote.tub import new_tub

        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        return tub

    def fake_furl(self, tub, port: int) -> str:
        # Not our own Tub's id: Foolscap would answer that one in-process.
        return "pb://%s@tcp:127.0.0.1:%d/nothing-here" % ("abcdefghijklmnopqrstuvwxyz234567", port)

    @run
    async def test_closed_port_is_controller_unreachable(self):
        """A furl for a port nobody listens on fails with
        ControllerUnreachable at once, without hanging."""
        tub = self.client_tub()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tc = TaskClient(self.fake_furl(tub, port), reactor, connect_timeout=2, tub=tub)
        started = reactor.seconds()
        with self.assertRaises(ControllerUnreachable) as caught:
            await tc.engine_ids()
        self.assertLess(reactor.seconds() - started, 10)
        self.assertIn("127.0.0.1:%d" % port, str(caught.exception))
        self.assertNotIn("nothing-here", str(caught.exception))  # furls are secrets

    @run
    async def test_silent_server_times_out(self):
        """A furl for a port that accepts but never answers fails with
        ControllerUnreachable after connect_timeout."""
        tub = self.client_tub()
        factory = protocol.Factory.forProtocol(_SilentServer)
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def close_connections():
            for transport in factory.connections:
                transport.abortConnection()

        self.addCleanup(close_connections)
        tc = TaskClient(
            self.fake_furl(tub, port.getHost().port), reactor, connect_timeout=2, tub=tub
        )
        started = reactor.seconds()
        with self.assertRaises(ControllerUnreachable) as caught:
            await tc.engine_ids()
        elapsed = reactor.seconds() - started
        self.assertTrue(1.5 <= elapsed < 15, elapsed)
        self.assertIn("within 2 s", str(caught.exception))

    @run
    async def test_furl_for_another_interface_is_wrong_interface(self):
        """A furl of another controller interface is refused with
        WrongInterface (a FurlError), whichever way round."""
        await self.start_cluster(0)
        profile = self.cluster.profile
        for interface in (ENGINE, MULTIENGINE):
            tc = TaskClient(profile.furl_file(interface), reactor, tub=self.cluster._tub())
            with self.assertRaises(WrongInterface) as caught:
                await tc.engine_ids()
            self.assertIsInstance(caught.exception, FurlError)
            self.assertIn("task.furl", str(caught.exception))
        mec = MultiEngineClient(profile.furl_file(TASK), reactor, tub=self.cluster._tub())
        with self.assertRaises(WrongInterface) as caught:
            await mec.get_ids()
        self.assertIn("'task'", str(caught.exception))
        self.assertIn("multiengine.furl", str(caught.exception))
        # The right furl still works.
        self.assertEqual(await self.cluster.task_client().engine_ids(), [])

    def test_host_port_tuple_is_refused(self):
        """A (host, port) address, as the original took, raises FurlError
        explaining that the furl file is the credential."""
        with self.assertRaises(FurlError) as caught:
            TaskClient(("127.0.0.1", 10113), reactor)
        self.assertIn("furl file is the credential", str(caught.exception))
        self.assertIsInstance(caught.exception, ValueError)


class OversizedResultTests(_ClusterTestCase):
    @run
    async def test_result_over_the_message_limit_fails_the_task(self):
        """A result bigger than the controller's message limit fails its task
        with MessageTooLarge instead of leaving it pending; the engine goes on."""
        from taskfarm.errors import MessageTooLarge

        tc = await self.start_cluster(1, max_message_size=200_000)
        big = await self.result(tc, Task("a = b'x' * 300_000", pull="a"))
        self.assertIsInstance(big.failure, MessageTooLarge)
        self.assertIn("exceeds the controller's message limit", str(big.failure))
        small = await self.result(tc, Task("a = b'x' * 1000", pull="a"))
        self.assertEqual(small.ns.a, b"x" * 1000)


class FitRepliesTests(unittest.TestCase):
    def test_batches_and_oversized(self):
        """Replies are grouped under the byte budget; one too big alone becomes
        a MessageTooLarge failure of its own command, in its place."""
        from taskfarm.engine.link import fit_replies
        from taskfarm.errors import from_wire

        replies = [(1, True, b"a" * 100, 0.0, 1.0), (2, True, b"b" * 2000, 0.0, 1.0),
                   (3, True, b"c" * 400, 0.0, 1.0), (4, True, b"d" * 400, 0.0, 1.0)]
        batches = fit_replies(replies, 1000)
        self.assertEqual([[r[0] for r in b] for b in batches], [[1, 2, 3], [4]])
        self.assertFalse(batches[0][1][1])
        self.assertEqual(type(from_wire(batches[0][1][2])).__name__, "MessageTooLarge")


class RestartWithoutJournalTests(_ClusterTestCase):
    @run
    async def test_client_hears_that_tasks_are_gone_and_ids_never_collide(self):
        """After a --no-journal controller restarts, the client's old ids are
        unknown (UnknownTask), a task sent on a stale lease fails with
        ConnectionLost instead of taking another client's id, and new tasks
        get fresh ids and run."""
        from taskfarm.controller.service import create_controller
        from taskfarm.errors import ConnectionLost, UnknownTask
        from taskfarm.remote.client import furl_location

        tc = await self.start_cluster(1, journal=False)
        old = await tc.run(Task("a = 1", pull="a"))
        self.assertEqual((await tc.get_task_result(old, block=True)).ns.a, 1)
        port = int(furl_location(self.cluster.controller.server.furls["task"]).rsplit(":", 1)[1])
        await self.cluster.controller.stopService()
        self.cluster.controller = create_controller(
            self.cluster.profile, reactor, listen="tcp:%d:interface=127.0.0.1" % port,
            journal=False,
        )
        self.cluster.controller.startService()
        await self.cluster.wait_for_engines(1)
        stale = await tc.run(Task("b = 2", pull="b"))
        with self.assertRaises(ConnectionLost):
            await tc.get_task_result(stale, block=True)
        with self.assertRaises(UnknownTask):
            await tc.get_task_result(old)
        fresh = await tc.run(Task("c = 3", pull="c"))
        self.assertEqual((await tc.get_task_result(fresh, block=True)).ns.c, 3)
