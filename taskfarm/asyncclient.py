"""The Deferred client API: every method returns a Deferred.

Use it inside a Twisted program; `taskfarm.client` wraps the same classes
for blocking use.  Creating a client does no I/O: it connects on the first
call (or on `connect()`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import serialization, wire
from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
    ControllerConnection,
)
from taskfarm.errors import (
    AbortedPendingDeferredError,
    BadRequest,
    CompositeError,
    FurlError,
    InvalidDeferredID,
    NoEnginesRegistered,
    NotAPendingResult,
    RemoteTaskError,
    ResultNotCompleted,
    UnknownTask,
    from_wire,
)
from taskfarm.profile import MULTIENGINE, TASK, Profile, read_furl_file
from taskfarm.properties import checked_properties
from taskfarm.remote.schemas import NOT_YET
from taskfarm.results import PendingResults, ResultList, join_blocks, partition
from taskfarm.results import barrier as results_barrier
from taskfarm.submission import Submitter, pack_envelope
from taskfarm.task import CALL, BaseTask, MapTask, result_from_envelope

__all__ = [
    "TaskClient",
    "MultiEngineClient",
    "resolve_furl",
    "get_multiengine_client",
    "get_task_client",
]


def resolve_furl(furl_or_file, interface: str) -> str:
    """The furl for `interface` from a furl, a furl file, a profile folder,
    or None (the default profile)."""
    if isinstance(furl_or_file, tuple):
        raise FurlError(
            "taskfarm clients do not take a (host, port) address: the furl file "
            "is the credential. Pass the path of the controller's %s furl file "
            "(PROFILE/security/%s.furl), a profile folder, or nothing for the "
            "default profile." % (interface, interface)
        )
    if furl_or_file is None or furl_or_file == "":
        return read_furl_file(Profile.from_option(None).furl_file(interface))
    if not isinstance(furl_or_file, (str, os.PathLike)):
        raise FurlError(
            "expected a furl, a furl file or a profile folder, not %s"
            % type(furl_or_file).__name__
        )
    text = os.fspath(furl_or_file)
    if text.startswith("pb://"):
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        return read_furl_file(Profile(path).furl_file(interface))
    return read_furl_file(path)


class _Client:
    """What both client kinds share: one connection to one interface."""

    interface = TASK

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._connection = ControllerConnection(
            resolve_furl(furl_or_file, self.interface),
            self.interface,
            reactor,
            connect_timeout,
            tub=tub,
            reconnect_timeout=reconnect_timeout,
        )

    def connect(self) -> defer.Deferred:
        """Connect now (clients otherwise connect on their first call)."""
        return self._connection.connect()

    def disconnect(self) -> defer.Deferred:
        """Close this client's connection."""
        self._connection.disconnect()
        return defer.succeed(None)

    def _call(self, method: str, *args, retry: bool = False) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connection.call(method, *args, retry=retry))


