"""The mpiexec launcher's logic without processes: its command line, its
options, its restart policy, and the engine side of ``--mpi`` (the rank
lookup, ``mpi`` in the namespace, the rank asked for as engine id, the
launcher lifeline).  The real mpiexec runs in tests/test_mpi.py."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm import exitcodes
from taskfarm.cluster.mpi import (
    DEFAULT_RESTARTS,
    JOB_TRANSITIONS,
    JobState,
    MPIExecLauncher,
    _JobProcess,
    after_job_end,
    descendants,
    mpiexec_argv,
    parse_stat,
    split_mpi_options,
)
from taskfarm.cluster.slots import ClusterError
from taskfarm.controller.registry import EngineRegistry
from taskfarm.engine import mpi as engine_mpi
from taskfarm.engine import tap
from taskfarm.engine.link import EngineLink
from taskfarm.engine.namespace import Namespace
from taskfarm.interfaces import IEngineLauncher
from taskfarm.profile import Profile
from taskfarm.testing.fakes import ScriptedChannel
from taskfarm.testing.helpers import temp_dir


class CommandLineTests(unittest.SynchronousTestCase):
    def test_mpiexec_runs_the_engine_plugin_with_mpi(self):
        """`mpiexec -n N [-hostfile F] [extra] python -m twisted taskengine
        --furl-file FILE --mpi [engine options]`: the furl file's path, never
        the furl, is on the command line."""
        argv = mpiexec_argv(
            "/usr/bin/mpiexec", 4, Path("/p/security/engine.furl"), ["--property", "a=1"],
            hostfile="hosts", extra=["-ppn", "2"],
        )
        self.assertEqual(
            argv,
            [
                "/usr/bin/mpiexec", "-n", "4", "-hostfile", "hosts", "-ppn", "2",
                sys.executable, "-m", "twisted", "--log-format", "text", "taskengine",
                "--furl-file", "/p/security/engine.furl", "--mpi", "--property", "a=1",
            ],
        )
        self.assertEqual(mpiexec_argv("mpiexec", 1, "f")[:3], ["mpiexec", "-n", "1"])

    def test_mpi_option_is_split_as_a_shell_would(self):
        """--mpi-option takes one string (or a list of them, if repeated),
        split as a shell would; unbalanced quotes are a usage error."""
        self.assertEqual(split_mpi_options(None), [])
        self.assertEqual(
            split_mpi_options("-bind-to core -env A 'x y'"), ["-bind-to", "core", "-env", "A", "x y"]
        )
        self.assertEqual(split_mpi_options(["-ppn 2", "-l"]), ["-ppn", "2", "-l"])
        error = self.assertRaises(usage.UsageError, split_mpi_options, "-env 'A")
        self.assertIn("--mpi-option", str(error))

    def test_options_are_checked_before_anything_starts(self):
        """A missing hostfile, a negative --mpi-restarts and a bad
        --mpi-option are usage errors naming the option."""
        check = MPIExecLauncher.check_options
        check({})
        self.assertIn("--mpi-hostfile", str(self.assertRaises(
            usage.UsageError, check, {"mpi-hostfile": "/nonexistent/hosts"})))
        self.assertIn("--mpi-restarts", str(self.assertRaises(
            usage.UsageError, check, {"mpi-restarts": -1})))
        self.assertIn("--mpi-restarts", str(self.assertRaises(
            usage.UsageError, check, {"mpi-restarts": "many"})))
        self.assertRaises(usage.UsageError, check, {"mpi-option": "'"})

    def test_launcher_table_row(self):
        """The class carries what the launcher table needs: its name, its
        options usage-style, and it provides IEngineLauncher; a hostfile
        makes it remote."""
        profile = Profile(Path(tempfile.gettempdir()) / "unused-profile")
        launcher = MPIExecLauncher(task.Clock(), profile, {})
        verifyObject(IEngineLauncher, launcher)
        self.assertEqual(launcher.name, "mpiexec")
        self.assertFalse(launcher.remote)
        self.assertEqual(
            [row[0] for row in MPIExecLauncher.optParameters],
            ["mpiexec", "mpi-option", "mpi-hostfile", "mpi-restarts"],
        )
        hosts = temp_dir(self) / "hosts"
        hosts.write_text("node1:4\n")
        self.assertTrue(MPIExecLauncher(task.Clock(), profile, {"mpi-hostfile": str(hosts)}).remote)
        self.assertEqual(launcher.describe(), [])

    def test_missing_mpiexec_names_the_install_command(self):
        """No mpiexec: `start` fails with a ClusterError that says how to
        install it (before anything starts)."""
        profile = Profile(temp_dir(self) / "profile")
        launcher = MPIExecLauncher(task.Clock(), profile, {"mpiexec": "/nonexistent/mpiexec"})
        failure = self.failureResultOf(launcher.start(4, "furl", []), ClusterError)
        self.assertIn("apt-get install -y mpich", str(failure.value))
        self.assertIs(launcher.state, JobState.IDLE)
        self.failureResultOf(
            MPIExecLauncher(task.Clock(), profile, {}).start(0, "furl", []), ClusterError
        )


class RestartPolicyTests(unittest.SynchronousTestCase):
    def test_a_job_that_ended_by_itself_is_started_again_a_bounded_number_of_times(self):
        """Any exit but a MultiEngine kill or a refusal starts the whole job
        again, until it ended more than --mpi-restarts times in a row."""
        for status in (0, 1, None, 15):
            self.assertEqual(after_job_end(status, 1, DEFAULT_RESTARTS), "died")
        self.assertEqual(after_job_end(1, DEFAULT_RESTARTS, DEFAULT_RESTARTS), "died")
        self.assertEqual(after_job_end(1, DEFAULT_RESTARTS + 1, DEFAULT_RESTARTS), "gave up")
        self.assertEqual(after_job_end(1, 1, 0), "gave up")
        self.assertEqual(after_job_end(exitcodes.EXIT_KILLED, 1, 3), "exited")
        self.assertEqual(after_job_end(exitcodes.EXIT_REFUSED, 1, 3), "exited")
        # A rank stopped by a MultiEngine kill: whatever mpiexec's status.
        self.assertEqual(after_job_end(9, 1, 3, rank_killed=True), "exited")

    def test_a_rank_killed_is_read_from_the_output(self):
        """The job's output is logged and its last words kept; the line a
        rank writes as it ends for a MultiEngine kill is noticed, also when
        it arrives in two pieces, and another status's line is not."""
        log = temp_dir(self) / "mpiexec.out"
        job = _JobProcess(log, task.Clock())
        line = (exitcodes.EXIT_LINE % exitcodes.EXIT_KILLED).encode()
        job.childDataReceived(1, b"[stderr#error] " + line[:10])
        self.assertFalse(job.rank_killed)
        job.childDataReceived(2, line[10:] + b"\nbye\n")
        self.assertTrue(job.rank_killed)
        self.assertEqual(job.last_words(), "bye")
        other = _JobProcess(log, task.Clock())
        other.childDataReceived(1, (exitcodes.EXIT_LINE % exitcodes.EXIT_STUCK).encode())
        self.assertFalse(other.rank_killed)
        for process in (job, other):
            process._log_file.close()
        self.assertIn(line, log.read_bytes())

    def test_state_table(self):
        """Every state takes `stop`; only a running job dies or exits, and
        only a restarting one restarts."""
        for state in JobState:
            self.assertIn((state, "stop"), JOB_TRANSITIONS)
        self.assertEqual(
            sorted(event for (state, event) in JOB_TRANSITIONS if state is JobState.RUNNING),
            ["died", "exited", "gave up", "stop"],
        )
        self.assertEqual(JOB_TRANSITIONS[(JobState.RESTARTING, "restart")], JobState.RUNNING)
        self.assertEqual(JOB_TRANSITIONS[(JobState.RESTARTING, "stop")], JobState.STOPPED)

    def test_stop_before_start_stops(self):
        """`stop` on a launcher that never started fires at once."""
        launcher = MPIExecLauncher(task.Clock(), Profile(Path("/nonexistent")), {})
        self.successResultOf(launcher.stop())
        self.assertIs(launcher.state, JobState.STOPPED)


