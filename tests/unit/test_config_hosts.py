"""Host names: qualification, aliases, wildcards, validity."""

import pytest

from mesh.config import hosts


@pytest.mark.parametrize("host,namespace,expected", [
    ("reviews", "bookinfo", "reviews.bookinfo.svc.cluster.local"),
    ("Reviews:9080", "bookinfo", "reviews.bookinfo.svc.cluster.local"),
    ("reviews.bookinfo", "default", "reviews.bookinfo"),  # has a dot: taken as written, as Istio does
    ("reviews.bookinfo.svc.cluster.local", "other", "reviews.bookinfo.svc.cluster.local"),
    ("*.example.com", "bookinfo", "*.example.com"),
    ("10.0.0.1", "bookinfo", "10.0.0.1"),
    ("[2001:db8::1]:80", "bookinfo", "2001:db8::1"),
    ("2001:db8::1", "bookinfo", "2001:db8::1"),
])
def test_fqdn(host, namespace, expected):
    assert hosts.fqdn(host, namespace) == expected


def test_fqdn_with_another_cluster_domain():
    assert hosts.fqdn("api", "shop", domain="corp.internal") == "api.shop.svc.corp.internal"


def test_aliases_follow_the_kubernetes_dns_search_path():
    name = "reviews.bookinfo.svc.cluster.local"
    assert hosts.aliases(name) == (name, "reviews.bookinfo.svc", "reviews.bookinfo", "reviews")
    assert hosts.aliases(name, client_namespace="bookinfo")[-1] == "reviews"
    # the bare name resolves only inside the service's own namespace
    assert hosts.aliases(name, client_namespace="other") == (name, "reviews.bookinfo.svc", "reviews.bookinfo")
    assert hosts.aliases("api.example.com") == ("api.example.com",)
    assert hosts.aliases("a.b.c.svc.cluster.local") == ("a.b.c.svc.cluster.local",)


@pytest.mark.parametrize("pattern,host,expected", [
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "aexample.com", False),
    ("*.example.com", "*.a.example.com", True),
    ("a.example.com", "a.example.com", True),
    ("a.example.com", "b.example.com", False),
])
def test_covers(pattern, host, expected):
    assert hosts.covers(pattern, host) is expected


@pytest.mark.parametrize("host,allow_ip,problem", [
    ("reviews", False, None),
    ("*.example.com", False, None),
    ("10.1.2.3", True, None),
    ("10.1.2.3", False, "an IP address is not allowed here; use a host name"),
    ("*", False, "the catch-all host '*' is not allowed here"),
    ("foo:80", False, "hosts must not include a port"),
    ("foo.*.com", False, "invalid host 'foo.*.com'"),
    ("under_score.com", False, "invalid host 'under_score.com'"),
    ("", False, "must be a non-empty host name"),
])
def test_check(host, allow_ip, problem):
    result = hosts.check(host, allow_ip=allow_ip)
    assert (result is None) if problem is None else result.startswith(problem)


def test_normalize_strips_port_and_case():
    assert hosts.normalize("Reviews.Bookinfo:9080") == "reviews.bookinfo"
    assert hosts.normalize("[::1]:8080") == "::1"
    assert hosts.normalize("::1") == "::1"
