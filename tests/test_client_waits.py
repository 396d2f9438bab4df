"""Client-side waits (issue 14, items 1 and 2), on a `task.Clock`.

Through `LocalGrid` (the real Deferred clients, connection, Referenceables
and controller; in-process engines, held where a test needs a busy one):
every call that can wait takes ``timeout=`` and raises `WaitTimeout` (a
`TimeoutError`) naming what it waited for and how long, no sooner, and the
client works afterwards; `wait_for_engines`; `wait_for_controller`; the
no-engines warning of `map`; and `close()` of one client sharing a
connection with another.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.errors import (
    ClientClosed,
    ControllerUnreachable,
    NoEnginesWarning,
    ProfileError,
    WaitTimeout,
)
from taskfarm.multiengineclient import ENGINE_ANSWER_MARGIN
from taskfarm.profile import MULTIENGINE, TASK, Profile, write_secret
from taskfarm.task import Task
from taskfarm.testing.grid import LocalGrid


def double(x):
    return 2 * x


class WaitTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.clock = self.grid.clock
        self.tc = self.grid.task_client()

    def settle(self, d: defer.Deferred | None = None, seconds: float = 0.1) -> None:
        self.grid.settle(seconds)

    def timed_out(self, d: defer.Deferred, timeout: float, what: str) -> WaitTimeout:
        """`d` has no result just before `timeout`, and a WaitTimeout naming
        `what` and the seconds just after."""
        self.settle(seconds=0.05)
        self.clock.advance(timeout - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        error = self.failureResultOf(d, WaitTimeout).value
        self.assertIsInstance(error, TimeoutError)
        self.assertIn(what, str(error))
        self.assertIn("%g s" % timeout, str(error))
        return error


class TaskTimeoutTests(WaitTestCase):
    """Task calls: no engine, so nothing finishes until one comes."""

    def submitted(self) -> int:
        d = self.tc.run(Task("a = 1", pull="a"))
        self.settle()
        return self.successResultOf(d)

    def then_works(self, taskid: int) -> None:
        """After the timeout the same client still answers."""
        self.grid.add_engine()
        d = self.tc.get_task_result(taskid, block=True, timeout=5)
        self.settle(seconds=0.5)
        self.assertEqual(self.successResultOf(d).ns.a, 1)

    def test_barrier(self):
        taskid = self.submitted()
        self.timed_out(self.tc.barrier([taskid], timeout=2), 2, "1 tasks to finish")
        self.then_works(taskid)

    def test_get_task_result(self):
        taskid = self.submitted()
        self.timed_out(
            self.tc.get_task_result(taskid, block=True, timeout=3), 3, "result of task %d" % taskid
        )
        self.then_works(taskid)

    def test_get_task_results(self):
        taskid = self.submitted()
        self.timed_out(
            self.tc.get_task_results([taskid], block=True, timeout=1.5), 1.5, "results of 1 tasks"
        )
        self.then_works(taskid)

    def test_run_block(self):
        d = self.tc.run(Task("a = 1", pull="a"), block=True, timeout=2)
        self.timed_out(d, 2, "result of task")
        status = self.tc.queue_status(verbose=True)
        self.settle()
        (taskid,) = self.successResultOf(status)["scheduled"]
        self.then_works(taskid)

    def test_a_bad_timeout_is_refused(self):
        taskid = self.submitted()
        self.failureResultOf(self.tc.barrier([taskid], timeout=-1), ValueError)
        self.failureResultOf(self.tc.barrier([taskid], timeout="1"), TypeError)

    def test_without_timeout_waits_past_the_controllers_bound(self):
        """No timeout: the wait outlasts the controller's own bound
        (NOT_YET, asked again) until the task finishes."""
        taskid = self.submitted()
        d = self.tc.barrier([taskid])
        self.clock.advance(100)
        self.settle()
        self.assertNoResult(d)
        self.grid.add_engine()
        self.settle(seconds=0.5)
        self.assertIsNone(self.successResultOf(d))


class MapTimeoutTests(WaitTestCase):
    def test_map_times_out_and_aborts_its_tasks(self):
        """Past its timeout a map raises WaitTimeout and aborts its tasks
        (nobody else holds their ids), then clears them."""
        d = self.tc.map(double, [1, 2, 3], timeout=4)
        self.timed_out(d, 4, "map of double")
        self.assertEqual([w["category"] for w in self.flushWarnings()], [NoEnginesWarning])
        self.settle(seconds=0.5)
        status = self.tc.queue_status(verbose=True)
        self.settle()
        # Aborted and cleared: nothing of the map is left on the controller.
        self.assertEqual(
            {state: ids for state, ids in self.successResultOf(status).items() if ids}, {}
        )
        # The client still maps once an engine is there.
        self.grid.add_engine()
        d = self.tc.map(double, [1, 2], timeout=10)
        self.settle(seconds=0.5)
        self.assertEqual(self.successResultOf(d), [2, 4])

    def test_task_timeout_is_each_tasks_limit(self):
        """`task_timeout` is the MapTask option (each task's run limit)."""
        channel = self.grid.add_engine()
        channel.hold()
        d = self.tc.map(double, [1], task_timeout=1.0)
        self.settle(seconds=0.05)
        for _ in range(40):
            self.clock.advance(0.5)
        self.settle(seconds=0.5)
        self.assertEqual(type(self.failureResultOf(d).value).__name__, "TaskTimeout")

    def test_no_engines_warns_once_naming_the_controller(self):
        """A map with no engine registered says so once, after a grace,
        in a NoEnginesWarning (and the log) naming where it looked."""
        d = self.tc.map(double, [1, 2], timeout=30)
        self.settle(seconds=0.05)
        self.assertEqual(self.flushWarnings(), [])
        self.clock.advance(2.5)
        self.settle()
        warnings = self.flushWarnings()
        self.assertEqual(len(warnings), 1)
        self.assertIs(warnings[0]["category"], NoEnginesWarning)
        self.assertIn("no engines are registered", warnings[0]["message"])
        self.assertIn("127.0.0.1:9", warnings[0]["message"])
        self.clock.advance(10)
        self.settle()
        self.assertEqual(self.flushWarnings(), [])
        self.clock.advance(30)
        self.settle()
        self.failureResultOf(d, WaitTimeout)

    def test_a_map_with_engines_never_warns(self):
        self.grid.add_engine()
        d = self.tc.map(double, [1, 2])
        self.settle(seconds=0.5)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), [2, 4])
        self.assertEqual(self.flushWarnings(), [])


