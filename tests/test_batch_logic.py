"""The batch launcher without processes: templates, options, job ids, status
lines, and its job bookkeeping (--keep-engines with back-off, stop) against
an in-memory batch system on a `task.Clock`."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm import cli, lifeline
from taskfarm.cluster import launchers
from taskfarm.cluster.batch import (
    BatchLauncher,
    JobState,
    LauncherState,
    PbsLauncher,
    SlurmLauncher,
)
from taskfarm.cluster.batchsystems import (
    PBS,
    SLURM,
    BatchTemplateError,
    CommandResult,
    cancel_jobs,
    check_template,
    find_job_id,
    parse_status,
)
from taskfarm.cluster.launcher import ClusterError
from taskfarm.interfaces import IEngineLauncher
from taskfarm.profile import Profile
from taskfarm.testing.helpers import temp_dir

SECRET_FURL = "pb://secret-tub-id@tcp:10.0.0.1:5555/secret-swiss-number"


class FakeBatchSystem:
    """An in-memory SLURM or PBS: answers sbatch/qsub, squeue/qstat and
    scancel/qdel as they print, and records every command it got."""

    def __init__(self, system) -> None:
        self.system = system
        self.next_id = 100
        #: {job id: state} of the listed jobs.
        self.jobs: dict[str, str] = {}
        self.commands: list[tuple[list[str], dict]] = []
        self.scripts: list[str] = []
        self.refuse_submit = False
        self.status_down = False
        #: scancel/qdel say yes and cancel nothing.
        self.ignore_cancel = False

    async def __call__(self, argv, env) -> CommandResult:
        self.commands.append((list(argv), dict(env)))
        program = argv[0]
        if program in ("sbatch", "qsub"):
            if self.refuse_submit:
                return CommandResult(tuple(argv), 1, "", "sbatch: error: Invalid partition\n")
            script = Path(argv[-1]).read_text()
            self.scripts.append(script)
            job = str(self.next_id)
            self.next_id += 1
            if program == "sbatch":
                first, last = map(int, re.search(r"--array=(\d+)-(\d+)", script).groups())
                for i in range(first, last + 1):
                    self.jobs["%s_%d" % (job, i)] = "PENDING"
                return CommandResult(tuple(argv), 0, "Submitted batch job %s\n" % job, "")
            self.jobs[job + ".server"] = "Q"
            return CommandResult(tuple(argv), 0, "%s.server\n" % job, "")
        if program in ("squeue", "qstat"):
            if self.status_down:
                return CommandResult(tuple(argv), 1, "", "slurm_load_jobs error: timed out\n")
            if program == "squeue":
                out = "".join("%s %s node1\n" % item for item in self.jobs.items())
            else:
                out = "Job id  Name  User  Time Use S Queue\n----- ---- ---- ---- - -----\n"
                out += "".join(
                    "%s  taskfarm  root  0 %s  workq\n" % item for item in self.jobs.items()
                )
            return CommandResult(tuple(argv), 0, out, "")
        if program in ("scancel", "qdel"):
            for target in argv[1:] if not self.ignore_cancel else ():
                for job in list(self.jobs):
                    if job == target or job.split("_")[0] == target:
                        del self.jobs[job]
            return CommandResult(tuple(argv), 0, "", "")
        raise AssertionError("unexpected command %r" % (argv,))

    def run_all(self) -> None:
        for job, state in self.jobs.items():
            if state in ("PENDING", "Q"):
                self.jobs[job] = "RUNNING" if self.system is SLURM else "R"


class _LauncherCase(unittest.TestCase):
    system = SLURM

    def setUp(self):
        self.clock = task.Clock()
        self.batch = FakeBatchSystem(self.system)
        self.folder = temp_dir(self)
        self.furl_file = self.folder / "engine.furl"
        self.furl_file.write_text(SECRET_FURL)
        self.ended = []

    def launcher(self, **options) -> BatchLauncher:
        options.setdefault("poll_interval", 1.0)
        options.setdefault(
            "env", {"PATH": "/usr/bin", lifeline.LAUNCHER_PID: "1", lifeline.LIVENESS_FD: "3"}
        )
        launcher = BatchLauncher(
            self.system, self.clock, self.folder / "work", runner=self.batch, **options
        )
        launcher.watch(lambda label, reason: self.ended.append((label, reason)))
        return launcher

    def start(self, launcher, n):
        d = launcher.start(n, self.furl_file, ["--property", "site='lab'"])
        self.successResultOf(d)

    def poll(self, times=1):
        for _ in range(times):
            self.clock.advance(1.0)


class TemplateTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.folder = temp_dir(self)
        self.furl_file = self.folder / "engine.furl"
        self.furl_file.write_text(SECRET_FURL)

    def test_slurm_script(self):
        """The SLURM script is one array of N engines with the partition,
        the time, each extra option as an #SBATCH line, the engine command
        with the furl file's path (never the furl), and SLURM's own
        variables left for the shell."""
        launcher = BatchLauncher(
            SLURM,
            task.Clock(),
            self.folder / "work",
            queue="debug",
            walltime="1:00:00",
            extra_options=["--mem=4G", "--gres=gpu:1"],
            python="/opt/py/bin/python3",
        )
        script = launcher.render(4, self.furl_file, ["--property", "site='lab'"])
        lines = script.splitlines()
        self.assertEqual(lines[0], "#!/bin/sh")
        for line in (
            "#SBATCH --array=0-3",
            "#SBATCH --job-name=taskfarm-engine",
            "#SBATCH --partition=debug",
            "#SBATCH --time=1:00:00",
            "#SBATCH --mem=4G",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --output=%s/slurm-%%A_%%a.out" % (self.folder / "work"),
        ):
            self.assertIn(line, lines)
        # All directives come before the first command, or sbatch ignores them.
        last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        first_command = min(
            i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")
        )
        self.assertLess(last_directive, first_command)
        self.assertIn(
            "exec /opt/py/bin/python3 -m twisted --log-format text taskengine --furl-file %s "
            "--log-file %s --property %s --property "
            "\"batch_job='${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}'\""
            % (
                self.furl_file,
                shlex.quote(str(self.folder / "work" / "engine-{job}.log")),
                shlex.quote("site='lab'"),
            ),
            script,
        )
        self.assertNotIn("secret", script)

    def test_pbs_script(self):
        """The PBS/Torque script (tested only this far: no PBS server here):
        one engine per job, the queue and walltime as #PBS lines, the extra
        options, the engine command with the furl file's path."""
        launcher = BatchLauncher(
            PBS,
            task.Clock(),
            self.folder / "work",
            queue="workq",
            walltime="01:00:00",
            extra_options=["-l select=1:ncpus=4", "-A lab42"],
            python="/usr/bin/python3",
        )
        script = launcher.render(1, self.furl_file, [])
        lines = script.splitlines()
        for line in (
            "#PBS -N taskfarm-engine",
            "#PBS -q workq",
            "#PBS -l walltime=01:00:00",
            "#PBS -l select=1:ncpus=4",
            "#PBS -A lab42",
            "#PBS -j oe",
            "#PBS -o %s/" % (self.folder / "work"),
        ):
            self.assertIn(line, lines)
        self.assertNotIn("SBATCH", script)
        self.assertIn(
            "exec /usr/bin/python3 -m twisted --log-format text taskengine --furl-file %s "
            "--log-file %s --property \"batch_job='${PBS_JOBID}'\""
            % (self.furl_file, shlex.quote(str(self.folder / "work" / "engine-{job}.log"))),
            script,
        )
        self.assertNotIn("secret", script)

    def test_paths_are_quoted(self):
        """A furl file path with a space or a quote stays one word for the shell."""
        odd = self.folder / "my 'profile'" / "engine.furl"
        launcher = BatchLauncher(SLURM, task.Clock(), self.folder, python="/usr/bin/python3")
        script = launcher.render(1, odd, [])
        self.assertIn("--furl-file '%s'" % str(odd).replace("'", "'\"'\"'"), script)

    def test_unknown_placeholders_are_named(self):
        """A template with placeholders the launcher does not fill fails with
        BatchTemplateError naming each, a lone $ with its line."""
        text = "#!/bin/sh\n#SBATCH --array=${array}\necho $SLURM_JOB_ID ${nodes}\ncost 5$\n"
        error = self.assertRaises(BatchTemplateError, check_template, text, "my.sh")
        message = str(error)
        self.assertIn("my.sh has placeholders the launcher does not fill", message)
        self.assertIn("$SLURM_JOB_ID, $nodes, a lone $ on line 4", message)
        self.assertIn("write $$ for a shell's own $", message)
        self.assertNotIn("$array,", message.split("(known")[0])
        self.assertIsInstance(error, ClusterError)
        self.assertRaises(
            BatchTemplateError, BatchLauncher, SLURM, task.Clock(), self.folder, template=text
        )

    def test_shipped_templates_are_valid(self):
        """Both shipped templates use only known placeholders."""
        check_template(SLURM.default_template())
        check_template(PBS.default_template())


