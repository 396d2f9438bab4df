"""The in-process transport (`taskfarm.testing.local`) against the real
Referenceables: it delivers on later turns, carries values as Foolscap does,
checks the RemoteInterfaces, and breaks and hangs as a network does.

Its agreement with real Foolscap on 127.0.0.1 is checked by the channel
interface tests (tests/test_channels.py), which run the same tests over both.
"""

from __future__ import annotations

from twisted.trial import unittest

# Imports gathered here, so that moved modules are repointed in one place.
from taskfarm import serialization
from taskfarm.engine.link import WorkerCommands
from taskfarm.remote.engine import _EngineReferenceable
from taskfarm.remote.local import DeadReferenceError, RemoteException, Violation
from taskfarm.remote.server import RemoteEngineRegistrar, RemoteTaskController
from taskfarm.task import Task
from taskfarm.testing.fakes import RecordingWorker
from taskfarm.testing.helpers import clock_controller
from taskfarm.testing.local import LinkState, LocalConnection, LocalReference, LocalTub


class _Echo:
    """Not a Referenceable: a plain object Foolscap refuses to send."""


class LocalConnectionTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)
        self.connection = LocalConnection(self.clock)
        self.task = self.connection.reference(RemoteTaskController(self.controller))

    def turns(self, n: int = 3) -> None:
        for _ in range(n):
            self.clock.advance(0)


class DeliveryTests(LocalConnectionTestCase):
    """Calls reach the real Referenceable on a later turn, answers later still."""

    def test_call_arrives_on_a_later_turn(self):
        """Nothing runs inside callRemote: the call runs, and its answer
        arrives, only once the clock turns."""
        d = self.task.callRemote("reserve", 5)
        self.task.callRemoteOnly("reserve", 5)
        self.assertNoResult(d)
        self.assertEqual(self.connection.pending, 1)
        self.clock.advance(0)
        self.assertEqual(serialization.unpack(self.successResultOf(d)), (True, 0))
        self.assertEqual(self.connection.pending, 0)

    def test_calls_arrive_in_order(self):
        """Calls made in one turn run in the order they were made."""
        ds = [self.task.callRemote("reserve", 2) for _ in range(3)]
        self.turns()
        firsts = [serialization.unpack(self.successResultOf(d))[1] for d in ds]
        self.assertEqual(firsts, [0, 2, 4])

    def test_call_only_answers_nothing(self):
        """callRemoteOnly returns None and still runs the method."""
        self.assertIsNone(self.task.callRemoteOnly("reserve", 3))
        self.turns()
        d = self.task.callRemote("reserve", 1)
        self.turns()
        self.assertEqual(serialization.unpack(self.successResultOf(d)), (True, 3))

    def test_raising_method_is_a_remote_exception(self):
        """A remote method that raises fails the call with RemoteException,
        as over taskfarm's Tubs (remote exception types are not exposed)."""
        worker = RecordingWorker()
        engine = self.connection.reference(_EngineReferenceable(WorkerCommands(worker)))
        d = engine.callRemote("commands", [b"not a pickle"])
        self.turns()
        self.failureResultOf(d, RemoteException)


class CarryTests(LocalConnectionTestCase):
    """Arguments and answers cross as Foolscap carries them."""

    def test_bytes_stay_bytes(self):
        """A bytes answer arrives as bytes (a reply envelope)."""
        d = self.task.callRemote("hello")
        self.turns()
        hello = self.successResultOf(d)
        self.assertIsInstance(hello, bytes)
        self.assertEqual(serialization.unpack(hello)["interface"], "task")

    def test_referenceables_become_references(self):
        """The engine object given to `register` reaches the registrar as a
        LocalReference; the session it answers comes back as one; the same
        object sent twice gives the same reference."""
        registrar = self.connection.reference(RemoteEngineRegistrar(self.registry))
        engine = _EngineReferenceable(WorkerCommands(RecordingWorker()))
        d = registrar.callRemote("register", engine, serialization.pack({}), None)
        self.turns()
        engine_id, session = self.successResultOf(d)
        self.assertEqual(engine_id, 0)
        self.assertIsInstance(session, LocalReference)
        handle = self.registry.engines[0]
        self.assertIsInstance(handle.channel._rref, LocalReference)
        self.assertIs(self.connection.reference(engine), handle.channel._rref)

    def test_a_reference_sent_home_is_its_object(self):
        """A reference passed back to the side that owns its object arrives
        as that object."""
        carried = self.connection._carry((self.task, [b"x"], {"k": 1}))
        self.assertIsInstance(carried[0], RemoteTaskController)
        self.assertEqual(carried[1:], ([b"x"], {"k": 1}))

    def test_other_objects_are_refused(self):
        """An object that is neither plain data nor a Referenceable cannot
        travel."""
        self.assertRaises(Violation, self.connection._carry, [_Echo()])

    def test_arguments_are_checked_against_the_schema(self):
        """An argument the RemoteInterface refuses fails the call with
        Violation, and nothing reaches the controller."""
        self.failureResultOf(self.task.callRemote("submit", "a str, not bytes"), Violation)
        self.failureResultOf(self.task.callRemote("reserve", "five"), Violation)
        self.failureResultOf(self.task.callRemote("no_such_method"), Violation)
        self.assertEqual(self.connection.calls, [])


