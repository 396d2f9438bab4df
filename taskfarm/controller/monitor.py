"""What the controller has been doing, kept cheaply for people to look at.

The `Monitor` is fed by small hooks where the controller already changes
state: the store calls `moved` after every task transition, the
dispatcher calls `attempt_failed` before a failed attempt is retried, and
the journal's writer thread calls `journal_committed` after each group
commit.  It keeps counters, two latency histograms, a bounded ring of the
most recent task runs per engine, the most recent failures, and the
failed attempts of the most recent tasks that had any.  Every buffer has a
fixed bound, and nothing here does I/O or waits: the dashboard
(`taskfarm.dashboard`), ``/metrics`` and ``taskfarm status`` read plain
data out of it (`summary`, `engines`, `timeline`, `failures`, `task`).

Rates (tasks/s, failures/s) come from counter samples, at most one per
`SAMPLE_PERIOD`, over the last `RATE_WINDOW` seconds; a sample is taken
when one is due and a task finishes or someone reads the rates, so the
monitor sets no timer.
"""

from __future__ import annotations

import bisect
import collections

from taskfarm.controller.registry import RegistryListener
from taskfarm.controller.tasks import TaskState

#: Task runs kept per engine for the timeline.
RUNS_PER_ENGINE = 200
#: Final failures kept, newest last.
RECENT_FAILURES = 50
#: Tasks whose failed attempts are kept (oldest forgotten first), and
#: attempts kept per task.
ATTEMPT_TASKS = 1000
ATTEMPTS_PER_TASK = 20
#: Characters of a remote traceback kept per failure.
TRACEBACK_CHARS = 8000
#: Seconds of counter samples the rates are computed over.
RATE_WINDOW = 10.0
#: Seconds between counter samples.
SAMPLE_PERIOD = 1.0

#: Upper bounds (seconds) of the latency histograms' buckets (+Inf is implied).
DISPATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

_bisect = bisect.bisect_left
_QUEUED = TaskState.QUEUED
_RUNNING = TaskState.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED
_FAILED = TaskState.FAILED
_ABORTED = TaskState.ABORTED

#: How a run ended, as the timeline shows it.
RUN_OK, RUN_FAILED, RUN_RETRIED, RUN_ABORTED = "ok", "failed", "retried", "aborted"


