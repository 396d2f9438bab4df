#!/usr/bin/env python
"""The data path for large values: MB/s and peak memory per process.

    python bench/datapath.py [--mb 200] [--big 100] [--reps 1] [--only ret1MB,array,foolscap]

Measures, on a fresh cluster of this checkout (bench/tfcluster.py, 4
engines, loopback), with the blocking client:

  ret1MB      100 x 1 MiB ``bytes`` results (`tc.map`), MB/s
  array_result  a NumPy array of --mb MB returned by a MapTask, MB/s
  array_push  the same array pushed to one engine (`mec.push`), MB/s
  array_pull  pulled back from it (`mec.pull`), MB/s
  foolscap_echo  raw Foolscap: 1 MB byte strings echoed between two
              processes over a TLS loopback connection, MB/s one way

For each array phase it also gives the peak RSS growth of the client,
the controller and the engine that held the array, in MiB and as a ratio
to the payload: the kernel's high-water mark (VmHWM) is reset before the
phase (``/proc/PID/clear_refs``) and read after it.

`measure(...)` is the function for bench/run.py: it returns the metrics
as a list of dicts (metric, value, unit, extras).  Run as a script, it
prints them as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import benchlib  # noqa: E402

MiB = 1024 * 1024


# -- engine-side work (module level in __main__: shipped by value) ---------------


def big(i, n=MiB):
    # incompressible, made once per engine process and reused
    import os
    import sys

    cache = sys.modules.setdefault("_datapath_cache", type(sys)("_datapath_cache"))
    blob = getattr(cache, "blob", None)
    if blob is None or len(blob) != n:
        blob = cache.blob = os.urandom(n)
    return blob


def array(nbytes):
    import sys

    import numpy

    cache = sys.modules.setdefault("_datapath_cache", type(sys)("_datapath_cache"))
    value = getattr(cache, "array", None)
    if value is None or value.nbytes != nbytes:
        value = cache.array = numpy.arange(nbytes // 8, dtype=numpy.float64)
    return value


# -- memory ---------------------------------------------------------------------


def reset_peak(pid: int) -> bool:
    """Reset `pid`'s VmHWM to its current RSS (Linux 4.0+; own processes)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_growth_mib(before: dict, pids: dict) -> dict:
    out = {}
    for role, pid in pids.items():
        out[role] = round((benchlib.rss_kib(pid, "VmHWM") - before[role]) / 1024.0, 1)
    return out


def phase_memory(pids: dict):
    """Reset every peak; returns the RSS each started from."""
    for pid in pids.values():
        reset_peak(pid)
    return {role: benchlib.rss_kib(pid, "VmRSS") for role, pid in pids.items()}


# -- raw Foolscap ------------------------------------------------------------------


def _echo_server() -> int:
    from foolscap.api import Referenceable, Tub
    from twisted.internet import reactor

    class Echo(Referenceable):
        def remote_echo(self, data):
            return data

        def remote_sink(self, data):
            return len(data)

    tub = Tub()
    tub.setOption("expose-remote-exception-types", False)
    listener = tub.listenOn("tcp:0:interface=127.0.0.1")
    tub.startService()
    tub.setLocation("127.0.0.1:%d" % listener.getPortnum())
    furl = tub.registerReference(Echo())
    sys.stdout.write(furl + "\n")
    sys.stdout.flush()
    from twisted.internet import stdio
    from twisted.internet.protocol import Protocol

    class Quit(Protocol):
        def connectionLost(self, reason):
            reactor.stop()

    stdio.StandardIO(Quit())
    reactor.run()
    return 0


