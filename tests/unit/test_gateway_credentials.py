"""The Secrets a gateway gets (credentialName): scoping in the distributor, the frame field, the private dir."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
from twisted.internet.task import Clock

from mesh import protocol as proto
from mesh.control.kube.secrets import TLSSecretCache
from mesh.proxy.gateway_credentials import write_credentials
from tests.unit.test_protocol import FakeStream, distributor

PEM = {"tls.crt": "-----BEGIN CERTIFICATE-----\nA\n", "tls.key": "-----BEGIN PRIVATE KEY-----\nB\n"}


def gateway_resource():
    """A Gateway in shop selecting istio=ingressgateway, whose HTTPS server names the Secret web-tls."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "gw", "namespace": "shop"},
            "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{
                "port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["web.example"],
                "tls": {"mode": "SIMPLE", "credentialName": "web-tls"}}]}}


def stream(node, namespace, gateway):
    fake = FakeStream(node, namespace, {"istio": "ingressgateway"})
    fake.workload = dataclasses.replace(fake.workload, gateway=gateway)
    return fake


def credentials(dist, fake) -> dict:
    return dist.snapshot(fake.workload)[1].credentials


def test_only_a_gateway_of_the_secrets_namespace_gets_exactly_the_named_secrets():
    dist = distributor(Clock())
    dist.secret_access = lambda namespace, service_account: True
    dist.set_resources([gateway_resource()])
    dist.set_credentials({("shop", "web-tls"): PEM, ("shop", "web-tls-cacert"): {"ca.crt": PEM["tls.crt"]},
                          ("shop", "unnamed"): PEM, ("other", "web-tls"): PEM})
    gateway, sidecar, foreign = stream("g", "shop", True), stream("s", "shop", False), stream("o", "other", True)
    assert credentials(dist, gateway) == {"web-tls": PEM, "web-tls-cacert": {"ca.crt": PEM["tls.crt"]}}
    assert credentials(dist, sidecar) == {}
    assert credentials(dist, foreign) == {"web-tls": PEM}  # its own namespace's Secret of that name
    frame = json.loads(dist.snapshot(gateway.workload)[1].frame()[4:])
    assert frame["credentials"] == {"v": 1, "secrets": credentials(dist, gateway)}
    assert "credentials" not in json.loads(dist.snapshot(sidecar.workload)[1].frame()[4:])


def test_a_rotated_secret_changes_the_gateways_version_only():
    dist = distributor(Clock())
    dist.secret_access = lambda namespace, service_account: True
    dist.set_resources([gateway_resource()])
    dist.set_credentials({("shop", "web-tls"): PEM})
    gateway, sidecar = stream("g", "shop", True), stream("s", "shop", False)
    before = dist.snapshot(gateway.workload)[1].version, dist.snapshot(sidecar.workload)[1].version
    dist.set_credentials({("shop", "web-tls"): {**PEM, "tls.crt": "-----BEGIN CERTIFICATE-----\nC\n"}})
    after = dist.snapshot(gateway.workload)[1].version, dist.snapshot(sidecar.workload)[1].version
    assert after[0] != before[0] and after[1] == before[1]


def test_a_gateway_whose_service_account_may_not_read_secrets_gets_none_and_is_told_why():
    dist = distributor(Clock())
    dist.set_resources([gateway_resource()])
    dist.set_credentials({("shop", "web-tls"): PEM})
    verdicts = {"ingress": True}  # service account -> what the SubjectAccessReview said (absent: not yet)
    dist.secret_access = lambda namespace, service_account: verdicts.get(service_account)
    allowed, denied = stream("g", "shop", True), stream("h", "shop", True)
    allowed.workload = dataclasses.replace(allowed.workload, service_account="ingress")
    denied.workload = dataclasses.replace(denied.workload, service_account="other")
    assert credentials(dist, allowed) == {"web-tls": PEM}
    assert credentials(dist, denied) == {}  # same namespace and labels, its own view
    (unknown,) = dist.snapshot(denied.workload)[1].warnings
    assert "no SubjectAccessReview verdict yet for service account shop/other" in unknown
    verdicts["other"] = False
    (warning,) = dist.snapshot(denied.workload)[1].warnings
    assert "shop/other may not get Secrets in namespace shop" in warning and "RoleBinding" in warning
    verdicts["other"] = True
    assert credentials(dist, denied) == {"web-tls": PEM} and not dist.snapshot(denied.workload)[1].warnings


@pytest.mark.parametrize("field, reason", [
    ({"v": 2, "secrets": {}}, "version 2"),
    ({"v": 1, "secrets": {"../etc": PEM}}, "not a Secret name"),
    ({"v": 1, "secrets": {"a": {"passwd": "x"}}}, "must map"),
])
def test_a_malformed_credentials_field_is_refused(field, reason):
    with pytest.raises(ValueError, match=reason):
        proto.credentials_of({"credentials": field})


def test_the_cache_keeps_the_tls_keys_of_a_generic_secret_and_nothing_else():
    import base64
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    generic = {"metadata": {"name": "g", "namespace": "shop"},
               "data": {"cert": encode(PEM["tls.crt"]), "key": encode(PEM["tls.key"]), "token": encode("secret")}}
    cache = TLSSecretCache("secrets")
    cache.replace([generic, {"metadata": {"name": "t", "namespace": "shop"}, "data": {"token": encode("x")}}])
    assert cache.values() == [{"metadata": {"namespace": "shop", "name": "g"}, "tls": PEM},
                              {"metadata": {"namespace": "shop", "name": "t"}, "tls": {}}]


def test_written_privately_and_a_secret_no_longer_sent_is_removed(tmp_path):
    directory = str(tmp_path / "creds")
    write_credentials(directory, {"a": PEM, "b": PEM})
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(directory, "a", "tls.key")).st_mode) == 0o600
    write_credentials(directory, {"a": {"tls.crt": PEM["tls.crt"]}})
    assert sorted(os.listdir(directory)) == ["a"] and os.listdir(os.path.join(directory, "a")) == ["tls.crt"]
