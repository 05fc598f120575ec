"""The test harness plugin (tests/harness/plugin.py): loaded for every test, and its log check can fail.

The processes here are real (this interpreter with ``-c``), so the check reads a real log file.
"""

from __future__ import annotations

import sys

import pytest

from tests.harness import ManagedProcess, wait_for
from tests.harness.plugin import check_process_logs


def finished_process(tmp_path, name: str, code: str) -> ManagedProcess:
    """A harness process running *code*, once it has exited (its whole output is in its log)."""
    process = ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log").spawn()
    wait_for(lambda: not process.running, 10, what=f"{process} to exit")
    process.stop()
    return process


def test_every_test_gets_the_harness_fixtures_and_checks(request):
    """tests/conftest.py loads the plugin once, so a unit test sees the same fixtures and autouse checks."""
    assert request.config.pluginmanager.has_plugin("tests.harness.plugin")
    assert {"no_traceback_in_process_logs", "no_traceback_at_module_teardown"} <= set(request.fixturenames)


@pytest.mark.parametrize("code, alarm", [
    ("raise RuntimeError('boom from a harness test')", "Traceback (most recent call last)"),
    ("print('--- <exception caught here> --- Unhandled Error')", "Unhandled Error"),
])
def test_an_alarm_in_a_process_log_fails_the_test_once(tmp_path, code, alarm):
    process = finished_process(tmp_path, "alarming", code)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_process_logs("during this test")
    message = str(failed.value)
    assert "a process logged a traceback or an unhandled error during this test" in message
    assert f"process 'alarming' (pid {process.pid}): " in message and alarm in message
    check_process_logs("again")  # each line is reported once: the teardown check of this test passes


def test_a_clean_log_passes(tmp_path):
    finished_process(tmp_path, "quiet", "print('serving'); print('stopped')")
    check_process_logs("during this test")
