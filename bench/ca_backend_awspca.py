"""AWS Private CA (``--ca awspca``, plugins/txmesh-awspca), emulated by moto in server mode.

moto signs in-process with no network latency and no throttling, so the figure is mesh-control's
cost of going through the plugin (boto3, its threads, the GetCertificate poll), not AWS's: a real
CA adds its round trips and its quotas (IssueCertificate's rate is limited per account and region).
Set up as the tests do (tests/integration/test_awspca_support.py): an ACTIVE root CA in moto, moto's
endpoint and dummy credentials in mesh-control's environment.
"""

from __future__ import annotations

import contextlib

from bench.ca_backends import CABackend
from bench.procs import free_port
from tests.integration.test_awspca_support import aws_env, awspca_args, create_root_ca, pca_client


@contextlib.contextmanager
def backend(ws):
    """moto_server on a free loopback port (stopped with the workspace), with a root CA in it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = ws.start("moto", [ws.venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    moto.wait_for_http(f"{url}/moto-api/data.json")
    arn = create_root_ca(pca_client(url))
    yield CABackend(args=awspca_args(arn, "--awspca-concurrency", "16"), env=aws_env(url))
