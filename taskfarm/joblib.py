"""A joblib parallel backend over the Task interface, registered as
``"taskfarm"`` when this module is imported.

    import joblib
    import taskfarm.joblib  # noqa: F401  (registers the backend)

    with joblib.parallel_config(backend="taskfarm", client=tc):
        squares = joblib.Parallel(n_jobs=-1)(joblib.delayed(pow)(i, 2) for i in range(100))

Each joblib batch is one function task, sent through a `TaskExecutor` of
the blocking `client` (or of a client this backend connects to
`furl_or_file` itself, the default profile if neither is given).
``n_jobs=-1`` (or None) means one job per registered engine.  joblib itself
is needed only here (``pip install joblib``).
"""

from __future__ import annotations

import joblib
from joblib.parallel import ParallelBackendBase

#: The name the backend is registered under.
BACKEND_NAME = "taskfarm"


class TaskfarmBackend(ParallelBackendBase):
    """joblib's `ParallelBackendBase` on a taskfarm cluster; `task_options`
    (retries, depend ...) are every batch task's options."""

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1

    def __init__(self, client=None, furl_or_file=None, nesting_level=None,
                 inner_max_num_threads=None, **task_options) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._client = client
        self._furl_or_file = furl_or_file
        self._own_client = None
        self._task_options = task_options
        self._executor = None

    def __reduce__(self):
        # joblib pickles the backend with each batch; the engine needs none of it.
        return (TaskfarmBackend, ())

    def _task_client(self):
        if self._client is None:
            if self._own_client is None:
                from taskfarm.client import TaskClient

                self._own_client = TaskClient(self._furl_or_file)
            return self._own_client
        return self._client

    def effective_n_jobs(self, n_jobs) -> int:
        """`n_jobs` if positive; for -1 or None, the number of engines (at least 1)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            return max(1, len(self._task_client().engine_ids()))
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, **backend_kwargs) -> int:
        """Start an executor for this `Parallel` call; its number of jobs."""
        self.parallel = parallel
        n = self.effective_n_jobs(n_jobs)
        if self._executor is None:
            self._executor = self._task_client().executor(**self._task_options)
        return n

    def submit(self, func, callback=None):
        """Send one batch as a task; its future (joblib's callback runs when it is done)."""
        future = self._executor.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future):
        """The batch's results (its failure, raised)."""
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Abort every unfinished batch (a batch failed)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)

    def terminate(self) -> None:
        """End the executor (and the client this backend made)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        client, self._own_client = self._own_client, None
        if client is not None:
            client.close()


def register() -> None:
    """Register the backend as ``"taskfarm"`` (done at import)."""
    joblib.register_parallel_backend(BACKEND_NAME, TaskfarmBackend)


register()
