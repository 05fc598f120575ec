"""Many lightweight config-stream sessions in one Twisted process (the load generator of bench/scale.py).

Each session is a real proxy as far as mesh-control can tell: its own ECDSA key and workload
certificate (signed here with the CA key of the control plane's state directory, as only a bench or
a test may), mutual TLS to :15012 verifying the control plane's SPIFFE id, the magic ``TXM1``, HELLO,
and an ACK for every SNAPSHOT (no compile: the bench measures the control plane, not the proxy).

Then, ``--changes`` times: rewrite one file of ``--config-dir`` (atomically, with a rename) so that
every session's snapshot changes, and record when each session ACKs a snapshot received after the
write.  The result, on stdout, is one JSON document (see :func:`main`).

    python -m bench.scale_client --control 127.0.0.1:15012 --state-dir STATE --config-dir DIR \
        --sessions 500 --changes 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

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


class Session(proto.MessageStream):
    """One fake proxy: HELLO, then ACK every SNAPSHOT and note when."""

    receives = (proto.SNAPSHOT, proto.PING, proto.PONG)
    peer_name = "control plane"

    def __init__(self, reactor, spec):
        super().__init__(reactor)
        self.spec = spec
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
        self._size = len(body)
        super().stringReceived(body)

    def msg_SNAPSHOT(self, msg):
        self.send(proto.ACK, version=msg["version"])
        self.acks.append((time.time(), msg["version"], self._size))


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, reactor, spec):
        self.reactor = reactor
        self.spec = spec

    def buildProtocol(self, addr):
        return Session(self.reactor, self.spec)


def make_specs(ca, count: int, namespaces: int, endpoints: bool, trust_domain: str) -> list:
    """One identity, key and certificate per session (namespace ``scale-<i % namespaces>``)."""
    specs = []
    for index in range(count):
        namespace = f"scale-{index % namespaces}"
        service_account = f"sa-{index}"
        uri = f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem, chain_pem = ca.sign(x509.load_pem_x509_csr(make_csr(key, uri)), uri, 24 * 3600)
        chain = x509.load_pem_x509_certificates(cert_pem + chain_pem)
        hello = {"node": f"scale-{index}.{namespace}~bench~{index}", "workload": f"w-{index}",
                 "namespace": namespace, "service_account": service_account,
                 "labels": {"app": f"svc-{index % 10}", "bench": "scale"}, "address": "127.0.0.1",
                 "inbound_port": 20000 + index if endpoints else None,
                 "app_port": 8080 if endpoints else None, "version": ""}
        specs.append(types.SimpleNamespace(index=index, uri=uri, hello=hello,
                                           credentials=types.SimpleNamespace(key=key, chain=chain),
                                           session=None))
    return specs


async def connect_all(reactor, specs, host, port, bundle, control_identity, concurrency: int):
    """Open every session, ``concurrency`` handshakes at a time; returns the failures."""
    failures = []
    semaphore = defer.DeferredSemaphore(concurrency)

    async def one(spec):
        creator = VerifyControlPlane(bundle, control_identity, host, client_credentials=spec.credentials)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, host, port, timeout=30))
        try:
            await endpoint.connect(_Factory(reactor, spec))
        except Exception as error:
            failures.append(f"session {spec.index}: {error}")
            return
        # wait for the first snapshot (HELLO answered): the handshake and HELLO are really done
        while spec.session is not None and not spec.session.acks and spec.session.lost is None:
            await task.deferLater(reactor, 0.01)

    await defer.gatherResults([semaphore.run(lambda s=spec: defer.ensureDeferred(one(s))) for spec in specs])
    return failures


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


async def run(reactor, options):
    ca = CertificateAuthority.load_or_create(options.state_dir, options.trust_domain)
    host, _, port = options.control.rpartition(":")
    started = time.time()
    specs = make_specs(ca, options.sessions, options.namespaces, options.endpoints, options.trust_domain)
    certs_s = time.time() - started
    control_identity = f"spiffe://{options.trust_domain}/ns/mesh-system/sa/mesh-control"
    started = time.time()
    failures = await connect_all(reactor, specs, host, int(port), list(ca.bundle), control_identity,
                                 options.concurrency)
    connect_s = time.time() - started
    sessions = [spec.session for spec in specs if spec.session is not None and spec.session.lost is None]
    result = {"sessions": options.sessions, "connected": len(sessions), "connect_failures": failures[:10],
              "certificates_s": round(certs_s, 3), "connect_s": round(connect_s, 3), "changes": []}
    if len(sessions) != options.sessions:
        return result
    await task.deferLater(reactor, options.settle)  # registry pushes after the last HELLO settle
    for step in range(options.changes):
        before = [len(session.acks) for session in sessions]
        t0 = write_change(options.config_dir, step + options.step_offset)
        deadline = reactor.seconds() + options.timeout
        while reactor.seconds() < deadline:
            if all(len(s.acks) > n for s, n in zip(sessions, before)):
                break
            await task.deferLater(reactor, 0.005)
        await task.deferLater(reactor, options.settle)  # catch a second push, if any
        latencies, versions, sizes, missing, extra = [], set(), [], 0, 0
        for session, count in zip(sessions, before):
            new = [ack for ack in session.acks[count:] if ack[0] >= t0]
            if not new:
                missing += 1
                continue
            extra += len(new) - 1
            latencies.append(new[-1][0] - t0)  # the last snapshot since the change is the one in force
            versions.add(new[-1][1])
            sizes.append(new[-1][2])
        lost = sum(1 for session in sessions if session.lost is not None)
        result["changes"].append({
            "step": step, "acked": len(latencies), "missing": missing, "extra_pushes": extra, "lost": lost,
            "versions": len(versions), "snapshot_bytes": max(sizes) if sizes else None,
            "converged_s": round(max(latencies), 4) if latencies and not missing else None,
            "p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
            "p99_s": round(percentile(latencies, 0.99), 4) if latencies else None,
            "latencies": [round(value, 4) for value in latencies]})
        if missing:
            break
        await task.deferLater(reactor, options.pause)
    if options.admin_port:
        result["proxies"] = await proxies_view(reactor, options.admin_port, {spec.hello["node"] for spec in specs})
    return result


async def proxies_view(reactor, admin_port: int, nodes) -> dict:
    """The control plane's /proxies rows of our sessions, while they are still connected."""
    from twisted.web.client import Agent, readBody
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{admin_port}/proxies".encode())
    rows = [row for row in json.loads(await readBody(response)) if row["node"] in nodes]
    return {"rows": len(rows), "connected": sum(1 for row in rows if row["connected"]),
            "synced": sum(1 for row in rows if row["connected"] and not row["stale"]
                          and row["version_acked"] == row["version_sent"]),
            "versions_acked": len({row["version_acked"] for row in rows})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, help="HOST:PORT of mesh-control's :15012")
    parser.add_argument("--state-dir", required=True, help="the control plane's state dir (its CA key)")
    parser.add_argument("--config-dir", required=True, help="the control plane's --config-dir")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--admin-port", type=int, help="read the control plane's /proxies before disconnecting")
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--endpoints", action="store_true",
                        help="announce an inbound listener: every session is a registry endpoint")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--step-offset", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=25, help="TLS handshakes in flight while connecting")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up on a change after this long")
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between changes")
    options = parser.parse_args(argv)
    outcome = {}

    def go(reactor):
        d = defer.ensureDeferred(run(reactor, options))
        d.addCallback(outcome.update)
        return d

    try:
        task.react(go)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    json.dump(outcome, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
