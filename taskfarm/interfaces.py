"""The zope interfaces between taskfarm's parts.

The controller's logic talks to engines through `IEngineChannel` and to its
scheduler through `IScheduler`; both have a Foolscap implementation
(`taskfarm.remote`) and an in-process one (`taskfarm.testing`).  An engine
reaches its controller through `IControllerLink` and a client through
`IControllerDialer`; the retry and back-off policy over them lives with
their callers (`taskfarm.engine.link`, `taskfarm.connection`).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IScheduler(Interface):
    """Decides which queued task runs on which engine.

    Tasks are the controller's task records (`taskid`, `spec.priority`,
    `spec.depend`, `is_queued`); engines are registry handles
    (`engine_id`, `properties`, `properties_version`, `task_slots`).
    """

    ntasks = Attribute("How many tasks are queued.")
    nengines = Attribute("How many engines the scheduler knows.")

    def add_task(task):
        """Queue a task record."""

    def remove_task(task):
        """Forget a queued task (it was aborted or failed while queued)."""

    def add_engine(engine):
        """Start giving tasks to an engine, up to its `task_slots` at once."""

    def remove_engine(engine_id):
        """Stop giving tasks to an engine."""

    def resize(engine_id, slots):
        """Let the engine hold `slots` tasks at once from now on."""

    def release(engine_id):
        """One task given to this engine has finished; its slot is free."""

    def schedule():
        """Pair free engine slots with tasks; return ``[(engine, task)]``."""

    def unmet_groups():
        """Depend groups with queued tasks that no known engine accepts.

        A group counts only once every engine's verdict is known and False.
        Returns ``[(key, [task, ...])]``; empty when no engine is known.
        """

    def broken_groups():
        """Depend groups whose predicate can never be loaded.

        Returns ``[(key, reason, [task, ...])]``; the controller fails those
        tasks with `DependError` (and removes them).
        """

    def watch(callback):
        """Call ``callback()`` whenever `schedule` or `broken_groups` may give
        more than before (depend verdicts arrived)."""


class IPredicateEvaluator(Interface):
    """Evaluates `depend` predicates away from the controller's reactor.

    A verdict is a `taskfarm.controller.predicates.Verdict`: whether the
    predicate accepted the properties, why not when it failed (raised,
    timed out, killed its process) and whether it could be loaded at all.
    """

    def evaluate(key, properties, trace=False):
        """A Deferred firing with the `Verdict` of the pickled predicate `key`
        on the `properties` dict.  It never fires synchronously and never
        fails; every call ends within the evaluator's timeout.  With
        `trace`, the verdict's `read` names the properties the predicate
        read (``tc.why`` asks for that; scheduling never does)."""

    def start():
        """Get ready to evaluate (start processes)."""

    def stop():
        """Stop; a Deferred that fires soon.  Calls in flight get a False verdict."""


class IEngineChannel(Interface):
    """The controller's end of the link to one engine."""

    def send(commands, packed=None):
        """Send a list of ``(seq, op, args)`` commands, in order; `packed`,
        when given, is that list already packed (`serialization.pack`)."""

    def interrupt(seq):
        """Ask the engine to stop command `seq` if it is running or queued."""

    def set_properties(blob):
        """Give the engine its pickled properties (kept for re-registration)."""

    def ping(on_answer):
        """Check the engine is alive; call `on_answer()` when it answers."""

    def cancel(seqs):
        """Ask the engine to drop these commands if they are still queued."""

    def disconnect():
        """Drop the link; the engine counts as lost."""


class IEngineSink(Interface):
    """What an engine's link delivers to the controller."""

    def replies(engine, replies):
        """A batch of ``(seq, ok, data, started, finished)`` replies from the
        engine with this handle (stale handles are ignored)."""

    def engine_lost(engine, reason):
        """The link of the engine with this handle broke."""


class IJournal(Interface):
    """Where the controller's tasks are kept across restarts.

    `taskfarm.controller.journal.Journal` writes them to SQLite;
    `NullJournal` keeps nothing and commits at once, so the controller has
    one code path with or without a journal.  Writes are enqueued from the
    reactor and never block it.
    """

    path = Attribute("The journal's file, or None when nothing is kept.")

    def incarnation():
        """This journal's identity: the same across restarts of one journal."""

    def next_id():
        """The first task id never handed out."""

    def tasks():
        """Every stored task (`StoredTask`), in id order."""

    def tokens():
        """Stored submission tokens (token, first id, count, digest), oldest first."""

    on_result_durable = Attribute(
        "Set by the store: called in the reactor with the ids of tasks whose"
        " big results are durable in their own files (never, if none is kept)."
    )

    def stored_data(stored):
        """A stored task's outcome bytes (or list of bytes)."""

    def stored_result(stored):
        """Like `stored_data`, or a `StoredResult` for a result left in its file."""

    def read_result(taskid):
        """A Deferred with the result kept in task `taskid`'s file, read off
        the reactor thread; `JournalError` if it cannot be read."""

    def accept_batch(rows, token=None):
        """Journal one submission: an iterable of (taskid, envelope,
        submitted, retries) rows and its token row; a Deferred that fires
        once committed or fails with `JournalError` (the batch is refused)."""

    def next_id_is(next_id):
        """The id counter moved on."""

    def requeued(taskid, link, retries_left, attempts):
        """A task went back to the queue."""

    def finished(record, link):
        """A task reached its final state."""

    def cleared(taskids):
        """These tasks are forgotten."""

    def forget_tokens(older_than):
        """Drop submission tokens created before `older_than`."""

    def sync():
        """A Deferred that fires once everything written so far is committed."""

    def close():
        """Write what is pending, then close."""

    def stop():
        """Write what is pending and close, off the reactor thread; a
        Deferred that fires once closed (the service tree's stop)."""


