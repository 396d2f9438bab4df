"""Helpers shared by the benchmark scripts (stdlib only, so the peers'
virtualenv can import it too): JSON-line emission, /proc readings,
percentiles, and a watchdog that bounds every phase in time."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load1() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return -1.0


class Emitter:
    """Prints one JSON line per metric: bench, system, metric, value, unit,
    run, and any extras."""

    def __init__(self, bench: str, system: str, run: int, stream=None) -> None:
        self.bench = bench
        self.system = system
        self.run = run
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, metric: str, value, unit: str, system: str | None = None, **extra) -> None:
        record = {
            "bench": self.bench,
            "system": system or self.system,
            "metric": metric,
            "value": round(float(value), 4),
            "unit": unit,
            "run": self.run,
        }
        record.update(extra)
        with self.lock:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()


def pct(values, p: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


# -- /proc --------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak) of a process in KiB; 0 if it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_pids(pids, grace: float = 5.0) -> list[int]:
    """SIGTERM each live pid, then SIGKILL those still alive after `grace`
    seconds; returns the pids that needed SIGKILL."""
    pids = [p for p in pids if p and alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.05)
    killed = []
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except ProcessLookupError:
                pass
    return killed


def descendants(root: int) -> list[int]:
    """PIDs of every live descendant of `root` (from /proc ppid links)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], {root}
    while frontier:
        children = {p for p, pp in parent.items() if pp in frontier}
        out.extend(children)
        frontier = children
    return out


class CpuMeter:
    """CPU seconds by role (client, controller, engines, ...) between
    `start()` and `per_task(n)`."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.roles.items()}

    def start(self) -> CpuMeter:
        self.before = self._now()
        return self

    def per_task(self, n: int) -> dict[str, float]:
        after = self._now()
        out = {}
        total = 0.0
        for role, value in after.items():
            delta = value - self.before.get(role, 0.0)
            total += delta
            out["cpu_us_task_" + role] = round(delta / max(n, 1) * 1e6, 1)
        out["cpu_us_task_total"] = round(total / max(n, 1) * 1e6, 1)
        return out


class Watchdog:
    """Bounds every phase: if a phase outlives its deadline, `on_expire(name)`
    runs (it should stop what was started) and the process exits 124."""

    def __init__(self, on_expire) -> None:
        self._on_expire = on_expire
        self._deadline: float | None = None
        self._name = ""
        self._lock = threading.Lock()
        thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        thread.start()

    def phase(self, name: str, seconds: float) -> None:
        with self._lock:
            self._name = name
            self._deadline = time.monotonic() + seconds

    def left(self) -> float:
        with self._lock:
            return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _loop(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                name = self._name
            if expired:
                try:
                    self._on_expire(name)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(124)


def read_line(stream, timeout: float) -> str | None:
    """One line from a pipe within `timeout` seconds (None on timeout/EOF)."""
    import select

    fd = stream.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def append_results(path: str, lines) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")


_current_child = {"proc": None}


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is alive (zombies do not count:
    a child we have not reaped yet is already gone)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return True
            except (OSError, IndexError, ValueError):
                pass
    return False


def _stop_group(pgid: int) -> None:
    """SIGTERM the process group we created, SIGKILL what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def install_term_handler() -> None:
    """For an orchestrating process: on SIGTERM/SIGINT, stop the child
    started by `run_child` (its whole session, which we created) before
    exiting, so that ending us ends everything we started."""

    def handler(signum, frame):
        proc = _current_child["proc"]
        if proc is not None and proc.poll() is None:
            _stop_group(proc.pid)
        sys.stderr.write("[bench] stopped by signal %d\n" % signum)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_child(argv: list[str], timeout: float, results_path: str | None, env=None,
              label: str = "", echo=None) -> tuple[int, list[str]]:
    """Run one benchmark child process in its own session, bounded by
    `timeout` seconds.  Its JSON lines are echoed to our stdout and appended
    to `results_path` (`echo`: where to echo them, stdout by default); its
    other output goes to our stderr.  On timeout the
    child's whole process group is ended (SIGTERM, then SIGKILL), by the
    group id of the session that we created for it."""
    import subprocess

    echo = echo or sys.stdout
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    _current_child["proc"] = proc
    lines: list[str] = []
    buf = b""
    timed_out = False
    import select

    fd = proc.stdout.fileno()
    while True:
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line.startswith("{"):
                    lines.append(line)
                    if results_path:
                        append_results(results_path, [line])
                    echo.write(line + "\n")
                    echo.flush()
                elif line.strip():
                    sys.stderr.write(line + "\n")
    if timed_out:
        sys.stderr.write("[bench] %s: timed out after %.0f s; stopping it\n" % (label, timeout))
        _stop_group(proc.pid)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait(5)
    proc.stdout.close()
    # anything left in the child's session (a grandchild that outlived it)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _current_child["proc"] = None
    if timed_out:
        rc = 124
        line = json.dumps({"bench": "harness", "system": label, "metric": "stage_timeout", "value": timeout,
                           "unit": "s", "run": 0, "error": "%s stopped after %.0f s" % (label, timeout)})
        lines.append(line)
        if results_path:
            append_results(results_path, [line])
    return rc, lines
