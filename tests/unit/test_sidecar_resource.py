"""Istio's Sidecar resource: validation, which Sidecar applies, and what it imports into a proxy's config."""

import pytest
from twisted.internet.task import Clock

from mesh.config.compile import Workload
from mesh.config.errors import format_path
from mesh.control.distribution import Distributor
from tests.harness.config_yaml import compile_yaml, validate_yaml

FRONTEND = Workload("frontend", "shop", {"app": "frontend"}, "frontend", app_port=8080)
REVIEWS = "reviews.shop.svc.cluster.local"
RATINGS = "ratings.shop.svc.cluster.local"


def _service(name, namespace, host, port, address, protocol="HTTP", labels="{}"):
    """A STATIC ServiceEntry of one port and one endpoint, as YAML."""
    return ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  hosts: [{host}]\n"
            f"  ports: [{{number: {port}, name: p, protocol: {protocol}}}]\n"
            f"  resolution: STATIC\n  endpoints: [{{address: {address}, labels: {labels}}}]\n---\n")


SERVICES = (_service("frontend", "shop", "frontend", 8080, "127.0.0.10", "GRPC", "{app: frontend}")
            + _service("reviews", "shop", "reviews", 9080, "127.0.0.11")
            + _service("ratings", "shop", "ratings", 9080, "127.0.0.12")
            + _service("httpbin", "egress", "httpbin.org", 80, "127.0.0.13")
            + "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: shop}\n"
              "spec:\n  hosts: [ratings]\n  http: [{route: [{destination: {host: ratings}}], timeout: 2s}]\n")


def _load(tmp_path, text):
    objects, errors, _ = validate_yaml(tmp_path, SERVICES, text)
    return objects, errors


def _compile(tmp_path, text, workload=FRONTEND):
    return compile_yaml(tmp_path, SERVICES, text, workload=workload)


def _services(config):
    return sorted({spec.service for spec in config.clusters.values()})


def _sidecar(namespace, hosts, name="default", selector=None):
    lines = ["apiVersion: networking.istio.io/v1", "kind: Sidecar",
             f"metadata: {{name: {name}, namespace: {namespace}}}", "spec:"]
    if selector:
        lines.append(f"  workloadSelector: {{labels: {selector}}}")
    lines.append(f"  egress: [{{hosts: {hosts}}}]")
    return "\n".join(lines) + "\n"


def test_without_a_sidecar_every_exported_service_is_visible(tmp_path):
    config = _compile(tmp_path, "")
    assert _services(config) == sorted(["frontend.shop.svc.cluster.local", REVIEWS, RATINGS, "httpbin.org"])


def test_namespace_sidecar_imports_only_its_hosts(tmp_path):
    config = _compile(tmp_path, _sidecar("shop", f'["./{REVIEWS}", "egress/httpbin.org"]'))
    assert _services(config) == sorted([REVIEWS, "httpbin.org"])
    assert config.routes.lookup("reviews") is not None
    assert config.routes.lookup("ratings") is None  # its VirtualService is not imported either


def test_namespace_part_must_match_the_resource_namespace(tmp_path):
    config = _compile(tmp_path, _sidecar("shop", '["shop/httpbin.org", "*/ratings.shop.svc.cluster.local"]'))
    assert _services(config) == [RATINGS]


def test_wildcards_and_short_names(tmp_path):
    config = _compile(tmp_path, _sidecar("shop", '["./*", "~/*"]'))
    assert _services(config) == sorted(["frontend.shop.svc.cluster.local", REVIEWS, RATINGS])
    config = _compile(tmp_path, _sidecar("shop", '["./reviews", "*/*.org"]'))
    assert _services(config) == sorted([REVIEWS, "httpbin.org"])


def test_workload_selector_beats_the_namespace_default(tmp_path):
    text = (_sidecar("shop", '["./ratings.shop.svc.cluster.local"]') + "---\n"
            + _sidecar("shop", '["./reviews.shop.svc.cluster.local"]', name="frontend", selector="{app: frontend}"))
    assert _services(_compile(tmp_path, text)) == [REVIEWS]
    other = Workload("backend", "shop", {"app": "backend"}, "backend")
    assert _services(_compile(tmp_path, text, other)) == [RATINGS]


