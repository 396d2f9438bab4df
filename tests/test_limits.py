"""Every message within its limit, or refused for a reason (issue 8, part 2).

Each path a batch travels is built against the real limit of its
connection, and one item over it fails only itself, with `MessageTooLarge`
(or another typed error), never silently and never anything beside it:

* controller -> engine ``commands`` (`EngineRegistry`),
* engine -> controller ``replies``, failures included (`fit_replies`),
* controller -> client ``results`` (`fit_results` and the client's slices),
* client -> controller ``submit`` (`Submitter`, `run`, `run_many`, `map`).

The logic is tested on a `task.Clock` with in-process fakes; the cases of
the issue run end to end with a real controller, real engine processes and
real Foolscap (`RealCluster`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller.multiengine import MultiEngine
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.service import create_controller
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.engine.link import REPLY_OVERHEAD, fit_replies
from taskfarm.errors import (
    BadRequest,
    ConnectionLost,
    MessageTooLarge,
    RemoteTaskError,
    SerializationError,
    from_wire,
    to_wire,
)
from taskfarm.remote.client import furl_location
from taskfarm.remote.server import RemoteTaskController, fit_results
from taskfarm.submission import Submitter, pack_envelope
from taskfarm.task import MAX_RECOVERY_CHAIN, Task, result_from_envelope
from taskfarm.testing import ScriptedChannel
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import clock_controller

MB = 1_000_000


def _chain(length: int, last: str = "a = 1") -> Task:
    """A task whose recovery chain has `length` tasks; all but the last fail."""
    tail = Task(last, pull="a")
    for _ in range(length - 1):
        tail = Task("raise ValueError('link')", recovery_task=tail)
    return tail


def _failing(n: int) -> Task:
    """A task that raises a ValueError whose message is `n` characters."""
    return Task("raise ValueError('v' * %d)" % n, timeout=30)


def _within(d, seconds: float = 60.0):
    """`d`, failing with TimeoutError unless it fires within `seconds`."""
    return defer.Deferred.fromCoroutine(_await(d)).addTimeout(seconds, reactor)


async def _await(d):
    return await d


# -- controller -> engine: commands --------------------------------------------------


class CommandTests(unittest.TestCase):
    """A controller on a Clock with a scripted engine and a 1 MB limit."""

    limit = MB

    def setUp(self):
        self.clock = task.Clock()
        self.registry = EngineRegistry(
            self.clock, task_slots=2, heartbeat_period=None, max_message_size=self.limit
        )
        self.controller = TaskController(
            self.registry, FIFOScheduler(), self.clock, unmet_timeout=None, prefetch=None
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)

    def add_engine(self):
        channel = ScriptedChannel.registered(self.registry)
        return channel

    def submit(self, *tasks):
        return self.controller.submit([t.to_envelope() for t in tasks])

    def result(self, taskid):
        (envelope,) = self.successResultOf(self.controller.results([taskid]))
        return None if envelope is None else result_from_envelope(envelope)

    def test_two_big_commands_leave_in_two_messages(self):
        """Case 5 on a Clock: an engine arriving to 2 queued tasks of 600 KB
        gets them in two messages, each under the limit, not one of 1.2 MB."""
        ids = self.submit(*[Task("a = 1", push={"x": b"p" * 600_000}) for _ in range(2)])
        channel = self.add_engine()
        self.clock.advance(0)
        self.assertEqual([len(m) for m in channel.messages], [1, 1])
        for message in channel.messages:
            self.assertLessEqual(len(serialization.pack(message)), self.limit)
        self.assertEqual(len(channel.pending()), 2)
        self.assertEqual(self.controller.queue_status()["pending"], len(ids))

    def test_small_commands_still_share_a_message(self):
        """Batching stays: many small commands of one turn leave in one message."""
        self.registry.task_slots = 50
        channel = self.add_engine()
        self.submit(*[Task("a = %d" % i) for i in range(50)])
        self.clock.advance(0)
        self.assertEqual([len(m) for m in channel.messages], [50])

    def test_a_command_over_the_limit_fails_only_its_task(self):
        """A task whose command alone exceeds the limit (queued under a
        larger one) is not sent: it fails with MessageTooLarge on a later
        turn, without spending its retries, and the tasks beside it run."""
        self.registry.task_slots = 3
        channel = self.add_engine()
        small, big, other = self.submit(
            Task("a = 1"), Task("b = 1", push={"x": b"p" * (self.limit + 10)}, retries=5),
            Task("c = 1"),
        )
        self.controller.spin()
        self.registry.flush()
        self.assertIsNone(self.result(big))  # answered on a later turn, not inside the flush
        self.clock.advance(0)
        failure = self.result(big).failure
        self.assertIsInstance(failure, MessageTooLarge)
        self.assertIn("exceeds the controller's message limit of %d bytes" % self.limit,
                      str(failure))
        self.assertEqual([cmd[2][1] for cmd in channel.sent],
                         [Task("a = 1").to_envelope()[1], Task("c = 1").to_envelope()[1]])
        self.assertEqual(len(channel.messages), 1)
        self.assertEqual(self.controller.queue_status()["failed"], 1)
        self.assertEqual(self.controller.queue_status()["pending"], 2)
        self.assertEqual(self.controller._tasks[big].attempts, 1)

    def test_a_smaller_recovery_task_takes_over(self):
        """The oversized task's recovery task is small enough: it runs."""
        channel = self.add_engine()
        (taskid,) = self.submit(
            Task("b = 1", push={"x": b"p" * (self.limit + 10)}, recovery_task=Task("r = 1"))
        )
        for _ in range(5):
            self.clock.advance(0)
        (seq, op, args) = channel.pending()[0]
        self.assertEqual(args[1], Task("r = 1").to_envelope()[1])
        channel.reply(seq, True, serialization.dumps({}))
        self.assertIsNone(self.result(taskid).failure)

    def test_multiengine_call_over_the_limit(self):
        """A MultiEngine command too big for the engine answers its caller
        with MessageTooLarge instead of leaving it waiting."""
        channel = self.add_engine()
        multiengine = MultiEngine(self.registry, self.clock)
        d = multiengine.call("push", "all", (b"x" * (self.limit + 1),))
        self.clock.advance(0)
        self.clock.advance(0)
        ((engine_id, ok, data),) = self.successResultOf(d)
        self.assertEqual((engine_id, ok), (channel.engine.engine_id, False))
        self.assertIsInstance(from_wire(data), MessageTooLarge)
        self.assertEqual(channel.sent, [])
        self.assertEqual(channel.engine.inflight, {})


