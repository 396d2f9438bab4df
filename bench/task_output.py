#!/usr/bin/env python
"""What a task's print costs on the engine now that output is captured.

    .venv/bin/python bench/task_output.py [--lines 200000] [--reps 3]

Runs a code-string task printing `--lines` short lines, and a MapTask doing
the same, through the engine's `Namespace` (the very code a worker thread
runs: capture per thread into a bounded buffer, default 1 MiB per stream),
and reports the CPU time of the thread that ran it (``time.thread_time``,
so other processes on a shared machine do not count), the best of
`--reps`.  For comparison it also runs the same prints into a Twisted
``LoggingFile`` (what ``print`` in a task became before output was
captured: one log event per line) with a text file observer.

Issue 13's bar: 200,000 lines cost under 0.5 s of engine time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from taskfarm import wire
from taskfarm.engine.namespace import Namespace
from taskfarm.task import MapTask, Task


def printer(count):
    for i in range(count):
        print("line", i)
    return count


def _args(task) -> tuple:
    envelope = wire.TaskEnvelope.parse(task.to_envelope())
    return tuple(wire.TaskArgs(envelope.kind, envelope.payload, False, False, None))


def _cpu(run) -> float:
    started = time.thread_time()
    run()
    return time.thread_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    options = parser.parse_args()
    namespace = Namespace()
    code = _args(Task("for i in range(%d):\n    print('line', i)\n" % options.lines))
    mapped = _args(MapTask(printer, (options.lines,)))
    for name, args in (("Task", code), ("MapTask", mapped)):
        best = float("inf")
        for _ in range(options.reps):
            best = min(best, _cpu(lambda a=args: namespace.run("task", a)))
            out, _ = namespace.take_output()
        print("%-8s %d lines: %.3f s engine CPU, %d characters kept" % (
            name, options.lines, best, len(out)))

    from twisted.logger import Logger, LoggingFile, globalLogPublisher, textFileLogObserver

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "engine.out"), "w") as out:
            observer = textFileLogObserver(out)
            globalLogPublisher.addObserver(observer)
            real, sys.stdout = sys.stdout, LoggingFile(Logger(namespace="stdout"))
            try:
                best = _cpu(lambda: printer(options.lines))
            finally:
                sys.stdout = real
                globalLogPublisher.removeObserver(observer)
    print("before:  %d lines as log events: %.3f s engine CPU" % (options.lines, best))


if __name__ == "__main__":
    main()