class TaskClient(_Client):
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
            for answer in await _gather(self._fetch(part) for part in slices):
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
        await _gather(
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
        arguments = _zip_equal(sequences)
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
        return _parallel(self.mapper(block=block, **task_options))

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
        tasks = map_tasks(function, _zip_equal(sequences), options)
        return self._client.run_many(tasks)


def _parallel(mapper):
    def decorate(function):
        @functools.wraps(function)
        def mapped(*sequences):
            return mapper.map(function, *sequences)

        return mapped

    return decorate


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


def _zip_equal(sequences) -> list[tuple]:
    if not sequences:
        raise TypeError("map needs at least one sequence")
    lists = [list(seq) for seq in sequences]
    lengths = {len(seq) for seq in lists}
    if len(lengths) > 1:
        raise ValueError(
            "map's sequences must have equal lengths, not %s" % [len(seq) for seq in lists]
        )
    return list(zip(*lists, strict=True))


#: Results are fetched a few first, then in slices of about this many bytes
#: (or half the controller's message limit, if smaller).
RESULT_PROBE = 8
RESULT_SLICE_BYTES = 8 * 1024 * 1024

#: An upper bound on the bytes one task id takes in a pickled id list.
BYTES_PER_ID = 10


async def _gather(coroutines) -> list:
    """Run coroutines side by side; raise the first one's error itself."""
    try:
        return await defer.gatherResults(
            [defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()


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



class MultiEngineClient(_Client):
    """The MultiEngine interface, as Deferreds: explicit engines.

    Every method takes `targets` (an engine id, a list of ids, or ``'all'``)
    and `block`; the attributes `targets` and `block` are the defaults.
    With ``block=False`` the Deferred fires at once with a `PendingResult`;
    with `deferred_ids` (the client `get_multiengine_client` gives, as the
    original's), with a deferred id (an int) for `get_pending_deferred`.
    Errors from engines are gathered into one `CompositeError`.
    """

    interface = MULTIENGINE

    def __init__(
        self,
        furl_or_file=None,
        reactor=None,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        tub=None,
        reconnect_timeout=DEFAULT_RECONNECT_TIMEOUT,
        targets="all",
        block: bool = True,
        deferred_ids: bool = False,
    ):
        super().__init__(furl_or_file, reactor, connect_timeout, tub, reconnect_timeout)
        #: The default targets of every method.
        self.targets = targets
        #: The default of every method's `block`.
        self.block = block
        self._results = PendingResults()
        self._deferred_ids = bool(deferred_ids)
        #: Deferred id -> its PendingResult, held until taken or cleared.
        self._deferreds: dict[int, object] = {}
        #: Deferred ids taken with block=True whose result is not there yet.
        self._waited: dict[int, defer.Deferred] = {}

    # -- plumbing ------------------------------------------------------------------

    def _answer(self, coroutine, block) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(coroutine)
        if (self.block if block is None else block):
            return d
        pending = self._results.new(d)
        if not self._deferred_ids:
            return defer.succeed(pending)
        self._deferreds[pending.result_id] = pending
        return defer.succeed(pending.result_id)

    async def _engine_call(self, method, op, targets, args, decode, per_target=None) -> list:
        targets = self.targets if targets is None else targets
        request = serialization.pack(wire.EngineCall(op, targets, args, per_target).plain())
        return _collect(method, await self._connection.call("engine_call", request), decode)

    async def _resolve(self, targets) -> list[int]:
        targets = self.targets if targets is None else targets
        if targets == "all":
            ids = await self._connection.call("engine_ids")
            if not ids:
                raise NoEnginesRegistered("no engines are registered")
            return ids
        return [targets] if isinstance(targets, int) else list(targets)

    # -- code and data ---------------------------------------------------------------

    def execute(self, lines: str, targets=None, block=None) -> defer.Deferred:
        """Run code on each target; one result dict (input, stdout, stderr) each."""
        if not isinstance(lines, str):
            return defer.fail(TypeError("execute takes a str of code, not %s" % type(lines).__name__))

        async def go():
            return ResultList(
                await self._engine_call("execute", "execute", targets, (lines,), serialization.unpack)
            )

        return self._answer(go(), block)

    def run(self, filename, targets=None, block=None) -> defer.Deferred:
        """Read a Python file here and execute it on each target."""
        try:
            with open(filename) as f:
                source = f.read()
            compile(source, str(filename), "exec")
        except (OSError, SyntaxError) as e:
            return defer.fail(e)
        return self.execute(source, targets, block)

    def push(self, namespace: dict, targets=None, block=None) -> defer.Deferred:
        """Put the names and values of `namespace` on each target."""
        if not isinstance(namespace, dict):
            return defer.fail(TypeError("push takes a dict, not %s" % type(namespace).__name__))
        try:
            blob = serialization.dumps(namespace, "the pushed namespace")
        except Exception as e:
            return defer.fail(e)
        return self._answer(
            self._engine_call("push", "push", targets, (blob,), lambda _: None), block
        )

    def pull(self, keys, targets=None, block=None) -> defer.Deferred:
        """One value per target for a str key; a list of values for a list of keys."""
        single = isinstance(keys, str)
        names = (keys,) if single else tuple(keys)
        for name in names:
            if not isinstance(name, str):
                return defer.fail(TypeError("pull takes names (str), not %r" % (name,)))

        def decode(data):
            values = [serialization.loads(blob, "a pulled value") for blob in serialization.unpack(data)]
            return values[0] if single else values

        return self._answer(self._engine_call("pull", "pull", targets, (names,), decode), block)

    push_function = push
    pull_function = pull

    def zip_pull(self, keys, targets=None, block=None) -> defer.Deferred:
        """`pull` of several keys, transposed: one tuple per key."""
        if isinstance(keys, str):
            keys = [keys]

        async def go():
            values = await self._engine_call("pull", "pull", targets, (tuple(keys),), _decode_pull)
            return list(zip(*values, strict=True))

        return self._answer(go(), block)

    def get_result(self, i: int | None = None, targets=None, block=None) -> defer.Deferred:
        """The result dict of execute number `i` (the last if None) on each target."""
        return self._answer(
            self._engine_call("get_result", "get_result", targets, (i,), serialization.unpack),
            block,
        )

    def reset(self, targets=None, block=None) -> defer.Deferred:
        """Give each target an empty namespace."""
        return self._answer(self._engine_call("reset", "reset", targets, (), lambda _: None), block)

    def keys(self, targets=None, block=None) -> defer.Deferred:
        """The user names on each target."""
        return self._answer(self._engine_call("keys", "keys", targets, (), serialization.unpack), block)

    def kill(self, controller: bool = False, targets=None, block=None) -> defer.Deferred:
        """Stop the target engines (and, if `controller`, the controller after them)."""

        async def go():
            try:
                await self._engine_call("kill", "kill", targets, (), lambda _: None)
            except NoEnginesRegistered:
                if not controller:
                    raise
            if controller:
                await self._connection.call("kill_controller")

        return self._answer(go(), block)

    # -- scatter, gather, map ------------------------------------------------------------

    def scatter(self, key: str, seq, dist: str = "b", flatten: bool = False, targets=None, block=None):
        """Split `seq` into contiguous blocks, one per target, stored as `key`."""
        if dist != "b":
            return defer.fail(ValueError("only dist='b' (contiguous blocks) is supported"))

        async def go():
            ids = await self._resolve(targets)
            per_target = {}
            for engine_id, (start, stop) in zip(ids, partition(len(seq), len(ids)), strict=True):
                block_ = seq[start:stop]
                if flatten and stop - start == 1:
                    block_ = block_[0]
                per_target[engine_id] = (serialization.dumps({key: block_}, "a scattered block"),)
            return await self._engine_call("scatter", "push", ids, (), lambda _: None, per_target)

        return self._answer(go(), block)

    def gather(self, key: str, dist: str = "b", targets=None, block=None):
        """Pull `key` from each target and join the blocks (see `scatter`)."""
        if dist != "b":
            return defer.fail(ValueError("only dist='b' (contiguous blocks) is supported"))

        async def go():
            blocks = await self._engine_call("gather", "pull", targets, ((key,),), _decode_first)
            return join_blocks(blocks)

        return self._answer(go(), block)

    def map(self, function, *sequences, targets=None, block=None, **kwargs) -> defer.Deferred:
        """``[function(*args, **kwargs) for args in zip(*sequences)]`` in
        contiguous blocks over the targets (direct, not load-balanced)."""

        async def go():
            arguments = _zip_equal(sequences)
            ids = await self._resolve(targets)
            call = functools.partial(function, **kwargs) if kwargs else function
            blob = serialization.dumps(call, "the mapped function")
            per_target = {
                engine_id: (blob, serialization.dumps(arguments[start:stop], "map arguments"))
                for engine_id, (start, stop) in zip(ids, partition(len(arguments), len(ids)), strict=True)
            }
            blocks = await self._engine_call(
                "map", "map", ids, (), lambda data: serialization.loads(data, "map results"), per_target
            )
            return [value for block_ in blocks for value in block_]

        return self._answer(go(), block)

    def mapper(self, targets=None, block=None, dist: str = "b") -> MultiEngineMapper:
        """An object whose `map` maps over these targets."""
        return MultiEngineMapper(self, targets, block, dist)

    def parallel(self, targets=None, block=None, dist: str = "b"):
        """A decorator: ``f(seq)`` becomes ``map(f, seq)`` over the targets."""
        return _parallel(self.mapper(targets, block, dist))

    # -- properties --------------------------------------------------------------------

    def _properties(self, method, action, argument, targets, block) -> defer.Deferred:
        async def go():
            request = serialization.pack(
                wire.PropertiesRequest(
                    action, self.targets if targets is None else targets, argument
                ).plain()
            )
            return _collect(method, await self._connection.call("properties", request), serialization.unpack)

        return self._answer(go(), block)

    def get_properties(self, keys=None, targets=None, block=None):
        """Each target's properties (all, one key's value, or a dict of `keys`)."""
        return self._properties("get_properties", "get", _keys(keys), targets, block)

    def set_properties(self, properties: dict, targets=None, block=None):
        """Update each target's properties; the scheduler sees them at once."""
        try:
            # Checked here too: the request envelope itself carries plain
            # data only, so a bad value would otherwise fail as a raw pickle
            # error (or BadRequest) instead of InvalidProperty.
            properties = checked_properties(properties)
        except Exception as e:
            return defer.fail(e)
        return self._properties("set_properties", "set", properties, targets, block)

    def has_properties(self, keys, targets=None, block=None):
        """Per target: whether it has `keys` (a bool, or a list of bools)."""
        return self._properties("has_properties", "has", _keys(keys), targets, block)

    def del_properties(self, keys, targets=None, block=None):
        """Remove `keys` from each target's properties."""
        return self._properties("del_properties", "del", _keys(keys), targets, block)

    def clear_properties(self, targets=None, block=None):
        """Remove every property but the machine facts the engine reported."""
        return self._properties("clear_properties", "clear", None, targets, block)

    # -- engines and queues ------------------------------------------------------------

    def get_ids(self) -> defer.Deferred:
        """The ids of the registered engines."""
        return self._call("engine_ids")

    def queue_status(self, targets=None, block=None):
        """Per target: the command running (`pending`) and those queued."""
        targets = self.targets if targets is None else targets
        return self._answer(self._connection.call("queue_status", serialization.pack(targets)), block)

    def clear_queue(self, targets=None, block=None):
        """Drop the queued MultiEngine commands of the targets (they fail
        with `QueueCleared`); running commands and tasks are not touched.
        Fires with one None per target, as the original."""
        targets = self.targets if targets is None else targets

        async def go():
            await self._connection.call("clear_queue", serialization.pack(targets))
            return [None] * len(await self._resolve(targets))

        return self._answer(go(), block)

    # -- pending results -----------------------------------------------------------------

    def barrier(self, pending_results) -> defer.Deferred:
        """Wait until every given `PendingResult` has its answer."""
        try:
            return results_barrier(pending_results)
        except NotAPendingResult as e:
            return defer.fail(e)

    def flush(self) -> defer.Deferred:
        """Drop every non-blocking result not fetched yet (deferred ids
        included, as `clear_pending_deferreds`)."""
        cleared = self.clear_pending_deferreds()
        self._results.flush()
        return cleared

    clear_pending_results = flush

    def get_pending_deferred(self, deferred_id: int, block: bool = True) -> defer.Deferred:
        """The result of the non-blocking call that fired with `deferred_id`
        (a client with `deferred_ids`); taking it frees it.

        Not there yet: with `block`, a Deferred that fires when it is;
        without, `ResultNotCompleted` (ask again later).  An id never handed
        out, or one already taken or cleared, or one another
        `get_pending_deferred` waits for already: `InvalidDeferredID`.
        """
        if isinstance(deferred_id, bool) or not isinstance(deferred_id, int):
            return defer.fail(TypeError("a deferred id is an int, not %r" % (deferred_id,)))
        if deferred_id in self._waited:
            return defer.fail(
                InvalidDeferredID(
                    "deferred id %d is already waited for by another get_pending_deferred"
                    % deferred_id
                )
            )
        pending = self._deferreds.get(deferred_id)
        if pending is None:
            if 0 <= deferred_id < self._results.handed_out:
                why = "its result was already taken (or cleared by clear_pending_deferreds)"
            else:
                why = "this client never handed it out"
            return defer.fail(InvalidDeferredID("no pending result for deferred id %d: %s" % (deferred_id, why)))
        if not pending.done and not block:
            return defer.fail(
                ResultNotCompleted("the result of deferred id %d is not ready yet" % deferred_id)
            )
        del self._deferreds[deferred_id]
        if pending.done:
            return pending.get_result(block=True)
        waiter: defer.Deferred = defer.Deferred()
        self._waited[deferred_id] = waiter

        def arrived(outcome):
            if self._waited.get(deferred_id) is waiter:
                del self._waited[deferred_id]
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)
            return None

        pending.get_result(block=True).addBoth(arrived)
        return waiter

    def clear_pending_deferreds(self) -> defer.Deferred:
        """Drop every result of a deferred id not yet taken; a
        `get_pending_deferred` still waiting fails with
        `AbortedPendingDeferredError`."""
        pending, self._deferreds = list(self._deferreds.values()), {}
        waited, self._waited = self._waited, {}
        for result in pending:
            result._flush()
        for deferred_id, waiter in waited.items():
            waiter.errback(
                AbortedPendingDeferredError(
                    "deferred id %d was cleared by clear_pending_deferreds" % deferred_id
                )
            )
        return defer.succeed(None)


class MultiEngineMapper:
    """Maps functions over explicit engines, in contiguous blocks; its
    settings are the attributes `dist`, `targets` and `block`."""

    def __init__(self, client, targets, block, dist: str = "b") -> None:
        if dist != "b":
            raise ValueError("only dist='b' (contiguous blocks) is supported")
        self._client = client
        self.dist = dist
        self.targets = targets
        self.block = block

    def map(self, function, *sequences, **kwargs):
        return self._client.map(
            function, *sequences, targets=self.targets, block=self.block, **kwargs
        )


def _collect(method: str, outcomes: list, decode) -> list:
    """Values in target order, or one CompositeError for every failure."""
    values, errors = [], []
    outcomes = wire.parse_list(outcomes, "the answer to " + method)
    for engine_id, ok, data in map(wire.EngineOutcome.parse, outcomes):
        if ok:
            values.append(decode(data))
        else:
            error = from_wire(data)
            if isinstance(error, RemoteTaskError) and error.engine_id is None:
                error.engine_id = engine_id
            errors.append((engine_id, method, error))
    if errors:
        raise CompositeError("one or more exceptions from call to method: %s" % method, errors)
    return values


def _decode_pull(data: bytes) -> list:
    return [serialization.loads(blob, "a pulled value") for blob in serialization.unpack(data)]


def _decode_first(data: bytes):
    return _decode_pull(data)[0]


def _keys(keys):
    if keys is None or isinstance(keys, str):
        return keys
    return list(keys)


# -- the original's way in: a Deferred of a connected client ----------------------------


def get_multiengine_client(furl_or_file=None, reactor=None, **options) -> defer.Deferred:
    """A Deferred firing with a connected Deferred `MultiEngineClient`
    (its ``hello`` answered), as the original's ``get_multiengine_client``.

    `furl_or_file` is a furl, a furl file, a profile folder, or None (or
    ``''``) for the default profile.  The client hands out deferred ids for
    ``block=False`` (see `MultiEngineClient.get_pending_deferred`).  Fails
    with the typed error of the connection: `FurlError` for a bad furl or
    file, `WrongInterface`, `ControllerUnreachable`.  `options` are the
    constructor's (`connect_timeout`, `targets`, `block`, ...).
    """
    options.setdefault("deferred_ids", True)
    return _connected(MultiEngineClient, furl_or_file, reactor, options)


def get_task_client(furl_or_file=None, reactor=None, **options) -> defer.Deferred:
    """A Deferred firing with a connected Deferred `TaskClient`, as the
    original's ``get_task_client``; see `get_multiengine_client`."""
    return _connected(TaskClient, furl_or_file, reactor, options)


def _connected(cls, furl_or_file, reactor, options) -> defer.Deferred:
    try:
        client = cls(furl_or_file, reactor, **options)
    except Exception as e:
        return defer.fail(e)
    d = client.connect()
    d.addCallback(lambda _: client)
    return d
