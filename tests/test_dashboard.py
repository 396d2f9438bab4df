"""The dashboard's web side without sockets (issue 13 item 1): the token
guards every path, the pages and APIs answer with it, the event streams
are bounded (clients, rate, slow readers), the endpoint option is loopback
unless told.  The real browser test is test_dashboard_browser.py."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.test._util import _render
from twisted.web.test.requesthelper import DummyRequest

from taskfarm import serialization
from taskfarm.controller import tap
from taskfarm.dashboard.events import EventStream
from taskfarm.dashboard.server import Dashboard, DashboardRoot, dashboard_endpoint
from taskfarm.errors import RemoteTaskError
from taskfarm.task import Task
from taskfarm.testing.fakes import ScriptedChannel
from taskfarm.testing.helpers import clock_controller, temp_dir

TOKEN = "s3cret-token_value"


def _request(path: str, token: str | None = TOKEN, bearer: str | None = None) -> DummyRequest:
    request = DummyRequest([part.encode() for part in path.lstrip("/").split("/")])
    if token is not None:
        request.addArg(b"token", token.encode())
    if bearer is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + bearer.encode()])
    return request


class DashboardTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock, self.registry, self.controller = clock_controller(self)
        self.dashboard = Dashboard(self.controller, self.clock, "tcp:0", token=TOKEN)
        self.addCleanup(self.dashboard.events.close)
        self.root = DashboardRoot(self.dashboard)

    def get(self, path: str, **kwargs) -> tuple[int, bytes, DummyRequest]:
        request = _request(path, **kwargs)
        child = resource.getChildForRequest(self.root, request)
        d = _render(child, request)
        self.clock.advance(0)
        self.successResultOf(d)
        return request.responseCode or 200, b"".join(request.written), request


class TokenTests(DashboardTestCase):
    PATHS = ("/", "/task/3", "/static/app.js", "/static/style.css", "/events", "/metrics",
             "/api/snapshot", "/api/task/3", "/no/such/page")

    def test_every_path_refused_without_the_token(self):
        """No token, a wrong one, or a prefix of it: 403 on every path, the
        unknown ones too, with nothing of the page in the answer."""
        for path in self.PATHS:
            for token in (None, "wrong", TOKEN[:-1], TOKEN + "x", ""):
                code, body, _ = self.get(path, token=token)
                self.assertEqual(code, 403, (path, token))
                self.assertNotIn(b"taskfarm dashboard", body)

    def test_pages_answer_with_the_token(self):
        """With the token (in the URL, or as a Bearer header): the pages,
        their assets (named with the token) and the APIs answer."""
        code, body, request = self.get("/")
        self.assertEqual(code, 200)
        self.assertIn(b"/static/app.js?token=" + TOKEN.encode(), body)
        self.assertIn(b"default-src 'self'", request.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        code, body, _ = self.get("/static/app.js")
        self.assertEqual(code, 200)
        self.assertIn(b"EventSource", body)
        code, body, request = self.get("/metrics", token=None, bearer=TOKEN)
        self.assertEqual(code, 200)
        self.assertIn(b"taskfarm_engines 0", body)
        self.assertIn(b"version=0.0.4", request.responseHeaders.getRawHeaders(b"content-type")[0])
        code, _, _ = self.get("/metrics", token=None, bearer="wrong")
        self.assertEqual(code, 403)
        code, body, _ = self.get("/api/snapshot")
        self.assertEqual(set(json.loads(body)), {"summary", "engines", "timeline", "failures"})

    def test_task_api(self):
        """/api/task/ID: a failed task's error with its remote traceback;
        404 for an unknown id, 400 for one that is not a number."""
        channel = ScriptedChannel.registered(self.registry, {"hostname": "h"})
        (tid,) = self.controller.submit([Task("x").to_envelope()])
        self.clock.advance(0)
        ((seq, _, _),) = channel.pending()
        channel.fail(seq, RemoteTaskError("KeyError", "'k'", "Traceback ...\nKeyError: 'k'\n", 0))
        code, body, _ = self.get("/api/task/%d" % tid)
        info = json.loads(body)
        self.assertEqual((code, info["state"], info["error"]["error"]), (200, "failed", "KeyError"))
        self.assertIn("KeyError: 'k'", info["error"]["traceback"])
        self.assertIsNone(info["why"])
        self.assertEqual(self.get("/api/task/999")[0], 404)
        self.assertEqual(self.get("/api/task/abc")[0], 400)

    def test_task_api_shows_why_when_the_controller_explains(self):
        """A queued task's page carries the controller's `why` answer (plain
        data, or a Deferred of it) when the controller has one."""
        (tid,) = self.controller.submit([Task("x").to_envelope()])
        self.clock.advance(0)
        self.controller.why = lambda taskid: defer.succeed({"taskid": taskid, "engines": []})
        code, body, _ = self.get("/api/task/%d" % tid)
        self.assertEqual(json.loads(body)["why"], {"taskid": tid, "engines": []})

    def test_state_data_survives_json(self):
        """The snapshot is plain JSON with a result pickled in the store."""
        channel = ScriptedChannel.registered(self.registry, {"hostname": "h", "pid": 1})
        self.controller.submit([Task("x").to_envelope()])
        self.clock.advance(0)
        ((seq, _, _),) = channel.pending()
        channel.reply(seq, True, serialization.dumps({}), 0.0, 0.1)
        snapshot = json.loads(self.get("/api/snapshot")[1])
        self.assertEqual(snapshot["summary"]["succeeded_total"], 1)
        self.assertEqual(snapshot["engines"][0]["tasks_done"], 1)


class _StreamRequest:
    """What `EventStream` uses of a twisted.web request, recorded."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.producer = None
        self.finished = False
        self._finish = defer.Deferred()

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> defer.Deferred:
        return self._finish

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def close(self) -> None:
        """The browser went away."""
        self._finish.errback(ConnectionError("gone"))


