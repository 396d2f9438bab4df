#!/usr/bin/env python
"""The raw Foolscap floor, measured in the same run as taskfarm: one client
process and one server process on loopback, nothing of taskfarm between.

    python bench/fcfloor.py [--seq 500] [--echo 64] [--deadline 60]

It starts a server (this script with ``--serve``: a Tub on 127.0.0.1 with
one Referenceable), connects, and prints one JSON object on stdout::

    {"seq_us_median": ..., "seq_us_p99": ..., "seq_n": ...,
     "seq_cpu_us_client": ..., "seq_cpu_us_server": ...,
     "echo1MB_MBps": ..., "echo_n": ...}

- sequential round trip: ``callRemote("noop", i)``, one at a time, `--seq`
  calls (after 50 to warm up), with the CPU time (user + system) each
  process spent per call;
- 1 MB echo: ``callRemote("echo", b)`` with a 1 MiB `bytes`, 4 calls
  outstanding, `--echo` calls; MB/s of payload one way.

The server ends when its stdin closes (and is killed by PID if it does not);
the whole run is bounded by `--deadline` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402


def serve() -> int:
    from foolscap.api import Referenceable, Tub
    from foolscap.util import allocate_tcp_port
    from twisted.internet import protocol, reactor, stdio

    class Server(Referenceable):
        def remote_noop(self, x):
            return x

        def remote_echo(self, data):
            return data

    tub = Tub()
    port = allocate_tcp_port()
    tub.listenOn("tcp:%d:interface=127.0.0.1" % port)
    tub.setLocation("127.0.0.1:%d" % port)
    tub.startService()
    furl = tub.registerReference(Server())

    class Watch(protocol.Protocol):
        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Watch(), stdout=os.open(os.devnull, os.O_WRONLY))
    sys.stdout.write(furl + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


def measure(args) -> dict:
    from foolscap.api import Tub
    from twisted.internet import defer, reactor

    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out: dict = {}
    try:
        furl = benchlib.read_line(server.stdout, 30)
        if not furl:
            return {"error": "the Foolscap server did not start"}
        furl = furl.strip()
        deadline = time.monotonic() + args.deadline

        async def run() -> None:
            tub = Tub()
            tub.startService()
            try:
                ref = await tub.getReference(furl)
                for i in range(50):
                    await ref.callRemote("noop", i)
                lat = []
                # CPU per call of both processes: what a round trip costs
                # beside its wall time (on a loaded machine, the other).
                cpu0 = (benchlib.cpu_seconds(os.getpid()), benchlib.cpu_seconds(server.pid))
                for i in range(args.seq):
                    t0 = time.perf_counter()
                    await ref.callRemote("noop", i)
                    lat.append(time.perf_counter() - t0)
                    if time.monotonic() > deadline:
                        break
                out["seq_us_median"] = statistics.median(lat) * 1e6
                out["seq_us_p99"] = benchlib.pct(lat, 99) * 1e6
                out["seq_n"] = len(lat)
                cpu1 = (benchlib.cpu_seconds(os.getpid()), benchlib.cpu_seconds(server.pid))
                out["seq_cpu_us_client"] = (cpu1[0] - cpu0[0]) / len(lat) * 1e6
                out["seq_cpu_us_server"] = (cpu1[1] - cpu0[1]) / len(lat) * 1e6
                payload = os.urandom(benchlib.MiB)
                await ref.callRemote("echo", payload)
                done = 0
                t0 = time.perf_counter()
                window = 4
                pending = [ref.callRemote("echo", payload) for _ in range(min(window, args.echo))]
                sent = len(pending)
                while pending and time.monotonic() < deadline:
                    back = await pending.pop(0)
                    assert len(back) == len(payload)
                    done += 1
                    if sent < args.echo:
                        pending.append(ref.callRemote("echo", payload))
                        sent += 1
                for d in pending:
                    d.addErrback(lambda _: None)
                dt = time.perf_counter() - t0
                out["echo1MB_MBps"] = done * benchlib.MiB / dt / 1e6
                out["echo_n"] = done
            finally:
                await tub.stopService()

        def main_task():
            d = defer.Deferred.fromCoroutine(run())
            d.addErrback(lambda f: out.setdefault("error", str(f.value)))
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(main_task)
        reactor.callLater(args.deadline + 10, reactor.stop)
        reactor.run()
    finally:
        try:
            server.stdin.close()
            server.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        benchlib.kill_pids([server.pid], grace=2.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=500)
    ap.add_argument("--echo", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=60.0)
    args = ap.parse_args()
    if args.serve:
        return serve()
    out = measure(args)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
