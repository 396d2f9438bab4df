"""The MultiEngine interface, on the controller: explicit engines.

A call names its targets (an engine id, a list of ids, or ``'all'``) and
one operation; each target runs it on its own ordered command stream, the
same stream the Task interface uses, so both interfaces interleave in
submission order.  The answer is one ``(engine_id, ok, data)`` per target,
in target order; the client turns failures into one `CompositeError`.
Properties live here, on the controller: a change is seen by the scheduler
at once (and sent on to the engine, which keeps it for re-registration).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import exitcodes, serialization, wire
from taskfarm.controller.registry import EngineHandle, EngineRegistry
from taskfarm.errors import (
    BadRequest,
    InvalidEngineID,
    NoEnginesRegistered,
    QueueCleared,
    to_wire,
)
from taskfarm.properties import FACT_KEYS, checked_properties

#: Operations a client may ask of an engine through this interface, and the
#: properties actions (both checked by `wire.EngineCall` / `wire.PropertiesRequest`).
ENGINE_OPERATIONS = wire.CLIENT_OPERATIONS
PROPERTY_ACTIONS = wire.PROPERTY_ACTIONS


class MultiEngine:
    """Runs explicit per-engine operations and keeps engine properties."""

    _log = Logger()

    def __init__(self, registry: EngineRegistry, reactor) -> None:
        self._registry = registry
        self._reactor = reactor

    def engine_ids(self) -> list[int]:
        """The ids of the registered engines, sorted."""
        return self._registry.ids()

    def resolve(self, targets) -> list[EngineHandle]:
        """The engines `targets` names; `InvalidEngineID` for unknown ids."""
        engines = self._registry.engines
        if targets == "all":
            if not engines:
                raise NoEnginesRegistered("no engines are registered")
            return [engines[i] for i in sorted(engines)]
        if isinstance(targets, int) and not isinstance(targets, bool):
            ids = [targets]
        elif isinstance(targets, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in targets
        ):
            ids = list(targets)
        else:
            raise TypeError(
                "targets must be an engine id, a list of ids or 'all', not %r" % (targets,)
            )
        unknown = [i for i in ids if i not in engines]
        if unknown:
            raise InvalidEngineID(
                "no engine with id %s; registered engines: %s"
                % (", ".join(map(str, unknown)), sorted(engines))
            )
        return [engines[i] for i in ids]

    def call(self, op: str, targets, args: tuple, per_target: dict | None = None) -> defer.Deferred:
        """Run `op` on each target (with `per_target[id]` args when given);
        fires with ``[(engine_id, ok, data)]`` once every target answered.
        The call is a checked `wire.EngineCall`."""
        engines = self.resolve(targets)
        # Check every target has arguments before sending anything: a refused
        # call must not have run on some engines already.
        planned = []
        for engine in engines:
            engine_args = args if per_target is None else per_target.get(engine.engine_id)
            if engine_args is None:
                raise BadRequest("no arguments for engine %d" % engine.engine_id)
            planned.append((engine, engine_args))
        waits = []
        for engine, engine_args in planned:
            d: defer.Deferred = defer.Deferred()
            engine.send(op, engine_args, _answer_into(d, engine.engine_id))
            waits.append(d)
        return defer.gatherResults(waits)

    def properties(self, action: str, targets, arg) -> list:
        """Read or change properties; ``[(engine_id, ok, data)]`` per target.
        The request is a checked `wire.PropertiesRequest`."""
        engines = self.resolve(targets)
        if action == "set":
            arg = checked_properties(arg)
        outcome = []
        for engine in engines:
            try:
                value = self._property_action(engine, action, arg)
                answer = wire.EngineOutcome(engine.engine_id, True, serialization.pack(value))
            except KeyError as e:
                error = KeyError("engine %d has no property %s" % (engine.engine_id, e))
                answer = wire.EngineOutcome(engine.engine_id, False, to_wire(error))
            outcome.append(answer.plain())
        return outcome

    def _property_action(self, engine: EngineHandle, action: str, arg):
        props = engine.properties
        if action == "get":
            if arg is None:
                return dict(props)
            if isinstance(arg, str):
                return props[arg]
            return {key: props[key] for key in arg}
        if action == "has":
            if isinstance(arg, str):
                return arg in props
            return [key in props for key in arg]
        if action == "set":
            new = dict(props)
            new.update(arg)
        elif action == "del":
            keys = [arg] if isinstance(arg, str) else list(arg)
            new = {k: v for k, v in props.items() if k not in keys}
        else:  # clear
            new = {k: v for k, v in props.items() if k in FACT_KEYS}
        self._store(engine, new)
        return None

    def _store(self, engine: EngineHandle, properties: dict) -> None:
        engine.update_properties(properties)
        # The engine keeps a copy so that a re-registration brings it back;
        # it travels beside the command stream, not in it.
        engine.channel.set_properties(serialization.pack(properties))

    def queue_status(self, targets) -> list:
        """``[(engine_id, {'pending': op or None, 'queue': [op, ...]})]``."""
        status = []
        for engine in self.resolve(targets):
            ops = [op for op, _ in engine.inflight.values()]
            status.append(
                (engine.engine_id, {"pending": ops[0] if ops else None, "queue": ops[1:]})
            )
        return status

    def clear_queue(self, targets) -> None:
        """Drop the queued MultiEngine commands of the targets (not the one
        running, and never Task-interface work); their callers get
        `QueueCleared`."""
        error = to_wire(QueueCleared("the command was dropped by clear_queue"))
        for engine in self.resolve(targets):
            seqs = list(engine.inflight)[1:]
            queued = [s for s in seqs if engine.inflight[s][0] in ENGINE_OPERATIONS]
            engine.cancel(queued, error)

    def kill_controller(self, delay: float = 1.0) -> None:
        """Stop the controller process shortly (after this call answered),
        with `EXIT_KILLED` so that its launcher stops the cluster."""
        self._log.warn("a client asked the controller to stop")
        self._reactor.callLater(
            delay, exitcodes.stop_reactor_and_exit, self._reactor, exitcodes.EXIT_KILLED
        )


def _answer_into(d: defer.Deferred, engine_id: int):
    def on_reply(seq, ok, data, started, finished):
        d.callback(wire.EngineOutcome(engine_id, ok, data).plain())

    return on_reply

