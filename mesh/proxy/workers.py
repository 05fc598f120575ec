"""``twistd mesh-proxy --workers N``: N worker processes serving the same listeners.

The parent process (:class:`Supervisor`) serves no traffic.  It binds every
listening socket of the sidecar (outbound, inbound, each
``--outbound-tcp-port``, the health port) once per worker, with
``SO_REUSEPORT``, and hands worker *i* its own sockets, which it adopts
(``reactor.adoptStreamPort``): the kernel spreads new connections over the
workers, and since the parent keeps its copies, a worker that dies or
restarts loses no queued connection (docs/operations.md, "Worker processes",
says why this was chosen over one socket shared by all workers).

Each worker is a whole sidecar (:class:`mesh.proxy.service.ProxyService`) run
by ``twistd -n mesh-proxy`` with the parent's options; :data:`WORKER_ENV`
tells it that it is a worker, which descriptors to adopt, and its id.  Each
worker keeps its own config stream and workload certificate (its own session
with the control plane, node id ``...~wID``), so a push or a rotation reaches
every worker by itself.

The parent keeps the ports of the sidecar as a whole: the admin port
(``/ready``: ready when every worker is; ``/workers``; ``/stats/prometheus``;
the other pages are worker 1's) and the metrics port, where the counters and
histograms of all workers are merged (:func:`merge_metrics`).  Each worker
has a private admin port on loopback (also bound by the parent, so it stays
the same across restarts).

Signals: SIGTERM drains every worker (each as a single sidecar drains), SIGHUP
is passed on to every worker.  A worker that exits is logged and started
again.  Workers die with the parent (``PR_SET_PDEATHSIG``), even a killed one.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import internet, service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.client import Agent, readBody

from mesh.webpages import DeferredPage, LimitedSite, QuietSite, SiteLimits, socket_family

log = Logger()

#: The environment variable that makes ``twistd mesh-proxy`` a worker (JSON of :class:`WorkerSettings`).
WORKER_ENV = "MESH_PROXY_WORKER"
#: Seconds before a worker that exited is started again; doubled while it keeps dying young, up to the max.
RESTART_DELAY, RESTART_DELAY_MAX, YOUNG = 0.5, 10.0, 10.0
#: Seconds a worker gets after ``--drain-time`` before it is killed.
STOP_GRACE = 5.0
#: Gauges whose merged value is not the sum over the workers.
_GAUGE_MERGE = {"mesh_config_age_seconds": max, "mesh_workload_cert_expiry_seconds": min,
                "mesh_downstream_cx_overloaded": max}
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSettings:
    """What the parent tells a worker: its id (1..N), the listening descriptors it adopts by port,
    its private admin port's descriptor and the parent's pid."""

    id: int
    listen_fds: dict  # listener port -> inherited descriptor
    admin_fd: int
    parent_pid: int

    @classmethod
    def from_environ(cls, environ=os.environ):
        """The settings in :data:`WORKER_ENV`, or None in a process that is not a worker."""
        text = environ.get(WORKER_ENV)
        if not text:
            return None
        fields = json.loads(text)
        return cls(id=fields["id"], listen_fds={int(port): fd for port, fd in fields["listen_fds"].items()},
                   admin_fd=fields["admin_fd"], parent_pid=fields["parent_pid"])

    def to_environ(self) -> str:
        return json.dumps({"id": self.id, "listen_fds": self.listen_fds, "admin_fd": self.admin_fd,
                           "parent_pid": self.parent_pid})


def become_worker(worker: WorkerSettings) -> None:
    """Make this process die with its parent: SIGTERM (a drain) when the parent exits, however it exits.

    Exits at once if the parent is already gone (it died before this ran).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's stopService still stops its workers
        log.warn("worker {id}: cannot ask to die with the parent (no prctl)", id=worker.id)
    if os.getppid() != worker.parent_pid:
        sys.stderr.write(f"mesh-proxy worker {worker.id}: the parent (pid {worker.parent_pid}) is gone; exiting\n")
        raise SystemExit(1)


class AdoptedPort(service.Service):
    """Listens on a socket inherited from the parent (``reactor.adoptStreamPort``), as ``TCPServer`` listens on
    one it binds.  Stopping closes this process's copy only: the other workers keep accepting."""

    def __init__(self, reactor, fd: int, factory):
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port = None

    def startService(self):
        super().startService()
        self._port = self._reactor.adoptStreamPort(self._fd, socket_family(self._fd), self._factory)

    def stopService(self):
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None


