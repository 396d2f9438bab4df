#!/usr/bin/env python
"""Controller memory over many MultiEngine calls (issue: nothing grows).

    python bench/multiengine_memory.py [--calls 100000] [--deadline 600]

Starts a 4-engine cluster (bench/tfcluster.py), then makes `--calls`
MultiEngine calls from the blocking client: non-blocking pushes, pulls and
executes on rotating targets, fetched in rounds of 1,000 (so pending results
are created and freed all along), plus a `flush()` of unfetched ones every
round.  It samples the controller's RSS after each round and prints JSON
lines: the RSS at the start (after warm-up), at the end, the growth per
call, and the client's count of pending results left (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402


def emit(metric: str, value, unit: str, **extra) -> None:
    line = {"bench": "multiengine_memory", "system": "taskfarm", "metric": metric,
            "value": value, "unit": unit}
    line.update(extra)
    print(json.dumps(line), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--round", type=int, default=1_000)
    ap.add_argument("--deadline", type=float, default=600.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline

    profile = tempfile.mkdtemp(prefix="taskfarm-bench-mem-")
    cluster = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "tfcluster.py"), "--profile-dir", profile, "-n", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = benchlib.read_line(cluster.stdout, 120)
        info = json.loads(line or "{}")
        if not info.get("ready"):
            print("cluster did not start: %s" % info, file=sys.stderr)
            return 1
        controller = info["controller_pid"]

        from taskfarm import client

        mec = client.MultiEngineClient(profile)
        ids = mec.get_ids()
        mec.push({"v": 0})
        calls = 1
        samples = []

        def one_round(n: int) -> int:
            pending = []
            for i in range(n):
                target = ids[i % len(ids)]
                kind = i % 3
                if kind == 0:
                    pending.append(mec.push({"v": i}, targets=target, block=False))
                elif kind == 1:
                    pending.append(mec.pull("v", targets=target, block=False))
                else:
                    pending.append(mec.execute("w = v", targets=target, block=False))
            # Fetch all but a few; flush drops those.
            for result in pending[:-10]:
                result.get_result()
            mec.flush()
            return n

        calls += one_round(min(args.round, args.calls))  # warm-up
        start_rss = benchlib.rss_kib(controller)
        started = time.monotonic()
        while calls < args.calls and time.monotonic() < deadline:
            calls += one_round(min(args.round, args.calls - calls))
            samples.append(benchlib.rss_kib(controller))
        elapsed = time.monotonic() - started
        end_rss = benchlib.rss_kib(controller)
        left = len(mec._async._results)
        mec.close()
        emit("calls", calls, "calls", seconds=round(elapsed, 1), complete=calls >= args.calls)
        emit("controller_rss_start", start_rss, "KiB")
        emit("controller_rss_end", end_rss, "KiB", peak=max(samples or [end_rss]))
        # Growth over the second half only: allocator warm-up excluded.
        half = samples[len(samples) // 2] if samples else start_rss
        emit("controller_rss_growth_second_half", end_rss - half, "KiB",
             samples_every=args.round, samples=samples[:: max(1, len(samples) // 20)])
        emit("controller_rss_growth_per_call", round((end_rss - start_rss) * 1024 / max(calls, 1), 2), "B")
        emit("client_pending_results_left", left, "results")
        emit("calls_per_second", round(calls / max(elapsed, 1e-9)), "calls/s")
        return 0
    finally:
        if cluster.poll() is None:
            cluster.stdin.close()
            try:
                cluster.wait(30)
            except subprocess.TimeoutExpired:
                cluster.kill()
                cluster.wait(10)


if __name__ == "__main__":
    sys.exit(main())
