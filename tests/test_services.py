"""The service trees of the controller and the engine: children started and
stopped in a defined order, each stop waited for, and no stop that blocks
the reactor (journal writer and engine worker threads are joined off it).
"""

from __future__ import annotations

import sys
import time

from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm.controller.journal import Journal
from taskfarm.controller.service import ControllerService, create_controller
from taskfarm.engine.namespace import Namespace
from taskfarm.engine.service import EngineService
from taskfarm.engine.worker import CommandWorker
from taskfarm.profile import Profile, lock_profile
from taskfarm.services import OrderedServices, Part
from taskfarm.testing.helpers import async_test, temp_dir, wait_until


class _Recorder:
    """A collaborator with start()/stop() that writes both into `log`; its
    stop returns a Deferred the test fires (`finish_stop`)."""

    def __init__(self, name: str, log: list, async_stop: bool = False) -> None:
        self.name = name
        self._log = log
        self._async_stop = async_stop
        self.stopping: defer.Deferred | None = None

    def start(self) -> None:
        self._log.append("start " + self.name)

    def stop(self):
        self._log.append("stop " + self.name)
        if self._async_stop:
            self.stopping = defer.Deferred()
            return self.stopping
        return None


class _RecordingService(service.Service):
    def __init__(self, log: list) -> None:
        self._log = log
        self.location = "here"

    def startService(self) -> None:
        super().startService()
        self._log.append("start server")

    def stopService(self):
        super().stopService()
        self._log.append("stop server")


class _Lock:
    def __init__(self, log: list) -> None:
        self._log = log

    def record_location(self, location: str) -> None:
        pass  # the profile lock names where the controller listens

    def release(self) -> None:
        self._log.append("release lock")


