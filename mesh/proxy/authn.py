"""The end-user authentication stage: RequestAuthentication's JWTs, verified before authorization.

Istio's semantics (Envoy's ``jwt_authn`` filter, which Istio puts before RBAC on the inbound side):

- A request **without a token** passes, with no request principal; refusing it
  is an AuthorizationPolicy's job (``requestPrincipals: ["*"]``).
- A request with a token that **fails** (bad format, issuer not configured for
  that location, expired or not yet valid with 60 s of clock skew, audience not
  allowed, no key matching its ``kid``/``alg``, bad signature, key set not
  fetched) gets ``401`` with Envoy's body (``Jwt is expired``, ...) and
  ``www-authenticate: Bearer realm="http://HOST/PATH", error="invalid_token"``;
  the access log's details are ``jwt_authn_access_denied{Jwt_is_expired}``.
  Every token found must verify (Envoy's rule); the first gives the principal.
- A verified token sets ``ctx.request_auth`` (:class:`RequestAuth`: principal
  ``iss/sub``, audiences, presenter ``azp``, the claims), which
  AuthorizationPolicy predicates read (:mod:`mesh.config.authz_predicates`).
  Its header is removed before forwarding unless ``forwardOriginalToken``
  (a token in a query parameter or cookie stays, as in Envoy);
  ``outputPayloadToHeader`` gets the payload as the token carries it
  (base64url), ``outputClaimToHeaders`` the string, number or boolean claims.
  Those output headers are removed from every request first, so the app
  never sees one the sidecar did not write.

Signatures are checked by PyJWT (with ``cryptography``) against the keys of
the rule: inline ``jwks``, or the key set of ``jwksUri``, which a
:class:`JwksSource` fetches with Twisted's HTTP client (:mod:`twisted.web.client`):

- at once when a config names it, then every :data:`REFRESH_INTERVAL`; after a
  failure, again with a capped backoff (:data:`RETRY`), keeping the keys of the
  last good fetch meanwhile;
- when a token names a ``kid`` the set does not have (a key rotation), at most
  once per :data:`KID_MISS_INTERVAL`, and when a token arrives while the set was
  never fetched, at most once per :data:`RETRY_AFTER_FAILURE`.

A request never waits for a fetch beyond that fetch's own timeout (the rule's
``timeout``, Istio's default 5 s): while the first fetch, or one started by an
unknown ``kid``, is in flight, the request raises
:class:`~mesh.proxy.outcome.Pending` and the exchange routes it again when the
fetch ends, once.  A key set that cannot be fetched makes its tokens fail with
401 (``Jwks remote fetch is failed``), as Istio rejects them when istiod
cannot fetch it; the sidecar's log says why, and recovers on the next good fetch.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import NamedTuple
from urllib.parse import parse_qsl

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from mesh.backoff import Backoff
from mesh.config.request_authn import parse_jwks
from mesh.proxy.outcome import LocalReply, Pending

log = Logger()

#: Envoy's default clock skew for ``exp`` and ``nbf``, seconds.
CLOCK_SKEW = 60
#: How often a key set is fetched again (istiod's default refresh interval), seconds.
REFRESH_INTERVAL = 20 * 60.0
#: After a failed fetch: the backoff of the background retries.
RETRY = (1.0, 300.0)
#: A token of a key set that was never fetched starts a fetch at most this often (Envoy's
#: ``failed_refetch_duration``), seconds.
RETRY_AFTER_FAILURE = 1.0
#: A token whose ``kid`` the set lacks starts a fetch at most this often, seconds.
KID_MISS_INTERVAL = 5.0
#: A key set larger than this is refused (bytes).
MAX_JWKS_BYTES = 512 * 1024
#: Verified tokens remembered, so a client that sends the same token again skips the signature check
#: (Envoy's ``jwt_cache_config``, 100 by default); the oldest goes first.
TOKEN_CACHE_SIZE = 100

# Envoy's messages (jwt_verify_lib), the body of the 401.
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
ISSUER_NOT_CONFIGURED = "Jwt issuer is not configured"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
VERIFICATION_FAILED = "Jwt verification fails"
FETCH_FAILED = "Jwks remote fetch is failed"

_CHECKED = {"verify_aud": False, "verify_iss": False, "verify_iat": False, "verify_sub": False, "verify_jti": False}
#: The characters a JWT is made of (Envoy takes the first run of them after a header's prefix).
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")
#: ``ctx.request_auth`` while the request waits for a key set: the second pass does not wait again.
_WAITED = object()


class RequestAuth:
    """What a verified JWT tells about the request: ``principal`` (``iss/sub``, None without ``sub``),
    ``audiences`` (the ``aud`` claim as a list), ``presenter`` (``azp``) and ``claims`` (the payload)."""

    __slots__ = ("principal", "audiences", "presenter", "claims")

    def __init__(self, claims: dict):
        issuer, subject = claims.get("iss"), claims.get("sub")
        self.principal = f"{issuer}/{subject}" if isinstance(subject, str) and subject else None
        audience = claims.get("aud")
        self.audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        presenter = claims.get("azp")
        self.presenter = presenter if isinstance(presenter, str) else None
        self.claims = claims


class Authenticator:
    """The stage: verifies the tokens of inbound requests against the workload's
    :class:`~mesh.config.request_authn.RequestAuthn`, and owns the :class:`JwksSource` of each ``jwksUri``
    (kept across config changes while a config names the URI)."""

    def __init__(self, reactor, agent=None):
        self.reactor = reactor
        self.agent = agent if agent is not None else Agent(reactor)
        self.sources = {}
        self._verified = {}  # token -> _Verified, oldest first

    def update(self, table) -> None:
        """A new config: start fetching the key sets it names, stop those it no longer names."""
        wanted = {uri: (timeout, issuers) for uri, timeout, issuers in (table.jwks_uris if table else ())}
        for uri in [uri for uri in self.sources if uri not in wanted]:
            self.sources.pop(uri).stop()
        for uri, (timeout, issuers) in wanted.items():
            source = self.sources.get(uri)
            if source is None:
                self.sources[uri] = source = JwksSource(self.reactor, self.agent, uri, timeout, issuers)
                source.fetch()
            else:
                source.timeout, source.issuers = timeout, issuers

    def stop(self) -> None:
        """The sidecar stops: no more fetches."""
        for source in self.sources.values():
            source.stop()

    def authenticate(self, ctx, table) -> None:
        """Verify the request's tokens; set ``ctx.request_auth`` and the forwarded headers.

        Raises :class:`~mesh.proxy.outcome.LocalReply` (401) for a token that
        fails, :class:`~mesh.proxy.outcome.Pending` to wait for a key set.
        """
        may_wait = ctx.request_auth is not _WAITED
        ctx.request_auth = None
        if table.output_headers:
            _remove_headers(ctx, table.output_headers)
        found = _tokens(ctx, table)
        if not found:
            return
        verified = []
        for token, providers, header in found:
            provider, claims = self._verify(ctx, token, providers, may_wait)
            verified.append((token, provider, header, claims))
        ctx.request_auth = RequestAuth(verified[0][3])
        _output(ctx, verified)

    def status(self) -> list:
        """The key sets and how their fetches went, for ``/config_dump``."""
        return [source.status() for _, source in sorted(self.sources.items())]

    def _verify(self, ctx, token, providers, may_wait) -> tuple:
        """``(provider, claims)`` of the provider that verifies ``token``; raises LocalReply or Pending.

        A token verified before by one of ``providers``, with the key set still in force, is taken from
        the cache: only its time limits are checked again.
        """
        hit = self._verified.get(token)
        if hit is not None and any(provider is hit.provider for provider in providers) \
                and self._key_set(hit.provider) is hit.keys:
            _check_times(ctx, hit.claims, self.reactor.seconds())
            return hit.provider, hit.claims
        provider, claims = self._verify_signature(ctx, token, providers, may_wait)
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(provider, self._key_set(provider), claims)
        return provider, claims

    def _key_set(self, provider):
        """The key set in force for ``provider`` (inline, or the last one fetched; None: none yet)."""
        if provider.keys is not None:
            return provider.keys
        source = self.sources.get(provider.jwks_uri)
        return None if source is None else source.keys

    def _verify_signature(self, ctx, token, providers, may_wait) -> tuple:
        """:meth:`_verify` without the cache: PyJWT checks the signature and the time limits.

        PyJWT is imported here: only a port with a RequestAuthentication gets this far, and
        importing it at load costs every sidecar about 0.4 MiB (issue #15).
        """
        import jwt

        header, claims = _peek(ctx, token)
        issuer = claims.get("iss")
        candidates = [provider for provider in providers if provider.issuer == issuer]
        if not candidates:
            raise _denied(ctx, ISSUER_NOT_CONFIGURED)
        audiences = claims.get("aud")
        audiences = {audiences} if isinstance(audiences, str) else set(audiences) if isinstance(audiences, list) \
            else set()
        candidates = [provider for provider in candidates
                      if not provider.audiences or not provider.audiences.isdisjoint(audiences)]
        if not candidates:
            raise _denied(ctx, AUDIENCE_NOT_ALLOWED)
        kid, alg = header.get("kid"), header.get("alg")
        kid = kid if isinstance(kid, str) else None
        problem = NO_MATCHING_KEY
        for provider in candidates:
            keys, problem = self._keys(ctx, provider, kid, alg, may_wait)
            for key in keys:
                try:
                    return provider, jwt.decode(token, key.key, algorithms=[alg], options=_CHECKED,
                                                leeway=CLOCK_SKEW)
                except jwt.ExpiredSignatureError:
                    raise _denied(ctx, EXPIRED) from None
                except jwt.ImmatureSignatureError:
                    raise _denied(ctx, NOT_YET_VALID) from None
                except jwt.InvalidSignatureError:
                    problem = VERIFICATION_FAILED
                except jwt.InvalidTokenError:
                    raise _denied(ctx, VERIFICATION_FAILED) from None
        raise _denied(ctx, problem)

    def _keys(self, ctx, provider, kid, alg, may_wait) -> tuple:
        """``(keys matching kid and alg, the problem if there are none)``; may raise Pending."""
        if provider.keys is not None:
            keys = [key for key in provider.keys if key.matches(kid, alg)]
            return keys, NO_MATCHING_KEY
        source = self.sources.get(provider.jwks_uri)
        if source is None:
            return [], FETCH_FAILED
        now = self.reactor.seconds()
        if source.keys is None:
            if may_wait and source.start_for_token(now, RETRY_AFTER_FAILURE, kid_miss=False):
                raise _pending(ctx, source)
            return [], FETCH_FAILED
        keys = [key for key in source.keys if key.matches(kid, alg)]
        if not keys and may_wait and source.start_for_token(now, KID_MISS_INTERVAL, kid_miss=True):
            raise _pending(ctx, source)
        return keys, NO_MATCHING_KEY


class _Verified(NamedTuple):
    """A verified token in the cache: who verified it, with which key set, and its claims."""

    provider: object
    keys: object
    claims: dict


def _check_times(ctx, claims, now: float) -> None:
    """``exp`` and ``nbf`` of a cached token, with PyJWT's rules and Envoy's clock skew."""
    expires, not_before = claims.get("exp"), claims.get("nbf")
    if isinstance(expires, (int, float)) and now > expires + CLOCK_SKEW:
        raise _denied(ctx, EXPIRED)
    if isinstance(not_before, (int, float)) and now < not_before - CLOCK_SKEW:
        raise _denied(ctx, NOT_YET_VALID)


def _peek(ctx, token: str) -> tuple:
    """``(header, claims)`` of a token, unverified: they choose the rule and the key that PyJWT then
    verifies the token with (signature, ``exp``, ``nbf``); raises the 401 of a token that is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _denied(ctx, BAD_FORMAT)
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in parts[:2])
    except (ValueError, binascii.Error):
        raise _denied(ctx, VERIFICATION_FAILED) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _denied(ctx, VERIFICATION_FAILED)
    return header, claims


