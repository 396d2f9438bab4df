"""Logs rotate and each engine writes its own file (issue 13 item 5).

Every log in a profile is a size-rotated `LogFile` (0600, a few old files
kept); engine launchers on one profile claim distinct ``PREFIX-N.out``
names, so two launchers never interleave their engines' output in one file
(what happened before: each started counting at ``engine-0.out``).
"""

from __future__ import annotations

import os

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
