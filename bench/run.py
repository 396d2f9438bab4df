#!/usr/bin/env python
"""`make bench`: the whole comparison in one command, bounded in time.

    python bench/run.py [--quick] [--reps N] [--only taskfarm|peers] [--budget SECONDS] [--data-mb N] [--update-docs]

1. makes bench/.venv-peers (bench/setup_peers.sh) if it is missing;
2. for each rep: the taskfarm core workloads (a-e) and the journal-off bulk
   run (f), then the same workloads on the peers (ProcessPoolExecutor, dask,
   ipyparallel, ray), so both see the same machine conditions;
3. once: controller memory per finished task (h), the data path (i: a
   200 MiB NumPy array pushed, pulled and returned), queue growth to
   1,000,000 tasks (100,000 with --quick) and again with half the tasks
   carrying a `depend` predicate (g);
4. bench/report.py: bench/results/latest.md and latest.json, printed.

Every stage is a child process with a deadline; the run as a whole keeps to
--budget seconds (default 900 s): the last stages (queue
drains first) get what is left, and anything cut short is noted in the
report.  With --update-docs the table is pasted into docs/performance.md
between its "latest-results" markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import benchlib  # noqa: E402

PEERS_PY = os.path.join(HERE, ".venv-peers", "bin", "python")
DOC = os.path.join(ROOT, "docs", "performance.md")
START_MARK = "<!-- latest-results:start -->"
END_MARK = "<!-- latest-results:end -->"


def log(msg: str) -> None:
    sys.stderr.write("[bench] %s\n" % msg)
    sys.stderr.flush()


def versions(python: str, names: list[str]) -> dict:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except Exception: pass\n"
            "print(json.dumps(out))")
    try:
        out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout or "{}")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def update_docs(md: str) -> bool:
    try:
        with open(DOC) as f:
            text = f.read()
    except OSError:
        return False
    if START_MARK not in text or END_MARK not in text:
        return False
    head, rest = text.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    with open(DOC, "w") as f:
        f.write(head + START_MARK + "\n\n" + md.rstrip() + "\n\n" + END_MARK + tail)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="queue growth to 100,000 tasks instead of 1,000,000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["taskfarm", "peers"])
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 900)")
    ap.add_argument("--queue-total", type=int, default=None)
    ap.add_argument("--data-mb", type=int, default=200,
                    help="MiB of the NumPy array pushed, pulled and returned (i)")
    ap.add_argument("--update-docs", action="store_true", help="paste the table into docs/performance.md")
    args = ap.parse_args()
    benchlib.install_term_handler()

    t_start = time.monotonic()
    budget = args.budget or 900.0
    deadline = t_start + budget
    left = lambda: deadline - time.monotonic()  # noqa: E731
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(benchlib.RESULTS, exist_ok=True)
    tf_results = os.path.join(benchlib.RESULTS, stamp + "-taskfarm.jsonl")
    peers_results = os.path.join(benchlib.RESULTS, stamp + "-peers.jsonl")
    meta_path = os.path.join(benchlib.RESULTS, stamp + "-meta.json")
    queue_total = args.queue_total or (100_000 if args.quick else 1_000_000)
    notes: list[str] = []
    meta = {
        "stamp": stamp,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": "%s %s" % (platform.system(), platform.release()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mode": ("quick" if args.quick else "full") + ("" if not args.only else ", only " + args.only),
        "reps": args.reps,
        "queue_total": queue_total,
        "load_before": benchlib.load1(),
        "budget_s": budget,
        "notes": notes,
    }
    try:
        head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %ad %s", "--date=iso"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "taskfarm", "twisted"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
        meta["git"] = "%s; %d changed files under taskfarm/ and twisted/ not committed" % (
            head, len([x for x in dirty if x.strip()]))
    except (OSError, subprocess.TimeoutExpired):
        pass
    meta["versions"] = versions(sys.executable, ["taskfarm", "Twisted", "foolscap", "cloudpickle"])

    def save_meta():
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)

    save_meta()
    do_tf = args.only in (None, "taskfarm")
    do_peers = args.only in (None, "peers")

    # 1. the peers' virtualenv
    if do_peers and not os.path.exists(PEERS_PY):
        log("creating bench/.venv-peers (bench/setup_peers.sh)")
        try:
            rc = subprocess.run(["bash", os.path.join(HERE, "setup_peers.sh")], timeout=min(900, max(60, left()))).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        if rc != 0:
            notes.append("bench/setup_peers.sh failed (exit %d): peers skipped." % rc)
            do_peers = False
    elif do_peers:
        # quick check that it still works (and fixes a half-made venv)
        subprocess.run(["bash", os.path.join(HERE, "setup_peers.sh")], timeout=900,
                       stdout=subprocess.DEVNULL)
    if do_peers and os.path.exists(PEERS_PY):
        pv = versions(PEERS_PY, ["ipyparallel", "dask", "distributed", "ray", "cloudpickle", "pyzmq"])
        meta["versions"].update({"peers:" + k: v for k, v in pv.items()})
        if "ray" not in pv:
            notes.append("ray is not installed in bench/.venv-peers: it is skipped.")
    save_meta()

    tf = [sys.executable, os.path.join(HERE, "taskfarm_bench.py")]
    peers = [PEERS_PY, os.path.join(HERE, "peers_bench.py")]

    def stage(label, argv, limit, results):
        limit = min(limit, max(0.0, left()))
        if limit < 30:
            notes.append("%s skipped: the time budget was spent." % label)
            log("%s skipped (budget)" % label)
            return
        log("%s (limit %.0f s, %.0f s of the budget left)" % (label, limit, left()))
        rc, lines = benchlib.run_child(argv, limit, None, label=label, echo=sys.stderr)
        # the children record their own lines; only a stage timeout is ours
        benchlib.append_results(results, [x for x in lines if '"bench": "harness"' in x])
        if rc != 0:
            notes.append("%s ended with exit status %d." % (label, rc))

    # 2. reps: taskfarm core + journal-off, then the peers, turn about.
    # What memory + the two queue passes need afterwards (1M tasks: about
    # 25-45 s to submit and 30-40 s to drain each, on this machine).
    heavy_reserve = 0 if not do_tf else (180 if args.quick else 290)
    tf_est, peers_est = 25.0, 150.0  # seconds per rep, updated as reps finish
    for run in range(1, args.reps + 1):
        reps_after = args.reps - run
        if do_tf:
            t0 = time.monotonic()
            stage("taskfarm core+nojournal run %d" % run,
                  tf + ["--reps", "1", "--groups", "core,nojournal", "--results", tf_results,
                        "--phase-timeout", "90", "--onebyone-budget", "15"] + ["--run-offset", str(run - 1)],
                  max(60, min(700, left() - heavy_reserve)), tf_results)
            tf_est = time.monotonic() - t0
        if do_peers:
            # this rep gets what is left once the heavy stages and the later
            # reps (as long as this session's reps took so far) are set aside;
            # a peer that does not fit is skipped and noted
            share = left() - heavy_reserve - reps_after * ((tf_est if do_tf else 0) + peers_est)
            share = max(60.0, min(900.0, share))
            t0 = time.monotonic()
            stage("peers run %d" % run,
                  peers + ["--reps", "1", "--results", peers_results, "--phase-timeout", "90",
                           "--onebyone-budget", "15", "--run-offset", str(run - 1),
                           "--budget", "%.0f" % share],
                  share + 60, peers_results)
            peers_est = time.monotonic() - t0

    # 3. the long ones, once; first the dashboard's cost (bench/dashboard_cost.py)
    if do_tf:
        stage("taskfarm dashboard cost", [sys.executable, os.path.join(HERE, "dashboard_cost.py"),
                                          "--results", tf_results], min(300, left() - heavy_reserve), tf_results)
        stage("taskfarm memory per finished task", tf + ["--reps", "1", "--groups", "memory",
                                                          "--results", tf_results], min(150, left() - 60), tf_results)
        stage("taskfarm data path (%d MiB array)" % args.data_mb,
              tf + ["--reps", "1", "--groups", "data", "--results", tf_results,
                    "--data-mb", str(args.data_mb), "--phase-timeout", "120"],
              min(300, left() - 60), tf_results)
        for i, group in enumerate(("queue", "queue_depend")):
            # the plain pass is the quicker one (no depend to check)
            share = (left() - 15) * (0.42 if i == 0 else 1.0)
            stage("taskfarm %s (%d tasks)" % (group, queue_total),
                  tf + ["--reps", "1", "--groups", group, "--results", tf_results,
                        "--queue-total", str(queue_total), "--queue-budget", "%.0f" % max(30, share - 15)],
                  share + 30, tf_results)

    # 4. the report
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    meta["load_after"] = benchlib.load1()
    save_meta()
    out = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--stamp", stamp, "--quiet"],
                         timeout=120)
    if out.returncode != 0:
        log("report failed")
        return 1
    with open(os.path.join(benchlib.RESULTS, "latest.md")) as f:
        md = f.read()
    sys.stdout.write(md)
    if args.update_docs:
        log("docs/performance.md updated" if update_docs(md) else "docs/performance.md has no markers; not updated")
    log("done in %.0f s; results in %s" % (time.monotonic() - t_start, os.path.relpath(benchlib.RESULTS, ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
