#!/usr/bin/env python
"""taskfarm benchmarks: a controller and 4 engines on this machine, loopback,
measured with the BLOCKING client (`taskfarm.client.TaskClient`).

    python bench/taskfarm_bench.py [--reps 3] [--quick] [--groups core,nojournal,queue,memory,data]

Each group runs in a child process of its own, on a fresh cluster (started
by bench/tfcluster.py with `taskfarm.cluster.launcher.Cluster`, in a
temporary profile), bounded by a deadline per phase (a watchdog thread) and
by a deadline for the whole child (this process ends its session).  Every
process is stopped by PID, and the controller and engine PIDs are checked
gone afterwards.  Metrics are printed as JSON lines (bench, system, metric,
value, unit, run, extras) and appended to bench/results/taskfarm.jsonl.

Groups and workloads (letters as in docs/performance.md):
  core       (a) bulk: tc.map(noop, range(N)), again with a shared `depend`; batch: run_many + barrier +
             get_task_results; (b) one by one: tc.run(MapTask) x N, barrier;
             (c) round trip: run + get_task_result(block=True); (d) 100 x 1 MiB
             results; (e) fairness: 80 x sleep(0.1) on 4 engines
  nojournal  (f) the bulk map again with `--no-journal` (journal on/off ratio)
  queue      (g) queue growth to --queue-total tasks in run_many batches of
             10,000, controller RSS and submit cost per batch, then the drain;
             again with half the tasks carrying one shared `depend` predicate
  memory     (h) controller RSS per finished task after results are fetched
             and cleared
  data       (i) a --data-mb (200) MiB NumPy array pushed, pulled and returned
             as a task result on one engine: MB/s, and peak RSS growth of the
             client, controller and engine / payload (DATA_WORKLOADS); the
             journal's disk use after clear()
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import CpuMeter, Emitter, MiB, Watchdog  # noqa: E402

ENGINES = 4


# -- the work (module level in __main__: cloudpickle ships them by value, as
# the peers' scripts do) ----------------------------------------------------------


def noop(x):
    return x


def big(i, n=MiB):
    # incompressible, made once per engine process and reused
    import os
    import sys

    cache = sys.__dict__.setdefault("_taskfarm_bench_cache", {})
    b = cache.get(n)
    if b is None:
        b = cache[n] = os.urandom(n)
    return b


def sleeper(i, seconds=0.1):
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def always(properties):
    return True


# -- the cluster -------------------------------------------------------------------


class BenchCluster:
    """bench/tfcluster.py as a child process; knows every PID it started."""

    def __init__(self, controller_options=(), n=ENGINES, start_timeout=90.0) -> None:
        self.root = tempfile.mkdtemp(prefix="tfbench-")
        self.profile = os.path.join(self.root, "profile")
        argv = [sys.executable, os.path.join(benchlib.HERE, "tfcluster.py"),
                "--profile-dir", self.profile, "-n", str(n),
                "--start-timeout", str(start_timeout)]
        argv += ["--controller-opt=%s" % o for o in controller_options]
        self.log = open(os.path.join(self.root, "launcher.err"), "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.controller_pid = None
        self.engine_pids: list[int] = []
        line = benchlib.read_line(self.proc.stdout, start_timeout * 2 + 10)
        info = json.loads(line) if line else {"ready": False, "error": "no answer from tfcluster.py"}
        if not info.get("ready"):
            self.stop()
            raise RuntimeError("cluster did not start: %s (logs in %s)" % (info.get("error"), self.root))
        self.controller_pid = info["controller_pid"]
        self.engine_pids = info["engine_pids"]
        self.startup_s = time.perf_counter() - self.t0

    def add_engines(self, k: int, timeout: float = 30.0) -> list[int]:
        """Start k more engines (the launcher's `add_engine`); their PIDs."""
        self.proc.stdin.write(b"add %d\n" % k)
        self.proc.stdin.flush()
        line = benchlib.read_line(self.proc.stdout, timeout)
        added = json.loads(line).get("added") if line else None
        if not added:
            raise RuntimeError("the launcher did not add engines: %r" % (line,))
        self.engine_pids.extend(added)
        return added

    @property
    def pids(self) -> list[int]:
        return [p for p in [self.proc.pid, self.controller_pid, *self.engine_pids] if p]

    def stop(self, keep_logs: bool = False) -> list[int]:
        """Close the launcher's stdin and SIGTERM it (it stops the controller
        and engines); SIGKILL anything of ours still alive after that."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.terminate()
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        except OSError:
            pass
        leftovers = benchlib.kill_pids([self.controller_pid, *self.engine_pids], grace=3.0)
        self.log.close()
        if not keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)
        return leftovers

    def emergency_stop(self) -> None:
        """From the watchdog thread: no waiting on pipes, just PIDs."""
        benchlib.kill_pids(self.pids, grace=3.0)


# -- workloads ---------------------------------------------------------------------


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_core(args, emit, wd, cl, tc, meter_roles):
    from taskfarm.client import MapTask

    n = args.n
    # warm: every engine has unpickled noop once
    tc.map(noop, range(16))

    # (a) bulk, map
    wd.phase("bulk_map", args.phase_timeout)
    cpu = CpuMeter(meter_roles).start()
    dt, res = timed(lambda: tc.map(noop, range(n)))
    extra = cpu.per_task(n)
    assert len(res) == n and res[-1] == n - 1 and res[n // 2] == n // 2
    emit("bulk_map_tasks_s", n / dt, "tasks/s", n=n, wall_s=round(dt, 3), **extra)

    # (a) bulk with depend: the same map, every task carrying one shared
    # depend predicate (evaluated in the controller's evaluator processes)
    wd.phase("bulk_depend_map", args.phase_timeout)
    cpu = CpuMeter(meter_roles).start()
    dt, res = timed(lambda: tc.map(noop, range(n), depend=always))
    extra = cpu.per_task(n)
    assert len(res) == n and res[-1] == n - 1 and res[n // 2] == n // 2
    emit("bulk_depend_map_tasks_s", n / dt, "tasks/s", n=n, wall_s=round(dt, 3), **extra)

    # (a) bulk, batch: run_many + barrier + get_task_results
    wd.phase("bulk_batch", args.phase_timeout)
    cpu = CpuMeter(meter_roles).start()
    t0 = time.perf_counter()
    ids = tc.run_many([MapTask(noop, (i,)) for i in range(n)])
    t_submit = time.perf_counter() - t0
    tc.barrier(ids)
    t_barrier = time.perf_counter() - t0
    res = tc.get_task_results(ids)
    dt = time.perf_counter() - t0
    extra = cpu.per_task(n)
    assert res == list(range(n)), "batch results wrong"
    tc.clear(ids)
    emit("bulk_batch_tasks_s", n / dt, "tasks/s", n=n, wall_s=round(dt, 3),
         submit_s=round(t_submit, 3), barrier_s=round(t_barrier, 3), **extra)

    # (b) one by one: tc.run x N, then barrier (+ one get_task_results)
    wd.phase("onebyone", args.phase_timeout)
    budget = min(args.onebyone_budget, max(5.0, wd.left() - 30))
    cpu = CpuMeter(meter_roles).start()
    ids = []
    t0 = time.perf_counter()
    stop_at = t0 + budget
    for i in range(n):
        ids.append(tc.run(MapTask(noop, (i,))))
        if (i & 63) == 0 and time.perf_counter() > stop_at:
            break
    t_submit = time.perf_counter() - t0
    tc.barrier(ids)
    t_barrier = time.perf_counter() - t0
    res = tc.get_task_results(ids)
    dt = time.perf_counter() - t0
    done = len(ids)
    extra = cpu.per_task(done)
    assert res == list(range(done)), "one-by-one results wrong"
    tc.clear(ids)
    note = {} if done == n else {"note": "stopped at %d of %d (time budget %.0f s)" % (done, n, budget)}
    emit("onebyone_tasks_s", done / dt, "tasks/s", n=done, wall_s=round(dt, 3),
         submit_s=round(t_submit, 3), desc="run loop + barrier + get_task_results", **note, **extra)
    emit("onebyone_barrier_tasks_s", done / t_barrier, "tasks/s", n=done,
         wall_s=round(t_barrier, 3), desc="run loop + barrier", **note)
    emit("run_call_us", t_submit / done * 1e6, "us", n=done, desc="one blocking tc.run")

    # (c) round trip: run + get_task_result(block=True), each split into
    # its legs by the task's own timestamps; then the blocking client's
    # sub-paths and the raw Foolscap floor, measured now, on the same load
    wd.phase("rtt", args.phase_timeout)
    for i in range(10):  # warm
        tc.get_task_result(tc.run(MapTask(noop, (i,))), block=True)
    cpu = CpuMeter(meter_roles).start()
    lat, legs = rtt_legs(tc, args.rtt, time.monotonic() + args.phase_timeout / 2)
    # CPU per round trip by process (user + system): on a machine with few
    # free cores, the round trip's wall time follows it
    extra = cpu.per_task(len(lat))
    tc.clear()
    emit("rtt_ms_median", statistics.median(lat) * 1e3, "ms", n=len(lat), **extra)
    emit("rtt_ms_p99", benchlib.pct(lat, 99) * 1e3, "ms", n=len(lat))
    for (name, desc) in LEGS:
        if legs[name]:
            emit("rtt_leg_%s_us" % name, statistics.median(legs[name]) * 1e6, "us",
                 n=len(legs[name]), desc=desc)
    wd.phase("hops", args.phase_timeout)
    for name, value in hop_costs(tc, 200, time.monotonic() + 20).items():
        emit(name, value, "us", n=200)
    wd.phase("foolscap_floor", args.phase_timeout)
    floor = foolscap_floor(min(90.0, args.phase_timeout))
    if "error" in floor:
        emit("error", 1, "flag", group="core", error="foolscap floor: %s" % floor["error"])
    else:
        emit("fc_seq_rtt_us_median", floor["seq_us_median"], "us", n=floor["seq_n"],
             desc="raw Foolscap sequential callRemote round trip (bench/fcfloor.py)")
        emit("fc_seq_rtt_us_p99", floor["seq_us_p99"], "us", n=floor["seq_n"])
        emit("fc_seq_cpu_us", floor["seq_cpu_us_client"] + floor["seq_cpu_us_server"], "us",
             n=floor["seq_n"], client=round(floor["seq_cpu_us_client"], 1),
             server=round(floor["seq_cpu_us_server"], 1),
             desc="CPU (user + system) of both processes per raw Foolscap round trip")
        emit("fc_echo1MB_MBps", floor["echo1MB_MBps"], "MB/s", n=floor["echo_n"],
             desc="raw Foolscap echo of 1 MiB bytes, 4 outstanding")
        emit("rtt_over_fc_rtt", statistics.median(lat) * 1e6 / floor["seq_us_median"], "x",
             desc="taskfarm round trip median / raw Foolscap round trip median, same run")

    # (d) 100 x 1 MiB results
    wd.phase("ret1MB", args.phase_timeout)
    tc.map(big, range(2 * ENGINES))  # warm the per-engine payload cache
    cpu = CpuMeter(meter_roles).start()
    dt, res = timed(lambda: tc.map(big, range(args.big)))
    extra = cpu.per_task(args.big)
    assert len(res) == args.big and all(len(b) == MiB for b in res)
    del res
    emit("ret1MB_MBps", args.big * MiB / dt / 1e6, "MB/s", n=args.big, wall_s=round(dt, 3), **extra)

    # (e) fairness: 80 x sleep(0.1) on 4 engines, ideal 2.0 s
    wd.phase("fairness", args.phase_timeout)
    k, s = args.fair_tasks, 0.1
    ideal = k * s / ENGINES
    dt, pids = timed(lambda: tc.map(sleeper, range(k)))
    counts = sorted((pids.count(p) for p in set(pids)), reverse=True)
    emit("fairness_wall_s", dt, "s", n=k, ideal_s=ideal, per_engine=counts)
    emit("fairness_ratio", dt / ideal, "x", n=k, ideal_s=ideal, per_engine=counts,
         desc="wall / ideal (1.0 is perfect)")


#: The legs of one task's round trip, as `rtt_legs` splits it (t0: the
#: client calls run; submitted: the controller accepts it, controller clock;
#: started/completed: the engine runs it, engine clock; t1: the client has
#: the value; all clocks are this host's time.time()).
LEGS = (
    ("client_to_controller", "run + get_task_result leave the client, the submit reaches the controller"),
    ("controller_to_engine", "accepted -> running on the engine (journal, dispatch, command message, worker hand-off)"),
    ("on_engine", "the task runs in the engine's worker thread"),
    ("engine_to_client", "finished -> the value in the calling thread (reply message, store, results answer)"),
)


def rtt_legs(tc, n: int, deadline: float) -> tuple[list[float], dict[str, list[float]]]:
    """`n` round trips of `tc.run(MapTask(noop))` + `get_task_result(block=True)`,
    each split into `LEGS` by the task's own timestamps (bench-only: the
    result envelope is read where the client presents it).  Returns the
    round trips (s) and the legs (s) per sample."""
    from taskfarm import taskclient
    from taskfarm.client import MapTask

    seen = []
    present = taskclient._present

    def keep(envelope, raising=True):
        seen.append(envelope)
        return present(envelope, raising)

    taskclient._present = keep
    lat: list[float] = []
    legs: dict[str, list[float]] = {name: [] for name, _ in LEGS}
    try:
        for i in range(n):
            seen.clear()
            t0 = time.time()
            p0 = time.perf_counter()
            value = tc.get_task_result(tc.run(MapTask(noop, (i,))), block=True)
            lat.append(time.perf_counter() - p0)
            t1 = time.time()
            assert value == i
            env = seen[-1]
            if env.started is not None and env.completed is not None:
                for name, v in zip(
                    (name for name, _ in LEGS),
                    (env.submitted - t0, env.started - env.submitted,
                     env.completed - env.started, t1 - env.completed),
                    strict=True,
                ):
                    legs[name].append(v)
            if time.monotonic() > deadline:
                break
    finally:
        taskclient._present = present
    return lat, legs


def hop_costs(tc, n: int, deadline: float) -> dict[str, float]:
    """Medians (us) of the blocking client's sub-paths: a no-op call into the
    reactor thread and back, and one controller call (`engine_ids`)."""
    from taskfarm import reactorthread

    out = {}
    for name, fn in (("thread_hop_us", lambda: reactorthread.call(lambda: None)),
                     ("controller_call_us", tc.engine_ids)):
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
            if time.monotonic() > deadline:
                break
        out[name] = statistics.median(xs) * 1e6
    return out


def foolscap_floor(timeout: float = 90.0) -> dict:
    """bench/fcfloor.py in a child process: the raw Foolscap sequential
    round trip and 1 MB echo, measured now, on this machine's load."""
    argv = [sys.executable, os.path.join(benchlib.HERE, "fcfloor.py"), "--deadline", str(max(10.0, timeout - 20))]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}