class EventStreamTests(unittest.SynchronousTestCase):
    def setUp(self):
        from twisted.internet import task

        self.clock = task.Clock()
        self.snapshots = 0

        def snapshot():
            self.snapshots += 1
            return {"n": self.snapshots}

        self.stream = EventStream(self.clock, snapshot, period=0.5, max_clients=3, slow_timeout=5.0)
        self.addCleanup(self.stream.close)

    def test_one_snapshot_per_tick_for_all(self):
        """Each client gets a snapshot at once, then one per period; a tick
        builds one snapshot for every client."""
        requests = [_StreamRequest() for _ in range(3)]
        for request in requests:
            self.assertIsNotNone(self.stream.add(request))
        self.assertEqual(requests[0].headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertTrue(requests[0].written[0].startswith(b"event: snapshot\ndata: {"))
        built = self.stream.built
        self.clock.advance(0.49)
        self.assertEqual(self.stream.built, built)
        self.clock.advance(0.01)
        self.assertEqual(self.stream.built, built + 1)
        self.assertEqual([len(r.written) for r in requests], [2, 2, 2])
        self.clock.pump([0.5] * 10)
        self.assertEqual([len(r.written) for r in requests], [12, 12, 12])

    def test_at_most_max_clients(self):
        """A client over `max_clients` is refused (None); one who leaves
        makes room."""
        requests = [_StreamRequest() for _ in range(3)]
        for request in requests:
            self.stream.add(request)
        self.assertIsNone(self.stream.add(_StreamRequest()))
        requests[0].close()
        self.assertIsNotNone(self.stream.add(_StreamRequest()))

    def test_slow_client_skipped_then_dropped(self):
        """A paused client (its transport's buffer is full) gets nothing
        while paused, and is dropped after `slow_timeout`; the others go on."""
        slow, fast = _StreamRequest(), _StreamRequest()
        self.stream.add(slow)
        self.stream.add(fast)
        slow.producer.pauseProducing()
        self.clock.pump([0.5] * 4)
        self.assertEqual(len(slow.written), 1)
        self.assertEqual(len(fast.written), 5)
        slow.producer.resumeProducing()
        self.clock.advance(0.5)
        self.assertEqual(len(slow.written), 2)
        slow.producer.pauseProducing()
        self.clock.pump([0.5] * 10)
        self.assertEqual(self.stream.dropped, 1)
        self.assertEqual(self.stream.clients, [fast.producer])
        self.assertEqual(len(slow.written), 2)

    def test_timer_runs_only_while_watched(self):
        """No client, no snapshots: the timer stops with the last one."""
        request = _StreamRequest()
        self.stream.add(request)
        request.close()
        built = self.stream.built
        self.clock.pump([0.5] * 10)
        self.assertEqual(self.stream.built, built)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EndpointTests(unittest.SynchronousTestCase):
    def test_loopback_unless_told(self):
        """No interface named: loopback is added; a named one is kept."""
        self.assertEqual(dashboard_endpoint("tcp:8765"), "tcp:8765:interface=127.0.0.1")
        self.assertEqual(
            dashboard_endpoint("tcp:8765:interface=0.0.0.0"), "tcp:8765:interface=0.0.0.0"
        )

    def test_bad_endpoints(self):
        """Not tcp, no port, a bad port: a sentence naming --dashboard."""
        for text in ("unix:/tmp/x", "tcp", "tcp:http", "tcp:70000", "8765"):
            with self.assertRaises(ValueError) as caught:
                dashboard_endpoint(text)
            self.assertIn("--dashboard", str(caught.exception))

    def test_controller_option(self):
        """`twistd taskcontroller --dashboard` is off by default, loopback
        unless told, and a bad value is a UsageError."""
        options = tap.Options()
        options.parseOptions([])
        self.assertIsNone(options["dashboard"])
        options = tap.Options()
        options.parseOptions(["--dashboard", "tcp:0"])
        self.assertEqual(options["dashboard"], "tcp:0:interface=127.0.0.1")
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--dashboard", "unix:/x"])

    def test_cluster_passes_it_on(self):
        """`taskfarm cluster --dashboard` hands it to the controller."""
        from taskfarm.cli import ClusterOptions

        options = ClusterOptions()
        options.parseOptions(["--dashboard", "tcp:8765"])
        argv = options.controller_options()
        self.assertIn("--dashboard", argv)
        self.assertEqual(argv[argv.index("--dashboard") + 1], "tcp:8765:interface=127.0.0.1")


class DashboardServiceTests(unittest.TestCase):
    """The service on a real loopback socket (marked `process` in conftest)."""

    def setUp(self):
        from twisted.internet import reactor

        from taskfarm.controller.registry import EngineRegistry
        from taskfarm.controller.scheduler import FIFOScheduler
        from taskfarm.controller.taskcontroller import TaskController

        self.reactor = reactor
        registry = EngineRegistry(reactor, heartbeat_period=None)
        self.controller = TaskController(registry, FIFOScheduler(), reactor, unmet_timeout=None, retention=None)
        self.url_file = temp_dir(self) / "dashboard.url"
        self.dashboard = Dashboard(self.controller, reactor, "tcp:0:interface=127.0.0.1", url_file=self.url_file)

    async def get(self, url: str, headers=None) -> tuple[int, bytes, object]:
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        response = await Agent(self.reactor).request(b"GET", url.encode(), Headers(headers or {}))
        body = await readBody(response)
        return response.code, body, response.headers

    def test_listens_writes_the_url_and_guards_it(self):
        """Started: listens on loopback, writes its URL 0600; over HTTP, no
        token is 403, the token (URL or Bearer) opens the pages and a
        /metrics that prometheus_client parses; a page over the limit of
        event streams gets 503; stopped: the URL file is gone."""
        from prometheus_client.parser import text_string_to_metric_families

        async def run():
            self.dashboard.startService()
            url = await self.dashboard.listening()
            self.assertTrue(url.startswith("http://127.0.0.1:"))
            self.assertEqual(self.url_file.read_text().strip(), url)
            self.assertEqual(self.url_file.stat().st_mode & 0o777, 0o600)
            base, token = url.split("/?token=")
            code, body, _ = await self.get(base + "/")
            self.assertEqual(code, 403)
            code, body, _ = await self.get(base + "/metrics?token=" + token[:-1])
            self.assertEqual(code, 403)
            code, body, _ = await self.get(url)
            self.assertEqual(code, 200)
            self.assertIn(b"<title>taskfarm dashboard</title>", body)
            code, body, headers = await self.get(
                base + "/metrics", {b"authorization": [b"Bearer " + token.encode()]}
            )
            self.assertEqual(code, 200)
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            self.assertIn("taskfarm_journal_commit_seconds", names)
            self.dashboard.events.max_clients = 0
            code, body, _ = await self.get(base + "/events?token=" + token)
            self.assertEqual(code, 503)
            await self.dashboard.stopService()
            self.assertFalse(self.url_file.exists())

        return defer.Deferred.fromCoroutine(run())

    def test_port_taken(self):
        """A dashboard whose port is taken says so (`listening` fails with
        the reason) and writes no URL; the first one is untouched."""
        from twisted.internet.error import CannotListenError

        async def run():
            self.dashboard.startService()
            url = await self.dashboard.listening()
            port = int(url.split(":")[2].split("/")[0])
            other_file = self.url_file.with_name("other.url")
            other = Dashboard(
                self.controller, self.reactor, "tcp:%d:interface=127.0.0.1" % port, url_file=other_file
            )
            other.startService()
            with self.assertRaises(CannotListenError):
                await other.listening()
            self.assertFalse(other_file.exists())
            await other.stopService()
            code, _, _ = await self.get(url)
            self.assertEqual(code, 200)
            await self.dashboard.stopService()

        return defer.Deferred.fromCoroutine(run())
