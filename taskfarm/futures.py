"""`concurrent.futures` over the Task interface: `TaskExecutor` (what
``tc.executor()`` returns) and the blocking ``tc.as_completed``.

    with tc.executor(retries=1) as ex:
        future = ex.submit(pow, 2, 10)
        squares = list(ex.map(lambda v: v * v, range(100), chunksize=10))
    future.result()                      # 1024

Each call is one `MapTask` (a map with ``chunksize=n`` sends n calls per
task).  The futures are `concurrent.futures.Future`s, so
`concurrent.futures.wait` and `as_completed` take them.  One `Watcher` per
executor, in the reactor thread, learns which tasks finished in batches;
an executor thread of its own unpickles each result and resolves its
future, so done-callbacks never run in the reactor thread (they may make
blocking calls).  A future stays pending until its task is final
(``running()`` is not reported), so ``cancel()`` succeeds until then, and
aborts the task.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

from twisted.logger import Logger

from taskfarm import reactorthread
from taskfarm.errors import WaitTimeout
from taskfarm.task import MapTask, result_from_envelope
from taskfarm.taskclient import TASK_OPTIONS, _check_id, map_tasks
from taskfarm.watch import Watcher

_log = Logger()

#: What tells an executor's thread to end.
_END = object()


class TaskFuture(concurrent.futures.Future):
    """The future of one function task; `taskid` is its task's id.
    ``cancel()`` aborts the task (``tc.abort``) if it is not final yet."""

    def __init__(self, executor: TaskExecutor, taskid: int) -> None:
        super().__init__()
        self.taskid = taskid
        self._executor = executor

    def cancel(self) -> bool:
        """Cancel the future and abort its task; False once the task is final."""
        with self._condition:
            was_cancelled = self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED")
        if not super().cancel():
            return False
        if not was_cancelled:
            self._executor._abort(self)
        return True


class TaskExecutor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` running each call as a function task
    of the blocking `TaskClient` `client`, with `task_options` (retries,
    depend, timeout ...).  With `clear`, results are cleared on the
    controller once their future has them."""

    def __init__(self, client, clear: bool = True, **task_options) -> None:
        unknown = sorted(set(task_options) - TASK_OPTIONS)
        if unknown:
            raise TypeError(
                "unknown task option%s %s (the options are %s)"
                % ("s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(sorted(TASK_OPTIONS)))
            )
        self._client = client
        self._async = client._async
        self._options = task_options
        self._lock = threading.Lock()
        self._futures: dict[int, TaskFuture] = {}
        self._shutdown = False
        self._finished = False
        self._deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self._watcher = Watcher(self._async, self._deliveries.put, self._deliveries.put, clear=clear)
        self._thread = threading.Thread(target=self._resolve, name="taskfarm-futures", daemon=True)
        self._thread.start()

    # -- concurrent.futures.Executor --------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> TaskFuture:
        """``fn(*args, **kwargs)`` as a task; its future."""
        if not callable(fn):
            raise TypeError("submit needs a callable, not %s" % type(fn).__name__)
        (future,) = self._submit([MapTask(fn, args, kwargs, **self._options)])
        return future

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1):
        """``map(fn, *iterables)`` as tasks, submitted at once (`chunksize`
        calls per task); an iterator of the results in order.  It raises
        the first failure, and `TimeoutError` if a result is not there
        `timeout` seconds after this call; the unread futures are cancelled
        then (and when the iterator is closed early)."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be an int >= 1, not %r" % (chunksize,))
        end = None if timeout is None else time.monotonic() + timeout
        # As the built-in map: the shortest iterable ends it.
        arguments = list(zip(*iterables, strict=False))
        if chunksize == 1:
            tasks = map_tasks(fn, arguments, self._options) if arguments else []
        else:
            chunks = [(fn, arguments[i : i + chunksize]) for i in range(0, len(arguments), chunksize)]
            tasks = map_tasks(_run_chunk, chunks, self._options) if chunks else []
        futures = self._submit(tasks)
        return _results_in_order(futures, end, chunked=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; with `cancel_futures`, cancel (abort) every
        unfinished one; with `wait`, return once every future is done.
        The watcher ends when the last future is resolved."""
        with self._lock:
            self._shutdown = True
            outstanding = list(self._futures.values())
        if cancel_futures:
            for future in outstanding:
                future.cancel()
        if wait:
            concurrent.futures.wait(outstanding)
        self._deliveries.put(_END if wait else None)
        if wait:
            self._thread.join(30)

    # -- inside -----------------------------------------------------------------------

    def _submit(self, tasks: list) -> list[TaskFuture]:
        # Under the lock: a `shutdown` meanwhile waits for these futures.
        # (The reactor thread never takes it, so the calls cannot deadlock.)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not tasks:
                return []
            if len(tasks) == 1:
                ids = [reactorthread.call(self._async.run, tasks[0])]
            else:
                ids = reactorthread.call(self._async.run_many, tasks)
            futures = [TaskFuture(self, taskid) for taskid in ids]
            self._futures.update((f.taskid, f) for f in futures)
        # After the futures are known: a result cannot come before its
        # future.  Not waited for (one thread hop per submit, not two).
        _in_reactor(lambda: self._watcher.add(ids))
        return futures

    def _abort(self, future: TaskFuture) -> None:
        with self._lock:
            self._futures.pop(future.taskid, None)
        # What a pool does when its worker takes a cancelled future: until
        # then `concurrent.futures.wait` counts it as not done.
        future.set_running_or_notify_cancel()
        self._deliveries.put(None)  # an empty shut-down executor may end now

        def abort() -> None:
            d = self._async.abort(future.taskid)
            # A task that finished meanwhile cannot be aborted: nothing to do.
            d.addErrback(lambda f: _log.debug("abort of task {taskid}: {f.value}", taskid=future.taskid, f=f))

        _in_reactor(abort)

    def _resolve(self) -> None:
        """The executor's thread: unpickle each delivered result and settle
        its future; end once shut down with no future left."""
        while True:
            item = self._deliveries.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                self._fail_all(item)
            elif item is not None:
                self._settle(item)
            with self._lock:
                if self._shutdown and not self._futures:
                    break
        self._finished = True
        _in_reactor(self._watcher.stop)

    def _settle(self, envelope) -> None:
        with self._lock:
            future = self._futures.pop(envelope.taskid, None)
        if future is None or not future.set_running_or_notify_cancel():
            return
        try:
            result = result_from_envelope(envelope)
        except Exception as e:
            future.set_exception(e)
            return
        if result.failure is not None:
            future.set_exception(result.failure)
        else:
            future.set_result(result.value)

    def _fail_all(self, error: BaseException) -> None:
        """The controller could not be asked: every unfinished future fails."""
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)


