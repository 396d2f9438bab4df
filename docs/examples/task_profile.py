"""A profile of task durations and of the queue over time.

The example submits tasks of different lengths (each sleeps a while),
samples `queue_status(verbose=True)` while they run, and prints two small
tables: how many of *its* tasks were in each state at each sample, and,
from each `TaskResult`'s timing fields, how long each task waited in the
queue and how long it ran on its engine.  A summary per engine ends it.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python task_profile.py            # 40 tasks of 0.1 .. 0.8 s
    python task_profile.py --small    # 12 tasks of 0.05 .. 0.2 s
"""

from __future__ import annotations

import argparse
import collections
import time

from taskfarm import client

STATES = ("scheduled", "pending", "succeeded", "failed", "aborted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="fewer, shorter tasks")
    args = parser.parse_args()
    n_tasks, unit = (12, 0.05) if args.small else (40, 0.1)

    tc = client.TaskClient(args.profile_dir)
    start = time.time()
    # Task i sleeps 1..4 units, so the engines finish at different times.
    lengths = [unit * (1 + i % 4) for i in range(n_tasks)]
    taskids = tc.run_many(client.Task("import time\ntime.sleep(%r)" % length) for length in lengths)
    mine = set(taskids)

    # Sample the queue until every task of ours has finished.  verbose=True
    # lists ids per state, so other users' tasks on the same controller do
    # not mix into our counts.
    print("queue status over time (this program's %d tasks)" % n_tasks)
    print("%6s " % "time" + " ".join("%9s" % s for s in STATES))
    while True:
        status = tc.queue_status(verbose=True)
        counts = {state: len(mine.intersection(status[state])) for state in STATES}
        print("%5.2fs " % (time.time() - start) + " ".join("%9d" % counts[s] for s in STATES))
        if counts["scheduled"] + counts["pending"] == 0:
            break
        time.sleep(unit)

    # The timing fields of each TaskResult: submitted_at (accepted by the
    # controller), started_at (on the engine), completed_at; duration is
    # the run time on the engine.
    results = tc.get_task_results(taskids, block=True)
    print()
    print("%7s %6s %8s %8s %8s" % ("task", "engine", "asked", "waited", "ran"))
    per_engine = collections.defaultdict(list)
    for tr, length in zip(results, lengths, strict=True):
        waited = (tr.started_at - tr.submitted_at) if tr.started_at is not None else float("nan")
        print(
            "%7d %6d %7.2fs %7.2fs %7.2fs" % (tr.taskid, tr.engineid, length, waited, tr.duration)
        )
        per_engine[tr.engineid].append(tr.duration)

    print()
    print("%6s %6s %8s" % ("engine", "tasks", "busy"))
    for engine, durations in sorted(per_engine.items()):
        print("%6d %6d %7.2fs" % (engine, len(durations), sum(durations)))
    busy = sum(sum(d) for d in per_engine.values())
    print(
        "%d tasks, %.2f s of work in %.2f s on %d engines"
        % (len(results), busy, time.time() - start, len(per_engine))
    )
    tc.close()


if __name__ == "__main__":
    main()