# -- engine -> controller: replies --------------------------------------------------------


def _remote_failure(size: int) -> tuple:
    """The wire form of a ValueError whose message is `size` characters."""
    message = "v" * size
    traceback = "Traceback (most recent call last):\n  ...\nValueError: " + message
    return to_wire(RemoteTaskError("ValueError", message, traceback, 0, ValueError(message)))


class ReplyTests(unittest.TestCase):
    room = MB - REPLY_OVERHEAD

    def test_a_big_failure_becomes_message_too_large(self):
        """Case 7: a failure too big for the limit (a 600 KB ValueError,
        sent with its traceback and pickled exception) is counted at its
        packed size and replaced by MessageTooLarge, which keeps the type
        name and an excerpt of the message and traceback."""
        reply = (3, False, _remote_failure(600_000), 1.0, 2.0)
        ((fitted,),) = fit_replies([reply], self.room)
        seq, ok, data, started, finished = fitted
        self.assertEqual((seq, ok, started, finished), (3, False, 1.0, 2.0))
        error = from_wire(data)
        self.assertIsInstance(error, MessageTooLarge)
        text = str(error)
        self.assertIn("it was ValueError: vvvv", text)
        self.assertIn("(600000 characters in all)", text)
        self.assertIn("end of the remote traceback", text)
        self.assertLess(len(text), 5000)

    def test_failures_fill_batches_by_their_size(self):
        """Ten 150 KB failures leaving together go in several messages, each
        under the limit, and every one keeps its own ValueError."""
        replies = [(seq, False, _remote_failure(150_000), 1.0, 2.0) for seq in range(10)]
        batches = fit_replies(replies, self.room)
        self.assertGreater(len(batches), 1)
        self.assertEqual([r[0] for b in batches for r in b], list(range(10)))
        for batch in batches:
            self.assertLessEqual(len(serialization.pack(batch)), MB)
            for reply in batch:
                self.assertEqual(from_wire(reply[2]).ename, "ValueError")

    def test_just_over_and_just_under(self):
        """A result that packs to exactly the room passes; one byte more fails."""
        n = self.room
        n -= len(serialization.pack((1, True, b"x" * n, 1.0, 2.0))) - self.room
        fits = (1, True, b"x" * n, 1.0, 2.0)
        self.assertEqual(len(serialization.pack(fits)), self.room)
        over = (2, True, b"x" * (n + 1), 1.0, 2.0)
        (batch_a,), (batch_b,) = fit_replies([fits], self.room), fit_replies([over], self.room)
        self.assertIs(batch_a[0][1], True)
        self.assertIsInstance(from_wire(batch_b[0][2]), MessageTooLarge)


