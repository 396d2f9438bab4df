"""Every implementation of taskfarm's interfaces, checked the same way.

`verifyObject` checks each implementer of each interface in
`taskfarm/interfaces.py`, fakes included, and each Referenceable against its
RemoteInterface.  `EngineChannelBehaviour` is the contract of
`IEngineChannel`, run against every channel: the Foolscap one over real
sockets on 127.0.0.1, the same class over the in-process transport
(`taskfarm.testing.local`), and `InProcessChannel`.  The scripted fake is
driven by hand by each test that uses it, so it is only verified.
(`IPredicateEvaluator`'s behaviour mixin is in tests/test_predicates.py.)
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

# Imports gathered here, so that moved modules are repointed in one place.
from taskfarm import serialization
from taskfarm.controller.multiengine import MultiEngine
from taskfarm.controller.predicates import PredicatePool
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler, PriorityScheduler
from taskfarm.engine.link import WorkerCommands
from taskfarm.engine.namespace import Namespace
from taskfarm.errors import EngineLost, TaskAborted, from_wire
from taskfarm.interfaces import IEngineChannel, IEngineSink, IPredicateEvaluator, IScheduler
from taskfarm.remote import schemas
from taskfarm.remote.engine import _EngineReferenceable
from taskfarm.remote.multiengine import RemoteMultiEngine
from taskfarm.remote.server import (
    RemoteEngineChannel,
    RemoteEngineRegistrar,
    RemoteEngineSession,
    RemoteTaskController,
)
from taskfarm.remote.tub import listen_and_locate, new_tub
from taskfarm.testing import InProcessChannel, InProcessEvaluator, ScriptedChannel
from taskfarm.testing.fakes import run_commands
from taskfarm.testing.helpers import clock_controller, wait_until
from taskfarm.testing.local import LocalConnection


class VerifyTests(unittest.SynchronousTestCase):
    """Each implementer provides its whole interface."""

    def test_engine_channels(self):
        """Every IEngineChannel: Foolscap's, in-process and scripted."""
        clock, registry, _ = clock_controller(self)
        verifyObject(IEngineChannel, RemoteEngineChannel(object()))
        verifyObject(IEngineChannel, InProcessChannel(clock))
        verifyObject(IEngineChannel, ScriptedChannel())

    def test_engine_sink(self):
        """The registry is the IEngineSink engines' links deliver to."""
        clock, registry, _ = clock_controller(self)
        verifyObject(IEngineSink, registry)

    def test_schedulers(self):
        """Both schedulers are ISchedulers."""
        verifyObject(IScheduler, FIFOScheduler())
        verifyObject(IScheduler, PriorityScheduler())

    def test_evaluators(self):
        """The process pool and the in-process evaluator (neither started)."""
        clock, _, _ = clock_controller(self)
        verifyObject(IPredicateEvaluator, PredicatePool(clock))
        verifyObject(IPredicateEvaluator, InProcessEvaluator(clock))

    def test_referenceables_serve_their_remote_interfaces(self):
        """Each Referenceable has a ``remote_`` method, taking the declared
        arguments, for every method of its RemoteInterface."""
        clock, registry, controller = clock_controller(self)
        served = [
            (schemas.RITaskController, RemoteTaskController(controller)),
            (schemas.RIMultiEngine, RemoteMultiEngine(MultiEngine(registry, clock))),
            (schemas.RIEngineRegistrar, RemoteEngineRegistrar(registry)),
            (schemas.RIEngineSession, RemoteEngineSession(registry, None, None)),
            (schemas.RIEngine, _EngineReferenceable(None)),
        ]
        for interface, referenceable in served:
            self.assertTrue(interface.providedBy(referenceable))
            for name in interface.names():
                method = getattr(referenceable, "remote_" + name)
                declared = interface[name].argumentNames
                code = method.__code__
                self.assertEqual(
                    list(code.co_varnames[1 : code.co_argcount]), list(declared),
                    "%s.remote_%s" % (type(referenceable).__name__, name),
                )


def channel_test(test):
    """An ``async def`` test of the behaviour mixin: a clock subclass runs it
    to its end at once (`run_test`), the socket subclass waits for it."""

    def method(self):
        return self.run_test(defer.Deferred.fromCoroutine(test(self)))

    method.__name__ = test.__name__
    method.__doc__ = test.__doc__
    return method


class InlineWorker:
    """An engine's worker that runs each command at once on a real
    `Namespace` and replies through its session, as `InProcessChannel`
    does: the engine side of a channel under test."""

    def __init__(self) -> None:
        self.namespace = Namespace()
        self.session = None
        self._aborted: set[int] = set()

    def receive(self, commands: list) -> None:
        replies = run_commands(self.namespace, commands, self._aborted)
        self.session.callRemoteOnly("replies", serialization.pack_message(replies))

    def interrupt(self, seq: int) -> None:
        self._aborted.add(seq)

    def cancel(self, seqs) -> None:
        self._aborted.update(seqs)