class DisconnectTests(LocalConnectionTestCase):
    """`disconnect` fails and notifies as a lost Foolscap connection does."""

    def test_pending_calls_fail_with_dead_reference(self):
        """A call waiting for its answer fails with DeadReferenceError on a
        later turn; a call made afterwards fails at once; callRemoteOnly is
        dropped silently."""
        d = self.task.callRemote("reserve", 1)
        self.connection.disconnect()
        self.assertNoResult(d)
        self.clock.advance(0)
        self.assertIn("Connection was lost", str(self.failureResultOf(d, DeadReferenceError).value))
        later = self.task.callRemote("reserve", 1)
        self.failureResultOf(later, DeadReferenceError)
        self.assertIsNone(self.task.callRemoteOnly("reserve", 1))
        self.turns()
        self.assertEqual(self.connection.state, LinkState.BROKEN)

    def test_notifications_fire_once_broken(self):
        """notifyOnDisconnect callbacks run on a later turn with their
        arguments; one cancelled by dontNotifyOnDisconnect does not; one
        registered after the break runs too."""
        heard = []
        self.task.notifyOnDisconnect(heard.append, "first")
        marker = self.task.notifyOnDisconnect(heard.append, "cancelled")
        self.task.dontNotifyOnDisconnect(marker)
        self.connection.disconnect()
        self.assertEqual(heard, [])
        self.clock.advance(0)
        self.assertEqual(heard, ["first"])
        self.task.notifyOnDisconnect(heard.append, "late")
        self.task.dontNotifyOnDisconnect(marker)  # tolerated, as in Foolscap
        self.clock.advance(0)
        self.assertEqual(heard, ["first", "late"])

    def test_dropping_the_transport_breaks_the_connection(self):
        """What RemoteEngineChannel.disconnect reaches for (the tracker's
        transport) breaks the connection, and the registry loses the engine."""
        registrar = self.connection.reference(RemoteEngineRegistrar(self.registry))
        d = registrar.callRemote(
            "register", _EngineReferenceable(WorkerCommands(RecordingWorker())), serialization.pack({}), None
        )
        self.turns()
        self.successResultOf(d)
        self.registry.engines[0].channel.disconnect()
        self.turns()
        self.assertEqual(self.registry.engines, {})


class HangTests(LocalConnectionTestCase):
    """`hang` holds calls and answers until `release`."""

    def test_hung_calls_wait_for_release(self):
        """Neither a call nor an answer moves while hung; after release both
        arrive."""
        (taskid,) = self.controller.submit([Task("x = 1").to_envelope()])
        waiting = self.task.callRemote("wait", serialization.pack([taskid]))
        self.clock.advance(0)  # delivered: the controller waits for the task
        self.connection.hang()
        held = self.task.callRemote("reserve", 2)
        self.controller.abort(taskid)  # the wait is answered, into a hung link
        self.clock.advance(100)
        self.turns()
        self.assertNoResult(waiting)
        self.assertNoResult(held)
        self.connection.release()
        self.turns()
        self.assertEqual(serialization.unpack(self.successResultOf(waiting))[0], True)
        self.assertEqual(serialization.unpack(self.successResultOf(held)), (True, taskid + 1))

    def test_hung_then_broken_fails_the_calls(self):
        """A break while hung fails the held calls with DeadReferenceError."""
        self.connection.hang()
        d = self.task.callRemote("reserve", 2)
        self.clock.advance(0)
        self.connection.disconnect()
        self.clock.advance(0)
        self.failureResultOf(d, DeadReferenceError)


class LocalTubTests(unittest.SynchronousTestCase):
    """`LocalTub.getReference` opens fresh connections, or fails to."""

    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)
        self.tub = LocalTub(self.clock)
        self.furl = self.tub.serve(RemoteTaskController(self.controller), "task")

    def test_each_reference_has_its_own_connection(self):
        """Two getReference calls give two connections; breaking one leaves
        the other up."""
        first = self.tub.getReference(self.furl)
        second = self.tub.getReference(self.furl)
        self.clock.advance(0)
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertIsNot(a.connection, b.connection)
        a.connection.disconnect()
        self.assertEqual(b.connection.state, LinkState.UP)

    def test_unreachable_and_silent(self):
        """`reachable` False refuses; `answering` False never answers."""
        self.tub.reachable = False
        d = self.tub.getReference(self.furl)
        self.clock.advance(0)
        self.failureResultOf(d)
        self.tub.reachable, self.tub.answering = True, False
        d = self.tub.getReference(self.furl)
        self.clock.advance(1000)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)