def _pending(ctx, source) -> Pending:
    ctx.request_auth = _WAITED
    return Pending(source.wait())


def _denied(ctx, error: str) -> LocalReply:
    """Envoy's 401 for a token that fails: its message, ``www-authenticate`` and response code details."""
    realm = f'Bearer realm="http://{ctx.authority.decode("latin-1")}{ctx.uri_path}", error="invalid_token"'
    ctx.request_auth = None
    return LocalReply(401, "", error, "jwt_authn_access_denied{" + error.replace(" ", "_") + "}",
                      ((b"www-authenticate", realm.encode("latin-1")),))


# -- tokens in the request, and the headers of verified ones ----------------------------------------------

def _tokens(ctx, table) -> list:
    """``[(token, providers, header name or None)]``: every token the request carries where rules look."""
    found = []
    headers = ctx.headers
    for name, prefix, providers in table.headers:
        value = headers.get(name)
        if value is not None and value.startswith(prefix):
            found.append((_token_in(value[len(prefix):]), providers, name))
    if table.params and "?" in ctx.path:
        query = dict(parse_qsl(ctx.path.partition("?")[2]))
        found += [(query[name], providers, None) for name, providers in table.params if query.get(name)]
    if table.cookies and "cookie" in headers:
        cookies = dict(part.strip().partition("=")[::2] for part in headers["cookie"].split(";"))
        found += [(cookies[name], providers, None) for name, providers in table.cookies if cookies.get(name)]
    return found


