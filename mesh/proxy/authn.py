"""The end-user authentication stage: RequestAuthentication's JWTs, verified before authorization.

Istio's semantics (Envoy's ``jwt_authn`` filter as Istio's ``convertToEnvoyJwtConfig`` configures it,
before RBAC on the inbound side):

- A request **without a token** passes, with no request principal; refusing it
  is an AuthorizationPolicy's job (``requestPrincipals: ["*"]``).  So does a
  **CORS preflight** (``OPTIONS`` with ``Origin`` and
  ``Access-Control-Request-Method``), whatever tokens it carries (Istio's
  ``bypass_cors_preflight``).
- Each rule is one Envoy provider, and the providers are sorted by issuer.  A
  provider finds the tokens in the places its rule names (Envoy's extractor:
  headers, then query parameters, then cookies) and verifies them from the
  last found to the first; it fails with the first token that fails (bad
  format, issuer not the rule's, expired or not yet valid with 60 s of clock
  skew, audience not allowed, no key matching its ``kid``/``alg``, bad
  signature, key set not fetched), else succeeds if it found any.
- Istio's requirement: one rule is ``requires_any[P, allow_missing]``; several
  are ``requires_any[P0, P1, ..., requires_all[requires_any[Pi, allow_missing]
  ...]]``.  So the first provider (in issuer order) whose tokens all verify lets
  the request through, whatever other places hold (a valid token in
  ``Authorization`` passes beside a garbage ``x-other`` of another rule); when
  none does, every provider is tried again with its tokens optional, and the
  first failure refuses the request.
- A refused request gets Envoy's reply: ``401`` (``403`` for an audience not
  allowed), the error as body (``Jwt is expired``, ...) and
  ``www-authenticate: Bearer realm="http://HOST/PATH", error="invalid_token"``;
  the access log's details are ``jwt_authn_access_denied{Jwt_is_expired}``.
  The error is Envoy's aggregate over the requirement: the last one that is
  neither "missing" nor "issuer not configured", else "issuer not configured".
- A verified token sets ``ctx.request_auth`` (:class:`RequestAuth`: principal
  ``iss/sub``, audiences, presenter ``azp``, the claims as Envoy's payload
  metadata has them: ``scope``, ``permission`` and a rule's
  ``spaceDelimitedClaims`` split on spaces into lists), which
  AuthorizationPolicy predicates read (:mod:`mesh.config.authz_predicates`);
  the last token verified gives it.  Unless ``forwardOriginalToken``, the token
  is removed before forwarding: its header, or its query parameter (the rest
  of the query is kept as sent); a cookie stays, as in Envoy.
  ``outputPayloadToHeader`` gets the payload as the token carries it
  (base64url), ``outputClaimToHeaders`` the string, number (Envoy's format:
  ``3``, ``1.500000``) or boolean claims as the token has them.  Those output
  headers are removed from every request first, so the app never sees one the
  sidecar did not write.

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
fetch ends, once (the request is changed only once its verification is done).
A key set that cannot be fetched makes its tokens fail with
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
from urllib.parse import unquote

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from mesh.backoff import Backoff
from mesh.config.request_authn import parse_jwks, sanitize_audience
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
MISSING = "Jwt is missing"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
ISSUER_NOT_CONFIGURED = "Jwt issuer is not configured"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
VERIFICATION_FAILED = "Jwt verification fails"
FETCH_FAILED = "Jwks remote fetch is failed"

# exp and nbf are checked by _check_times, with Envoy's rules, before the signature (as Envoy orders them).
_CHECKED = {"verify_aud": False, "verify_iss": False, "verify_iat": False, "verify_sub": False, "verify_jti": False,
            "verify_exp": False, "verify_nbf": False}
#: A character a JWT is made of: after a header's prefix, Envoy skips to the first one.
_JWT_CHAR = re.compile(r"[A-Za-z0-9_.\-]")
#: ``ctx.request_auth`` while the request waits for a key set: the second pass does not wait again.
_WAITED = object()
#: Where a token was found (the third item of a location is the header, parameter or cookie name).
_HEADER, _PARAM, _COOKIE = "header", "param", "cookie"


class RequestAuth:
    """What a verified JWT tells about the request: ``principal`` (``iss/sub``, None without ``sub``),
    ``audiences`` (the ``aud`` claim as a list), ``presenter`` (``azp``) and ``claims`` (the payload, with
    the space-delimited claims as lists, as Envoy's metadata has it)."""

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
        """Verify the request's tokens as Istio's requirement says; set ``ctx.request_auth`` and what is
        forwarded (token removed, output headers).

        Raises :class:`~mesh.proxy.outcome.LocalReply` (401, 403) for a request the requirement refuses,
        :class:`~mesh.proxy.outcome.Pending` to wait for a key set (``ctx`` unchanged but for the output
        headers removed).
        """
        may_wait = ctx.request_auth is not _WAITED
        ctx.request_auth = None
        if table.output_headers:
            _remove_headers(ctx, table.output_headers)
        if ctx.method == "OPTIONS" and ctx.headers.get("origin") and ctx.headers.get("access-control-request-method"):
            return  # a CORS preflight carries no credentials: Envoy bypasses it (Istio's bypass_cors_preflight)
        run = _Run(self, ctx, may_wait)
        providers = table.providers
        if len(providers) == 1:  # requires_any[P, allow_missing]
            status = run.provider(providers[0])
            if status is not None and status != MISSING:
                raise _denied(ctx, status)
        else:
            status = _requires_any(run, providers)
            if status is not None:
                raise _denied(ctx, status)
        run.commit()

    def status(self) -> list:
        """The key sets and how their fetches went, for ``/config_dump``."""
        return [source.status() for _, source in sorted(self.sources.items())]

    def verify(self, ctx, token, provider, may_wait) -> dict:
        """The claims of ``token`` verified by ``provider``; raises :class:`_Invalid` or Pending.

        A token this provider verified before, with the key set still in force, is taken from the cache:
        only its time limits are checked again.
        """
        hit = self._verified.get(token)
        if hit is not None and hit.provider is provider and self._key_set(provider) is hit.keys:
            _check_times(hit.claims, self.reactor.seconds())
            return hit.claims
        claims = self._verify_signature(ctx, token, provider, may_wait)
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(provider, self._key_set(provider), claims)
        return claims

    def _key_set(self, provider):
        """The key set in force for ``provider`` (inline, or the last one fetched; None: none yet)."""
        if provider.keys is not None:
            return provider.keys
        source = self.sources.get(provider.jwks_uri)
        return None if source is None else source.keys

    def _verify_signature(self, ctx, token, provider, may_wait) -> dict:
        """:meth:`verify` without the cache, in Envoy's order: format, issuer, time limits, audience, key,
        signature (PyJWT checks the signature).

        PyJWT is imported here: only a port with a RequestAuthentication gets this far, and
        importing it at load costs every sidecar about 0.4 MiB (issue #15).
        """
        import jwt

        header, claims = _peek(token)
        if claims.get("iss") != provider.issuer:
            raise _Invalid(ISSUER_NOT_CONFIGURED)
        _check_times(claims, self.reactor.seconds())
        if provider.audiences:
            audiences = claims.get("aud")
            audiences = [audiences] if isinstance(audiences, str) else audiences if isinstance(audiences, list) \
                else ()
            if not any(isinstance(audience, str) and sanitize_audience(audience) in provider.audiences
                       for audience in audiences):
                raise _Invalid(AUDIENCE_NOT_ALLOWED)
        kid, alg = header.get("kid"), header.get("alg")
        kid = kid if isinstance(kid, str) else None
        keys, problem = self._keys(ctx, provider, kid, alg, may_wait)
        for key in keys:
            try:
                return jwt.decode(token, key.key, algorithms=[alg], options=_CHECKED)
            except jwt.InvalidSignatureError:
                problem = VERIFICATION_FAILED
            except jwt.InvalidTokenError:
                raise _Invalid(VERIFICATION_FAILED) from None
        raise _Invalid(problem)

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


class _Invalid(Exception):
    """A token a provider refuses; ``status`` is Envoy's message."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


def _requires_any(run, providers) -> str | None:
    """Istio's requirement for several rules, ``requires_any[P0, ..., requires_all[requires_any[Pi,
    allow_missing], ...]]``, evaluated as Envoy does: None when it is met, else the error to reply with."""
    statuses = []
    for provider in providers:
        status = run.provider(provider)
        if status is None:
            return None
        statuses.append(status)
    if all(status == MISSING for status in statuses):
        return None  # no token anywhere: every requires_any[Pi, allow_missing] holds
    for provider in providers:
        status = run.provider(provider)
        if status is not None and status != MISSING:
            statuses.append(status)
            break
    else:
        return None
    final = MISSING  # Envoy's aggregate: prefer a real error, then "issuer not configured"
    for status in statuses:
        if status not in (MISSING, ISSUER_NOT_CONFIGURED) or final == MISSING:
            final = status
    return final


def _check_times(claims, now: float) -> None:
    """``nbf`` then ``exp``, as jwt_verify_lib checks them: whole seconds, 60 s of clock skew; raises _Invalid."""
    now = int(now)
    if now + CLOCK_SKEW < _seconds(claims.get("nbf")):
        raise _Invalid(NOT_YET_VALID)
    expires = _seconds(claims.get("exp"))
    if expires and now > expires + CLOCK_SKEW:
        raise _Invalid(EXPIRED)


def _seconds(value) -> int:
    """A NumericDate claim as jwt_verify_lib reads it (absent: 0); raises _Invalid for one that is no number."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2.0 ** 64:
        raise _Invalid(VERIFICATION_FAILED)
    return int(value)


