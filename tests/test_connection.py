"""A client's `ControllerConnection` and its `Submitter`, on a `task.Clock`:
connecting, typed failures, reconnection with back-off, incarnations.

The controller is real (`LocalGrid`: the real Referenceables in front of
the real task controller), reached through the in-process transport; no
sockets, no sleeps.  The real-socket counterparts stay in
tests/test_tasks_integration.py (ConnectionTests, RestartWithoutJournalTests).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

# Imports gathered here, so that moved modules are repointed in one place.
from taskfarm import serialization
from taskfarm.connection import ControllerConnection
from taskfarm.errors import (
    ConnectionLost,
    ControllerUnreachable,
    MessageTooLarge,
    ProtocolVersionError,
    UnknownTask,
    WrongInterface,
)
from taskfarm.profile import MULTIENGINE, TASK
from taskfarm.remote.answers import hello_blob
from taskfarm.submission import FLUSH_DELAY, Submitter, pack_envelope
from taskfarm.task import Task
from taskfarm.testing.grid import LocalGrid


class _FromTheFuture:
    """A Task interface that speaks another wire version."""

    def remote_hello(self):
        blob = serialization.unpack(hello_blob("task", max_message_size=serialization.DEFAULT_MAX_MESSAGE_SIZE))
        blob["version"] = 99
        return serialization.pack(blob)


class ConnectionTestCase(unittest.SynchronousTestCase):
    connect_timeout = 10.0
    reconnect_timeout = 120.0

    def setUp(self):
        self.grid = LocalGrid()
        self.addCleanup(self.grid.stop)
        self.clock = self.grid.clock
        self.tub = self.grid.tub
        self.connection = self.connect_to(self.grid.furls[TASK])

    def connect_to(self, furl: str, interface: str = TASK) -> ControllerConnection:
        return ControllerConnection(
            furl, interface, self.clock, self.connect_timeout, tub=self.tub,
            reconnect_timeout=self.reconnect_timeout,
        )

    def call(self, method: str, *args, retry: bool = False) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.connection.call(method, *args, retry=retry))

    def turns(self, n: int = 3) -> None:
        for _ in range(n):
            self.clock.advance(0)

    def connected(self) -> None:
        """Make the first connection (a call that answers)."""
        d = self.call("engine_ids")
        self.turns()
        self.assertEqual(self.successResultOf(d), [])


class ConnectTests(ConnectionTestCase):
    """Connecting checks `hello`; every failure is typed."""

    def test_connects_lazily_and_learns_the_limit(self):
        """Making a connection does nothing; the first call connects,
        checks hello and learns the controller's limit and incarnation."""
        self.assertEqual(self.tub.connections, [])
        self.connected()
        self.assertEqual(len(self.tub.connections), 1)
        self.assertTrue(self.connection.ever_connected)
        self.assertEqual(self.connection.incarnation, self.grid.controller.incarnation)
        self.assertEqual(
            self.connection.max_message_size, serialization.DEFAULT_MAX_MESSAGE_SIZE
        )

    def test_waiters_share_one_attempt(self):
        """Calls made before the connection is up wait for one attempt."""
        ds = [self.call("engine_ids") for _ in range(3)]
        self.turns()
        self.assertEqual([self.successResultOf(d) for d in ds], [[], [], []])
        self.assertEqual(len(self.tub.connections), 1)

    def test_refused_is_controller_unreachable(self):
        """Nothing listening: ControllerUnreachable naming the location,
        never the furl's secret."""
        self.tub.reachable = False
        failure = self.failureResultOf(self.turned(self.call("engine_ids")), ControllerUnreachable)
        self.assertIn("127.0.0.1:9", str(failure.value))
        self.assertNotIn("/task", str(failure.value))

    def test_silent_is_controller_unreachable_after_the_timeout(self):
        """A controller that never answers: ControllerUnreachable after
        connect_timeout of clock time, not before."""
        self.tub.answering = False
        d = self.call("engine_ids")
        self.clock.advance(self.connect_timeout - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIn("within 10 s", str(self.failureResultOf(d, ControllerUnreachable).value))

    def test_another_interface_is_wrong_interface(self):
        """A furl of the MultiEngine interface is refused by a Task client."""
        self.connection = self.connect_to(self.grid.furls[MULTIENGINE])
        failure = self.failureResultOf(self.turned(self.call("engine_ids")), WrongInterface)
        self.assertIn("task.furl", str(failure.value))

    def test_another_wire_version_is_refused(self):
        """A controller of another wire version: ProtocolVersionError."""
        self.connection = self.connect_to(self.tub.serve(_FromTheFuture(), "future"))
        self.failureResultOf(self.turned(self.call("engine_ids")), ProtocolVersionError)

    def test_errors_travel_as_data(self):
        """A controller error comes back as its own class."""
        self.connected()
        self.failureResultOf(self.turned(self.call("abort", 12345)), UnknownTask)

    def test_request_over_the_limit_is_refused_before_sending(self):
        """A byte-string argument over the learnt limit fails with
        MessageTooLarge and never travels."""
        self.connected()
        self.connection.max_message_size = 1000
        sent = len(self.tub.connection.calls)
        self.failureResultOf(self.turned(self.call("wait", b"x" * 1001)), MessageTooLarge)
        self.assertEqual(len(self.tub.connection.calls), sent)

    def turned(self, d: defer.Deferred) -> defer.Deferred:
        self.turns()
        return d


class ReconnectionTests(ConnectionTestCase):
    """`call(retry=True)` rides out a broken link, with back-off and a
    window per break; a plain call does not."""

    def test_plain_call_fails_when_the_link_breaks(self):
        """A call without retry fails with ConnectionLost; the next call
        connects again."""
        self.connected()
        self.tub.connection.hang()
        d = self.call("engine_ids")
        self.turns()
        self.tub.connection.disconnect()
        self.turns()
        self.assertIn("during engine_ids", str(self.failureResultOf(d, ConnectionLost).value))
        d = self.call("engine_ids")
        self.turns()
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(len(self.tub.connections), 2)

    def test_retried_call_reconnects_after_the_delay(self):
        """A retried call whose link broke tries again 0.1 s later on a new
        connection, and answers."""
        self.connected()
        self.tub.connection.hang()
        d = self.call("engine_ids", retry=True)
        self.turns()
        self.tub.connection.disconnect()
        self.turns()
        self.assertNoResult(d)
        self.assertEqual(len(self.tub.connections), 1)
        self.clock.advance(0.1)
        self.turns()
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(len(self.tub.connections), 2)

    def test_back_off_doubles_to_two_seconds(self):
        """While the controller stays away, attempts come 0.1, 0.2, 0.4 ...
        seconds apart, then every 2 s."""
        self.connected()
        self.tub.reachable = False
        attempts: list[float] = []
        connect = self.tub._connect

        def counted(furl, d):
            attempts.append(self.clock.seconds())
            connect(furl, d)

        self.tub._connect = counted
        self.tub.connection.disconnect()
        self.turns()
        d = self.call("engine_ids", retry=True)
        for _ in range(60):
            self.clock.advance(min(c.getTime() for c in self.clock.getDelayedCalls())
                               - self.clock.seconds())
        self.assertNoResult(d)
        gaps = [round(b - a, 6) for a, b in zip(attempts, attempts[1:], strict=False)]
        self.assertEqual(gaps[:6], [0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
        self.assertEqual(set(gaps[6:]), {2.0})
        self.tub.reachable = True
        self.clock.advance(2.0)
        self.turns()
        self.assertEqual(self.successResultOf(d), [])

    def test_gives_up_after_the_reconnect_timeout(self):
        """A controller gone for good: the retried call fails once the
        reconnect timeout after the break has passed, not before."""
        self.connected()
        self.tub.reachable = False
        self.tub.connection.disconnect()
        self.turns()
        d = self.call("engine_ids", retry=True)
        self.clock.pump([1.0] * 117)
        self.assertNoResult(d)
        self.clock.pump([1.0] * 5)
        self.failureResultOf(d, ControllerUnreachable)

    def test_each_break_opens_its_own_window(self):
        """A call mended after a break gets a whole window at the next
        break: the window opens at each break, not when the call began."""
        self.connected()
        (taskid,) = self.grid.controller.submit([Task("x = 1").to_envelope()])
        d = self.call("wait", serialization.pack([taskid]), retry=True)
        self.turns()
        for _ in range(2):
            self.tub.connection.disconnect()
            self.tub.reachable = False
            self.clock.pump([1.0] * 100)
            self.tub.reachable = True
            self.clock.pump([1.0] * 3)
            self.assertNoResult(d)
        self.grid.controller.abort(taskid)
        self.turns()
        self.successResultOf(d)
        self.assertEqual(len(self.tub.connections), 3)

    def test_never_connected_fails_fast(self):
        """A controller never reached is a set-up error: even a retried
        call fails at once."""
        self.tub.reachable = False
        self.failureResultOf(self.turned(self.call("engine_ids", retry=True)), ControllerUnreachable)

    def turned(self, d: defer.Deferred) -> defer.Deferred:
        self.turns()
        return d


class IncarnationTests(ConnectionTestCase):
    """A controller restarted without its journal is noticed at hello."""

    def test_new_incarnation_fails_retried_calls(self):
        """A retried call whose controller came back as a new incarnation
        fails with ConnectionLost instead of being repeated, and the
        connection's callbacks run once."""
        heard = []
        self.connection.on_new_incarnation.append(lambda: heard.append(True))
        self.connected()
        old = self.connection.incarnation
        self.tub.connection.hang()
        d = self.call("engine_ids", retry=True)
        self.turns()
        self.grid.restart()
        self.clock.pump([0.1] * 5)
        failure = self.failureResultOf(d, ConnectionLost)
        self.assertIn("restarted without a journal", str(failure.value))
        self.assertEqual(heard, [True])
        self.assertNotEqual(self.connection.incarnation, old)
        d = self.call("engine_ids", retry=True)
        self.turns()
        self.assertEqual(self.successResultOf(d), [])

    def test_same_incarnation_is_repeated(self):
        """A controller that kept its identity (a journal): the call is
        simply repeated and no callback runs."""
        heard = []
        self.connection.on_new_incarnation.append(lambda: heard.append(True))
        self.connected()
        self.tub.connection.hang()
        d = self.call("engine_ids", retry=True)
        self.turns()
        self.tub.connection.disconnect()
        self.clock.pump([0.1] * 5)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(heard, [])


class SubmitterTests(ConnectionTestCase):
    """A `Submitter` over a real connection to a real controller."""

    def setUp(self):
        super().setUp()
        self.submitter = Submitter(self.connection, self.clock)
        self.blob = pack_envelope(Task("a = 1").to_envelope())

    def submits(self) -> list:
        return [
            args for connection in self.tub.connections
            for method, args in connection.calls if method == "submit"
        ]

    def test_run_answers_at_once_and_batches(self):
        """Once a lease is held, run fires at once; a task leaves alone when
        nothing is on its way, and the runs made while it is in flight
        leave in one submit within FLUSH_DELAY; the controller queues them all."""
        first = self.submitter.run(self.blob)
        self.turns()
        ids = [self.successResultOf(first)]
        self.assertEqual(len(self.submits()), 1)  # the lone task left at once
        ids += [self.successResultOf(self.submitter.run(self.blob)) for _ in range(9)]
        self.assertEqual(ids, list(range(10)))
        # The second left alone too; the eight after it wait for the batch.
        self.assertEqual(len(self.submits()), 2)
        self.clock.advance(FLUSH_DELAY)
        self.turns()
        self.assertEqual(len(self.submits()), 3)
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 10)
        self.successResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()))

    def test_a_lone_task_leaves_without_the_batch_timer(self):
        """With nothing in flight, a task's submit leaves in the `run` call
        itself: no FLUSH_DELAY timer is set and the clock need not move."""
        self.successResultOf(self.turned(self.submitter.run(self.blob)))
        self.successResultOf(self.turned(defer.Deferred.fromCoroutine(self.submitter.confirm())))
        before = len(self.submits())
        self.successResultOf(self.submitter.run(self.blob))
        self.assertEqual(len(self.submits()), before + 1)
        timers = [c for c in self.clock.getDelayedCalls() if c.func == self.submitter.flush]
        self.assertEqual(timers, [])
        self.turns()
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 2)

    def thread_hops(self) -> list:
        """Let the clock take calls from other threads, held until run."""
        held: list = []
        self.clock.callFromThread = lambda f, *a, **kw: held.append((f, a, kw))
        return held

    def test_run_from_thread_takes_the_id_without_the_reactor(self):
        """While a lease lasts, run_from_thread answers the next id at once
        and only hands the task to the reactor (one held call); once the
        reactor runs it, the task leaves and the controller queues it."""
        held = self.thread_hops()
        self.successResultOf(self.turned(self.submitter.run(self.blob)))
        sent = len(self.submits())
        taskid = self.submitter.run_from_thread(self.blob)
        self.assertEqual(taskid, 1)
        self.assertEqual(len(held), 1)
        self.assertEqual(len(self.submits()), sent)  # nothing left from this thread
        f, a, kw = held.pop()
        f(*a, **kw)
        self.assertEqual(len(self.submits()), sent + 1)
        self.turns()
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 2)
        self.successResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()))

    def test_run_from_thread_leaves_it_to_run_without_a_lease(self):
        """With no lease yet, or submissions waiting for ids, it takes no id
        and hands nothing over: `run` decides, in the reactor."""
        held = self.thread_hops()
        self.assertIsNone(self.submitter.run_from_thread(self.blob))
        waiting = self.submitter.run(self.blob)  # waits for the first lease
        self.assertIsNone(self.submitter.run_from_thread(self.blob))
        self.assertEqual(held, [])
        self.turns()
        self.assertEqual(self.successResultOf(waiting), 0)

    def test_an_id_taken_before_the_controller_forgot_is_lost_not_sent(self):
        """An id taken in another thread, then the controller restarts
        without its journal before the reactor queues the task: the task is
        not sent under the stale id; it is lost, as the queued ones are."""
        held = self.thread_hops()
        self.successResultOf(self.turned(self.submitter.run(self.blob)))
        self.successResultOf(self.turned(defer.Deferred.fromCoroutine(self.submitter.confirm())))
        sent = len(self.submits())
        taskid = self.submitter.run_from_thread(self.blob)
        self.submitter._controller_forgot()
        f, a, kw = held.pop()
        f(*a, **kw)
        self.turns()
        self.assertEqual(len(self.submits()), sent)
        self.assertRaises(ConnectionLost, self.submitter.check, [taskid])

    def test_a_submit_lost_in_flight_is_resent_once(self):
        """The link breaks after the controller took a submission but before
        its answer: the submitter sends it again with the same token and the
        controller queues the tasks once."""
        # A first task takes the lease (its submit is answered).
        self.successResultOf(self.turned(self.submitter.run(self.blob)))
        self.successResultOf(self.turned(defer.Deferred.fromCoroutine(self.submitter.confirm())))
        self.tub.connection.hang_answers()  # the next submit is taken, its answer lost
        self.successResultOf(self.submitter.run(self.blob))  # it leaves at once
        self.turns()
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 2)
        self.tub.connection.disconnect()
        self.clock.pump([0.1] * 5)
        self.successResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()))
        _, first, again = self.submits()
        self.assertEqual(first, again)
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 2)

    def test_restart_without_journal_fails_what_was_not_acknowledged(self):
        """A controller restarted without its journal: a batch in flight
        fails with ConnectionLost (confirm raises it, check names its ids),
        the old lease is dropped, and later tasks get fresh ids and arrive."""
        self.successResultOf(self.turned(self.submitter.run(self.blob)))
        self.turns()
        self.clock.advance(FLUSH_DELAY)
        self.turns()
        self.successResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()))
        self.tub.connection.hang()
        stale = self.successResultOf(self.submitter.run(self.blob))
        self.submitter.flush()
        self.turns()
        self.grid.restart()
        self.clock.pump([0.1] * 5)
        self.failureResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()), ConnectionLost)
        self.assertRaises(ConnectionLost, self.submitter.check, [stale])
        fresh = self.submitter.run(self.blob)
        self.clock.pump([FLUSH_DELAY] * 3)
        self.successResultOf(fresh)
        self.successResultOf(defer.Deferred.fromCoroutine(self.submitter.confirm()))
        self.assertEqual(self.grid.controller.queue_status()["scheduled"], 1)

    def turned(self, d: defer.Deferred) -> defer.Deferred:
        self.turns()
        return d
