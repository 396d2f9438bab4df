"""Small helpers the test suites share: async tests, polling, temporary
folders, processes, MultiEngine errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task

from taskfarm.childprocess import OutputChild  # noqa: F401  (the tests' child, re-exported)
from taskfarm.cluster.slots import process_alive
from taskfarm.errors import CompositeError, RemoteTaskError


def async_test(test):
    """Run an ``async def`` test method under trial (it waits on the Deferred)."""

    def method(self):
        return defer.Deferred.fromCoroutine(test(self))

    method.__name__ = test.__name__
    method.__doc__ = test.__doc__
    return method


def sleep(seconds: float) -> defer.Deferred:
    """A Deferred that fires after `seconds` of the reactor's time."""
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(condition, what: str = "a condition", timeout: float = 60.0,
                     interval: float = 0.05):
    """Poll `condition` (a function, maybe async or returning a Deferred)
    until its value is true; returns that value.  Bounded by `timeout`."""
    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError("timed out after %g s waiting for %s" % (timeout, what))
        await sleep(interval)


def temp_dir(testcase, prefix: str = "taskfarm-test-") -> Path:
    """A fresh folder outside the checkout, removed (with everything in it)
    at `testcase`'s cleanup."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


# -- processes, found through /proc ------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children_of(parent: int) -> dict[int, tuple[str, str]]:
    """{pid: (start time, command line)} of the live children of `parent`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(int(entry))
        if fields is None or fields[0] == "Z" or int(fields[1]) != parent:
            continue
        try:
            cmdline = Path("/proc/%s/cmdline" % entry).read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found[int(entry)] = (fields[19], cmdline.decode(errors="replace"))
    return found


def descendants_of(parent: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `parent`."""
    found: dict[int, str] = {}
    todo = [parent]
    while todo:
        for pid, (started, _) in children_of(todo.pop()).items():
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def is_alive(pid: int, started: str) -> bool:
    """Whether the process `pid` that started at `started` still runs
    (the start time tells a reused pid apart)."""
    return started is not None and process_alive(pid, started)


def clock_controller(testcase, evaluator: bool = False):
    """A real `TaskController` with its registry on a fresh `task.Clock`,
    no timers of its own.  With `evaluator`, depend predicates run in an
    `InProcessEvaluator` on that clock.  Returns (clock, registry, controller)."""
    from taskfarm.controller.registry import EngineRegistry
    from taskfarm.controller.scheduler import FIFOScheduler
    from taskfarm.controller.taskcontroller import TaskController
    from taskfarm.testing.fakes import InProcessEvaluator

    clock = task.Clock()
    registry = EngineRegistry(clock, heartbeat_period=None)
    scheduler_evaluator = None
    if evaluator:
        scheduler_evaluator = InProcessEvaluator(clock)
        scheduler_evaluator.start()
    controller = TaskController(
        registry, FIFOScheduler(evaluator=scheduler_evaluator), clock,
        unmet_timeout=None, retention=None,
    )
    controller.start()
    testcase.addCleanup(controller.stop)
    testcase.addCleanup(registry.stop)
    return clock, registry, controller


def assert_composite(testcase, error, method: str, expected: dict) -> None:
    """`error` is a `CompositeError` holding exactly one error per engine of
    `expected` ({engine_id: exception type or remote exception name}), in
    order, each from `method`."""
    testcase.assertIsInstance(error, CompositeError)
    testcase.assertEqual([e for e, _, _ in error.elist], list(expected))
    for engine_id, m, err in error.elist:
        testcase.assertEqual(m, method)
        kind = expected[engine_id]
        if isinstance(kind, str):
            testcase.assertIsInstance(err, RemoteTaskError)
            testcase.assertEqual(err.ename, kind)
            testcase.assertEqual(err.engine_id, engine_id)
        else:
            testcase.assertIsInstance(err, kind)