class OptionsTests(unittest.SynchronousTestCase):
    """The options as ``taskfarm cluster --launcher slurm|pbs`` parses them
    (the launcher table's rows), and the launcher the table makes of them."""

    def setUp(self):
        self.profile = Profile(temp_dir(self))

    def parse(self, argv, launcher="slurm"):
        """``taskfarm cluster --launcher NAME ARGV``'s parsed options."""
        options = cli.Options()
        options.parseOptions(
            ["cluster", "--launcher", launcher, "--listen", "tcp:0:interface=10.0.0.1", *argv]
        )
        return options.subOptions

    def launcher(self, options):
        return launchers.make_launcher(options["launcher"], task.Clock(), self.profile, options)

    def test_table_entries(self):
        """--launcher slurm and pbs are SlurmLauncher and PbsLauncher:
        remote, IEngineLauncher, their scripts under PROFILE/log/NAME."""
        for name, cls in (("slurm", SlurmLauncher), ("pbs", PbsLauncher)):
            self.assertIs(launchers.LAUNCHERS[name], cls)
            self.assertEqual((cls.name, cls.remote), (name, True))
            launcher = self.launcher(self.parse([], name))
            self.assertTrue(verifyObject(IEngineLauncher, launcher))
            self.assertEqual(launcher.work_dir, self.profile.log_dir / name)
            self.assertEqual(launcher.system.name, name)

    def test_slurm_options(self):
        """--slurm-partition, --slurm-time, --slurm-option (repeatable),
        --keep-engines and --slurm-poll, as the launcher takes them."""
        options = self.parse(
            [
                "--slurm-partition",
                "debug",
                "--slurm-time",
                "1:00:00",
                "--slurm-option",
                "--mem=4G",
                "--slurm-option",
                "--gres=gpu:1",
                "--keep-engines",
                "--slurm-poll",
                "2",
            ]
        )
        self.assertEqual(
            options["launcher-options"],
            {
                "slurm-partition": "debug",
                "slurm-time": "1:00:00",
                "slurm-option": ["--mem=4G", "--gres=gpu:1"],
                "slurm-template": None,
                "slurm-poll": 2.0,
                "keep-engines": 1,
            },
        )
        launcher = self.launcher(options)
        self.assertEqual(launcher.name, "slurm")
        self.assertTrue(launcher.keep_engines)
        self.assertEqual(launcher._poll_interval, 2.0)
        script = launcher.render(2, Path("/shared/engine.furl"), [])
        self.assertIn(
            "#SBATCH --partition=debug\n#SBATCH --time=1:00:00\n#SBATCH --mem=4G\n"
            "#SBATCH --gres=gpu:1\n",
            script,
        )

    def test_defaults(self):
        """No option: no partition or time lines, one status check every 5 s,
        engines not kept."""
        options = self.parse([])["launcher-options"]
        self.assertEqual(options["slurm-option"], [])
        self.assertEqual(options["slurm-poll"], 5.0)
        self.assertFalse(options["keep-engines"])
        self.assertIsNone(options["slurm-partition"])
        launcher = SlurmLauncher(task.Clock(), self.profile, {})
        self.assertFalse(launcher.keep_engines)
        self.assertNotIn("--partition", launcher.render(1, Path("/f"), []))

    def test_template_file(self):
        """--slurm-template reads the file; one with unknown placeholders is a
        usage error naming them, as is a file that cannot be read."""
        folder = temp_dir(self)
        good = folder / "good.sh"
        good.write_text("#!/bin/sh\n#SBATCH --array=${array}\nexec ${engine_command}\n")
        launcher = self.launcher(self.parse(["--slurm-template", str(good)]))
        self.assertEqual(launcher.template, good.read_text())
        bad = folder / "bad.sh"
        bad.write_text("#!/bin/sh\nexec ${engine_cmd} $HOME\n")
        error = self.assertRaises(usage.UsageError, self.parse, ["--slurm-template", str(bad)])
        self.assertIn("--slurm-template %s has placeholders" % bad, str(error))
        self.assertIn("$engine_cmd, $HOME", str(error))
        error = self.assertRaises(
            usage.UsageError, self.parse, ["--slurm-template", str(folder / "nope.sh")]
        )
        self.assertIn("cannot read", str(error))

    def test_bad_values(self):
        """A poll interval <= 0 or an option spanning lines is refused; so
        is an option of the other batch launcher."""
        self.assertRaises(usage.UsageError, self.parse, ["--slurm-poll", "0"])
        error = self.assertRaises(
            usage.UsageError, self.parse, ["--slurm-option", "--mem=4G\nrm -rf /"]
        )
        self.assertIn("--slurm-option takes one option", str(error))
        error = self.assertRaises(usage.UsageError, self.parse, ["--pbs-queue", "workq"])
        self.assertEqual(
            str(error), "--pbs-queue is an option of the pbs launcher, not of --launcher slurm"
        )
        error = self.assertRaises(
            usage.UsageError, self.parse, ["--slurm-option", "--mem=4G"], "local"
        )
        self.assertIn("--slurm-option is an option of the slurm launcher", str(error))

    def test_pbs_options(self):
        """The PBS launcher's flags are --pbs-queue, --pbs-time, --pbs-option ..."""
        options = self.parse(
            ["--pbs-queue", "workq", "--pbs-time", "01:00:00", "--pbs-option", "-A lab",
             "--keep-engines"],
            "pbs",
        )["launcher-options"]
        self.assertEqual(
            (options["pbs-queue"], options["pbs-time"], options["pbs-option"]),
            ("workq", "01:00:00", ["-A lab"]),
        )
        self.assertEqual(options["keep-engines"], 1)


