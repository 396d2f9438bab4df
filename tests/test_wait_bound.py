"""A blocking `wait` or `results` is held at most `WAIT_BOUND` by the
controller's Task Referenceable, then answered `NOT_YET`: the client asks
again, and a client that left holds no waiter on the controller longer.

On a `task.Clock` with the Referenceable called in process, except one test
over real Foolscap on 127.0.0.1: a client that disconnects mid-`wait`.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.asyncclient import TaskClient
from taskfarm.connection import ControllerConnection
from taskfarm.errors import ConnectionLost, from_wire
from taskfarm.profile import TASK
from taskfarm.remote.schemas import NOT_YET
from taskfarm.remote.server import WAIT_BOUND, RemoteTaskController
from taskfarm.remote.tub import listen_and_locate, new_tub
from taskfarm.submission import Submitter
from taskfarm.task import Task
from taskfarm.testing import ScriptedChannel
from taskfarm.testing.helpers import clock_controller, sleep


def _answer(blob: bytes):
    ok, value = serialization.unpack(blob)
    if not ok:
        raise from_wire(value)
    return value


class _DirectConnection:
    """Stands in for a `ControllerConnection`: calls the Referenceable."""

    max_message_size = serialization.DEFAULT_MAX_MESSAGE_SIZE
    ever_connected = True

    def __init__(self, remote: RemoteTaskController) -> None:
        self._remote = remote
        self.on_new_incarnation: list = []
        self.calls: list[str] = []

    async def call(self, method: str, *args, retry: bool = False):
        self.calls.append(method)
        return _answer(await getattr(self._remote, "remote_" + method)(*args))


class WaitBoundTests(unittest.SynchronousTestCase):
    """The Referenceable's bound on a task.Clock."""

    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)
        self.remote = RemoteTaskController(self.controller)
        self.channel = ScriptedChannel()
        self.channel.engine = self.registry.register(self.channel, {})
        (self.taskid,) = self.controller.submit([Task("a = 1").to_envelope()])
        self.clock.advance(0)

    def test_wait_answers_not_yet_after_the_bound(self):
        """A wait still unfinished after WAIT_BOUND answers NOT_YET and the
        controller holds no waiter for it; one that finishes sooner answers
        None."""
        d = self.remote.remote_wait(serialization.pack([self.taskid]))
        self.assertEqual(self.controller.store.waiting(), 1)
        self.clock.advance(WAIT_BOUND - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(_answer(self.successResultOf(d)), NOT_YET)
        self.assertEqual(self.controller.store.waiting(), 0)
        again = self.remote.remote_wait(serialization.pack([self.taskid]))
        self.channel.reply(self.channel.pending()[0][0], True, serialization.dumps({}))
        self.assertIsNone(_answer(self.successResultOf(again)))
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_blocking_results_answer_not_yet_after_the_bound(self):
        """A blocking results call is bounded the same way; a non-blocking
        one answers at once."""
        blob = serialization.pack([self.taskid])
        d = self.remote.remote_results(blob, True)
        self.clock.advance(WAIT_BOUND)
        self.assertEqual(_answer(self.successResultOf(d)), NOT_YET)
        self.assertEqual(self.controller.store.waiting(), 0)
        self.assertEqual(_answer(self.successResultOf(self.remote.remote_results(blob, False))), [None])

    def test_release_held_answers_everything_now(self):
        """release_held (the server stopping) answers every held call
        NOT_YET at once and leaves neither waiter nor timer behind."""
        calls = [self.remote.remote_wait(serialization.pack([self.taskid])) for _ in range(3)]
        calls.append(self.remote.remote_results(serialization.pack([self.taskid]), True))
        self.remote.release_held()
        self.assertEqual([_answer(self.successResultOf(d)) for d in calls], [NOT_YET] * 4)
        self.assertEqual(self.controller.store.waiting(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unknown_task_is_still_an_error(self):
        """A wait on an unknown id answers UnknownTask, not NOT_YET."""
        d = self.remote.remote_wait(serialization.pack([self.taskid + 99]))
        self.assertEqual(serialization.unpack(self.successResultOf(d))[1][0], "UnknownTask")

    def test_client_asks_again_until_answered(self):
        """The client's barrier and blocking get_task_result ride over
        several bounds, asking again each time, and answer once the task
        finishes."""
        client = TaskClient("pb://%s@127.0.0.1:1/task" % ("a" * 32), self.clock)
        connection = _DirectConnection(self.remote)
        client._connection = connection
        client._submitter = Submitter(connection, self.clock)
        barrier = client.barrier(self.taskid)
        result = client.get_task_result(self.taskid, block=True)
        for _ in range(3):
            self.clock.advance(WAIT_BOUND)
        self.assertNoResult(barrier)
        self.assertNoResult(result)
        self.assertEqual(connection.calls.count("wait"), 4)
        self.assertEqual(connection.calls.count("results"), 4)
        self.channel.reply(self.channel.pending()[0][0], True, serialization.dumps({"a": 1}))
        self.assertIsNone(self.successResultOf(barrier))
        self.assertEqual(self.successResultOf(result).taskid, self.taskid)
        self.assertEqual(self.controller.store.waiting(), 0)


class ClientLeavesTests(unittest.TestCase):
    """Real Foolscap on 127.0.0.1: a client that leaves mid-wait."""

    timeout = 30
    bound = 0.5

    async def test_client_that_leaves_releases_its_waiter(self):
        """After a client disconnects in the middle of a wait, the controller
        holds no waiter for it within the bound."""
        _, registry, controller = clock_controller(self)
        (taskid,) = controller.submit([Task("a = 1").to_envelope()])
        remote = RemoteTaskController(controller, reactor, wait_bound=self.bound)
        self.addCleanup(remote.release_held)
        server_tub = new_tub()
        listen_and_locate(server_tub, "tcp:0:interface=127.0.0.1", None, reactor)
        server_tub.startService()
        self.addCleanup(server_tub.stopService)
        furl = server_tub.registerReference(remote)
        client_tub = new_tub()
        client_tub.startService()
        self.addCleanup(client_tub.stopService)
        connection = ControllerConnection(furl, TASK, reactor, tub=client_tub)

        waiting = defer.Deferred.fromCoroutine(
            connection.call("wait", serialization.pack([taskid]))
        )
        # Calls on one connection arrive in order: the wait is held now.
        await connection.call("queue_status", False)
        self.assertEqual(controller.store.waiting(), 1)
        left = reactor.seconds()
        connection.disconnect()
        with self.assertRaises(ConnectionLost):
            await waiting
        while controller.store.waiting() and reactor.seconds() - left < self.bound + 5.0:
            await sleep(0.05)
        self.assertEqual(controller.store.waiting(), 0)
        self.assertLess(reactor.seconds() - left, self.bound + 1.0)