def _peek(token: str) -> tuple:
    """``(header, claims)`` of a token, unverified: they choose the key that PyJWT then verifies the token
    with; raises _Invalid for a token that is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _Invalid(BAD_FORMAT)
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in parts[:2])
    except (ValueError, binascii.Error):
        raise _Invalid(VERIFICATION_FAILED) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _Invalid(VERIFICATION_FAILED)
    return header, claims


def _pending(ctx, source) -> Pending:
    ctx.request_auth = _WAITED
    return Pending(source.wait())


def _denied(ctx, error: str) -> LocalReply:
    """Envoy's reply to a refused request (403 for an audience not allowed, else 401): its message,
    ``www-authenticate`` and response code details."""
    realm = f'Bearer realm="http://{ctx.authority.decode("latin-1")}{ctx.uri_path}", error="invalid_token"'
    ctx.request_auth = None
    return LocalReply(403 if error == AUDIENCE_NOT_ALLOWED else 401, "", error,
                      "jwt_authn_access_denied{" + error.replace(" ", "_") + "}",
                      ((b"www-authenticate", realm.encode("latin-1")),))


# -- one request's verification: the tokens it carries, and what verified ones change --------------------------

class _Run:
    """The request as Envoy's filter sees it while it verifies: the providers read and change it in turn
    (a verified token is removed, output headers are added), on copies that :meth:`commit` puts in ``ctx``
    once the request passes."""

    __slots__ = ("authenticator", "ctx", "may_wait", "headers", "raw", "path", "copied", "added", "payload",
                 "_query")

    def __init__(self, authenticator, ctx, may_wait):
        self.authenticator = authenticator
        self.ctx = ctx
        self.may_wait = may_wait
        self.headers = ctx.headers
        self.raw = ctx.raw_headers
        self.path = ctx.path
        self.copied = False
        self.added = False
        self.payload = None
        self._query = None

    def provider(self, provider) -> str | None:
        """Run one provider (Envoy's ``ProviderVerifierImpl``): None when it finds tokens and all verify,
        :data:`MISSING` when it finds none, else the error of the first that fails (the last found first)."""
        if self.added and provider.outputs:
            self.remove_headers(provider.outputs)  # Envoy's sanitizeHeaders
        found = self.tokens(provider)
        if not found:
            return MISSING
        for location in reversed(found):
            try:
                claims = self.authenticator.verify(self.ctx, location[0], provider, self.may_wait)
            except _Invalid as invalid:
                return invalid.status
            self.verified(provider, location, claims)
        return None

    def tokens(self, provider) -> list:
        """``[(token, kind, name)]``: the tokens in the places ``provider`` reads, in Envoy's order."""
        found = []
        headers = self.headers
        for name, prefix in provider.headers:
            value = headers.get(name)
            if value is not None:
                if prefix:
                    at = value.find(prefix)  # anywhere in the value, as Envoy's extractor
                    if at < 0:
                        continue
                    start = _JWT_CHAR.search(value, at + len(prefix))
                    value = value if start is None else value[start.start():]
                found.append((value, _HEADER, name))
        if provider.params and "?" in self.path:
            query = self.query()
            found += [(query[name], _PARAM, name) for name in provider.params if name in query]
        if provider.cookies and "cookie" in headers:
            cookies = self.cookies()
            found += [(cookies[name], _COOKIE, name) for name in provider.cookies if name in cookies]
        return found

    def query(self) -> dict:
        """The query parameters as Envoy's extractor reads them: names and values percent-decoded, the first
        of a repeated name."""
        if self._query is None:
            query = {}
            for part in self.path.partition("?")[2].split("&"):
                name, _, value = part.partition("=")
                query.setdefault(unquote(name, encoding="latin-1"), unquote(value, encoding="latin-1"))
            self._query = query
        return self._query

    def cookies(self) -> dict:
        """The cookies as Envoy parses them: the first of a repeated name, a quoted value unquoted."""
        cookies = {}
        for name, value in self.raw:
            if name.lower() == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    key, equals, text = part.lstrip(" ").partition("=")
                    if equals:
                        if len(text) >= 2 and text[0] == text[-1] == '"':
                            text = text[1:-1]
                        cookies.setdefault(key, text)
        return cookies

    def verified(self, provider, location, claims) -> None:
        """A token ``provider`` verified: what Envoy's ``handleGoodJwt`` does."""
        token, kind, name = location
        if provider.payload_header:
            self.add_header(provider.payload_header, token.split(".")[1])
        for header, path in provider.claim_headers:
            text = _claim_text(claims, path)
            if text:
                self.add_header(header, text)
        if not provider.forward:
            if kind is _HEADER:
                self.remove_headers((name,))
            elif kind is _PARAM:
                self.remove_param(name)
        self.payload = _normalized(claims, provider.space_delimited)

    def own(self) -> None:
        if not self.copied:
            self.headers, self.raw, self.copied = dict(self.headers), list(self.raw), True

    def remove_headers(self, names) -> None:
        if any(name in self.headers for name in names):
            self.own()
            self.raw = _without_headers(self.headers, self.raw, names)

    def add_header(self, name: str, value: str) -> None:
        """Envoy's ``addCopy``: one more line of that header."""
        self.own()
        self.added = True
        known = self.headers.get(name)
        self.headers[name] = value if known is None else known + ", " + value
        self.raw.append((name.encode(), value.encode("latin-1", "replace")))

    def remove_param(self, name: str) -> None:
        """Remove every ``name`` parameter (its name percent-decoded, as Envoy finds it) from the path; the
        rest of the query stays as sent, in its order."""
        path, _, query = self.path.partition("?")
        kept = [part for part in query.split("&") if unquote(part.partition("=")[0], encoding="latin-1") != name]
        self.path = path + "?" + "&".join(kept) if any(kept) else path
        self._query = None

    def commit(self) -> None:
        """The request passed: ``ctx`` gets the principal and what the verified tokens changed."""
        ctx = self.ctx
        if self.copied:
            ctx.headers.clear()
            ctx.headers.update(self.headers)
            ctx.raw_headers = self.raw
        ctx.path = self.path
        if self.payload is not None:
            ctx.request_auth = RequestAuth(self.payload)


def _normalized(claims: dict, names) -> dict:
    """The payload as Envoy writes it to metadata (``normalize_payload_in_metadata``): each claim of ``names``
    that is a string becomes the list of its space-separated words."""
    out = None
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            words = [word for word in value.split(" ") if word]
            if words:
                if out is None:
                    out = dict(claims)
                out[name] = words
    return claims if out is None else out


def _claim_text(claims, path) -> str | None:
    """A claim as Envoy writes it to a header (``outputClaimToHeaders``): a string as is, a boolean as
    ``true``/``false``, a number as Envoy's ``convertClaimDoubleToString`` does (a whole number from 0 to
    2^64 as an integer, any other as C's ``%f``: ``1.500000``); None for any other claim."""
    value = claims
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        number = float(value)  # Envoy reads every JSON number as a double
        if number < 0 or number >= 2.0 ** 64 or math.modf(number)[0] != 0:
            return "%f" % number
        return str(int(number))
    return None


def _remove_headers(ctx, names) -> None:
    if any(name in ctx.headers for name in names):
        ctx.raw_headers = _without_headers(ctx.headers, ctx.raw_headers, names)


def _without_headers(headers: dict, raw: list, names) -> list:
    """Remove the headers ``names`` (lower-case) from ``headers``, in place; ``raw`` without them."""
    for name in names:
        headers.pop(name, None)
    encoded = {name.encode() for name in names}
    return [pair for pair in raw if pair[0].lower() not in encoded]


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
