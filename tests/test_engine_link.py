"""An engine's `EngineLink` on a `task.Clock`: registering, back-off,
losing the controller and coming back with the same id and properties.

The controller side is real (`LocalGrid`: `RemoteEngineRegistrar`, the
registry, the sessions), reached through the in-process transport; the
worker is a `RecordingWorker`.  No sockets, no sleeps.  The real-process
counterparts stay in tests/test_chaos.py.
"""

from __future__ import annotations

from twisted.trial import unittest

# Imports gathered here, so that moved modules are repointed in one place.
from taskfarm import serialization
from taskfarm.engine.link import EngineLink
from taskfarm.errors import EngineLost, from_wire
from taskfarm.profile import ENGINE, TASK
from taskfarm.testing.fakes import RecordingWorker
from taskfarm.testing.grid import LocalGrid


def run_for(clock, seconds: float) -> None:
    """Advance `clock` by `seconds`, stopping at each delayed call on the
    way, so that every timer fires at its own time, not a step later."""
    end = clock.seconds() + seconds
    for _ in range(100_000):
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
        if not due:
            break
        clock.advance(max(min(due) - clock.seconds(), 0.0))
    clock.advance(max(end - clock.seconds(), 0.0))


class EngineLinkTestCase(unittest.SynchronousTestCase):
    retry_delays = (0.2, 5.0)
    #: The registry's heartbeat (period, timeout); None: off.
    heartbeat = None

    def setUp(self):
        self.grid = LocalGrid(heartbeat=self.heartbeat)
        self.addCleanup(self.grid.stop)
        self.clock = self.grid.clock
        self.tub = self.grid.tub
        self.furl = self.grid.furls[ENGINE]
        self.worker = RecordingWorker()
        self.registered: list[int] = []
        self.attempts: list[float] = []
        self.link = EngineLink(
            self.read_furl, self.worker, self.clock, self.retry_delays, tub=self.tub
        )
        self.link.on_registered.append(self.registered.append)

    def read_furl(self) -> str:
        self.attempts.append(self.clock.seconds())
        return self.furl

    def start(self) -> None:
        self.link.startService()
        self.addCleanup(self.stop)
        self.turns()

    def stop(self) -> None:
        if self.link.running:
            d = self.link.stopService()
            self.clock.advance(0)
            self.successResultOf(d)

    def turns(self, n: int = 3) -> None:
        for _ in range(n):
            self.clock.advance(0)

    def gaps(self) -> list[float]:
        return [round(b - a, 6) for a, b in zip(self.attempts, self.attempts[1:], strict=False)]

    def run_for(self, seconds: float) -> None:
        """Let `seconds` pass, stopping at each timer on the way (exactly)."""
        run_for(self.clock, seconds)


class RegisterTests(EngineLinkTestCase):
    """The link registers through the real registrar."""

    def test_registers_and_begins_a_session(self):
        """On start the engine registers, gets id 0, and its worker begins a
        session; the registry holds it."""
        self.start()
        self.assertEqual(self.registered, [0])
        self.assertEqual(self.link.engine_id, 0)
        self.assertEqual(self.worker.sessions, [0])
        self.assertEqual(list(self.grid.registry.engines), [0])

    def test_commands_and_replies_travel(self):
        """A command the controller sends reaches the worker; the worker's
        reply through its session reaches the command's caller."""
        self.start()
        handle = self.grid.registry.engines[0]
        replies = []
        handle.send("keys", (), lambda *reply: replies.append(reply))
        self.turns()
        self.assertEqual(self.worker.received, [(0, "keys", ())])
        self.worker.reply([(0, True, serialization.pack(["a"]), 1.0, 2.0)])
        self.turns()
        self.assertEqual(replies, [(0, True, serialization.pack(["a"]), 1.0, 2.0)])

    def test_wrong_furl_is_retried(self):
        """A furl that leads to another interface does not register; the
        link keeps trying (the furl file is read again each time)."""
        self.furl = self.grid.furls[TASK]
        self.start()
        self.run_for(1.0)
        self.assertEqual(self.registered, [])
        self.assertGreater(len(self.attempts), 2)
        self.furl = self.grid.furls[ENGINE]
        self.run_for(5.0)
        self.assertEqual(self.registered, [0])