# -- controller -> client: results ----------------------------------------------------------


def _result(taskid: int, size: int) -> tuple:
    return (taskid, "exec", True, b"r" * size, 0, 0.0, 1.0, 2.0)


class FitResultsTests(unittest.TestCase):
    def test_answers_the_prefix_that_fits(self):
        """Case 13: ten results of 500 KB under a 1 MB limit are answered one
        at a time (the client asks again for the rest), each under it."""
        envelopes = [_result(i, 500_000) for i in range(10)]
        fitted = fit_results(envelopes, MB)
        self.assertEqual(fitted, envelopes[:1])
        self.assertLessEqual(len(serialization.pack((True, fitted))), MB)
        small = [_result(i, 1000) for i in range(10)] + [None]
        self.assertEqual(fit_results(small, MB), small)

    def test_a_result_alone_over_the_limit_is_a_typed_failure(self):
        """A result bigger than the limit on its own (stored under a larger
        one) answers as a MessageTooLarge failure of that task, not a hang."""
        (fitted,) = fit_results([_result(7, 2 * MB), _result(8, 10)], MB)
        result = result_from_envelope(fitted)
        self.assertEqual(result.taskid, 7)
        self.assertIsInstance(result.failure, MessageTooLarge)
        self.assertIn("task 7", str(result.failure))
        self.assertEqual(fit_results([_result(8, 10), _result(7, 2 * MB)], MB), [_result(8, 10)])


# -- client -> controller: submissions ------------------------------------------------------


class _InProcessConnection:
    """A `ControllerConnection` stand-in that calls a real controller's
    Task Referenceable directly (no sockets), checking sizes as the real
    one does; `refuse_next` makes the next submit fail for good."""

    def __init__(self, remote: RemoteTaskController, max_message_size: int) -> None:
        self._remote = remote
        self.max_message_size = max_message_size
        self.ever_connected = True
        self.on_new_incarnation: list = []
        self.calls: list[tuple[str, int]] = []
        self.refuse_next: BaseException | None = None

    async def call(self, method: str, *args, retry: bool = False):
        # A message is one byte string or a list of them (in parts).
        sized = (bytes, list)
        for arg in args:
            if isinstance(arg, sized) and serialization.message_size(arg) > self.max_message_size:
                raise MessageTooLarge(
                    "a %s request of %d bytes" % (method, serialization.message_size(arg))
                )
        self.calls.append(
            (method, serialization.message_size(args[0]) if isinstance(args[0], sized) else args[0])
        )
        if method == "submit" and self.refuse_next is not None:
            error, self.refuse_next = self.refuse_next, None
            raise error
        ok, value = serialization.unpack(await getattr(self._remote, "remote_" + method)(*args))
        if not ok:
            raise from_wire(value)
        return value