# -- (i) the data path: one large NumPy array each way ------------------------------


def bench_array(mb):
    """A float64 array of `mb` MiB, made once per process and reused."""
    import sys

    import numpy

    cache = sys.__dict__.setdefault("_taskfarm_bench_arrays", {})
    a = cache.get(mb)
    if a is None:
        a = cache[mb] = numpy.arange(mb * (1 << 20) // 8, dtype=numpy.float64)
    return a


def array_ready(mb):
    bench_array(mb)
    return True


def _push(ctx) -> int:
    ctx.mec.push({"bench_array": ctx.array}, targets=ctx.targets, block=True)
    return ctx.array.nbytes


def _pull(ctx) -> int:
    (value,) = ctx.mec.pull("bench_array", targets=ctx.targets, block=True)
    assert value.shape == ctx.array.shape and value[-1] == ctx.array[-1]
    return value.nbytes


def _task_result(ctx) -> int:
    from taskfarm.client import MapTask

    taskid = ctx.tc.run(MapTask(bench_array, (ctx.mb,)))
    value = ctx.tc.get_task_result(taskid, block=True)
    assert value.shape == ctx.array.shape and value[-1] == ctx.array[-1]
    ctx.tc.clear([taskid])
    return value.nbytes


#: The data-path workloads, in order: (name, description, function(ctx) ->
#: bytes moved).  Each is timed, and each process's peak RSS growth over it
#: is measured against the payload.  Other data-path workloads (buffer kinds,
#: a bulk channel, shared memory) are appended here.
DATA_WORKLOADS = [
    ("push", "mec.push of the array to one engine", _push),
    ("pull", "mec.pull of it back", _pull),
    ("result", "a MapTask returning the array, run + get_task_result(block=True)", _task_result),
]


class DataContext:
    """What a data workload uses: the clients, its engine, the array."""

    def __init__(self, tc, mec, targets, mb: int) -> None:
        self.tc, self.mec, self.targets, self.mb = tc, mec, targets, mb
        self.array = bench_array(mb)


def reset_peak_rss(pids) -> None:
    """Reset VmHWM to the current RSS (Linux: 5 into /proc/PID/clear_refs)."""
    for pid in pids:
        try:
            with open("/proc/%d/clear_refs" % pid, "w") as f:
                f.write("5")
        except OSError:
            pass


def disk_use(path) -> int:
    """Bytes of the journal: the database, its WAL and result files."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.startswith("journal"):
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
        for sub in ("journal.sqlite-results",):
            folder = os.path.join(root, sub)
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    try:
                        total += os.path.getsize(os.path.join(folder, name))
                    except OSError:
                        pass
        break
    return total


def run_data(args, emit, wd, cl, tc, meter_roles):
    """(i) A large NumPy array pushed, pulled and returned as a task result,
    on one engine: MB/s each way and the peak RSS growth of the client, the
    controller and the engine, as a multiple of the payload; then the
    journal's disk use after clear() against before."""
    from taskfarm import client

    mb = args.data_mb
    wd.phase("data_setup", args.phase_timeout)
    mec = client.MultiEngineClient(cl.profile, connect_timeout=30)
    targets = mec.get_ids()[:1]
    assert tc.get_task_result(tc.run(client.MapTask(array_ready, (mb,))), block=True)
    tc.clear()
    ctx = DataContext(tc, mec, targets, mb)
    journal_before = disk_use(cl.profile)
    roles = {"client": os.getpid(), "controller": cl.controller_pid, "engine": cl.engine_pids[0]}
    for name, desc, fn in DATA_WORKLOADS:
        wd.phase("data_" + name, args.phase_timeout)
        before = {role: benchlib.rss_kib(pid) for role, pid in roles.items()}
        reset_peak_rss(roles.values())
        dt, moved = timed(lambda fn=fn: fn(ctx))
        growth = {role: (benchlib.rss_kib(pid, "VmHWM") - before[role]) * 1024.0
                  for role, pid in roles.items()}
        emit("data_%s_MBps" % name, moved / dt / 1e6, "MB/s", mb=mb, wall_s=round(dt, 3), desc=desc)
        for role, grew in growth.items():
            emit("data_%s_rss_growth_%s_x" % (name, role), grew / moved, "x", mb=mb,
                 growth_mib=round(grew / MiB, 1), desc="peak RSS growth / payload, %s" % role)
    wd.phase("data_clear", args.phase_timeout)
    tc.clear()
    mec.execute("del bench_array", targets=targets, block=True)
    time.sleep(1.0)
    journal_after = disk_use(cl.profile)
    emit("journal_disk_after_clear_mib", journal_after / MiB, "MiB",
         before_mib=round(journal_before / MiB, 2), grew_mib=round((journal_after - journal_before) / MiB, 2),
         desc="journal database + WAL + result files after clear(), vs before the data phases")
    mec.close()


def run_nojournal(args, emit, wd, cl, tc, meter_roles):
    tc.map(noop, range(16))
    wd.phase("bulk_map_nojournal", args.phase_timeout)
    n = args.n
    cpu = CpuMeter(meter_roles).start()
    dt, res = timed(lambda: tc.map(noop, range(n)))
    extra = cpu.per_task(n)
    assert len(res) == n and res[-1] == n - 1
    emit("bulk_map_nojournal_tasks_s", n / dt, "tasks/s", n=n, wall_s=round(dt, 3), **extra)


def _queue_pass(args, emit, wd, cl, tc, meter_roles, with_depend: bool):
    """Queue growth: the cluster starts with NO engines, so every submitted
    task stays queued (with engines running, they drain about as fast as
    they arrive and the queue never grows).  Then 4 engines are added and
    the queue drains, for a bounded time."""
    from taskfarm.asyncclient import map_tasks

    prefix = "queue_depend_" if with_depend else "queue_"
    total, batch = args.queue_total, args.queue_batch
    t_pass = time.monotonic()
    submit_timeout, drain_timeout = args.queue_submit_timeout, args.queue_drain_timeout
    if args.queue_budget:
        submit_timeout = min(submit_timeout, max(20.0, 0.65 * args.queue_budget))
    nbatches = max(1, total // batch)
    pid = cl.controller_pid
    assert tc.engine_ids() == [], "the queue groups start without engines"
    time.sleep(0.5)
    rss0 = benchlib.rss_kib(pid)
    wd.phase(prefix + "submit", submit_timeout)
    # Tasks are built outside the timed call, the function pickled once (as
    # map() does); the timed part is run_many: client encoding, transfer,
    # the controller's submit, and its journal write.
    plain = map_tasks(noop, [(i,) for i in range(batch)], {})
    tasks = plain
    if with_depend:
        half = map_tasks(noop, [(i,) for i in range(batch // 2)], {"depend": always})
        tasks = half + plain[: batch - len(half)]
    samples = []  # (batch index, seconds, controller RSS KiB)
    cpu = CpuMeter({"client": meter_roles["client"], "controller": meter_roles["controller"]}).start()
    t_start = time.perf_counter()
    for b in range(nbatches):
        t0 = time.perf_counter()
        tc.run_many(tasks)
        dt = time.perf_counter() - t0
        samples.append((b, dt, benchlib.rss_kib(pid)))
        if wd.left() < 15:
            break
    t_submitted = time.perf_counter() - t_start
    submitted = len(samples) * batch
    cpu_submit = cpu.per_task(submitted)
    status = tc.queue_status()
    queued = status["scheduled"] + status["pending"]
    rss_submitted = benchlib.rss_kib(pid)
    hwm_submitted = benchlib.rss_kib(pid, "VmHWM")

    k = max(1, min(5, len(samples) // 4))  # start vs end: first and last k batches
    start_ms = statistics.mean(s[1] for s in samples[:k]) * 1e3
    end_ms = statistics.mean(s[1] for s in samples[-k:]) * 1e3
    common = dict(total=submitted, batch=batch, depend_half=with_depend,
                  journal=not args.no_journal_queue, engines_during_submit=0)
    note = {} if submitted == args.queue_total else {
        "note": "submitted %d of %d (time budget)" % (submitted, args.queue_total)}
    emit(prefix + "submit_tasks_s", submitted / t_submitted, "tasks/s", wall_s=round(t_submitted, 2),
         **common, **note, **{k_: v for k_, v in cpu_submit.items()})
    emit(prefix + "batch_ms_start", start_ms, "ms", batches=k, **common)
    emit(prefix + "batch_ms_end", end_ms, "ms", batches=k, **common)
    emit(prefix + "flatness", end_ms / start_ms, "x", desc="run_many cost per batch, end / start", **common)
    emit(prefix + "max_queued", queued, "tasks", **common)
    emit(prefix + "peak_rss_mib", max(rss_submitted, hwm_submitted) / 1024.0, "MiB",
         rss_before_mib=round(rss0 / 1024.0, 1), rss_submitted_mib=round(rss_submitted / 1024.0, 1), **common)
    emit(prefix + "rss_per_queued_task_bytes", (rss_submitted - rss0) * 1024.0 / max(queued, 1), "B",
         desc="(RSS with the queue full - RSS before) / tasks queued", **common)
    step = max(1, len(samples) // 10)
    profile = [[s[0], round(s[1] * 1e3, 1), round(s[2] / 1024.0, 1)] for s in samples[::step] + samples[-1:]]
    emit(prefix + "profile", len(samples), "batches", points_batch_ms_rssmib=profile, **common)

    # the drain: 4 engines join; poll queue_status until nothing is left
    wd.phase(prefix + "engines", 90)
    cl.add_engines(ENGINES)
    engines_by = time.monotonic() + 60
    while len(tc.engine_ids()) < ENGINES and time.monotonic() < engines_by:
        time.sleep(0.2)
    roles = dict(meter_roles, engines=list(cl.engine_pids))
    cpu = CpuMeter(roles).start()
    if args.queue_budget:  # the drain gets what is left of the pass's budget
        drain_timeout = min(drain_timeout, max(10.0, args.queue_budget - (time.monotonic() - t_pass) - 10))
    wd.phase(prefix + "drain", drain_timeout + 30)
    drain_deadline = time.monotonic() + drain_timeout
    t0 = time.perf_counter()
    while True:
        status = tc.queue_status()
        left = status["scheduled"] + status["pending"]
        if left == 0 or time.monotonic() > drain_deadline:
            break
        time.sleep(0.25)
    t_drain = time.perf_counter() - t0
    finished = queued - left
    emit(prefix + "drain_tasks_s", finished / max(t_drain, 1e-9), "tasks/s", finished=finished,
         of=queued, drain_s=round(t_drain, 2), complete=(left == 0),
         desc="tasks finished / seconds, 4 engines on the full queue", **common,
         **cpu.per_task(max(finished, 1)))
    if left == 0:
        wd.phase(prefix + "clear", 120)
        tc.clear()
        time.sleep(1.0)
        emit(prefix + "rss_after_clear_mib", benchlib.rss_kib(pid) / 1024.0, "MiB",
             rss_before_mib=round(rss0 / 1024.0, 1), **common)


def run_queue(args, emit, wd, cl, tc, meter_roles):
    _queue_pass(args, emit, wd, cl, tc, meter_roles, with_depend=False)


def run_queue_depend(args, emit, wd, cl, tc, meter_roles):
    _queue_pass(args, emit, wd, cl, tc, meter_roles, with_depend=True)


def run_memory(args, emit, wd, cl, tc, meter_roles):
    from taskfarm.asyncclient import map_tasks

    pid = cl.controller_pid
    batch = 10_000
    total = args.mem_total
    tasks = map_tasks(noop, [(i,) for i in range(batch)], {})

    def one_round(count):
        for _ in range(max(1, count // batch)):
            ids = tc.run_many(tasks)
            tc.barrier(ids)
            res = tc.get_task_results(ids)
            assert res == list(range(batch))
            tc.clear(ids)

    wd.phase("memory_warm", args.phase_timeout)
    one_round(2 * batch)  # allocator and caches warm
    time.sleep(1.0)
    rss0 = benchlib.rss_kib(pid)
    wd.phase("memory", args.phase_timeout * 2)
    t0 = time.perf_counter()
    one_round(total)
    dt = time.perf_counter() - t0
    time.sleep(1.0)
    rss1 = benchlib.rss_kib(pid)
    emit("mem_per_finished_task_bytes", (rss1 - rss0) * 1024.0 / total, "B", n=total,
         rss_before_mib=round(rss0 / 1024.0, 1), rss_after_mib=round(rss1 / 1024.0, 1),
         desc="controller RSS delta over n tasks, fetched and cleared, / n",
         tasks_s=round(total / dt, 1), journal=True)


# group -> (controller options, function, engines at start)
GROUPS = {
    "core": ([], run_core, ENGINES),
    "nojournal": (["--no-journal"], run_nojournal, ENGINES),
    # no engines while the queue fills, so no depend group is ever "unmet"
    "queue": (["--unmet-timeout=0"], run_queue, 0),
    "queue_depend": (["--unmet-timeout=0"], run_queue_depend, 0),
    "memory": ([], run_memory, ENGINES),
    # one engine: the array is made once, where the task that returns it runs
    "data": ([], run_data, 1),
}


def child(args) -> int:
    controller_options, fn, engines = GROUPS[args.child]
    if args.child.startswith("queue") and args.no_journal_queue:
        controller_options = controller_options + ["--no-journal"]
    emit = Emitter("taskfarm", "taskfarm", args.run)
    holder = {}

    def expire(name):
        emit("phase_timeout", 1, "flag", phase=name, group=args.child)
        sys.stderr.write("[taskfarm_bench] phase %s passed its deadline; stopping\n" % name)
        if "cluster" in holder:
            holder["cluster"].emergency_stop()
            shutil.rmtree(holder["cluster"].root, ignore_errors=True)

    wd = Watchdog(expire)
    wd.phase("cluster_start", 150)
    load = benchlib.load1()
    cl = BenchCluster(controller_options, n=engines)
    holder["cluster"] = cl

    def terminated(signum, frame):  # our orchestrator ends us: leave nothing behind
        cl.emergency_stop()
        shutil.rmtree(cl.root, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    sys.stderr.write("[taskfarm_bench] %s run %d: cluster up in %.1f s (controller pid %d, engines %s)\n"
                     % (args.child, args.run, cl.startup_s, cl.controller_pid, cl.engine_pids))
    status = 0
    try:
        if args.child == "core":
            emit("startup_s", cl.startup_s, "s", load1=load)
        wd.phase("connect", 60)
        from taskfarm import client

        tc = client.TaskClient(cl.profile, connect_timeout=30)
        roles = {"client": [os.getpid()], "controller": [cl.controller_pid], "engines": cl.engine_pids}
        fn(args, emit, wd, cl, tc, roles)
        wd.phase("close", 60)
        tc.close()
    except Exception as e:
        status = 1
        emit("error", 1, "flag", group=args.child, error="%s: %s" % (type(e).__name__, e))
        import traceback

        traceback.print_exc()
    finally:
        wd.phase("cluster_stop", 60)
        leftovers = cl.stop(keep_logs=bool(status))
        if leftovers:
            sys.stderr.write("[taskfarm_bench] had to SIGKILL %s\n" % leftovers)
        still = [p for p in cl.pids if benchlib.alive(p)]
        if still:
            emit("error", 1, "flag", group=args.child, error="processes left: %s" % still)
            status = 1
        wd.disarm()
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="queue growth to 100,000 tasks, not 1,000,000")
    ap.add_argument("--groups", default="core,nojournal,queue,queue_depend,memory,data")
    ap.add_argument("--heavy-reps", type=int, default=1,
                    help="repetitions of the queue and memory groups (default 1: they are long)")
    ap.add_argument("--n", type=int, default=10_000, help="tasks in the bulk and one-by-one phases")
    ap.add_argument("--rtt", type=int, default=200)
    ap.add_argument("--big", type=int, default=100)
    ap.add_argument("--fair-tasks", type=int, default=80)
    ap.add_argument("--onebyone-budget", type=float, default=60.0,
                    help="seconds the one-by-one loop may take (fewer tasks if short)")
    ap.add_argument("--queue-total", type=int, default=None)
    ap.add_argument("--queue-depend-total", type=int, default=None)
    ap.add_argument("--queue-batch", type=int, default=10_000)
    ap.add_argument("--queue-submit-timeout", type=float, default=240)
    ap.add_argument("--queue-drain-timeout", type=float, default=300)
    ap.add_argument("--queue-budget", type=float, default=None,
                    help="seconds for a whole queue pass: submission gets at most 65%%, the drain the rest")
    ap.add_argument("--no-journal-queue", action="store_true", help="queue groups with --no-journal")
    ap.add_argument("--mem-total", type=int, default=100_000)
    ap.add_argument("--data-mb", type=int, default=200, help="MiB of the array in the data group")
    ap.add_argument("--phase-timeout", type=float, default=120)
    ap.add_argument("--results", default=os.path.join(benchlib.RESULTS, "taskfarm.jsonl"))
    ap.add_argument("--child", choices=sorted(GROUPS), help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--run-offset", type=int, default=0, help="number runs from OFFSET+1 (bench/run.py)")
    args = ap.parse_args()
    if args.queue_total is None:
        args.queue_total = 100_000 if args.quick else 1_000_000
    if args.child:
        if args.child == "queue_depend" and args.queue_depend_total:
            args.queue_total = args.queue_depend_total
        return child(args)
    benchlib.install_term_handler()

    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    for g in groups:
        if g not in GROUPS:
            ap.error("unknown group %r (choose from %s)" % (g, ", ".join(GROUPS)))
    passthrough = []
    for name in ("n", "rtt", "big", "fair_tasks", "onebyone_budget", "queue_total", "queue_depend_total",
                 "queue_batch", "queue_submit_timeout", "queue_drain_timeout", "queue_budget", "mem_total",
                 "data_mb", "phase_timeout"):
        value = getattr(args, name)
        if value is not None:
            passthrough += ["--" + name.replace("_", "-"), str(value)]
    if args.no_journal_queue:
        passthrough.append("--no-journal-queue")
    failures = 0
    t_all = time.monotonic()
    for run in range(1, args.reps + 1):
        for g in groups:
            heavy = g.startswith("queue") or g in ("memory", "data")
            if heavy and run > args.heavy_reps:
                continue
            if g.startswith("queue"):
                limit = args.queue_submit_timeout + args.queue_drain_timeout + 300
                if args.queue_budget:
                    limit = args.queue_budget + 150
            elif g in ("memory", "data"):
                limit = args.phase_timeout * 3 + 300
            else:
                limit = args.phase_timeout * 7 + 300
            argv = [sys.executable, os.path.abspath(__file__), "--child", g, "--run", str(run + args.run_offset)] + passthrough
            sys.stderr.write("[taskfarm_bench] run %d/%d group %s (limit %.0f s)\n" % (run, args.reps, g, limit))
            rc, lines = benchlib.run_child(argv, limit, args.results, label="taskfarm %s run %d" % (g, run))
            if rc != 0:
                failures += 1
                line = json.dumps({"bench": "taskfarm", "system": "taskfarm", "metric": "error", "value": 1,
                                   "unit": "flag", "run": run + args.run_offset, "group": g, "error": "child exit status %d" % rc})
                print(line, flush=True)
                benchlib.append_results(args.results, [line])
    sys.stderr.write("[taskfarm_bench] done in %.0f s, %d failed group(s)\n" % (time.monotonic() - t_all, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
