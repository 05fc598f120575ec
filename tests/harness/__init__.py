"""Integration-test harness: real processes on loopback, real clients, deadlines instead of sleeps.

- :func:`free_port`, :func:`wait_for`, :func:`http_request`, :func:`connections_to`
- :class:`ManagedProcess` and its kinds :class:`Backend` (the demo app) and :class:`Proxy` (``twistd mesh-proxy``)
- :func:`curl` and :class:`CurlResult`, the real curl binary
- :class:`KubeAPI`: the faithful test Kubernetes API server (:mod:`tests.harness.kubeapi`) as a process
- :class:`RawConnection`: exact bytes over a socket (malformed HTTP, pipelining, WebSocket frames)
- :func:`venv_dir` / :func:`venv_bin`: where programs run from ($MESH_VENV, else <repo>/.venv, else sys.prefix)

The pytest plugin :mod:`tests.harness.plugin` (loaded by tests/conftest.py for every test) builds its
fixtures (``backend_factory``, ``proxy_factory``, ``control_factory``, ``kube_api``) and its checks on these;
:mod:`tests.harness.netns` holds the helpers of the end-to-end tests in network namespaces;
:mod:`tests.harness.config_yaml` loads, validates and compiles config written as YAML in a unit test.
"""

from .backend import Backend, pattern_sha256
from .control import Control
from .curl import CurlResult, curl
from .kube import KubeAPI
from .net import ThreadedSocketServer, closed_by_peer, connections_to, free_port, http_request
from .processes import (
    REPO_ROOT,
    ManagedProcess,
    ProcessExitedError,
    log_alarms_since_last_check,
    stop_all,
    venv_bin,
    venv_dir,
)
from .proxy import Proxy
from .rawhttp import RawConnection, RawResponse
from .waiting import wait_for

__all__ = [
    "REPO_ROOT", "Backend", "Control", "CurlResult", "KubeAPI", "ManagedProcess", "ProcessExitedError", "Proxy",
    "RawConnection", "RawResponse", "ThreadedSocketServer", "closed_by_peer", "connections_to", "curl", "free_port",
    "http_request",
    "log_alarms_since_last_check",
    "pattern_sha256", "stop_all", "venv_bin", "venv_dir", "wait_for",
]