class WaitForEnginesTests(WaitTestCase):
    def test_task_client(self):
        d = self.tc.wait_for_engines(2, timeout=10)
        self.settle()
        self.grid.add_engine()
        self.clock.advance(1)
        self.settle()
        self.assertNoResult(d)
        self.grid.add_engine()
        self.clock.advance(1.1)
        self.settle()
        self.assertEqual(len(self.successResultOf(d)), 2)

    def test_times_out(self):
        mec = self.grid.multiengine_client()
        self.timed_out(mec.wait_for_engines(1, timeout=3), 3, "1 engine to register")
        self.grid.add_engine()
        d = mec.wait_for_engines(1, timeout=3)
        self.settle()
        self.assertEqual(self.successResultOf(d), [0])


class MultiEngineTimeoutTests(WaitTestCase):
    """A busy engine (held commands): blocking and non-blocking calls."""

    def setUp(self):
        super().setUp()
        self.channel = self.grid.add_engine()
        self.mec = self.grid.multiengine_client()
        self.channel.hold()

    def released(self) -> None:
        self.channel.release()
        self.settle()

    def test_every_engine_call_times_out(self):
        calls = {
            "execute": lambda t: self.mec.execute("a = 1", timeout=t),
            "push": lambda t: self.mec.push({"a": 1}, timeout=t),
            "pull": lambda t: self.mec.pull("a", timeout=t),
            "zip_pull": lambda t: self.mec.zip_pull(["a"], timeout=t),
            "get_result": lambda t: self.mec.get_result(timeout=t),
            "reset": lambda t: self.mec.reset(timeout=t),
            "keys": lambda t: self.mec.keys(timeout=t),
            "scatter": lambda t: self.mec.scatter("x", [1, 2], timeout=t),
            "gather": lambda t: self.mec.gather("x", timeout=t),
            "map": lambda t: self.mec.map(double, [1, 2], timeout=t),
        }
        # The client waits a margin past the timeout for the engines' own
        # WaitTimeout (these engines never answer).
        for name, call in calls.items():
            self.timed_out(call(1.0), 1.0 + ENGINE_ANSWER_MARGIN, name)
        self.released()
        self.assertEqual(self.successResultOf(self.turned(self.mec.pull("x", timeout=5))), [[1, 2]])

    def turned(self, d):
        self.settle()
        return d

    def test_pending_result_and_barrier(self):
        pending = self.successResultOf(self.mec.execute("a = 5", block=False))
        self.timed_out(pending.get_result(timeout=2), 2, "pending result")
        self.timed_out(self.mec.barrier([pending], timeout=1), 1, "barrier")
        self.released()
        # Not lost: the result is still there to be fetched.
        self.assertEqual(self.successResultOf(pending.get_result())[0]["input"]["raw"], "a = 5")

    def test_a_non_blocking_call_with_timeout_fails_its_pending_result(self):
        pending = self.successResultOf(self.mec.execute("a = 5", block=False, timeout=1))
        self.settle()
        self.clock.advance(1.5 + ENGINE_ANSWER_MARGIN)
        self.failureResultOf(pending.get_result(), WaitTimeout)

    def test_get_pending_deferred_gives_the_id_back(self):
        mec = self.grid.multiengine_client(deferred_ids=True)
        deferred_id = self.successResultOf(mec.execute("a = 5", block=False))
        self.timed_out(mec.get_pending_deferred(deferred_id, timeout=1), 1, "deferred id")
        d = mec.get_pending_deferred(deferred_id)
        self.released()
        self.assertEqual(len(self.successResultOf(d)), 1)


