"""The job `taskfarm demo` runs against its cluster: the original quick-start.

Run by hand against any cluster with ``python -m taskfarm.demo``; it exits
with status 1 if a result is wrong.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from taskfarm import client

    tc = client.TaskClient()
    started = time.perf_counter()
    tasks = [client.Task("a = %i" % n, pull="a") for n in range(1000)]
    ids = [tc.run(t) for t in tasks]
    tc.barrier(ids)
    results = [tc.get_task_result(i) for i in ids]
    elapsed = time.perf_counter() - started
    tr = results[73]
    print(tr, "engine", tr.engineid, tr.submitted, tr.completed, "%.6f s" % tr.duration)
    print("tr.results['a'] =", tr.results["a"], " tr.ns.a =", tr.ns.a)
    print("queue_status:", tc.queue_status())
    wrong = [r.taskid for n, r in enumerate(results) if r.failure or r.ns.a != n]
    engines = sorted({r.engineid for r in results})
    print(
        "1000 tasks in %.2f s on engines %s; %d wrong" % (elapsed, engines, len(wrong))
    )
    squares = tc.get_task_result(
        tc.run(client.MapTask(sum, ([n * n for n in range(10)],))), block=True
    )
    print("MapTask(sum, squares of 0..9) =", squares)
    tc.close()
    return 1 if wrong or squares != 285 else 0


if __name__ == "__main__":
    sys.exit(main())
