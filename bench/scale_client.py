"""Many lightweight config-stream sessions in one Twisted process (a load generator of bench/scale.py).

Each session is a real proxy as far as mesh-control can tell: its own ECDSA key and workload
certificate (signed here with the CA key of the control plane's state directory, as only a bench or
a test may), mutual TLS to :15012 verifying the control plane's SPIFFE id, the magic ``TXM1``, HELLO,
and an ACK for every SNAPSHOT.  A session reads only the ``version`` of a SNAPSHOT (no JSON parse, no
compile): a real proxy decodes and compiles its one snapshot in its own process, while this process
stands in for hundreds, and the bench measures the control plane.

bench/scale.py runs several of these processes (``--offset`` and ``--sessions`` give each its share)
and drives them with one command per line on stdin; each answers one JSON line on stdout:

It says ``{"loaded": true}`` once it has read the CA, then ``{"ready": true, ...}`` once it has made
the certificates.  The commands:

- ``connect``: open every session (``--concurrency`` handshakes at a time), each until its first
  SNAPSHOT -> ``{"connected", "failures", "started", "finished", "cpu_s"}`` (wall-clock times, and the
  CPU seconds the process spent on it);
- ``quiet SECONDS``: wait until no SNAPSHOT came for SECONDS -> ``{"quiet": wall time of the last one}``;
- ``change T0``: wait until every session ACKed a SNAPSHOT received after wall time T0, then until
  quiet for ``--settle`` s -> the per-session latencies and counts (:func:`change_result`);
- ``exit``.

    python -m bench.scale_client --control 127.0.0.1:15012 --state-dir STATE --sessions 250 --offset 250
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, protocol, stdio, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.protocols.basic import LineReceiver

from mesh import protocol as proto
from mesh.identity.agent import VerifyControlPlane, make_csr
from mesh.identity.ca import CertificateAuthority

CHANGED_FILE = "zz-scale-change.yaml"


def change_document(step: int, namespace: str = "scale-config") -> dict:
    """A VirtualService exported to every namespace (so every session's snapshot changes) with a new timeout."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "scale-change", "namespace": namespace},
            "spec": {"hosts": ["scale-change.example"], "exportTo": ["*"],
                     "http": [{"timeout": f"{step + 1}s",
                               "route": [{"destination": {"host": "svc-0.scale-config.svc.cluster.local"}}]}]}}


def write_change(config_dir: str, step: int) -> float:
    """Write the change file atomically; return the wall-clock time just before the rename."""
    import yaml
    path = os.path.join(config_dir, CHANGED_FILE)
    temporary = os.path.join(config_dir, ".scale-change.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(yaml.safe_dump(change_document(step), sort_keys=False))
    started = time.time()
    os.replace(temporary, path)
    return started


_VERSION = b'"version":"'


def snapshot_version(body: bytes) -> str | None:
    """The version of a SNAPSHOT frame body, read without parsing its JSON; None for another message.

    The encoder sorts keys: ``resources`` opens a SNAPSHOT and the last unescaped ``"version":"`` is
    the message's own (the ``warnings`` after it are strings, whose quotes are escaped).
    """
    if not body.startswith(b'{"resources":'):
        return None
    start = body.rfind(_VERSION) + len(_VERSION)
    return body[start:body.index(b'"', start)].decode()


class Session(proto.MessageStream):
    """One fake proxy: HELLO, then ACK every SNAPSHOT and note when."""

    receives = (proto.SNAPSHOT, proto.PING, proto.PONG)
    peer_name = "control plane"

    def __init__(self, reactor, spec, clock):
        super().__init__(reactor)
        self.spec = spec
        self.clock = clock  # shared by the sessions of this process: the time of the last SNAPSHOT
        self.acks = []  # (wall time of the ACK, version, snapshot bytes)
        self.lost = None

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(proto.MAGIC)
        self.send(proto.HELLO, **self.spec.hello)
        self.spec.session = self

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        self.lost = self.closed_reason or reason.getErrorMessage()

    def stringReceived(self, body):
        version = snapshot_version(body)
        if version is None:
            super().stringReceived(body)
            return
        self.last_seen = self.reactor.seconds()
        self.send(proto.ACK, version=version)
        now = time.time()
        self.acks.append((now, version, len(body)))
        self.clock.last_snapshot = now


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, reactor, spec, clock):
        self.reactor = reactor
        self.spec = spec
        self.clock = clock

    def buildProtocol(self, addr):
        return Session(self.reactor, self.spec, self.clock)