class IEngineCommands(Interface):
    """Where an engine's transport delivers what the controller sends."""

    def receive(commands):
        """A list of ``(seq, op, args)`` commands, to run in order."""

    def interrupt(seq):
        """Stop command `seq` if it is queued or running."""

    def cancel(seqs):
        """Drop these commands if they are still queued."""

    def set_properties(properties):
        """The engine's properties (a dict) as the controller now has them."""


class IEngineSession(Interface):
    """One registration of an engine with its controller."""

    engine_id = Attribute("The id the controller gave this engine.")
    max_message_size = Attribute("The controller's message limit, learnt at hello.")
    location = Attribute("Where the controller is (host:port), safe to print.")

    def send_replies(packed):
        """Send one packed list of ``(seq, ok, data, started, finished)``
        replies; returns False when the link is already gone."""

    def notify_on_disconnect(callback):
        """Call ``callback()`` once when this session's link breaks."""


class IControllerLink(Interface):
    """An engine's transport to its controller: connect, hello, register.

    Holds no policy: the caller (`taskfarm.engine.link.EngineLink`) retries
    and backs off.  The Foolscap one is `taskfarm.remote.engine`.
    """

    def start():
        """Get ready to connect (start the Tub)."""

    def stop():
        """Close every connection; a Deferred."""

    def register(furl, commands, properties, requested_id):
        """Connect to the engine furl, check its hello, register.

        `commands` provides `IEngineCommands`; `properties` is a dict.
        A Deferred firing with an `IEngineSession`, or failing with
        `WrongInterface` (not the engine furl), `ControllerUnreachable`
        or the transport's error.
        """


class IControllerReference(Interface):
    """A client's live reference to one controller interface."""

    location = Attribute("Where the controller is (host:port), safe to print.")

    def hello():
        """A Deferred firing with the interface's `wire.Hello` (parsed, so
        failing with `ProtocolVersionError` for another wire version or
        `BadRequest` for a malformed one; not checked for which interface)."""

    def call(method, *args):
        """Call `method`: a Deferred firing with its value, or failing with
        `ConnectionLost` (the link broke), `MessageTooLarge`, `BadRequest`
        or the controller's own typed error."""

    def notify_on_disconnect(callback):
        """Call ``callback()`` once when the link breaks."""

    def disconnect():
        """Close the link."""


class IControllerDialer(Interface):
    """How a client reaches a controller (Foolscap: `taskfarm.remote.client`)."""

    def connect(furl, timeout):
        """A Deferred firing with an `IControllerReference` for `furl`, or
        failing with `ControllerUnreachable` within `timeout` seconds."""


class IEngineLauncher(Interface):
    """Starts engines somewhere (this machine, ssh hosts, MPI ranks, batch
    jobs), notices when one ends, and stops every one it started.

    The engines find the controller through the engine furl file; how the
    furl reaches them is the launcher's business (never in an argv or an
    environment).  A launcher only starts and stops processes or jobs:
    registration is the controller's, and `Cluster` waits for it.
    """

    name = Attribute("The launcher's name: 'local', 'ssh', 'mpiexec', 'slurm', 'pbs' ...")
    remote = Attribute(
        "True when engines run on other machines: the controller must then "
        "listen on an address they can reach (not loopback)."
    )

    def start(count, furl_file, engine_options):
        """Start `count` engines with these extra ``taskengine`` options; a
        Deferred that fires once they were started (not yet registered)
        and fails with `ClusterError` naming the problem."""

    def stop():
        """Stop every engine this launcher started, on every node, and leave
        no process or job behind; a Deferred, never failing."""

    def watch(callback):
        """Call ``callback(label, reason)`` each time one of its engines
        ends (`label` names it: 'node1 engine 2', 'job 1234_3' ...)."""

    def describe():
        """What `taskfarm status` shows and `taskfarm stop` needs, as plain
        data: a list of dicts with at least 'label', 'host', and 'pid' or
        'job' for each engine process or job it holds now."""
