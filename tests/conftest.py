"""The root conftest: it only loads the test harness, one pytest plugin for every test directory.

Fixtures and checks live in :mod:`tests.harness.plugin` (process factories, the "no traceback in a
process log" teardown, log tails in failure reports); helpers to import live in :mod:`tests.harness`.
"""

pytest_plugins = ["tests.harness.plugin"]