def node_name(index: int, namespaces: int) -> str:
    """The node id of session ``index``."""
    return f"scale-{index}.scale-{index % namespaces}~bench~{index}"


def make_specs(ca, indices, namespaces: int, endpoints: bool, trust_domain: str) -> list:
    """One identity, key and certificate per session index (namespace ``scale-<i % namespaces>``)."""
    specs = []
    for index in indices:
        namespace = f"scale-{index % namespaces}"
        service_account = f"sa-{index}"
        uri = f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem, chain_pem = ca.sign(x509.load_pem_x509_csr(make_csr(key, uri)), uri, 24 * 3600)
        chain = x509.load_pem_x509_certificates(cert_pem + chain_pem)
        hello = {"node": node_name(index, namespaces), "workload": f"w-{index}",
                 "namespace": namespace, "service_account": service_account,
                 "labels": {"app": f"svc-{index % 10}", "bench": "scale"}, "address": "127.0.0.1",
                 "inbound_port": 20000 + index if endpoints else None,
                 "app_port": 8080 if endpoints else None, "version": ""}
        specs.append(types.SimpleNamespace(index=index, uri=uri, hello=hello,
                                           credentials=types.SimpleNamespace(key=key, chain=chain),
                                           session=None))
    return specs


async def connect_all(reactor, specs, host, port, bundle, control_identity, concurrency: int, clock,
                      pace: float = 0.0):
    """Open every session, ``concurrency`` handshakes at a time (with ``pace``: one every ``pace``
    seconds instead); returns the failures."""
    failures = []
    semaphore = defer.DeferredSemaphore(concurrency)

    async def one(spec):
        creator = VerifyControlPlane(bundle, control_identity, host, client_credentials=spec.credentials)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, host, port, timeout=30))
        try:
            await endpoint.connect(_Factory(reactor, spec, clock))
        except Exception as error:
            failures.append(f"session {spec.index}: {error}")
            return
        # wait for the first snapshot (HELLO answered): the handshake and HELLO are really done
        while spec.session is not None and not spec.session.acks and spec.session.lost is None:
            await task.deferLater(reactor, 0.01)

    if pace:
        opening = []
        for spec in specs:
            opening.append(defer.ensureDeferred(one(spec)))
            await task.deferLater(reactor, pace)
        await defer.gatherResults(opening)
    else:
        await defer.gatherResults([semaphore.run(lambda s=spec: defer.ensureDeferred(one(s))) for spec in specs])
    return failures


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    times = os.times()
    return times.user + times.system


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


async def wait_quiet(reactor, clock, seconds: float, timeout: float) -> float:
    """Wait until no SNAPSHOT came for ``seconds`` (at most ``timeout``); the wall time of the last one."""
    deadline = reactor.seconds() + timeout
    while time.time() - clock.last_snapshot < seconds and reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.05)
    return clock.last_snapshot


async def change_result(reactor, sessions, t0: float, options, clock) -> dict:
    """Wait for every session's ACK of a SNAPSHOT received after ``t0``, then for quiet; the figures.

    ``latencies``: per session, from ``t0`` to the ACK of the last snapshot received since (the one in
    force); ``extra_pushes``: snapshots beyond one per session; ``missing``: sessions without any.
    """
    deadline = reactor.seconds() + options.timeout
    while reactor.seconds() < deadline:
        if all(session.acks and session.acks[-1][0] >= t0 for session in sessions):
            break
        await task.deferLater(reactor, 0.005)
    await wait_quiet(reactor, clock, options.settle, options.timeout)  # catch a second push, if any
    latencies, versions, sizes, missing, extra = [], set(), [], 0, 0
    for session in sessions:
        new = [ack for ack in session.acks if ack[0] >= t0]
        if not new:
            missing += 1
            continue
        extra += len(new) - 1
        latencies.append(round(new[-1][0] - t0, 4))
        versions.add(new[-1][1])
        sizes.append(new[-1][2])
    return {"acked": len(latencies), "missing": missing, "extra_pushes": extra,
            "lost": sum(1 for session in sessions if session.lost is not None), "versions": sorted(versions),
            "snapshot_bytes": max(sizes) if sizes else None, "latencies": latencies}


