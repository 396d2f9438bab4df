#!/usr/bin/env python
"""Durability soak: mixed tasks through `taskfarm cluster` while its
controller is SIGKILLed again and again.

    .venv/bin/python bench/durability.py [--runs 3] [--tasks 3000] [--kills 12]

Each run starts ``taskfarm cluster -n 4`` in a temporary profile, and a
blocking client in a process of its own (this file with ``--client``) that
submits the tasks, waits at one `barrier`, fetches every result with
`get_task_results` and checks each one.  Meanwhile this process SIGKILLs
the controller (the launcher's child named ``taskcontroller``, by PID,
checked against its /proc start time) `--kills` times.  The launcher starts
it again on the same profile and port, with its back-off (doubling after
each quick death, up to 30 s), and the journal gives back the tasks.  Each
first kill comes once a twentieth of the tasks are in, while the client
still submits; each later one waits until the new controller answers, has
been up `--spacing` seconds, has finished a task since it came back, and
the run has reached its share of the work, so the kills spread over the
whole run.  With the launcher's back-off, 12 kills take about 5 minutes.

The tasks, by number n (kind = n % 6), each return ``(n, value)`` so that a
result given to the wrong task shows:

    0  Task, push/pull
    1  Task, retries=2, depend that every engine meets
    2  MapTask (a function of this file, pickled by value)
    3  MapTask, retries=1, depend
    4  MapTask that always fails, retries=1, and a recovery MapTask that
       gives the right value
    5  Task with a recovery Task that would give a wrong value (it must
       not run)

Blocks of 50 go alternately through `run()` one by one and `run_many()`.

One JSON line per run: ``lost`` (no id, or unfinished after the barrier),
``duplicated`` (an id handed out twice, a result naming another task, or
more tasks in the controller than were submitted), ``wrong`` (a failure,
or the right task with a wrong value), failures by type, kills done,
elapsed seconds, the longest single client call while submitting
(``client_stall_max_s``), ``submit_errors`` and ``call_errors`` (a
`run`/`run_many`, `barrier` or `get_task_results` that raised; the last
two are made again, up to 5 times, as a user would) and processes left
after the launcher stopped.  A last line sums the runs.  Exit status 0
when every run had all its kills and nothing was lost, duplicated or
wrong, and no client call raised; 1 when something was lost, duplicated
or wrong, a client call raised, or a run got stuck; 2 when a run could
not be measured (the cluster did not start, or the work ended before all
the kills).

Every wait is bounded; at the end the launcher gets SIGTERM and whatever
it started and is still alive gets SIGKILL, by PID.  The temporary profile
is removed, unless the run failed or ``--keep`` is given: its logs
(``log/controller.out`` and friends) are then kept and their path printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # this checkout's taskfarm, for us and our children

from taskfarm.testing.helpers import children_of, is_alive  # noqa: E402
from taskfarm.testing.processes import kill_if_alive  # noqa: E402

KINDS = (
    "task",
    "task_retry_depend",
    "map",
    "map_retry_depend",
    "map_recovery",
    "task_unused_recovery",
)
BLOCK = 50
#: How many times the client makes a failed barrier or fetch again.
CALL_ATTEMPTS = 5


def value_of(n: int) -> int:
    return (n * 7919) % 10007


def expected(n: int) -> tuple:
    v = value_of(n)
    return (n, v * v + n)


# -- run on the engines (pickled by value: this file is __main__ in the client) --


def work(n, v, cost):
    """The MapTask body: sleep `cost`, then answer with the task number."""
    import time

    time.sleep(cost)
    return (n, v * v + n)


def always_fails(n, cost):
    import time

    time.sleep(cost)
    raise ValueError("task %d fails on purpose, its recovery task answers" % n)


def every_engine(properties):
    return "pid" in properties


TASK_CODE = "import time\ntime.sleep(cost)\na = (n, v * v + n)"
WRONG_CODE = "a = (n, 'the recovery task ran though the task succeeded')"


def make_task(n: int, cost: float):
    from taskfarm.client import MapTask, Task

    v = value_of(n)
    kind = n % len(KINDS)
    push = {"n": n, "v": v, "cost": cost}
    if kind == 0:
        return Task(TASK_CODE, push=push, pull="a")
    if kind == 1:
        return Task(TASK_CODE, push=push, pull="a", retries=2, depend=every_engine)
    if kind == 2:
        return MapTask(work, args=(n, v, cost))
    if kind == 3:
        return MapTask(work, args=(n, v, cost), retries=1, depend=every_engine)
    if kind == 4:
        return MapTask(
            always_fails, args=(n, cost), retries=1, recovery_task=MapTask(work, args=(n, v, cost))
        )
    return Task(
        TASK_CODE, push=push, pull="a", recovery_task=Task(WRONG_CODE, push={"n": n}, pull="a")
    )


# -- the client process ------------------------------------------------------------


def client_main(profile: str, count: int, cost: float, deadline_s: float) -> int:
    from taskfarm import client

    started = time.time()
    report: dict = {"count": count}
    say_lock = threading.Lock()
    said = []

    def say(extra: dict) -> None:
        with say_lock:
            if said:
                return
            said.append(True)
            report.update(extra)
            print("REPORT " + json.dumps(report), flush=True)

    tc = client.TaskClient(profile)
    ids: list = [None] * count
    errors: dict = {}
    stall = 0.0
    # Submission: blocks of BLOCK tasks, alternately run() one by one and run_many().
    for start in range(0, count, BLOCK):
        numbers = range(start, min(count, start + BLOCK))
        tasks = [make_task(n, cost) for n in numbers]
        if (start // BLOCK) % 2 == 0:
            for n, task in zip(numbers, tasks, strict=True):
                t0 = time.time()
                try:
                    ids[n] = tc.run(task)
                except Exception as e:
                    errors["run: " + type(e).__name__] = (
                        errors.get("run: " + type(e).__name__, 0) + 1
                    )
                stall = max(stall, time.time() - t0)
        else:
            t0 = time.time()
            try:
                for n, taskid in zip(numbers, tc.run_many(tasks), strict=True):
                    ids[n] = taskid
            except Exception as e:
                key = "run_many: " + type(e).__name__
                errors[key] = errors.get(key, 0) + len(tasks)
            stall = max(stall, time.time() - t0)
    t0 = time.time()
    try:
        tc.confirm()
    except Exception as e:
        errors["confirm: " + type(e).__name__] = 1
    stall = max(stall, time.time() - t0)
    submitted = time.time()
    report.update(
        submit_errors=errors,
        client_stall_max_s=round(stall, 3),
        submit_s=round(submitted - started, 2),
    )
    known = [taskid for taskid in ids if taskid is not None]

    def watchdog() -> None:
        # The barrier has no timeout of its own: past the deadline, say
        # which tasks are unfinished and end.
        time.sleep(max(1.0, started + deadline_s - time.time()))
        unfinished = []
        try:
            answers = tc.get_task_results(known, block=False)
            by_id = {taskid: n for n, taskid in enumerate(ids) if taskid is not None}
            unfinished = [
                [taskid, KINDS[by_id[taskid] % len(KINDS)]]
                for taskid, a in zip(known, answers, strict=True)
                if a is None
            ]
            status = tc.queue_status()
        except Exception as e:
            status = "queue_status failed: %r" % (e,)
        say(
            {
                "stuck": True,
                "stuck_after_s": deadline_s,
                "unfinished": unfinished[:50],
                "unfinished_count": len(unfinished),
                "status": status,
            }
        )
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    # A call that fails (it should not: both are safe to repeat, and the
    # client reconnects by itself) is recorded, then made again, as a user
    # would; a bounded number of times.
    call_errors: list = []

    def again(name, call):
        for attempt in range(CALL_ATTEMPTS):
            t0 = time.time()
            try:
                return call()
            except Exception as e:
                call_errors.append(
                    {
                        "call": name,
                        "error": "%s: %s" % (type(e).__name__, str(e)[:300]),
                        "call_began_s": round(t0 - started, 2),
                        "failed_after_s": round(time.time() - t0, 2),
                    }
                )
                if attempt == CALL_ATTEMPTS - 1:
                    raise
        return None

    report["call_errors"] = call_errors
    try:
        again("barrier", lambda: tc.barrier(known))
        waited = time.time()
        answers = again("get_task_results", lambda: tc.get_task_results(known))
    except Exception:
        say({"stuck": True, "gave_up": "after %d attempts" % CALL_ATTEMPTS})
        raise
    fetched = time.time()
    results = dict(zip(known, answers, strict=True))

    lost, duplicated, wrong = [], [], []
    failures: dict = {}
    by_kind = {k: {"ok": 0, "bad": 0} for k in KINDS}
    for n, taskid in enumerate(ids):
        kind = KINDS[n % len(KINDS)]
        if taskid is None:
            lost.append([n, None, kind, "no id"])
            by_kind[kind]["bad"] += 1
            continue
        answer = results[taskid]
        if answer is None:
            lost.append([n, taskid, kind, "unfinished"])
            by_kind[kind]["bad"] += 1
            continue
        if isinstance(answer, client.TaskResult):
            if answer.taskid != taskid:
                duplicated.append([n, taskid, kind, "result of task id %s" % answer.taskid])
                by_kind[kind]["bad"] += 1
                continue
            if answer.failure is not None:
                got: object = answer.failure
            else:
                got = answer.results.get("a")
                got = tuple(got) if isinstance(got, (list, tuple)) else got
        else:
            got = answer
        if isinstance(got, BaseException):
            name = type(got).__name__
            failures[name] = failures.get(name, 0) + 1
            wrong.append([n, taskid, kind, "%s: %s" % (name, str(got)[:200])])
        elif got == expected(n):
            by_kind[kind]["ok"] += 1
            continue
        elif isinstance(got, tuple) and got and got[0] != n:
            duplicated.append([n, taskid, kind, "result of task %r" % (got[0],)])
        else:
            wrong.append([n, taskid, kind, "got %r" % (got,)])
        by_kind[kind]["bad"] += 1
    seen: dict = {}
    for n, taskid in enumerate(ids):
        if taskid is not None and taskid in seen:
            duplicated.append(
                [n, taskid, KINDS[n % len(KINDS)], "id also given to task %d" % seen[taskid]]
            )
        elif taskid is not None:
            seen[taskid] = n
    try:
        status = tc.queue_status()
    except Exception as e:
        status = {"error": repr(e)}
    tc.close()
    say(
        {
            "stuck": False,
            "distinct_ids": len(seen),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "wrong": len(wrong),
            "failures": failures,
            "examples": {"lost": lost[:20], "duplicated": duplicated[:20], "wrong": wrong[:20]},
            "by_kind": by_kind,
            "status": status,
            "barrier_s": round(waited - submitted, 2),
            "fetch_s": round(fetched - waited, 2),
            "client_s": round(fetched - started, 2),
        }
    )
    return 0


class Run:
    """One soak run: a cluster, a client, the kills, the clean-up."""

    def __init__(self, args, number: int) -> None:
        self.args = args
        self.number = number
        self.root = tempfile.mkdtemp(prefix="taskfarm-durability-")
        self.profile = os.path.join(self.root, "profile")
        #: Every descendant of the launcher seen: {pid: start time}.
        self.seen: dict = {}
        self.launcher: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self.files: list = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("TASKFARM_PROFILE", None)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [REPO] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )

    def spawn(self, argv, name):
        out = open(os.path.join(self.root, name + ".out"), "wb")
        self.files.append(out)
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=self.env
        )

    def output(self, name) -> str:
        with open(os.path.join(self.root, name + ".out"), errors="replace") as f:
            return f.read()

    def scan(self) -> dict:
        """The launcher's children now ({pid: (start, cmdline)}); every
        descendant is remembered for the clean-up."""
        found = children_of(self.launcher.pid)
        todo = list(found)
        for pid, (started, _) in found.items():
            self.seen[pid] = started
        while todo:
            for pid, (started, _) in children_of(todo.pop()).items():
                if pid not in self.seen:
                    self.seen[pid] = started
                    todo.append(pid)
        return found

    def controllers(self) -> dict:
        return {
            pid: started for pid, (started, cmd) in self.scan().items() if "taskcontroller" in cmd
        }

    def status(self, monitor):
        from taskfarm.errors import TaskfarmError

        try:
            return monitor.queue_status()
        except TaskfarmError:
            return None

    def execute(self) -> dict:
        args = self.args
        t_start = time.time()
        self.launcher = self.spawn(
            [
                sys.executable,
                "-c",
                "from taskfarm.cli import main; main()",
                "cluster",
                "-n",
                str(args.engines),
                "--profile-dir",
                self.profile,
            ],
            "launcher",
        )
        deadline = time.time() + 120
        while "Press Ctrl-C to stop." not in self.output("launcher"):
            if self.launcher.poll() is not None or time.time() > deadline:
                return {
                    "error": "the cluster did not start",
                    "launcher": self.output("launcher")[-3000:],
                }
            time.sleep(0.1)
        ((controller, started),) = self.controllers().items()

        from taskfarm import client as tfclient

        monitor = tfclient.TaskClient(self.profile, connect_timeout=2, reconnect_timeout=0.5)
        self.client = self.spawn(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--client",
                self.profile,
                str(args.tasks),
                str(args.cost),
                str(args.client_deadline),
            ],
            "client",
        )
        t_client = time.time()
        kills, downs = [], []
        came_back = time.time()
        done_at_back = 0
        ended_by = "all kills done"
        run_deadline = t_client + args.client_deadline
        while len(kills) < args.kills:
            if self.client.poll() is not None:
                ended_by = "client finished"
                break
            if time.time() > run_deadline:
                ended_by = "time limit"
                break
            status = self.status(monitor)
            done = (
                0 if status is None else status["succeeded"] + status["failed"] + status["aborted"]
            )
            known = 0 if status is None else sum(status.values())
            share = args.tasks * len(kills) / (args.kills + 1)
            # The first kill lands while the client submits (a twentieth of
            # the tasks in); each later one once the new controller has been
            # up `spacing` seconds, finished a task, and the run its share.
            if not kills:
                ready = status is not None and known >= args.tasks * 0.05
            else:
                ready = (
                    status is not None
                    and time.time() - came_back >= args.spacing
                    and done > done_at_back
                    and done >= share
                )
            if not ready:
                time.sleep(0.05)
                continue
            current = self.controllers()
            if current.get(controller) != started:
                return {
                    "error": "controller %d is not the launcher's child any more: %r"
                    % (controller, current)
                }
            if not kill_if_alive(controller, started):
                return {"error": "controller %d gone before its kill" % controller}
            killed_at = time.time()
            kills.append({"at_s": round(killed_at - t_client, 2), "known": known, "done": done})
            # The launcher starts a new one (after its back-off): wait for
            # its pid, then for it to answer.
            new = None
            while time.time() < killed_at + 120 and new is None:
                fresh = {p: s for p, s in self.controllers().items() if p != controller}
                new = next(iter(fresh.items()), None)
                time.sleep(0.05)
            if new is None:
                return {"error": "no new controller within 120 s of kill %d" % len(kills)}
            controller, started = new
            back_status = None
            while time.time() < killed_at + 180 and back_status is None:
                back_status = self.status(monitor)
                if back_status is None:
                    time.sleep(0.1)
            if back_status is None:
                return {"error": "the new controller %d did not answer within 180 s" % controller}
            came_back = time.time()
            done_at_back = back_status["succeeded"] + back_status["failed"] + back_status["aborted"]
            downs.append(round(came_back - killed_at, 2))
        # The client finishes by itself (its watchdog reports a stuck run).
        while self.client.poll() is None and time.time() < t_client + args.client_deadline + 60:
            time.sleep(0.2)
        if self.client.poll() is None:
            self.client.kill()
            self.client.wait(10)
        elapsed = time.time() - t_client
        reports = [x for x in self.output("client").splitlines() if x.startswith("REPORT ")]
        result: dict = {"run": self.number}
        if len(reports) != 1:
            result.update(
                error="client ended (status %s) without a report" % self.client.returncode,
                client=self.output("client")[-3000:],
            )
        else:
            result.update(json.loads(reports[0][len("REPORT ") :]))
        final = self.status(monitor)
        monitor.close()
        controller_total = sum(final.values()) if final else None
        if (
            controller_total is not None
            and controller_total > args.tasks
            and "duplicated" in result
        ):
            result["duplicated"] += controller_total - args.tasks
            result["extra_tasks_in_controller"] = controller_total - args.tasks
        restarts = self.output("launcher").count("starting it again")
        result.update(
            kills_done=len(kills),
            kills_asked=args.kills,
            chaos_ended_by=ended_by,
            kills=kills,
            controller_down_s=downs,
            controller_down_max_s=max(downs) if downs else 0,
            controller_tasks_at_end=final,
            elapsed_s=round(elapsed, 1),
            setup_s=round(t_client - t_start, 1),
            restart_lines_in_launcher_out=restarts,
        )
        return result

    def cleanup(self) -> dict:
        """SIGTERM the launcher; SIGKILL whatever it started that is left."""
        left_after_stop = []
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait(10)
        if self.launcher is not None:
            if self.launcher.poll() is None:
                self.scan()
                self.launcher.send_signal(signal.SIGTERM)
                try:
                    self.launcher.wait(60)
                except subprocess.TimeoutExpired:
                    self.launcher.kill()
                    self.launcher.wait(10)
            left_after_stop = [pid for pid, started in self.seen.items() if is_alive(pid, started)]
            for pid in left_after_stop:
                kill_if_alive(pid, self.seen[pid])
        for f in self.files:
            f.close()
        return {
            "launcher_status": self.launcher.returncode if self.launcher else None,
            "left_after_stop": left_after_stop,
        }


def bad(result: dict) -> bool:
    return bool(
        result.get("stuck")
        or result.get("lost")
        or result.get("duplicated")
        or result.get("wrong")
        or result.get("call_errors")
        or result.get("submit_errors")
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        profile, count, cost, deadline = (
            sys.argv[2],
            int(sys.argv[3]),
            float(sys.argv[4]),
            float(sys.argv[5]),
        )
        return client_main(profile, count, cost, deadline)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--cost", type=float, default=0.01, help="seconds each task sleeps")
    ap.add_argument(
        "--spacing",
        type=float,
        default=1.5,
        help="least seconds a controller is up before its kill",
    )
    ap.add_argument(
        "--client-deadline",
        type=float,
        default=900.0,
        help="seconds the client may take before it reports the unfinished tasks and ends",
    )
    ap.add_argument("--keep", action="store_true", help="keep every run's profile and logs")
    args = ap.parse_args()
    if args.runs < 1 or args.tasks < 1 or args.kills < 0:
        ap.error("--runs and --tasks must be >= 1, --kills >= 0")

    # SIGTERM (or Ctrl-C) ends the run in hand through its clean-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = []
    for number in range(1, args.runs + 1):
        run = Run(args, number)
        try:
            result = run.execute()
        except Exception as e:
            result = {"run": number, "error": "%s: %s" % (type(e).__name__, e)}
        except KeyboardInterrupt:
            result = {"run": number, "error": "interrupted"}
        finally:
            try:
                cleaned = run.cleanup()
            except Exception as e:
                cleaned = {"cleanup_error": repr(e)}
        if result.get("error") == "interrupted":
            shutil.rmtree(run.root, ignore_errors=True)
            print(json.dumps(dict(result, **cleaned)), flush=True)
            return 130
        result.update(cleaned)
        failed = bad(result) or "error" in result or result.get("kills_done", 0) < args.kills
        if failed or args.keep:
            result["kept"] = run.root
        else:
            shutil.rmtree(run.root, ignore_errors=True)
        results.append(result)
        print(json.dumps(result), flush=True)

    summary = {
        "summary": True,
        "runs": len(results),
        "tasks_per_run": args.tasks,
        "kills_asked": args.kills,
        "kills_done": [r.get("kills_done") for r in results],
        "lost": sum(r.get("lost", 0) for r in results),
        "duplicated": sum(r.get("duplicated", 0) for r in results),
        "wrong": sum(r.get("wrong", 0) for r in results),
        "stuck_runs": sum(1 for r in results if r.get("stuck")),
        "client_call_errors": sum(len(r.get("call_errors", [])) for r in results),
        "submit_errors": sum(sum(r.get("submit_errors", {}).values()) for r in results),
        "errors": [r["error"] for r in results if "error" in r],
        "elapsed_s": [r.get("elapsed_s") for r in results],
        "client_stall_max_s": [r.get("client_stall_max_s") for r in results],
        "controller_down_max_s": [r.get("controller_down_max_s") for r in results],
        "left_after_stop": sum(len(r.get("left_after_stop", [])) for r in results),
    }
    print(json.dumps(summary), flush=True)
    if any(bad(r) for r in results):
        return 1
    if summary["errors"] or any(r.get("kills_done", 0) < args.kills for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
