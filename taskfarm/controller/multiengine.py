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
    WaitTimeout,
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

    def call(
        self,
        op: str,
        targets,
        args: tuple,
        per_target: dict | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred:
        """Run `op` on each target (with `per_target[id]` args when given);
        fires with ``[(engine_id, ok, data)]`` once every target answered.
        The call is a checked `wire.EngineCall`.

        With `timeout`, each target's engine interrupts its command once it
        has run that long, and answers `WaitTimeout`; should the engine not
        answer within the registry's grace after that (a command stuck in C
        code: that engine exits and is replaced), the controller answers
        `WaitTimeout` for it.  A control operation (`interrupt`, `abort`)
        is done here at once, never queued behind the engines' commands.
        """
        if op == "interrupt":
            return defer.succeed(self.interrupt(targets))
        if op == "abort":
            return defer.succeed(self.abort(targets))
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
            answer = _answer_into(d, engine.engine_id)
            if timeout is None:
                engine.send(op, engine_args, answer)
            else:
                engine.send(
                    op, engine_args, answer,
                    time_limit=timeout,
                    on_overdue=_overdue_into(d, engine.engine_id, op, timeout),
                    engine_timeout=timeout,
                )
            waits.append(d)
        return defer.gatherResults(waits)

    def interrupt(self, targets) -> list:
        """Interrupt the MultiEngine command each target is running now
        (a Task-interface task is left alone: `TaskClient.abort` is its
        way); its caller gets `TaskAborted`.  The engine stops it as it
        stops an aborted task: an exception raised in the running code, or,
        if that does not stop it within the engine's grace, the engine
        exits and its launcher starts a fresh one.  Answers, per target,
        ``(engine_id, True, op or None)``: the op interrupted, if any."""
        outcome = []
        for engine in self.resolve(targets):
            head = engine.head
            entry = engine.inflight.get(head) if head is not None else None
            interrupted = None
            if entry is not None and entry[0] in ENGINE_OPERATIONS:
                engine.interrupt(head)
                interrupted = entry[0]
                self._log.info(
                    "interrupting the {op} command running on engine {engine_id}",
                    op=interrupted, engine_id=engine.engine_id,
                )
            outcome.append(
                wire.EngineOutcome(engine.engine_id, True, serialization.pack(interrupted)).plain()
            )
        return outcome

    def abort(self, targets) -> list:
        """`clear_queue` and `interrupt` in one: the targets' queued
        MultiEngine commands fail with `QueueCleared`, the running one is
        interrupted.  Answers as `interrupt`."""
        self.clear_queue(targets)
        return self.interrupt(targets)

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
        # A command the controller already answered (overdue) may still
        # get its engine's reply later: the first answer stands.
        if not d.called:
            d.callback(wire.EngineOutcome(engine_id, ok, data).plain())

    return on_reply


def _overdue_into(d: defer.Deferred, engine_id: int, op: str, timeout: float):
    def on_overdue(seq):
        if not d.called:
            error = WaitTimeout(
                "the %s command ran past its timeout of %g s on engine %d, which did "
                "not answer after interrupting it" % (op, timeout, engine_id)
            )
            d.callback(wire.EngineOutcome(engine_id, False, to_wire(error)).plain())

    return on_overdue