class ProcessTableTests(unittest.SynchronousTestCase):
    def test_parse_stat(self):
        """The parent pid, state and start time come after the command
        name, which may hold spaces and parentheses."""
        fields = ["S", "41", "42", "42"] + ["0"] * 15 + ["123456", "0"]
        line = "77 (python (x) y) " + " ".join(fields)
        self.assertEqual(parse_stat(line), (41, "S", "123456"))

    def test_descendants(self):
        """The job is mpiexec's children, their children and so on, without
        zombies and without unrelated processes."""
        table = {
            10: (1, "S", "t"),  # mpiexec
            11: (10, "S", "t"),  # proxy
            12: (11, "S", "t"),  # rank 0
            13: (11, "S", "t"),  # rank 1
            14: (12, "S", "t"),  # forked by a task of rank 0
            15: (11, "Z", "t"),  # a zombie
            20: (1, "S", "t"),  # someone else
        }
        self.assertEqual(descendants(10, table), [11, 12, 13, 14])
        self.assertEqual(descendants(20, table), [])


class RankTests(unittest.SynchronousTestCase):
    def test_rank_from_the_starters_variables(self):
        """MPICH/Hydra's PMI_RANK, Open MPI's OMPI_COMM_WORLD_RANK, PMIx's
        PMIX_RANK or Slurm's SLURM_PROCID, in that order; none: None."""
        lookup = engine_mpi.rank_from_environment
        self.assertEqual(lookup({"PMI_RANK": "3"}), 3)
        self.assertEqual(lookup({"OMPI_COMM_WORLD_RANK": "5"}), 5)
        self.assertEqual(lookup({"PMIX_RANK": "2", "SLURM_PROCID": "9"}), 2)
        self.assertEqual(lookup({"SLURM_PROCID": "9"}), 9)
        self.assertEqual(lookup({"PMI_RANK": "1", "SLURM_PROCID": "0"}), 1)
        self.assertIsNone(lookup({}))
        self.assertIsNone(lookup({"PMI_RANK": "x"}))

    def test_mpi4py_first_then_the_environment(self):
        """With mpi4py the rank is COMM_WORLD's and `mpi` is in the names;
        without it (not importable, or no MPI library), the environment's
        and no `mpi`."""

        class World:
            @staticmethod
            def Get_rank():
                return 7

        class FakeMPI:
            COMM_WORLD = World

        env = {"PMI_RANK": "2"}
        rank, names = engine_mpi.mpi_engine_setup(env, import_module=lambda name: FakeMPI)
        self.assertEqual((rank, names), (7, {"mpi": FakeMPI}))

        def missing(name):
            raise ImportError("No module named 'mpi4py'")

        def no_library(name):
            raise RuntimeError("cannot load MPI library\nlibmpi.so.12: cannot open")

        for importer in (missing, no_library):
            self.assertEqual(engine_mpi.mpi_engine_setup(env, import_module=importer), (2, {}))

    def test_no_rank_no_mpi_import(self):
        """--mpi outside an MPI job is refused before MPI is initialised."""
        imported = []
        self.assertRaises(
            engine_mpi.NoRank, engine_mpi.mpi_engine_setup, {}, imported.append
        )
        self.assertEqual(imported, [])

    def test_engine_option(self):
        """`taskengine --mpi` parses inside an MPI job, and is a usage error
        naming the variables outside one."""
        self.patch(tap.os, "environ", {"PMI_RANK": "0"})
        options = tap.Options()
        options.parseOptions(["--furl-file", "f", "--mpi"])
        self.assertTrue(options["mpi"])
        options = tap.Options()
        options.parseOptions(["--furl-file", "f"])
        self.assertFalse(options["mpi"])
        self.patch(tap.os, "environ", {})
        error = self.assertRaises(
            usage.UsageError, tap.Options().parseOptions, ["--furl-file", "f", "--mpi"]
        )
        self.assertIn("PMI_RANK", str(error))

    def test_mpi_stays_in_the_namespace_after_a_reset(self):
        """The preset names (``mpi``) are in every fresh namespace, next to `id`."""
        marker = object()
        namespace = Namespace(engine_id=2, names={"mpi": marker})
        self.assertIs(namespace.user_ns["mpi"], marker)
        namespace.user_ns["x"] = 1
        namespace.reset()
        self.assertIs(namespace.user_ns["mpi"], marker)
        self.assertNotIn("x", namespace.user_ns)
        self.assertNotIn("mpi", Namespace().user_ns)