class SubmitterTests(unittest.SynchronousTestCase):
    """A `Submitter` against a real in-memory `TaskController`."""

    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)

    def submitter(self, limit: int = serialization.DEFAULT_MAX_MESSAGE_SIZE):
        remote = RemoteTaskController(self.controller, max_message_size=limit)
        self.connection = _InProcessConnection(remote, limit)
        return Submitter(self.connection, self.clock)

    def settle(self):
        for _ in range(10):
            self.clock.advance(0.01)

    def submits(self) -> list[int]:
        return [size for method, size in self.connection.calls if method == "submit"]

    def test_run_many_of_100001_tasks(self):
        """Case 14: run_many of 100,001 tasks (more than one reserve call
        may set aside) gets 100,001 increasing ids, every task is queued, and
        no reserve call asks for more than the controller allows."""
        submitter = self.submitter()
        blob = pack_envelope(Task("a = 1").to_envelope())
        d = submitter.run_many([blob] * 100_001)
        self.settle()
        ids = self.successResultOf(d)
        self.assertEqual(len(ids), 100_001)
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(self.controller.queue_status()["scheduled"], 100_001)
        reserves = [count for method, count in self.connection.calls if method == "reserve"]
        self.assertGreater(len(reserves), 1)
        self.assertLessEqual(max(reserves), 100_000)

    def test_batches_are_built_under_the_limit(self):
        """run_many and a loop of run calls both split into submissions
        that fit the limit, and every task arrives once."""
        limit = 20_000
        submitter = self.submitter(limit)
        blob = pack_envelope(Task("a = 1", push={"x": b"p" * 1000}).to_envelope())
        many = submitter.run_many([blob] * 100)
        singles = [submitter.run(blob) for _ in range(100)]
        self.settle()
        self.assertEqual(len(self.successResultOf(many)), 100)
        for d in singles:
            self.successResultOf(d)
        self.successResultOf(defer.Deferred.fromCoroutine(submitter.confirm()))
        self.assertGreater(len(self.submits()), 10)
        self.assertLessEqual(max(self.submits()), limit)
        self.assertEqual(self.controller.queue_status()["scheduled"], 200)

    def test_a_task_over_the_limit_fails_its_own_run(self):
        """run of a task that alone exceeds the limit fails at once with
        MessageTooLarge and takes no id; run_many with one such task sends
        nothing; the tasks around them are accepted."""
        limit = 20_000
        submitter = self.submitter(limit)
        small = pack_envelope(Task("a = 1").to_envelope())
        big = pack_envelope(Task("a = 1", push={"x": b"p" * limit}).to_envelope())
        first = submitter.run(small)
        self.settle()
        before = self.successResultOf(first)
        self.failureResultOf(submitter.run(big), MessageTooLarge)
        after = self.successResultOf(submitter.run(small))
        self.assertEqual(after, before + 1)
        failure = self.failureResultOf(submitter.run_many([small, big]), MessageTooLarge)
        self.assertIn("task 1 of the batch", str(failure.value))
        self.settle()
        self.successResultOf(defer.Deferred.fromCoroutine(submitter.confirm()))
        self.assertEqual(self.controller.queue_status(verbose=True)["scheduled"], [before, after])

    def test_a_send_that_fails_fails_exactly_its_tasks(self):
        """A submission that fails for good fails exactly the tasks in it:
        confirm() raises its error once, questions about its ids raise, and
        the submissions before and after it are accepted.  (This stand-in
        answers at once, so nothing is ever in flight and each run's task
        leaves alone, in a submission of its own.)"""
        submitter = self.submitter()
        blob = pack_envelope(Task("a = 1").to_envelope())
        before = [self.successResultOf(submitter.run(blob)) for _ in range(3)]
        submitter.flush()
        self.connection.refuse_next = ConnectionLost("the link broke for good")
        lost = [self.successResultOf(submitter.run(blob))]
        self.assertEqual(len(self.submits()), 4)  # it left alone, and was refused
        after = [self.successResultOf(submitter.run(blob)) for _ in range(2)]
        self.settle()
        self.assertIsInstance(
            self.failureResultOf(defer.Deferred.fromCoroutine(submitter.confirm())).value,
            ConnectionLost,
        )
        self.successResultOf(defer.Deferred.fromCoroutine(submitter.confirm()))
        self.assertRaises(ConnectionLost, submitter.check, lost[:1])
        submitter.check(before + after)
        self.assertEqual(
            sorted(self.controller.queue_status(verbose=True)["scheduled"]), before + after
        )


