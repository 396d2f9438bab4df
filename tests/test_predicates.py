"""Where depend predicates run: the `PredicatePool` of child processes, and
the `InProcessEvaluator` fake that Clock tests use in its place.

The same behaviour tests run against both, so the fake answers as the pool
does; the pool's own tests cover what only processes can show (timeouts,
a predicate that kills its process, a child killed from outside, no orphan
when the controller dies).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm import serialization
from taskfarm.controller.predicates import PredicatePool, Verdict
from taskfarm.interfaces import IPredicateEvaluator
from taskfarm.testing import InProcessEvaluator
from taskfarm.testing.helpers import (
    async_test,
    children_of,
    is_alive,
    proc_stat,
    temp_dir,
    wait_until,
)


def _predicates() -> dict:
    """Predicates defined here, so cloudpickle sends them by value."""

    def big(properties):
        return properties.get("RAM", 0) >= 8

    def exits(properties):
        raise SystemExit(3)

    def interrupts(properties):
        raise KeyboardInterrupt

    def missing(properties):
        return properties["no such property"]

    def reads(properties):
        return properties.get("gpu", False) and "cores" in properties and properties["RAM"] > 4

    def chatty(properties):
        print("a predicate that prints " * 100)
        sys.stdout.flush()
        return True

    def meddles(properties):
        properties.clear()
        return True

    def blocks(properties):
        time.sleep(60)
        return True

    def kills(properties):
        os._exit(4)

    return {name: serialization.dumps(f) for name, f in locals().items()}


P = _predicates()


def _blocks_saying_pid(marker: Path, once: bool = False) -> bytes:
    """A predicate that writes its process id to `marker`, then blocks (if
    `once`: only when `marker` did not exist yet; else it says True)."""

    def blocks(properties):
        if once and marker.exists():
            return True
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        marker.with_suffix(".tmp").rename(marker)
        time.sleep(60)

    return serialization.dumps(blocks)


class EvaluatorBehaviour:
    """What every IPredicateEvaluator does; mixed into a TestCase that
    defines `evaluator` and `verdict(key, properties)`."""

    def test_verify(self):
        """It provides IPredicateEvaluator."""
        verifyObject(IPredicateEvaluator, self.evaluator)

    @async_test
    async def test_trace_names_what_was_read(self):
        """A traced call names the properties the predicate read, sorted, even
        when it raised; an untraced one names none."""
        verdict = await self.verdict(P["reads"], {"gpu": True, "cores": 4, "RAM": 2}, True)
        self.assertEqual(verdict, Verdict(False, None, True, ("RAM", "cores", "gpu")))
        verdict = await self.verdict(P["reads"], {"gpu": False, "RAM": 2}, True)
        self.assertEqual(verdict.read, ("gpu",))
        verdict = await self.verdict(P["missing"], {"RAM": 2}, True)
        self.assertEqual(verdict.read, ("no such property",))
        self.assertEqual(verdict.reason, "raised KeyError: 'no such property'")
        self.assertIsNone((await self.verdict(P["big"], {"RAM": 16})).read)

    @async_test
    async def test_true_and_false(self):
        """A predicate's answer is the verdict, with no reason."""
        self.assertEqual(await self.verdict(P["big"], {"RAM": 16}), Verdict(True))
        self.assertEqual(await self.verdict(P["big"], {"RAM": 1}), Verdict(False))

    @async_test
    async def test_raising_counts_as_false(self):
        """Raising anything, SystemExit and KeyboardInterrupt included, is
        False with the reason."""
        self.assertEqual(
            await self.verdict(P["exits"], {}), Verdict(False, "raised SystemExit: 3")
        )
        self.assertEqual(
            await self.verdict(P["interrupts"], {}), Verdict(False, "raised KeyboardInterrupt: ")
        )
        self.assertEqual(
            await self.verdict(P["missing"], {}),
            Verdict(False, "raised KeyError: 'no such property'"),
        )

    @async_test
    async def test_unloadable(self):
        """Bytes that do not unpickle, or unpickle to no function, are not loadable."""
        garbage = await self.verdict(b"garbage", {})
        self.assertEqual((garbage.accepted, garbage.loadable), (False, False))
        self.assertTrue(garbage.reason.startswith("cannot load: UnpicklingError"), garbage.reason)
        self.assertEqual(
            await self.verdict(serialization.dumps(42), {}),
            Verdict(False, "cannot load: the depend is a int, not a function", False),
        )

    @async_test
    async def test_properties_are_a_copy(self):
        """A predicate that changes its properties changes nothing here."""
        properties = {"RAM": 3}
        self.assertEqual(await self.verdict(P["meddles"], properties), Verdict(True))
        self.assertEqual(properties, {"RAM": 3})

    @async_test
    async def test_never_answers_at_once(self):
        """The Deferred never fires synchronously (the scheduler counts on it)."""
        d = self.evaluator.evaluate(P["big"], {"RAM": 16})
        self.assertNoResult(d)
        self.assertEqual(await self.settle(d), Verdict(True))


