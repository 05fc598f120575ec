"""Which DestinationRule applies to a service, how several are merged, and what follows from a
ServiceEntry's ``location`` and a rule's ``tls`` for the endpoints (Istio's lookup, merge and auto mTLS)."""

from mesh.config.compile import Workload
from mesh.config.resources import ClientTLS
from mesh.proxy.tls_origination import OriginationContexts
from tests.harness.config_yaml import compile_yaml

API = "api.shop.svc.cluster.local"
CLUSTER = f"outbound|80||{API}"
WEB = Workload("frontend", "web")


def _document(kind, name, namespace, spec_lines) -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            "spec:\n" + "".join(f"  {line}\n" for line in spec_lines))


def _entry(location="MESH_INTERNAL", labels="{version: v1}", host="api", namespace="shop"):
    """A ServiceEntry with two endpoints: 10.0.0.1 (``labels``) and 10.0.0.2 (version v2, tlsMode istio)."""
    spec = [f'hosts: ["{host}"]', *([f"location: {location}"] if location else []), "resolution: STATIC",
            "ports: [{number: 80, name: http, targetPort: 443}]", "endpoints:",
            f"- {{address: 10.0.0.1, labels: {labels}}}",
            "- {address: 10.0.0.2, labels: {version: v2, security.istio.io/tlsMode: istio}}"]
    return _document("ServiceEntry", host.lstrip("*.").split(".")[0], namespace, spec)


def _rule(name, namespace, policy=None, host=API, subsets=None, export_to=None):
    spec = [f'host: "{host}"', *([f"trafficPolicy: {policy}"] if policy else []),
            *([f"subsets: {subsets}"] if subsets else []), *([f"exportTo: {export_to}"] if export_to else [])]
    return _document("DestinationRule", name, namespace, spec)


def _lb(simple):
    return f"{{loadBalancer: {{simple: {simple}}}}}"


def _compile(tmp_path, *documents, workload=WEB, **options):
    return compile_yaml(tmp_path, *documents, workload=workload, **options)


def _reasons(config):
    return [warning.reason for warning in config.warnings]


# -- which namespace's rule applies ----------------------------------------------------------------------

def test_a_rule_of_an_unrelated_namespace_never_applies(tmp_path):
    """Client in web, service in shop: a rule in ops is neither, nor the root namespace."""
    config = _compile(tmp_path, _entry(), _rule("api", "ops", _lb("RANDOM"), subsets="[{name: v1, labels: {}}]"))
    assert config.clusters[CLUSTER].lb_policy == "LEAST_REQUEST"
    assert sorted(config.clusters) == [CLUSTER]
    assert config.warnings == ()


def test_client_then_service_then_root_namespace(tmp_path):
    """Each namespace's rule has a subset named after it: the first of Istio's three namespaces that has a
    rule wins; ``aaa`` (first by name, neither of them) never does."""
    cases = [(("web", "shop", "istio-system"), "web"), (("shop", "istio-system"), "shop"),
             (("istio-system",), "istio-system"), ((), None)]
    for namespaces, expected in cases:
        rules = [_rule(f"api-{ns}", ns, subsets=f"[{{name: {ns}, labels: {{}}}}]") for ns in (*namespaces, "aaa")]
        config = _compile(tmp_path, _entry(), *rules)
        subsets = sorted(name.split("|")[2] for name in config.clusters if name.split("|")[2])
        assert subsets == ([expected] if expected else []), namespaces


def test_the_root_namespace_is_the_configured_one(tmp_path):
    documents = (_entry(), _rule("api", "mesh-root", _lb("RANDOM")), _rule("api", "istio-system", _lb("ROUND_ROBIN")))
    assert _compile(tmp_path, *documents, root_namespace="mesh-root").clusters[CLUSTER].lb_policy == "RANDOM"
    assert _compile(tmp_path, *documents).clusters[CLUSTER].lb_policy == "ROUND_ROBIN"


def test_export_to_still_applies(tmp_path):
    """The service namespace's rule exported only to itself does not apply to web: the root's does."""
    unrelated = _rule("api", "aaa", "{connectionPool: {tcp: {connectTimeout: 3s}}}")
    config = _compile(tmp_path, _entry(), _rule("api", "shop", _lb("RANDOM"), export_to='["."]'),
                      _rule("api", "istio-system", _lb("ROUND_ROBIN")), unrelated)
    assert (config.clusters[CLUSTER].lb_policy, config.clusters[CLUSTER].connect_timeout) == ("ROUND_ROBIN", 10.0)
    config = _compile(tmp_path, _entry(), _rule("api", "shop", _lb("RANDOM"), export_to="[web]"),
                      _rule("api", "istio-system", _lb("ROUND_ROBIN")))
    assert config.clusters[CLUSTER].lb_policy == "RANDOM"


