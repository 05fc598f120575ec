"""Fixtures shared by all tests: factories of real processes, cleaned up at teardown, logs shown on failure."""

from __future__ import annotations

import pytest

from tests.harness import Backend, ManagedProcess, Proxy, log_alarms_since_last_check, stop_all


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
        for process in reversed(self._started):
            process.stop()


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the log tail of every process still managed, so the report shows what they said."""
    report = yield
    if report.failed:
        for process in ManagedProcess.live():
            report.sections.append((f"log tail: {process}", process.log_tail()))
    return report


def _fail_on_log_alarms(when: str) -> None:
    alarms = log_alarms_since_last_check()
    if alarms:
        shown = "\n".join(alarms[:20])
        pytest.fail(f"a process logged a traceback or an unhandled error {when}:\n{shown}", pytrace=False)


@pytest.fixture(autouse=True)
def no_traceback_in_process_logs():
    """Every test that starts processes: none of them may log a traceback or an unhandled error.

    Checked after each test, for what the processes logged during it (the log lines are named).
    """
    yield
    _fail_on_log_alarms("during this test")


@pytest.fixture(scope="module", autouse=True)
def no_traceback_at_module_teardown():
    """The same check for what module-scoped processes log while they stop, after the module's last test.

    Autouse fixtures are set up first and torn down last, so the factories have stopped their processes.
    """
    yield
    _fail_on_log_alarms("while stopping at the end of the module")


def pytest_sessionfinish(session, exitstatus):
    """Safety net: nothing started by the harness outlives the test run."""
    stop_all()


@pytest.fixture(scope="module")
def control_factory(process_log_dir):
    """``control_factory(state_dir=None, workload_cert_ttl=None, extra_args=...)`` -> a started
    :class:`~tests.harness.Control` (``twistd mesh-control``; ready: admin /ready answered 200).
    Module-scoped, like :func:`backend_factory`."""
    from tests.harness import Control

    factory = ProcessFactory(Control, process_log_dir)
    yield factory
    factory.stop_all()


@pytest.fixture
def kube_api(process_log_dir):
    """A started :class:`~tests.harness.kube.KubeAPI` (the test Kubernetes API server), stopped after the test."""
    from tests.harness.kube import KubeAPI

    with KubeAPI(log_dir=process_log_dir) as kube:
        yield kube
