"""The blocking client: the same methods as `taskfarm.asyncclient`, returning
values instead of Deferreds.

    from taskfarm import client
    tc = client.TaskClient()          # the default profile's task furl
    taskid = tc.run(client.Task("a = 1", pull="a"))
    print(tc.get_task_result(taskid, block=True).ns.a)

The reactor runs in a daemon thread that starts when the first client is
made.  Each blocking class is generated from its Deferred twin, so the two
cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect

from taskfarm import asyncclient, reactorthread, results
from taskfarm.connection import DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_TIMEOUT
from taskfarm.errors import *  # noqa: F401,F403  (the errors users catch)
from taskfarm.errors import NotAPendingResult
from taskfarm.task import MapTask, Task, TaskResult

__all__ = [
    "TaskClient",
    "MultiEngineClient",
    "Task",
    "MapTask",
    "TaskResult",
    "PendingResult",
]


def _blocking(method_name: str, async_method):
    @functools.wraps(async_method)
    def method(self, *args, **kwargs):
        value = reactorthread.call(getattr(self._async, method_name), *args, **kwargs)
        if isinstance(value, results.PendingResult):
            return PendingResult(value)
        return value

    return method


def blocking_facade(cls):
    """Give `cls` a blocking wrapper of every public method of its
    `async_class` that it does not define itself."""
    for name, member in inspect.getmembers(cls.async_class, inspect.isfunction):
        if not name.startswith("_") and name not in cls.__dict__:
            setattr(cls, name, _blocking(name, member))
    return cls


class _BlockingClient:
    async_class: type

    def __init__(
        self,
        furl_or_file=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ):
        """Connect now to the controller (the default profile if no furl,
        furl file or profile folder is given); fails within
        `connect_timeout` seconds if it does not answer.  After a lost
        connection, calls that are safe to repeat keep trying for
        `reconnect_timeout` seconds."""
        reactor = reactorthread.ensure_running()
        self._async = self.async_class(
            furl_or_file, reactor, connect_timeout, reconnect_timeout=reconnect_timeout
        )
        reactorthread.call(self._async.connect)
        if hasattr(self._async, "confirm"):
            reactorthread.confirm_at_exit(self._async)

    def close(self) -> None:
        """Close this client's connection."""
        reactorthread.call(self._async.disconnect)


@blocking_facade
class TaskClient(_BlockingClient):
    """The load-balanced Task interface, blocking."""

    async_class = asyncclient.TaskClient

    def run(self, task, block: bool = False) -> object:
        """Submit one task; returns its id (with `block`, what
        ``get_task_result(id, block=True)`` returns).

        The task is packed in this thread; while this client holds task
        ids the controller set aside, the id is taken here and the task is
        handed to the reactor without waiting for it (one thread hop
        instead of a round trip).  It leaves at once when nothing else is
        on its way, else with the next batch, always before this client's
        next call.  A task that cannot be sent raises a typed error here.
        """
        if block or reactorthread.in_reactor_thread():
            return reactorthread.call(self._async.run, task, block)
        taken = self._async._run_from_thread(task)
        if isinstance(taken, int):
            return taken
        return reactorthread.call(self._async._run_packed, taken[1])

    def mapper(self, block: bool = True, **task_options) -> asyncclient.TaskMapper:
        """A mapper whose `map` runs function tasks with these options (and,
        with ``block=False``, returns task ids instead of results)."""
        return asyncclient.TaskMapper(self, block, task_options)

    def parallel(self, block: bool = True, **task_options):
        """A decorator: ``f(seq)`` becomes the load-balanced map of `f` over `seq`."""
        return asyncclient.parallel_decorator(self.mapper(block=block, **task_options))


class PendingResult:
    """The future answer of a non-blocking MultiEngine call."""

    def __init__(self, pending: results.PendingResult) -> None:
        self._pending = pending

    @property
    def result_id(self) -> int:
        return self._pending.result_id

    def get_result(self, default=None, block: bool = True):
        """The value (an error is raised); `default` if not ready and not `block`."""
        return reactorthread.call(self._pending.get_result, default, block)

    @property
    def r(self):
        """``get_result(block=True)``."""
        return self.get_result(block=True)

    def add_callback(self, function, *args, **kwargs) -> PendingResult:
        """Apply ``function(result, *args, **kwargs)`` to the result when it arrives."""
        reactorthread.call(self._pending.add_callback, function, *args, **kwargs)
        return self

    def __repr__(self) -> str:
        return repr(self._pending)


@blocking_facade
class MultiEngineClient(_BlockingClient):
    """The MultiEngine interface, blocking: explicit engines."""

    async_class = asyncclient.MultiEngineClient

    @property
    def targets(self):
        """The default targets of every method (``'all'`` at first)."""
        return self._async.targets

    @targets.setter
    def targets(self, value) -> None:
        self._async.targets = value

    @property
    def block(self) -> bool:
        """The default `block` of every method (True at first)."""
        return self._async.block

    @block.setter
    def block(self, value: bool) -> None:
        self._async.block = value

    def barrier(self, pending_results) -> None:
        """Wait until every given `PendingResult` has its answer."""
        unwrapped = []
        for result in pending_results:
            if not isinstance(result, PendingResult):
                raise NotAPendingResult("barrier takes PendingResults, not %r" % (result,))
            unwrapped.append(result._pending)
        reactorthread.call(self._async.barrier, unwrapped)

    def mapper(self, targets=None, block=None, dist: str = "b") -> asyncclient.MultiEngineMapper:
        """An object whose `map` maps over these targets."""
        return asyncclient.MultiEngineMapper(self, targets, block, dist)

    def parallel(self, targets=None, block=None, dist: str = "b"):
        """A decorator: ``f(seq)`` becomes ``map(f, seq)`` over the targets."""
        return asyncclient.parallel_decorator(self.mapper(targets, block, dist))

    def __len__(self) -> int:
        return len(self.get_ids())

    def __getitem__(self, key: str):
        return self.pull(key, block=True)

    def __setitem__(self, key: str, value) -> None:
        self.push({key: value}, block=True)

    def activate(self) -> None:
        """Make this client the one the IPython magics (``%load_ext
        taskfarm.magics``: ``%px``, ``%autopx``, ``%result``) use."""
        global _active
        _active = self


#: The client `activate` chose for the IPython magics, or None.
_active: MultiEngineClient | None = None


def active_client() -> MultiEngineClient | None:
    """The MultiEngine client last `activate`d, or None."""
    return _active