def _run_chunk(fn, chunk: list) -> list:
    """One chunked map task's work, on the engine."""
    return [fn(*args) for args in chunk]


def _results_in_order(futures: list, end: float | None, chunked: bool):
    try:
        for i, future in enumerate(futures):
            value = future.result(None if end is None else max(0.0, end - time.monotonic()))
            futures[i] = None  # the iterator holds no result it gave out
            if chunked:
                yield from value
            else:
                yield value
    finally:
        for future in futures:
            if future is not None:
                future.cancel()


def as_completed(client, taskids, timeout: float | None = None):
    """The blocking ``tc.as_completed``: a generator of `TaskResult`s in the
    order the tasks finish."""
    ids = list(dict.fromkeys([taskids] if isinstance(taskids, int) else taskids))
    for taskid in ids:
        _check_id(taskid)
    return _as_completed(client._async, ids, timeout)


def _as_completed(async_client, ids: list[int], timeout: float | None):
    if not ids:
        return
    end = None if timeout is None else time.monotonic() + timeout
    answers: queue.SimpleQueue = queue.SimpleQueue()
    watcher = Watcher(async_client, answers.put, answers.put)
    reactorthread.call(watcher.add, ids)
    try:
        for count in range(len(ids)):
            try:
                answer = answers.get(timeout=None if end is None else max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise WaitTimeout(
                    "%d of %d tasks were unfinished after %g s" % (len(ids) - count, len(ids), timeout)
                ) from None
            if isinstance(answer, BaseException):
                raise answer
            yield result_from_envelope(answer)
    finally:
        _in_reactor(watcher.stop)


def _in_reactor(function) -> None:
    """Run `function` in the reactor thread (now, if this is it)."""
    from twisted.internet import reactor

    if threading.current_thread() is reactorthread._thread:
        function()
    else:
        reactor.callFromThread(function)