def test_root_namespace_default_applies_to_namespaces_without_one(tmp_path):
    text = _sidecar("istio-system", '["egress/*"]')
    assert _services(_compile(tmp_path, text)) == ["httpbin.org"]
    own = text + "---\n" + _sidecar("shop", '["./*"]')
    assert "httpbin.org" not in _services(_compile(tmp_path, own))


def test_selector_sidecar_of_another_namespace_does_not_apply(tmp_path):
    text = _sidecar("other", '["egress/*"]', name="frontend", selector="{app: frontend}")
    assert len(_services(_compile(tmp_path, text))) == 4


def test_inbound_protocol_still_comes_from_the_workloads_own_service(tmp_path):
    config = _compile(tmp_path, _sidecar("shop", '["egress/*"]'))
    assert _services(config) == ["httpbin.org"]
    assert config.app_protocol == "GRPC"


def test_two_namespace_defaults_warn_and_the_first_by_name_applies(tmp_path):
    text = _sidecar("shop", f'["./{REVIEWS}"]', name="a") + "---\n" + _sidecar("shop", f'["./{RATINGS}"]', name="b")
    config = _compile(tmp_path, text)
    assert _services(config) == [REVIEWS]
    assert any("shop/b" in warning.reason and "first by name" in warning.reason for warning in config.warnings)


@pytest.mark.parametrize("spec, field, words", [
    ("egress: [{hosts: [reviews]}]", ("spec", "egress", 0, "hosts", 0), "write namespace/dnsName"),
    ("egress: [{hosts: ['Bad_NS/*']}]", ("spec", "egress", 0, "hosts", 0), "invalid namespace"),
    ("egress: [{hosts: ['./a..b']}]", ("spec", "egress", 0, "hosts", 0), "invalid host"),
    ("egress: [{port: {number: 80}, hosts: ['./*']}]", ("spec", "egress", 0, "port"), "remove port"),
    ("egress: [{hosts: ['./*'], bind: 0.0.0.0}]", ("spec", "egress", 0, "bind"), "--outbound-address"),
    ("egress: [{hosts: ['./*']}, {hosts: ['*/*']}]", ("spec", "egress"), "one egress listener"),
    ("egress: [{}]", ("spec", "egress", 0, "hosts"), "required"),
    ("{}", ("spec",), "empty Sidecar"),
    ("{workloadSelector: {labels: {app: a}}}", ("spec",), "set egress hosts, or outboundTrafficPolicy"),
    ("{egress: [{hosts: ['./*']}], ingress: [{port: {number: 80}}]}", ("spec", "ingress"), "--app-port"),
    ("{egress: [{hosts: ['./*']}], outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: eg}}}",
     ("spec", "outboundTrafficPolicy", "egressProxy"), "remove egressProxy"),
    ("{egress: [{hosts: ['./*']}], outboundTrafficPolicy: {mode: DENY}}", ("spec", "outboundTrafficPolicy", "mode"),
     "REGISTRY_ONLY"),
    ("{egress: [{hosts: ['./*']}], inboundConnectionPool: {}}", ("spec", "inboundConnectionPool"), "remove it"),
], ids=["no-namespace", "bad-namespace", "bad-host", "port", "bind", "two-listeners", "no-hosts", "empty",
        "only-selector", "ingress", "egress-proxy", "bad-mode", "inbound-pool"])
def test_invalid_sidecars_name_the_field_and_what_to_do(tmp_path, spec, field, words):
    if not spec.startswith("{"):
        spec = "{" + spec + "}"
    _, errors = _load(tmp_path, f"apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
                                f"metadata: {{name: s, namespace: shop}}\nspec: {spec}\n")
    assert [(error.field, words in error.reason) for error in errors] == [(format_path(field), True)], errors


def _sent(tmp_path, text, workload=FRONTEND):
    """``kind/namespace/name`` of each resource the control plane sends ``workload``'s sidecar."""
    objects, errors = _load(tmp_path, text)
    assert errors == []
    distributor = Distributor(Clock(), lambda: b"")
    assert distributor.set_resources(objects) == []
    _, documents, _ = distributor.snapshot_for(workload)
    return sorted(f"{doc['kind']}/{doc['metadata']['namespace']}/{doc['metadata']['name']}" for doc in documents)


