"""Logs rotate and each engine writes its own file (issue 13 item 5).

Every log in a profile is a size-rotated `LogFile` (0600, a few old files
kept); engine launchers on one profile claim distinct ``PREFIX-N.out``
names, so two launchers never interleave their engines' output in one file
(what happened before: each started counting at ``engine-0.out``).
"""

from __future__ import annotations

import os
import socket

from twisted.internet import task
from twisted.trial import unittest

from taskfarm import logfiles
from taskfarm.cluster import slots
from taskfarm.cluster.local import LocalLauncher
from taskfarm.profile import Profile
from taskfarm.testing.helpers import temp_dir


class _SpawningClock(task.Clock):
    """A Clock that 'spawns' processes: it keeps each protocol, starts none."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kw):
        class Transport:
            pid = None
            pipes: dict = {}

            def signalProcess(self, signum):
                pass

        protocol.transport = Transport()
        self.spawned.append(protocol)
        return protocol.transport


class RotationTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.folder = temp_dir(self, "taskfarm-logs-")

    def test_rotates_by_size_and_keeps_a_few(self):
        """Past the length the file is renamed .1 (older ones shift); only
        max_rotated old files stay; every file is owner-only."""
        log = logfiles.rotating_file(self.folder / "x.log", rotate_length=100, max_rotated=2)
        for i in range(10):
            log.write(b"%d" % i * 100)
        log.close()
        names = sorted(p.name for p in self.folder.iterdir())
        self.assertEqual(names, ["x.log", "x.log.1", "x.log.2"])
        for path in self.folder.iterdir():
            self.assertEqual(path.stat().st_mode & 0o777, 0o600, path.name)
        self.assertEqual((self.folder / "x.log").read_bytes(), b"9" * 100)
        self.assertEqual((self.folder / "x.log.2").read_bytes(), b"7" * 100)

    def test_engine_output_file_rotates(self):
        """What an engine process writes (its log lines) goes to a rotated file."""
        self.patch(logfiles, "ROTATE_LENGTH", 1000)
        child = slots._Child("engine 0", self.folder / "engine-0.out", task.Clock())
        for _ in range(50):
            child.childDataReceived(1, b"a log line\n" * 10)
        child._log_file.close()
        names = sorted(p.name for p in self.folder.iterdir())
        self.assertEqual(names[0], "engine-0.out")
        self.assertIn("engine-0.out.3", names)
        self.assertLessEqual(len(names), 1 + logfiles.MAX_ROTATED)
        self.assertLessEqual((self.folder / "engine-0.out").stat().st_size, 1000 + 110)


class ClaimTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.folder = temp_dir(self, "taskfarm-logs-")

    def test_claims_are_distinct_until_released(self):
        first = logfiles.claim_log_name(self.folder, "engine")
        second = logfiles.claim_log_name(self.folder, "engine")
        self.assertEqual((first.path.name, second.path.name), ("engine-0.out", "engine-1.out"))
        first.release()
        again = logfiles.claim_log_name(self.folder, "engine")
        self.assertEqual(again.path.name, "engine-0.out")
        lock = self.folder / "engine-0.lock"
        self.assertEqual(lock.stat().st_mode & 0o777, 0o600)
        for claim in (second, again):
            claim.release()

    def test_two_launchers_on_one_profile_write_separate_files(self):
        """Two local launchers at once on one profile: four engines, four
        files; the names are free again once the launchers stop."""
        profile = Profile(temp_dir(self, "taskfarm-profile-"))
        clock = _SpawningClock()
        one, two = LocalLauncher(clock, profile), LocalLauncher(clock, profile)
        one.start(2, profile.root / "furl", [])
        two.start(2, profile.root / "furl", [])
        paths = [slot._log_path for slot in one.slots + two.slots]
        self.assertEqual(
            sorted(p.name for p in paths),
            ["engine-0.out", "engine-1.out", "engine-2.out", "engine-3.out"],
        )
        for child in clock.spawned:
            child.childDataReceived(1, b"pid %d\n" % id(child))
        for launcher in (one, two):
            launcher._release_claims(None)
            for slot in launcher.slots:
                slot.child._log_file.close()
        for child, path in zip(clock.spawned, paths, strict=True):
            self.assertEqual(path.read_bytes(), b"pid %d\n" % id(child))
        self.assertEqual(logfiles.claim_log_name(profile.log_dir, "engine").path.name,
                         "engine-0.out")
        self.assertTrue(os.path.exists(profile.log_dir / "engine-0.lock"))


class EngineLogNameTests(unittest.SynchronousTestCase):
    """``twistd taskengine --log-file PATH``: the fields that make each
    engine's name its own."""

    def test_fields(self):
        path = logfiles.engine_log_path(
            "/l/e-{host}-{rank}-{job}-{pid}.log",
            rank=3,
            environ={"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "2"},
            host="node/7",
            pid=99,
        )
        # A host or job never makes the path leave its folder.
        self.assertEqual(str(path), "/l/e-node_7-3-41_2-99.log")
        self.assertEqual(logfiles.batch_job_id({"PBS_JOBID": "12.server"}), "12.server")
        self.assertEqual(logfiles.batch_job_id({"SLURM_JOB_ID": "8"}), "8")
        self.assertIsNone(logfiles.batch_job_id({}))

    def test_bad_fields_are_named(self):
        error = self.assertRaises(ValueError, logfiles.engine_log_path, "/l/{nope}.log")
        self.assertIn("unknown field {nope}", str(error))
        error = self.assertRaises(ValueError, logfiles.engine_log_path, "/l/{rank}.log")
        self.assertIn("no {rank}", str(error))
        self.assertIn("--mpi", str(error))
        error = self.assertRaises(
            ValueError, logfiles.engine_log_path, "/l/{job}.log", environ={}
        )
        self.assertIn("not in a SLURM or PBS job", str(error))
        self.assertRaises(ValueError, logfiles.engine_log_path, "/l/{rank.log")


class EngineLogOptionTests(unittest.SynchronousTestCase):
    """``--log-file`` makes the engine's log twistd's log observer (through
    twistd's ``--logger``), a file of its own that rotates."""

    def setUp(self):
        self.folder = temp_dir(self, "taskfarm-logs-")

    def parse(self, *args):
        from twisted.scripts._twistd_unix import ServerOptions

        config = ServerOptions()
        config.parseOptions(
            ["-n", "taskengine", "--furl-file", str(self.folder / "furl"), *args]
        )
        return config

    def test_twistd_logs_to_the_rotating_file(self):
        from twisted.logger import Logger

        config = self.parse(
            "--log-file", str(self.folder / "sub" / "engine-{pid}.log"),
            "--log-rotate-bytes", "1024", "--log-keep", "2",
        )
        path = self.folder / "sub" / ("engine-%d.log" % os.getpid())
        self.assertEqual(config.subOptions["log-file"], str(path))
        self.assertIs(config["logger"], logfiles.twistd_observer)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertEqual((self.folder / "sub").stat().st_mode & 0o777, 0o700)
        observer = config["logger"]()
        log = Logger(observer=observer)
        for i in range(200):
            log.info("line {i} of the engine's log", i=i)
        observer._outFile.close()
        names = sorted(p.name for p in path.parent.iterdir())
        self.assertEqual(names, [path.name, path.name + ".1", path.name + ".2"])
        self.assertIn("line 199 of the engine's log", path.read_text())
        self.assertLessEqual(path.stat().st_size, 1024 + 200)

    def test_bad_values(self):
        from twisted.python import usage

        for args, said in (
            (["--log-file", str(self.folder / "{rank}.log")], "no {rank}"),
            (["--log-file", str(self.folder / "x"), "--log-keep", "0"], "--log-keep"),
            (["--log-file", str(self.folder / "x"), "--log-rotate-bytes", "10"],
             "--log-rotate-bytes"),
            (["--log-file", "/proc/no/such/dir/x.log"], "x.log"),
        ):
            error = self.assertRaises(usage.UsageError, self.parse, *args)
            self.assertIn(said, str(error))

    def test_twist_logs_to_the_rotating_file(self):
        """``python -m twisted taskengine`` (what the launchers run): the
        runner's log file is the rotating one."""
        from twisted.application.twist._options import TwistOptions
        from twisted.internet import reactor

        config = TwistOptions()
        config["reactor"] = reactor  # installed already
        path = self.folder / "engine.log"
        config.parseOptions(
            ["--log-format", "text", "taskengine", "--furl-file", str(self.folder / "furl"),
             "--log-file", str(path), "--log-rotate-bytes", "1024", "--log-keep", "1"]
        )
        log_file = config["logFile"]
        self.assertIsInstance(log_file, logfiles.LogFile)
        self.assertEqual(log_file.path, str(path))
        self.assertEqual((log_file.rotateLength, log_file.maxRotatedFiles), (1024, 1))
        log_file.close()

    def test_the_controller_takes_it_too(self):
        """``twistd taskcontroller --log-file PATH`` (a controller run by
        hand, daemonized): twistd's log is the rotating file too."""
        from twisted.scripts._twistd_unix import ServerOptions

        config = ServerOptions()
        path = self.folder / "controller-{host}.log"
        config.parseOptions(
            ["taskcontroller", "--profile-dir", str(self.folder / "p"),
             "--log-file", str(path), "--log-keep", "3"]
        )
        self.assertIs(config["logger"], logfiles.twistd_observer)
        observer = logfiles.twistd_observer()
        self.assertEqual(observer._outFile.maxRotatedFiles, 3)
        self.assertEqual(
            observer._outFile.path, str(self.folder / ("controller-%s.log" % socket.gethostname()))
        )
        observer._outFile.close()

    def test_without_it_twistd_logs_as_usual(self):
        config = self.parse()
        self.assertIsNone(config["logger"])
        self.assertIsNone(config.subOptions["log-observer"])


class ClusterRefusesLogFileTests(unittest.SynchronousTestCase):
    def test_taskfarm_cluster(self):
        """``taskfarm cluster`` takes every controller option but
        ``--log-file`` (its controller logs to the profile), and passes no
        log option on to its controller."""
        from twisted.python import usage

        from taskfarm.cli import ClusterOptions

        error = self.assertRaises(
            usage.UsageError, ClusterOptions().parseOptions, ["--log-file", "/tmp/x.log"]
        )
        self.assertIn("controller.log", str(error))
        options = ClusterOptions()
        options.parseOptions(["--log-keep", "2", "--retention", "5"])
        self.assertEqual(options.controller_options(), ["--retention", "5.0"])


class ReadBackTests(unittest.SynchronousTestCase):
    """The launchers quote a log's last lines; a rotation in between loses
    nothing of them."""

    def setUp(self):
        self.folder = temp_dir(self, "taskfarm-logs-")

    def test_read_since_across_a_rotation(self):
        path = self.folder / "cluster.out"
        log = logfiles.rotating_file(path, rotate_length=100)
        log.write(b"a" * 60)
        offset = os.path.getsize(path)
        log.write(b"b" * 50)  # 110 bytes: the next write rotates
        log.write(b"c" * 10)
        log.close()
        self.assertTrue((self.folder / "cluster.out.1").exists())
        self.assertEqual(logfiles.read_since(path, offset), b"b" * 50 + b"c" * 10)
        self.assertEqual(logfiles.read_since(path, 5), b"c" * 5)
        self.assertEqual(logfiles.read_since(self.folder / "none", 0), b"")

    def test_read_tail_across_a_rotation(self):
        path = self.folder / "x.out"
        log = logfiles.rotating_file(path, rotate_length=100)
        log.write(b"old line\n" * 12)
        log.write(b"new\n")
        log.close()
        self.assertEqual(logfiles.read_tail(path, 13), "old line\nnew\n")
        self.assertEqual(logfiles.read_tail(self.folder / "none"), "")


class DaemonOutputTests(unittest.SynchronousTestCase):
    """A detached ``taskfarm cluster`` writes its output through a rotating
    file that is also its descriptors 1 and 2 (here: a spare descriptor
    stands for them)."""

    def test_descriptors_follow_each_rotation(self):
        folder = temp_dir(self, "taskfarm-logs-")
        spare = os.open(os.devnull, os.O_WRONLY)
        self.addCleanup(os.close, spare)

        class Spare(logfiles._StdioLogFile):
            fds = (spare,)

        log = Spare("cluster.out", str(folder), rotateLength=100, defaultMode=0o600,
                    maxRotatedFiles=2)
        stream = logfiles._TextToLog(log)
        stream.write("x" * 120)
        os.write(spare, b"<C code>")  # bypassing sys.stdout
        stream.write("after the rotation\n")
        os.write(spare, b"<C code again>")
        log.close()
        self.assertEqual((folder / "cluster.out.1").read_bytes(), b"x" * 120 + b"<C code>")
        self.assertEqual((folder / "cluster.out").read_bytes(),
                         b"after the rotation\n<C code again>")


class LauncherLogNameTests(unittest.SynchronousTestCase):
    """The ssh, mpiexec and batch launchers give each engine a log of its
    own, never one another launcher on the profile holds."""

    def setUp(self):
        self.profile = Profile(temp_dir(self, "taskfarm-profile-"))
        self.profile.ensure()

    def test_ssh_engines_on_one_host_from_two_launchers(self):
        from taskfarm.cluster.ssh import HostSlot
        from taskfarm.cluster.sshhosts import parse_hosts

        (host,) = parse_hosts("node1:2")
        slots_ = [
            HostSlot(host, [0, 1], None, "pb://x", [], task.Clock(), self.profile.log_dir,
                     lambda *a: None)
            for _ in range(2)
        ]
        for n, slot in enumerate(slots_):
            for index in (0, 1):
                slot._engine_output(index, "launcher %d engine %d" % (n, index))
        files = {
            p.name: p.read_text() for p in self.profile.log_dir.iterdir()
            if p.suffix == ".out"
        }
        self.assertEqual(
            files,
            {
                "ssh-node1-engine-0.out": "launcher 0 engine 0\n",
                "ssh-node1-engine-1.out": "launcher 0 engine 1\n",
                "ssh-node1-engine-2.out": "launcher 1 engine 0\n",
                "ssh-node1-engine-3.out": "launcher 1 engine 1\n",
            },
        )
        for slot in slots_:
            for engine in slot.engines.values():
                self.assertIsInstance(engine.log, logfiles.LogFile)
                engine.log.close()
            for claim in slot._claims:
                claim.release()

    def test_mpiexec_job_and_ranks(self):
        from taskfarm.cluster.mpi import MPIExecLauncher

        one = MPIExecLauncher(task.Clock(), self.profile)
        two = MPIExecLauncher(task.Clock(), self.profile)
        self.assertEqual((one.log_path.name, two.log_path.name),
                         ("mpiexec-0.out", "mpiexec-1.out"))
        self.assertEqual(one.rank_log_template,
                         str(self.profile.log_dir / "mpiexec-0-rank-{rank}.log"))
        self.assertEqual(one.rank_options(["--property", "a=1"]),
                         ["--property", "a=1", "--log-file", one.rank_log_template])
        self.assertEqual(one.rank_options(["--log-file=/x"]), ["--log-file=/x"])
        one._release_claim(None)
        self.assertEqual(MPIExecLauncher(task.Clock(), self.profile).log_path.name,
                         "mpiexec-0.out")

    def test_batch_engines(self):
        from taskfarm.cluster.batch import BatchLauncher
        from taskfarm.cluster.batchsystems import SLURM

        launcher = BatchLauncher(SLURM, task.Clock(), self.profile.log_dir / "slurm")
        argv = launcher.engine_argv(self.profile.root / "furl", [])
        at = argv.index("--log-file")
        self.assertEqual(argv[at + 1], str(self.profile.log_dir / "slurm" / "engine-{job}.log"))
        own = launcher.engine_argv(self.profile.root / "furl", ["--log-file", "/x"])
        self.assertEqual(own.count("--log-file"), 1)