class BackOffTests(EngineLinkTestCase):
    """Failed attempts back off from the first delay, doubling to the cap."""

    def test_unreachable_controller_backs_off(self):
        """Refused attempts come 0.2, 0.4, 0.8, 1.6, 3.2 s apart, then every
        5 s; once the controller is back the engine registers."""
        self.tub.reachable = False
        self.start()
        self.run_for(40.0)
        gaps = self.gaps()
        self.assertEqual(gaps[:5], [0.2, 0.4, 0.8, 1.6, 3.2])
        self.assertTrue(gaps[5:] and set(gaps[5:]) == {5.0}, gaps)
        self.assertEqual(self.registered, [])
        self.tub.reachable = True
        self.run_for(5.1)
        self.assertEqual(self.registered, [0])

    def test_silent_controller_times_out_each_attempt(self):
        """A controller that never answers: each attempt gives up after 10 s,
        then waits its back-off delay."""
        self.tub.answering = False
        self.start()
        self.run_for(25.0)
        self.assertEqual(self.gaps()[:2], [10.2, 10.4])

    def test_delay_starts_again_after_a_registration(self):
        """After a registration, a later loss retries after the first delay
        again, not the last one."""
        self.tub.reachable = False
        self.start()
        self.run_for(10.0)
        self.tub.reachable = True
        self.run_for(5.1)
        self.assertEqual(self.registered, [0])
        self.attempts.clear()
        self.tub.connection.disconnect()
        self.clock.advance(0)
        self.run_for(0.3)
        self.assertEqual(self.registered, [0, 0])
        self.assertEqual(len(self.attempts), 1)


class ReconnectionTests(EngineLinkTestCase):
    """A lost controller ends the session; the engine comes back as itself."""

    def test_lost_link_ends_the_session_and_registers_again(self):
        """The link breaks: the worker's session ends, the controller answers
        the engine's unanswered command with EngineLost, and 0.2 s later the
        engine registers again with the same id and its latest properties."""
        self.start()
        handle = self.grid.registry.engines[0]
        replies = []
        handle.send("keys", (), lambda *reply: replies.append(reply))
        self.grid.multiengine.properties("set", 0, {"colour": "blue"})
        self.turns()
        self.assertEqual(self.worker.namespace.properties, {"colour": "blue"})
        self.grid.add_engine()  # takes id 1; id 0 stays the link's to ask for
        self.tub.connection.disconnect()
        self.turns()
        self.assertEqual(self.worker.ended, 1)
        self.assertIsInstance(from_wire(replies[0][2]), EngineLost)
        self.assertNotIn(0, self.grid.registry.engines)
        self.clock.advance(0.2)
        self.turns()
        self.assertEqual(self.registered, [0, 0])
        self.assertEqual(self.link.registrations, 2)
        self.assertEqual(self.grid.registry.engines[0].properties, {"colour": "blue"})

    def test_restarted_controller_is_found_again(self):
        """A controller that restarts (new state, same furl): the engine
        registers with the new one."""
        self.start()
        self.grid.restart()
        self.turns()
        self.clock.advance(0.2)
        self.turns()
        self.assertEqual(self.registered, [0, 0])
        self.assertEqual(list(self.grid.registry.engines), [0])

    def test_stop_ends_everything(self):
        """stopService ends the session and the link tries nothing more."""
        self.start()
        self.stop()
        self.assertEqual(self.worker.ended, 1)
        attempts = len(self.attempts)
        self.run_for(30.0)
        self.assertEqual(len(self.attempts), attempts)
        self.assertFalse(self.clock.getDelayedCalls())


class HeartbeatTests(EngineLinkTestCase):
    """The controller's heartbeat over the transport: pings travel as calls,
    a silent engine is dropped, and its link comes back."""

    heartbeat = (1.0, 10.0)

    def test_answering_engine_is_kept(self):
        """An engine whose pings are answered stays registered, however
        long; each beat is one ping call on its connection."""
        self.start()
        self.run_for(60.0)
        self.assertEqual(list(self.grid.registry.engines), [0])
        self.assertEqual(self.registered, [0])
        pings = [m for m, _ in self.tub.connection.calls if m == "ping"]
        self.assertEqual(len(pings), 60)

    def test_hung_engine_is_dropped_and_comes_back(self):
        """A connection that hangs (a stopped engine, a partition): once the
        engine was silent for more than the timeout the controller drops it
        and breaks the connection, its command fails with EngineLost, and
        the engine's link registers again as the same engine."""
        self.start()
        handle = self.grid.registry.engines[0]
        replies = []
        handle.send("keys", (), lambda *reply: replies.append(reply))
        self.turns()
        connection = self.tub.connection
        connection.hang()
        self.run_for(10.0)
        self.assertEqual(list(self.grid.registry.engines), [0])
        self.run_for(1.0)
        self.assertNotIn(handle, self.grid.registry.engines.values())
        self.assertIsInstance(from_wire(replies[0][2]), EngineLost)
        self.assertEqual(connection.state.value, "broken")
        self.run_for(0.5)
        self.assertEqual(self.registered, [0, 0])
        self.assertIsNot(self.grid.registry.engines[0], handle)

    def test_slow_but_alive_engine_is_kept(self):
        """Answers that come late, but within the timeout, keep the engine."""
        self.start()
        for _ in range(6):
            self.tub.connection.hang()
            self.run_for(8.0)
            self.tub.connection.release()
            self.run_for(1.0)
        self.assertEqual(self.registered, [0])
        self.assertEqual(list(self.grid.registry.engines), [0])