class EngineChannelBehaviour:
    """The contract of an `IEngineChannel`, from the controller's side.

    A subclass builds `self.registry` and `connect()`s one engine, returning
    the registry handle (whose `channel` is under test) and the engine's
    `Namespace`; `settle(condition)` lets the channel work until
    `condition()` holds (bounded).
    """

    def replies_into(self, into: list):
        def on_reply(seq, ok, data, started, finished):
            into.append((seq, ok, data))

        return on_reply

    @channel_test
    async def test_verify(self):
        """The channel provides IEngineChannel."""
        engine, _ = await self.connect()
        verifyObject(IEngineChannel, engine.channel)

    @channel_test
    async def test_commands_are_answered_in_order(self):
        """Commands sent reach the engine in order, each answer comes back
        to its own command, and a failure touches only its command."""
        engine, namespace = await self.connect()
        replies: list = []
        engine.send("push", (serialization.dumps({"a": 1, "b": 2}),), self.replies_into(replies))
        engine.send("pull", (("nothere",),), self.replies_into(replies))
        engine.send("pull", (("b", "a"),), self.replies_into(replies))
        await self.settle(lambda: len(replies) == 3)
        self.assertEqual([(seq, ok) for seq, ok, _ in replies], [(0, True), (1, False), (2, True)])
        self.assertIsInstance(from_wire(replies[1][2]), Exception)
        pulled = [serialization.loads(b) for b in serialization.unpack(replies[2][2])]
        self.assertEqual(pulled, [2, 1])
        self.assertEqual(engine.inflight, {})

    @channel_test
    async def test_ping_is_answered(self):
        """ping calls its on_answer once the engine answered."""
        engine, _ = await self.connect()
        answers: list = []
        engine.channel.ping(lambda: answers.append(True))
        await self.settle(lambda: answers)
        self.assertEqual(answers, [True])

    @channel_test
    async def test_properties_reach_the_engine(self):
        """set_properties gives the engine the pickled dict."""
        engine, namespace = await self.connect()
        engine.channel.set_properties(serialization.pack({"gpu": True}))
        await self.settle(lambda: namespace.properties == {"gpu": True})

    @channel_test
    async def test_cancelled_and_interrupted_commands_are_aborted(self):
        """A command cancelled (or interrupted) before it reached the engine
        is answered as aborted; the one beside it runs."""
        engine, _ = await self.connect()
        replies: list = []
        first = engine._next_seq
        engine.channel.cancel([first])
        engine.channel.interrupt(first + 2)
        for _ in range(3):
            engine.send("push", (serialization.dumps({"x": 1}),), self.replies_into(replies))
        await self.settle(lambda: len(replies) == 3)
        self.assertEqual([ok for _, ok, _ in replies], [False, True, False])
        self.assertIsInstance(from_wire(replies[0][2]), TaskAborted)

    @channel_test
    async def test_disconnect_loses_the_engine(self):
        """disconnect makes the registry lose the engine: it leaves the
        registry and its unanswered commands fail with EngineLost."""
        engine, _ = await self.connect()
        replies: list = []
        engine.send("push", (serialization.dumps({"x": 1}),), self.replies_into(replies))
        engine.channel.disconnect()
        await self.settle(lambda: not self.registry.engines and replies)
        ((_, ok, error),) = replies
        self.assertIs(ok, False)
        self.assertIsInstance(from_wire(error), EngineLost)


class _ClockChannelTestCase(unittest.SynchronousTestCase):
    """Channels on a `task.Clock`: no sockets, no sleeps."""

    def setUp(self):
        self.clock, self.registry, _ = clock_controller(self)

    def run_test(self, d: defer.Deferred):
        return self.successResultOf(d)

    async def settle(self, condition) -> None:
        for _ in range(20):
            if condition():
                return
            self.clock.advance(0)
        self.assertTrue(condition(), "the channel did not settle")


class InProcessChannelTests(EngineChannelBehaviour, _ClockChannelTestCase):
    """`InProcessChannel`: commands run at once on a Namespace."""

    async def connect(self):
        channel = InProcessChannel(self.clock)
        channel.engine = self.registry.register(channel, {})
        return channel.engine, channel.namespace


class _Registration:
    """Registers an `InlineWorker` engine through a real `RemoteEngineRegistrar`
    over `registrar` (a reference of either transport)."""

    async def register(self, registrar):
        worker = InlineWorker()
        engine_id, worker.session = await registrar.callRemote(
            "register", _EngineReferenceable(WorkerCommands(worker)), serialization.pack({}), None
        )
        return self.registry.engines[engine_id], worker.namespace


class LocalRemoteChannelTests(EngineChannelBehaviour, _Registration, _ClockChannelTestCase):
    """`RemoteEngineChannel` over the in-process transport."""

    async def connect(self):
        connection = LocalConnection(self.clock)
        registrar = connection.reference(RemoteEngineRegistrar(self.registry))
        d = defer.Deferred.fromCoroutine(self.register(registrar))
        self.clock.advance(0)
        return self.successResultOf(d)


class FoolscapChannelTests(EngineChannelBehaviour, _Registration, unittest.TestCase):
    """`RemoteEngineChannel` over real Foolscap on 127.0.0.1."""

    timeout = 30

    def setUp(self):
        self.registry = EngineRegistry(reactor, heartbeat_period=None)
        self.addCleanup(self.registry.stop)
        self.controller_tub = new_tub()
        listen_and_locate(self.controller_tub, "tcp:0:interface=127.0.0.1", None, reactor)
        self.controller_tub.startService()
        self.addCleanup(self.controller_tub.stopService)
        self.furl = self.controller_tub.registerReference(RemoteEngineRegistrar(self.registry))
        self.engine_tub = new_tub()
        self.engine_tub.startService()
        self.addCleanup(self.engine_tub.stopService)

    def run_test(self, d: defer.Deferred):
        return d

    async def settle(self, condition) -> None:
        await wait_until(condition, "the channel", timeout=10, interval=0.01)

    async def connect(self):
        registrar = await self.engine_tub.getReference(self.furl)
        return await self.register(registrar)
