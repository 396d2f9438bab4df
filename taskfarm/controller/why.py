"""Why a task waits: one reason per engine, as plain data (``tc.why``).

`explain` reads the dispatcher's, scheduler's and registry's state of one
task and says, for a queued task, why each registered engine does not run
it now: its slots are full (``busy``), its `depend` returned False on the
engine's properties (``depend_false``) or raised (``depend_raised``, naming
the exception), or failed otherwise (``depend_failed``: timed out, killed
its process), the engine sits out the task's failure penalty
(``penalty``), or nothing stops it (``free``: it leaves on the next pass).
A task waiting for its retry delay says so for every engine
(``retry_delay``).  When no engine's properties satisfy the depend, the
answer says that none does, and names the properties the predicate read.

The depend is user code: it is traced in the evaluator's child processes
(``evaluate(key, properties, trace=True)``), never here, once per distinct
set of engine properties and at most `MAX_TRACED` of them, within
`WHY_TIMEOUT` seconds in all.  What the scheduler already knows of the
predicate (its cached verdicts) decides; a trace that is not back in time
leaves only the names it would have given out.
"""

from __future__ import annotations

from twisted.internet import defer

from taskfarm import serialization
from taskfarm.controller.tasks import TaskRecord, TaskState

#: Seconds `explain` waits for the traced depend verdicts in all.
WHY_TIMEOUT = 5.0

#: Distinct engine property sets whose depend verdict is traced; beyond
#: them only the scheduler's cached verdicts are used.
MAX_TRACED = 64

#: The per-engine reasons.
FREE = "free"
BUSY = "busy"
DEPEND_FALSE = "depend_false"
DEPEND_RAISED = "depend_raised"
DEPEND_FAILED = "depend_failed"
DEPEND_UNKNOWN = "depend_unknown"
DEPEND_UNLOADABLE = "depend_unloadable"
PENALTY = "penalty"
RETRY_DELAY = "retry_delay"

_REJECTS = frozenset({DEPEND_FALSE, DEPEND_RAISED, DEPEND_FAILED, DEPEND_UNLOADABLE})

#: What `TaskState` each answer's ``state`` names.
_STATE_NAMES = {
    TaskState.QUEUED: "queued",
    TaskState.RUNNING: "running",
    TaskState.WAITING_RETRY: "waiting_retry",
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.ABORTED: "aborted",
}


async def explain(
    record: TaskRecord, registry, scheduler, dispatcher, clock, timeout: float = WHY_TIMEOUT
) -> dict:
    """Why `record` is where it is, as a plain dict (see `TaskController.why`)."""
    now = clock.seconds()
    answer = {
        "taskid": record.taskid,
        "state": _STATE_NAMES[record.state],
        "summary": "",
        "engine_id": record.engine_id,
        "attempts": record.attempts,
        "wait": None,
        "no_engine_matches": False,
        "properties_read": [],
        "engines": [],
    }
    engines = [registry.engines[eid] for eid in sorted(registry.engines)]
    state = record.state
    if state is TaskState.RUNNING:
        answer["summary"] = "running on engine %d (attempt %d)" % (
            record.engine_id, record.attempts)
        return answer
    if record.is_final:
        answer["summary"] = _final_summary(record)
        return answer
    if state is TaskState.WAITING_RETRY:
        due = dispatcher.retry_due_at(record.taskid)
        wait = max(0.0, due - now) if due is not None else 0.0
        answer["wait"] = wait
        detail = "the task waits %.3g s more for its retry delay (attempt %d failed)" % (
            wait, record.attempts)
        answer["engines"] = [_entry(e, scheduler, RETRY_DELAY, detail) for e in engines]
        answer["summary"] = "waiting %.3g s for its retry delay after attempt %d failed" % (
            wait, record.attempts)
        return answer
    # Queued.
    key = record.spec.depend
    verdicts = {}
    traced = {}
    if key is not None:
        verdicts = scheduler.depend_verdicts(key)
        traced = await _trace(key, engines, scheduler.evaluator, clock, timeout)
    penalty_end = dispatcher.penalty_ends_at(record.taskid)
    read: set[str] = set()
    entries = []
    for engine in engines:
        reason, detail = FREE, "it accepts the task and has a free slot: it leaves on the next pass"
        if key is not None:
            verdict = traced.get(engine.engine_id)
            if verdict is not None and verdict.read:
                read.update(verdict.read)
            judged = _depend_reason(verdicts.get(engine.engine_id, (None, None)), verdict)
            if judged is not None:
                reason, detail = judged
        if reason == FREE and record.avoid_engine == engine.engine_id:
            left = max(0.0, penalty_end - now) if penalty_end is not None else 0.0
            reason = PENALTY
            detail = (
                "it sits out the task's failure penalty for %.3g s more (the last "
                "attempt failed there); it takes the task only if no other engine can" % left
            )
        if reason == FREE and scheduler.free_slots(engine.engine_id) <= 0:
            reason = BUSY
            slots = scheduler.slots(engine.engine_id)
            detail = "its task slots are full (%d of %d taken)" % (slots, slots)
        entries.append(_entry(engine, scheduler, reason, detail))
    answer["engines"] = entries
    answer["properties_read"] = sorted(read)
    answer["no_engine_matches"] = bool(entries) and all(e["reason"] in _REJECTS for e in entries)
    answer["summary"] = _queued_summary(answer)
    return answer


