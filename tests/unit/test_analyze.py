"""``meshctl analyze``: cross-resource findings, with file and line, on YAML fixtures."""

import textwrap
from pathlib import Path

import pytest

from mesh.cli.main import main
from mesh.config.analyze import analyze
from mesh.config.loader import load_dir
from mesh.config.validate import validate

DATA = Path(__file__).parent.parent / "data" / "config"

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - address: 10.0.0.1
    labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}
  - address: 10.0.0.2
    labels: {app: reviews, version: v2, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - address: 10.0.0.9
    labels: {app: legacy}
"""

RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v3
    labels: {version: v3}
"""

ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v9}
      weight: 25
    - destination: {host: ghost}
      weight: 25
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-canary, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
"""

SECURITY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: shop}
spec:
  selector:
    matchLabels: {app: payments}
  action: ALLOW
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-only, namespace: shop}
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
"""


def write(directory, name, text):
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def config(tmp_path):
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-rule.yaml", RULE)
    write(tmp_path, "02-routes.yaml", ROUTES)
    write(tmp_path, "03-security.yaml", SECURITY)
    return tmp_path


def findings_of(directory):
    loaded = load_dir(directory)
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    return [str(finding) for finding in analyze(objects)]


def test_every_kind_of_finding_names_file_line_resource_and_field(config):
    found = findings_of(config)
    assert found == [
        f"{config}/01-rule.yaml:10: DestinationRule/shop/reviews: spec.subsets[1].labels: subset 'v3' "
        "(version=v3) matches no endpoint of 'reviews.shop.svc.cluster.local' (2 endpoint(s) known); "
        "requests routed to it get 503 (UH)",
        f"{config}/02-routes.yaml:10: VirtualService/shop/reviews: spec.http[0].route[1].destination.subset: "
        "routes to unknown subset 'v9' of 'reviews.shop.svc.cluster.local'; defined subsets: v1, v3; "
        "requests routed here get 503 (NC)",
        f"{config}/02-routes.yaml:12: VirtualService/shop/reviews: spec.http[0].route[2].destination.host: "
        "routes to unknown host 'ghost.shop.svc.cluster.local': no ServiceEntry defines it; requests routed "
        "here get 503 (NC). Add a ServiceEntry or fix the host",
        f"{config}/02-routes.yaml:19: VirtualService/shop/reviews-canary: spec.hosts[0]: host "
        "'reviews.shop.svc.cluster.local' is also routed by VirtualService shop/reviews "
        f"({config}/02-routes.yaml:1); only one VirtualService applies per host (which one depends on the "
        "client's namespace): merge their http routes into one",
        f"{config}/03-security.yaml:5: AuthorizationPolicy/shop/nobody: spec.selector: selector (app=payments) "
        "matches no workload of namespace shop known from the files (3 workload(s): ServiceEntry endpoints "
        "and WorkloadEntries); the policy applies to nothing",
        f"{config}/03-security.yaml:23: PeerAuthentication/shop/strict: spec.mtls.mode: STRICT mTLS applies to "
        "endpoint 10.0.0.9 of ServiceEntry shop/legacy, which has no sidecar (no label "
        "security.istio.io/tlsMode: istio): clients send it plaintext, which STRICT refuses, and it cannot "
        "call STRICT workloads itself. Label it if it runs a sidecar, or use PERMISSIVE for it",
    ]