def foolscap_echo(count: int = 200, size: int = MiB, big_mb: int = 0) -> list[dict]:
    """Raw Foolscap between this process and a child: `count` sequential
    echoes of `size` bytes, and (big_mb) one byte string of that many MB
    sent one way; MB/s one way."""
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out: list[dict] = []
    try:
        furl = benchlib.read_line(proc.stdout, 30).strip()
        code = r"""
import sys, time, json
from foolscap.api import Tub
from twisted.internet import reactor, defer
furl, count, size, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
async def main():
    tub = Tub(); tub.startService()
    ref = await tub.getReference(furl)
    data = b"x" * size
    for _ in range(5):
        await ref.callRemote("echo", data)
    t0 = time.perf_counter()
    for _ in range(count):
        await ref.callRemote("echo", data)
    dt = time.perf_counter() - t0
    res = {"echo_MBps": 2 * count * size / dt / 1e6}
    await ref.callRemote("sink", b"")
    t0 = time.perf_counter()
    for _ in range(5):
        await ref.callRemote("sink", b"")
    res["rtt_us"] = (time.perf_counter() - t0) / 5 * 1e6
    if big:
        blob = b"y" * (big * 1000000)
        t0 = time.perf_counter()
        await ref.callRemote("sink", blob)
        res["big_MBps"] = len(blob) / (time.perf_counter() - t0) / 1e6
    print(json.dumps(res)); sys.stdout.flush()
d = defer.Deferred.fromCoroutine(main())
d.addErrback(lambda f: (print(json.dumps({"error": str(f.value)})), None))
d.addBoth(lambda _: reactor.stop())
reactor.run()
"""
        res = subprocess.run([sys.executable, "-c", code, furl, str(count), str(size), str(big_mb)],
                             capture_output=True, timeout=120, text=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        out.append(dict(metric="foolscap_echo_MBps", value=round(info["echo_MBps"], 1), unit="MB/s",
                        n=count, size=size, note="bytes both ways / time"))
        out.append(dict(metric="foolscap_rtt_us", value=round(info["rtt_us"], 1), unit="us"))
        if big_mb:
            out.append(dict(metric="foolscap_one_string_MBps", value=round(info["big_MBps"], 1),
                            unit="MB/s", mb=big_mb))
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


# -- the taskfarm phases ------------------------------------------------------------


def measure(only=("ret1MB", "array", "foolscap"), mb: int = 200, big_n: int = 100,
            engines: int = 4, emit=None) -> list[dict]:
    """Run the data-path phases on a fresh cluster; returns metric dicts
    ``{metric, value, unit, ...}`` (and passes each to `emit` as it comes)."""
    results: list[dict] = []

    def put(**m):
        results.append(m)
        if emit is not None:
            emit(m)

    if "foolscap" in only:
        for m in foolscap_echo(big_mb=mb):
            put(**m)
    if not ({"ret1MB", "array"} & set(only)):
        return results
    from taskfarm_bench import BenchCluster

    from taskfarm import client
    from taskfarm.client import MapTask

    cl = BenchCluster([], n=engines)
    try:
        tc = client.TaskClient(cl.profile, connect_timeout=30)
        if "ret1MB" in only:
            tc.map(big, range(2 * engines))
            t0 = time.perf_counter()
            res = tc.map(big, range(big_n))
            dt = time.perf_counter() - t0
            assert len(res) == big_n and all(len(b) == MiB for b in res)
            del res
            tc.clear()
            put(metric="ret1MB_MBps", value=round(big_n * MiB / dt / 1e6, 1), unit="MB/s",
                n=big_n, wall_s=round(dt, 3))
        if "array" in only:
            nbytes = mb * 1000000
            mec = client.MultiEngineClient(cl.profile, connect_timeout=30)
            # One engine does every array phase: pin the task to it.
            eid = sorted(mec.get_ids())[0]
            mec.execute("import os; os_pid = os.getpid()", targets=eid)
            epid = mec.pull("os_pid", targets=eid)[0]
            pids = {"client": os.getpid(), "controller": cl.controller_pid, "engine": epid}
            mec.execute("import numpy", targets=eid)

            def phase(name, fn):
                before = phase_memory(pids)
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                growth = peak_growth_mib(before, pids)
                put(metric=name + "_MBps", value=round(nbytes / dt / 1e6, 1), unit="MB/s",
                    mb=mb, wall_s=round(dt, 3))
                for role, g in growth.items():
                    put(metric="%s_peak_rss_growth_%s_mib" % (name, role), value=g, unit="MiB",
                        ratio=round(g * MiB / nbytes, 2))
                return out

            # The result: the task runs on engine `eid` (its array cached).
            mec.execute(
                "import sys, numpy; m = sys.modules.setdefault('_datapath_cache', type(sys)('c')); "
                "m.array = numpy.arange(%d, dtype=numpy.float64)" % (nbytes // 8), targets=eid)
            depend_eid = eid

            def on_engine(properties, eid=depend_eid):
                return properties.get("datapath") == eid

            mec.set_properties({"datapath": eid}, targets=eid)
            tid = tc.run(MapTask(array, args=(nbytes,), depend=on_engine))  # warm
            tc.get_task_result(tid, block=True)
            tc.clear()

            def result():
                tid = tc.run(MapTask(array, args=(nbytes,), depend=on_engine))
                value = tc.get_task_result(tid, block=True)
                assert value.nbytes == nbytes
                tc.clear()
                return value

            value = phase("array_result", result)
            phase("array_push", lambda: mec.push({"a": value}, targets=eid))
            del value
            pulled = phase("array_pull", lambda: mec.pull("a", targets=eid)[0])
            assert pulled.nbytes == nbytes
            del pulled
            mec.execute("del a", targets=eid)
            mec.close()
        tc.close()
    finally:
        cl.stop()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--big", type=int, default=100)
    ap.add_argument("--only", default="ret1MB,array,foolscap")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        return _echo_server()
    measure(tuple(args.only.split(",")), args.mb, args.big,
            emit=lambda m: print(json.dumps(m), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
