"""Monte Carlo option pricing over a grid of strikes and volatilities.

Each point of the grid (strike K, volatility sigma) is one `MapTask`: an
engine simulates the stock price at expiry under geometric Brownian motion
with numpy and returns the discounted mean pay-off of a European call and
put.  The client gathers the prices into a table and compares each call
with the Black-Scholes formula, which is exact for this model, so the
Monte Carlo error is visible.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python option_pricing.py            # a 6 x 5 grid, 200,000 paths each
    python option_pricing.py --small    # a 3 x 3 grid, 20,000 paths each
"""

from __future__ import annotations

import argparse
import math

from taskfarm import client


def price_option(spot, strike, sigma, rate, years, n_paths, seed):
    """Runs on an engine: Monte Carlo (call, put, standard error of the call).

    The imports are inside the function so that it carries everything it
    needs; the engine only needs numpy installed.
    """
    import numpy as np

    rng = np.random.default_rng(seed)  # one seed per grid point: reproducible prices
    z = rng.standard_normal(n_paths)
    at_expiry = spot * np.exp((rate - 0.5 * sigma**2) * years + sigma * math.sqrt(years) * z)
    discount = math.exp(-rate * years)
    calls = discount * np.maximum(at_expiry - strike, 0.0)
    puts = discount * np.maximum(strike - at_expiry, 0.0)
    return float(calls.mean()), float(puts.mean()), float(calls.std() / math.sqrt(n_paths))


def black_scholes_call(spot, strike, sigma, rate, years):
    """The closed form of the same call, computed here on the client."""
    d1 = (math.log(spot / strike) + (rate + 0.5 * sigma**2) * years) / (sigma * math.sqrt(years))
    d2 = d1 - sigma * math.sqrt(years)
    normal_cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    return spot * normal_cdf(d1) - strike * math.exp(-rate * years) * normal_cdf(d2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="a small grid, for a quick run")
    args = parser.parse_args()

    spot, rate, years = 100.0, 0.05, 1.0
    if args.small:
        strikes, sigmas, n_paths = [90.0, 100.0, 110.0], [0.2, 0.3, 0.4], 20_000
    else:
        strikes = [80.0, 90.0, 100.0, 110.0, 120.0, 130.0]
        sigmas = [0.1, 0.2, 0.3, 0.4, 0.5]
        n_paths = 200_000

    tc = client.TaskClient(args.profile_dir)  # None: the default profile's task.furl

    # One task per grid point.  `run` returns an id at once; the tasks go
    # out together and the engines work on them in parallel.
    grid = [(k, s) for k in strikes for s in sigmas]
    taskids = [
        tc.run(client.MapTask(price_option, (spot, k, s, rate, years, n_paths, seed), retries=1))
        for seed, (k, s) in enumerate(grid)
    ]
    # For a MapTask, get_task_results gives each function's return value.
    prices = dict(zip(grid, tc.get_task_results(taskids, block=True), strict=True))

    print(
        "European options, spot %.0f, rate %.2f, %g year, %d paths per price"
        % (spot, rate, years, n_paths)
    )
    print("%8s %6s %9s %9s %9s %7s" % ("strike", "sigma", "call", "put", "exact", "errors"))
    worst = 0.0
    for k, s in grid:
        call, put, stderr = prices[k, s]
        exact = black_scholes_call(spot, k, s, rate, years)
        errors = abs(call - exact) / stderr  # the error in standard errors
        worst = max(worst, errors)
        print("%8.1f %6.2f %9.4f %9.4f %9.4f %7.2f" % (k, s, call, put, exact, errors))
    print("priced %d options; worst call error %.2f standard errors" % (len(grid), worst))
    tc.close()


if __name__ == "__main__":
    main()
