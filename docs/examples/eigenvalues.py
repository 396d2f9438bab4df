"""Eigenvalues of random matrices, computed with numpy.linalg on the engines.

Each task builds one random symmetric matrix (a Gaussian orthogonal
ensemble: entries normal, then A = (G + G.T) / 2) and returns its
eigenvalues.  For large matrices, the eigenvalues divided by sqrt(n / 2)
fill the interval [-2, 2] following Wigner's semicircle law; the client
prints their histogram.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python eigenvalues.py            # 32 matrices of 400 x 400
    python eigenvalues.py --small    # 8 matrices of 60 x 60
"""

from __future__ import annotations

import argparse

from taskfarm import client


def random_eigenvalues(n, seed):
    """Runs on an engine: the eigenvalues of one n x n GOE matrix, scaled."""
    import numpy as np

    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, n))
    a = (g + g.T) / 2.0
    # eigvalsh: the matrix is symmetric, so its eigenvalues are real.
    return (np.linalg.eigvalsh(a) / np.sqrt(n / 2.0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="fewer, smaller matrices")
    args = parser.parse_args()
    n_matrices, n = (8, 60) if args.small else (32, 400)

    tc = client.TaskClient(args.profile_dir)
    # map: one MapTask per element, load-balanced, results in order.
    spectra = tc.map(random_eigenvalues, [n] * n_matrices, range(n_matrices))
    values = [v for spectrum in spectra for v in spectrum]

    print("%d eigenvalues of %d random %d x %d matrices" % (len(values), n_matrices, n, n))
    print(
        "scaled range [%.3f, %.3f] (the semicircle law says [-2, 2])" % (min(values), max(values))
    )
    bins = 8
    for i in range(bins):
        low = -2.4 + 4.8 * i / bins
        high = low + 4.8 / bins
        share = sum(low <= v < high for v in values) / len(values)
        print("%6.2f .. %5.2f %6.3f %s" % (low, high, share, "#" * round(100 * share)))
    tc.close()


if __name__ == "__main__":
    main()
