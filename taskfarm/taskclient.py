"""The Deferred Task client: load-balanced tasks (`TaskClient`) and its
mapper.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import serialization, wire
from taskfarm.clientbase import BaseClient, gather, parallel_decorator, zip_equal
from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
)
from taskfarm.errors import (
    BadRequest,
    UnknownTask,
)
from taskfarm.profile import TASK
from taskfarm.remote.schemas import NOT_YET
from taskfarm.submission import Submitter, pack_envelope
from taskfarm.task import CALL, BaseTask, MapTask, result_from_envelope


class TaskClient(BaseClient):
    """The load-balanced Task interface, as Deferreds."""

    interface = TASK
    _log = Logger()

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout=DEFAULT_RECONNECT_TIMEOUT,
    ):
        super().__init__(furl_or_file, reactor, connect_timeout, tub, reconnect_timeout)
        self._submitter = Submitter(self._connection, self._reactor)

    # -- submitting ---------------------------------------------------------------

    def run(self, task: BaseTask, block: bool = False) -> defer.Deferred:
        """Submit one task; fires with its id (with `block`, with what
        ``get_task_result(id, block=True)`` gives: its `TaskResult`, or for
        a `MapTask` its value, a failure raised).

        Usually at once: the id comes from a block the controller set aside
        for this client, and the task leaves with others at the end of the
        reactor turn.  It is accepted (journaled) when the controller
        acknowledges that batch: every other call of this client waits for
        that first, and so does `confirm()`.  A task that cannot be sent (it
        does not pickle, or alone exceeds the controller's message limit)
        fails here, with a typed error, and takes no other task with it.
        """
        try:
            envelope = _envelope(task)
        except Exception as e:
            return defer.fail(e)
        d = self._submitter.run(envelope)
        if block:
            d.addCallback(self.get_task_result, True)
        return d

    def _run_from_thread(self, task: BaseTask) -> int | tuple[None, object]:
        """For the blocking client, called in its caller's thread: build the
        task's envelope there and, while a lease lasts, queue it with one
        hop to the reactor (`Submitter.run_from_thread`).  Returns the id,
        or ``(None, envelope)`` to give to `_run_packed` in the reactor.  A
        task that cannot be packed raises here, as `run` fails."""
        envelope = _envelope(task)
        taskid = self._submitter.run_from_thread(envelope)
        return (None, envelope) if taskid is None else taskid

    def _run_packed(self, envelope) -> defer.Deferred:
        """`run` of a task `_run_from_thread` packed already."""
        return self._submitter.run(envelope)

    def run_many(self, tasks: Iterable[BaseTask]) -> defer.Deferred:
        """Submit many tasks at once; fires with their ids, in order, once
        the controller has accepted them.  They travel in as few messages
        as the controller's message limit allows."""
        try:
            envelopes = [_envelope(task) for task in tasks]
        except Exception as e:
            return defer.fail(e)
        return self._submitter.run_many(envelopes)

    def confirm(self) -> defer.Deferred:
        """Fires once every task submitted so far is accepted by the
        controller; fails with the error of a refused submission."""
        return defer.Deferred.fromCoroutine(self._submitter.confirm())

    def disconnect(self) -> defer.Deferred:
        """Wait for submitted tasks to be accepted, then close the connection."""

        async def close():
            try:
                await self._submitter.confirm()
            finally:
                self._connection.disconnect()

        return defer.Deferred.fromCoroutine(close())

    async def _ask(self, method: str, *args, retry: bool = True, confirm: bool = True):
        """Call the controller after the tasks queued so far have left (and,
        with `confirm`, been accepted)."""
        if confirm:
            await self._submitter.confirm()
        else:
            self._submitter.flush()
        return await self._connection.call(method, *args, retry=retry)

    async def _ask_about(self, taskids: list[int], method: str, *args):
        """Ask about tasks without waiting for their acknowledgement: the
        connection keeps order, so the controller has them already."""
        self._submitter.check(taskids)
        was_pending = self._submitter.pending
        try:
            return await self._ask(method, *args, confirm=False)
        except UnknownTask:
            if not was_pending:
                raise
            # A resubmission after a reconnection may come in after us.
            await self._submitter.confirm()
            self._submitter.check(taskids)
            return await self._ask(method, *args, confirm=False)

    # -- results ---------------------------------------------------------------------

    def get_task_result(self, taskid: int, block: bool = False) -> defer.Deferred:
        """The task's `TaskResult`, or None if unfinished and not `block`.

        For a `MapTask` the result is the function's return value, and a
        failure is raised instead.
        """
        return defer.Deferred.fromCoroutine(self._get_result(taskid, block))

    async def _get_result(self, taskid: int, block: bool):
        _check_id(taskid)
        (envelope,) = _result_envelopes(
            await self._ask_until_answered(
                [taskid], "results", serialization.pack([taskid]), bool(block)
            )
        )
        if envelope is None:
            return None
        return _present(envelope)

    def get_task_results(self, taskids: list[int], block: bool = False) -> defer.Deferred:
        """`get_task_result` for many ids in one message, as a list."""
        return defer.Deferred.fromCoroutine(self._get_results(list(taskids), block))

    async def _get_results(self, taskids: list[int], block: bool) -> list:
        for taskid in taskids:
            _check_id(taskid)
        if block and taskids:
            await self._wait(taskids)
        # A few first, to learn how big results are; then the rest in
        # slices of about `_slice_bytes`, asked for all at once so the
        # controller packs one while this side reads another.
        head, rest = taskids[:RESULT_PROBE], taskids[RESULT_PROBE:]
        envelopes = await self._fetch(head)
        if rest:
            sizes = [len(env.data) for env in envelopes if env is not None and env.ok]
            mean = sum(sizes) / len(sizes) if sizes else 0
            per = max(1, int(self._slice_bytes() / max(mean, 1)))
            per = min(per, self._ids_per_request())
            slices = [rest[i : i + per] for i in range(0, len(rest), per)]
            for answer in await gather(self._fetch(part) for part in slices):
                envelopes.extend(answer)
        return [None if env is None else _present(env, raising=False) for env in envelopes]

    async def _fetch(self, taskids: list[int]) -> list:
        """Result envelopes of `taskids`: the controller answers as many as
        fit in one message (one at least), so ask again for the rest."""
        envelopes: list = []
        while len(envelopes) < len(taskids):
            part = taskids[len(envelopes) :]
            answer = _result_envelopes(
                await self._ask_about(part, "results", serialization.pack(part), False)
            )
            if not answer:
                raise BadRequest("the controller answered no result for %d ids" % len(part))
            envelopes.extend(answer)
        return envelopes

    def _slice_bytes(self) -> int:
        # Half the limit: results vary, and an answer cut short costs a call.
        return min(RESULT_SLICE_BYTES, self._connection.max_message_size // 2)

    def _ids_per_request(self) -> int:
        """How many task ids one request may list under the message limit."""
        return max(1, (self._connection.max_message_size - 512) // BYTES_PER_ID)

    def _id_slices(self, taskids: list[int]) -> list[list[int]]:
        per = self._ids_per_request()
        return [taskids[i : i + per] for i in range(0, len(taskids), per)] or [[]]

    async def _wait(self, taskids: list[int]) -> None:
        await gather(
            self._ask_until_answered(part, "wait", serialization.pack(part))
            for part in self._id_slices(taskids)
        )

    async def _ask_until_answered(self, taskids: list[int], method: str, *args):
        """A blocking call: the controller answers `NOT_YET` once its bound
        has passed (so a client that leaves holds nothing there); ask again."""
        while True:
            answer = await self._ask_about(taskids, method, *args)
            if answer != NOT_YET:
                return answer

    def barrier(self, taskids) -> defer.Deferred:
        """Fires (with None) once every task in `taskids` (an id or a list) is done."""
        ids = [taskids] if isinstance(taskids, int) else list(taskids)
        for taskid in ids:
            _check_id(taskid)
        return defer.Deferred.fromCoroutine(self._wait(ids))

    # -- function tasks -----------------------------------------------------------------

    def map(self, function, *sequences, **options) -> defer.Deferred:
        """Load-balanced ``[function(*args, **kwargs) for args in zip(*sequences)]``.

        One `MapTask` per element; keywords that name task options
        (retries, depend, ...) are the options of every task, the others
        are `kwargs`, given to every call.  The function is pickled once.  Fires with the results
        in order, or fails with the first task's failure.  The results are
        cleared on the controller once fetched.
        """
        return defer.Deferred.fromCoroutine(self._map(function, sequences, options))

    async def _map(self, function, sequences, task_options) -> list:
        arguments = zip_equal(sequences)
        if not arguments:
            return []
        tasks = map_tasks(function, arguments, task_options)
        ids = await self.run_many(tasks)
        try:
            await self._wait(ids)
            outcomes = await self._get_results(ids, False)
        finally:
            # Results in hand are never thrown away for a clear that fails.
            await self._clear_fetched(ids)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def mapper(self, block: bool = True, **task_options) -> TaskMapper:
        """A `TaskMapper` whose `map` uses these task options (and, with
        ``block=False``, fires with task ids instead of results)."""
        return TaskMapper(self, block, task_options)

    def parallel(self, block: bool = True, **task_options):
        """A decorator: ``f(seq)`` becomes the load-balanced map of `f` over `seq`."""
        return parallel_decorator(self.mapper(block=block, **task_options))

    # -- control ----------------------------------------------------------------------

    def abort(self, taskid: int) -> defer.Deferred:
        """Abort a queued or running task; its result becomes `TaskAborted`."""
        try:
            _check_id(taskid)
        except TypeError as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._ask("abort", taskid, retry=False))

    def queue_status(self, verbose: bool = False) -> defer.Deferred:
        """Task counts per state (id lists if `verbose`)."""
        return defer.Deferred.fromCoroutine(self._ask("queue_status", bool(verbose)))

    def clear(self, taskids=None) -> defer.Deferred:
        """Forget finished tasks (all, or the listed ids); fires with how many."""
        if isinstance(taskids, int):
            taskids = [taskids]
        request = serialization.pack(None if taskids is None else list(taskids))
        return defer.Deferred.fromCoroutine(self._ask("clear", request, retry=False))

    async def _clear_fetched(self, taskids: list[int]) -> None:
        """`map`'s clean-up: clear `taskids`, across reconnections (clearing
        again is harmless: ids cleared already are skipped); a clear that
        fails for good is logged, and the tasks expire with --retention."""
        for part in self._id_slices(taskids):
            try:
                await self._ask("clear", serialization.pack(part), retry=True)
            except UnknownTask:
                pass  # an earlier try cleared them; its answer was lost
            except Exception as e:
                self._log.warn(
                    "map could not clear its {count} tasks ({error}); they stay "
                    "on the controller until their retention expires",
                    count=len(taskids),
                    error=e,
                )
                return

    def spin(self) -> defer.Deferred:
        """Ask the controller for a scheduling pass (rarely needed)."""
        return defer.Deferred.fromCoroutine(self._ask("spin"))

    def engine_ids(self) -> defer.Deferred:
        """The ids of the registered engines."""
        return self._call("engine_ids", retry=True)


class TaskMapper:
    """Maps functions over sequences as load-balanced function tasks."""

    def __init__(self, client, block: bool, task_options: dict) -> None:
        self._client = client
        self.block = block
        self.task_options = task_options
        # Checked now, as the original's mapper did: a bad option fails here.
        unknown = sorted(set(task_options) - TASK_OPTIONS)
        if unknown:
            raise TypeError(
                "unknown task option%s %s (the options are %s)"
                % ("s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(sorted(TASK_OPTIONS)))
            )

    def __getattr__(self, name: str):
        # The settings, as attributes (`.retries`, `.depend`, ...): the
        # given option, else the task's default.
        if name in TASK_OPTIONS:
            options = self.__dict__.get("task_options", {})
            if name in options:
                return options[name]
            return getattr(_DEFAULT_TASK, name)
        raise AttributeError("%s has no attribute %r" % (type(self).__name__, name))

    def map(self, function, *sequences, **kwargs):
        """The results (or, when not `block`, the task ids) of the map;
        `kwargs` go to every call of `function`."""
        clash = sorted(set(kwargs) & TASK_OPTIONS)
        if clash:
            raise TypeError(
                "%s: task options are the mapper's (tc.mapper(%s=...)), not its map's"
                % (", ".join(clash), clash[0])
            )
        options = {**kwargs, **self.task_options}
        if self.block:
            return self._client.map(function, *sequences, **options)
        tasks = map_tasks(function, zip_equal(sequences), options)
        return self._client.run_many(tasks)


#: The keywords of `BaseTask`'s options; `map` gives other keywords to the function.
TASK_OPTIONS = frozenset(field.name for field in attrs.fields(BaseTask))

#: Where a mapper's unset options read their defaults.
_DEFAULT_TASK = MapTask(abs)


def map_tasks(function, arguments: list, task_options: dict) -> list[MapTask]:
    """One MapTask per argument tuple, sharing one pickled copy of `function`.

    Keys of `task_options` that are not task options are keyword arguments
    of every call."""
    if not callable(function):
        raise TypeError("map needs a callable, not %s" % type(function).__name__)
    options = {k: v for k, v in task_options.items() if k in TASK_OPTIONS}
    kwargs = {k: v for k, v in task_options.items() if k not in TASK_OPTIONS}
    blob = serialization.dumps(function, "function %r" % getattr(function, "__name__", "?"))
    tasks = []
    for args in arguments:
        task = MapTask(function, args, kwargs, **options)
        task._function_blob = blob
        tasks.append(task)
    return tasks


#: Results are fetched a few first, then in slices of about this many bytes
#: (or half the controller's message limit, if smaller).
RESULT_PROBE = 8
RESULT_SLICE_BYTES = 8 * 1024 * 1024

#: An upper bound on the bytes one task id takes in a pickled id list.
BYTES_PER_ID = 10


def _result_envelopes(answer) -> list:
    """A ``results`` answer: a `wire.ResultEnvelope` (or None) per task."""
    return [
        None if envelope is None else wire.ResultEnvelope.parse(envelope)
        for envelope in wire.parse_list(answer, "a results answer")
    ]


def _present(envelope: wire.ResultEnvelope, raising: bool = True):
    """A `TaskResult`; for a MapTask its value (or its failure, raised)."""
    result = result_from_envelope(envelope)
    if envelope.kind != CALL:
        return result
    if result.failure is not None:
        if raising:
            raise result.failure
        return result.failure
    return result.value


def _envelope(task: BaseTask):
    if not isinstance(task, BaseTask):
        raise TypeError(
            "run takes a Task or MapTask, not %s" % type(task).__name__
        )
    return pack_envelope(task.to_envelope())


def _check_id(taskid) -> None:
    if isinstance(taskid, bool) or not isinstance(taskid, int):
        raise TypeError("a task id is an int, not %r" % (taskid,))
