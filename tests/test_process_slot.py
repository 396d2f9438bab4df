"""The launcher's `ProcessSlot` lifecycle, on a `task.Clock` with no real
process: every edge of its state table, the restart back-off, and what
`stop()` does in each state."""

from __future__ import annotations

from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from taskfarm import backoff, exitcodes
from taskfarm.cluster.launcher import ProcessSlot, SlotState
from taskfarm.states import InvalidTransition
from taskfarm.testing.helpers import temp_dir


class _FakeTransport:
    """Stands in for a process transport: records the signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list = []
        self.pipes: dict = {}

    def signalProcess(self, signum) -> None:
        self.signals.append(signum)


class _SpawningClock(task.Clock):
    """A `task.Clock` that also 'spawns' processes: it keeps each protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        # No pid: the slot's _Child then signals no process group of ours.
        protocol.transport = _FakeTransport(pid=None)
        self.spawned.append(protocol)
        return protocol.transport


def _exit(child, status: int | None) -> None:
    """End `child`'s process with exit `status` (None: killed by a signal)."""
    if status == 0:
        reason = Failure(error.ProcessDone(0))
    else:
        reason = Failure(error.ProcessTerminated(exitCode=status, signal=None if status else 9))
    child.processExited(reason)
    child.transport = None
    child.processEnded(reason)