def test_the_control_plane_sends_only_what_the_sidecar_imports(tmp_path):
    everything = _sent(tmp_path, "")
    assert "ServiceEntry/egress/httpbin" in everything and "VirtualService/shop/ratings" in everything
    sent = _sent(tmp_path, _sidecar("shop", '["./reviews", "istio-system/*"]')
                 + "---\n" + _sidecar("shop", '["*/*"]', name="unused", selector="{app: nobody}"))
    # the proxy's own namespace's entries stay (its inbound side reads their ports); httpbin and the
    # ratings VirtualService go; the Sidecar that applies is sent, the other one is not
    assert sent == ["ServiceEntry/shop/frontend", "ServiceEntry/shop/ratings", "ServiceEntry/shop/reviews",
                    "Sidecar/shop/default"]


def test_destination_rules_follow_the_services_sent(tmp_path):
    rules = "".join(f"---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
                    f"metadata: {{name: {name}, namespace: shop}}\nspec: {{host: {host}}}\n"
                    for name, host in (("reviews", "reviews"), ("external", "httpbin.org"), ("all", "'*.org'")))
    sent = _sent(tmp_path, _sidecar("shop", '["./reviews"]') + rules)
    assert [name for name in sent if name.startswith("DestinationRule")] == ["DestinationRule/shop/reviews"]
    sent = _sent(tmp_path, _sidecar("shop", '["*/httpbin.org"]') + rules)
    assert [name for name in sent if name.startswith("DestinationRule")] == [
        "DestinationRule/shop/all", "DestinationRule/shop/external", "DestinationRule/shop/reviews"]


# -- '.' is the workload's namespace (Istio's ConvertToSidecarScope builds the scope for it) ---------------

ROOT_DOT = _sidecar("istio-system", '["./*"]')


def test_dot_in_the_root_default_is_each_workloads_own_namespace(tmp_path):
    config = _compile(tmp_path, ROOT_DOT)
    assert _services(config) == sorted(["frontend.shop.svc.cluster.local", REVIEWS, RATINGS])
    assert config.routes.lookup("ratings") is not None  # shop's VirtualService is imported too
    client = Workload("client", "egress", {"app": "client"}, "client")
    assert _services(_compile(tmp_path, ROOT_DOT, client)) == ["httpbin.org"]


def test_a_short_name_under_dot_is_completed_in_the_workloads_namespace(tmp_path):
    assert _services(_compile(tmp_path, _sidecar("istio-system", '["./reviews"]'))) == [REVIEWS]


def test_the_control_plane_resolves_dot_for_each_proxy(tmp_path):
    assert _sent(tmp_path, ROOT_DOT) == ["ServiceEntry/shop/frontend", "ServiceEntry/shop/ratings",
                                         "ServiceEntry/shop/reviews", "Sidecar/istio-system/default",
                                         "VirtualService/shop/ratings"]


# -- gateways: no Sidecar applies (Istio: "Gateways should just have a default scope with egress: */*") ----

def test_sidecars_do_not_apply_to_gateways(tmp_path):
    text = _sidecar("istio-system", '["egress/*"]') + "---\n" + _sidecar("shop", '["./reviews"]')
    gateway = Workload("ingress", "shop", {"istio": "ingressgateway"}, "ingress", gateway=True)
    assert _services(_compile(tmp_path, text, gateway)) == sorted(
        ["frontend.shop.svc.cluster.local", REVIEWS, RATINGS, "httpbin.org"])
    sent = _sent(tmp_path, text, gateway)
    assert "ServiceEntry/egress/httpbin" in sent and "VirtualService/shop/ratings" in sent
    assert not [name for name in sent if name.startswith("Sidecar/")]


# -- the destinations of the VirtualServices a Sidecar imports are imported (Istio: virtualServiceDestinations) -

def _reviews_vs(pay_route, extra=""):
    """shop's VirtualService for reviews: ``pay_route`` (an http entry, flow YAML) first, then reviews."""
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n"
            f"spec:\n  hosts: [reviews]\n{extra}  http:\n  - {pay_route}\n"
            "  - route: [{destination: {host: reviews}}]\n")


PAY = "{match: [{uri: {prefix: /pay}}], route: [{destination: {host: httpbin.org}}]}"


