"""The Deferred MultiEngine client: explicit engines (`MultiEngineClient`)
and its mapper.
"""

from __future__ import annotations

import functools

from twisted.internet import defer
from twisted.python.failure import Failure

from taskfarm import serialization, wire
from taskfarm.clientbase import BaseClient, parallel_decorator, zip_equal
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
        request = serialization.pack_message(wire.EngineCall(op, targets, args, per_target).plain())
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
            blob = serialization.dumps_value(namespace, "the pushed namespace")
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
                per_target[engine_id] = (serialization.dumps_value({key: block_}, "a scattered block"),)
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
            arguments = zip_equal(sequences)
            ids = await self._resolve(targets)
            call = functools.partial(function, **kwargs) if kwargs else function
            blob = serialization.dumps(call, "the mapped function")
            per_target = {
                engine_id: (blob, serialization.dumps_value(arguments[start:stop], "map arguments"))
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
        return parallel_decorator(self.mapper(targets, block, dist))

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