class ProcessSlotStateTests(unittest.SynchronousTestCase):
    """`ProcessSlot` follows its state table on a `task.Clock`."""

    def setUp(self):
        self.clock = _SpawningClock()
        self.folder = temp_dir(self, "taskfarm-slot-")

    def slot(self, **options) -> ProcessSlot:
        return ProcessSlot(
            "engine 0", ["python"], self.folder / "engine.out", self.clock, env={}, **options
        )

    def test_start_runs_and_a_death_restarts_after_a_doubling_back_off(self):
        """An exit (0, an error status or a signal) moves RUNNING to
        RESTARTING; the fresh child starts after 1, 2, 4 ... s (0.5 s doubled
        for each quick death), capped at the maximum."""
        slot = self.slot(backoff=(0.5, 3.0))
        self.assertIs(slot.state, SlotState.IDLE)
        slot.start()
        self.assertIs(slot.state, SlotState.RUNNING)
        self.assertEqual(len(self.clock.spawned), 1)
        waits = []
        for status in (0, 1, None, 0):
            _exit(self.clock.spawned[-1], status)
            self.assertIs(slot.state, SlotState.RESTARTING)
            started = len(self.clock.spawned)
            (call,) = [c for c in self.clock.getDelayedCalls() if c.func == slot._restart_now]
            waits.append(call.getTime() - self.clock.seconds())
            self.clock.advance(waits[-1] - 0.01)
            self.assertEqual(len(self.clock.spawned), started)
            self.clock.advance(0.01)
            self.assertIs(slot.state, SlotState.RUNNING)
            self.assertEqual(len(self.clock.spawned), started + 1)
        self.assertEqual(waits, [1.0, 2.0, 3.0, 3.0])
        self.assertEqual(slot.restarts, 4)

    def test_a_long_life_resets_the_back_off(self):
        """A child that lived more than a minute is restarted after the
        first delay again."""
        slot = self.slot(backoff=(0.5, 30.0))
        slot.start()
        _exit(self.clock.spawned[-1], 1)
        self.clock.advance(1.0)
        self.clock.advance(61)
        _exit(self.clock.spawned[-1], 1)
        self.assertIs(slot.state, SlotState.RESTARTING)
        self.clock.advance(0.5)
        self.assertIs(slot.state, SlotState.RUNNING)
        self.assertEqual(len(self.clock.spawned), 3)

    def test_killed_exit_stays_down_and_calls_on_killed(self):
        """`EXIT_KILLED` moves RUNNING to KILLED: no restart, `on_killed` called."""
        slot = self.slot()
        called = []
        slot.on_killed.append(called.append)
        slot.start()
        _exit(self.clock.spawned[-1], exitcodes.EXIT_KILLED)
        self.assertIs(slot.state, SlotState.KILLED)
        self.assertTrue(slot.stopping)
        self.assertEqual(called, [slot])
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_refused_exit_gives_up_with_the_last_words(self):
        """`EXIT_REFUSED` moves RUNNING to REFUSED; `on_refused` gets the
        child's last line of output."""
        slot = self.slot()
        called = []
        slot.on_refused.append(lambda s, words: called.append((s, words)))
        slot.start()
        self.clock.spawned[-1].childDataReceived(1, b"starting\nprofile in use by pid 7\n")
        _exit(self.clock.spawned[-1], exitcodes.EXIT_REFUSED)
        self.assertIs(slot.state, SlotState.REFUSED)
        self.assertEqual(called, [(slot, "profile in use by pid 7")])
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_without_restart_an_exit_is_final(self):
        """With ``restart=False`` any other exit moves RUNNING to EXITED."""
        slot = self.slot(restart=False)
        slot.start()
        _exit(self.clock.spawned[-1], 0)
        self.assertIs(slot.state, SlotState.EXITED)
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_stop_while_running_terms_then_kills_after_the_grace(self):
        """`stop()` moves RUNNING to STOPPING and sends SIGTERM; SIGKILL
        follows after the grace; the child's exit moves it to STOPPED and
        `stop()` returns, with no restart."""
        slot = self.slot()
        slot.start()
        child = self.clock.spawned[-1]
        transport = child.transport
        stopped = defer.Deferred.fromCoroutine(slot.stop(grace=5.0))
        self.assertIs(slot.state, SlotState.STOPPING)
        self.assertEqual(transport.signals, [15])
        self.clock.advance(5.0)
        self.assertEqual(transport.signals, [15, "KILL"])
        self.assertNoResult(stopped)
        _exit(child, None)
        self.successResultOf(stopped)
        self.assertIs(slot.state, SlotState.STOPPED)
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_stop_while_restarting_cancels_the_restart(self):
        """`stop()` in RESTARTING moves to STOPPED at once and no child starts."""
        slot = self.slot()
        slot.start()
        _exit(self.clock.spawned[-1], 1)
        self.successResultOf(defer.Deferred.fromCoroutine(slot.stop()))
        self.assertIs(slot.state, SlotState.STOPPED)
        pending = [c.func for c in self.clock.getDelayedCalls()]
        self.assertNotIn(slot._restart_now, pending)
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_stop_before_start_and_stop_twice(self):
        """`stop()` on an IDLE slot moves to STOPPED; stopping a stopped or
        down slot changes nothing; starting a stopped slot is a bug."""
        slot = self.slot()
        self.successResultOf(defer.Deferred.fromCoroutine(slot.stop()))
        self.assertIs(slot.state, SlotState.STOPPED)
        self.successResultOf(defer.Deferred.fromCoroutine(slot.stop()))
        self.assertIs(slot.state, SlotState.STOPPED)
        self.assertRaises(InvalidTransition, slot.start)
        self.assertEqual(self.clock.spawned, [])
        killed = self.slot()
        killed.start()
        _exit(self.clock.spawned[-1], exitcodes.EXIT_KILLED)
        self.successResultOf(defer.Deferred.fromCoroutine(killed.stop()))
        self.assertIs(killed.state, SlotState.KILLED)

    def test_start_twice_is_a_bug(self):
        """A running slot refuses a second `start()` (it restarts by itself)."""
        slot = self.slot()
        slot.start()
        self.assertRaises(InvalidTransition, slot.start)
        self.assertEqual(len(self.clock.spawned), 1)


class BackoffPolicyTests(unittest.SynchronousTestCase):
    """`taskfarm.backoff.policy`: the one back-off, over Twisted's backoffPolicy."""

    def test_doubles_from_initial_up_to_maximum(self):
        """Attempt n waits initial * factor ** n, at most maximum, no jitter."""
        delay = backoff.policy(0.2, 5.0)
        self.assertEqual([delay(n) for n in range(7)], [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual(backoff.policy(1.0, 10.0, factor=3.0)(2), 9.0)
        self.assertEqual(delay(10_000), 5.0)

    def test_jitter_adds_at_most_a_second(self):
        """With jitter, each delay is the exact one plus [0, 1) s."""
        delay = backoff.policy(0.5, 30.0, jitter=True)
        for n in range(5):
            self.assertTrue(min(0.5 * 2**n, 30.0) <= delay(n) < min(0.5 * 2**n, 30.0) + 1)

    def test_bad_bounds_are_refused(self):
        """A negative initial delay, or one above the maximum, is a ValueError."""
        self.assertRaises(ValueError, backoff.policy, -1.0, 5.0)
        self.assertRaises(ValueError, backoff.policy, 6.0, 5.0)
