"""Istio's traffic-management task pages, their YAML unchanged, on one host (issue #13's acceptance test).

One mesh for the module: ``mesh-control --config-dir`` and Bookinfo (tests/apps/bookinfo.py: productpage,
details, reviews v1/v2/v3, ratings), each app behind its own sidecar fed by the control plane, registered
by the labels ``app`` and ``version`` of Bookinfo's Deployments (a ServiceEntry with a workloadSelector per
service, port 9080, stands in for Bookinfo's Kubernetes Services).  The browser of the pages is curl
through a ``tester`` sidecar, except on the getting-started step, which goes through an ingress gateway.

Each test follows one task page step by step: it applies the page's files, stored unmodified in
tests/data/istio-samples/, as ``kubectl apply -f`` does (:class:`ConfigDir`), waits until every sidecar
ACKed the config that holds them, and checks what the page says the user sees:

- Getting started: the bookinfo Gateway and VirtualService on an ingress gateway (``mesh-proxy --gateway``,
  its port 8080 mapped to a free one): /productpage and /api/v1/products reach productpage, nothing else
- Request routing: all v1; ``end-user: jason`` -> reviews v2 (black stars), anyone else v1
- Fault injection: a 7 s delay for jason -> the page answers after productpage's 2 x 3 s and says the
  reviews are unavailable; an HTTP 500 abort for jason -> "Ratings service is currently unavailable"
- Traffic shifting: 50 % v1 / 50 % v3 (200 pages, each share within 30-70 %), then 100 % v3 (red stars)
- Request timeouts: ratings delayed 2 s -> pages take 2 s; reviews ``timeout: 0.5s`` -> about 1 s and
  the reviews are unavailable (productpage tries twice)
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from mesh.cli.validate import load_and_validate
from tests.apps.bookinfo import RATINGS_UNAVAILABLE, REVIEWS_UNAVAILABLE
from tests.harness import REPO_ROOT, ManagedProcess, curl, free_port, http_request, venv_bin, wait_for
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_proxy_support import cluster_name, curl_many, write_config

SAMPLES = REPO_ROOT / "tests" / "data" / "istio-samples"
WORKLOADS = (("productpage", "v1"), ("details", "v1"), ("reviews", "v1"), ("reviews", "v2"), ("reviews", "v3"),
             ("ratings", "v1"))
CALLS = {"tester": ("productpage",), "productpage-v1": ("details", "reviews"), "reviews-v2": ("ratings",),
         "reviews-v3": ("ratings",)}
PAGE = "productpage:9080"
ALL_V1 = "virtual-service-all-v1.yaml"


class BookinfoApp(ManagedProcess):
    """``python tests/apps/bookinfo.py``: one Bookinfo service and version, calling out through ``sidecar_port``."""

    kind = "app"

    def __init__(self, service: str, version: str, sidecar_port: int, *, log_dir: Path):
        self.service, self.version, self.sidecar_port = service, version, sidecar_port
        self.port = free_port("127.0.0.1")
        argv = [venv_bin("python"), REPO_ROOT / "tests" / "apps" / "bookinfo.py", "--service", service,
                "--version", version, "--port", self.port, "--sidecar", f"127.0.0.1:{sidecar_port}"]
        super().__init__(f"{service}-{version}", argv, log_dir / f"app-{service}-{version}-{self.port}.log")

    def is_ready(self) -> bool:
        try:
            return http_request("127.0.0.1", self.port, "/health", timeout=2.0)[0] == 200
        except OSError:
            return False


class ConfigDir:
    """``kubectl apply -f`` and ``kubectl delete -f`` of the samples, on the control plane's config directory.

    A config directory is not a Kubernetes API server: it holds files, and a resource that two files
    define is a duplicate (an error), where ``kubectl apply`` replaces the resource of the same kind and
    name.  So :meth:`apply` writes each document of a sample, its text unchanged, to a file of its own
    named after the resource (replacing that resource's file), and :meth:`delete` removes the files of a
    sample's resources, as ``kubectl delete -f`` deletes them by kind and name.  Both return once every
    sidecar ACKed the control plane's new config.
    """

    def __init__(self, path: Path, control, sidecars: list):
        self.path = Path(path)
        self.control = control
        self.sidecars = sidecars

    def apply(self, *samples: str) -> None:
        """Apply the sample files, in order (a later one's resource wins); wait for the sidecars unless
        nothing changed."""
        before = self._versions()
        wanted = dict(document for sample in samples for document in documents(SAMPLES / sample))
        changed = [name for name, text in wanted.items()
                   if not (self.path / name).exists() or (self.path / name).read_text() != text]
        for name in changed:
            _write_atomically(self.path / name, wanted[name])
        if changed:
            self._wait_synced(before, f"the sidecars to ACK {', '.join(samples)}")

    def delete(self, *samples: str) -> None:
        """Delete the resources of the sample files; wait for the sidecars unless none was there."""
        before = self._versions()
        targets = [self.path / name for sample in samples for name, _ in documents(SAMPLES / sample)]
        present = [target for target in targets if target.exists()]
        for target in present:
            target.unlink()
        if present:
            self._wait_synced(before, f"the sidecars to ACK the deletion of {', '.join(samples)}")

    def _versions(self) -> dict:
        return {workload: row["version_acked"] for workload, row in proxies(self.control).items()}

    def _wait_synced(self, before: dict, what: str) -> None:
        """Until the control plane serves exactly the directory's files and every sidecar ACKed a new version."""
        files = {name for name in os.listdir(self.path) if name.endswith(".yaml")}

        def loaded():
            served = {row["source"].rpartition(":")[0] for row in self.control.admin("/resources")["resources"]}
            return {os.path.basename(source) for source in served} == files

        wait_for(loaded, 10, what=f"the control plane to load {sorted(files)}")

        def acked():
            rows = proxies(self.control)
            return all(rows[name]["connected"] and not rows[name]["stale"]
                       and rows[name]["version_acked"] == rows[name]["version_sent"] != before.get(name)
                       for name in self.sidecars)

        wait_for(acked, 10, what=what)


def documents(sample: Path) -> list:
    """``[(file name, document text)]`` of a multi-document YAML file, each text exactly as in the file."""
    texts, current = [], []
    for line in sample.read_text().splitlines(keepends=True):
        if line.rstrip() == "---":
            texts.append("".join(current))
            current = []
        else:
            current.append(line)
    texts.append("".join(current))
    named = []
    for text in texts:
        document = yaml.safe_load(text)
        if document:
            named.append((f"{document['kind'].lower()}-{document['metadata']['name']}.yaml", text))
    return named


def _write_atomically(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` by renaming a complete file into place (the watcher never sees half)."""
    fd, temporary = tempfile.mkstemp(dir=target.parent.parent, prefix=".sample-")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temporary, target)


@pytest.fixture(scope="module")
def mesh(control_factory, process_log_dir, tmp_path_factory):
    """Bookinfo with its sidecars and the default destination rules (the pages' "Before you begin")."""
    config = tmp_path_factory.mktemp("istio-tasks") / "config"
    write_config(config, *(selector_service(service, port=9080) for service in dict(WORKLOADS)),
                 name="bookinfo-services.yaml")
    control = control_factory(extra_args=["--config-dir", str(config)])
    apps = {f"{service}-{version}": BookinfoApp(service, version, free_port(), log_dir=process_log_dir)
            for service, version in WORKLOADS}
    gateway_port = free_port()
    sidecar_args = {name: {"service_account": f"bookinfo-{app.service}", "app_port": app.port,
                           "labels": {"app": app.service, "version": app.version},
                           "outbound_port": app.sidecar_port} for name, app in apps.items()}
    sidecar_args["tester"] = {}
    sidecar_args["istio-ingressgateway"] = {
        "labels": {"istio": "ingressgateway"},
        "extra_args": ["--gateway", "--gateway-address", "127.0.0.1", "--gateway-port", f"8080={gateway_port}"]}
    # each sidecar's join token is a meshctl run: made in parallel; the processes start from this thread
    with ThreadPoolExecutor(4) as pool:
        sidecars = dict(zip(sidecar_args, pool.map(
            lambda item: ControlledProxy(control, item[0], log_dir=process_log_dir, **item[1]),
            sidecar_args.items())))
    started = []
    try:
        for process in [*apps.values(), *sidecars.values()]:
            process.spawn()
            started.append(process)
        for process in started:
            process.wait_ready(process.ready_timeout)
        wait_for(lambda: all(has_endpoints(sidecars[name], hosts) for name, hosts in CALLS.items()), 15,
                 what="every caller's sidecar to see the Bookinfo endpoints")
        config_dir = ConfigDir(config, control, list(sidecars))
        config_dir.apply("destination-rule-all.yaml")
        yield {"config": config_dir, "tester": sidecars["tester"], "productpage": sidecars["productpage-v1"],
               "control": control, "gateway_url": f"http://127.0.0.1:{gateway_port}"}
    finally:
        for process in reversed(started):
            process.stop()


def has_endpoints(sidecar, hosts) -> bool:
    """Whether ``sidecar`` knows every Bookinfo endpoint of ``hosts`` (reviews has three)."""
    clusters = sidecar.admin("/clusters")
    return all(len(clusters.get(cluster_name(host, 9080), {}).get("endpoints", [])) == (3 if host == "reviews" else 1)
               for host in hosts)


def page(tester, user: str = "") -> tuple:
    """``GET /productpage`` through the tester's sidecar, logged in as ``user``: ``(document, seconds)``."""
    connection = http.client.HTTPConnection("127.0.0.1", tester.outbound_port, timeout=20)
    headers = {"Host": PAGE, **({"Cookie": f"user={user}"} if user else {})}
    started = time.monotonic()
    try:
        connection.request("GET", "/productpage", headers=headers)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    assert response.status == 200, (response.status, body[:500])
    return json.loads(body), elapsed


def reviews_served(tester, count: int, user: str = "") -> Counter:
    """How many of ``count`` product pages each reviews pod served (``unavailable`` when none did)."""
    headers = {"Cookie": f"user={user}"} if user else {}
    lines = curl_many(tester.outbound_url + "/productpage", count, host=PAGE, headers=headers,
                      write_out="%{http_code} %header{x-bookinfo-reviews}")
    statuses = Counter(line.split(" ", 1)[0] for line in lines)
    assert statuses == {"200": count}, statuses
    return Counter(line.split(" ", 1)[1] for line in lines)


def stars(document: dict) -> list:
    """The ``rating`` of each review on a product page (``None`` for reviews v1, which shows no stars)."""
    return [review.get("rating") for review in document["reviews"]["reviews"]]


def test_getting_started_bookinfo_gateway(mesh):
    """https://istio.io/latest/docs/setup/getting-started/ ("Open the application to outside traffic")"""
    mesh["config"].apply("bookinfo-gateway.yaml")
    url = mesh["gateway_url"]
    result = curl(url + "/productpage", timeout=10)
    assert result.status == 200 and result.json()["details"]["author"] == "William Shakespeare", result
    assert result.headers["x-bookinfo-reviews"] in {"reviews-v1", "reviews-v2", "reviews-v3"}
    result = curl(url + "/api/v1/products", timeout=10)
    assert result.status == 200 and result.json()[0]["title"] == "The Comedy of Errors", result
    assert curl(url + "/details/0", timeout=10).status == 404  # no route of the gateway's VirtualService


def test_request_routing(mesh):
    """https://istio.io/latest/docs/tasks/traffic-management/request-routing/"""
    tester, config = mesh["tester"], mesh["config"]
    # Bookinfo without routes: refreshing the page shows every version of reviews.  Istio's default policy
    # is LEAST_REQUEST, which the peak-EWMA plugin refines: most pages go to the fastest version (v1 calls
    # no ratings), and the other two come in runs, not in turns, so the versions are counted over the
    # refreshes (a sidecar that just started may still fail a first try, which is retried elsewhere)
    seen = Counter()

    def every_version_served():
        seen.update(reviews_served(tester, 9))
        return set(seen) == {"reviews-v1", "reviews-v2", "reviews-v3"}

    try:
        wait_for(every_version_served, 15, what="every version of reviews to serve pages")
    except TimeoutError as error:
        raise AssertionError((seen, mesh["productpage"].admin("/clusters").get(cluster_name("reviews", 9080)))) \
            from error
    config.apply(ALL_V1)
    assert reviews_served(tester, 20) == {"reviews-v1": 20}
    document, _ = page(tester)
    assert stars(document) == [None, None] and document["details"]["author"] == "William Shakespeare"
    # route based on user identity: jason sees v2 (black stars), anyone else v1
    config.apply("virtual-service-reviews-test-v2.yaml")
    assert reviews_served(tester, 10, user="jason") == {"reviews-v2": 10}
    assert reviews_served(tester, 10, user="alice") == {"reviews-v1": 10}
    document, _ = page(tester, "jason")
    assert document["user"] == "jason"
    assert stars(document) == [{"stars": 5, "color": "black"}, {"stars": 4, "color": "black"}]


def test_fault_injection(mesh):
    """https://istio.io/latest/docs/tasks/traffic-management/fault-injection/"""
    tester, config = mesh["tester"], mesh["config"]
    config.apply(ALL_V1, "virtual-service-reviews-test-v2.yaml")
    # an HTTP delay of 7 s between reviews v2 and ratings for jason: productpage gives up on reviews after
    # its own 3 s timeout, twice, and the page says the reviews are unavailable after about 6 s
    config.apply("virtual-service-ratings-test-delay.yaml")
    document, elapsed = page(tester, "jason")
    assert document["reviews"] == {"error": REVIEWS_UNAVAILABLE}, document
    print(f"fault injection: jason's page with a 7 s delay on ratings took {elapsed:.2f}s")
    assert 5.9 <= elapsed < 6.9, elapsed
    document, elapsed = page(tester, "alice")
    assert document["reviews"]["podname"] == "reviews-v1" and elapsed < 2.0, (document, elapsed)
    # an HTTP abort (500) for jason: reviews v2 answers, without ratings
    config.apply("virtual-service-ratings-test-abort.yaml")
    document, _ = page(tester, "jason")
    assert document["reviews"]["podname"] == "reviews-v2"
    assert stars(document) == [{"error": RATINGS_UNAVAILABLE}] * 2
    document, _ = page(tester, "alice")
    assert document["reviews"]["podname"] == "reviews-v1" and stars(document) == [None, None]
    config.delete(ALL_V1)


def test_traffic_shifting(mesh):
    """https://istio.io/latest/docs/tasks/traffic-management/traffic-shifting/"""
    tester, config = mesh["tester"], mesh["config"]
    config.apply(ALL_V1)
    assert reviews_served(tester, 20) == {"reviews-v1": 20}
    # 50 % to v3: over 200 pages each version's share is within 30-70 % (a flake has odds below 1e-8)
    config.apply("virtual-service-reviews-50-v3.yaml")
    served = reviews_served(tester, 200)
    print(f"traffic shifting 50/50: {dict(served)}")
    assert set(served) == {"reviews-v1", "reviews-v3"} and 60 <= served["reviews-v3"] <= 140, served
    # 100 % to v3: red stars for everyone
    config.apply("virtual-service-reviews-v3.yaml")
    assert reviews_served(tester, 20) == {"reviews-v3": 20}
    document, _ = page(tester)
    assert stars(document) == [{"stars": 5, "color": "red"}, {"stars": 4, "color": "red"}]
    config.delete(ALL_V1)


def test_request_timeouts(mesh):
    """https://istio.io/latest/docs/tasks/traffic-management/request-timeouts/"""
    tester, config = mesh["tester"], mesh["config"]
    config.apply(ALL_V1)
    # reviews v2, ratings delayed 2 s: the page works (black stars), 2 s slower
    config.apply("request-timeouts-reviews-v2.yaml", "request-timeouts-ratings-delay.yaml")
    document, elapsed = page(tester)
    assert stars(document) == [{"stars": 5, "color": "black"}, {"stars": 4, "color": "black"}]
    print(f"request timeouts: the page with ratings delayed 2 s took {elapsed:.2f}s")
    assert 2.0 <= elapsed < 3.0, elapsed
    # a half-second timeout on reviews: the page returns in about 1 s (productpage tries twice), no reviews
    config.apply("request-timeouts-reviews-timeout.yaml")
    document, elapsed = page(tester)
    assert document["reviews"] == {"error": REVIEWS_UNAVAILABLE}, document
    print(f"request timeouts: the page with a 0.5 s timeout on reviews took {elapsed:.2f}s")
    assert 1.0 <= elapsed < 1.9, elapsed
    config.delete(ALL_V1)


@pytest.mark.parametrize("sample, weights", [("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
                                             ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10})])
def test_older_shifting_samples_reach_the_sidecar_with_their_weights(mesh, sample, weights):
    """Earlier versions of the traffic-shifting page: the caller's sidecar routes reviews by these weights
    (the 50/50 step above proves weights by requests)."""
    mesh["config"].apply(sample)
    routes = {vhost["name"]: vhost["routes"] for vhost in mesh["productpage"].admin("/config_dump")["config"]["routes"]}
    clusters = routes["VirtualService/default/reviews"][0]["action"]["clusters"]
    assert {cluster["name"]: cluster["weight"] for cluster in clusters} == {
        cluster_name("reviews", 9080, subset): weight for subset, weight in weights.items()}
    mesh["config"].delete(sample)


def test_older_jason_sample_sends_jason_to_v2_and_the_others_to_v3(mesh):
    tester, config = mesh["tester"], mesh["config"]
    config.apply("virtual-service-reviews-jason-v2-v3.yaml")
    assert reviews_served(tester, 10, user="jason") == {"reviews-v2": 10}
    assert reviews_served(tester, 10) == {"reviews-v3": 10}
    config.delete("virtual-service-reviews-jason-v2-v3.yaml")


#: the stored samples txmesh refuses, with the reason its error gives (none, since the gateway serves TCP)
REFUSED = {}


@pytest.mark.parametrize("sample", sorted(path.name for path in SAMPLES.glob("*.yaml")))
def test_every_stored_sample_validates_unchanged_or_is_refused_saying_why(sample):
    """What ``meshctl validate`` says of each stored file, including the pages this module does not run
    (circuit breaking, mirroring, TCP traffic shifting: see docs/istio-tasks.md for their tests)."""
    _, resources, errors, _ = load_and_validate([str(SAMPLES / sample)])
    if sample in REFUSED:
        assert len(errors) == 1 and REFUSED[sample] in str(errors[0]), errors
    else:
        assert resources and not errors, errors
