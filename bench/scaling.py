#!/usr/bin/env python
"""How the controller's costs grow with the number of engines (issue 10).

    python bench/scaling.py [--sizes 4,16,64,128] [--tasks 10000] [--idle 10]

One controller (bench/tfcluster.py, journal on, as a user runs it) and
engines added in steps up to each size, on this machine.  At each size:

* registration: seconds from asking the launcher for the step's engines
  until the controller lists them all, per engine, and the controller's CPU
  per engine registered;
* idle heartbeat: the controller's CPU over `--idle` seconds with every
  engine idle, less its CPU over as long with no engine, per heartbeat per
  engine (the heartbeat period is 1 s);
* memory: the controller's RSS per engine, and an engine's RSS;
* bulk: ``tc.map(noop, range(--tasks))`` throughput and the controller's
  CPU per task.

Prints one JSON line per metric (bench/benchlib.py `Emitter`), appends them
to bench/results/scaling.jsonl, and ends with a table and the ratio of the
per-task controller CPU at each size to that at the smallest.  Every wait
is bounded, and every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import CpuMeter, Emitter  # noqa: E402
from taskfarm_bench import BenchCluster  # noqa: E402

HEARTBEAT_PERIOD = 1.0


def noop(x):
    # Here, in __main__: cloudpickle ships it by value.
    return x


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of `pid` (schedstat: finer than
    the clock ticks of /proc/PID/stat, which idle heartbeats are below)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def idle_seconds(pid: int, seconds: float) -> float:
    """CPU seconds `pid` spends in `seconds` of wall time."""
    before = cpu_ns(pid)
    time.sleep(seconds)
    return (cpu_ns(pid) - before) / 1e9


def wait_for_engines(tc, count: int, timeout: float) -> float:
    """Seconds until the controller lists `count` engines."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if len(tc.engine_ids()) >= count:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError("only %d of %d engines registered in %g s"
                       % (len(tc.engine_ids()), count, timeout))


def measure(size: int, step: int, args, emit, cl, tc) -> dict:
    row = {"engines": size}
    cpu0 = cpu_ns(cl.controller_pid)
    t0 = time.perf_counter()
    # In chunks: a 2-core machine starting 64 Pythons at once spends
    # minutes importing, and the numbers would say more about that.
    have = size - step
    while have < size:
        chunk = min(args.chunk, size - have)
        cl.add_engines(chunk, timeout=args.timeout)
        have += chunk
        wait_for_engines(tc, have, args.timeout)
    row["register_s"] = time.perf_counter() - t0
    row["register_cpu_ms"] = (cpu_ns(cl.controller_pid) - cpu0) / 1e6 / step
    emit("register_s", row["register_s"], "s", engines=size, added=step,
         per_engine_ms=round(row["register_s"] / step * 1000, 1),
         controller_cpu_ms_per_engine=round(row["register_cpu_ms"], 2))

    time.sleep(2.0)  # let the registrations' own work settle
    idle_cpu = idle_seconds(cl.controller_pid, args.idle) - args.idle_base
    beats = args.idle / HEARTBEAT_PERIOD * size
    row["heartbeat_us"] = max(idle_cpu, 0.0) / beats * 1e6
    emit("idle_cpu_per_heartbeat_us", row["heartbeat_us"], "us", engines=size,
         idle_cpu_pct=round(idle_cpu / args.idle * 100, 2))

    rss = benchlib.rss_kib(cl.controller_pid)
    engine_rss = [benchlib.rss_kib(p) for p in cl.engine_pids[-step:]]
    row["controller_rss_mib"] = rss / 1024
    row["engine_rss_mib"] = sum(engine_rss) / len(engine_rss) / 1024
    emit("controller_rss_mib", row["controller_rss_mib"], "MiB", engines=size)
    emit("engine_rss_mib", row["engine_rss_mib"], "MiB", engines=size)

    tc.map(noop, range(size * 4))  # every engine has unpickled noop
    meter = CpuMeter({"controller": [cl.controller_pid]}).start()
    t0 = time.perf_counter()
    results = tc.map(noop, range(args.tasks))
    wall = time.perf_counter() - t0
    assert results == list(range(args.tasks)), "wrong results"
    per_task = meter.per_task(args.tasks)["cpu_us_task_controller"]
    row["tasks_s"] = args.tasks / wall
    row["task_cpu_us"] = per_task
    emit("bulk_map_tasks_s", row["tasks_s"], "tasks/s", engines=size, n=args.tasks,
         cpu_us_task_controller=per_task)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,16,64,128")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    ap.add_argument("--timeout", type=float, default=240.0, help="bound of each registration step")
    ap.add_argument("--chunk", type=int, default=16, help="engines started at once")
    ap.add_argument("--results", default=os.path.join(benchlib.RESULTS, "scaling.jsonl"))
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    lines: list[str] = []

    class Tee:
        def write(self, text):
            sys.stdout.write(text)
            lines.extend(t for t in text.splitlines() if t)

        def flush(self):
            sys.stdout.flush()

    emit = Emitter("scaling", "taskfarm", 1, stream=Tee())
    cl = BenchCluster(n=0, start_timeout=args.timeout)
    rows = []
    try:
        from taskfarm import client

        tc = client.TaskClient(cl.profile, connect_timeout=30)
        # What the controller spends idle with no engine (its own timers,
        # the client's connection): taken off each size's idle CPU.
        time.sleep(2.0)
        args.idle_base = idle_seconds(cl.controller_pid, args.idle)
        emit("idle_cpu_no_engines_pct", args.idle_base / args.idle * 100, "%")
        have = 0
        for size in sizes:
            rows.append(measure(size, size - have, args, emit, cl, tc))
            have = size
        tc.close()
    except BaseException:
        print("logs kept in %s" % cl.root, file=sys.stderr)
        raise
    finally:
        leftovers = cl.stop(keep_logs=len(rows) < len(sizes))
        benchlib.append_results(args.results, lines)
    base = rows[0]["task_cpu_us"] if rows else 1.0
    print("\n| engines | registration (s) | per engine (ms) | controller CPU per registration "
          "(ms) | controller CPU per heartbeat "
          "per engine (µs) | controller RSS (MiB) | engine RSS (MiB) | bulk no-op (tasks/s) "
          "| controller CPU per task (µs) | vs smallest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    have = 0
    for row in rows:
        step = row["engines"] - have
        have = row["engines"]
        print("| %d | %.1f | %.0f | %.1f | %.0f | %.0f | %.0f | %.0f | %.1f | %.2fx |" % (
            row["engines"], row["register_s"], row["register_s"] / step * 1000,
            row["register_cpu_ms"],
            row["heartbeat_us"], row["controller_rss_mib"], row["engine_rss_mib"],
            row["tasks_s"], row["task_cpu_us"], row["task_cpu_us"] / base))
    if leftovers:
        print("had to SIGKILL %s" % leftovers, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