class ControllerServiceOrderTests(unittest.SynchronousTestCase):
    """`ControllerService` starts its children in `START_ORDER` and stops
    them in reverse, each stop finished before the next begins."""

    def build(self, log: list) -> tuple[ControllerService, dict]:
        parts = {
            "journal": _Recorder("journal", log, async_stop=True),
            "evaluator": _Recorder("evaluator", log, async_stop=True),
            "registry": _Recorder("registry", log),
            "tasks": _Recorder("tasks", log),
        }
        controller = ControllerService(
            Profile(temp_dir(self, "taskfarm-svc-")),
            parts["registry"],
            object(),
            parts["tasks"],
            object(),
            _RecordingService(log),
            journal=parts["journal"],
            evaluator=parts["evaluator"],
        )
        controller.lock = _Lock(log)
        return controller, parts

    def test_children_in_start_order(self):
        """The children are named and ordered as `START_ORDER` says."""
        controller, _ = self.build([])
        self.assertEqual([child.name for child in controller], list(ControllerService.START_ORDER))
        self.assertEqual(
            ControllerService.START_ORDER, ("journal", "evaluator", "registry", "tasks", "server")
        )

    def test_start_in_order_stop_in_reverse_each_waited_for(self):
        """Start: evaluator, registry, tasks, server (the journal is open
        from the start).  Stop: server, tasks, registry, evaluator, journal,
        then the lock; the journal's stop begins only once the evaluator's
        finished, and the controller's stop fires only once all did."""
        log: list = []
        controller, parts = self.build(log)
        controller.startService()
        self.assertEqual(
            log, ["start evaluator", "start registry", "start tasks", "start server"]
        )
        del log[:]
        stopped = controller.stopService()
        self.assertEqual(log, ["stop server", "stop tasks", "stop registry", "stop evaluator"])
        self.assertNoResult(stopped)
        parts["evaluator"].stopping.callback(None)
        self.assertEqual(log[-1], "stop journal")
        self.assertNoResult(stopped)
        parts["journal"].stopping.callback(None)
        self.assertEqual(log[-1], "release lock")
        self.successResultOf(stopped)
        self.assertFalse(controller.running)

    def test_a_failing_stop_does_not_keep_the_others_running(self):
        """A child whose stop fails is logged; the children after it still stop."""
        log: list = []
        controller, parts = self.build(log)
        controller.startService()
        del log[:]
        stopped = controller.stopService()
        parts["evaluator"].stopping.errback(RuntimeError("boom"))
        parts["journal"].stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(log[-2:], ["stop journal", "release lock"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_without_journal_or_evaluator(self):
        """A controller without journal or evaluator has only the other children."""
        controller = ControllerService(
            Profile(temp_dir(self, "taskfarm-svc-")),
            _Recorder("registry", []),
            object(),
            _Recorder("tasks", []),
            object(),
            _RecordingService([]),
        )
        self.assertEqual([child.name for child in controller], ["registry", "tasks", "server"])


class OrderedServicesTests(unittest.SynchronousTestCase):
    """`OrderedServices` and `Part` on their own."""

    def test_a_child_added_while_running_starts_and_stops_last_first(self):
        """A child added to a running tree starts at once and, being last,
        stops first."""
        log: list = []
        tree = OrderedServices()
        first = _Recorder("first", log)
        Part("first", first.start, first.stop).setServiceParent(tree)
        tree.startService()
        second = _Recorder("second", log)
        Part("second", second.start, second.stop).setServiceParent(tree)
        self.successResultOf(tree.stopService())
        self.assertEqual(log, ["start first", "start second", "stop second", "stop first"])


def _slow(commit, seconds: float):
    """`commit` (a journal's `_commit`) that first sleeps in the writer thread."""

    def slow_commit(carried, batches):
        time.sleep(seconds)
        return commit(carried, batches)

    return slow_commit


class _Ticker:
    """Counts the turns of a `LoopingCall` every `interval` seconds."""

    def __init__(self, testcase, interval: float = 0.02) -> None:
        self.ticks = 0
        self._loop = task.LoopingCall(self._tick)
        self._loop.start(interval, now=False)
        testcase.addCleanup(lambda: self._loop.running and self._loop.stop())

    def _tick(self) -> None:
        self.ticks += 1


def _record_stops(tree, log: list) -> None:
    """Make every child of `tree` note its name in `log` when its stop ends."""
    for child in tree:
        stop = child.stopService

        def recorded(stop=stop, name=child.name):
            d = defer.maybeDeferred(stop)
            d.addCallback(lambda result: log.append(name) or result)
            return d

        child.stopService = recorded


class ControllerStopTests(unittest.TestCase):
    """A real controller (real Tub on 127.0.0.1, real journal) stops without
    blocking the reactor, and after its journal wrote everything."""

    timeout = 60

    @async_test
    async def test_stop_with_a_busy_journal_keeps_the_reactor_turning(self):
        """Each journal commit takes 0.4 s (a slow disk); the stop waits for
        the last one, while a LoopingCall every 20 ms keeps ticking, and the
        children stop in the reverse of `START_ORDER`."""
        profile = Profile(temp_dir(self, "taskfarm-svc-") / "profile")
        controller = create_controller(
            profile, reactor, listen="tcp:0:interface=127.0.0.1", heartbeat_period=0.05
        )
        controller.startService()
        stopped_children: list = []
        _record_stops(controller, stopped_children)
        journal = controller.journal
        journal._commit = _slow(journal._commit, 0.4)
        journal.next_id_is(1234)
        # Let the writer take that commit (it is busy for 0.4 s from now).
        await wait_until(lambda: journal._flush_call is None, "the flush to the writer", 5)
        journal.next_id_is(5678)
        ticker = _Ticker(self)
        started = reactor.seconds()
        await controller.stopService()
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, 0.4)
        # A blocked reactor ticks about once (a late LoopingCall skips the
        # turns it missed); a free one every 20 ms, 20 times in 0.4 s.
        self.assertGreaterEqual(ticker.ticks, 5)
        self.assertEqual(stopped_children, list(reversed(ControllerService.START_ORDER)))
        self.assertFalse(controller.running)
        # What was enqueued before the stop is on disk, and the lock is free.
        reader = Journal(profile.journal_file, reactor)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual(reader.next_id(), 5678)
        lock_profile(profile).release()


class _FakeLink(service.Service):
    def __init__(self, log: list) -> None:
        self._log = log

    def startService(self) -> None:
        super().startService()
        self._log.append("start link")

    def stopService(self):
        super().stopService()
        self._log.append("stop link")


class EngineServiceTests(unittest.TestCase):
    """`EngineService`: worker then link; stop link then worker, bounded,
    without blocking the reactor."""

    timeout = 30

    def setUp(self):
        # The engine routes stdout/stderr through its own streams: put the
        # test runner's back afterwards.
        streams = sys.stdout, sys.stderr
        self.addCleanup(lambda: setattr(sys, "stdout", streams[0]) or setattr(sys, "stderr", streams[1]))

    @async_test
    async def test_stop_with_a_running_command_ends_within_a_bound(self):
        """A command stuck in C code (``time.sleep``) ignores the interrupt;
        stopping the engine still ends within the worker's bound (2 s), the
        reactor ticks meanwhile, and the link stops before the worker."""
        log: list = []
        worker = CommandWorker(Namespace(), reactor, on_stuck=lambda: log.append("stuck"))
        engine = EngineService(worker, _FakeLink(log))
        self.assertEqual([child.name for child in engine], list(EngineService.START_ORDER))
        engine.startService()
        self.assertEqual(log, ["start link"])
        stopped_children: list = []
        _record_stops(engine, stopped_children)
        worker.begin_session(0, lambda replies: None)
        worker.receive([(0, "execute", ("started = 1\nimport time\ntime.sleep(8)",))])
        await wait_until(lambda: "started" in worker.namespace.user_ns, "the command to start", 10)
        ticker = _Ticker(self)
        started = reactor.seconds()
        await engine.stopService()
        elapsed = reactor.seconds() - started
        # Bounded by the worker's 2 s, not by the command's 8 s.
        self.assertLess(elapsed, 5.0)
        self.assertGreaterEqual(elapsed, 1.9)
        self.assertGreaterEqual(ticker.ticks, 10)
        self.assertEqual(stopped_children, ["link", "worker"])
        self.assertEqual(log, ["start link", "stop link"])

    @async_test
    async def test_stop_of_an_idle_engine_is_quick(self):
        """With nothing running, the worker thread ends at once."""
        worker = CommandWorker(Namespace(), reactor)
        engine = EngineService(worker, _FakeLink([]))
        engine.startService()
        started = reactor.seconds()
        await engine.stopService()
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertFalse(worker._thread.is_alive())
