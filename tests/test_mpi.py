"""The mpiexec launcher with a real MPICH ``mpiexec`` and 4 ranks.

A real controller (`RealCluster`, in this process) and the launcher
started directly, as ``taskfarm cluster --launcher mpiexec -n 4`` does:

- the engine ids are the ranks {0, 1, 2, 3}, and ``mpi.COMM_WORLD`` works
  inside a MultiEngine execute run on all four at once (a collective);
- `stop()` leaves no process of the job (mpiexec, its proxy, the ranks),
  checked by pid, and `watch` heard of each rank's end;
- a rank whose id another engine holds gets another one;
- a job killed from outside is started again as a whole, with the same ids;
- a MultiEngine kill of one rank ends the whole job, which stays down;
- a launcher killed with kill -9 takes its job with it;
- mpiexec refusing its options fails the start, and nothing is retried.

mpiexec comes from Debian's ``mpich`` package, mpi4py and its MPI library
(libmpi.so.12) from the ``mpi4py`` and ``mpich`` wheels of the test extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from twisted.internet import reactor

from taskfarm.cluster.mpi import JobState, MPIExecLauncher, descendants, process_table
from taskfarm.cluster.slots import ClusterError
from taskfarm.profile import ENGINE
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import is_alive, proc_stat, wait_until

RANKS = 4

#: A launcher in a process of its own: starts the job, prints mpiexec's pid.
LAUNCHER = """\
import sys
from pathlib import Path
from twisted.internet import reactor
from taskfarm.cluster.slots import ClusterError
from taskfarm.cluster.mpi import MPIExecLauncher
from taskfarm.profile import ENGINE, Profile
profile = Profile(Path(sys.argv[1]))
launcher = MPIExecLauncher(reactor, profile, {})
def go():
    d = launcher.start(%d, profile.furl_file(ENGINE), [])
    d.addCallback(lambda _: print("job", launcher.job.last_pid, flush=True))
    d.addErrback(lambda f: (print(f, flush=True), reactor.stop()))
