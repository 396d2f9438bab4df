"""taskfarm installed as a user installs it: ``pip install -e .`` (setuptools'
default editable mode) and ``pip install .``, each into a fresh virtual
environment, then a cluster started with its ``taskfarm cluster`` runs one
task.

The fresh environment gets taskfarm alone (``--no-deps``, built without
build isolation and without an index, so no network): its dependencies come
from the environment running the tests, through a ``.pth`` line naming that
environment's site-packages (what ``--system-site-packages`` does for the
system's).  The build needs setuptools and wheel there (the ``test`` extra).
Twisted lives in that other environment, so the fresh one has no ``twistd``
script of its own: ``python -m twisted`` is the same program (and what
``taskfarm cluster`` runs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import wait_until
from taskfarm.testing.processes import ProcessTestCase

CHECKOUT = Path(__file__).resolve().parent.parent

#: What a copy of the checkout leaves out: build outputs and environments.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "_trial_temp*",
    ".pytest_cache", ".ruff_cache", "dropin.cache",
)

CLIENT = """
import sys
import taskfarm
from taskfarm import client
print("taskfarm from", taskfarm.__file__)
with open(sys.argv[2], "w") as f:
    f.write(taskfarm.__file__)
tc = client.TaskClient(sys.argv[1])
taskid = tc.run(client.Task("a = 6 * 7", pull="a"))
print("result", tc.get_task_result(taskid, block=True).ns.a)
tc.close()
"""


def _build_tools_missing() -> str | None:
    for module in ("setuptools", "wheel", "pip"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


class InstallTests(ProcessTestCase):
    timeout = 240

    def setUp(self):
        super().setUp()
        # Not the checkout's folder: `python -m` and `-c` put the current
        # folder first on sys.path, which would import the checkout itself.
        self.cwd = str(self.root)
        missing = _build_tools_missing()
        if missing:
            self.fail(
                "%s is missing from this environment: %s -m pip install %s "
                "(or pip install -e '.[test]')" % (missing, sys.executable, missing)
            )
        self.source = self.root / "checkout"
        shutil.copytree(CHECKOUT, self.source, ignore=IGNORED)

    def fresh_venv(self, name: str) -> Path:
        venv = self.root / name
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
        )
        python = venv / "bin" / "python"
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.strip()
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        # Sorted last ("zz"), so the fresh install comes first on sys.path.
        Path(purelib, "zz_taskfarm_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
        return venv

    def pip_install(self, venv: Path, *args: str) -> None:
        done = subprocess.run(
            [
                sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                "install", "--no-build-isolation", "--no-deps", "--no-index", "--quiet", *args,
            ],
            capture_output=True, text=True, timeout=180, cwd=self.cwd, env=self.clean_env(),
        )
        self.assertEqual(done.returncode, 0, "pip install failed:\n%s%s" % (done.stdout, done.stderr))

    def clean_env(self) -> dict:
        # Not this checkout through PYTHONPATH: only what was installed.
        env = self.env()
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        return env

    async def check_installed(self, venv: Path, expected_prefix: Path) -> None:
        env = self.clean_env()
        python = str(venv / "bin" / "python")
        # `twistd --help`: both plugins are found.
        listing = subprocess.run(
            [python, "-m", "twisted", "--help"], capture_output=True, text=True,
            timeout=60, cwd=self.cwd, env=env,
        )
        self.assertIn("taskcontroller", listing.stdout, listing.stdout + listing.stderr)
        self.assertIn("taskengine", listing.stdout)
        profile = self.root / ("profile-" + venv.name)
        launcher = self.spawn(
            [str(venv / "bin" / "taskfarm"), "cluster", "-n", "1", "--profile-dir", str(profile)],
            "cluster-" + venv.name, env=env,
        )

        def up():
            out = self.output("cluster-" + venv.name)
            if launcher.poll() is not None:
                raise AssertionError("taskfarm cluster exited with %s:\n%s" % (launcher.returncode, out))
            return "Press Ctrl-C to stop." in out

        await wait_until(up, "taskfarm cluster to start", 60)
        where = self.root / ("where-" + venv.name)
        client = self.spawn([python, "-c", CLIENT, str(profile), str(where)], "client-" + venv.name, env=env)
        self.assertEqual(await self.wait_for_exit(client, "client-" + venv.name, 60), 0,
                         self.output("client-" + venv.name))
        self.assertIn("result 42", self.output("client-" + venv.name))
        self.assertTrue(
            Path(where.read_text()).is_relative_to(expected_prefix), where.read_text()
        )
        launcher.send_signal(signal.SIGTERM)
        await self.wait_for_exit(launcher, "cluster-" + venv.name, 30)
        self.assertIn("taskfarm cluster: stopped", self.output("cluster-" + venv.name))

    @run
    async def test_editable_install(self):
        """``pip install -e .`` (the default mode): twistd finds both
        plugins, and ``taskfarm cluster`` starts a controller and an engine
        that run a task, all from the checkout itself."""
        venv = self.fresh_venv("editable")
        self.pip_install(venv, "-e", str(self.source))
        await self.check_installed(venv, self.source)

    @run
    async def test_regular_install(self):
        """``pip install .``: the same, from the copy in site-packages."""
        venv = self.fresh_venv("regular")
        self.pip_install(venv, str(self.source))
        await self.check_installed(venv, venv)

    def test_build_tools_are_in_the_test_extra(self):
        """The build tools this test needs are declared where CI installs them."""
        setup = (CHECKOUT / "setup.cfg").read_text()
        extra = setup.split("test =", 1)[1].split("\n\n", 1)[0]
        for name in ("setuptools", "wheel"):
            self.assertIn(name, extra)
        self.assertTrue(os.path.exists(CHECKOUT / "twisted" / "plugins" / "taskfarm_plugins.py"))