class OutputParsingTests(unittest.SynchronousTestCase):
    def test_job_ids(self):
        """The job id in what sbatch and qsub print; none is a ClusterError."""
        self.assertEqual(find_job_id(SLURM, "Submitted batch job 1234\n"), "1234")
        self.assertEqual(
            find_job_id(SLURM, "sbatch: warning: x\nSubmitted batch job 77 on cluster c\n"), "77"
        )
        self.assertEqual(find_job_id(PBS, "5678.pbs-server.lab\n"), "5678.pbs-server.lab")
        self.assertEqual(find_job_id(PBS, "42\n"), "42")
        error = self.assertRaises(ClusterError, find_job_id, SLURM, "sbatch: error: nope\n")
        self.assertIn("sbatch printed no job id", str(error))
        self.assertRaises(ClusterError, find_job_id, PBS, "qsub: Unknown queue\n")

    def test_squeue_lines(self):
        """squeue --array --format='%i %T %N' lines: array tasks one by one;
        pending ones have no node."""
        listed = parse_status(SLURM, "12_0 RUNNING node3\n12_1 PENDING \n13 COMPLETING node4\n")
        self.assertEqual(sorted(listed), ["12_0", "12_1", "13"])
        self.assertEqual((listed["12_0"].state, listed["12_0"].host), ("RUNNING", "node3"))
        self.assertEqual(listed["12_1"].host, "")

    def test_qstat_lines(self):
        """qstat's table; its header and rule are skipped."""
        out = (
            "Job id            Name             User              Time Use S Queue\n"
            "----------------  ---------------- ----------------  -------- - -----\n"
            "101.server        taskfarm-engine  ann               00:00:01 R workq\n"
            "102.server        taskfarm-engine  ann               0        Q workq\n"
        )
        listed = parse_status(PBS, out)
        self.assertEqual(
            {job: x.state for job, x in listed.items()}, {"101.server": "R", "102.server": "Q"}
        )


