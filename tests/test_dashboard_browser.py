"""The dashboard in a real headless Chromium, driven by selenium (issue 13
item 1): a real controller with ``--dashboard`` and 4 engine processes.

It checks that the page is refused without the token and loads with it,
that it shows the 4 engines and live counts that change while tasks run,
and that the task page of a failed task shows its remote traceback.  The
screenshots it takes are kept in ``_trial_temp/dashboard-screenshots`` (or
``$TASKFARM_ARTIFACTS``), and copied into
``$TASKFARM_DASHBOARD_IMAGES`` when that is set (``make
dashboard-screenshots`` sets it to docs/images, which docs/dashboard.md shows).

Chromium and chromedriver are Debian's ``chromium`` and ``chromium-driver``;
without them this test fails with the command that installs them.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from taskfarm.task import Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver  (and: pip install selenium)"

#: Where the screenshots are kept (git ignores it; `make clean` removes it).
ARTIFACTS = "_trial_temp/dashboard-screenshots"

#: Seconds any one browser wait may take.
WAIT = 15.0


def _programs() -> tuple[str, str]:
    """The browser and its driver, or the test fails saying how to install them."""
    chromium = shutil.which(CHROMIUM)
    driver = shutil.which(CHROMEDRIVER)
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise AssertionError("selenium is missing: pip install selenium") from None
    if chromium is None or driver is None:
        raise AssertionError(
            "the dashboard's browser test needs Chromium and chromedriver "
            "(found chromium=%s, chromedriver=%s): %s" % (chromium, driver, INSTALL)
        )
    return chromium, driver


class Browser:
    """A headless Chromium; every method blocks, so the test calls them in
    a thread (the controller answering the browser runs in the reactor)."""

    def __init__(self, chromium: str, driver: str, artifacts: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,860",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ):
            options.add_argument(argument)
        self.artifacts = artifacts
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.set_page_load_timeout(WAIT)

    def open(self, url: str) -> str:
        self.driver.get(url)
        return self.driver.find_element("tag name", "body").text

    def text(self, css: str) -> str:
        return self.driver.find_element("css selector", css).text

    def wait_for(self, what: str, condition) -> object:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT, poll_frequency=0.05).until(
            lambda _: condition(), message="waited %g s for %s" % (WAIT, what)
        )

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / name
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        self.driver.quit()


def _run(f, *args):
    return threads.deferToThread(f, *args)


class DashboardBrowserTests(ClusterTestCase):
    timeout = 90

    @async_test
    async def test_dashboard_in_chromium(self):
        """Refused without the token; with it, 4 engines and counts that
        change while tasks run; a failed task's page shows its traceback;
        a running task's page follows it to its end; screenshots kept."""
        chromium, driver = _programs()
        started = time.time() - 1
        tc = await self.start_cluster(4, dashboard="tcp:0:interface=127.0.0.1")
        url = await self.cluster.controller.dashboard.listening()
        self.assertTrue(url.startswith("http://127.0.0.1:"))
        self.assertEqual(self.cluster.profile.dashboard_url_file.read_text().strip(), url)
        self.assertEqual(self.cluster.profile.dashboard_url_file.stat().st_mode & 0o777, 0o600)
        base, token = url.split("/?token=")
        artifacts = Path(os.environ.get("TASKFARM_ARTIFACTS") or ARTIFACTS).absolute()
        artifacts.mkdir(parents=True, exist_ok=True)

        browser = await _run(Browser, chromium, driver, artifacts)
        self.addCleanup(_run, browser.close)

        # Without the token, or with a wrong one: refused.
        for bad in (base + "/", base + "/?token=" + token[:-2], base + "/metrics"):
            body = await _run(browser.open, bad)
            self.assertIn("403 Forbidden", body)
            self.assertNotIn("Engines", body)

        # With it: the 4 engines.
        await _run(browser.open, url)
        await _run(browser.wait_for, "4 engines", lambda: browser.text("#engines-count") == "4")
        rows = await _run(lambda: len(browser.driver.find_elements("css selector", "#engines-table tbody tr")))
        self.assertEqual(rows, 4)

        # Live counts change while tasks run (the page is not reloaded).
        ids = await tc.run_many([Task("import time; time.sleep(0.02)") for _ in range(400)])
        seen = []

        def counts_change():
            text = browser.text("#count-succeeded")
            if text.isdigit() and (not seen or seen[-1] != int(text)):
                seen.append(int(text))
            return len(seen) >= 3 and 0 < seen[-1] < len(ids)

        await _run(browser.wait_for, "the succeeded count to change while tasks run", counts_change)
        self.assertEqual(seen, sorted(seen))
        await _run(browser.wait_for, "a running engine", lambda: "busy" in browser.text("#engines-table"))
        await _run(browser.screenshot, "dashboard-running.png")
        await tc.barrier(ids)
        await _run(browser.wait_for, "all succeeded", lambda: browser.text("#count-succeeded") == str(len(ids)))

        # A failed task: in the recent failures, and on its own page with its traceback.
        (bad_id,) = await tc.run_many([Task("def deep():\n    return 1 / 0\ndeep()")])
        await tc.barrier([bad_id])
        await _run(browser.wait_for, "the failure listed", lambda: "ZeroDivisionError" in browser.text("#failures"))
        await _run(browser.screenshot, "dashboard-failure.png")
        await _run(browser.open, "%s/task/%d?token=%s" % (base, bad_id, token))
        await _run(browser.wait_for, "the traceback", lambda: "ZeroDivisionError" in browser.text("#traceback"))
        traceback = await _run(browser.text, "#traceback")
        self.assertIn("deep", traceback)
        self.assertIn("failed", await _run(browser.text, "#task-facts"))
        await _run(browser.screenshot, "task-failed.png")

        # A running task's page follows it to its end without a reload.
        (slow_id,) = await tc.run_many([Task("import time; time.sleep(1.5)")])
        await _run(browser.open, "%s/task/%d?token=%s" % (base, slow_id, token))
        await _run(browser.wait_for, "the task running", lambda: "pending" in browser.text("#task-facts"))
        await _run(browser.wait_for, "the task done", lambda: "succeeded" in browser.text("#task-facts"))

        shots = ["dashboard-failure.png", "dashboard-running.png", "task-failed.png"]
        for name in shots:  # taken by this run, and not blank
            self.assertGreater((artifacts / name).stat().st_mtime, started)
            self.assertGreater((artifacts / name).stat().st_size, 10_000)
        images = os.environ.get("TASKFARM_DASHBOARD_IMAGES")
        if images:
            Path(images).mkdir(parents=True, exist_ok=True)
            for name in shots:
                shutil.copyfile(artifacts / name, Path(images) / name)


class MissingBrowserTests(unittest.SynchronousTestCase):
    """Without Chromium or its driver the browser test fails, naming the
    install command: it never skips."""

    def test_missing_programs_fail_with_the_install_command(self):
        for name in ("CHROMIUM", "CHROMEDRIVER"):
            self.patch(sys.modules[__name__], name, "no-such-program-for-taskfarm")
            with self.assertRaises(AssertionError) as caught:
                _programs()
            self.assertIn("apt-get install -y chromium chromium-driver", str(caught.exception))
