"""PeerAuthentication: validation, and the effective mTLS mode of a workload (Istio's precedence)."""

from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.security import PeerAuthentication
from mesh.config.security_tables import PeerAuthn
from tests.harness.config_yaml import validate_yaml

WEB = Workload("web", "shop", {"app": "web"}, app_port=8080)


def _load(tmp_path, text):
    objects, errors, path = validate_yaml(tmp_path, text, name="peer.yaml")
    return objects, [str(error) for error in errors], path


def _policy(name, namespace, spec="{}"):
    """A PeerAuthentication document; ``spec`` is YAML (flow or indented block)."""
    return (f"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n")


def _effective(tmp_path, *documents, workload=WEB):
    objects, errors, _ = _load(tmp_path, "".join(documents))
    assert errors == []
    return compile_proxy_config(objects, workload)


def test_every_field(tmp_path):
    [policy], errors, _ = _load(tmp_path, """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: web, namespace: shop}
        spec:
          selector:
            matchLabels: {app: web}
          mtls: {mode: STRICT}
          portLevelMtls:
            8080: {mode: DISABLE}
            "9090": {mode: PERMISSIVE}
            9443: {}
        """)
    assert errors == []
    assert policy == PeerAuthentication("web", "shop", (("app", "web"),), "STRICT",
                                        ((8080, "DISABLE"), (9090, "PERMISSIVE"), (9443, "UNSET")), policy.source)
    [empty], errors, _ = _load(tmp_path, _policy("default", "shop"))
    assert errors == [] and (empty.selector, empty.mode, empty.port_modes) == (None, "UNSET", ())


def test_validation_errors(tmp_path):
    _, errors, path = _load(tmp_path, """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: shop}
        spec:
          mtls: {mode: STRICTEST, enabled: true}
          portLevelMtls:
            8080: {mode: DISABLE}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: web, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          portLevelMtls:
            0: {mode: DISABLE}
            "8080": {mode: STRICT}
            8080: {mode: DISABLE}
            http: {mode: STRICT}
          targetRef: {kind: Service, name: web}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: empty-ports, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          portLevelMtls: {}
        """)
    prefix = f"{path}:{{}}: PeerAuthentication/shop/"
    assert errors == [
        prefix.format(5) + "default: spec.mtls.enabled: unknown field 'enabled'; supported: mode",
        prefix.format(5) + "default: spec.mtls.mode: invalid mode 'STRICTEST'; use one of: STRICT, PERMISSIVE, "
                           "DISABLE, UNSET",
        prefix.format(6) + "default: spec.portLevelMtls: portLevelMtls needs a selector with matchLabels: as in "
                           "Istio, namespace- and mesh-wide policies cannot set per-port modes",
        prefix.format(15) + "web: spec.portLevelMtls[0]: invalid port 0; use a port number from 1 to 65535",
        prefix.format(17) + "web: spec.portLevelMtls[8080]: port 8080 is listed twice",
        prefix.format(18) + "web: spec.portLevelMtls.http: invalid port 'http'; use a port number from 1 to 65535",
        prefix.format(19) + "web: spec.targetRef: unknown field 'targetRef'; supported: mtls, portLevelMtls, "
                            "selector",
        prefix.format(26) + "empty-ports: spec.portLevelMtls: must map port numbers to {mode: ...}, like "
                            "{8080: {mode: DISABLE}}",
    ]


def test_default_is_permissive(tmp_path):
    config = _effective(tmp_path, _policy("other", "elsewhere", "{mtls: {mode: STRICT}}"))
    assert config.peer_authentication == PeerAuthn("PERMISSIVE", ())
    assert config.peer_authentication.mode_for_port(8080) == "PERMISSIVE"
    assert config.dump["peer_authentication"] == {"mode": "PERMISSIVE", "port_modes": {}, "policies": {}}


def test_workload_over_namespace_over_mesh(tmp_path):
    mesh = _policy("default", "istio-system", "{mtls: {mode: STRICT}}")
    namespace = _policy("default", "shop", "{mtls: {mode: PERMISSIVE}}")
    workload = _policy("web", "shop", "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}")
    assert _effective(tmp_path, mesh).peer_authentication.mode == "STRICT"
    assert _effective(tmp_path, mesh, namespace).peer_authentication.mode == "PERMISSIVE"
    config = _effective(tmp_path, mesh, namespace, workload)
    assert config.peer_authentication.mode == "DISABLE"
    assert config.dump["peer_authentication"]["policies"] == {
        "mesh": "istio-system/default", "namespace": "shop/default", "workload": "shop/web"}
    api = Workload("api", "shop", {"app": "api"})
    assert _effective(tmp_path, mesh, namespace, workload, workload=api).peer_authentication.mode == "PERMISSIVE"
    other = Workload("web", "other", {"app": "web"})
    assert _effective(tmp_path, mesh, namespace, workload, workload=other).peer_authentication.mode == "STRICT"


def test_unset_inherits_from_the_parent_level(tmp_path):
    mesh = _policy("default", "istio-system", "{mtls: {mode: STRICT}}")
    namespace = _policy("default", "shop", "{mtls: {mode: UNSET}}")
    workload = _policy("web", "shop", "{selector: {matchLabels: {app: web}}}")
    assert _effective(tmp_path, mesh, namespace, workload).peer_authentication.mode == "STRICT"
    assert _effective(tmp_path, namespace).peer_authentication.mode == "PERMISSIVE"


def test_port_level_mtls_overrides_the_workload_mode(tmp_path):
    namespace = _policy("default", "shop", "{mtls: {mode: STRICT}}")
    workload = _policy("web", "shop", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}, "
                                      "9090: {mode: UNSET}}}")
    config = _effective(tmp_path, namespace, workload)
    peer = config.peer_authentication
    assert peer == PeerAuthn("STRICT", ((8080, "DISABLE"), (9090, "STRICT")))
    assert [peer.mode_for_port(port) for port in (8080, 9090, 7070)] == ["DISABLE", "STRICT", "STRICT"]
    assert config.dump["peer_authentication"]["port_modes"] == {"8080": "DISABLE", "9090": "STRICT"}


def test_ignored_policies_are_warned_about(tmp_path):
    root_selector = _policy("web-everywhere", "istio-system", "{selector: {matchLabels: {app: web}}, "
                                                              "mtls: {mode: DISABLE}}")
    first = _policy("a-first", "shop", "{mtls: {mode: STRICT}}")
    second = _policy("b-second", "shop", "{mtls: {mode: DISABLE}}")
    config = _effective(tmp_path, root_selector, first, second)
    assert config.peer_authentication.mode == "STRICT"
    assert [str(warning).split(": ", 1)[1] for warning in config.warnings] == [
        "PeerAuthentication/istio-system/web-everywhere: spec.selector: a PeerAuthentication with a selector in "
        "the root namespace (istio-system) is ignored, as in Istio; put it in the workload's namespace",
        "PeerAuthentication/shop/b-second: metadata.name: PeerAuthentication shop/a-first also applies to "
        "workload shop/web at the namespace level and takes precedence (first by name); this one is ignored for it",
    ]
