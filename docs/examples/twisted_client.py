"""The Deferred client in a Twisted program.

A program that runs Twisted's reactor itself uses `taskfarm.asyncclient`:
the same methods as the blocking client, each returning a Deferred.  This
one, started by `twisted.internet.task.react`, finds the longest Collatz
chain below a limit: it submits one `MapTask` per range of starting
numbers, handles each result in a callback as soon as it arrives (in the
order the tasks finish, not the order they were sent), and meanwhile asks
the MultiEngine client for each engine's process id: one reactor, both clients.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python twisted_client.py            # below 200,000, in 40 tasks
    python twisted_client.py --small    # below 20,000, in 8 tasks
"""

from __future__ import annotations

import argparse

from twisted.internet import defer, task

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.task import MapTask


def longest_chain(low, high):
    """Runs on an engine: (length, start) of the longest chain from [low, high)."""
    best = (0, low)
    for start in range(low, high):
        n, length = start, 1
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            length += 1
        best = max(best, (length, start))
    return best


async def main(reactor, profile_dir, limit, n_tasks):
    tc = TaskClient(profile_dir, reactor=reactor)  # no I/O yet
    mec = MultiEngineClient(profile_dir, reactor=reactor)

    step = -(-limit // n_tasks)  # ceiling division
    ranges = [(low, min(low + step, limit)) for low in range(1, limit, step)]
    taskids = await defer.gatherResults([tc.run(MapTask(longest_chain, r)) for r in ranges])

    finished = []

    def arrived(chain, low, high):
        # A callback: runs in the reactor as soon as this task's result is in.
        finished.append(chain)
        print(
            "task %2d of %d done: [%d, %d) -> start %d, length %d"
            % (len(finished), len(ranges), low, high, chain[1], chain[0])
        )
        return chain

    waits = []
    for taskid, (low, high) in zip(taskids, ranges, strict=True):
        d = tc.get_task_result(taskid, block=True)  # a MapTask: fires with the return value
        d.addCallback(arrived, low, high)
        d.addTimeout(120, reactor)  # never wait forever
        waits.append(d)

    # The MultiEngine client shares the reactor: this call goes out while the
    # tasks run, and each engine answers it between two tasks (an engine's
    # MultiEngine commands and its tasks wait in one queue).
    pids = await mec.execute("import os; pid = os.getpid()").addCallback(lambda _: mec.pull("pid"))
    print("engines' process ids:", pids)

    chains = await defer.gatherResults(waits, consumeErrors=True)
    length, start = max(chains)
    print("longest Collatz chain below %d starts at %d: %d numbers" % (limit, start, length))
    await mec.execute("del pid")
    await tc.disconnect()  # waits until every submitted task was accepted
    await mec.disconnect()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="a lower limit")
    args = parser.parse_args()
    limit, n_tasks = (20_000, 8) if args.small else (200_000, 40)
    task.react(
        lambda reactor: defer.Deferred.fromCoroutine(
            main(reactor, args.profile_dir, limit, n_tasks)
        )
    )


if __name__ == "__main__":
    run()
