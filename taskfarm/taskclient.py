"""The Deferred Task client: load-balanced tasks (`TaskClient`) and its
mapper.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import progress as progress_bars
from taskfarm import serialization, wire
from taskfarm.bulk import policy as bulk_policy
from taskfarm.clientbase import BaseClient, gather, parallel_decorator, zip_equal
from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
)
from taskfarm.errors import (
    BadRequest,
    BulkRefused,
    ConnectionLost,
    NoEnginesWarning,
    TaskAlreadyCompleted,
    UnknownTask,
    WaitTimeout,
)
from taskfarm.profile import TASK
from taskfarm.remote.schemas import NOT_YET
from taskfarm.submission import Submitter, pack_envelope
from taskfarm.task import CALL, BaseTask, MapTask, result_from_envelope
from taskfarm.waiting import bounded, check_timeout
from taskfarm.watch import Watcher, watch_all

#: Seconds a `map` waits before it looks whether any engine is registered
#: (and warns once if none is); a map that finishes sooner never asks.
NO_ENGINES_GRACE = 2.0


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
        wait_for_controller: bool = False,
    ):
        super().__init__(
            furl_or_file, reactor, connect_timeout, tub, reconnect_timeout, wait_for_controller
        )
        self._submitter = Submitter(self._connection, self._reactor)

    # -- submitting ---------------------------------------------------------------

    def run(self, task: BaseTask, block: bool = False, timeout: float | None = None) -> defer.Deferred:
        """Submit one task; fires with its id (with `block`, with what
        ``get_task_result(id, block=True, timeout=timeout)`` gives: its
        `TaskResult`, or for a `MapTask` its value, a failure raised).

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
            check_timeout(timeout)
        except Exception as e:
            return defer.fail(e)
        d = self._submitter.run(envelope)
        if block:
            d.addCallback(self.get_task_result, True, timeout=timeout)
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

    def get_task_result(
        self, taskid: int, block: bool = False, timeout: float | None = None, full: bool = False
    ) -> defer.Deferred:
        """The task's `TaskResult`, or None if unfinished and not `block`.

        For a `MapTask` the result is the function's return value, and a
        failure is raised instead; with `full`, a MapTask's `TaskResult`
        (``value``, ``failure``, ``stdout``, ``stderr``, times) is given
        instead, as for a `Task`.  With `block`, `WaitTimeout` after
        `timeout` seconds (None: no limit); the task goes on.
        """
        return bounded(
            self._get_result(taskid, block, full), timeout, self._reactor,
            "the result of task %r" % (taskid,),
        )

    async def _get_result(self, taskid: int, block: bool, full: bool = False):
        _check_id(taskid)
        (envelope,) = _result_envelopes(await self._results([taskid], block, until_answered=True))
        if envelope is None:
            return None
        if full:
            return result_from_envelope(envelope)
        return _present(envelope)

    def get_task_results(
        self, taskids: list[int], block: bool = False, timeout: float | None = None
    ) -> defer.Deferred:
        """`get_task_result` for many ids in one message, as a list;
        `WaitTimeout` after `timeout` seconds (None: no limit)."""
        taskids = list(taskids)
        return bounded(
            self._get_results(taskids, block), timeout, self._reactor,
            "the results of %d tasks" % len(taskids),
        )

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
            sizes = [serialization.frames_size(env.data) for env in envelopes if env is not None and env.ok]
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
            answer = _result_envelopes(await self._results(part, False))
            if not answer:
                raise BadRequest("the controller answered no result for %d ids" % len(part))
            envelopes.extend(answer)
        return envelopes

    async def _results(self, taskids: list[int], block: bool, until_answered: bool = False):
        """A ``results`` answer (its envelopes, plain), big results fetched
        over the controller's bulk-data channel when it has one; a transfer
        that fails is asked for again over Foolscap."""
        # A connection without a bulk channel (an in-process one) has no location.
        location = getattr(self._connection, "bulk_location", None) if self.use_bulk else None
        method = "results" if location is None else "results_bulk"
        args = (serialization.pack(taskids), bool(block))
        if until_answered:
            answer = await self._ask_until_answered(taskids, method, *args)
        else:
            answer = await self._ask_about(taskids, method, *args)
        if location is None:
            return answer
        bulk = wire.BulkResults.parse(answer)
        try:
            return await bulk_policy.receive_results(
                self._reactor, location, self._connection.tubid, bulk
            )
        except (ConnectionLost, BulkRefused) as e:
            self._log.warn("bulk transfer failed ({error}); asking over Foolscap", error=str(e))
            return await self._ask_about(taskids, "results", serialization.pack(taskids), False)

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

    def barrier(self, taskids, timeout: float | None = None, progress=None) -> defer.Deferred:
        """Fires (with None) once every task in `taskids` (an id or a list)
        is done; `WaitTimeout` after `timeout` seconds (None: no limit).

        With `progress` (True, a dict of tqdm options, or None: the
        ``TASKFARM_PROGRESS`` environment variable) a tqdm bar shows
        done/total, rate, ETA and failures; it learns of each task from
        its result, fetched once as it finishes.  Cancelling stops the wait."""
        ids = [taskids] if isinstance(taskids, int) else list(taskids)
        try:
            for taskid in ids:
                _check_id(taskid)
            bar = progress_bars.bar_for(progress, len(set(ids)), "barrier")
        except (TypeError, ValueError) as e:
            return defer.fail(e)
        wait = self._wait(ids) if bar is None else self._barrier_showing(ids, bar)
        return bounded(wait, timeout, self._reactor, "%d tasks to finish" % len(ids))

    async def _barrier_showing(self, taskids: list[int], bar) -> None:
        await self._wait_showing(taskids, bar)

    async def _wait_showing(self, taskids: list[int], bar) -> dict:
        """Wait for `taskids` with `bar`; their result envelopes by id."""
        try:
            return await watch_all(self, list(dict.fromkeys(taskids)), lambda env: bar.finished(env.ok))
        finally:
            bar.close()

    def as_completed(self, taskids, timeout: float | None = None) -> list[defer.Deferred]:
        """One Deferred per distinct task in `taskids`, fired in the order the
        tasks finish: the first with the first finished `TaskResult` (a
        MapTask's value is its `.value`, its failure `.failure`), and so on.
        Past `timeout` seconds the unfired ones fail with `WaitTimeout`.  One
        watcher asks about all of them, in batches; it stops once every
        unfired Deferred is cancelled."""
        ids = list(dict.fromkeys([taskids] if isinstance(taskids, int) else taskids))
        for taskid in ids:
            _check_id(taskid)

        def cancelled(this) -> None:
            # Nobody waits any more: stop asking.
            if all(slot.called or slot is this for slot in slots):
                watcher.stop()
                if timer is not None and timer.active():
                    timer.cancel()

        slots = [defer.Deferred(cancelled) for _ in ids]
        fired = [0]

        def fire(outcome, failed: bool) -> None:
            while fired[0] < len(slots):
                slot = slots[fired[0]]
                fired[0] += 1
                if not slot.called:  # one cancelled by its holder is skipped
                    slot.errback(outcome) if failed else slot.callback(outcome)
                    return

        def finished(envelope) -> None:
            try:
                outcome, failed = result_from_envelope(envelope), False
            except Exception as e:
                outcome, failed = e, True
            fire(outcome, failed)

        def failed_all(error: BaseException) -> None:
            while fired[0] < len(slots):
                fire(error, True)
            if timer is not None and timer.active():
                timer.cancel()

        watcher = Watcher(self, finished, failed_all)
        timer = None
        if timeout is not None:

            def expire() -> None:
                left = len(slots) - fired[0]
                watcher.stop()
                failed_all(WaitTimeout("%d of %d tasks were unfinished after %g s" % (left, len(slots), timeout)))

            timer = self._reactor.callLater(timeout, expire)
        if ids:
            watcher.add(ids)
        return slots

    # -- function tasks -----------------------------------------------------------------

    def map(
        self, function, *sequences, timeout: float | None = None, task_timeout=None,
        progress=None, **options,
    ) -> defer.Deferred:
        """Load-balanced ``[function(*args, **kwargs) for args in zip(*sequences)]``.

        One `MapTask` per element; keywords that name task options
        (retries, depend, ...) are the options of every task, the others
        are `kwargs`, given to every call.  The function is pickled once.  Fires with the results
        in order, or fails with the first task's failure.  The results are
        cleared on the controller once fetched.  `progress` shows a tqdm bar
        (see `barrier`); each result is then fetched once, as it finishes.

        `timeout` bounds the whole map (None: no limit): past it the map
        fails with `WaitTimeout` and aborts its unfinished tasks.  Each
        task's own run limit is `task_timeout` (the `timeout` option of a
        `MapTask`, and of `mapper`).  A map still waiting after a few
        seconds with no engine registered says so once, in a warning.
        """
        if task_timeout is not None:
            options["timeout"] = task_timeout
        return bounded(
            self._map(function, sequences, options, progress), timeout, self._reactor,
            "map of %s" % getattr(function, "__name__", "a function"),
        )

    async def _map(self, function, sequences, task_options, progress=None) -> list:
        arguments = zip_equal(sequences)
        if not arguments:
            return []
        tasks = map_tasks(function, arguments, task_options)
        bar = progress_bars.bar_for(progress, len(tasks), "map")
        try:
            ids = await self.run_many(tasks)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        watch = self._reactor.callLater(NO_ENGINES_GRACE, self._warn_if_no_engines, len(ids))
        try:
            if bar is None:
                await self._wait(ids)
            else:
                envelopes = await self._wait_showing(ids, bar)
        except defer.CancelledError:
            # Timed out: the tasks would run for nobody, and nobody holds
            # their ids; abort and clear them, without holding the caller.
            defer.Deferred.fromCoroutine(self._abandon(ids))
            raise
        finally:
            if watch.active():
                watch.cancel()
        try:
            if bar is None:
                outcomes = await self._get_results(ids, False)
            else:
                outcomes = [_present(envelopes[taskid], raising=False) for taskid in ids]
        except defer.CancelledError:
            defer.Deferred.fromCoroutine(self._clear_fetched(ids))
            raise
        except BaseException:
            await self._clear_fetched(ids)
            raise
        # Results in hand are never thrown away for a clear that fails.
        await self._clear_fetched(ids)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def _warn_if_no_engines(self, count: int) -> None:
        async def look():
            try:
                ids = await self._connection.call("engine_ids")
            except Exception:
                return  # the map itself reports a broken connection
            if not ids:
                self._warn_no_engines(count)

        defer.Deferred.fromCoroutine(look())

    def _warn_no_engines(self, count: int) -> None:
        message = (
            "map is waiting for its %d task%s, but no engines are registered with %s: "
            "start some (`taskfarm cluster -n N` or `twistd taskengine`); the map waits "
            "up to its timeout" % (count, "" if count == 1 else "s", self.where)
        )
        self._log.warn("{message}", message=message, where=self.where, tasks=count)
        try:
            warnings.warn(NoEnginesWarning(message), stacklevel=2)
        except Exception:
            pass  # warnings turned into errors (-W error): the log has it

    async def _abandon(self, taskids: list[int]) -> None:
        """Abort `taskids` (those not finished) and clear them; errors are logged."""
        for taskid in taskids:
            try:
                await self._ask("abort", taskid, retry=False, confirm=False)
            except (TaskAlreadyCompleted, UnknownTask):
                pass
            except Exception as e:
                self._log.warn("could not abort task {taskid}: {error}", taskid=taskid, error=e)
                return
        await self._clear_fetched(taskids)

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

    def why(self, taskid: int) -> defer.Deferred:
        """Why task `taskid` has not started (or where it is): a
        `wire.Explanation`, whose ``str()`` reads as text.

        For a queued task it gives one reason per registered engine: busy
        (its slots are full), the task's `depend` returned False on the
        engine's properties or raised (naming the exception), the engine
        sits out the task's failure penalty, or the task waits for its
        retry delay; when no engine's properties satisfy the depend it says
        so (`no_engine_matches`) and names the properties the predicate read
        (`properties_read`).  For a task not queued it says its state (and
        the engine it runs on).  An unknown id fails with `UnknownTask`.
        """
        try:
            _check_id(taskid)
        except TypeError as e:
            return defer.fail(e)

        async def why():
            answer = await self._ask_about([taskid], "why", taskid)
            return wire.Explanation.parse(answer)

        return defer.Deferred.fromCoroutine(why())

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

    def status(self) -> defer.Deferred:
        """The cluster summary, as the dashboard shows it: a
        `wire.ClusterSummary` (engines, queue counts by state, tasks/s,
        failures/s, totals since the controller started)."""
        return defer.Deferred.fromCoroutine(self._status())

    async def _status(self) -> wire.ClusterSummary:
        return wire.ClusterSummary.parse(await self._connection.call("status", retry=True))


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
        progress = kwargs.pop("progress", None)
        options = {**kwargs, **self.task_options}
        if self.block:
            # The mapper's `timeout` is the task option (each task's run
            # limit), which `map` calls `task_timeout`.
            if "timeout" in options:
                options["task_timeout"] = options.pop("timeout")
            return self._client.map(function, *sequences, progress=progress, **options)
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