def listening_socket(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (``SO_REUSEADDR``, backlog 1024, as Twisted binds), inheritable,
    with ``SO_REUSEPORT``: each worker has one of its own on the same port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen(1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


# -- merged metrics -------------------------------------------------------------------------------
def merge_metrics(texts) -> bytes:
    """The Prometheus text of several workers (``texts``) as one: samples with the same name and labels are
    added up (counters, histogram buckets, sums and counts, and most gauges; see :data:`_GAUGE_MERGE`)."""
    families = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = (Metric(family.name, family.documentation, family.type), {})
            combine = _GAUGE_MERGE.get(family.name, sum) if family.type == "gauge" else sum
            if family.type == "info":
                combine = _first
            values = merged[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = combine((values[key], sample.value)) if key in values else sample.value
    for metric, values in families.values():
        for (name, labels), value in values.items():
            metric.add_sample(name, dict(labels), value)
    return generate_latest(_Families([metric for metric, _values in families.values()]))


def _first(values):
    return values[0]


class _Families:
    """A collector of already-built metric families, for ``generate_latest``."""

    def __init__(self, metrics):
        self._metrics = metrics

    def collect(self):
        return self._metrics


# -- the parent -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SupervisorSettings:
    """The parent's part of the command line: how many workers, its ports, and how workers are run."""

    workers: int
    listeners: tuple  # (address, port) of each listener the workers share
    optional_listeners: tuple  # (address, port) shared if it can be bound (the health port)
    admin_port: int
    metrics_port: int  # 0: none
    metrics_address: str
    drain_time: float
    argv: tuple  # the twistd command line of a worker, without the program


class WorkerProcess(protocol.ProcessProtocol):
    """One running worker; tells the supervisor when it ends."""

    def __init__(self, supervisor, worker_id: int):
        self.supervisor = supervisor
        self.id = worker_id
        self.pid = None
        self.started_at = None
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.pid = self.transport.pid

    def processEnded(self, reason):
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


class Supervisor(service.MultiService):
    """The parent of ``--workers N``: binds the shared sockets, starts, watches and stops the workers, and
    serves the sidecar's admin and metrics ports (see the module docstring)."""

    def __init__(self, reactor, settings: SupervisorSettings):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        self.stopping = False
        self.processes = {}  # worker id -> WorkerProcess
        self.restarts = {worker_id: 0 for worker_id in range(1, settings.workers + 1)}
        self._delays = {worker_id: RESTART_DELAY for worker_id in self.restarts}
        self.sockets = {worker_id: self._bind(settings) for worker_id in self.restarts}
        self.admin_sockets = {worker_id: listening_socket("127.0.0.1", 0) for worker_id in self.restarts}
        self.admin_ports = {worker_id: sock.getsockname()[1] for worker_id, sock in self.admin_sockets.items()}
        self._agent = Agent(reactor)
        site = QuietSite(self._admin_root(), timeout=30)
        internet.TCPServer(settings.admin_port, site, interface="127.0.0.1").setServiceParent(self)
        if settings.metrics_port:
            internet.TCPServer(settings.metrics_port, LimitedSite(self._stats_root(), SiteLimits(), reactor=reactor),
                               interface=settings.metrics_address).setServiceParent(self)

    @staticmethod
    def _bind(settings) -> dict:
        """One worker's listening sockets, by port (``SO_REUSEPORT``: the kernel spreads the connections)."""
        sockets = {port: listening_socket(address, port) for address, port in settings.listeners}
        for address, port in settings.optional_listeners:
            try:
                sockets[port] = listening_socket(address, port)
            except OSError as error:
                log.error("cannot listen on {address}:{port} ({reason}): the workers try it themselves",
                          address=address, port=port, reason=error.strerror)
        return sockets

    # -- workers ----------------------------------------------------------------------------------
    def startService(self):
        super().startService()
        for worker_id in self.restarts:
            self._spawn(worker_id)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._signal_workers, signal.SIGHUP))

    def _spawn(self, worker_id: int):
        if self.stopping:
            return
        admin_fd = self.admin_sockets[worker_id].fileno()
        listen_fds = {port: sock.fileno() for port, sock in self.sockets[worker_id].items()}
        worker = WorkerSettings(worker_id, listen_fds, admin_fd, os.getpid())
        child_fds = {0: "w", 1: 1, 2: 2, admin_fd: admin_fd, **{fd: fd for fd in listen_fds.values()}}
        process = WorkerProcess(self, worker_id)
        process.started_at = self.reactor.seconds()
        self.processes[worker_id] = process
        argv = [sys.executable, *self.settings.argv]
        self.reactor.spawnProcess(process, sys.executable, argv, env={**os.environ, WORKER_ENV: worker.to_environ()},
                                  childFDs=child_fds)
        log.info("worker {id} started (pid {pid})", id=worker_id, pid=process.pid)

    def worker_ended(self, process: WorkerProcess, reason):
        """A worker exited: while running, log it and start another in its place after a delay."""
        if self.processes.get(process.id) is process:
            del self.processes[process.id]
        if self.stopping:
            log.info("worker {id} (pid {pid}) stopped", id=process.id, pid=process.pid)
            return
        delay = self._delays[process.id]
        young = self.reactor.seconds() - process.started_at < YOUNG
        self._delays[process.id] = min(delay * 2, RESTART_DELAY_MAX) if young else RESTART_DELAY
        self.restarts[process.id] += 1
        log.error("worker {id} (pid {pid}) exited ({reason}); starting another in {delay}s", id=process.id,
                  pid=process.pid, reason=reason, delay=delay)
        self.reactor.callLater(delay, self._spawn, process.id)

    def _signal_workers(self, signum: int):
        for process in list(self.processes.values()):
            try:
                process.transport.signalProcess(signum)
            except OSError:  # it just ended; worker_ended will see to it
                pass

    def stopService(self):
        """SIGTERM: every worker drains; those still running after ``--drain-time`` and a grace are killed."""
        self.stopping = True
        for sock in [sock for sockets in self.sockets.values() for sock in sockets.values()]:
            sock.close()  # the workers hold their own copies until they have drained
        ended = [process.ended for process in self.processes.values()]
        self._signal_workers(signal.SIGTERM)
        killer = self.reactor.callLater(self.settings.drain_time + STOP_GRACE, self._signal_workers, signal.SIGKILL)
        done = defer.gatherResults(ended)
        done.addBoth(lambda _: killer.cancel() if killer.active() else None)
        done.addCallback(lambda _: super(Supervisor, self).stopService())
        return done

    # -- the sidecar's admin and metrics ports -----------------------------------------------------
    def _admin_root(self):
        root = self._stats_root()
        root.putChild(b"ready", DeferredPage(self.readiness, b"application/json"))
        root.putChild(b"workers", DeferredPage(self.describe, b"application/json"))
        for name in (b"config_dump", b"clusters"):
            root.putChild(name, DeferredPage(lambda path=b"/" + name: self._worker_get(1, path), b"application/json"))
        return root

    def _stats_root(self):
        root = resource.Resource()
        stats = resource.Resource()
        root.putChild(b"stats", stats)
        stats.putChild(b"prometheus", DeferredPage(self.metrics, CONTENT_TYPE_LATEST.encode()))
        return root

    def _worker_get(self, worker_id: int, path: bytes):
        """``(status, body)`` of GET ``path`` on worker ``worker_id``'s admin port; ``(502, reason)`` if it fails."""
        url = b"http://127.0.0.1:%d%s" % (self.admin_ports[worker_id], path)
        answer = self._agent.request(b"GET", url)
        answer.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
        return answer.addErrback(lambda failure: (502, f"worker {worker_id}: {failure.getErrorMessage()}".encode()))

    @defer.inlineCallbacks
    def readiness(self):
        """``(status, body)`` of /ready: 200 when every worker answers its /ready with 200."""
        answers = yield defer.gatherResults([self._worker_get(worker_id, b"/ready") for worker_id in self.restarts])
        workers = {}
        for worker_id, (status, body) in zip(self.restarts, answers):
            workers[str(worker_id)] = json.loads(body) if status != 502 else {"ready": False, "reason": body.decode()}
        ready = not self.stopping and all(status == 200 for status, _body in answers)
        reason = {} if ready else {"reason": "draining" if self.stopping else "not every worker is ready"}
        return 200 if ready else 503, json.dumps({"ready": ready, "workers": workers, **reason}).encode()

    def describe(self):
        """``(status, body)`` of /workers: each worker's pid, admin port and restarts."""
        rows = [{"id": worker_id, "pid": self.processes[worker_id].pid if worker_id in self.processes else None,
                 "admin_port": self.admin_ports[worker_id], "restarts": self.restarts[worker_id]}
                for worker_id in self.restarts]
        return defer.succeed((200, json.dumps({"workers": rows}).encode()))

    @defer.inlineCallbacks
    def metrics(self):
        """``(status, body)`` of /stats/prometheus: every running worker's metrics, merged."""
        answers = yield defer.gatherResults([self._worker_get(worker_id, b"/stats/prometheus")
                                             for worker_id in sorted(self.processes)])
        texts = [body.decode() for status, body in answers if status == 200]
        if len(texts) < len(answers):
            log.warn("metrics: {missing} worker(s) did not answer; their counts are missing from this scrape",
                     missing=len(answers) - len(texts))
        return 200, merge_metrics(texts)
