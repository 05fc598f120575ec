"""The test harness as one pytest plugin, loaded for every test directory by tests/conftest.py.

Fixtures (module-scoped factories of real processes, stopped at the module's end):

- ``process_log_dir``: one directory per test module for the logs of the processes it starts
- ``backend_factory``, ``proxy_factory``, ``control_factory``: start a :class:`~tests.harness.Backend`,
  a :class:`~tests.harness.Proxy` (``twistd mesh-proxy``) or a :class:`~tests.harness.Control`
  (``twistd mesh-control``) and wait until it is ready
- ``kube_api``: the test Kubernetes API server, for one test

Checks, for every test:

- no process the harness started (:class:`~tests.harness.ManagedProcess`, whoever started it) may log a
  traceback or an unhandled error: :func:`check_process_logs`, run by an autouse teardown after each test
  and after each module (for what module-scoped processes log while they stop)
- a failed test's report shows the log tail of every process still running
- nothing started by the harness outlives the test run
"""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import pytest

from .backend import Backend
from .control import Control
from .kube import KubeAPI
from .processes import ManagedProcess, log_alarms_since_last_check, stop_all
from .proxy import Proxy

#: How many alarm lines a failure shows (a crash loop can log thousands).
SHOWN_ALARMS = 20


class ProcessFactory:
    """Calls ``cls(*args, log_dir=..., **kwargs).start()`` and remembers the process, to stop it at teardown."""

    def __init__(self, cls, log_dir):
        self._cls = cls
        self._log_dir = log_dir
        self._started: list[ManagedProcess] = []

    def __call__(self, *args, **kwargs):
        process = self._cls(*args, log_dir=self._log_dir, **kwargs)
        self._started.append(process)
        return process.start()

    def stop_all(self) -> None:
        """Stop the processes this factory started, newest first."""
        for process in reversed(self._started):
            process.stop()


def check_process_logs(when: str) -> None:
    """Fail the current test if a harness process logged a traceback or an unhandled error since the last check.

    *when* completes the message ("... logged a traceback {when}"); the offending lines are shown, each
    prefixed with the process that logged it. Each line is reported once.
    """
    alarms = log_alarms_since_last_check()
    if alarms:
        shown = "\n".join(alarms[:SHOWN_ALARMS])
        more = f"\n(and {len(alarms) - SHOWN_ALARMS} more)" if len(alarms) > SHOWN_ALARMS else ""
        pytest.fail(f"a process logged a traceback or an unhandled error {when}:\n{shown}{more}", pytrace=False)


@pytest.fixture(autouse=True)
def no_traceback_in_process_logs():
    """Every test that starts processes: none of them may log a traceback or an unhandled error.

    Checked after each test, for what the processes logged during it (the log lines are named).
    """
    yield
    check_process_logs("during this test")


@pytest.fixture(scope="module", autouse=True)
def no_traceback_at_module_teardown():
    """The same check for what module-scoped processes log while they stop, after the module's last test.

    Autouse fixtures are set up first and torn down last, so the factories have stopped their processes.
    """
    yield
    check_process_logs("while stopping at the end of the module")


@pytest.fixture
def fixed_ports_lock():
    """Hold, for one test, the machine-wide lock of the fixed loopback addresses the demo and the
    quickstart bind.  ``make test`` runs two pytest-xdist workers: a test that needs those addresses
    takes this lock (``flock`` on a file in the temp directory) first, so such tests run one at a time
    across workers, and its "ports are free" check then means what it says."""
    with open(Path(tempfile.gettempdir()) / "txmesh-tests-fixed-ports.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def process_log_dir(tmp_path_factory, request):
    """One directory per test module for the logs of the processes it starts."""
    return tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])


@pytest.fixture(scope="module")
def backend_factory(process_log_dir):
    """``backend_factory(name, port=None, address="127.0.0.1")`` -> a started :class:`~tests.harness.Backend`.

    Module-scoped: processes live until the module's last test (call ``.stop()`` to end one sooner).
    """
    factory = ProcessFactory(Backend, process_log_dir)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def proxy_factory(process_log_dir):
    """``proxy_factory(config_dir, workload, namespace=..., app_port=..., labels=..., extra_args=...)``
    -> a started :class:`~tests.harness.Proxy` (ready: admin /ready answered 200). Module-scoped, like
    :func:`backend_factory`."""
    factory = ProcessFactory(Proxy, process_log_dir)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def control_factory(process_log_dir):
    """``control_factory(state_dir=None, workload_cert_ttl=None, extra_args=...)`` -> a started
    :class:`~tests.harness.Control` (``twistd mesh-control``; ready: admin /ready answered 200).
    Module-scoped, like :func:`backend_factory`."""
    factory = ProcessFactory(Control, process_log_dir)
    yield factory
    factory.stop_all()


@pytest.fixture
def kube_api(process_log_dir):
    """A started :class:`~tests.harness.kube.KubeAPI` (the test Kubernetes API server), stopped after the test."""
    with KubeAPI(log_dir=process_log_dir) as kube:
        yield kube


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the log tail of every process still managed, so the report shows what they said."""
    report = yield
    if report.failed:
        for process in ManagedProcess.live():
            report.sections.append((f"log tail: {process}", process.log_tail()))
    return report


def pytest_sessionfinish(session, exitstatus):
    """Safety net: nothing started by the harness outlives the test run."""
    stop_all()