class WaitForControllerTests(unittest.SynchronousTestCase):
    """A client made before its controller: no furl file yet."""

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.clock = self.grid.clock
        root = tempfile.mkdtemp(prefix="taskfarm-test-")
        self.addCleanup(lambda: __import__("shutil").rmtree(root, ignore_errors=True))
        self.profile = Profile(Path(root) / "not-yet")

    def client(self, cls=TaskClient, **options):
        return cls(str(self.profile.root), self.clock, tub=self.grid.tub, **options)

    def test_without_waiting_a_missing_furl_file_fails_at_once(self):
        self.assertRaises(ProfileError, self.client)

    def test_waits_for_the_furl_file_and_connects(self):
        tc = self.client(connect_timeout=20, wait_for_controller=True)
        d = tc.connect()
        self.clock.advance(5)
        self.assertNoResult(d)
        self.profile.ensure()
        write_secret(self.profile.furl_file(TASK), self.grid.furls[TASK] + "\n")
        self.grid.settle(1.5)
        self.assertIsNone(self.successResultOf(d))
        d = tc.engine_ids()
        self.grid.settle(0.1)
        self.assertEqual(self.successResultOf(d), [])

    def test_waits_for_an_answer(self):
        self.profile.ensure()
        write_secret(self.profile.furl_file(MULTIENGINE), self.grid.furls[MULTIENGINE] + "\n")
        self.grid.tub.reachable = False
        mec = self.client(MultiEngineClient, connect_timeout=20, wait_for_controller=True)
        d = mec.connect()
        self.grid.settle(3)
        self.assertNoResult(d)
        self.grid.tub.reachable = True
        self.grid.settle(1.5)
        self.assertIsNone(self.successResultOf(d))

    def test_gives_up_after_connect_timeout(self):
        tc = self.client(connect_timeout=4, wait_for_controller=True)
        d = tc.connect()
        self.clock.advance(3.5)
        self.assertNoResult(d)
        for _ in range(10):
            self.clock.advance(0.5)
        error = self.failureResultOf(d, ControllerUnreachable).value
        self.assertIn("waited 4 s", str(error))
        self.assertIn(os.fspath(self.profile.furl_file(TASK)), str(error))


class SharedConnectionCloseTests(unittest.SynchronousTestCase):
    """Two clients over one shared connection (as one Foolscap Tub keeps):
    closing one fails only its own waiting calls."""

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.grid.tub.share = True
        self.a = self.grid.task_client()
        self.b = self.grid.task_client()
        for client in (self.a, self.b):
            d = client.connect()
            self.grid.settle(0.05)
            self.successResultOf(d)
        self.assertEqual(len(self.grid.tub.connections), 1)

    def test_close_leaves_the_other_clients_calls_alone(self):
        taskid = self.successResultOf(self.turned(self.a.run(Task("a = 1", pull="a"))))
        mine = self.a.barrier([taskid])
        theirs = self.b.get_task_result(taskid, block=True, timeout=60)
        self.grid.settle(0.05)
        closed = self.a.close()
        self.grid.settle(0.05)
        self.successResultOf(closed)
        self.failureResultOf(mine, ClientClosed)
        self.grid.add_engine()
        self.grid.settle(0.5)
        self.assertEqual(self.successResultOf(theirs).ns.a, 1)
        self.assertIsNot(self.grid.tub.connection.state.value, "broken")

    def test_the_last_to_leave_drops_the_connection(self):
        self.successResultOf(self.turned(self.a.close()))
        self.assertEqual(self.grid.tub.connection.state.value, "up")
        self.successResultOf(self.turned(self.b.close()))
        self.assertEqual(self.grid.tub.connection.state.value, "broken")

    def test_a_closed_client_connects_again_on_its_next_call(self):
        self.successResultOf(self.turned(self.a.close()))
        self.assertEqual(self.successResultOf(self.turned(self.a.engine_ids())), [])

    def turned(self, d):
        self.grid.settle(0.05)
        return d


class CloseWhileConnectingTests(unittest.SynchronousTestCase):
    def test_a_client_closed_while_connecting_keeps_no_connection(self):
        grid = LocalGrid()
        self.addCleanup(grid.stop)
        tc = grid.multiengine_client()
        d = tc.connect()
        closed = tc.close()
        grid.settle(0.05)
        self.successResultOf(closed)
        self.failureResultOf(d, ClientClosed)
        self.assertEqual([c.state.value for c in grid.tub.connections], ["broken"])
        # And it connects again on its next call.
        ids = tc.get_ids()
        grid.settle(0.05)
        self.assertEqual(self.successResultOf(ids), [])

    def test_a_connection_lost_during_hello_is_unreachable(self):
        from taskfarm.errors import ControllerUnreachable

        grid = LocalGrid()
        self.addCleanup(grid.stop)
        grid.tub.share = True
        first = grid.task_client()
        d = first.connect()
        grid.settle(0.05)
        self.successResultOf(d)
        # The next client's hello travels over the shared connection, whose
        # answers are held, and the connection breaks before it is answered.
        grid.tub.connection.hang_answers()
        d = grid.task_client().connect()
        grid.settle(0.05)
        self.assertNoResult(d)
        grid.tub.connection.disconnect()
        grid.settle(0.05)
        self.failureResultOf(d, ControllerUnreachable)
