"""``GET /app-health/<container>/<livez|readyz|startupz>`` on the health port: the kubelet's app probes.

:class:`AppHealthPage` looks the path up among the recorded probes
(:mod:`mesh.proxy.app_probes`; any other path is 404, so the port reaches
nothing but those) and :class:`AppProber` runs the probe against the app on
its local address, past inbound capture, as the kubelet would have:

- ``httpGet``: a GET of the original path with the original headers (plus the
  kubelet's ``User-Agent``), over HTTP, or HTTPS without certificate checks
  (as the kubelet does); the app's status code is the answer (kubelet
  semantics: 200-399 pass), with its body left out;
- ``tcpSocket``: a connect; 200 when the app accepts it;
- within the probe's ``timeoutSeconds``; no answer in time, a refused or
  broken connection: 503 with the reason as one line of text.

The probes run on the reactor (twisted.web's Agent, no threads).  Their number
is bounded by the health port's connection limit: a connection carries one
request at a time.  A kubelet that hangs up cancels its probe.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

log = Logger()

#: The kubelet's User-Agent, for probes that come without one.
DEFAULT_USER_AGENT = b"kube-probe/txmesh"


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """The kubelet's HTTPS probes do not check the app's certificate; neither do these."""

    def creatorForNetloc(self, hostname, port):
        return CertificateOptions(verify=False)


class _Discard(protocol.Protocol):
    """A response body nobody reads: the connection is closed at once (a streaming app cannot hold it)."""

    def connectionMade(self):
        self.transport.stopProducing()

    def connectionLost(self, reason=protocol.connectionDone):
        """Closed on purpose; nothing to report."""


class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" log lines for each probe (the kubelet probes every few seconds)."""

    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A connection per probe (nothing kept open to the app), quietly."""

    _factory = _QuietFactory

    def __init__(self, reactor):
        super().__init__(reactor, persistent=False)


class AppProber:
    """Runs :class:`~mesh.proxy.app_probes.AppProbe` s against the app at ``address`` (its loopback address)."""

    def __init__(self, reactor, address: str):
        self._reactor = reactor
        self._host = f"[{address}]" if ":" in address else address
        self._agent = Agent(reactor, contextFactory=_NoVerification(), pool=_QuietPool(reactor))

    def probe(self, probe, user_agent: bytes = None):
        """A Deferred firing ``(status, text)``: the app's status (or 200 for TCP), else 503 and why."""
        target = f"{self._host}:{probe.port}"
        if probe.path is None:
            done = self._connect(probe)
            what = f"tcp connect to {target}"
        else:
            done = self._get(probe, target, user_agent or DEFAULT_USER_AGENT)
            what = f"GET {probe.scheme}://{target}{probe.path}"
        timer = self._reactor.callLater(probe.timeout, done.cancel)
        done.addBoth(_stop, timer)
        done.addErrback(self._failed, what, probe.timeout, timer)
        return done

    def _get(self, probe, target: str, user_agent: bytes):
        headers = Headers({b"user-agent": [user_agent], b"accept": [b"*/*"]})
        for name, _ in probe.headers:  # the probe's own headers win, Host and User-Agent included
            headers.removeHeader(name.encode())
        for name, value in probe.headers:
            headers.addRawHeader(name.encode(), value.encode("latin-1"))
        url = f"{probe.scheme}://{target}{probe.path}".encode("ascii")
        requested = self._agent.request(b"GET", url, headers)

        def answered(response):
            response.deliverBody(_Discard())
            return response.code, f"the app answered {response.code} to GET {probe.path} on port {probe.port}"

        return requested.addCallback(answered)

    def _connect(self, probe):
        endpoint = HostnameEndpoint(self._reactor, self._host.strip("[]"), probe.port)
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        factory.noisy = False
        connected = endpoint.connect(factory)

        def accepted(connection):
            connection.transport.loseConnection()
            return 200, f"port {probe.port} accepts connections"

        return connected.addCallback(accepted)

    @staticmethod
    def _failed(failure, what: str, timeout: float, timer):
        if timer.called:  # cancelled at the deadline (however the cancellation shows: connect, request)
            return 503, f"{what}: no answer within {timeout:g}s (the probe's timeoutSeconds)"
        if failure.check(ResponseFailed):
            reason = "; ".join(str(f.value) or type(f.value).__name__ for f in failure.value.reasons)
        else:
            reason = str(failure.value) or type(failure.value).__name__
        return 503, f"{what}: {reason}"


def _stop(result, timer):
    if timer.active():
        timer.cancel()
    return result


class AppHealthPage(resource.Resource):
    """``/app-health/<container>/<kind>``: the recorded probe's outcome; 404 for any other path."""

    isLeaf = True

    def __init__(self, prober: AppProber, probes: dict):
        super().__init__()
        self._prober = prober
        self._probes = probes

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        path = request.path.decode("latin-1")
        probe = self._probes.get(path)
        if probe is None:
            request.setResponseCode(404)
            return (f"no app probe at {path}: the sidecar probes only what the injector recorded "
                    f"({', '.join(sorted(self._probes)) or 'none'})\n").encode()
        finished = request.notifyFinish()
        outcome = self._prober.probe(probe, request.getHeader(b"user-agent"))
        finished.addErrback(lambda _: outcome.cancel())
        outcome.addCallback(self._answer, request, finished, path)
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(result, request, finished, path: str):
        status, text = result
        if status >= 400:
            log.info("app probe {path} failed: {reason}", path=path, status=status, reason=text)
        if finished.called:  # the kubelet hung up first
            return
        request.setResponseCode(status)
        request.write(text.encode() + b"\n")
        request.finish()