def test_the_most_specific_host_of_a_namespace_decides_even_when_not_exported(tmp_path):
    """As Istio's ``getExportedDestinationRuleFromNamespace``: shop's exact rule, exported elsewhere only, hides
    shop's wildcard rule from web; the root namespace's rule applies."""
    config = _compile(tmp_path, _entry(), _rule("api", "shop", _lb("RANDOM"), export_to="[ops]"),
                      _rule("all", "shop", _lb("ROUND_ROBIN"), host="*.shop.svc.cluster.local"),
                      _rule("api", "istio-system", "{connectionPool: {tcp: {connectTimeout: 3s}}}"))
    assert (config.clusters[CLUSTER].lb_policy, config.clusters[CLUSTER].connect_timeout) == ("LEAST_REQUEST", 3.0)


def test_a_client_in_the_root_namespace_prefers_its_private_rules(tmp_path):
    """Istio: a proxy of the root namespace looks at the root's rules exported only to itself, then the
    service's namespace, then the root's exported rules."""
    gateway = Workload("ingress", "istio-system")
    private = _rule("api-private", "istio-system", _lb("RANDOM"), export_to='["."]')
    public = _rule("api-public", "istio-system", _lb("ROUND_ROBIN"))
    service = _rule("api", "shop", "{connectionPool: {tcp: {connectTimeout: 3s}}}")
    cluster = _compile(tmp_path, _entry(), private, public, service, workload=gateway).clusters[CLUSTER]
    assert (cluster.lb_policy, cluster.connect_timeout) == ("RANDOM", 10.0)
    cluster = _compile(tmp_path, _entry(), public, service, workload=gateway).clusters[CLUSTER]
    assert (cluster.lb_policy, cluster.connect_timeout) == ("LEAST_REQUEST", 3.0)


# -- several rules of one host and namespace are merged ---------------------------------------------------

def test_rules_of_one_host_and_namespace_are_merged(tmp_path):
    """Istio's mergeDestinationRule: the subsets of both; the first (by name) has no trafficPolicy, so the
    second's applies."""
    config = _compile(tmp_path, _entry(),
                      _rule("api-a", "shop", subsets="[{name: v1, labels: {version: v1}}]"),
                      _rule("api-b", "shop", _lb("RANDOM"), subsets="[{name: v2, labels: {version: v2}}]"))
    assert sorted(config.clusters) == [f"outbound|80|v1|{API}", f"outbound|80|v2|{API}", CLUSTER]
    assert {name: spec.lb_policy for name, spec in config.clusters.items()} == dict.fromkeys(config.clusters, "RANDOM")
    assert [e.address for e in config.clusters[f"outbound|80|v2|{API}"].endpoints] == ["10.0.0.2"]
    assert config.warnings == ()


def test_the_first_trafficpolicy_and_the_first_subset_of_a_name_win_with_warnings(tmp_path):
    config = _compile(tmp_path, _entry(),
                      _rule("api-a", "shop", _lb("ROUND_ROBIN"), subsets="[{name: v1, labels: {version: v1}}]"),
                      _rule("api-b", "shop", _lb("RANDOM"), subsets="[{name: v1, labels: {version: v2}}, "
                                                                    "{name: v2, labels: {version: v2}}]"))
    assert config.clusters[CLUSTER].lb_policy == "ROUND_ROBIN"
    assert [e.address for e in config.clusters[f"outbound|80|v1|{API}"].endpoints] == ["10.0.0.1"]
    assert f"outbound|80|v2|{API}" in config.clusters
    warnings = {(w.name, w.field): w.reason for w in config.warnings}
    assert sorted(warnings) == [("api-b", "spec.subsets[0].name"), ("api-b", "spec.trafficPolicy")]
    assert warnings["api-b", "spec.subsets[0].name"] == (
        f"subset 'v1' of '{API}' is already defined by DestinationRule shop/api-a (several DestinationRules of one "
        "host in one namespace are merged, as in Istio: the first definition of a subset is kept); this subset is "
        "ignored")
    assert warnings["api-b", "spec.trafficPolicy"].startswith(
        f"DestinationRule shop/api-a also sets a trafficPolicy for '{API}' and takes precedence")


def test_rules_with_different_export_to_are_not_merged_the_last_applies(tmp_path):
    """ENABLE_ENHANCED_DESTINATIONRULE_MERGE (Istio's default): another exportTo keeps a rule apart, and
    the sidecar takes the last of those it sees."""
    config = _compile(tmp_path, _entry(),
                      _rule("api-a", "shop", _lb("ROUND_ROBIN"), subsets="[{name: v1, labels: {version: v1}}]"),
                      _rule("api-b", "shop", _lb("RANDOM"), subsets="[{name: v2, labels: {version: v2}}]",
                            export_to='["*"]'))
    assert sorted(config.clusters) == [f"outbound|80|v2|{API}", CLUSTER]
    assert config.clusters[CLUSTER].lb_policy == "RANDOM"
    [warning] = config.warnings
    assert (warning.name, warning.field) == ("api-a", "spec.exportTo")
    assert warning.reason.startswith(f"DestinationRule shop/api-b also applies to '{API}' in namespace web and "
                                     "takes precedence: Istio merges the DestinationRules of one host and namespace "
                                     "only when their exportTo are the same")


