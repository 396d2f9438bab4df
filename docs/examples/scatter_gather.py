"""MultiEngine scatter, compute, gather.

The MultiEngine client addresses the engines explicitly.  The example
scatters a numpy array over all engines (one contiguous block each), has
every engine compute on its block, gathers the blocks back into one array
and checks it against the same computation done locally.  A second step
reduces on the engines first and pulls only one number from each.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python scatter_gather.py            # 1,000,000 numbers
    python scatter_gather.py --small    # 10,000 numbers
"""

from __future__ import annotations

import argparse

import numpy as np

from taskfarm import client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="a short array")
    args = parser.parse_args()
    n = 10_000 if args.small else 1_000_000

    mec = client.MultiEngineClient(args.profile_dir)
    ids = mec.get_ids()
    x = np.linspace(0.0, 1.0, n)

    mec.execute("import numpy as np")  # on every engine
    mec.scatter("x", x)  # engine i gets block i
    sizes = [len(part) for part in mec.pull("x")]
    print("engines %s hold blocks of %s numbers" % (ids, sizes))

    mec.execute("y = np.sin(np.pi * x) ** 2")  # compute where the data is
    y = mec.gather("y")  # the blocks, joined in order
    print(
        "gathered %d values; equal to a local computation: %s"
        % (len(y), bool(np.allclose(y, np.sin(np.pi * x) ** 2)))
    )

    # Reduce on the engines, then pull one partial sum each.
    mec.execute("partial = float(y.sum())")
    partials = mec.pull("partial")
    mean = sum(partials) / n
    print(
        "mean of sin(pi x)^2 over [0, 1]: %.6f (exact: 0.5, partial sums %s)"
        % (mean, ["%.1f" % p for p in partials])
    )

    mec.execute("del x, y, partial")  # leave the engines as we found them
    mec.close()


if __name__ == "__main__":
    main()
