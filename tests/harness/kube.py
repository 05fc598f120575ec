"""The test Kubernetes API server (:mod:`tests.harness.kubeapi`) as a real process, seen from a test."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .net import http_request
from .processes import REPO_ROOT, ManagedProcess, venv_bin


class KubeAPI(ManagedProcess):
    """``python -m tests.harness.kubeapi --port 0 --port-file F`` and its test controls.

    A faithful fake of the Kubernetes API subset txmesh uses (see :mod:`tests.harness.kubeapi`), not a
    real API server. Use it as a context manager or with :meth:`start`/:meth:`stop`::

        with KubeAPI().start() as kube:
            core = kubernetes.client.CoreV1Api(kube.api_client())
            kube.add_token("t0k3n", "demo", "frontend")

    As on a real server, namespaces ``default``, ``kube-system``, ``kube-public`` and
    ``kube-node-lease`` exist and others must be created before objects go into them; writes to a Pod
    or Service ignore ``status`` (use ``patch_namespaced_pod_status`` to set ``podIP`` or conditions).
    """

    kind = "kube-apiserver"

    def __init__(self, *, bookmark_interval: float = 5.0, log_dir: Path | None = None):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-kubeapi-"))
        self.port_file = Path(tempfile.mkdtemp(prefix="port-", dir=log_dir)) / "port"
        self.port: int | None = None
        argv = [venv_bin("python"), "-m", "tests.harness.kubeapi", "--port", "0", "--port-file", self.port_file,
                "--bookmark-interval", bookmark_interval]
        super().__init__("kubeapi", argv, log_dir / f"kubeapi-{self.port_file.parent.name}.log", cwd=REPO_ROOT)

    def __enter__(self):
        return self if self.running else self.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        if self.port is None:
            if not self.port_file.exists():
                return False
            self.port = int(self.port_file.read_text())
        return http_request("127.0.0.1", self.port, "/readyz")[0] == 200

    def write_kubeconfig(self, path) -> Path:
        """Write a kubeconfig whose server is :attr:`url` (for ``load_kube_config`` and ``--kubeconfig``)."""
        path = Path(path)
        path.write_text(json.dumps({  # JSON is YAML: load_kube_config reads it as is
            "apiVersion": "v1", "kind": "Config", "current-context": "txmesh-test",
            "clusters": [{"name": "txmesh-test", "cluster": {"server": self.url}}],
            "users": [{"name": "txmesh-test", "user": {"token": "txmesh-test-admin"}}],
            "contexts": [{"name": "txmesh-test", "context": {"cluster": "txmesh-test", "user": "txmesh-test"}}],
        }, indent=2))
        return path

    def api_client(self):
        """A real ``kubernetes.client.ApiClient`` pointed at this server (loaded from a kubeconfig)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        kubeconfig = self.write_kubeconfig(self.log_path.parent / f"kubeconfig-{self.port}")
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        return client.ApiClient(configuration)

    # -- test controls --------------------------------------------------------------------------------------

    def _control(self, method: str, name: str, body=None):
        status, answer = http_request("127.0.0.1", self.port, f"/_test/{name}", method=method,
                                      body=json.dumps(body).encode() if body is not None else None)
        if status != 200:
            raise AssertionError(self.describe(f"test control {method} /_test/{name} answered {status}: {answer!r}"))
        return json.loads(answer)

    def compact(self) -> int:
        """Forget the event history: a watch from an older resourceVersion now gets 410 Gone.
        Returns the compacted revision."""
        return self._control("POST", "compact")["compacted"]

    def break_watches(self) -> int:
        """Drop every open watch connection abruptly; return how many there were."""
        return self._control("POST", "break-watches")["broken"]

    def bookmark(self) -> int:
        """Send a BOOKMARK event to every open watch that asked for bookmarks; return how many."""
        return self._control("POST", "bookmark")["sent"]

    def add_token(self, token: str, namespace: str, service_account: str, audiences=("txmesh",),
                  expires_in: float = 3600.0) -> None:
        """Make TokenReview recognise *token* as a projected token of NAMESPACE/SERVICE_ACCOUNT
        (``expires_in`` may be negative: expired)."""
        self._control("POST", "tokens", {"token": token, "namespace": namespace, "serviceAccount": service_account,
                                         "audiences": list(audiences), "expiresIn": expires_in})

    def events(self, api_version: str | None = None) -> list[dict]:
        """The Events stored now, oldest first, each as it was created (``v1`` or ``events.k8s.io/v1``),
        or all converted to *api_version*."""
        return self._control("GET", "events" + (f"?apiVersion={api_version}" if api_version else ""))

    def requests(self) -> list[dict]:
        """Every API request seen so far: ``{"method", "path", "query"}`` (query: name -> value)."""
        return self._control("GET", "requests")

    def forbid(self, resource: str, verbs=("create", "update", "patch"), forbidden: bool = True) -> None:
        """Answer *verbs* on *resource* (a plural, e.g. ``configmaps``) 403 Forbidden, as a missing RBAC grant
        does, or (``forbidden=False``) allow them again."""
        self._control("POST", "forbid", {"resource": resource, "verbs": list(verbs), "forbidden": forbidden})

    def fail(self, resource: str, verbs=("create",), times: int = 1) -> None:
        """Answer the next ``times`` *verbs* on *resource* 503 ServiceUnavailable (an overloaded API server)."""
        self._control("POST", "fail", {"resource": resource, "verbs": list(verbs), "times": times})

    def set_down(self, down: bool, how: str = "reset") -> None:
        """Simulate an API-server outage (open watches break; every API request gets a connection reset,
        or ``how="503"``: 503 ServiceUnavailable), or end it."""
        self._control("POST", "down", {"down": down, "how": how})
