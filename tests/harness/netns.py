"""Helpers of the end-to-end tests (tests/e2e/) in network namespaces ("pods"), as root.

- :func:`require_netns`: skip unless root with working ``ip netns`` and iptables nat
- :func:`pod_network`: a module fixture's frame: :func:`require_netns`, a :class:`Pods` and a work
  directory, both removed at the end
- :class:`Pods`: network namespaces joined by veth pairs, created directly inside
  the namespaces (nothing is added to the host's own namespace); removed on
  :meth:`Pods.destroy`, which also stops every process started in them
- :class:`NetnsProcess`: a :class:`tests.harness.ManagedProcess` run with
  ``ip netns exec`` (and optionally as another UID, via ``setpriv``)
- :class:`Pod`: one namespace as a pod (run commands in it, capture its traffic with ``meshctl iptables``,
  read its sidecar's admin and metrics ports);
  :func:`metric_sum` reads a metric from a Prometheus page
- :func:`pod_workdir` and :func:`start_sidecar`: a pod's directory and its ``twistd mesh-proxy``,
  run as the proxy UID :data:`PROXY_UID`, ready once its health port says so
- :class:`TestCA`: a test mesh root (mesh.identity.ca) that issues static workload certificates
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.ca import CertificateAuthority, generate_root, to_pem

from .processes import ManagedProcess, venv_bin

NETNS_PREFIX = "txm-e2e"
PROXY_UID = 1337  # the sidecar's UID, which ``meshctl iptables --proxy-uid`` leaves uncaptured


def run(*argv, check=True, timeout=15.0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, argv))}` failed ({result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def require_netns() -> None:
    """Skip, with the reason, unless this process can make network namespaces with iptables nat in them."""
    if os.geteuid() != 0:
        pytest.skip("network-namespace tests need root (ip netns, iptables); run `make test` as root")
    for tool in ("ip", "iptables", "setpriv", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: iproute2, iptables, util-linux, curl)")
    probe = f"{NETNS_PREFIX}-probe-{os.getpid()}"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` is unavailable here: {made.stderr.strip()}")
    try:
        nat = run("ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-L", "-n", check=False)
        if nat.returncode != 0:
            pytest.skip(f"iptables nat does not work in a network namespace here: {nat.stderr.strip()}")
    finally:
        run("ip", "netns", "del", probe, check=False)


@contextmanager
def pod_network(prefix: str) -> Iterator[tuple[Pods, Path]]:
    """``(pods, workdir)`` for a module's pods, after :func:`require_netns`: an empty :class:`Pods` and a
    new directory named ``prefix...`` under the temporary directory, readable by the proxy UID; on exit
    the pods are destroyed (processes, namespaces) and the directory removed."""
    require_netns()
    pods = Pods()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # the proxies run as PROXY_UID and read their files from here
    try:
        yield pods, workdir
    finally:
        pods.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


class NetnsProcess(ManagedProcess):
    """A process inside a network namespace; ready when ``ready_argv`` (run in the namespace) succeeds."""

    def __init__(self, name, netns, argv, log_path, *, uid=None, ready_argv=None, cwd=None, env=None):
        prefix = ["ip", "netns", "exec", netns]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        super().__init__(name, [*prefix, *argv], log_path, cwd=cwd, env=env)
        self.netns = netns
        self.ready_argv = ready_argv

    def is_ready(self) -> bool:
        if not self.ready_argv:
            return True
        return run("ip", "netns", "exec", self.netns, *self.ready_argv, check=False, timeout=5).returncode == 0


class Pods:
    """Network namespaces as pods on one /24, joined pairwise by veth pairs."""

    def __init__(self):
        self.tag = f"{NETNS_PREFIX}-{os.getpid()}"
        self.namespaces = []
        self.processes = []

    def add(self, name: str) -> str:
        netns = f"{self.tag}-{name}"
        run("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        run("ip", "-n", netns, "link", "set", "lo", "up")
        return netns

    def link(self, left: str, left_cidr: str, right: str, right_cidr: str, ifname="eth0") -> None:
        """A veth pair with one end in each namespace (created there: the host namespace never sees it)."""
        run("ip", "link", "add", "name", ifname, "netns", left, "type", "veth",
            "peer", "name", ifname, "netns", right)
        for netns, cidr in ((left, left_cidr), (right, right_cidr)):
            run("ip", "-n", netns, "addr", "add", cidr, "dev", ifname)
            run("ip", "-n", netns, "link", "set", ifname, "up")

    def exec(self, netns: str, *argv, uid=None, check=False, timeout=15.0) -> subprocess.CompletedProcess:
        prefix = ["ip", "netns", "exec", netns]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return run(*prefix, *argv, check=check, timeout=timeout)

    def start(self, process: NetnsProcess, timeout: float = 20.0) -> NetnsProcess:
        self.processes.append(process)
        return process.start(timeout)

    def destroy(self) -> None:
        """Stop the processes, then delete the namespaces (and with them the veth pairs and iptables rules)."""
        for process in reversed(self.processes):
            try:
                process.stop(timeout=5)
            except Exception:  # keep cleaning up
                pass
        for netns in self.namespaces:
            # anything still running in the namespace (e.g. a curl that hung) goes too
            pids = run("ip", "netns", "pids", netns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", netns, check=False)


class TestCA:
    """A mesh root (mesh.identity.ca) that signs static workload certificates."""

    __test__ = False

    def __init__(self, trust_domain="cluster.local"):
        key, cert = generate_root(trust_domain)
        self.trust_domain = trust_domain
        self.ca = CertificateAuthority(key=key, cert=cert, chain=[], bundle=[cert], trust_domain=trust_domain)

    def bundle_pem(self) -> bytes:
        return self.ca.bundle_pem()

    def issue(self, namespace: str, service_account: str, ttl: float = 3600.0):
        """``(key_pem, cert_chain_pem, spiffe_id)`` for ``spiffe://TD/ns/NS/sa/SA``."""
        uri = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
               .sign(key, hashes.SHA256()))
        cert_pem, chain_pem = self.ca.sign(csr, uri, ttl)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert_pem + chain_pem, uri