def _entry(engine, scheduler, reason: str, detail: str) -> dict:
    slots = scheduler.slots(engine.engine_id)
    return {
        "engine_id": engine.engine_id,
        "reason": reason,
        "detail": detail,
        "slots": slots,
        "taken": max(0, slots - scheduler.free_slots(engine.engine_id)),
    }


def _depend_reason(cached: tuple, traced) -> tuple[str, str] | None:
    """``(reason, detail)`` when the depend keeps the task off this engine."""
    accepted, why = cached
    if accepted is None and traced is not None:
        accepted, why = traced.accepted, traced.reason
        if not traced.loadable:
            return DEPEND_UNLOADABLE, "its depend cannot be loaded: %s" % why
    if accepted is None:
        return DEPEND_UNKNOWN, "its depend has not answered for this engine yet"
    if accepted:
        return None
    names = ""
    if traced is not None and traced.read:
        names = " (it read %s)" % ", ".join(traced.read)
    if why is None:
        return DEPEND_FALSE, "its depend returned False on the engine's properties" + names
    if why.startswith("raised "):
        return DEPEND_RAISED, "its depend %s on the engine's properties%s" % (why, names)
    if why.startswith("cannot load"):
        return DEPEND_UNLOADABLE, "its depend %s" % why
    return DEPEND_FAILED, "its depend counts as False: %s" % why


async def _trace(key: bytes, engines: list, evaluator, clock, timeout: float) -> dict:
    """engine_id -> traced `Verdict`, for the engines traced within `timeout`."""
    if evaluator is None or not engines:
        return {}
    groups: dict[object, list] = {}
    for engine in engines:
        try:
            signature: object = serialization.pack(engine.properties)
        except Exception:
            signature = ("engine", engine.engine_id)
        if signature in groups or len(groups) < MAX_TRACED:
            groups.setdefault(signature, []).append(engine)
    traced: dict[int, object] = {}
    done: defer.Deferred = defer.Deferred()
    remaining = [len(groups)]

    def arrived(verdict, group: list) -> None:
        for engine in group:
            traced[engine.engine_id] = verdict
        remaining[0] -= 1
        if remaining[0] == 0 and not done.called:
            done.callback(None)

    def late() -> None:
        if not done.called:
            done.callback(None)

    # The evaluator's Deferreds stay its own (never cancelled here): a
    # verdict that comes after the deadline is simply not used.
    timer = clock.callLater(timeout, late)
    for group in groups.values():
        evaluator.evaluate(key, dict(group[0].properties), True).addCallback(arrived, group)
    await done
    if timer.active():
        timer.cancel()
    return dict(traced)


def _queued_summary(answer: dict) -> str:
    entries = answer["engines"]
    if not entries:
        return "queued: no engine is registered"
    if answer["no_engine_matches"]:
        read = answer["properties_read"]
        return "queued: no engine's properties satisfy its depend%s" % (
            " (it read %s)" % ", ".join(read) if read else "")
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    parts = [
        "%d engine%s %s" % (n, "" if n == 1 else "s", _SAID[reason])
        for reason, n in sorted(counts.items())
    ]
    return "queued: " + "; ".join(parts)


_SAID = {
    FREE: "free (it leaves on the next pass)",
    BUSY: "busy",
    DEPEND_FALSE: "rejected by its depend",
    DEPEND_RAISED: "where its depend raised",
    DEPEND_FAILED: "where its depend failed",
    DEPEND_UNKNOWN: "not judged by its depend yet",
    DEPEND_UNLOADABLE: "unusable (its depend cannot be loaded)",
    PENALTY: "sitting out its failure penalty",
    RETRY_DELAY: "waiting for its retry delay",
}


def _final_summary(record: TaskRecord) -> str:
    state = _STATE_NAMES[record.state]
    if record.state is TaskState.SUCCEEDED:
        return "succeeded on engine %s after %d attempt(s)" % (record.engine_id, record.attempts)
    error = record.data
    name = error[0] if isinstance(error, tuple) and error else "an error"
    detail = error[1] if isinstance(error, tuple) and len(error) > 1 else None
    text = name
    if isinstance(detail, str) and detail:
        text = "%s: %s" % (name, detail[:200])
    elif isinstance(detail, tuple) and len(detail) > 1 and isinstance(detail[1], str):
        text = "%s: %s" % (detail[0] if isinstance(detail[0], str) else name, detail[1][:200])
    return "%s (%s)" % (state, text)