class SlurmBookkeepingTests(_LauncherCase):
    def test_interface(self):
        """The launcher provides IEngineLauncher; it is remote."""
        launcher = self.launcher()
        verifyObject(IEngineLauncher, launcher)
        self.assertTrue(launcher.remote)
        self.assertEqual(launcher.name, "slurm")

    def test_one_array_per_start(self):
        """start(4) is one sbatch of an array of 4; describe() lists each
        array task as a job; the furl is in no command's argv or environment,
        and the lifeline variables are taken out of it."""
        launcher = self.launcher()
        self.start(launcher, 4)
        sbatches = [argv for argv, _ in self.batch.commands if argv[0] == "sbatch"]
        self.assertEqual(len(sbatches), 1)
        self.assertEqual(launcher.submissions, ["100"])
        self.assertEqual(
            sorted(d["job"] for d in launcher.describe()), ["100_0", "100_1", "100_2", "100_3"]
        )
        self.batch.run_all()
        self.poll()
        self.assertEqual({d["state"] for d in launcher.describe()}, {"running"})
        self.assertEqual({d["host"] for d in launcher.describe()}, {"node1"})
        for argv, env in self.batch.commands:
            self.assertNotIn("secret", " ".join(argv) + repr(env))
            self.assertNotIn(lifeline.LAUNCHER_PID, env)
            self.assertNotIn(lifeline.LIVENESS_FD, env)

    def test_ended_jobs_without_keep(self):
        """A job gone from squeue for two checks in a row has ended: the
        watchers hear it; without --keep-engines nothing is submitted."""
        launcher = self.launcher()
        self.start(launcher, 2)
        self.batch.run_all()
        self.poll()
        del self.batch.jobs["100_1"]
        self.poll()
        self.assertEqual(self.ended, [])  # one miss may race the server
        self.poll()
        self.assertEqual(self.ended, [("job 100_1", "no longer listed by squeue")])
        self.poll(10)
        self.assertEqual(launcher.submissions, ["100"])
        self.assertEqual(launcher.live, 1)

    def test_ending_state(self):
        """A job listed as TIMEOUT or COMPLETING has ended at once."""
        launcher = self.launcher()
        self.start(launcher, 1)
        self.batch.jobs["100_0"] = "TIMEOUT"
        self.poll()
        self.assertEqual(self.ended, [("job 100_0", "TIMEOUT")])

    def test_keep_engines_backs_off(self):
        """--keep-engines replaces an ended job after 1 s, then 2 s, 4 s for
        jobs that end soon after they started; a job that ran more than a
        minute gets the first delay again."""
        launcher = self.launcher(keep_engines=True, backoff=(1.0, 60.0))
        self.start(launcher, 2)
        self.batch.run_all()
        self.poll()

        def end_and_time_replacement(job: str) -> float:
            self.batch.jobs[job] = "CANCELLED"
            self.poll()  # seen ended; the replacement waits its delay
            before = len(launcher.submissions)
            waited = 0.0
            while len(launcher.submissions) == before:
                self.clock.advance(0.5)
                waited += 0.5
                self.assertLess(waited, 100)
            del self.batch.jobs[job]
            self.batch.run_all()
            self.poll()
            return waited

        self.assertEqual(end_and_time_replacement("100_0"), 1.0)
        self.assertEqual(launcher.submissions[-1], "101")
        self.assertEqual(end_and_time_replacement("101_0"), 2.0)
        self.assertEqual(end_and_time_replacement("102_0"), 4.0)
        self.clock.advance(launcher.LONG_LIFE + 1)
        self.assertEqual(end_and_time_replacement("103_0"), 1.0)
        self.assertEqual(launcher.replacements, 4)
        self.assertEqual(launcher.live, 2)
        self.assertEqual(len(self.ended), 4)

    def test_failed_replacement_is_retried(self):
        """A refused replacement submission is tried again after a longer delay."""
        launcher = self.launcher(keep_engines=True, backoff=(1.0, 60.0))
        self.start(launcher, 1)
        self.batch.run_all()
        self.poll()
        del self.batch.jobs["100_0"]
        self.batch.refuse_submit = True
        self.poll(2)
        self.clock.advance(1.0)  # first try: refused
        self.assertEqual(launcher.submissions, ["100"])
        self.batch.refuse_submit = False
        self.clock.advance(1.9)
        self.assertEqual(launcher.submissions, ["100"])
        self.clock.advance(0.1)  # the second try, 2 s later
        self.assertEqual(launcher.submissions, ["100", "101"])

    def test_status_unknown_loses_nothing(self):
        """While squeue fails (slurmctld down), no job counts as ended."""
        launcher = self.launcher(keep_engines=True)
        self.start(launcher, 2)
        self.batch.status_down = True
        self.poll(10)
        self.assertEqual(self.ended, [])
        self.assertEqual(launcher.live, 2)

    def test_refused_submission(self):
        """start() fails with ClusterError quoting sbatch's words."""
        launcher = self.launcher()
        self.batch.refuse_submit = True
        failure = self.failureResultOf(launcher.start(2, self.furl_file, []), ClusterError)
        self.assertIn("cannot submit the engines' job", str(failure.value))
        self.assertIn("Invalid partition", str(failure.value))
        self.assertEqual(launcher.wanted, 0)

    def test_stop_cancels_and_waits(self):
        """stop() cancels every submission with live jobs, waits until squeue
        lists none of them, and submits nothing more; a second stop is a no-op."""
        launcher = self.launcher(keep_engines=True)
        self.start(launcher, 2)
        self.start(launcher, 1)
        self.batch.jobs["999_0"] = "RUNNING"  # someone else's job
        d = launcher.stop()
        self.successResultOf(d)
        cancels = [argv for argv, _ in self.batch.commands if argv[0] == "scancel"]
        self.assertEqual(cancels, [["scancel", "100", "101"]])
        self.assertEqual(list(self.batch.jobs), ["999_0"])
        self.assertEqual({job.state for job in launcher.jobs.values()}, {JobState.CANCELLED})
        self.assertEqual(launcher.state, LauncherState.STOPPED)
        self.poll(10)
        self.assertEqual(len(self.batch.commands), 4)  # 2 sbatch, scancel, squeue: no more
        self.successResultOf(launcher.stop())
        self.assertFailure(launcher.start(1, self.furl_file, []), ClusterError)

    def test_stop_is_bounded(self):
        """If squeue keeps listing a job, stop() gives up after stop_timeout
        and still fires."""
        launcher = self.launcher(stop_timeout=3.0)
        self.start(launcher, 1)
        self.batch.status_down = True
        d = launcher.stop()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertNoResult(d)
        for _ in range(4):
            self.clock.advance(0.5)
        self.successResultOf(d)

    def test_stop_during_a_replacement_delay(self):
        """stop() while a replacement waits its back-off: nothing is
        submitted, then or later."""
        launcher = self.launcher(keep_engines=True, backoff=(5.0, 60.0))
        self.start(launcher, 2)
        self.batch.run_all()
        self.poll()
        self.batch.jobs["100_1"] = "NODE_FAIL"
        self.poll()
        self.assertEqual(self.ended, [("job 100_1", "NODE_FAIL")])
        self.successResultOf(launcher.stop())
        self.clock.advance(100)
        self.assertEqual(launcher.submissions, ["100"])
        self.assertEqual(self.batch.jobs, {})

    def test_cancel_described_jobs(self):
        """cancel_jobs, what `taskfarm stop` needs for the jobs `describe`
        named, cancels them and waits until squeue lists none."""
        launcher = self.launcher()
        self.start(launcher, 3)
        self.batch.jobs["999_0"] = "RUNNING"
        jobs = [d["job"] for d in launcher.describe()]
        d = defer.Deferred.fromCoroutine(
            cancel_jobs(SLURM, self.batch, self.clock, jobs, {"PATH": "/usr/bin"})
        )
        self.assertEqual(self.successResultOf(d), [])
        self.assertIn(["scancel", "100_0", "100_1", "100_2"], [a for a, _ in self.batch.commands])
        self.assertEqual(list(self.batch.jobs), ["999_0"])


    def test_clean_up_cancels_what_describe_saved(self):
        """SlurmLauncher.clean_up, what `taskfarm stop` calls when the
        launcher's process is gone, cancels the jobs its saved describe()
        named (another job stays) and waits until squeue lists none; jobs
        still listed after 30 s are a ClusterError naming them."""
        batch = self.batch

        class Here(SlurmLauncher):
            @classmethod
            def command_runner(cls, reactor):
                return batch

        launcher = Here(self.clock, Profile(self.folder), {}, runner=batch)
        self.start(launcher, 2)
        described = json.loads(json.dumps(launcher.describe()))  # as cluster.json keeps it
        batch.jobs["999_0"] = "RUNNING"
        self.successResultOf(Here.clean_up(self.clock, None, described, {}))
        self.assertIn(["scancel", "100_0", "100_1"], [a for a, _ in batch.commands])
        self.assertEqual(list(batch.jobs), ["999_0"])
        self.successResultOf(Here.clean_up(self.clock, None, [], {}))  # nothing to cancel

        batch.ignore_cancel = True
        d = Here.clean_up(self.clock, None, [{"label": "job 999_0", "job": "999_0"}], {})
        for _ in range(70):
            self.clock.advance(0.5)
        failure = self.failureResultOf(d, ClusterError)
        self.assertEqual(str(failure.value), "jobs still listed by squeue: 999_0")


