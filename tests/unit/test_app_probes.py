"""``--app-probers`` (mesh.proxy.app_probes): what the injector records parses into AppProbes; anything else is
refused naming the probe and the field."""

from __future__ import annotations

import json

import pytest

from mesh.proxy.app_probes import AppProbe, parse_app_probers


def test_http_https_and_tcp_probes():
    probes = parse_app_probers(json.dumps({
        "/app-health/web/readyz": {"httpGet": {"path": "/healthz?x=1", "port": 8080, "scheme": "HTTP",
                                               "httpHeaders": [{"name": "X-A", "value": "1"},
                                                               {"name": "X-A", "value": "2"}]},
                                   "timeoutSeconds": 3},
        "/app-health/web/livez": {"httpGet": {"path": "healthz", "port": 8443, "scheme": "HTTPS"}},
        "/app-health/db-1/startupz": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 2},
    }))
    assert probes == {
        "/app-health/web/readyz": AppProbe(port=8080, timeout=3.0, path="/healthz?x=1", scheme="http",
                                           headers=(("X-A", "1"), ("X-A", "2"))),
        "/app-health/web/livez": AppProbe(port=8443, timeout=1.0, path="/healthz", scheme="https"),
        "/app-health/db-1/startupz": AppProbe(port=5432, timeout=2.0),
    }
    assert [probe.kind for probe in probes.values()] == ["http", "https", "tcp"]


@pytest.mark.parametrize("text", ["", "  ", None])
def test_nothing_is_no_probes(text):
    assert parse_app_probers(text) == {}


@pytest.mark.parametrize("document, words", [
    ("[1]", "want a JSON object"),
    ("{", "not JSON"),
    ({"/app-health/web/ready": {"tcpSocket": {"port": 1}}}, "'/app-health/web/ready': a probe's key is"),
    ({"/app-health/Web/readyz": {"tcpSocket": {"port": 1}}}, "a probe's key is"),
    ({"/app-health/a/b/readyz": {"tcpSocket": {"port": 1}}}, "a probe's key is"),
    ({"/app-health/web/readyz": {"httpGet": {"port": 1}, "tcpSocket": {"port": 1}}}, "either httpGet or tcpSocket"),
    ({"/app-health/web/readyz": {"exec": {"command": ["true"]}}}, "either httpGet or tcpSocket"),
    ({"/app-health/web/readyz": {"tcpSocket": {"port": 0}}}, "port must be a number (1-65535), got 0"),
    ({"/app-health/web/readyz": {"tcpSocket": {"port": True}}}, "port must be a number"),
    ({"/app-health/web/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}, "timeoutSeconds must be"),
    ({"/app-health/web/readyz": {"httpGet": {"port": 1, "path": "/a b"}}}, "printable ASCII without spaces"),
    ({"/app-health/web/readyz": {"httpGet": {"port": 1, "scheme": "grpc"}}}, "scheme must be HTTP or HTTPS"),
    ({"/app-health/web/readyz": {"httpGet": {"port": 1, "httpHeaders": [{"name": "a b", "value": "1"}]}}},
     "httpHeaders wants"),
    ({"/app-health/web/readyz": {"httpGet": {"port": 1, "httpHeaders": [{"name": "a", "value": "1\r\nX: y"}]}}},
     "httpHeaders wants"),
])
def test_malformed_probers_name_what_is_wrong(document, words):
    with pytest.raises(ValueError) as raised:
        parse_app_probers(document if isinstance(document, str) else json.dumps(document))
    assert words in str(raised.value)
