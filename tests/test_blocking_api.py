"""The blocking client's own API (issue 14, item 7): every public method has
a signature with a return type and a docstring of its own, never a
Deferred's; the wrappers carry the public method's name (what a traceback
shows); the waiting methods take `timeout=`; the new error types.

By inspection only (no reactor); the traceback itself is checked against
a real controller in tests/test_client_connections.py.
"""

from __future__ import annotations

import inspect

from twisted.trial import unittest

from taskfarm import asyncclient, client, errors

CLASSES = (client.TaskClient, client.MultiEngineClient, client.PendingResult)


def public_methods(cls):
    return [
        (name, member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    ]


class SignatureTests(unittest.SynchronousTestCase):
    def test_no_deferreds_in_signatures_or_docstrings(self):
        bad = []
        for cls in CLASSES:
            for name, method in public_methods(cls):
                signature = inspect.signature(method)
                doc = inspect.getdoc(method) or ""
                if signature.return_annotation is inspect.Signature.empty:
                    bad.append("%s.%s: no return type" % (cls.__name__, name))
                if "Deferred" in str(signature.return_annotation):
                    bad.append("%s.%s: returns a Deferred" % (cls.__name__, name))
                if not doc:
                    bad.append("%s.%s: no docstring" % (cls.__name__, name))
                if "Deferred" in doc or "fires" in doc.lower():
                    bad.append("%s.%s: the Deferred twin's docstring" % (cls.__name__, name))
        self.assertEqual(bad, [])

    def test_every_generated_method_has_its_own_documentation(self):
        """A method the Deferred client gains must get a blocking docstring
        (client.BLOCKING_DOCS) too."""
        missing = []
        for cls in (client.TaskClient, client.MultiEngineClient):
            for name, method in public_methods(cls):
                if hasattr(method, "__wrapped_async__") and not (
                    name in client.BLOCKING_DOCS
                    or "%s.%s" % (cls.__name__, name) in client.BLOCKING_DOCS
                ):
                    missing.append("%s.%s" % (cls.__name__, name))
        self.assertEqual(missing, [])

    def test_parameters_are_the_deferred_twins(self):
        for cls in (client.TaskClient, client.MultiEngineClient):
            for name, method in public_methods(cls):
                twin = getattr(method, "__wrapped_async__", None)
                if twin is None:
                    continue
                self.assertEqual(
                    list(inspect.signature(method).parameters),
                    list(inspect.signature(twin).parameters),
                    name,
                )

    def test_a_traceback_names_the_public_method(self):
        method = client.TaskClient.get_task_result
        self.assertEqual(method.__code__.co_name, "get_task_result")
        self.assertEqual(method.__qualname__, "TaskClient.get_task_result")
        self.assertEqual(method.__module__, "taskfarm.client")

    def test_help_shows_the_blocking_return(self):
        signature = inspect.signature(client.TaskClient.get_task_result)
        self.assertEqual(list(signature.parameters), ["self", "taskid", "block", "timeout", "full"])
        self.assertEqual(signature.return_annotation, "TaskResult | Any | None")
        self.assertNotIn("fires", client.TaskClient.run.__doc__)


class TimeoutKeywordTests(unittest.SynchronousTestCase):
    """Every call that can wait takes `timeout=`, in both APIs."""

    TASK = ["barrier", "get_task_result", "get_task_results", "map", "run", "wait_for_engines"]
    MULTIENGINE = [
        "execute", "run", "push", "pull", "zip_pull", "get_result", "reset", "keys", "kill",
        "scatter", "gather", "map", "get_properties", "set_properties", "has_properties",
        "del_properties", "clear_properties", "get_ids", "queue_status", "clear_queue",
        "barrier", "wait_for_engines", "get_pending_deferred",
    ]

    def check(self, cls, names):
        for name in names:
            self.assertIn("timeout", inspect.signature(getattr(cls, name)).parameters, name)

    def test_task(self):
        self.check(client.TaskClient, self.TASK)
        self.check(asyncclient.TaskClient, self.TASK)

    def test_multiengine(self):
        self.check(client.MultiEngineClient, self.MULTIENGINE)
        self.check(asyncclient.MultiEngineClient, self.MULTIENGINE)

    def test_pending_result(self):
        self.check(client.PendingResult, ["get_result"])
        from taskfarm.results import PendingResult

        self.check(PendingResult, ["get_result"])

    def test_clients_close_and_are_context_managers(self):
        for cls in (client.TaskClient, client.MultiEngineClient):
            self.assertTrue(callable(cls.__enter__) and callable(cls.__exit__))
            self.assertTrue(callable(cls.close))
        for cls in (asyncclient.TaskClient, asyncclient.MultiEngineClient):
            self.assertTrue(callable(cls.close))


class ErrorTypeTests(unittest.SynchronousTestCase):
    def test_wait_timeout_is_a_timeout_error(self):
        self.assertTrue(issubclass(errors.WaitTimeout, TimeoutError))
        self.assertTrue(issubclass(errors.WaitTimeout, errors.TaskfarmError))

    def test_client_closed_is_a_lost_connection(self):
        self.assertTrue(issubclass(errors.ClientClosed, errors.ConnectionLost))

    def test_stale_furl_is_a_furl_error(self):
        self.assertTrue(issubclass(errors.StaleFurl, errors.FurlError))

    def test_they_travel(self):
        for cls in (errors.WaitTimeout, errors.ClientClosed, errors.StaleFurl):
            back = errors.from_wire(errors.to_wire(cls("why")))
            self.assertIs(type(back), cls)
            self.assertEqual(str(back), "why")


class TrimTests(unittest.SynchronousTestCase):
    def raised(self) -> BaseException:
        try:
            raise errors.UnknownTask("no task")
        except errors.UnknownTask as e:
            return e

    def test_trimmed_drops_the_frames(self):
        self.patch(client.os, "environ", {})
        self.assertIsNone(client._trimmed(self.raised()).__traceback__)

    def test_full_tracebacks_keep_them(self):
        self.patch(client.os, "environ", {"TASKFARM_FULL_TRACEBACKS": "1"})
        self.assertIsNotNone(client._trimmed(self.raised()).__traceback__)
