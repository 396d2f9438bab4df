#!/usr/bin/env python
"""What the dashboard costs bulk throughput (issue 13: under 5% while open).

    python bench/dashboard_cost.py [--n 10000] [--reps 3] [--results FILE]

One cluster of 4 engines with ``--dashboard tcp:0``.  Bulk no-op maps of
`n` tasks alternate between two phases, `reps` of each:

- ``closed``: nobody watches (the monitor's hooks still run: they always do);
- ``open``: one live page (a reader of ``/events``, taking every snapshot)
  and a Prometheus-like scraper of ``/metrics`` every second.

It reports the median tasks/s of each and ``open / closed``; and, in this
process, the microseconds the monitor's hooks add per task (one
``Monitor.moved`` into running and one out of it), next to the controller's
own cost per task from docs/performance.md.  One JSON line per figure goes
to ``--results`` (bench/run.py's file) and to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import benchlib  # noqa: E402
from taskfarm_bench import BenchCluster  # noqa: E402


def noop(x):
    """The bulk workload (defined here, in __main__, so it travels by value)."""
    return x


class Watcher:
    """A live page and a scraper, in threads, until `stop`."""

    def __init__(self, url: str) -> None:
        base, token = url.split("/?token=")
        self._events = "%s/events?token=%s" % (base, token)
        self._metrics = "%s/metrics?token=%s" % (base, token)
        self._stop = threading.Event()
        self.snapshots = 0
        self.scrapes = 0
        self.bytes = 0
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._read, self._scrape)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        with urllib.request.urlopen(self._events, timeout=10) as stream:
            while not self._stop.is_set():
                line = stream.readline()
                if not line:
                    return
                self.bytes += len(line)
                if line.startswith(b"event: snapshot"):
                    self.snapshots += 1

    def _scrape(self) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(self._metrics, timeout=10) as answer:
                self.bytes += len(answer.read())
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(12)


def hook_cost_us(rounds: int = 200_000) -> float:
    """Microseconds `Monitor.moved` adds per task (into and out of running),
    net of the loop that plays the transitions; on the reactor's clock
    (`time.time`), as in the controller."""
    from taskfarm.controller.journal import NullJournal
    from taskfarm.controller.monitor import Monitor
    from taskfarm.controller.registry import EngineRegistry
    from taskfarm.controller.store import TaskStore
    from taskfarm.controller.tasks import TaskState

    class Clock:
        seconds = staticmethod(time.time)

    clock = Clock()
    registry = EngineRegistry(clock, heartbeat_period=None)
    monitor = Monitor(clock, registry, TaskStore(clock, NullJournal(), None))

    class Record:
        __slots__ = ("taskid", "state", "engine_id", "seq", "attempts", "submitted", "data")

    record = Record()
    record.taskid, record.engine_id, record.attempts, record.submitted, record.data = 1, 0, 1, 0.0, None
    running, succeeded, queued = TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.QUEUED

    def play(moved) -> float:
        t0 = time.perf_counter()
        for seq in range(rounds):
            record.state, record.seq = running, seq
            moved(record, queued, None)
            record.state = succeeded
            moved(record, running, 0)
        return time.perf_counter() - t0

    def nothing(record, before, engine_id) -> None:
        pass

    best = min(play(monitor.moved) - play(nothing) for _ in range(3))
    return best / rounds * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--results", default=None)
    ap.add_argument("--run", type=int, default=1)
    args = ap.parse_args()
    lines: list[str] = []

    class Tee:
        """Each JSON line to stdout, and kept for --results."""

        def write(self, text: str) -> None:
            sys.stdout.write(text)
            lines.extend(line for line in text.splitlines() if line)

        def flush(self) -> None:
            sys.stdout.flush()

    record = benchlib.Emitter("taskfarm", "taskfarm", args.run, stream=Tee())

    from taskfarm import client
    from taskfarm.profile import Profile

    cluster = BenchCluster(["--dashboard", "tcp:0"])
    watcher = None
    try:
        url = Profile.from_option(cluster.profile).dashboard_url_file.read_text().strip()
        tc = client.TaskClient(cluster.profile, connect_timeout=30)
        tc.map(noop, range(200))  # warm up
        rates = {"closed": [], "open": []}
        deadline = time.monotonic() + 240
        for _ in range(args.reps):
            for phase in ("closed", "open"):
                if time.monotonic() > deadline:
                    break
                if phase == "open":
                    watcher = Watcher(url)
                    time.sleep(0.6)  # the page is live before the map starts
                t0 = time.perf_counter()
                out = tc.map(noop, range(args.n))
                dt = time.perf_counter() - t0
                assert len(out) == args.n
                rates[phase].append(args.n / dt)
                if watcher is not None:
                    watcher.stop()
                    if watcher.snapshots < 2:
                        raise RuntimeError("the page got %d snapshots" % watcher.snapshots)
                    watcher = None
        tc.close()
    finally:
        if watcher is not None:
            watcher.stop()
        cluster.stop()
    closed = statistics.median(rates["closed"])
    opened = statistics.median(rates["open"])
    record("bulk_map_dashboard_closed_tasks_s", closed, "tasks/s", n=args.n)
    record("bulk_map_dashboard_open_tasks_s", opened, "tasks/s", n=args.n)
    record("dashboard_open_over_closed", opened / closed, "ratio")
    record("monitor_hooks_us_task", hook_cost_us(), "us/task")
    if args.results:
        benchlib.append_results(args.results, lines)
    sys.stderr.write(
        "[dashboard_cost] closed %.0f tasks/s, open %.0f tasks/s (open/closed %.3f; runs %s)\n"
        % (closed, opened, opened / closed, {k: [round(v) for v in vs] for k, vs in rates.items()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
