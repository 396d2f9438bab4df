"""The engine link's policy on a `task.Clock`: its back-off schedule, its
states, and replies batched under the controller's limit.  No sockets:
the transport is a scripted `IControllerLink`."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from taskfarm import serialization
from taskfarm.backoff import Backoff
from taskfarm.engine.link import REPLY_OVERHEAD, EngineLink, EngineLinkState, WorkerCommands
from taskfarm.errors import ControllerUnreachable
from taskfarm.interfaces import IControllerLink, IEngineCommands, IEngineSession
from taskfarm.remote.engine import FoolscapControllerLink
from taskfarm.states import InvalidTransition


class _Namespace:
    def __init__(self) -> None:
        self.properties = {"hostname": "here"}

    def set_properties(self, properties) -> None:
        self.properties = properties


class _Worker:
    """What `EngineLink` needs of a `CommandWorker`: sessions and a namespace."""

    def __init__(self) -> None:
        self.namespace = _Namespace()
        self.sessions: list = []  # engine ids; None for each end_session
        self.sink = None
        self.received: list = []

    def begin_session(self, engine_id, sink) -> None:
        self.sessions.append(engine_id)
        self.sink = sink

    def end_session(self) -> None:
        self.sessions.append(None)
        self.sink = None

    def receive(self, commands) -> None:
        self.received.append(commands)

    def interrupt(self, seq) -> None:
        self.received.append(("interrupt", seq))

    def cancel(self, seqs) -> None:
        self.received.append(("cancel", seqs))


@implementer(IEngineSession)
class _Session:
    def __init__(self, engine_id: int, limit: int) -> None:
        self.engine_id = engine_id
        self.max_message_size = limit
        self.location = "127.0.0.1:1"
        self.sent: list[bytes] = []
        self.on_disconnect: list = []
        self.alive = True

    def send_replies(self, packed: bytes) -> bool:
        if not self.alive:
            return False
        self.sent.append(packed)
        return True

    def notify_on_disconnect(self, callback) -> None:
        self.on_disconnect.append(callback)

    def break_link(self) -> None:
        self.alive = False
        for callback in self.on_disconnect:
            callback()


@implementer(IControllerLink)
class _ScriptedLink:
    """Each `register` answers the next outcome: a limit (registered) or an
    exception; with none left it hangs until the test answers it."""

    def __init__(self, clock, outcomes: list) -> None:
        self._clock = clock
        self.outcomes = list(outcomes)
        self.attempts: list[tuple[float, object, object]] = []  # (time, furl, requested id)
        self.sessions: list[_Session] = []
        self.started = self.stopped = 0
        self.pending: defer.Deferred | None = None

    def start(self) -> None:
        self.started += 1

    def stop(self) -> defer.Deferred:
        self.stopped += 1
        return defer.succeed(None)

    def register(self, furl, commands, properties, requested_id) -> defer.Deferred:
        self.attempts.append((self._clock.seconds(), furl, requested_id))
        self.commands = commands
        self.properties = properties
        if not self.outcomes:
            self.pending = defer.Deferred()
            return self.pending
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        session = _Session(len(self.sessions) if requested_id is None else requested_id, outcome)
        self.sessions.append(session)
        return defer.succeed(session)


def _unreachable() -> ControllerUnreachable:
    return ControllerUnreachable("nothing listens")


class EngineLinkTests(unittest.SynchronousTestCase):
    def make(self, outcomes: list, **options) -> tuple[EngineLink, _ScriptedLink, _Worker]:
        self.clock = task.Clock()
        transport = _ScriptedLink(self.clock, outcomes)
        worker = _Worker()
        furls = iter(range(1000))
        link = EngineLink(
            lambda: "furl-%d" % next(furls), worker, self.clock, transport=transport, **options
        )
        self.states: list[tuple[EngineLinkState, EngineLinkState]] = []
        link.on_state.append(lambda old, new: self.states.append((old, new)))
        return link, transport, worker

    def times(self, transport: _ScriptedLink) -> list[float]:
        return [round(when, 6) for when, _, _ in transport.attempts]

    def stop(self, link: EngineLink) -> None:
        self.successResultOf(defer.Deferred.fromCoroutine(link.stopService()))

    def test_back_off_doubles_from_0_2_to_5_seconds(self):
        """A controller that cannot be reached is tried again after 0.2 s,
        then twice as long each time up to 5 s, reading the furl each time."""
        link, transport, _ = self.make([_unreachable()] * 9)
        link.startService()
        waits = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
        for wait in waits:
            (timer,) = self.clock.getDelayedCalls()
            self.assertAlmostEqual(timer.getTime() - self.clock.seconds(), wait)
            attempts = len(transport.attempts)
            # A hair past: now + (t - now) may fall short of t in floats.
            self.clock.advance(timer.getTime() - self.clock.seconds() + 1e-9)
            self.assertEqual(len(transport.attempts), attempts + 1)
        self.assertEqual(
            self.times(transport), [0, 0.2, 0.6, 1.4, 3.0, 6.2, 11.2, 16.2, 21.2, 26.2]
        )
        self.clock.advance(100)
        self.assertEqual(len(transport.attempts), 10)  # the tenth hangs: no more
        self.assertEqual(
            [furl for _, furl, _ in transport.attempts][:3], ["furl-0", "furl-1", "furl-2"]
        )
        self.stop(link)

    def test_registering_resets_the_schedule_and_keeps_the_id(self):
        """After two failures the engine registers; when that link breaks it
        tries again 0.2 s later (the schedule starts over), asks for the same
        engine id, and the worker's session ends and begins again."""
        link, transport, worker = self.make([_unreachable(), _unreachable(), 4096, 4096])
        registered: list[int] = []
        link.on_registered.append(registered.append)
        link.startService()
        self.clock.advance(0.2)
        self.clock.advance(0.4)
        self.assertIs(link.state, EngineLinkState.REGISTERED)
        self.assertEqual(link.engine_id, 0)
        self.assertEqual(transport.properties, {"hostname": "here"})
        self.clock.advance(100)
        transport.sessions[0].break_link()
        self.assertIs(link.state, EngineLinkState.WAITING)
        self.clock.advance(0.19)
        self.assertEqual(len(transport.attempts), 3)
        self.clock.advance(0.01)
        self.assertEqual(self.times(transport), [0, 0.2, 0.6, 100.8])
        self.assertEqual([requested for _, _, requested in transport.attempts], [None] * 3 + [0])
        self.assertEqual(registered, [0, 0])
        self.assertEqual(link.registrations, 2)
        self.assertIn(None, worker.sessions)
        self.assertEqual(worker.sessions[-1], 0)
        self.stop(link)

    def test_states_in_order(self):
        """The link goes stopped -> connecting -> waiting -> connecting ->
        registered -> waiting (lost) -> connecting -> stopping -> stopped."""
        link, transport, _ = self.make([_unreachable(), 4096])
        link.startService()
        self.clock.advance(0.2)
        transport.sessions[0].break_link()
        self.clock.advance(0.2)
        self.stop(link)
        S = EngineLinkState
        path = [self.states[0][0]] + [new for _, new in self.states]
        self.assertEqual(
            path,
            [
                S.STOPPED,
                S.CONNECTING,
                S.WAITING,
                S.CONNECTING,
                S.REGISTERED,
                S.WAITING,
                S.CONNECTING,
                S.STOPPING,
                S.STOPPED,
            ],
        )

    def test_stop_while_waiting_leaves_no_timer(self):
        """Stopping during a back-off cancels its timer: no attempt follows,
        the transport is stopped, and the link can start again."""
        link, transport, _ = self.make([_unreachable()])
        link.startService()
        self.assertIs(link.state, EngineLinkState.WAITING)
        self.stop(link)
        self.assertIs(link.state, EngineLinkState.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((transport.started, transport.stopped), (1, 1))
        self.clock.advance(10)
        self.assertEqual(len(transport.attempts), 1)
        transport.outcomes = [4096]
        link.startService()
        self.assertIs(link.state, EngineLinkState.REGISTERED)
        self.stop(link)

    def test_stop_while_connecting_cancels_the_attempt(self):
        """Stopping while an attempt hangs cancels it and ends in stopped."""
        link, transport, _ = self.make([])
        link.startService()
        self.assertIs(link.state, EngineLinkState.CONNECTING)
        self.stop(link)
        self.assertTrue(transport.pending.called)
        self.assertIs(link.state, EngineLinkState.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_bad_transition_is_refused(self):
        """The state table is enforced: a registered link cannot be stopped
        without passing through stopping."""
        link, _, _ = self.make([4096])
        link.startService()
        self.assertRaises(InvalidTransition, link._enter, EngineLinkState.STOPPED)
        self.stop(link)

    def test_replies_are_batched_under_the_controller_limit(self):
        """Replies that together exceed the limit learnt at hello leave in
        several messages, none over the limit, all in order."""
        limit = 64 * 1024
        link, transport, worker = self.make([limit])
        link.startService()
        replies = [(seq, True, b"r" * 10_000, 0.0, 1.0) for seq in range(20)]
        worker.sink(replies)
        sent = transport.sessions[0].sent
        self.assertGreater(len(sent), 1)
        self.assertTrue(all(len(message) <= limit for message in sent))
        self.assertEqual(
            [reply for message in sent for reply in serialization.unpack(message)], replies
        )
        self.assertGreater(limit - REPLY_OVERHEAD, 0)
        transport.sessions[0].alive = False
        worker.sink(replies)  # a dead link drops them, raising nothing
        self.stop(link)

    def test_commands_reach_the_worker(self):
        """What the transport delivers reaches the worker and its namespace."""
        link, transport, worker = self.make([4096])
        link.startService()
        commands = transport.commands
        verifyObject(IEngineCommands, commands)
        commands.receive([(1, "exec", ())])
        commands.interrupt(1)
        commands.cancel([2])
        commands.set_properties({"a": 1})
        self.assertEqual(worker.received, [[(1, "exec", ())], ("interrupt", 1), ("cancel", [2])])
        self.assertEqual(worker.namespace.properties, {"a": 1})
        self.stop(link)

    def test_implementers(self):
        """The Foolscap transport, the worker adapter and these fakes provide
        the interfaces they claim."""
        verifyObject(IControllerLink, FoolscapControllerLink(task.Clock()))
        verifyObject(IEngineCommands, WorkerCommands(_Worker()))
        verifyObject(IControllerLink, _ScriptedLink(task.Clock(), []))
        verifyObject(IEngineSession, _Session(0, 1024))


class BackoffTests(unittest.SynchronousTestCase):
    def test_schedule(self):
        """Delays double from the first to the ceiling, with no jitter, and
        start over after reset; peek does not count a failure."""
        backoff = Backoff(0.1, 2.0)
        self.assertEqual(backoff.peek(), 0.1)
        self.assertEqual([backoff.next() for _ in range(7)], [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
        self.assertEqual(backoff.attempts, 7)
        backoff.reset()
        self.assertEqual(backoff.next(), 0.1)

    def test_wait_uses_the_clock(self):
        """wait() fires after the next delay on the given clock."""
        clock = task.Clock()
        backoff = Backoff(0.2, 5.0)
        d = backoff.wait(clock)
        clock.advance(0.19)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.successResultOf(d)
        self.assertEqual(backoff.peek(), 0.4)