class PbsBookkeepingTests(_LauncherCase):
    system = PBS

    def test_one_job_per_engine(self):
        """PBS has no arrays here: start(3) is three qsub calls, three jobs;
        stop() qdels them."""
        launcher = self.launcher()
        self.start(launcher, 3)
        self.assertEqual(len(self.batch.scripts), 3)
        self.assertEqual(launcher.submissions, ["100.server", "101.server", "102.server"])
        self.batch.run_all()
        self.poll()
        self.assertEqual({d["state"] for d in launcher.describe()}, {"running"})
        self.successResultOf(launcher.stop())
        self.assertIn(
            ["qdel", "100.server", "101.server", "102.server"],
            [argv for argv, _ in self.batch.commands],
        )
        self.assertEqual(self.batch.jobs, {})


class HarnessTests(unittest.SynchronousTestCase):
    def test_missing_programs_fail_with_the_install_command(self):
        """Without slurm-wlm and munge on PATH, the test SLURM fails (it is
        never skipped) and says what to install; it starts nothing."""
        from taskfarm.testing.slurm import SlurmHarness, SlurmMissing

        self.patch(os, "environ", dict(os.environ, PATH="/nonexistent"))
        harness = SlurmHarness(task.Clock(), temp_dir(self))
        failure = self.failureResultOf(defer.Deferred.fromCoroutine(harness.start()), SlurmMissing)
        self.assertIn("munged, slurmctld, slurmd", str(failure.value))
        self.assertIn("apt-get install -y slurm-wlm munge", str(failure.value))
        self.assertEqual(list(harness.root.iterdir()), [])