@pytest.mark.parametrize("pay_route, extra", [
    (PAY, ""),
    ("{match: [{uri: {prefix: /pay}}], route: [{destination: {host: httpbin.org, port: {number: 80}}}]}", ""),
    ("{match: [{sourceNamespace: shop}], route: [{destination: {host: httpbin.org}}]}", ""),
    ("{match: [{sourceNamespace: other}, {uri: {prefix: /pay}}], route: [{destination: {host: httpbin.org}}]}", ""),
    ("{route: [{destination: {host: reviews}}], mirror: {host: httpbin.org}}", ""),
    (PAY, "  gateways: [mesh, shop/gw]\n"),
], ids=["route", "route-port", "source-namespace", "one-match-applies", "mirror", "mesh-and-gateway"])
def test_the_destinations_of_an_imported_virtual_service_are_imported(tmp_path, pay_route, extra):
    text = _sidecar("shop", '["./*"]') + "---\n" + _reviews_vs(pay_route, extra)
    config = _compile(tmp_path, text)
    assert _services(config) == sorted(["frontend.shop.svc.cluster.local", REVIEWS, RATINGS, "httpbin.org"])
    assert config.clusters["outbound|80||httpbin.org"].endpoints[0].address == "127.0.0.13"
    assert "ServiceEntry/egress/httpbin" in _sent(tmp_path, text)


@pytest.mark.parametrize("sidecar_hosts, pay_route, extra", [
    ('["./ratings"]', PAY, ""),
    ('["./*"]', "{match: [{uri: {prefix: /pay}}], route: [{destination: {host: httpbin.org, "
                "port: {number: 8443}}}]}", ""),
    ('["./*"]', "{match: [{sourceNamespace: other}], route: [{destination: {host: httpbin.org}}]}", ""),
    ('["./*"]', PAY, "  gateways: [shop/gw]\n"),
], ids=["virtual-service-not-imported", "port-it-lacks", "other-source-namespace", "gateway-only"])
def test_destinations_istio_does_not_infer_stay_out(tmp_path, sidecar_hosts, pay_route, extra):
    text = _sidecar("shop", sidecar_hosts) + "---\n" + _reviews_vs(pay_route, extra)
    assert "httpbin.org" not in _services(_compile(tmp_path, text))
    assert "ServiceEntry/egress/httpbin" not in _sent(tmp_path, text)


def test_an_inferred_host_is_the_service_the_workload_sees(tmp_path):
    # httpbin.org also in 'aaa' (exported to aaa only) and 'zzz': Istio takes the first namespace by name
    # that exports it to the workload's namespace, as the compiler's registry does
    hidden = _service("httpbin", "aaa", "httpbin.org", 80, "127.0.0.21").replace(
        "  resolution: STATIC", "  exportTo: ['.']\n  resolution: STATIC")
    text = (hidden + _service("httpbin", "zzz", "httpbin.org", 80, "127.0.0.22")
            + _sidecar("shop", '["./*"]') + "---\n" + _reviews_vs(PAY))
    config = _compile(tmp_path, text)
    assert config.clusters["outbound|80||httpbin.org"].endpoints[0].address == "127.0.0.13"
    sent = _sent(tmp_path, text)
    assert "ServiceEntry/egress/httpbin" in sent
    assert "ServiceEntry/zzz/httpbin" not in sent and "ServiceEntry/aaa/httpbin" not in sent


# -- egress and outboundTrafficPolicy defaults ------------------------------------------------------------

def test_a_sidecar_without_egress_imports_everything(tmp_path):
    text = ("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\n"
            "spec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    config = _compile(tmp_path, text)
    assert _services(config) == sorted(["frontend.shop.svc.cluster.local", REVIEWS, RATINGS, "httpbin.org"])
    assert config.outbound_traffic_policy == "REGISTRY_ONLY"


@pytest.mark.parametrize("policy, mode", [("{}", "REGISTRY_ONLY"), ("{mode: ALLOW_ANY}", "ALLOW_ANY"),
                                          ("null", None)], ids=["no-mode", "allow-any", "null"])
def test_outbound_traffic_policy_without_mode_is_registry_only(tmp_path, policy, mode):
    """Istio's OutboundTrafficPolicy.Mode enum: REGISTRY_ONLY = 0, its value when mode is not set."""
    text = _sidecar("shop", '["*/*"]') + f"  outboundTrafficPolicy: {policy}\n"
    assert _compile(tmp_path, text).outbound_traffic_policy == mode
