"""The blocking client: the same methods as `taskfarm.asyncclient`, returning
values instead of Deferreds.

    from taskfarm import client
    tc = client.TaskClient()          # the default profile's task furl
    taskid = tc.run(client.Task("a = 1", pull="a"))
    print(tc.get_task_result(taskid, block=True).ns.a)

    with client.TaskClient(wait_for_controller=True) as tc:
        tc.wait_for_engines(2, timeout=60)
        print(tc.map(abs, [-1, -2], timeout=30))

The reactor runs in a daemon thread that starts when the first client is
made.  Each blocking method is generated from its Deferred twin, so the two
cannot drift apart, with its own signature and docstring (`BLOCKING_DOCS`):
it returns the value, never a Deferred.  Its errors are raised from the
caller's frame, without the reactor thread's frames in the traceback.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from taskfarm import asyncclient, progress, reactorthread, results
from taskfarm.connection import DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_TIMEOUT
from taskfarm.errors import *  # noqa: F401,F403  (the errors users catch)
from taskfarm.errors import NotAPendingResult
from taskfarm.task import MapTask, Task, TaskResult

if TYPE_CHECKING:
    from taskfarm.futures import TaskExecutor

__all__ = [
    "TaskClient",
    "MultiEngineClient",
    "Task",
    "MapTask",
    "TaskResult",
    "PendingResult",
]


#: The blocking methods' return types and docstrings: the Deferred
#: twin's say "fires with" and return Deferreds; these say what the
#: blocking call returns.  A public method missing here keeps its twin's
#: docstring, and tests/test_blocking_api.py fails until it is added.
_VALUE_OR_PENDING = "Any | PendingResult"
BLOCKING_DOCS: dict[str, tuple[str, str]] = {
    # -- both clients
    "connect": ("None", "Connect now (the constructor already did)."),
    "disconnect": ("None", "Close this client's connection (as `close`)."),
    "wait_for_engines": (
        "list[int]",
        "Wait until at least `n` engines are registered; returns their ids.\n\n"
        "Raises `WaitTimeout` after `timeout` seconds (None: no limit).",
    ),
    # -- TaskClient
    "TaskClient.run": (
        "int | TaskResult | Any",
        "Submit one task; returns its id.  With `block`, returns what\n"
        "``get_task_result(id, block=True, timeout=timeout)`` returns: its\n"
        "`TaskResult`, or for a `MapTask` its value (a failure is raised).\n\n"
        "Usually at once: the task leaves with others at the end of the\n"
        "reactor turn, and every later call of this client waits until the\n"
        "controller accepted it.  A task that cannot be sent (it does not\n"
        "pickle, or alone exceeds the controller's message limit) raises here.",
    ),
    "run_many": (
        "list[int]",
        "Submit many tasks at once; returns their ids, in order, once the\n"
        "controller has accepted them.",
    ),
    "confirm": (
        "None",
        "Return once every task submitted so far is accepted by the controller;\n"
        "raises the error of a refused submission.",
    ),
    "get_task_result": (
        "TaskResult | Any | None",
        "The task's `TaskResult`, or None if unfinished and not `block`.\n\n"
        "For a `MapTask`, the function's return value (a failure is raised);\n"
        "with `full`, its whole `TaskResult` (value, failure, stdout, stderr).\n"
        "With `block`, raises `WaitTimeout` after `timeout` seconds (None: no\n"
        "limit); the task goes on and can be asked for again.",
    ),
    "get_task_results": (
        "list",
        "`get_task_result` for many ids, as a list (failures of MapTasks are\n"
        "returned, not raised); `WaitTimeout` after `timeout` seconds.",
    ),
    "barrier": (
        "None",
        "Return once every task in `taskids` (an id or a list) is done;\n"
        "`WaitTimeout` after `timeout` seconds (None: no limit).",
    ),
    "TaskClient.map": (
        "list",
        "Load-balanced ``[function(*args, **kwargs) for args in zip(*sequences)]``.\n\n"
        "One `MapTask` per element; keywords that name task options (retries,\n"
        "depend, ...) are the options of every task, the others go to every\n"
        "call.  Returns the results in order, or raises the first task's\n"
        "failure.  `timeout` bounds the whole map (`WaitTimeout`, and the\n"
        "unfinished tasks are aborted); `task_timeout` is each task's run\n"
        "limit.  With no engine registered it warns once (`NoEnginesWarning`).",
    ),
    "TaskClient.abort": ("None", "Abort a queued or running task; its result becomes `TaskAborted`."),
    "TaskClient.queue_status": ("dict", "Task counts per state (id lists if `verbose`)."),
    "TaskClient.clear": ("int", "Forget finished tasks (all, or the listed ids); returns how many."),
    "TaskClient.why": (
        "wire.Explanation",
        "Why the task is where it is: for a queued task one reason per engine\n"
        "(busy, `depend` false or raised, failure penalty, retry delay), and\n"
        "whether no engine can ever match; `str()` of it reads as text.",
    ),
    "TaskClient.status": (
        "wire.ClusterSummary",
        "The cluster summary the dashboard shows: engines, queue counts,\n"
        "tasks/s and failures/s, totals.",
    ),
    "spin": ("None", "Ask the controller for a scheduling pass (rarely needed)."),
    "engine_ids": ("list[int]", "The ids of the registered engines."),
    # -- MultiEngineClient (`block=False` returns a PendingResult)
    "execute": (
        _VALUE_OR_PENDING,
        "Run code on each target; returns one result dict (input, stdout,\n"
        "stderr) per target, or a `PendingResult` when not `block`.\n"
        "`WaitTimeout` after `timeout` seconds.",
    ),
    "push": (_VALUE_OR_PENDING, "Put the names and values of `namespace` on each target."),
    "push_function": (_VALUE_OR_PENDING, "`push` (functions pickle as values)."),
    "pull": (
        _VALUE_OR_PENDING,
        "One value per target for a str key; a list of values for a list of keys.",
    ),
    "pull_function": (_VALUE_OR_PENDING, "`pull` (functions unpickle as values)."),
    "zip_pull": (_VALUE_OR_PENDING, "`pull` of several keys, transposed: one tuple per key."),
    "get_result": (
        _VALUE_OR_PENDING,
        "The result dict of execute number `i` (the last if None) on each target.",
    ),
    "reset": (_VALUE_OR_PENDING, "Give each target an empty namespace."),
    "keys": (_VALUE_OR_PENDING, "The user names on each target."),
    "kill": (
        _VALUE_OR_PENDING,
        "Stop the target engines (and, if `controller`, the controller after them).",
    ),
    "scatter": (
        _VALUE_OR_PENDING,
        "Split `seq` into contiguous blocks, one per target, stored as `key`.",
    ),
    "gather": (_VALUE_OR_PENDING, "Pull `key` from each target and join the blocks."),
    "get_properties": (
        _VALUE_OR_PENDING,
        "Each target's properties (all, one key's value, or a dict of `keys`).",
    ),
    "set_properties": (
        _VALUE_OR_PENDING,
        "Update each target's properties; the scheduler sees them at once.",
    ),
    "has_properties": (
        _VALUE_OR_PENDING,
        "Per target: whether it has `keys` (a bool, or a list of bools).",
    ),
    "del_properties": (_VALUE_OR_PENDING, "Remove `keys` from each target's properties."),
    "clear_properties": (
        _VALUE_OR_PENDING,
        "Remove every property but the machine facts the engine reported.",
    ),
    "MultiEngineClient.interrupt": (
        _VALUE_OR_PENDING,
        "Interrupt the MultiEngine command each target is running now (never\n"
        "queued behind it); per target, the op interrupted or None.",
    ),
    "MultiEngineClient.abort": (
        _VALUE_OR_PENDING,
        "`clear_queue`, then `interrupt`: queued commands fail with\n"
        "`QueueCleared`, the running one is interrupted.",
    ),
    "get_ids": ("list[int]", "The ids of the registered engines."),
    "MultiEngineClient.run": (_VALUE_OR_PENDING, "Read a Python file here and execute it on each target."),
    "MultiEngineClient.map": (
        _VALUE_OR_PENDING,
        "``[function(*args, **kwargs) for args in zip(*sequences)]`` in contiguous\n"
        "blocks over the targets (direct, not load-balanced).",
    ),
    "MultiEngineClient.queue_status": (
        _VALUE_OR_PENDING,
        "Per target: the command running (`pending`) and those queued.",
    ),
    "clear_queue": (
        _VALUE_OR_PENDING,
        "Drop the queued MultiEngine commands of the targets (they fail with\n"
        "`QueueCleared`); returns one None per target.",
    ),
    "flush": ("None", "Drop every non-blocking result not fetched yet."),
    "clear_pending_results": ("None", "Drop every non-blocking result not fetched yet."),
    "get_pending_deferred": (
        "Any",
        "The result of the non-blocking call that gave `deferred_id` (a client\n"
        "with deferred ids); `WaitTimeout` after `timeout` seconds, and the id\n"
        "can be asked for again.",
    ),
    "clear_pending_deferreds": ("None", "Drop every result of a deferred id not yet taken."),
}
_MULTIENGINE_TAIL = (
    "\n\n`targets` and `block` default to the client's attributes; when not\n"
    "`block`, returns a `PendingResult` at once.  `WaitTimeout` after\n"
    "`timeout` seconds (None: no limit)."
)


def _outcome(function, *args, _call=reactorthread.call, **kwargs) -> tuple[bool, object]:
    """Run `function` in the reactor thread: (True, value) or (False, error)."""
    try:
        return True, _call(function, *args, **kwargs)
    except Exception as e:
        return False, e


#: Waits that Ctrl-C gives up (the Deferred is cancelled): a barrier, and a
#: map showing a progress bar (so that the bar stops too).
_INTERRUPTIBLE = {
    "barrier": lambda kwargs: True,
    "map": lambda kwargs: progress.wanted(kwargs.get("progress")),
}


def _trimmed(error: BaseException) -> BaseException:
    """`error` without the reactor thread's frames: raised from the caller's
    frame, its traceback starts at taskfarm's public method.  With
    ``TASKFARM_FULL_TRACEBACKS=1`` in the environment (for a bug report)
    the frames are kept."""
    if os.environ.get("TASKFARM_FULL_TRACEBACKS") == "1":
        return error
    return error.with_traceback(None)


def _blocking(cls_name: str, method_name: str, async_method):
    interruptible = _INTERRUPTIBLE.get(method_name, lambda kwargs: False)

    def method(self, *args, **kwargs):
        call = reactorthread.call_interruptible if interruptible(kwargs) else reactorthread.call
        ok, value = _outcome(getattr(self._async, method_name), *args, _call=call, **kwargs)
        if not ok:
            raise _trimmed(value)
        if isinstance(value, results.PendingResult):
            return PendingResult(value)
        return value

    # The name a traceback shows is the public method's.
    method.__code__ = method.__code__.replace(
        co_name=method_name, co_qualname="%s.%s" % (cls_name, method_name)
    )
    method.__name__ = method_name
    method.__qualname__ = "%s.%s" % (cls_name, method_name)
    method.__module__ = __name__
    returns, doc = BLOCKING_DOCS.get(
        "%s.%s" % (cls_name, method_name),
        BLOCKING_DOCS.get(method_name, ("Any", async_method.__doc__ or "")),
    )
    signature = inspect.signature(async_method)
    if "block" in signature.parameters and "targets" in signature.parameters:
        doc += _MULTIENGINE_TAIL
    method.__signature__ = signature.replace(return_annotation=returns)
    method.__doc__ = doc
    method.__wrapped_async__ = async_method
    return method


def blocking_facade(cls):
    """Give `cls` a blocking wrapper of every public method of its
    `async_class` that it does not define itself, with its own signature
    (a return type, never a Deferred) and docstring."""
    for name, member in inspect.getmembers(cls.async_class, inspect.isfunction):
        defined = any(name in klass.__dict__ for klass in cls.__mro__ if klass is not object)
        if not name.startswith("_") and not defined:
            setattr(cls, name, _blocking(cls.__name__, name, member))
    return cls


class _BlockingClient:
    async_class: type

    def __init__(
        self,
        furl_or_file=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        wait_for_controller: bool = False,
    ) -> None:
        """Connect now to the controller (the default profile if no furl,
        furl file or profile folder is given); fails within
        `connect_timeout` seconds if it does not answer.  With
        `wait_for_controller`, a controller still starting (no furl file
        yet, or not answering) is waited for, up to `connect_timeout`
        seconds, then `ControllerUnreachable`.  After a lost connection,
        calls that are safe to repeat keep trying for `reconnect_timeout`
        seconds.  Use it as ``with TaskClient() as tc:`` to close it on exit.
        """
        reactor = reactorthread.ensure_running()
        ok, value = _outcome(
            self.async_class, furl_or_file, reactor, connect_timeout,
            reconnect_timeout=reconnect_timeout, wait_for_controller=wait_for_controller,
        )
        if not ok:
            raise _trimmed(value)
        self._async = value
        ok, value = _outcome(self._async.connect)
        if not ok:
            raise _trimmed(value)
        if hasattr(self._async, "confirm"):
            reactorthread.confirm_at_exit(self._async)

    def close(self) -> None:
        """End this client's use of its connection.

        Its own calls still waiting (in other threads) raise `ClientClosed`;
        other clients of this process, which may share the connection, are
        not touched.  A `TaskClient` first waits until its submitted tasks
        are accepted.  A later call connects again."""
        ok, value = _outcome(self._async.close)
        if not ok:
            raise _trimmed(value)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # An error is already on its way: closing must not hide it.
        _outcome(self._async.close)


@blocking_facade
class TaskClient(_BlockingClient):
    """The load-balanced Task interface, blocking."""

    async_class = asyncclient.TaskClient

    def run(self, task, block: bool = False, timeout: float | None = None) -> int | TaskResult | Any:
        """Submit one task; returns its id.  With `block`, returns what
        ``get_task_result(id, block=True, timeout=timeout)`` returns: its
        `TaskResult`, or for a `MapTask` its value (a failure is raised).

        The task is packed in this thread; while this client holds task
        ids the controller set aside, the id is taken here and the task is
        handed to the reactor without waiting for it (one thread hop
        instead of a round trip).  It leaves at once when nothing else is
        on its way, else with the next batch, always before this client's
        next call.  A task that cannot be sent raises a typed error here.
        """
        if block or reactorthread.in_reactor_thread():
            ok, value = _outcome(self._async.run, task, block, timeout)
        else:
            try:
                taken = self._async._run_from_thread(task)
            except Exception as e:
                raise _trimmed(e) from None
            if isinstance(taken, int):
                return taken
            ok, value = _outcome(self._async._run_packed, taken[1])
        if not ok:
            raise _trimmed(value)
        return value

    def mapper(self, block: bool = True, **task_options) -> asyncclient.TaskMapper:
        """A mapper whose `map` runs function tasks with these options (and,
        with ``block=False``, returns task ids instead of results)."""
        return asyncclient.TaskMapper(self, block, task_options)

    def parallel(self, block: bool = True, **task_options) -> Callable[[Callable], Callable]:
        """A decorator: ``f(seq)`` becomes the load-balanced map of `f` over `seq`."""
        return asyncclient.parallel_decorator(self.mapper(block=block, **task_options))

    def executor(self, clear: bool = True, **task_options) -> TaskExecutor:
        """A `concurrent.futures.Executor` whose calls are function tasks
        with these options (see `taskfarm.futures.TaskExecutor`)."""
        from taskfarm.futures import TaskExecutor

        return TaskExecutor(self, clear=clear, **task_options)

    def as_completed(self, taskids, timeout: float | None = None) -> Iterator[TaskResult]:
        """Yield the `TaskResult` of each distinct task in `taskids` as it
        finishes (a MapTask's value is its `.value`, its failure
        `.failure`); `WaitTimeout` if some are unfinished `timeout` seconds
        after the first ``next()``.  One watcher asks about them in batches."""
        from taskfarm.futures import as_completed

        return as_completed(self, taskids, timeout)


class PendingResult:
    """The future answer of a non-blocking MultiEngine call."""

    def __init__(self, pending: results.PendingResult) -> None:
        self._pending = pending

    @property
    def result_id(self) -> int:
        return self._pending.result_id

    def get_result(self, default=None, block: bool = True, timeout: float | None = None) -> Any:
        """The value (an error is raised); `default` if not ready and not
        `block`.  With `block`, `WaitTimeout` after `timeout` seconds (None:
        no limit), and the result can still be fetched later."""
        ok, value = _outcome(self._pending.get_result, default, block, timeout)
        if not ok:
            raise _trimmed(value)
        return value

    @property
    def r(self):
        """``get_result(block=True)``."""
        return self.get_result(block=True)

    def add_callback(self, function, *args, **kwargs) -> PendingResult:
        """Apply ``function(result, *args, **kwargs)`` to the result when it arrives."""
        ok, value = _outcome(self._pending.add_callback, function, *args, **kwargs)
        if not ok:
            raise _trimmed(value)
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

    def barrier(self, pending_results, timeout: float | None = None) -> None:
        """Wait until every given `PendingResult` has its answer;
        `WaitTimeout` after `timeout` seconds (None: no limit)."""
        unwrapped = []
        for result in pending_results:
            if not isinstance(result, PendingResult):
                raise NotAPendingResult("barrier takes PendingResults, not %r" % (result,))
            unwrapped.append(result._pending)
        ok, value = _outcome(self._async.barrier, unwrapped, timeout)
        if not ok:
            raise _trimmed(value)

    def mapper(self, targets=None, block=None, dist: str = "b") -> asyncclient.MultiEngineMapper:
        """An object whose `map` maps over these targets."""
        return asyncclient.MultiEngineMapper(self, targets, block, dist)

    def parallel(self, targets=None, block=None, dist: str = "b") -> Callable[[Callable], Callable]:
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