class RecoveryChainTests(unittest.TestCase):
    """The recovery chain limit, the same on both sides."""

    def test_client_refuses_a_chain_just_over_the_limit(self):
        """A chain of MAX_RECOVERY_CHAIN tasks encodes and packs; one task
        more is refused at encoding with BadRequest naming the limit; a
        chain of about 1,000 (the issue's case 2) is refused the same way."""
        pack_envelope(_chain(MAX_RECOVERY_CHAIN).to_envelope())
        for length in (MAX_RECOVERY_CHAIN + 1, 1000):
            with self.assertRaises(BadRequest) as caught:
                _chain(length).to_envelope()
            self.assertIn("longer than %d tasks" % MAX_RECOVERY_CHAIN, str(caught.exception))

    def test_controller_refuses_a_chain_just_over_the_limit(self):
        """The controller accepts a chain of MAX_RECOVERY_CHAIN tasks and
        refuses one of MAX_RECOVERY_CHAIN + 1 with BadRequest."""
        clock = task.Clock()
        registry = EngineRegistry(clock, heartbeat_period=None)
        controller = TaskController(registry, FIFOScheduler(), clock, unmet_timeout=None)
        envelope = _chain(MAX_RECOVERY_CHAIN).to_envelope()
        self.assertEqual(len(controller.submit([envelope])), 1)
        longer = envelope[:4] + (envelope,)
        with self.assertRaises(BadRequest) as caught:
            controller.submit([longer])
        self.assertIn("longer than %d tasks" % MAX_RECOVERY_CHAIN, str(caught.exception))

    def test_unpicklable_depth_is_a_serialization_error(self):
        """An envelope too deep for pickle (built by hand, past the chain
        check) fails to pack with SerializationError, not RecursionError."""
        envelope = None
        for _ in range(5000):
            envelope = ("exec", b"", (False, False, 0, 0, None), None, envelope)
        self.assertRaises(RecursionError, serialization.pack, envelope)
        with self.assertRaises(SerializationError) as caught:
            pack_envelope(envelope)
        self.assertIn("nested too deeply", str(caught.exception))


# -- end to end -----------------------------------------------------------------------------


class _LimitClusterTestCase(ClusterTestCase):
    folder_prefix = "taskfarm-limits-"

    async def stop_controller(self) -> int:
        """Stop the controller (its journal stays); returns its port."""
        furl = self.cluster.controller.server.furls["task"]
        port = int(furl_location(furl).rsplit(":", 1)[1])
        await self.cluster.controller.stopService()
        return port

    def start_controller(self, port: int, **options) -> None:
        """A new controller on the same profile, journal and port."""
        self.cluster.controller = create_controller(
            self.cluster.profile, reactor, listen="tcp:%d:interface=127.0.0.1" % port, **options
        )
        self.cluster.controller.startService()

    async def stop_engines(self) -> None:
        for slot in self.cluster.engines:
            await slot.stop(grace=3)
        self.cluster.engines = []