def _token_in(text: str) -> str:
    """The token after a header's prefix: the first run of JWT characters (Envoy skips what is not one)."""
    found = _TOKEN.search(text)
    return text if found is None else found.group()


def _output(ctx, verified) -> None:
    """Remove forwarded token headers and write the output headers of the verified tokens."""
    removed = {header for _, provider, header, _ in verified if header is not None and not provider.forward}
    if removed:
        _remove_headers(ctx, removed)
    for token, provider, _, claims in verified:
        if provider.payload_header:
            _set_header(ctx, provider.payload_header, token.split(".")[1])
        for header, path in provider.claim_headers:
            value = _claim_text(claims, path)
            if value is not None:
                _set_header(ctx, header, value)


def _claim_text(claims, path) -> str | None:
    """A string, number or boolean claim as header text (Istio's outputClaimToHeaders); None otherwise."""
    value = claims
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    return None


def _remove_headers(ctx, names) -> None:
    headers = ctx.headers
    if any(name in headers for name in names):
        for name in names:
            headers.pop(name, None)
        encoded = {name.encode() for name in names}
        ctx.raw_headers = [pair for pair in ctx.raw_headers if pair[0].lower() not in encoded]


def _set_header(ctx, name: str, value: str) -> None:
    _remove_headers(ctx, (name,))
    ctx.headers[name] = value
    ctx.raw_headers = [*ctx.raw_headers, (name.encode(), value.encode("latin-1", "replace"))]