__all__ = ["NetnsProcess", "Pods", "TestCA", "pod_network", "require_netns", "run", "to_pem"]


class Pod:
    """One network namespace of :class:`Pods` as a pod: ``exec`` in it, its sidecar's admin port."""

    def __init__(self, pods, netns, name, workdir):
        self.pods, self.netns, self.name, self.dir = pods, netns, name, workdir
        self.proxy = None

    def exec(self, *argv, uid=None, check=False, timeout=15.0):
        return self.pods.exec(self.netns, *argv, uid=uid, check=check, timeout=timeout)

    def capture(self, *options) -> None:
        """``meshctl iptables --proxy-uid PROXY_UID [options]`` here: the pod's traffic goes through its
        sidecar (``--no-inbound``: outbound only)."""
        result = self.exec(venv_bin("meshctl"), "iptables", "--proxy-uid", str(PROXY_UID), *options)
        assert result.returncode == 0, result.stderr

    def admin(self, path):
        result = self.exec("curl", "-sS", "-m", "5", f"http://127.0.0.1:15000{path}", check=True)
        return json.loads(result.stdout)

    def metrics(self) -> str:
        """The sidecar's Prometheus page (:15090)."""
        return self.exec("curl", "-sS", "-m", "5", "http://127.0.0.1:15090/stats/prometheus", check=True).stdout


def metric_sum(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` in a Prometheus page whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def pod_workdir(workdir: Path, config) -> Path:
    """Create a pod's directory (owned by the proxy UID) with its sidecar's config (``config/mesh.yaml``)."""
    workdir.mkdir(mode=0o755)
    os.chown(workdir, PROXY_UID, PROXY_UID)
    (workdir / "config").mkdir()
    (workdir / "config" / "mesh.yaml").write_text(yaml.safe_dump_all(config))
    return workdir


def start_sidecar(pods, netns, name: str, workdir: Path, *args, env=None):
    """``twistd mesh-proxy`` of pod ``name`` (standalone, from ``workdir/config``) as :data:`PROXY_UID`;
    ``args`` are its other options, ``env`` more environment variables.  Ready when ``/healthz/ready`` on
    :15021 answers 200 (the startup probe)."""
    return pods.start(NetnsProcess(
        f"{name}-proxy", netns,
        [venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", workdir / "config",
         "--workload", name, "--namespace", "default", *args],
        workdir / "proxy.log", uid=PROXY_UID,
        ready_argv=["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:15021/healthz/ready"],
        cwd=workdir, env={"HOME": str(workdir), **(env or {})}))