class LimitsEndToEndTests(_LimitClusterTestCase):
    @run
    async def test_commands_after_a_restart(self):
        """Case 5: under a 1 MB limit, 4 accepted tasks with a 600 KB push
        wait in the journal while no engine is there; the controller
        restarts; the engine that registers gets its 2 slots in separate
        messages, and all 4 and a later tiny task succeed."""
        tc = await self.start_cluster(0, max_message_size=MB)
        ids = [await tc.run(Task("n = len(x)", push={"x": b"p" * 600_000}, pull="n"))
               for _ in range(4)]
        await _within(tc.confirm())
        port = await self.stop_controller()
        self.start_controller(port, max_message_size=MB)
        await self.cluster.add_engines(1)
        tiny = await tc.run(Task("n = 0", pull="n"))
        results = await _within(tc.get_task_results(ids + [tiny], block=True))
        self.assertEqual([r.ns.n for r in results], [600_000] * 4 + [0])

    @run
    async def test_failures_and_results_over_and_under_the_limit(self):
        """Cases 7 and 13 under a 1 MB limit: one 600 KB ValueError fails as
        MessageTooLarge naming ValueError; ten 150 KB ValueErrors, run
        together, each fail as that ValueError; ten 500 KB results come back
        in one get_task_results and one map.  Nothing waits past its bound."""
        tc = await self.start_cluster(1, max_message_size=MB, task_slots=10, prefetch=None)
        big = await tc.run(_failing(600_000))
        tens = await tc.run_many([_failing(150_000) for _ in range(10)])
        outcomes = [r.failure for r in await _within(tc.get_task_results([big] + tens, True))]
        self.assertIsInstance(outcomes[0], MessageTooLarge)
        self.assertIn("it was ValueError", str(outcomes[0]))
        for outcome in outcomes[1:]:
            self.assertIsInstance(outcome, RemoteTaskError)
            self.assertEqual((outcome.ename, len(outcome.evalue)), ("ValueError", 150_000))
        ids = await tc.run_many([Task("r = b'r' * 500_000", pull="r") for _ in range(10)])
        results = await _within(tc.get_task_results(ids, block=True))
        self.assertEqual([len(r.ns.r) for r in results], [500_000] * 10)
        values = await _within(tc.map(lambda n: b"r" * n, [500_000] * 10))
        self.assertEqual([len(v) for v in values], [500_000] * 10)

    @run
    async def test_one_item_just_over_the_limit_on_every_path(self):
        """Under a 200 KB limit, one item just over it on each path fails
        alone with MessageTooLarge: a run() task, a run_many task (nothing
        of that batch is sent), a result, a failure; then, after a restart
        with a 100 KB limit, a queued task's command and a stored result.
        Every other task ends with its result."""
        limit = 200_000
        tc = await self.start_cluster(1, max_message_size=limit)
        over = b"x" * limit
        with self.assertRaises(MessageTooLarge):
            await tc.run(Task("a = 1", push={"x": over}))
        beside = await tc.run(Task("a = 1", pull="a"))
        status = await tc.queue_status()
        with self.assertRaises(MessageTooLarge):
            await tc.run_many([Task("a = 1"), Task("a = 1", push={"x": over})])
        self.assertEqual(sum((await tc.queue_status()).values()), sum(status.values()))
        result = await tc.run(Task("r = b'r' * %d" % limit, pull="r"))
        failure = await tc.run(_failing(limit))
        stored = await tc.run(Task("r = b'r' * 150_000", pull="r"))
        outcomes = await _within(tc.get_task_results([beside, result, failure, stored], True))
        self.assertEqual(outcomes[0].ns.a, 1)
        self.assertIsInstance(outcomes[1].failure, MessageTooLarge)
        self.assertIsInstance(outcomes[2].failure, MessageTooLarge)
        self.assertIn("ValueError", str(outcomes[2].failure))
        self.assertEqual(len(outcomes[3].ns.r), 150_000)
        # A task queued while no engine is there, then a smaller limit.
        await self.stop_engines()
        await self.cluster.wait_for_engines(0)
        queued = await tc.run(Task("n = len(x)", push={"x": b"q" * 150_000}, pull="n"))
        await _within(tc.confirm())
        port = await self.stop_controller()
        self.start_controller(port, max_message_size=100_000)
        await self.cluster.add_engines(1)
        (command,) = await _within(tc.get_task_results([queued], block=True))
        self.assertIsInstance(command.failure, MessageTooLarge)
        self.assertIn("task command", str(command.failure))
        outcomes = await _within(tc.get_task_results([beside, stored, beside]))
        self.assertEqual(outcomes[0].ns.a, 1)
        self.assertIsInstance(outcomes[1].failure, MessageTooLarge)
        self.assertEqual(outcomes[2].ns.a, 1)
        after = await tc.run(Task("n = 2", pull="n"))
        self.assertEqual((await _within(tc.get_task_result(after, block=True))).ns.n, 2)

    @run
    async def test_deep_recovery_chain_sent_with_run(self):
        """Case 2: a ~1000-deep recovery chain fails its own run() at once
        with BadRequest; the 5 plain tasks queued beside it succeed and
        confirm() returns; run_many as a client's first call fails at once
        and the client goes on; a chain of MAX_RECOVERY_CHAIN tasks runs to
        its last task."""
        tc = await self.start_cluster(1)
        plain = [await tc.run(Task("a = %d" % i, pull="a")) for i in range(2)]
        with self.assertRaises(BadRequest):
            await tc.run(_chain(1000))
        plain += [await tc.run(Task("a = %d" % i, pull="a")) for i in range(2, 5)]
        await _within(tc.confirm())
        results = await _within(tc.get_task_results(plain, block=True))
        self.assertEqual([r.ns.a for r in results], list(range(5)))
        first = self.cluster.task_client()
        with self.assertRaises(BadRequest):
            await _within(first.run_many([Task("a = 1"), _chain(1000)]))
        ids = await _within(first.run_many([_chain(MAX_RECOVERY_CHAIN)]))
        (result,) = await _within(first.get_task_results(ids, block=True))
        self.assertEqual(result.ns.a, 1)

    @run
    async def test_map_splits_messages_and_leases(self):
        """Case 14 end to end, at a size the suite can afford: a map of 2,000
        items under a 64 KB limit (many submissions, result slices and id
        lists) returns every result in order."""
        tc = await self.start_cluster(1, max_message_size=64 * 1024)
        values = await _within(tc.map(lambda x: x * x, range(2000)), 90)
        self.assertEqual(values, [x * x for x in range(2000)])
        self.assertEqual(sum((await tc.queue_status()).values()), 0)


