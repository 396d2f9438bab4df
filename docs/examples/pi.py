"""Estimate pi by random sampling, one MapTask per batch of samples.

A point drawn uniformly in the unit square falls inside the quarter circle
x*x + y*y <= 1 with probability pi/4.  Each task draws one batch of points
on an engine and returns how many fell inside; the client adds the counts.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python pi.py              # 64 batches of 1,000,000 points
    python pi.py --small      # 8 batches of 100,000 points
"""

from __future__ import annotations

import argparse
import math

from taskfarm import client


def count_inside(n_points, seed):
    """Runs on an engine: how many of `n_points` random points are inside."""
    import numpy as np

    rng = np.random.default_rng(seed)  # a seed per batch: batches are independent
    x = rng.random(n_points)
    y = rng.random(n_points)
    return int(np.count_nonzero(x * x + y * y <= 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="fewer, smaller batches")
    args = parser.parse_args()
    batches, per_batch = (8, 100_000) if args.small else (64, 1_000_000)

    tc = client.TaskClient(args.profile_dir)
    taskids = [tc.run(client.MapTask(count_inside, (per_batch, seed))) for seed in range(batches)]
    inside = sum(tc.get_task_results(taskids, block=True))
    total = batches * per_batch
    estimate = 4.0 * inside / total
    print("%d points in %d tasks, %d inside the quarter circle" % (total, batches, inside))
    print("pi is about %.6f (error %.6f)" % (estimate, estimate - math.pi))
    tc.close()


if __name__ == "__main__":
    main()