class Histogram:
    """Fixed buckets of observed values (seconds): counts and their sum.

    Each histogram has one writer (the reactor thread, or the journal's
    writer thread), so `observe` takes no lock; a reader may see an
    observation counted in its bucket a moment before it is in the sum.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(bounds)
        #: Observations per bucket (not cumulative); the last is +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of `value` seconds."""
        self.counts[_bisect(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """(cumulative (bound, count) pairs with +Inf last, sum, count)."""
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        # The count is the +Inf bucket's, so the two always agree.
        return cumulative, total, running


class _Lane:
    """One engine's recent runs and how many tasks it finished."""

    __slots__ = ("runs", "done")

    def __init__(self) -> None:
        self.runs: collections.deque = collections.deque(maxlen=RUNS_PER_ENGINE)
        self.done = 0


def _error_parts(error) -> tuple[str, str, str]:
    """(name, message, remote traceback) of a wire error tuple."""
    try:
        name, detail = error
    except (TypeError, ValueError):
        return "unknown", repr(error)[:200], ""
    if name == "RemoteTaskError" and isinstance(detail, tuple) and len(detail) >= 3:
        ename, evalue, traceback = detail[0], detail[1], detail[2]
        return str(ename), str(evalue), str(traceback or "")[-TRACEBACK_CHARS:]
    return str(name), str(detail)[:2000], ""


class Monitor(RegistryListener):
    """Counters, latencies and recent runs of one controller.

    `store` gives the queue counts and the records of the task page;
    `registry` the engines.  Call `start` and `stop` with the controller.
    """

    def __init__(self, clock, registry, store) -> None:
        self._clock = clock
        self._registry = registry
        self._store = store
        #: Tasks that ended, by how: counters since the controller started.
        self.succeeded = 0
        self.failed = 0
        self.aborted = 0
        #: Failed attempts that were queued again (retries and recoveries).
        self.retried = 0
        #: Seconds from a task's submission to its first dispatch.
        self.dispatch_latency = Histogram(DISPATCH_BUCKETS)
        #: Seconds each journal group commit took (its writer thread).
        self.journal_commit = Histogram(COMMIT_BUCKETS)
        self._seconds = clock.seconds
        #: engine id -> its recent runs (taskid, started, ended, how) and
        #: how many tasks it finished.
        self._lanes: dict[int, _Lane] = {}
        #: taskid -> (engine id, dispatched at) of every running task
        #: (bounded by the engines' task slots).
        self._started: dict[int, tuple[int, float]] = {}
        #: Recent final failures, newest last (plain dicts).
        self._failures: collections.deque = collections.deque(maxlen=RECENT_FAILURES)
        #: taskid -> its failed attempts (plain dicts), least recent task first.
        self._attempts: collections.OrderedDict = collections.OrderedDict()
        #: (time, finished, failed) samples, one per `SAMPLE_PERIOD`.
        self._samples: collections.deque = collections.deque(
            maxlen=int(RATE_WINDOW / SAMPLE_PERIOD) + 1
        )
        self._next_sample = 0.0
        self._sample(clock.seconds())
        registry.add_listener(self)

    def _sample(self, now: float) -> None:
        # Taken when due by whoever looks at the clock next (a finishing
        # task, or a reader): no timer of its own, nothing while idle.
        self._next_sample = now + SAMPLE_PERIOD
        self._samples.append((now, self.succeeded + self.failed + self.aborted, self.failed))

    # -- hooks (keep them cheap: they run per task) ------------------------------------------

    def moved(self, record, before: TaskState, engine_id: int | None) -> None:
        """The store moved `record` from `before` (on `engine_id`, when it
        was running) to its present state."""
        after = record.state
        if after is _RUNNING:
            now = self._seconds()
            self._started[record.taskid] = (record.engine_id, now)
            if record.attempts == 1:
                # `Histogram.observe`, inlined: this runs once per task.
                latency = self.dispatch_latency
                waited = now - record.submitted
                latency.counts[_bisect(latency.bounds, waited)] += 1
                latency.sum += waited
            return
        if before is _RUNNING:
            now = self._seconds()
            entry = self._started.pop(record.taskid, None)
            if after is _SUCCEEDED:
                how = RUN_OK
            elif after is _FAILED:
                how = RUN_FAILED
            elif after is _ABORTED:
                how = RUN_ABORTED
            else:
                how = RUN_RETRIED
                self.retried += 1
            lane = self._lanes.get(engine_id)
            if lane is None:
                lane = self._lanes[engine_id] = _Lane()
            lane.runs.append((record.taskid, now if entry is None else entry[1], now, how))
            lane.done += 1
            if now >= self._next_sample:
                self._sample(now)
        if after is _SUCCEEDED:
            self.succeeded += 1
        elif after is _FAILED:
            self.failed += 1
            name, message, traceback = _error_parts(record.data)
            self._failures.append(
                {
                    "taskid": record.taskid,
                    "engine_id": engine_id,
                    "at": self._clock.seconds(),
                    "error": name,
                    "message": message,
                    "traceback": traceback,
                }
            )
        elif after is _ABORTED:
            self.aborted += 1

    def attempt_failed(self, record, engine_id: int | None, error) -> None:
        """An attempt of `record` on `engine_id` failed with the wire `error`
        (called before the task is retried, or fails for good)."""
        name, message, traceback = _error_parts(error)
        attempts = self._attempts.get(record.taskid)
        if attempts is None:
            attempts = self._attempts[record.taskid] = collections.deque(maxlen=ATTEMPTS_PER_TASK)
            if len(self._attempts) > ATTEMPT_TASKS:
                self._attempts.popitem(last=False)
        attempts.append(
            {
                "attempt": record.attempts,
                "engine_id": engine_id,
                "at": self._clock.seconds(),
                "error": name,
                "message": message,
                "traceback": traceback,
            }
        )

    def journal_committed(self, seconds: float, operations: int) -> None:
        """The journal's writer committed `operations` in `seconds` (any thread)."""
        self.journal_commit.observe(seconds)

    # -- RegistryListener ------------------------------------------------------------------

    def engine_added(self, engine) -> None:
        # Engine ids are reused: a new engine starts with an empty record.
        self._lanes.pop(engine.engine_id, None)

    # -- reading --------------------------------------------------------------------------

    def rates(self) -> tuple[float, float]:
        """(tasks finished per second, failures per second) over the last
        `RATE_WINDOW` seconds, counting up to now."""
        now = self._clock.seconds()
        if now >= self._next_sample:
            self._sample(now)
        finished = self.succeeded + self.failed + self.aborted
        horizon = now - RATE_WINDOW
        # The oldest sample inside the window (the newest if none is).
        then, finished_then, failed_then = self._samples[-1]
        for sample in self._samples:
            if sample[0] >= horizon:
                then, finished_then, failed_then = sample
                break
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        return (finished - finished_then) / elapsed, (self.failed - failed_then) / elapsed

    def summary(self) -> dict:
        """The cluster summary: engines, queue counts by state, rates, totals."""
        tasks_per_s, failures_per_s = self.rates()
        counts = self._store.counts
        return {
            "engines": len(self._registry.engines),
            "queue": {state.value: counts[state] for state in TaskState},
            "tasks_per_second": tasks_per_s,
            "failures_per_second": failures_per_s,
            "succeeded_total": self.succeeded,
            "failed_total": self.failed,
            "aborted_total": self.aborted,
            "retried_total": self.retried,
        }

    def _running_by_engine(self) -> dict[int, list[tuple[float, int]]]:
        """engine id -> (dispatched at, taskid) of its running tasks, oldest first."""
        running: dict[int, list[tuple[float, int]]] = {}
        for taskid, (engine_id, start) in list(self._started.items()):
            running.setdefault(engine_id, []).append((start, taskid))
        for runs in running.values():
            runs.sort()
        return running

    def engines(self, limit: int = 256) -> list[dict]:
        """One row per engine (the first `limit` by id): host, pid, state,
        properties, current task (the oldest of its running ones: an
        engine runs its tasks in order), tasks done, seconds since heard."""
        now = self._clock.seconds()
        running = self._running_by_engine()
        rows = []
        for engine_id in sorted(self._registry.engines)[:limit]:
            engine = self._registry.engines[engine_id]
            props = engine.properties
            mine = running.get(engine_id, ())
            lane = self._lanes.get(engine_id)
            rows.append(
                {
                    "engine_id": engine_id,
                    "host": str(props.get("hostname", "")),
                    "pid": props.get("pid"),
                    "state": engine.state.value,
                    "properties": {
                        str(k): _short(v) for k, v in list(props.items())[:20]
                        if k not in ("hostname", "pid")
                    },
                    "current_task": mine[0][1] if mine else None,
                    "running": len(mine),
                    "tasks_done": 0 if lane is None else lane.done,
                    "heard_ago": max(0.0, now - engine.last_heard),
                }
            )
        return rows

    def timeline(self, window: float = 30.0, per_engine: int = 60) -> dict:
        """Recent runs per engine within the last `window` seconds (at
        most `per_engine` each, and as many running ones), running ones
        with no end; times relative to now (negative seconds)."""
        now = self._clock.seconds()
        since = now - window
        running = self._running_by_engine()
        lanes = {}
        for engine_id in sorted(self._registry.engines)[:256]:
            runs = []
            lane = self._lanes.get(engine_id)
            for taskid, start, end, how in reversed(lane.runs if lane is not None else ()):
                if end < since or len(runs) >= per_engine:
                    break
                runs.append([taskid, round(start - now, 4), round(end - now, 4), how])
            for start, taskid in running.get(engine_id, ())[:per_engine]:
                runs.append([taskid, round(start - now, 4), None, "running"])
            lanes[str(engine_id)] = runs
        return {"window": window, "lanes": lanes}

    def failures(self, limit: int = 20) -> list[dict]:
        """The most recent final failures, newest first."""
        now = self._clock.seconds()
        recent = list(self._failures)[-limit:]
        return [dict(f, ago=max(0.0, now - f["at"])) for f in reversed(recent)]

    def task(self, taskid: int) -> dict | None:
        """What is known of task `taskid`: state, attempts (with engines and
        errors), timings; None if the store does not know it."""
        record = self._store.tasks.get(taskid)
        if record is None:
            return None
        now = self._clock.seconds()
        info = {
            "taskid": taskid,
            "state": record.state.value,
            "kind": record.spec.kind,
            "attempts": record.attempts,
            "retries_left": record.retries_left,
            "recovery_link": record.link,
            "engine_id": record.engine_id,
            "submitted_ago": max(0.0, now - record.submitted),
            "started": record.started,
            "completed": record.completed,
            "ran_for": None
            if record.started is None or record.completed is None
            else record.completed - record.started,
            "failed_attempts": list(self._attempts.get(taskid, ())),
            "error": None,
        }
        if record.is_final and not record.ok and record.data is not None:
            name, message, traceback = _error_parts(record.data)
            info["error"] = {"error": name, "message": message, "traceback": traceback}
        return info


def _short(value: object, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:
        text = "<%s>" % type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