class MapClearTests(_LimitClusterTestCase):
    """Case 15: the controller dies between map's fetch and its clear."""

    async def map_with_restart_after_fetch(self, tc, restart: bool):
        fetch = tc._get_results

        async def fetch_then_stop(ids, block):
            outcomes = await fetch(ids, block)
            self.port = await self.stop_controller()
            if restart:
                self.start_controller(self.port)
            return outcomes

        tc._get_results = fetch_then_stop
        return await _within(tc.map(lambda x: x * x, range(1000)))

    @run
    async def test_clear_is_retried_across_a_restart(self):
        """The clear reconnects to the restarted controller and clears the
        1,000 tasks; map returns every result."""
        tc = await self.start_cluster(1)
        values = await self.map_with_restart_after_fetch(tc, restart=True)
        self.assertEqual(values, [x * x for x in range(1000)])
        self.assertEqual(sum((await tc.queue_status()).values()), 0)

    @run
    async def test_results_kept_when_the_clear_fails_for_good(self):
        """With the controller gone for good, the clear gives up after the
        reconnect timeout, and map still returns the 1,000 results."""
        await self.start_cluster(1)
        tc = self.cluster.task_client(reconnect_timeout=1.0)
        values = await self.map_with_restart_after_fetch(tc, restart=False)
        self.assertEqual(values, [x * x for x in range(1000)])
        self.start_controller(self.port)  # for the cleanup to stop


class CommandSizeBoundTests(unittest.TestCase):
    """The registry sizes commands without pickling them: its bound must
    never be below the real pickle, or a message could pass the limit."""

    @settings(max_examples=500, deadline=None)
    @given(
        st.recursive(
            st.one_of(
                st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                st.binary(max_size=300), st.text(max_size=100),
            ),
            lambda inner: st.one_of(st.lists(inner, max_size=8), st.tuples(inner, inner)),
            max_leaves=40,
        )
    )
    def test_bound_is_never_below_the_pickle(self, value):
        from taskfarm.batching import pickled_size_bound

        self.assertGreaterEqual(pickled_size_bound(value), len(serialization.pack(value)))

    def test_big_payloads(self):
        from taskfarm.batching import pickled_size_bound

        for size in (0, 65535, 65536, 1 << 20, 3 << 20):
            command = (7, "task", ("exec", b"p" * size, False, True, None))
            self.assertGreaterEqual(pickled_size_bound(command), len(serialization.pack(command)))