reactor.callWhenRunning(go)
reactor.run()
"""


def require_mpi() -> None:
    """Fail (never skip) when mpiexec or mpi4py is missing, saying how to
    install it."""
    if shutil.which("mpiexec") is None:
        raise AssertionError("mpiexec not found: apt-get install -y mpich")
    probe = subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise AssertionError(
            "mpi4py cannot load an MPI library (%s): pip install mpi4py mpich"
            % probe.stderr.strip().splitlines()[-1:]
        )


class MPIExecTests(ClusterTestCase):
    timeout = 60

    async def start_mpi(self, n: int = RANKS, plain: int = 0, **options) -> MPIExecLauncher:
        """A controller with `plain` ordinary engines, then an MPI job of `n`
        ranks; returns the launcher once all have registered."""
        require_mpi()
        await self.start_cluster(plain)
        self.launcher = MPIExecLauncher(
            reactor, self.cluster.profile, options,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        self.ended: list[tuple[str, object]] = []
        self.launcher.watch(lambda label, reason: self.ended.append((label, reason)))
        self.addCleanup(self.launcher.stop)
        started = reactor.seconds()
        await self.launcher.start(n, self.cluster.profile.furl_file(ENGINE), [])
        await self.cluster.wait_for_engines(plain + n, timeout=30)
        print("MPI %d ranks registered in %.2f s" % (n, reactor.seconds() - started))
        return self.launcher

    def ranks(self) -> dict[int, int]:
        """Engine id -> the MPI rank it reported, for the MPI engines."""
        return {
            engine_id: engine.properties["mpi_rank"]
            for engine_id, engine in self.cluster.controller.registry.engines.items()
            if "mpi_rank" in engine.properties
        }

    @run
    async def test_engine_ids_are_ranks_and_mpi_works_in_execute(self):
        """4 ranks register as engines 0-3, each with the id of its rank;
        `mpi` is bound in their namespace and an allreduce executed on all
        four at once sums the ranks (6); describe() names the job and each
        rank with its pid."""
        launcher = await self.start_mpi()
        self.assertEqual(self.ranks(), {0: 0, 1: 1, 2: 2, 3: 3})
        client = self.cluster.multiengine_client()
        await client.execute(
            "rank = mpi.COMM_WORLD.Get_rank()\n"
            "size = mpi.COMM_WORLD.Get_size()\n"
            "total = mpi.COMM_WORLD.allreduce(rank)\n",
            targets="all",
        )
        self.assertEqual(await client.pull("rank", targets=[0, 1, 2, 3]), [0, 1, 2, 3])
        self.assertEqual(await client.pull("size", targets="all"), [4] * 4)
        self.assertEqual(await client.pull("total", targets="all"), [6] * 4)
        # `mpi` survives a reset of the namespace.
        await client.reset(targets="all")
        await client.execute("again = mpi.COMM_WORLD.allreduce(id)", targets="all")
        self.assertEqual(await client.pull("again", targets="all"), [6] * 4)
        described = launcher.describe()
        self.assertEqual(described[0]["label"], "mpiexec job")
        self.assertEqual(described[0]["pid"], launcher.job.last_pid)
        self.assertEqual(described[0]["started"], proc_stat(launcher.job.last_pid)[19])
        self.assertEqual(
            {entry["rank"]: entry["pid"] for entry in described[1:]},
            {i: self.cluster.engine_pid(i) for i in range(RANKS)},
        )
        # Each rank writes its own log, rotated (0600), not into mpiexec's.
        log_dir = self.cluster.profile.log_dir
        self.assertEqual(launcher.log_path, log_dir / "mpiexec-0.out")
        for rank in range(RANKS):
            path = log_dir / ("mpiexec-0-rank-%d.log" % rank)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            text = path.read_text()
            self.assertEqual(text.count("registered with the controller"), 1, (path.name, text[-2000:]))
            self.assertIn("as engine %d" % rank, text)
        self.assertNotIn("registered with the controller", launcher.log_path.read_text())

    @run
    async def test_stop_leaves_no_process(self):
        """stop() ends mpiexec, its proxy and every rank, checked by pid
        (with each one's start time), and watch() heard of all four ranks."""
        launcher = await self.start_mpi()
        job = launcher.job.last_pid
        # Each with its start time (a reused pid is another process).
        processes = {job: proc_stat(job)[19], **launcher.processes}
        self.assertGreaterEqual(len(processes), 1 + 1 + RANKS)  # mpiexec, proxy, ranks
        started = reactor.seconds()
        await launcher.stop()
        print("MPI stop took %.2f s" % (reactor.seconds() - started))
        left = [pid for pid, since in processes.items() if is_alive(pid, since)]
        self.assertEqual(left, [])
        self.assertIs(launcher.state, JobState.STOPPED)
        self.assertEqual(
            sorted(label.split(" (")[0] for label, _ in self.ended),
            ["mpiexec rank %d" % i for i in range(RANKS)],
        )
        self.assertEqual(launcher.describe(), [])

    @run
    async def test_a_taken_rank_gets_another_id(self):
        """With engine 0 held by a plain engine, the MPI job's rank 0 gets
        another id; every engine has its own id."""
        await self.start_mpi(plain=1)
        ranks = self.ranks()
        self.assertEqual(sorted(ranks.values()), [0, 1, 2, 3])
        self.assertNotIn(0, ranks)  # engine 0 is the plain one
        self.assertEqual(sorted(self.cluster.controller.registry.engines), [0, 1, 2, 3, 4])

    @run
    async def test_a_job_killed_from_outside_is_started_again_whole(self):
        """SIGKILL to mpiexec ends the whole job; the launcher starts it
        again after its back-off and the ranks come back with their ids."""
        launcher = await self.start_mpi()
        first = launcher.job.last_pid
        os.kill(first, signal.SIGKILL)
        await wait_until(
            lambda: launcher.restarts == 1 and launcher.job.last_pid != first,
            "the job started again", timeout=15,
        )
        # The old engines are lost (their connections closed), new ones register.
        await wait_until(
            lambda: self.ranks() == {0: 0, 1: 1, 2: 2, 3: 3}
            and all(self.cluster.engine_pid(i) in launcher.ranks for i in range(RANKS)),
            "the ranks registered again", timeout=30,
        )
        self.assertIs(launcher.state, JobState.RUNNING)

    @run
    async def test_a_multiengine_kill_of_one_rank_leaves_the_job_down(self):
        """kill(targets=[1]) ends the MPI world (MPI aborts it when a rank
        leaves); the launcher does not start it again, and no process of
        the job is left."""
        launcher = await self.start_mpi()
        processes = {launcher.job.last_pid: proc_stat(launcher.job.last_pid)[19],
                     **launcher.processes}
        client = self.cluster.multiengine_client()
        await client.kill(targets=[1])
        await wait_until(lambda: launcher.state is JobState.EXITED, "the job to end", timeout=15)
        await self.cluster.wait_for_engines(0, timeout=15)
        self.assertEqual(launcher.restarts, 0)
        await launcher.stop()
        self.assertEqual([pid for pid, since in processes.items() if is_alive(pid, since)], [])

    @run
    async def test_a_launcher_killed_takes_its_job_with_it(self):
        """kill -9 of the launcher's process: the ranks notice within about
        a second (TASKFARM_MPI_LAUNCHER_PID) and exit, and so does mpiexec;
        no process of the job is left."""
        require_mpi()
        await self.start_cluster(0)
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER % RANKS, str(self.cluster.profile.root)],
            stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )

        def end_launcher():
            process.kill()
            process.wait()
            process.stdout.close()

        self.addCleanup(end_launcher)
        await self.cluster.wait_for_engines(RANKS, timeout=30)
        job = int(process.stdout.readline().split()[1])
        table = process_table()
        processes = {pid: table[pid][2] for pid in [job, *descendants(job, table)]}
        for i in range(RANKS):
            self.assertIn(self.cluster.engine_pid(i), processes)
        process.kill()
        process.wait()
        killed = reactor.seconds()
        await wait_until(
            lambda: not any(is_alive(pid, since) for pid, since in processes.items()),
            "the job to end after its launcher", timeout=15,
        )
        print("MPI job gone %.2f s after its launcher" % (reactor.seconds() - killed))

    @run
    async def test_mpiexec_exiting_at_start_fails_the_start(self):
        """An option mpiexec refuses: start() fails with a ClusterError
        quoting mpiexec and naming its log, and the job is not retried."""
        require_mpi()
        await self.start_cluster(0)
        launcher = MPIExecLauncher(
            reactor, self.cluster.profile, {"mpi-option": "-no-such-option"}
        )
        self.addCleanup(launcher.stop)
        with self.assertRaises(ClusterError) as caught:
            await launcher.start(RANKS, self.cluster.profile.furl_file(ENGINE), [])
        self.assertIn("mpiexec exited at start", str(caught.exception))
        self.assertIn("mpiexec-0.out", str(caught.exception))
        self.assertIn("mpiexec-0-rank-R.log", str(caught.exception))
        self.assertIn("no-such-option", str(caught.exception))  # mpiexec's complaint
        self.assertIs(launcher.state, JobState.EXITED)
        self.assertEqual(launcher.restarts, 0)