class Worker:
    """The command loop of one client process (see the module doc)."""

    def __init__(self, reactor, options):
        self.reactor = reactor
        self.options = options
        self.clock = types.SimpleNamespace(last_snapshot=0.0)
        self.done = defer.Deferred()
        self.output = None  # the stdio transport
        self.ca = None
        self.specs = []

    def start(self, output) -> None:
        """Load the CA (say ``loaded``: loading rewrites the trust bundle file, so the coordinator
        starts the next process only then), make the sessions' certificates, then say ``ready``."""
        self.output = output
        self.ca = CertificateAuthority.load_or_create(self.options.state_dir, self.options.trust_domain)
        self.reply({"loaded": True})
        started = time.time()
        indices = range(self.options.offset, self.options.offset + self.options.sessions)
        self.specs = make_specs(self.ca, indices, self.options.namespaces, self.options.endpoints,
                                self.options.trust_domain)
        self.reply({"ready": True, "certificates_s": round(time.time() - started, 3)})

    def reply(self, document: dict) -> None:
        """One JSON line on stdout (the coordinator waits for it)."""
        self.output.write(json.dumps(document).encode() + b"\n")

    @property
    def sessions(self) -> list:
        return [spec.session for spec in self.specs if spec.session is not None and spec.session.lost is None]

    def command(self, line: str) -> None:
        """Run one command; its JSON answer goes to stdout when it is done."""
        word, _, argument = line.strip().partition(" ")
        if word == "exit":
            self.done.callback(None)
            return
        handler = {"connect": self.connect, "quiet": self.quiet, "change": self.change}.get(word)
        if handler is None:
            self.reply({"error": f"unknown command {line.strip()!r}"})
            return
        d = defer.ensureDeferred(handler(argument))
        d.addCallbacks(self.reply, lambda failure: self.reply({"error": failure.getErrorMessage()}))

    async def connect(self, _):
        host, _, port = self.options.control.rpartition(":")
        control_identity = f"spiffe://{self.options.trust_domain}/ns/mesh-system/sa/mesh-control"
        started, cpu = time.time(), cpu_seconds()
        failures = await connect_all(self.reactor, self.specs, host, int(port), list(self.ca.bundle),
                                     control_identity, self.options.concurrency, self.clock, self.options.pace)
        return {"connected": len(self.sessions), "failures": failures[:10], "started": started,
                "finished": time.time(), "cpu_s": cpu_seconds() - cpu}

    async def quiet(self, seconds):
        return {"quiet": await wait_quiet(self.reactor, self.clock, float(seconds), self.options.timeout)}

    async def change(self, t0):
        return await change_result(self.reactor, self.sessions, float(t0), self.options, self.clock)


class _Commands(LineReceiver):
    """stdin: one command a line, to the worker."""

    delimiter = b"\n"

    def __init__(self, worker):
        self.worker = worker

    def lineReceived(self, line):
        self.worker.command(line.decode())

    def connectionLost(self, reason=protocol.connectionDone):
        if not self.worker.done.called:  # the coordinator went away
            self.worker.done.callback(None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, help="HOST:PORT of mesh-control's :15012")
    parser.add_argument("--state-dir", required=True, help="the control plane's state dir (its CA key)")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--sessions", type=int, default=500, help="sessions of this process")
    parser.add_argument("--offset", type=int, default=0, help="index of this process's first session")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--endpoints", action="store_true",
                        help="announce an inbound listener: every session is a registry endpoint")
    parser.add_argument("--concurrency", type=int, default=25, help="TLS handshakes in flight while connecting")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="open one session every PACE seconds (a steady stream) instead of --concurrency")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up waiting after this long")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds without a SNAPSHOT that mean quiet")
    options = parser.parse_args(argv)

    def go(reactor):
        worker = Worker(reactor, options)
        commands = _Commands(worker)
        stdio.StandardIO(commands, reactor=reactor)
        worker.start(commands.transport)
        return worker.done

    task.react(go)


if __name__ == "__main__":
    main()
