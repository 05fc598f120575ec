"""TLS origination: the sidecar opens TLS of its own to an endpoint outside the mesh.

A DestinationRule ``tls`` with mode SIMPLE (or MUTUAL, presenting a client
certificate) makes the sidecar speak TLS to the endpoints of the service, as in
Istio's "Egress TLS Origination" task: the app sends plain HTTP to
``http://external.example/`` and its sidecar sends it over TLS to the
endpoint's port (the ServiceEntry's ``targetPort``, 443).

What is checked, as Envoy does for Istio:

- the server's chain, against ``caCertificates`` (a PEM file), or the system's
  CA bundle when none is given (Istio verifies against the OS's roots since 1.21,
  whose ``VERIFY_CERTIFICATE_AT_CLIENT`` became the default);
- the server's name: its certificate must carry one of ``subjectAltNames``
  (DNS names, IP addresses or URIs), or else the SNI sent (``sni``, by default
  the service's host: Istio's auto SNI); settings that give no name at all (a
  wildcard host without ``sni`` or ``subjectAltNames``) are refused, as Envoy
  would take the name from each request's Host and txmesh does not;
- nothing at all with ``insecureSkipVerify: true``.

The OpenSSL context is built once per distinct ``tls`` settings
(:class:`OriginationContexts`, held by the sidecar across config swaps: the
files are read then, not per connection), never per request.  A failed check
fails the try as a connect failure: 503 ``UF``, the reason in the response
body and in the access log's response code details.
"""

from __future__ import annotations

import ipaddress
import time
import weakref

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _openssl
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mesh.identity.tls import ALPN_HTTP1, SessionCache, origination_context
from mesh.proxy.retry import TLS_FAILURE

log = Logger()

#: The first certificate check that failed on a connection (OpenSSL's words), read when its handshake fails.
_verify_failures = weakref.WeakKeyDictionary()


def verify_failure(connection) -> str | None:
    """Why OpenSSL refused the server's chain on ``connection`` (an ``SSL.Connection``), or None."""
    return _verify_failures.get(connection)


def _record_verify_failure(connection, certificate, errno, depth, ok):
    """pyOpenSSL verify callback: remember the first failure (the handshake then fails with it)."""
    if not ok and connection not in _verify_failures:
        reason = _ffi.string(_openssl.X509_verify_cert_error_string(errno)).decode()
        subject = certificate.get_subject().CN or "(no common name)"
        _verify_failures[connection] = f"{reason} (certificate CN={subject}, depth {depth})"
    return ok


class OriginationTLS:
    """Wraps an endpoint pool's connections in TLS originated with one ``tls`` setting (a
    :class:`mesh.config.resources.ClientTLS`), as :class:`mesh.proxy.mtls.UpstreamTLS` does for mesh mTLS.

    ``problem`` is why the setting cannot be used (a file missing or invalid, no name
    to check the certificate against), or None.
    Sessions are resumed per endpoint, as Envoy does upstream (``sessions``, a
    :class:`mesh.identity.tls.SessionCache`): only one whose server passed the chain
    and name checks is kept, within its chain's validity, and the name is checked
    again on every connection.
    """

    def __init__(self, settings, context=None, problem=None):
        self.settings = settings
        self.context = context
        self.problem = problem or _no_name(settings)  # never a connection without a name check, unless skipped
        self.sessions = SessionCache(float("inf"))  # a MUTUAL client certificate is a file: no rotation to follow
        self.names = settings.names()
        self.server_name = settings.sni.encode() if settings.sni else None  # a host name (validated), never an IP

    def refusal(self):
        """Why TLS cannot be originated (the try fails with it), or None."""
        return self.problem

    def wrap(self, factory, peer, offer_h2=False):
        """``factory`` behind TLS to the endpoint ``peer``.

        ``offer_h2``: offer ALPN ``h2`` and ``http/1.1`` (an HTTP/2 try; the server may choose
        HTTP/1.1); else no ALPN, as Istio programs Envoy for HTTP/1.1 and TCP origination.
        """
        return TLSMemoryBIOFactory(_OriginatingClient(self, peer, offer_h2), True, factory)

    def verifier(self, identity=None):
        """The check run once the handshake is done (the chain is verified by then): the name."""
        return self.name_problem

    def keep_session(self, peer, transport):
        """``transport`` (to ``peer``) passed the checks and carried a response: keep its session."""
        self.sessions.keep(peer, transport.getHandle(), time.time())

    def name_problem(self, transport) -> str | None:
        """Why the server's certificate does not carry one of the names expected, or None."""
        if not self.names:
            return None
        certificate = transport.getPeerCertificate().to_cryptography()
        if any(_carries(certificate, name) for name in self.names):
            return None
        return (f"{TLS_FAILURE}the server's certificate is not for {' or '.join(self.names)} (its names: "
                f"{', '.join(_names_of(certificate)) or 'none'}); set the DestinationRule's tls.sni or "
                "tls.subjectAltNames to a name it carries")


