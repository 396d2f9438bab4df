#!/usr/bin/env python
"""The journal's disk use before and after `clear()` (issue 12).

    .venv/bin/python bench/journal_disk.py [--count 10] [--mb 20] [--live 20]

A real journal (`taskfarm.controller.journal.Journal`) in a temporary
folder, with the real reactor, no controller: `--live` small tasks that
stay, then `--count` finished tasks of `--mb` MB each, twice over:

- ``files``: the MB are a task result, above the file threshold, so it is
  written to its own file (a pickle header plus one buffer, as a NumPy
  array travels);
- ``sqlite``: the MB are the task's envelope (pushed data), kept in SQLite,
  so a clear frees pages that the incremental vacuum gives back.

For each it prints one JSON line per figure (`benchlib.Emitter`): disk use
(database + WAL + result files) before the clear, right after it, and once
the journal is quiet again; what the live tasks need (`live_need`: a packed
copy of the live rows plus their files); the ratio after / need (the
target: at most 1.10); the number of compaction steps and the longest and
median step in ms (each step runs in the journal's writer thread, never in
the reactor; a commit waits behind at most one step).

`measure()` is the function for `bench/run.py`: it returns the same
figures as a dict.  Or as a stage of its own (about 15 s)::

    stage("taskfarm journal disk use", [sys.executable, os.path.join(HERE,
          "journal_disk.py"), "--results", tf_results], 120, tf_results)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import Emitter, MiB  # noqa: E402


async def measure(reactor, count: int = 10, size: int = 20 * MiB, live: int = 20,
                  where: str = "files") -> dict:
    """Journal `live` small tasks and `count` tasks of `size` bytes (a result
    in a file when `where` is "files", an envelope in SQLite when "sqlite"),
    clear the big ones and wait (at most 120 s) for the journal to compact.
    Returns the figures (bytes, seconds)."""
    from taskfarm import serialization
    from taskfarm.controller.journal import Journal, live_need
    from taskfarm.controller.tasks import TaskRecord, TaskSpec
    from taskfarm.task import Task
    from taskfarm.testing.helpers import sleep

    folder = Path(tempfile.mkdtemp(prefix="taskfarm-journal-disk-"))
    journal = Journal(folder / "journal.sqlite", reactor)
    journal.open()
    try:
        def finish(taskid: int, pad: int, value) -> None:
            envelope = Task("a = 1", push={"pad": os.urandom(pad)} if pad else None).to_envelope()
            journal.accept_batch([(taskid, serialization.pack(envelope), 1.0, 0)])
            record = TaskRecord(taskid, TaskSpec.from_envelope(envelope), 1.0)
            record.start(0, taskid)
            record.succeed(value, 1.0, 2.0)
            journal.finished(record, record.link)

        for taskid in range(live):
            finish(taskid, 10_000, b"live")
        await journal.sync()
        started = time.monotonic()
        big = list(range(live, live + count))
        for taskid in big:
            if where == "files":
                finish(taskid, 0, [b"\x80\x05header", os.urandom(size)])
            else:
                finish(taskid, size, b"dead")
            await journal.sync()
        written_s = time.monotonic() - started
        before = journal.disk_use()

        journal.compaction_steps.clear()
        started = time.monotonic()
        journal.cleared(big)
        await journal.sync()
        cleared = journal.disk_use()
        deadline = time.monotonic() + 120
        while journal.compacting and time.monotonic() < deadline:
            await sleep(0.01)
        compact_s = time.monotonic() - started
        after = journal.disk_use()
        need = live_need(journal.path)
        steps = [seconds for _, _, seconds in journal.compaction_steps]
        vacuums = [s for kind, _, s in journal.compaction_steps if kind.startswith("vacuum")]
        checkpoints = [s for kind, _, s in journal.compaction_steps if kind == "checkpoint"]
        steps.sort()
        return {
            "where": where,
            "count": count,
            "size": size,
            "write_s": written_s,
            "before": before,
            "after_clear": cleared,
            "after_compaction": after,
            "live_need": need,
            "ratio": after["total"] / need,
            "compaction_s": compact_s,
            "steps": len(steps),
            "vacuum_steps": len(vacuums),
            "vacuum_max_ms": 1000 * max(vacuums, default=0.0),
            "vacuum_median_ms": 1000 * (sorted(vacuums)[len(vacuums) // 2] if vacuums else 0.0),
            "checkpoint_max_ms": 1000 * max(checkpoints, default=0.0),
            "compacted": not journal.compacting,
        }
    finally:
        journal.close()
        shutil.rmtree(folder, ignore_errors=True)


def emit(emitter: Emitter, figures: dict) -> None:
    where = figures["where"]
    extra = {"count": figures["count"], "mb": figures["size"] // MiB}
    for name in ("before", "after_clear", "after_compaction"):
        use = figures[name]
        emitter("disk_%s_%s" % (where, name), use["total"] / MiB, "MiB", db=use["db"],
                wal=use["wal"], files=use["files"], **extra)
    emitter("live_need_%s" % where, figures["live_need"] / MiB, "MiB", **extra)
    emitter("disk_after_over_need_%s" % where, figures["ratio"], "ratio", target=1.10, **extra)
    emitter("compaction_%s" % where, figures["compaction_s"], "s", steps=figures["steps"],
            vacuum_steps=figures["vacuum_steps"], compacted=figures["compacted"], **extra)
    emitter("vacuum_step_max_%s" % where, figures["vacuum_max_ms"], "ms",
            median_ms=round(figures["vacuum_median_ms"], 3), **extra)
    emitter("checkpoint_step_max_%s" % where, figures["checkpoint_max_ms"], "ms", **extra)


class _Tee:
    """Writes to stdout and appends to a results file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--live", type=int, default=20)
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--results", help="also append the JSON lines to this file "
                        "(bench/results/taskfarm.jsonl for bench/run.py)")
    args = parser.parse_args()
    from twisted.internet import defer, task

    stream = _Tee(args.results) if args.results else None
    emitter = Emitter("journal_disk", "taskfarm", args.run, stream)

    async def run(reactor):
        for where in ("files", "sqlite"):
            figures = await measure(reactor, args.count, args.mb * MiB, args.live, where)
            emit(emitter, figures)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
