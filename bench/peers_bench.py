#!/usr/bin/env python
"""The same workloads as bench/taskfarm_bench.py's `core` group, on the peers,
each with 4 local workers, loopback only.  Runs in bench/.venv-peers
(bench/setup_peers.sh makes it).

    bench/.venv-peers/bin/python bench/peers_bench.py [--reps 3] [--systems pool,dask,ipp,ray]

Systems:
  pool  concurrent.futures.ProcessPoolExecutor(4)
  dask  distributed.LocalCluster(4 workers, 1 thread each, processes)
  ipp   ipyparallel.Cluster(n=4), load-balanced view
  ray   ray.init(num_cpus=4)  (skipped, with an "unavailable" line, if not installed)

Workloads (names as in taskfarm_bench.py):
  bulk_map_tasks_s   N no-op tasks, the system's map, all results gathered
  onebyone_tasks_s   N no-op tasks submitted one call each, then waited and gathered
  rtt_ms_median/p99  one task submitted and its result awaited, 200 times
  ret1MB_MBps        100 tasks each returning 1 MiB (random, cached per worker)
  fairness_*         80 x sleep(0.1) on 4 workers, wall vs the ideal 2.0 s

Each (system, rep) is a child process with a fresh cluster, bounded by a
deadline (its session is ended if it overruns); each phase inside also has
its own deadline (a watchdog that shuts the cluster and exits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Emitter, MiB, Watchdog  # noqa: E402

SYSTEMS = ("pool", "dask", "ipp", "ray")
WORKERS = 4


def noop(x):
    return x


def big(i, n=MiB):
    import os
    import sys

    cache = sys.__dict__.setdefault("_peers_bench_cache", {})
    b = cache.get(n)
    if b is None:
        b = cache[n] = os.urandom(n)
    return b


def sleeper(i, seconds=0.1):
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


class System:
    """One peer: start() it, then the workload methods, then stop()."""

    name = "?"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def bulk(self, fn, n: int) -> list: ...
    def one_by_one(self, fn, n: int, budget: float) -> list: ...
    def one(self, fn, i): ...


class Pool(System):
    name = "pool"
    variant = "ProcessPoolExecutor.map / submit"

    def start(self):
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(WORKERS)
        list(self.ex.map(noop, range(2 * WORKERS)))

    def stop(self):
        self.ex.shutdown(wait=True, cancel_futures=True)

    def bulk(self, fn, n):
        return list(self.ex.map(fn, range(n), timeout=self.timeout))

    def one_by_one(self, fn, n, budget):
        from concurrent.futures import wait

        end = time.perf_counter() + budget
        futures = []
        for i in range(n):
            futures.append(self.ex.submit(fn, i))
            if (i & 63) == 0 and time.perf_counter() > end:
                break
        wait(futures, timeout=self.timeout)
        return [f.result(timeout=0) for f in futures]

    def one(self, fn, i):
        return self.ex.submit(fn, i).result(timeout=self.timeout)


class Dask(System):
    name = "dask"
    variant = "Client.map / Client.submit, gather"

    def start(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(WORKERS, timeout=120)
        self.client.gather(self.client.map(noop, range(2 * WORKERS), pure=False))

    def stop(self):
        self.client.close()
        self.cluster.close()

    def bulk(self, fn, n):
        from distributed import wait

        futures = self.client.map(fn, range(n), pure=False)
        wait(futures, timeout=self.timeout)
        return self.client.gather(futures)

    def one_by_one(self, fn, n, budget):
        from distributed import wait

        end = time.perf_counter() + budget
        futures = []
        for i in range(n):
            futures.append(self.client.submit(fn, i, pure=False))
            if (i & 63) == 0 and time.perf_counter() > end:
                break
        wait(futures, timeout=self.timeout)
        return self.client.gather(futures)

    def one(self, fn, i):
        return self.client.submit(fn, i, pure=False).result(timeout=self.timeout)


class Ipp(System):
    name = "ipp"
    variant = "LoadBalancedView.map_async / apply_async"

    def start(self):
        import ipyparallel

        self.cluster = ipyparallel.Cluster(n=WORKERS, controller_ip="127.0.0.1", log_level=30)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(WORKERS, timeout=120)
        self.view = self.rc.load_balanced_view()
        self.view.map_sync(noop, range(2 * WORKERS))

    def stop(self):
        try:
            self.rc.close()
        finally:
            self.cluster.stop_cluster_sync()

    def bulk(self, fn, n):
        return self.view.map_async(fn, range(n)).get(timeout=self.timeout)

    def one_by_one(self, fn, n, budget):
        end = time.perf_counter() + budget
        results = []
        for i in range(n):
            results.append(self.view.apply_async(fn, i))
            if (i & 63) == 0 and time.perf_counter() > end:
                break
        self.rc.wait(results, timeout=self.timeout)
        return [r.get(timeout=0) for r in results]

    def one(self, fn, i):
        return self.view.apply_async(fn, i).get(timeout=self.timeout)


class Ray(System):
    name = "ray"
    variant = "f.remote() list, ray.get"

    def start(self):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self.ray = ray
        ray.init(num_cpus=WORKERS, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        self.remotes = {}
        self.bulk(noop, 10 * WORKERS)

    def _remote(self, fn):
        r = self.remotes.get(fn)
        if r is None:
            r = self.remotes[fn] = self.ray.remote(num_cpus=1)(fn)
        return r

    def stop(self):
        self.ray.shutdown()

    def bulk(self, fn, n):
        r = self._remote(fn)
        return self.ray.get([r.remote(i) for i in range(n)], timeout=self.timeout)

    def one_by_one(self, fn, n, budget):
        r = self._remote(fn)
        end = time.perf_counter() + budget
        refs = []
        for i in range(n):
            refs.append(r.remote(i))
            if (i & 63) == 0 and time.perf_counter() > end:
                break
        return self.ray.get(refs, timeout=self.timeout)

    def one(self, fn, i):
        return self.ray.get(self._remote(fn).remote(i), timeout=self.timeout)


CLASSES = {"pool": Pool, "dask": Dask, "ipp": Ipp, "ray": Ray}


def available(system: str) -> str | None:
    """None if the system can be imported, else why not."""
    module = {"pool": "concurrent.futures", "dask": "distributed", "ipp": "ipyparallel", "ray": "ray"}[system]
    try:
        __import__(module)
    except Exception as e:
        return "%s: %s" % (type(e).__name__, e)
    return None


def child(args) -> int:
    emit = Emitter("peers", args.child, args.run)
    sysobj = CLASSES[args.child](args.phase_timeout)
    state = {"pids": []}

    def expire(name):
        emit("phase_timeout", 1, "flag", phase=name)
        sys.stderr.write("[peers_bench] %s: phase %s passed its deadline\n" % (args.child, name))
        # the processes this child started (recorded after start), by PID;
        # the parent then ends whatever is left in this child's session
        benchlib.kill_pids(state["pids"] + benchlib.descendants(os.getpid()), grace=5.0)

    wd = Watchdog(expire)
    wd.phase("start", 180)
    load = benchlib.load1()
    t0 = time.perf_counter()
    sysobj.start()
    state["pids"] = benchlib.descendants(os.getpid())
    emit("startup_s", time.perf_counter() - t0, "s", load1=load, variant=sysobj.variant)
    status = 0
    try:
        n = args.n
        wd.phase("bulk_map", args.phase_timeout + 10)
        t0 = time.perf_counter()
        res = sysobj.bulk(noop, n)
        dt = time.perf_counter() - t0
        assert len(res) == n and res[-1] == n - 1 and res[n // 2] == n // 2
        emit("bulk_map_tasks_s", n / dt, "tasks/s", n=n, wall_s=round(dt, 3))

        wd.phase("onebyone", args.phase_timeout + 10)
        budget = min(args.onebyone_budget, args.phase_timeout - 20)
        t0 = time.perf_counter()
        res = sysobj.one_by_one(noop, n, budget)
        dt = time.perf_counter() - t0
        done = len(res)
        assert res == list(range(done))
        note = {} if done == n else {"note": "stopped at %d of %d (time budget %.0f s)" % (done, n, budget)}
        emit("onebyone_tasks_s", done / dt, "tasks/s", n=done, wall_s=round(dt, 3),
             desc="submit loop + wait + gather", **note)

        wd.phase("rtt", args.phase_timeout + 10)
        for i in range(10):
            sysobj.one(noop, i)
        lat = []
        deadline = time.monotonic() + args.phase_timeout / 2
        for i in range(args.rtt):
            t0 = time.perf_counter()
            assert sysobj.one(noop, i) == i
            lat.append(time.perf_counter() - t0)
            if time.monotonic() > deadline:
                break
        emit("rtt_ms_median", statistics.median(lat) * 1e3, "ms", n=len(lat))
        emit("rtt_ms_p99", benchlib.pct(lat, 99) * 1e3, "ms", n=len(lat))

        wd.phase("ret1MB", args.phase_timeout + 10)
        sysobj.bulk(big, 2 * WORKERS)
        t0 = time.perf_counter()
        res = sysobj.bulk(big, args.big)
        dt = time.perf_counter() - t0
        assert len(res) == args.big and all(len(b) == MiB for b in res)
        del res
        emit("ret1MB_MBps", args.big * MiB / dt / 1e6, "MB/s", n=args.big, wall_s=round(dt, 3))

        wd.phase("fairness", args.phase_timeout + 10)
        k = args.fair_tasks
        ideal = k * 0.1 / WORKERS
        t0 = time.perf_counter()
        pids = sysobj.bulk(sleeper, k)
        dt = time.perf_counter() - t0
        counts = sorted((pids.count(p) for p in set(pids)), reverse=True)
        emit("fairness_wall_s", dt, "s", n=k, ideal_s=ideal, per_engine=counts)
        emit("fairness_ratio", dt / ideal, "x", n=k, ideal_s=ideal, per_engine=counts,
             desc="wall / ideal (1.0 is perfect)")
    except Exception as e:
        status = 1
        emit("error", 1, "flag", error="%s: %s" % (type(e).__name__, e))
        import traceback

        traceback.print_exc()
    finally:
        wd.phase("stop", 90)
        try:
            sysobj.stop()
        except Exception as e:
            sys.stderr.write("[peers_bench] %s: stop failed: %s\n" % (args.child, e))
        wd.disarm()
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rtt", type=int, default=200)
    ap.add_argument("--big", type=int, default=100)
    ap.add_argument("--fair-tasks", type=int, default=80)
    ap.add_argument("--onebyone-budget", type=float, default=60.0)
    ap.add_argument("--phase-timeout", type=float, default=120)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all runs: a run that would not fit is skipped (noted)")
    ap.add_argument("--results", default=os.path.join(benchlib.RESULTS, "peers.jsonl"))
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--run-offset", type=int, default=0, help="number runs from OFFSET+1 (bench/run.py)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    benchlib.install_term_handler()

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    failures = 0
    t_all = time.monotonic()
    for s in systems:
        if s not in CLASSES:
            ap.error("unknown system %r" % s)
    skipped = {}
    for s in systems:
        why = available(s)
        if why:
            skipped[s] = why
            line = json.dumps({"bench": "peers", "system": s, "metric": "unavailable", "value": 1,
                               "unit": "flag", "run": 0, "error": why})
            print(line, flush=True)
            benchlib.append_results(args.results, [line])
            sys.stderr.write("[peers_bench] %s not available (%s): skipped\n" % (s, why))
    passthrough = ["--n", str(args.n), "--rtt", str(args.rtt), "--big", str(args.big),
                   "--fair-tasks", str(args.fair_tasks), "--onebyone-budget", str(args.onebyone_budget),
                   "--phase-timeout", str(args.phase_timeout)]
    # rough seconds per run on this 2-core machine, replaced by what the
    # previous run of the same system took
    took = {"pool": 12.0, "dask": 50.0, "ipp": 85.0, "ray": 40.0}
    end = None if args.budget is None else t_all + args.budget
    for run in range(1, args.reps + 1):
        for s in systems:
            if s in skipped:
                continue
            limit = 180 + 5 * (args.phase_timeout + 10) + 120
            if end is not None:
                left = end - time.monotonic()
                if left < took[s] + 5:
                    line = json.dumps({"bench": "peers", "system": s, "metric": "skipped", "value": 1,
                                       "unit": "flag", "run": run + args.run_offset,
                                       "error": "run skipped: %.0f s of the budget left, a run takes about %.0f s"
                                       % (left, took[s])})
                    print(line, flush=True)
                    benchlib.append_results(args.results, [line])
                    continue
                limit = min(limit, left)
            argv = [sys.executable, os.path.abspath(__file__), "--child", s, "--run", str(run + args.run_offset)] + passthrough
            sys.stderr.write("[peers_bench] run %d/%d %s (limit %.0f s)\n" % (run, args.reps, s, limit))
            t0 = time.monotonic()
            rc, _ = benchlib.run_child(argv, limit, args.results, env=env, label="peers %s run %d" % (s, run))
            took[s] = time.monotonic() - t0
            if rc != 0:
                failures += 1
                line = json.dumps({"bench": "peers", "system": s, "metric": "error", "value": 1, "unit": "flag",
                                   "run": run + args.run_offset, "error": "child exit status %d" % rc})
                print(line, flush=True)
                benchlib.append_results(args.results, [line])
            time.sleep(2)  # let the previous cluster's processes go
    sys.stderr.write("[peers_bench] done in %.0f s, %d failed\n" % (time.monotonic() - t_all, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