def test_workload_level_permissive_overrides_the_namespace_strict(config):
    write(config, "04-legacy-permissive.yaml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: legacy, namespace: shop}
        spec:
          selector:
            matchLabels: {app: legacy}
          mtls: {mode: PERMISSIVE}
    """)
    assert not any("STRICT" in finding for finding in findings_of(config))


def test_destination_rule_disable_towards_strict_endpoints(config):
    write(config, "01-rule.yaml", RULE.replace("  host: reviews\n",
                                               "  host: reviews\n  trafficPolicy:\n    tls: {mode: DISABLE}\n"))
    found = findings_of(config)
    assert any("DestinationRule/shop/reviews: spec.trafficPolicy.tls.mode: tls.mode DISABLE makes clients send "
               "plaintext to endpoint 10.0.0.1" in finding for finding in found)


def test_root_namespace_selector_looks_at_every_namespace(tmp_path):
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-policy.yaml", """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: reviews, namespace: istio-system}
        spec:
          selector:
            matchLabels: {app: reviews}
          action: DENY
          rules: [{}]
    """)
    assert findings_of(tmp_path) == []


def test_workload_entries_count_as_endpoints_and_workloads(tmp_path):
    write(tmp_path, "00.yaml", """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ratings}
        spec:
          hosts: [ratings]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 80, name: http, protocol: HTTP}]
          workloadSelector:
            labels: {app: ratings}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: ratings-vm}
        spec:
          address: 10.0.1.1
          labels: {app: ratings, version: v2, security.istio.io/tlsMode: istio}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ratings}
        spec:
          host: ratings
          subsets: [{name: v2, labels: {version: v2}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ratings}
        spec:
          selector: {matchLabels: {app: ratings}}
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: strict}
        spec:
          mtls: {mode: STRICT}
    """)
    assert findings_of(tmp_path) == []


def test_clean_fixtures_have_no_findings():
    assert findings_of(DATA / "bookinfo") == []


def test_cli_exit_codes_and_output(config, capsys):
    assert main(["analyze", str(DATA / "bookinfo")]) == 0
    assert "no findings" in capsys.readouterr().out
    assert main(["analyze", str(config)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 6
    assert "6 finding(s) in 4 file(s)" in captured.err
    assert main(["analyze", str(config / "missing")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_cli_reports_invalid_resources_too(tmp_path, capsys):
    write(tmp_path, "bad.yaml", ROUTES.replace("weight: 50", "weight: 0").replace("weight: 25", "weight: 0"))
    assert main(["analyze", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "weights sum to 0" in captured.out
    assert "validation error(s)" in captured.err


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
"""

EXTERNAL = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - address: 10.0.0.5
    labels: {app: payments, security.istio.io/tlsMode: istio}
"""


def test_strict_workload_reached_through_a_mesh_external_entry_gets_plaintext(tmp_path):
    # a sidecar-labelled endpoint of a MESH_EXTERNAL entry (the default location): no auto mTLS, as in Istio
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-payments.yaml", EXTERNAL)
    write(tmp_path, "02-strict.yaml", STRICT)
    found = [finding for finding in findings_of(tmp_path) if "payments" in finding]
    assert found == [
        f"{tmp_path}/02-strict.yaml:5: PeerAuthentication/shop/strict: spec.mtls.mode: STRICT mTLS applies to "
        "endpoint 10.0.0.5 of ServiceEntry shop/payments, but its clients reach it through ServiceEntry "
        f"shop/payments ({tmp_path}/01-payments.yaml:1), which is MESH_EXTERNAL (the default location): as in "
        "Istio, clients use no auto mTLS to a mesh-external service, so they send it plaintext, which STRICT "
        "refuses. Set location: MESH_INTERNAL on that ServiceEntry (or tls.mode: ISTIO_MUTUAL in a "
        "DestinationRule for it), or use PERMISSIVE for it"]
    write(tmp_path, "01-payments.yaml", EXTERNAL.replace("  resolution:", "  location: MESH_INTERNAL\n  resolution:"))
    assert not any("payments" in finding for finding in findings_of(tmp_path))
    write(tmp_path, "01-payments.yaml", EXTERNAL + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payments, namespace: shop}
spec:
  host: payments
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
""")
    assert not any("payments" in finding for finding in findings_of(tmp_path))