@implementer(IOpenSSLClientConnectionCreator)
class _OriginatingClient:
    """A client connection of :class:`OriginationTLS` to ``peer``: its context, the SNI, ALPN, and a
    session kept for the peer if there is one."""

    def __init__(self, origination, peer, offer_h2):
        self.origination = origination
        self.peer = peer
        self.alpn = [b"h2", ALPN_HTTP1] if offer_h2 else None

    def clientConnectionForTLS(self, tlsProtocol):
        origination = self.origination
        connection = SSL.Connection(origination.context, None)
        connection.set_connect_state()
        if origination.server_name is not None:
            connection.set_tlsext_host_name(origination.server_name)
        if self.alpn is not None:
            connection.set_alpn_protos(self.alpn)
        origination.sessions.offer(self.peer, connection, time.time())
        return connection


def _carries(certificate, name: str) -> bool:
    """Whether ``certificate`` is for ``name``: an IP address, a URI (exact), or a DNS name (a
    wildcard certificate covers one label)."""
    try:
        if "://" in name:
            return name in _sans(certificate, x509.UniformResourceIdentifier)
        try:
            ipaddress.ip_address(name)
        except ValueError:
            verify_certificate_hostname(certificate, name)
        else:
            verify_certificate_ip_address(certificate, name)
    except VerificationError:
        return False
    return True


def _sans(certificate, kind) -> list:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(value) for value in san.get_values_for_type(kind)]


def _names_of(certificate) -> list:
    """The subject alternative names of ``certificate``, for an error message."""
    return [name for kind in (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier)
            for name in _sans(certificate, kind)]


class OriginationContexts:
    """One :class:`OriginationTLS` per distinct ``tls`` setting, kept for the sidecar's life.

    The files are read when a setting is first used (by the first endpoint pool that needs it):
    a file changed in place is read again only under another path or after a restart.
    """

    def __init__(self):
        self._by_settings = {}

    def get(self, settings) -> OriginationTLS:
        """The :class:`OriginationTLS` of ``settings`` (built on first use)."""
        origination = self._by_settings.get(settings)
        if origination is None:
            origination = self._by_settings[settings] = _build(settings)
        return origination


def _files(settings) -> list:
    """``[(field, path), ...]`` of the files ``settings`` names."""
    return [(field, path) for field, path in (
        ("caCertificates", settings.ca_certificates), ("clientCertificate", settings.client_certificate),
        ("privateKey", settings.private_key)) if path is not None]


def _build(settings) -> OriginationTLS:
    """Read the files of ``settings`` and build its context; a problem is kept as the refusal.

    Settings with no name to check the server's certificate against (no ``sni``, no
    ``subjectAltNames``: TLS to a wildcard host), unless ``insecureSkipVerify`` says to check none,
    are refused: any trusted certificate would do.  Envoy takes the name from each request's Host
    (Istio's auto SNI and auto SAN validation); txmesh does not.
    """
    files = {}
    for field, path in _files(settings):
        try:
            with open(path, "rb") as stream:
                files[field] = stream.read()
        except OSError as error:
            return _unusable(settings, f"cannot read tls.{field} {path}: {error.strerror}; give the path of a "
                                       "PEM file readable by the sidecar")
    try:
        context = origination_context(files.get("caCertificates"), files.get("privateKey"),
                                      files.get("clientCertificate"), verify=not settings.insecure_skip_verify,
                                      verify_callback=_record_verify_failure)
    except (ValueError, TypeError, SSL.Error) as error:
        given = ", ".join(f"{field} {path}" for field, path in _files(settings))
        return _unusable(settings, f"the files of the DestinationRule's tls ({given}) are not a usable PEM CA "
                                   f"bundle, certificate and matching key: {error}")
    nameless = _no_name(settings)
    if nameless is not None:
        return _unusable(settings, nameless)
    return OriginationTLS(settings, context)


def _no_name(settings) -> str | None:
    """Why ``settings`` cannot be used for want of a name to check the server's certificate against, or None."""
    if settings.names() or settings.insecure_skip_verify:
        return None
    return (f"tls.mode {settings.mode} without sni or subjectAltNames has no name to check the server's "
            "certificate against (a wildcard host gives none: txmesh does not take it from each request's Host); "
            "set sni (and subjectAltNames), or insecureSkipVerify: true to skip the name check")


def _unusable(settings, problem: str) -> OriginationTLS:
    log.warn("TLS origination with mode {mode} is not possible: {problem}", mode=settings.mode, problem=problem)
    return OriginationTLS(settings, problem=problem)
