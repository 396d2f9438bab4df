"""Tasks that need something the engines get later: retries, and depend.

Part 1 (retries).  Ten tasks need a name, `calibration`, that the engines
do not have yet: the client sets it on every engine a moment later, with
the MultiEngine client.  A task that finds it missing raises, and its
`retries` send it out again until it finds it.  This is how the original
`TaskRejectError` is written here: raise, and give the task retries.
Each engine counts the attempts it ran, so the example can say how many
it took.

Part 2 (depend).  When the condition is an engine *property*, a `depend`
function says so to the scheduler: the task waits in the queue, with no
retries and no failed attempts, until an engine's properties satisfy it.
The client sets the property a moment later with `set_properties`.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python retry_until_ready.py            # ready after 2 s
    python retry_until_ready.py --small    # ready after 0.5 s
"""

from __future__ import annotations

import argparse
import time

from taskfarm import client

# Each attempt counts itself on its engine, pauses, then checks.  Retries
# are paced by the controller: an attempt that failed and will be retried
# waits a moment before it goes out again (its `retry_delay`, growing with
# each attempt), and the engine it failed on sits out that task for a
# while.  Where the controller does not pace retries, a retry goes out at
# once; the short pause below, and plenty of `retries`, make the example
# work there too.
NEEDS_CALIBRATION = """
import time
attempts = globals().get("attempts", 0) + 1
time.sleep(0.05)
if "calibration" not in globals():
    raise RuntimeError("engine %d is not calibrated yet" % id)
value = calibration * x
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="get ready sooner")
    args = parser.parse_args()
    ready_after = 0.5 if args.small else 2.0

    tc = client.TaskClient(args.profile_dir)
    mec = client.MultiEngineClient(args.profile_dir)
    # Start from engines that are not ready (a run before may have left names).
    mec.execute("globals().pop('calibration', None); attempts = 0")
    mec.del_properties("calibrated")

    # -- Part 1: raise until ready, with retries ---------------------------------
    taskids = [
        tc.run(client.Task(NEEDS_CALIBRATION, push={"x": x}, pull="value", retries=100))
        for x in range(10)
    ]
    time.sleep(ready_after)
    mec.execute("calibration = 10")  # now every engine is ready
    results = tc.get_task_results(taskids, block=True)
    succeeded = [r for r in results if r.failure is None]
    attempts = sum(mec.pull("attempts"))
    print(
        "retries: %d of %d tasks succeeded, %d attempts in all, values %s"
        % (len(succeeded), len(results), attempts, [r.ns.value for r in succeeded])
    )

    # -- Part 2: wait for a property, with depend --------------------------------
    def calibrated(properties):  # runs on the controller's machine
        return properties.get("calibrated", False)

    start = time.time()
    taskid = tc.run(client.Task("value = calibration * 2", pull="value", depend=calibrated))
    time.sleep(ready_after)
    print(
        "depend: after %.1f s the task is still %s"
        % (ready_after, [k for k, ids in tc.queue_status(verbose=True).items() if taskid in ids][0])
    )
    engine = tc.engine_ids()[-1]
    mec.set_properties({"calibrated": True}, targets=engine)  # the scheduler sees this at once
    tr = tc.get_task_result(taskid, block=True)
    print(
        "depend: the task ran on engine %d (the one calibrated: %s) after %.1f s, value %d"
        % (tr.engineid, tr.engineid == engine, time.time() - start, tr.ns.value)
    )

    # Leave the engines as we found them.
    mec.execute("globals().pop('calibration', None); globals().pop('attempts', None)")
    mec.del_properties("calibrated")
    tc.close()
    mec.close()


if __name__ == "__main__":
    main()