def test_destination_rule_of_an_unrelated_namespace_does_not_apply(tmp_path):
    # rules in namespace ops apply to the clients of ops only: not to those of shop (the service's namespace)
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-rules.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: ops}
        spec:
          host: reviews.shop.svc.cluster.local
          subsets: [{name: v1, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: legacy, namespace: ops}
        spec:
          host: legacy.shop.svc.cluster.local
          trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
    """)
    write(tmp_path, "02-routes.yaml", """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
    """)
    write(tmp_path, "03-strict.yaml", STRICT)
    found = findings_of(tmp_path)
    assert found == [
        f"{tmp_path}/02-routes.yaml:8: VirtualService/shop/reviews: spec.http[0].route[0].destination.subset: "
        "routes to subset 'v1' of 'reviews.shop.svc.cluster.local', which clients in namespace shop do not get; "
        "no DestinationRule that applies to them defines subsets for it; "
        f"DestinationRule ops/reviews ({tmp_path}/01-rules.yaml:1) defines it but does not apply to them: a "
        "DestinationRule applies only from the client's namespace, else the service's namespace, else the root "
        "namespace (istio-system), as exportTo allows, and rules of one host and namespace with different "
        "exportTo are not merged; their requests routed here get 503 (NC)",
        f"{tmp_path}/03-strict.yaml:5: PeerAuthentication/shop/strict: spec.mtls.mode: STRICT mTLS applies to "
        "endpoint 10.0.0.9 of ServiceEntry shop/legacy, which has no sidecar (no label "
        "security.istio.io/tlsMode: istio): clients in namespace shop send it plaintext, which STRICT refuses, "
        "and it cannot call STRICT workloads itself. Label it if it runs a sidecar, or use PERMISSIVE for it",
    ]


def test_destination_rules_of_one_host_and_namespace_are_merged(tmp_path):
    # merged as Istio does: the subsets of both rules, the trafficPolicy of the first (by name) only
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-rules.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: legacy-a, namespace: shop}
        spec:
          host: legacy
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
          subsets: [{name: old, labels: {app: legacy}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: legacy-b, namespace: shop}
        spec:
          host: legacy
          trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
          subsets: [{name: new, labels: {app: legacy}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews-a, namespace: shop}
        spec:
          host: reviews
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews-b, namespace: shop}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: DISABLE}}
    """)
    write(tmp_path, "02-routes.yaml", """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: legacy, namespace: shop}
        spec:
          hosts: [legacy]
          http:
          - route:
            - destination: {host: legacy, subset: new}
    """)
    write(tmp_path, "03-strict.yaml", STRICT)
    found = findings_of(tmp_path)
    # legacy-b's ISTIO_MUTUAL is not used: clients send plaintext; its subset "new" is;
    # reviews-b's DISABLE is not used either: the STRICT endpoints of reviews get mTLS
    assert found == [
        f"{tmp_path}/03-strict.yaml:5: PeerAuthentication/shop/strict: spec.mtls.mode: STRICT mTLS applies to "
        "endpoint 10.0.0.9 of ServiceEntry shop/legacy, which has no sidecar (no label "
        "security.istio.io/tlsMode: istio): clients send it plaintext, which STRICT refuses, and it cannot "
        "call STRICT workloads itself. Label it if it runs a sidecar, or use PERMISSIVE for it",
    ]


def test_destination_rules_with_different_export_to_are_not_merged(tmp_path):
    # Istio merges the rules of one host and namespace only when their exportTo are the same: a client of
    # shop gets the last one (by name), without the other's subset
    write(tmp_path, "00-services.yaml", SERVICES)
    write(tmp_path, "01-rules.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          subsets: [{name: v1, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews-v2, namespace: shop}
        spec:
          host: reviews
          exportTo: ["*"]
          subsets: [{name: v2, labels: {version: v2}}]
    """)
    write(tmp_path, "02-routes.yaml", """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
              weight: 50
            - destination: {host: reviews, subset: v2}
              weight: 50
    """)
    found = findings_of(tmp_path)
    assert len(found) == 1
    assert ("VirtualService/shop/reviews: spec.http[0].route[0].destination.subset: routes to unknown subset 'v1' "
            "of 'reviews.shop.svc.cluster.local'; defined subsets: v2; DestinationRule shop/reviews") in found[0]
