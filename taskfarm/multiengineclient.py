"""The Deferred MultiEngine client: explicit engines (`MultiEngineClient`)
and its mapper.
"""

from __future__ import annotations

import functools

from twisted.internet import defer
from twisted.python.failure import Failure

from taskfarm import progress as progress_bars
from taskfarm import serialization, wire
from taskfarm.bulk import policy as bulk_policy
from taskfarm.clientbase import BaseClient, gather, parallel_decorator, zip_equal
from taskfarm.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_TIMEOUT,
)
from taskfarm.errors import (
    AbortedPendingDeferredError,
    CompositeError,
    InvalidDeferredID,
    NoEnginesRegistered,
    NotAPendingResult,
    RemoteTaskError,
    ResultNotCompleted,
    from_wire,
)
from taskfarm.profile import MULTIENGINE
from taskfarm.properties import checked_properties
from taskfarm.results import PendingResults, ResultList, join_blocks, partition
from taskfarm.results import barrier as results_barrier
from taskfarm.waiting import bounded, check_timeout, within

#: Seconds past a MultiEngine call's `timeout` that the client waits for the
#: engines' own answer (an interrupted command's `WaitTimeout`).
ENGINE_ANSWER_MARGIN = 2.0


class MultiEngineClient(BaseClient):
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
        wait_for_controller: bool = False,
    ):
        super().__init__(
            furl_or_file, reactor, connect_timeout, tub, reconnect_timeout, wait_for_controller
        )
        #: The default targets of every method.
        self.targets = targets
        #: The default of every method's `block`.
        self.block = block
        self._results = PendingResults(self._reactor)
        self._deferred_ids = bool(deferred_ids)
        #: Deferred id -> its PendingResult, held until taken or cleared.
        self._deferreds: dict[int, object] = {}
        #: Deferred ids taken with block=True whose result is not there yet.
        self._waited: dict[int, defer.Deferred] = {}

    # -- plumbing ------------------------------------------------------------------

    def _answer(
        self, coroutine, block, timeout=None, what: str = "a MultiEngine call", on_engines=True
    ) -> defer.Deferred:
        # The client side of `timeout`: the wait for the answer (a
        # non-blocking call's PendingResult fails with WaitTimeout then).
        # A call that runs on the engines carries `timeout` to them too, and
        # an engine interrupts the command then and answers WaitTimeout: the
        # client waits a margin longer, so that answer (in the call's
        # CompositeError) is what the caller sees; past the margin (no
        # answer at all) the client's own WaitTimeout.
        if on_engines and isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            if timeout >= 0:
                timeout = timeout + ENGINE_ANSWER_MARGIN
        d = bounded(coroutine, timeout, self._reactor, what)
        if (self.block if block is None else block):
            return d
        pending = self._results.new(d)
        if not self._deferred_ids:
            return defer.succeed(pending)
        self._deferreds[pending.result_id] = pending
        return defer.succeed(pending.result_id)

    async def _engine_call(
        self, method, op, targets, args, decode, per_target=None, timeout=None
    ) -> list:
        targets = self.targets if targets is None else targets
        request = serialization.pack_message(
            wire.EngineCall(op, targets, args, per_target, timeout).plain()
        )
        location = getattr(self._connection, "bulk_location", None) if self.use_bulk else None
        if op != "pull" or location is None:
            return _collect(method, await self._connection.call("engine_call", request), decode)
        # A pull's big values come over the bulk-data channel; a transfer
        # that fails raises (a pull asked again could see other values).
        answer = wire.BulkResults.parse(await self._connection.call("engine_call_bulk", request))
        outcomes = await bulk_policy.receive_results(
            self._reactor, location, self._connection.tubid, answer, data_at=2
        )
        return _collect(method, outcomes, decode)

    async def _resolve(self, targets) -> list[int]:
        targets = self.targets if targets is None else targets
        if targets == "all":
            ids = await self._connection.call("engine_ids")
            if not ids:
                raise NoEnginesRegistered("no engines are registered")
            return ids
        return [targets] if isinstance(targets, int) else list(targets)

    # -- code and data ---------------------------------------------------------------

    def execute(self, lines: str, targets=None, block=None, timeout=None) -> defer.Deferred:
        """Run code on each target; one result dict (input, stdout, stderr) each.

        With `timeout` (seconds; every MultiEngine call that runs on the
        engines takes it), a command still running after that long is
        interrupted on its engine, whose part of the answer is then a
        `WaitTimeout` in the call's `CompositeError`."""
        if not isinstance(lines, str):
            return defer.fail(TypeError("execute takes a str of code, not %s" % type(lines).__name__))

        async def go():
            return ResultList(
                await self._engine_call(
                    "execute", "execute", targets, (lines,), serialization.unpack, timeout=timeout
                )
            )

        return self._answer(go(), block, timeout, "execute on %s" % self._targets_text(targets))

    def run(self, filename, targets=None, block=None, timeout=None) -> defer.Deferred:
        """Read a Python file here and execute it on each target."""
        try:
            with open(filename) as f:
                source = f.read()
            compile(source, str(filename), "exec")
        except (OSError, SyntaxError) as e:
            return defer.fail(e)
        return self.execute(source, targets, block, timeout)

    def push(self, namespace: dict, targets=None, block=None, timeout=None) -> defer.Deferred:
        """Put the names and values of `namespace` on each target."""
        if not isinstance(namespace, dict):
            return defer.fail(TypeError("push takes a dict, not %s" % type(namespace).__name__))
        try:
            blob = serialization.dumps_value(namespace, "the pushed namespace")
        except Exception as e:
            return defer.fail(e)
        return self._answer(
            self._push(blob, targets, timeout),
            block, timeout, "push to %s" % self._targets_text(targets),
        )

    async def _push(self, blob, targets, timeout) -> list:
        # A big value is uploaded over the bulk-data channel first, then
        # named by the push (a failed upload raises: nothing was pushed).
        if self.use_bulk and getattr(self._connection, "ever_connected", True) is False:
            await self._connection.connect()  # the channel's location comes with hello
        location = getattr(self._connection, "bulk_location", None) if self.use_bulk else None
        if (location is None or not serialization.is_frames(blob)
                or serialization.frames_size(blob) < bulk_policy.PUSH_MIN):
            return await self._engine_call("push", "push", targets, (blob,), lambda _: None,
                                           timeout=timeout)
        capability = await bulk_policy.upload_push(self._reactor, self._connection, location, blob)
        targets = self.targets if targets is None else targets
        request = serialization.pack_message(
            wire.EngineCall("push", targets, (b"",), None, timeout).plain()
        )
        answer = await self._connection.call("engine_call_uploaded", request, capability)
        return _collect("push", answer, lambda _: None)

    def pull(self, keys, targets=None, block=None, timeout=None) -> defer.Deferred:
        """One value per target for a str key; a list of values for a list of keys."""
        single = isinstance(keys, str)
        names = (keys,) if single else tuple(keys)
        for name in names:
            if not isinstance(name, str):
                return defer.fail(TypeError("pull takes names (str), not %r" % (name,)))

        def decode(data):
            values = [serialization.loads(blob, "a pulled value") for blob in serialization.unpack(data)]
            return values[0] if single else values

        return self._answer(
            self._engine_call("pull", "pull", targets, (names,), decode, timeout=timeout),
            block, timeout, "pull from %s" % self._targets_text(targets),
        )

    push_function = push
    pull_function = pull

    def zip_pull(self, keys, targets=None, block=None, timeout=None) -> defer.Deferred:
        """`pull` of several keys, transposed: one tuple per key."""
        if isinstance(keys, str):
            keys = [keys]

        async def go():
            values = await self._engine_call(
                "pull", "pull", targets, (tuple(keys),), _decode_pull, timeout=timeout
            )
            return list(zip(*values, strict=True))

        return self._answer(go(), block, timeout, "zip_pull from %s" % self._targets_text(targets))

    def get_result(self, i: int | None = None, targets=None, block=None, timeout=None) -> defer.Deferred:
        """The result dict of execute number `i` (the last if None) on each target."""
        return self._answer(
            self._engine_call(
                "get_result", "get_result", targets, (i,), serialization.unpack, timeout=timeout
            ),
            block, timeout, "get_result from %s" % self._targets_text(targets),
        )

    def reset(self, targets=None, block=None, timeout=None) -> defer.Deferred:
        """Give each target an empty namespace."""
        return self._answer(
            self._engine_call("reset", "reset", targets, (), lambda _: None, timeout=timeout),
            block, timeout, "reset of %s" % self._targets_text(targets),
        )

    def keys(self, targets=None, block=None, timeout=None) -> defer.Deferred:
        """The user names on each target."""
        return self._answer(
            self._engine_call("keys", "keys", targets, (), serialization.unpack, timeout=timeout),
            block, timeout, "keys of %s" % self._targets_text(targets),
        )

    def interrupt(self, targets=None, block=None) -> defer.Deferred:
        """Interrupt the MultiEngine command each target is running now; its
        caller gets `TaskAborted` on that engine.  Never queued behind that
        command: the controller does it at once.  The code is stopped by an
        exception raised in it; code that ignores it (C code, a long sleep)
        makes the engine exit after a few seconds, and a launcher starts a
        fresh one.  Queued commands and Task-interface tasks are left
        alone (see `abort`, `TaskClient.abort`).  Per target: the op it
        interrupted, or None if none was running."""
        return self._answer(
            self._engine_call("interrupt", "interrupt", targets, (), serialization.unpack),
            block, None, "interrupt of %s" % self._targets_text(targets),
        )

    def abort(self, targets=None, block=None) -> defer.Deferred:
        """`clear_queue`, then `interrupt`: the targets' queued MultiEngine
        commands fail with `QueueCleared` and the running one is
        interrupted, so the engines are free for what comes next.  Per
        target, as `interrupt`."""
        return self._answer(
            self._engine_call("abort", "abort", targets, (), serialization.unpack),
            block, None, "abort of %s" % self._targets_text(targets),
        )

    def kill(
        self, controller: bool = False, targets=None, block=None, timeout=None
    ) -> defer.Deferred:
        """Stop the target engines (and, if `controller`, the controller after them).

        An engine does a kill as it arrives, not after its queued work: the
        command it is running is interrupted (its caller gets
        `TaskAborted`), and the engine exits so that its launcher leaves
        it down."""

        async def go():
            try:
                await self._engine_call("kill", "kill", targets, (), lambda _: None, timeout=timeout)
            except NoEnginesRegistered:
                if not controller:
                    raise
            if controller:
                await self._connection.call("kill_controller")

        return self._answer(go(), block, timeout, "kill of %s" % self._targets_text(targets))

    # -- scatter, gather, map ------------------------------------------------------------

    def scatter(
        self, key: str, seq, dist: str = "b", flatten: bool = False, targets=None, block=None,
        timeout=None,
    ):
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
                per_target[engine_id] = (serialization.dumps_value({key: block_}, "a scattered block"),)
            return await self._engine_call(
                "scatter", "push", ids, (), lambda _: None, per_target, timeout
            )

        return self._answer(go(), block, timeout, "scatter to %s" % self._targets_text(targets))

    def gather(self, key: str, dist: str = "b", targets=None, block=None, timeout=None):
        """Pull `key` from each target and join the blocks (see `scatter`)."""
        if dist != "b":
            return defer.fail(ValueError("only dist='b' (contiguous blocks) is supported"))

        async def go():
            blocks = await self._engine_call(
                "gather", "pull", targets, ((key,),), _decode_first, timeout=timeout
            )
            return join_blocks(blocks)

        return self._answer(go(), block, timeout, "gather from %s" % self._targets_text(targets))

    def map(
        self, function, *sequences, targets=None, block=None, timeout=None, progress=None,
        **kwargs,
    ) -> defer.Deferred:
        """``[function(*args, **kwargs) for args in zip(*sequences)]`` in
        contiguous blocks over the targets (direct, not load-balanced);
        `targets`, `block` and `timeout` are this call's own (see `execute`
        for what `timeout` does).

        `progress` (True, a dict of tqdm options, or None: the
        ``TASKFARM_PROGRESS`` environment variable) shows a tqdm bar of the
        elements done, counted per engine's block as each engine answers
        (each engine is then asked in a request of its own)."""

        async def go():
            arguments = zip_equal(sequences)
            ids = await self._resolve(targets)
            call = functools.partial(function, **kwargs) if kwargs else function
            blob = serialization.dumps(call, "the mapped function")
            per_target = {
                engine_id: (blob, serialization.dumps_value(arguments[start:stop], "map arguments"))
                for engine_id, (start, stop) in zip(ids, partition(len(arguments), len(ids)), strict=True)
            }
            decode = lambda data: serialization.loads(data, "map results")  # noqa: E731
            bar = progress_bars.bar_for(progress, len(arguments), "map")
            if bar is None:
                blocks = await self._engine_call(
                    "map", "map", ids, (), decode, per_target, timeout=timeout
                )
            else:
                sizes = {engine_id: stop - start for engine_id, (start, stop)
                         in zip(ids, partition(len(arguments), len(ids)), strict=True)}
                try:
                    outcomes = await gather(
                        self._map_block(engine_id, part, sizes[engine_id], bar, timeout)
                        for engine_id, part in per_target.items()
                    )
                finally:
                    bar.close()
                blocks = _collect("map", [o for answer in outcomes for o in answer], decode)
            return [value for block_ in blocks for value in block_]

        return self._answer(go(), block, timeout, "map on %s" % self._targets_text(targets))

    async def _map_block(self, engine_id: int, part, size: int, bar, timeout=None) -> list:
        """One engine's block of a map shown on `bar`: its raw outcomes."""
        request = serialization.pack_message(
            wire.EngineCall("map", [engine_id], (), {engine_id: part}, timeout).plain()
        )
        answer = wire.parse_list(await self._connection.call("engine_call", request), "the answer to map")
        bar.finished(all(wire.EngineOutcome.parse(o).ok for o in answer), size)
        return answer

    def mapper(self, targets=None, block=None, dist: str = "b") -> MultiEngineMapper:
        """An object whose `map` maps over these targets."""
        return MultiEngineMapper(self, targets, block, dist)

    def parallel(self, targets=None, block=None, dist: str = "b"):
        """A decorator: ``f(seq)`` becomes ``map(f, seq)`` over the targets."""
        return parallel_decorator(self.mapper(targets, block, dist))

    # -- properties --------------------------------------------------------------------

    def _properties(self, method, action, argument, targets, block, timeout=None) -> defer.Deferred:
        async def go():
            request = serialization.pack(
                wire.PropertiesRequest(
                    action, self.targets if targets is None else targets, argument
                ).plain()
            )
            return _collect(method, await self._connection.call("properties", request), serialization.unpack)

        return self._answer(
            go(), block, timeout, "%s of %s" % (method, self._targets_text(targets)), on_engines=False
        )

    def get_properties(self, keys=None, targets=None, block=None, timeout=None):
        """Each target's properties (all, one key's value, or a dict of `keys`)."""
        return self._properties("get_properties", "get", _keys(keys), targets, block, timeout)

    def set_properties(self, properties: dict, targets=None, block=None, timeout=None):
        """Update each target's properties; the scheduler sees them at once."""
        try:
            # Checked here too: the request envelope itself carries plain
            # data only, so a bad value would otherwise fail as a raw pickle
            # error (or BadRequest) instead of InvalidProperty.
            properties = checked_properties(properties)
        except Exception as e:
            return defer.fail(e)
        return self._properties("set_properties", "set", properties, targets, block, timeout)

    def has_properties(self, keys, targets=None, block=None, timeout=None):
        """Per target: whether it has `keys` (a bool, or a list of bools)."""
        return self._properties("has_properties", "has", _keys(keys), targets, block, timeout)

    def del_properties(self, keys, targets=None, block=None, timeout=None):
        """Remove `keys` from each target's properties."""
        return self._properties("del_properties", "del", _keys(keys), targets, block, timeout)

    def clear_properties(self, targets=None, block=None, timeout=None):
        """Remove every property but the machine facts the engine reported."""
        return self._properties("clear_properties", "clear", None, targets, block, timeout)

    # -- engines and queues ------------------------------------------------------------

    def get_ids(self, timeout=None) -> defer.Deferred:
        """The ids of the registered engines."""
        return bounded(
            self._connection.call("engine_ids"), timeout, self._reactor, "the engine ids"
        )

    def queue_status(self, targets=None, block=None, timeout=None):
        """Per target: the command running (`pending`) and those queued."""
        targets = self.targets if targets is None else targets
        return self._answer(
            self._connection.call("queue_status", serialization.pack(targets)),
            block, timeout, "queue_status of %s" % self._targets_text(targets), on_engines=False,
        )

    def clear_queue(self, targets=None, block=None, timeout=None):
        """Drop the queued MultiEngine commands of the targets (they fail
        with `QueueCleared`); running commands and tasks are not touched.
        Fires with one None per target, as the original."""
        targets = self.targets if targets is None else targets

        async def go():
            await self._connection.call("clear_queue", serialization.pack(targets))
            return [None] * len(await self._resolve(targets))

        return self._answer(
            go(), block, timeout, "clear_queue of %s" % self._targets_text(targets), on_engines=False
        )

    # -- pending results -----------------------------------------------------------------

    def barrier(self, pending_results, timeout=None) -> defer.Deferred:
        """Wait until every given `PendingResult` has its answer;
        `WaitTimeout` after `timeout` seconds (None: no limit)."""
        try:
            seconds = check_timeout(timeout)
            d = results_barrier(pending_results)
        except (NotAPendingResult, TypeError, ValueError) as e:
            return defer.fail(e)
        return within(d, seconds, self._reactor, "pending results (barrier)")

    def flush(self) -> defer.Deferred:
        """Drop every non-blocking result not fetched yet (deferred ids
        included, as `clear_pending_deferreds`)."""
        cleared = self.clear_pending_deferreds()
        self._results.flush()
        return cleared

    clear_pending_results = flush

    def get_pending_deferred(
        self, deferred_id: int, block: bool = True, timeout=None
    ) -> defer.Deferred:
        """The result of the non-blocking call that fired with `deferred_id`
        (a client with `deferred_ids`); taking it frees it.

        Not there yet: with `block`, a Deferred that fires when it is;
        without, `ResultNotCompleted` (ask again later).  An id never handed
        out, or one already taken or cleared, or one another
        `get_pending_deferred` waits for already: `InvalidDeferredID`.
        """
        if isinstance(deferred_id, bool) or not isinstance(deferred_id, int):
            return defer.fail(TypeError("a deferred id is an int, not %r" % (deferred_id,)))
        try:
            seconds = check_timeout(timeout)
        except (TypeError, ValueError) as e:
            return defer.fail(e)
        return within(
            self._pending_deferred(deferred_id, block), seconds, self._reactor,
            "the result of deferred id %d" % deferred_id,
        )

    def _pending_deferred(self, deferred_id: int, block: bool) -> defer.Deferred:
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
        def given_up(waiter):
            # A timed-out wait hands the id back: it can be asked for again.
            if self._waited.get(deferred_id) is waiter:
                del self._waited[deferred_id]
                self._deferreds[deferred_id] = pending

        waiter: defer.Deferred = defer.Deferred(given_up)
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


    def _targets_text(self, targets) -> str:
        targets = self.targets if targets is None else targets
        return "engines %r" % (targets,) if targets != "all" else "all engines"


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