# -- key sets fetched from jwksUri -----------------------------------------------------------------------

class JwksSource:
    """The key set at one ``jwksUri``: fetched, refreshed, and fetched again on demand (rate-limited).

    ``keys`` is the :class:`~mesh.config.request_authn.JwtKey` tuple of the
    last good fetch (None before one); ``error`` why the last fetch failed.
    """

    def __init__(self, reactor, agent, uri: str, timeout: float, issuers: tuple):
        self.reactor = reactor
        self.agent = agent
        self.uri = uri
        self.timeout = timeout
        self.issuers = issuers
        self.keys = None
        self.error = None
        self.fetches = 0
        self.failures = 0
        self.fetched_at = None
        self._fetching = None
        self._waiters = []
        self._timer = None
        self._attempted = -math.inf
        self._kid_miss = -math.inf
        self._backoff = Backoff(*RETRY)
        self._stopped = False

    def start_for_token(self, now: float, interval: float, kid_miss: bool) -> bool:
        """A token needs a fetch: start one unless the rate limit says no; True when a fetch is in flight."""
        if self._fetching is None:
            last = self._kid_miss if kid_miss else self._attempted
            if now - last < interval:
                return False
            if kid_miss:
                self._kid_miss = now
            self.fetch()
        return self._fetching is not None

    def wait(self) -> defer.Deferred:
        """A Deferred that fires (with None) when the fetch in flight ends."""
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def fetch(self) -> None:
        """Fetch the key set now (no-op while a fetch is in flight)."""
        if self._fetching is not None or self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._attempted = self.reactor.seconds()
        self.fetches += 1
        request = self.agent.request(b"GET", self.uri.encode("ascii"), Headers({b"accept": [b"application/json"]}))
        request.addCallback(self._read)
        request.addTimeout(self.timeout, self.reactor)
        self._fetching = request
        request.addCallback(self._fetched)
        request.addErrback(self._failed)
        request.addBoth(self._release)

    def stop(self) -> None:
        """No more fetches (the config no longer names this key set, or the sidecar stops)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._fetching is not None:
            self._fetching.cancel()

    def status(self) -> dict:
        return {"jwks_uri": self.uri, "issuers": list(self.issuers),
                "keys": None if self.keys is None else [key.kid for key in self.keys],
                "fetches": self.fetches, "failures": self.failures, "last_error": self.error}

    def _read(self, response):
        if response.code != 200:
            response.deliverBody(_Discard())
            raise JwksError(f"the server answered HTTP {response.code}")
        body = _LimitedBody(MAX_JWKS_BYTES)
        response.deliverBody(body)
        return body.done

    def _fetched(self, body: bytes) -> None:
        keys, problem = parse_jwks(body)
        if problem:
            raise JwksError(problem)
        if self.failures:
            log.info("JWKS {uri} fetched again after {failures} failed fetches: tokens of {issuers} are verified "
                     "again", uri=self.uri, failures=self.failures, issuers=", ".join(self.issuers))
        elif self.keys is None or [k.kid for k in keys] != [k.kid for k in self.keys]:
            log.info("JWKS {uri} fetched: keys {kids}", uri=self.uri, kids=", ".join(str(k.kid) for k in keys))
        self.keys, self.error, self.failures = keys, None, 0
        self.fetched_at = self.reactor.seconds()
        self._backoff.reset()
        self._schedule(REFRESH_INTERVAL)

    def _failed(self, failure) -> None:
        if self._stopped:
            return
        self.failures += 1
        self.error = _reason(failure, self.timeout)
        delay = self._backoff.next()
        if self.keys is None:
            log.error("cannot fetch JWKS {uri}: {error}; requests with a token of {issuers} get 401 ({message}) "
                      "until a fetch succeeds; next try in {delay:.1f}s, or at the next such request after "
                      "{interval:g}s", uri=self.uri, error=self.error, issuers=", ".join(self.issuers),
                      message=FETCH_FAILED, delay=delay, interval=RETRY_AFTER_FAILURE)
        else:
            log.warn("cannot refresh JWKS {uri}: {error}; the keys fetched before stay in use; next try in "
                     "{delay:.1f}s", uri=self.uri, error=self.error, delay=delay)
        self._schedule(delay)

    def _release(self, _) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._timer = self.reactor.callLater(delay, self.fetch)


class JwksError(Exception):
    """A key set could not be used: the server's answer, or what is wrong with the document."""


def _reason(failure, timeout: float) -> str:
    """Why a fetch failed, in a few words."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return f"no answer within {timeout:g}s (the rule's timeout)"
    if failure.check(JwksError):
        return failure.getErrorMessage()
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


class _LimitedBody(protocol.Protocol):
    """Collects a response body of at most ``limit`` bytes; ``done`` fires with it (cancelling it stops
    the transfer)."""

    def __init__(self, limit: int):
        self.done = defer.Deferred(lambda _: self.transport.stopProducing() if self.transport else None)
        self.limit = limit
        self.chunks = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:  # cancelled (the fetch timed out)
            return
        if self.size > self.limit:
            self.done.errback(JwksError(f"the key set is larger than {self.limit} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class _Discard(protocol.Protocol):
    """Reads and drops the body of a refused answer."""