class InProcessEvaluatorTests(EvaluatorBehaviour, unittest.TestCase):
    """The fake, on a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.evaluator = InProcessEvaluator(self.clock)
        self.evaluator.start()

    async def settle(self, d):
        self.clock.advance(0)
        return self.successResultOf(d)

    async def verdict(self, key, properties, trace=False):
        return await self.settle(self.evaluator.evaluate(key, properties, trace))


class PoolTestCase(unittest.TestCase):
    timeout = 60
    depend_timeout = 1.0

    def setUp(self):
        self.evaluator = PredicatePool(reactor, timeout=self.depend_timeout)
        self.evaluator.start()
        self.addCleanup(self.evaluator.stop)

    async def settle(self, d):
        return await d

    async def verdict(self, key, properties, trace=False):
        return await self.evaluator.evaluate(key, properties, trace)


class PredicatePoolBehaviourTests(EvaluatorBehaviour, PoolTestCase):
    """The real pool of child processes answers as the fake does."""


class PredicatePoolTests(PoolTestCase):
    """What only the process pool can show."""

    @async_test
    async def test_blocking_predicate_times_out(self):
        """A predicate that blocks is False after the timeout; the requests
        sent behind it are answered too, and the pool keeps working."""
        started = reactor.seconds()
        ds = [self.evaluator.evaluate(P["blocks"], {})]
        ds += [self.evaluator.evaluate(P["big"], {"RAM": ram}) for ram in range(20)]
        verdicts = await defer.gatherResults(ds)
        self.assertEqual(verdicts[0], Verdict(False, "timed out after 1 s"))
        self.assertEqual([v.accepted for v in verdicts[1:]], [ram >= 8 for ram in range(20)])
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(await self.verdict(P["big"], {"RAM": 9}), Verdict(True))

    @async_test
    async def test_predicate_that_kills_its_process(self):
        """os._exit in a predicate is False with the reason; the process is
        replaced and the requests behind are answered."""
        ds = [self.evaluator.evaluate(P["kills"], {})]
        ds += [self.evaluator.evaluate(P["big"], {"RAM": 16}) for _ in range(5)]
        verdicts = await defer.gatherResults(ds)
        self.assertEqual(verdicts[0], Verdict(False, "killed its evaluating process (status 4)"))
        self.assertEqual(verdicts[1:], [Verdict(True)] * 5)

    @async_test
    async def test_child_killed_from_outside(self):
        """A child killed while idle or while evaluating is replaced;
        evaluations go on (the one it was running counts as False)."""
        await self.verdict(P["big"], {"RAM": 16})
        for pid in self.evaluator.pids():
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not self.evaluator.pids(), "the pool to see its children die", 10)
        self.assertEqual(await self.verdict(P["big"], {"RAM": 16}), Verdict(True))
        folder = temp_dir(self, "taskfarm-depend-")
        # Killed once while evaluating: the request gets another process.
        marker = folder / "once"
        verdict = self.evaluator.evaluate(_blocks_saying_pid(marker, once=True), {})
        await wait_until(marker.exists, "the predicate to start", 10)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        self.assertEqual(await verdict, Verdict(True))
        # Killed twice: it counts as False, and says why.
        marker = folder / "always"
        blocked = self.evaluator.evaluate(_blocks_saying_pid(marker), {})
        for _ in range(2):
            await wait_until(marker.exists, "the predicate to start", 10)
            pid = int(marker.read_text())
            marker.unlink()
            os.kill(pid, signal.SIGKILL)
        self.assertEqual(await blocked, Verdict(False, "killed its evaluating process (signal 9)"))
        self.assertEqual(await self.verdict(P["big"], {"RAM": 1}), Verdict(False))

    @async_test
    async def test_chatty_predicate_does_not_break_the_protocol(self):
        """A predicate that prints to stdout leaves the replies intact."""
        self.assertEqual(await self.verdict(P["chatty"], {}), Verdict(True))
        self.assertEqual(await self.verdict(P["big"], {"RAM": 8}), Verdict(True))

    @async_test
    async def test_same_sys_path_and_cwd(self):
        """Children import from the controller's sys.path and run in its
        folder: a depend from a module there is found (pickled by name)."""
        folder = temp_dir(self, "taskfarm-depend-")
        (folder / "depend_mod_for_pool.py").write_text(
            "import os\n\ndef here(properties):\n    return os.getcwd()\n"
            "\ndef wants(properties):\n    return properties.get('x') == 1\n"
        )
        sys.path.insert(0, str(folder))
        self.addCleanup(sys.path.remove, str(folder))
        import depend_mod_for_pool

        self.addCleanup(sys.modules.pop, "depend_mod_for_pool", None)
        key = serialization.dumps(depend_mod_for_pool.wants)
        self.assertIn(b"depend_mod_for_pool", key)
        self.assertEqual(await self.verdict(key, {"x": 1}), Verdict(True))

    @async_test
    async def test_stop_does_not_wait_for_a_blocking_predicate(self):
        """stop() ends within a bound even while a predicate blocks; the
        call in flight is answered."""
        blocked = self.evaluator.evaluate(P["blocks"], {})
        await wait_until(lambda: self.evaluator.pids(), "a child", 10)
        pids = {pid: proc_stat(pid)[19] for pid in self.evaluator.pids()}
        started = reactor.seconds()
        await self.evaluator.stop()
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(await blocked, Verdict(False, "the controller is stopping"))
        for pid, start_time in pids.items():
            self.assertFalse(is_alive(pid, start_time))
        self.assertEqual(
            await self.verdict(P["big"], {}), Verdict(False, "the depend evaluator is not running")
        )


class OrphanTests(unittest.TestCase):
    """A controller killed with -9 leaves no evaluating process behind."""

    timeout = 60

    @async_test
    async def test_children_leave_with_their_parent(self):
        """The parent of the pool is killed -9 while a predicate blocks: the
        child exits by itself within a few seconds."""
        script = textwrap.dedent(
            """
            import sys, time
            from twisted.internet import reactor
            from taskfarm import serialization
            from taskfarm.controller.predicates import PredicatePool

            def blocks(properties):
                time.sleep(600)

            pool = PredicatePool(reactor, timeout=600)
            pool.start()
            pool.evaluate(serialization.dumps(blocks), {})
            reactor.callLater(0.5, lambda: print("ready", flush=True))
            reactor.run()
            """
        )
        parent = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ)
        )
        self.addCleanup(parent.wait, 10)
        self.addCleanup(parent.kill)
        self.assertEqual(parent.stdout.readline().strip(), b"ready")
        await wait_until(lambda: children_of(parent.pid), "the evaluating child", 20)
        children = children_of(parent.pid)
        for pid, (started, _) in children.items():
            self.addCleanup(lambda p=pid, s=started: is_alive(p, s) and os.kill(p, signal.SIGKILL))
        parent.kill()
        parent.wait(10)
        await wait_until(
            lambda: not any(is_alive(pid, started) for pid, (started, _) in children.items()),
            "the evaluating child to exit", 10,
        )