class RequestedIdTests(unittest.SynchronousTestCase):
    def test_link_asks_for_the_rank_first(self):
        """An engine link made with requested_id asks for it at its first
        registration."""
        asked = []

        class Transport:
            def start(self):
                pass

            def stop(self):
                return defer.succeed(None)

            def register(self, furl, commands, properties, requested_id):
                asked.append(requested_id)
                return defer.Deferred()  # never answers

        class Worker:
            class namespace:
                properties: dict = {}

            def end_session(self):
                pass

        clock = task.Clock()
        link = EngineLink(lambda: "furl", Worker(), clock, transport=Transport(), requested_id=3)
        link.startService()
        self.assertEqual(asked, [3])
        self.successResultOf(defer.Deferred.fromCoroutine(link.stopService()))
        self.assertEqual(
            EngineLink(lambda: "f", Worker(), clock, transport=Transport()).engine_id, None
        )

    def test_a_taken_rank_gets_another_id(self):
        """The registry gives the rank asked for when it is free, and the
        lowest free id when another engine holds it."""
        registry = EngineRegistry(task.Clock(), heartbeat_period=None)
        self.addCleanup(registry.stop)
        plain = registry.register(ScriptedChannel(), {}, None)
        self.assertEqual(plain.engine_id, 0)
        rank2 = registry.register(ScriptedChannel(), {"mpi_rank": 2}, 2)
        self.assertEqual(rank2.engine_id, 2)
        rank0 = registry.register(ScriptedChannel(), {"mpi_rank": 0}, 0)
        self.assertEqual(rank0.engine_id, 1)  # 0 was taken
        rank1 = registry.register(ScriptedChannel(), {"mpi_rank": 1}, 1)
        self.assertEqual(rank1.engine_id, 3)  # 1 taken by rank 0 now, 2 by rank 2


class LifelineTests(unittest.SynchronousTestCase):
    def test_engine_exits_once_the_launcher_is_gone(self):
        """An MPI engine looks every second whether its launcher's pid is
        there, and exits (status 1) once it is not; the variable is taken
        out of the environment."""
        clock = task.Clock()
        alive = {4242: True}

        def kill(pid, signal):
            if not alive.get(pid):
                raise ProcessLookupError(pid)

        self.patch(engine_mpi.os, "kill", kill)
        said = io.StringIO()
        self.patch(engine_mpi.sys, "stderr", said)
        exits = []
        environ = {engine_mpi.MPI_LAUNCHER_PID: "4242"}
        loop = engine_mpi.follow_mpi_launcher(clock, environ, exit=exits.append)
        self.addCleanup(lambda: loop.running and loop.stop())
        self.assertEqual(environ, {})
        clock.advance(3)
        self.assertEqual(exits, [])
        alive[4242] = False
        clock.advance(engine_mpi.LAUNCHER_CHECK_PERIOD)
        self.assertEqual(exits, [1])
        self.assertIn("launcher (pid 4242) is gone", said.getvalue())
        self.assertIsNone(engine_mpi.follow_mpi_launcher(clock, {}, exit=exits.append))