# -- location MESH_EXTERNAL: no auto mTLS ----------------------------------------------------------------

def test_auto_mtls_only_to_mesh_internal_services(tmp_path):
    """Without a DestinationRule tls, the tlsMode-labelled endpoint (10.0.0.2) gets mTLS only when the entry is
    MESH_INTERNAL (Istio's buildUpstreamTLSSettings); tls.mode ISTIO_MUTUAL still gives mTLS to every endpoint."""
    internal = "spiffe://cluster.local/ns/shop/sa/default"
    for location, identities in (("MESH_INTERNAL", [None, internal]), (None, [None, None]),  # None: the default
                                 ("MESH_EXTERNAL", [None, None])):
        config = _compile(tmp_path, _entry(location))
        assert [e.identity for e in config.clusters[CLUSTER].endpoints] == identities, location
        if location == "MESH_INTERNAL":
            assert config.warnings == ()
            continue
        [warning] = config.warnings
        assert (warning.kind, warning.name, warning.field) == ("ServiceEntry", "api", "spec.location")
        assert warning.reason == (
            f"'{API}' is MESH_EXTERNAL (the default location), so, as in Istio, clients do not use auto mTLS to its "
            "endpoints labelled security.istio.io/tlsMode: istio: they get plaintext; set location: MESH_INTERNAL "
            "for a service of the mesh (or tls.mode: ISTIO_MUTUAL in a DestinationRule)")
    config = _compile(tmp_path, _entry("MESH_EXTERNAL"), _rule("api", "shop", "{tls: {mode: ISTIO_MUTUAL}}"))
    assert [e.identity for e in config.clusters[CLUSTER].endpoints] == [internal, internal]
    assert config.warnings == ()


# -- TLS origination to a wildcard host -------------------------------------------------------------------

WILD = "*.example.com"


def test_origination_to_a_wildcard_host_without_a_name_is_refused_with_a_warning(tmp_path):
    config = _compile(tmp_path, _entry("MESH_EXTERNAL", host=WILD, labels="{}"),
                      _rule("wild", "shop", "{tls: {mode: SIMPLE}}", host=WILD))
    [warning] = config.warnings
    assert (warning.kind, warning.name, warning.field) == ("DestinationRule", "wild", "spec.trafficPolicy")
    assert warning.reason == (
        "tls.mode SIMPLE to host '*.example.com' (a wildcard or an IP address, so no server name comes from it) "
        "needs sni or subjectAltNames, since txmesh does not take them from each request's Host; set sni (and "
        "subjectAltNames), or insecureSkipVerify: true to skip the name check; until then the sidecar refuses "
        "these connections (503 UF)")
    origination = {e.origination for e in config.clusters[f"outbound|80||{WILD}"].endpoints}
    assert origination == {ClientTLS("SIMPLE")}  # TLS still (never plaintext), refused by the sidecar:
    assert OriginationContexts().get(ClientTLS("SIMPLE")).refusal() == (
        "tls.mode SIMPLE without sni or subjectAltNames has no name to check the server's certificate against (a "
        "wildcard host gives none: txmesh does not take it from each request's Host); set sni (and "
        "subjectAltNames), or insecureSkipVerify: true to skip the name check")


def test_origination_to_a_wildcard_host_with_a_name_or_no_check_is_fine(tmp_path):
    """What the warning asks for: sni, subjectAltNames or insecureSkipVerify; and a host of its own
    under a wildcard rule is its own SNI.  Then the sidecar originates TLS; without them it refuses."""
    for host, tls, names in ((WILD, "{mode: SIMPLE, sni: api.example.com}", ("api.example.com",)),
                             (WILD, "{mode: SIMPLE, subjectAltNames: [api.example.com]}", ("api.example.com",)),
                             (WILD, "{mode: SIMPLE, insecureSkipVerify: true}", ()),
                             ("api.example.com", "{mode: SIMPLE}", ("api.example.com",)),
                             (WILD, "{mode: SIMPLE}", ())):
        config = _compile(tmp_path, _entry("MESH_EXTERNAL", host=host, labels="{}"),
                          _rule("wild", "shop", f"{{tls: {tls}}}", host=WILD))
        [settings] = {e.origination for e in config.clusters[f"outbound|80||{host}"].endpoints}
        assert settings.names() == names, tls
        refused = not names and not settings.insecure_skip_verify
        assert len(config.warnings) == refused, (tls, config.warnings)
        assert (OriginationContexts().get(settings).refusal() is not None) == refused, tls


