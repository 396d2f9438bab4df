#!/usr/bin/env python
"""A taskfarm cluster for the benchmarks, in its own process and reactor.

    python bench/tfcluster.py --profile-dir D -n 4 [--controller-opt=--no-journal ...]

Starts a controller and N engines with `taskfarm.cluster.launcher.Cluster`
in profile D, then prints ONE JSON line on stdout::

    {"ready": true, "controller_pid": P, "engine_pids": [...], "launcher_pid": L}

(or {"ready": false, "error": "..."} and exit 1).  A line ``add K`` on its
stdin starts K more engines (`Cluster.add_engines`) and answers
``{"added": [pids]}``.  It runs until its stdin closes or it gets
SIGTERM/SIGINT, and then stops every child with
`Cluster.stop()` (SIGTERM, SIGKILL after a grace period).  The benchmark
process owns this one by PID and also checks afterwards that the
controller and engine PIDs are gone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile-dir", required=True)
    ap.add_argument("-n", type=int, default=4, help="engines at start (0: none until `add K`)")
    ap.add_argument("--controller-opt", action="append", default=[])
    ap.add_argument("--start-timeout", type=float, default=60.0)
    args = ap.parse_args()

    from twisted.internet import defer, reactor, stdio
    from twisted.protocols.basic import LineOnlyReceiver

    from taskfarm.cluster.launcher import Cluster
    from taskfarm.profile import Profile

    cluster = Cluster(
        Profile.from_option(args.profile_dir),
        args.n,
        reactor,
        controller_options=args.controller_opt,
        start_timeout=args.start_timeout,
    )
    state = {"status": 0, "stopped": False}

    def say(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def stop_children():
        # Runs once, before the reactor shuts down (SIGTERM, SIGINT, stdin
        # closed or a failed start): the reactor waits for this Deferred.
        if state["stopped"]:
            return None
        state["stopped"] = True
        return defer.Deferred.fromCoroutine(cluster.stop())

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    class Commands(LineOnlyReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            words = line.decode(errors="replace").split()
            if len(words) == 2 and words[0] == "add" and words[1].isdigit():
                count = int(words[1])
                d = cluster.add_engines(count)
                d.addCallback(lambda _: say(
                    {"added": [slot.pid for slot in cluster.engines[-count:]]}))
                d.addErrback(lambda f: say({"error": str(f.value)}))
            else:
                say({"error": "unknown command %r" % line})

        def connectionLost(self, reason=None):  # the owner closed stdin or died
            stop()

    async def start() -> None:
        try:
            await cluster.start()
        except Exception as e:  # ClusterError, or anything while starting
            say({"ready": False, "error": "%s: %s" % (type(e).__name__, e)})
            state["status"] = 1
            stop()
            return
        say(
            {
                "ready": True,
                "launcher_pid": os.getpid(),
                "controller_pid": cluster.controller.pid,
                "engine_pids": [slot.pid for slot in cluster.engines],
            }
        )

    reactor.addSystemEventTrigger("before", "shutdown", stop_children)
    stdio.StandardIO(Commands(), stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(start()))
    # The reactor's own SIGTERM/SIGINT handlers stop it, which runs
    # stop_children first; SIGCHLD handling reaps the children.
    reactor.run()
    return state["status"]


if __name__ == "__main__":
    sys.exit(main())
