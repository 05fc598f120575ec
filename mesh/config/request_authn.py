"""RequestAuthentication (end-user JWT): its validated form, its validator, and the table a sidecar reads.

:func:`request_authentication` is the validator :mod:`mesh.config.validate`
dispatches to.  It checks every field of Istio's ``RequestAuthentication``
and ``JWTRule`` (security.istio.io/v1), and what txmesh does not implement is
an error naming the field: ``targetRef``/``targetRefs`` (Gateway API
attachment) and rules without ``jwksUri`` or ``jwks`` (Istio would discover the
key set from the issuer by OpenID Connect discovery).

:func:`compile_request_authn` merges the ``jwtRules`` of every
RequestAuthentication that applies to a workload, as Istio does (the
workload's namespace and the root namespace, by selector), into one
:class:`RequestAuthn`: one :class:`JwtProvider` per rule, in the order Istio
gives Envoy's providers (by issuer), each with the places it reads tokens from
(headers, query parameters, cookies).  :func:`parse_jwks` turns a JSON Web
Key Set into :class:`JwtKey` objects; the sidecar uses it for inline ``jwks``
and for the sets it fetches from ``jwksUri`` (:mod:`mesh.proxy.authn`).

Only asymmetric keys are accepted (RSA for RS256/384/512 and PS256/384/512,
EC P-256/384/521 for ES256/384/512, Ed25519 for EdDSA): a symmetric ("oct")
key in a key set would let whoever can read the config sign tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mesh.config.fields import Fields
from mesh.config.security import _HEADER_NAME, _selector

#: Istio's default for ``JWTRule.timeout``: how long a fetch of ``jwksUri`` may take.
DEFAULT_JWKS_TIMEOUT = 5.0
#: Where tokens are looked for when a rule names no location (Envoy's and Istio's defaults).
DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"
#: Claims Istio always has Envoy split on spaces for authorization (``buildSpaceDelimitedClaims``), besides a
#: rule's ``spaceDelimitedClaims``.
SPACE_DELIMITED_CLAIMS = frozenset({"permission", "scope"})
#: JWS algorithms by key type; ``crv`` narrows EC keys to one algorithm each.
ALGORITHMS = {"RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
              "EC": frozenset({"ES256", "ES384", "ES512"}), "OKP": frozenset({"EdDSA"})}
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_RULE = {"issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies",
         "outputPayloadToHeader", "outputClaimToHeaders", "forwardOriginalToken", "timeout", "spaceDelimitedClaims"}
_POLICY_UNSUPPORTED = {
    "targetRef": "policies attached to Gateway API resources are not supported; use selector",
    "targetRefs": "policies attached to Gateway API resources are not supported; use selector",
}
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


# -- validated resources ---------------------------------------------------------------

@dataclass(frozen=True)
class JwtRule:
    """One ``jwtRules`` entry, validated.

    ``from_headers`` holds ``(lower-case name, prefix)`` pairs, ``from_params``
    and ``from_cookies`` names; all three empty means Istio's defaults
    (``Authorization: Bearer <token>``, then ``?access_token=``).  ``jwks`` is
    the inline key set's JSON text; ``output_claim_to_headers`` holds
    ``(lower-case header, claim path)`` pairs, the path a tuple of names
    (``nested.key`` is ``("nested", "key")``).  ``timeout`` is in seconds.
    ``space_delimited_claims`` are the rule's ``spaceDelimitedClaims`` (``scope`` and
    ``permission`` are split whatever it says).
    """

    issuer: str
    audiences: tuple = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    from_headers: tuple = ()
    from_params: tuple = ()
    from_cookies: tuple = ()
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple = ()
    forward_original_token: bool = False
    timeout: float = DEFAULT_JWKS_TIMEOUT
    space_delimited_claims: tuple = ()


@dataclass(frozen=True)
class RequestAuthentication:
    """A RequestAuthentication.  ``selector`` is sorted label pairs, or None for every workload in scope."""

    name: str
    namespace: str
    selector: tuple | None
    rules: tuple
    source: object = field(compare=False, repr=False)


def request_authentication(resource, report, domain) -> RequestAuthentication:
    """Validate a RequestAuthentication (``domain`` is unused: it names no services)."""
    f = Fields(report, ("spec",), resource.spec, {"selector", "jwtRules"}, _POLICY_UNSUPPORTED)
    rules = tuple(rule for rule in (_rule(Fields(report, path, item, _RULE)) for path, item in f.items("jwtRules"))
                  if rule is not None)
    return RequestAuthentication(name=resource.name, namespace=resource.namespace, selector=_selector(f),
                                 rules=rules, source=resource)


def _rule(f: Fields) -> JwtRule | None:
    issuer = f.string("issuer", required=True)
    audiences = tuple(dict.fromkeys(text for _, text in f.strings("audiences")))
    jwks_uri, jwks = _key_source(f)
    timeout = f.duration("timeout")
    headers = []
    for path, item in f.items("fromHeaders"):
        entry = Fields(f.report, path, item, {"name", "prefix"})
        name = _header(entry, "name", required=True)
        prefix = entry.string("prefix") or ""
        if name:
            headers.append((name, prefix))
    output = _header(f, "outputPayloadToHeader")
    claims = _claim_headers(f)
    if output and output in {header for header, _ in claims}:
        f.error("outputPayloadToHeader", f"header '{output}' is also in outputClaimToHeaders; use another name")
    rule = JwtRule(issuer=issuer or "", audiences=audiences, jwks_uri=jwks_uri, jwks=jwks,
                   from_headers=tuple(dict.fromkeys(headers)),
                   from_params=tuple(dict.fromkeys(text for _, text in f.strings("fromParams"))),
                   from_cookies=tuple(dict.fromkeys(text for _, text in f.strings("fromCookies"))),
                   output_payload_to_header=output or None, output_claim_to_headers=claims,
                   forward_original_token=f.boolean("forwardOriginalToken"),
                   timeout=DEFAULT_JWKS_TIMEOUT if timeout is None else timeout,
                   space_delimited_claims=tuple(dict.fromkeys(text for _, text in f.strings("spaceDelimitedClaims"))))
    return rule if issuer else None


def _key_source(f: Fields) -> tuple:
    """``(jwksUri, jwks)``: exactly one of them, each checked."""
    uri, jwks = f.string("jwksUri"), f.string("jwks")
    if uri and jwks:
        f.error("jwks", "set only one of jwksUri and jwks (Istio ignores jwksUri when both are set); remove one")
    elif not uri and not jwks:
        f.error(None, "set jwksUri (the URL of the issuer's JSON Web Key Set) or jwks (the key set itself): "
                      "txmesh does not discover keys from the issuer (OpenID Connect discovery)")
    if uri:
        parts = urlsplit(uri)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            f.error("jwksUri", f"invalid jwksUri '{uri}': use an http:// or https:// URL with a host, like "
                               "https://issuer.example.com/.well-known/jwks.json")
            uri = None
    if jwks:
        keys, problem = parse_jwks(jwks)
        if problem:
            f.error("jwks", problem)
            jwks = None
    return uri or None, jwks or None


def _header(f: Fields, key, required=False) -> str:
    """The lower-cased header name under ``key`` ("" when absent or invalid, reported)."""
    name = f.string(key, required=required)
    if not name:
        return ""
    lower = name.lower()
    if not _HEADER_NAME.match(lower):
        f.error(key, f"invalid header name {name!r}")
        return ""
    if lower in _RESERVED_HEADERS:
        f.error(key, f"'{name}' cannot carry a token or a claim; use another header")
        return ""
    return lower


def _claim_headers(f: Fields) -> tuple:
    pairs = {}
    for path, item in f.items("outputClaimToHeaders"):
        entry = Fields(f.report, path, item, {"header", "claim"})
        header = _header(entry, "header", required=True)
        claim = entry.string("claim", required=True)
        if header and header in pairs:
            entry.error("header", f"header '{header}' is listed twice; each header takes one claim")
        elif header and claim:
            steps = tuple(claim.split("."))
            if "" in steps:
                entry.error("claim", f"invalid claim '{claim}': name a claim, or a nested one as outer.inner")
            else:
                pairs[header] = steps
    return tuple(pairs.items())


# -- key sets -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JwtKey:
    """One public key of a key set: its ``kid`` and ``alg`` (None when the set gives none), the
    algorithms it may verify, and the ``cryptography`` key object."""

    kid: str | None
    alg: str | None
    algorithms: frozenset
    key: object = field(compare=False, repr=False)

    def matches(self, kid: str | None, alg: str) -> bool:
        """Whether this key may verify a token with header ``kid`` and ``alg`` (Envoy's rule: a token
        without ``kid``, or a key without one, tries the key; a key's ``alg`` must be the token's)."""
        return (kid is None or self.kid is None or kid == self.kid) and (self.alg is None or self.alg == alg) \
            and alg in self.algorithms


def parse_jwks(text) -> tuple:
    """``(keys, None)`` or ``((), problem)``: the usable keys of a JSON Web Key Set (text or bytes).

    Keys for encryption (``use: enc``) are skipped; a symmetric or unknown
    key, or a set without any usable key, is a problem.
    """
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        return (), f"not a JSON Web Key Set: invalid JSON ({error})"
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return (), 'not a JSON Web Key Set: it needs a "keys" list, like {"keys": [{"kty": "RSA", ...}]}'
    keys = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use") == "enc":
            continue
        key, problem = _key(entry)
        if problem:
            return (), f"keys[{index}]: {problem}"
        keys.append(key)
    if not keys:
        return (), "the key set has no signing key"
    return tuple(keys), None


def _key(entry: dict) -> tuple:
    """``(JwtKey, None)`` or ``(None, problem)`` for one JWK."""
    kty = entry.get("kty")
    if kty == "oct":
        return None, ("symmetric keys (kty oct, HS256/384/512) are not supported: whoever reads the key can "
                      "sign tokens; use an asymmetric key (RSA, EC or Ed25519)")
    if kty not in ALGORITHMS:
        return None, f"unsupported key type {kty!r}; use RSA, EC or OKP (Ed25519)"
    algorithms = ALGORITHMS[kty]
    if kty == "EC":
        algorithms = frozenset({_EC_CURVES.get(entry.get("crv"))}) - {None}
        if not algorithms:
            return None, f"unsupported EC curve {entry.get('crv')!r}; use P-256, P-384 or P-521"
    if "d" in entry:
        return None, "the key has its private part ('d'): publish only the public key, and replace this one"
    alg = entry.get("alg")
    if alg is not None and alg not in algorithms:
        return None, f"alg {alg!r} does not fit a {kty} key; use one of: {', '.join(sorted(algorithms))}"
    # PyJWT is imported here, not at module level: a sidecar without RequestAuthentication
    # never parses a key, and importing it costs every sidecar about 0.4 MiB (issue #15).
    from jwt import PyJWK
    from jwt.exceptions import PyJWKError

    try:
        key = PyJWK(entry, algorithm=alg or min(algorithms)).key
    except (PyJWKError, ValueError, TypeError, KeyError) as error:
        return None, f"invalid {kty} key: {error}"
    kid = entry.get("kid")
    return JwtKey(kid=kid if isinstance(kid, str) else None, alg=alg, algorithms=algorithms, key=key), None


# -- compiled ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One ``jwtRules`` entry as the sidecar reads it (an Envoy ``JwtProvider`` as Istio writes it).

    ``name`` is ``NS/NAME[i]``; ``audiences`` a frozenset of audiences as
    Envoy compares them (:func:`sanitize_audience`; empty: not checked);
    ``keys`` the inline key set's :class:`JwtKey` tuple, or None when they
    come from ``jwks_uri``.  Where the rule reads tokens, in the order Envoy's
    extractor reads them: ``headers`` ``(lower-case name, prefix)`` sorted by
    name + prefix, then ``params``, then ``cookies``, each sorted.
    ``space_delimited`` are the claims split on spaces for authorization;
    ``outputs`` the headers the rule writes.
    """

    name: str
    issuer: str
    audiences: frozenset
    jwks_uri: str | None
    keys: tuple | None
    timeout: float
    forward: bool
    payload_header: str | None
    claim_headers: tuple
    headers: tuple = ()
    params: tuple = ()
    cookies: tuple = ()
    space_delimited: frozenset = SPACE_DELIMITED_CLAIMS
    outputs: tuple = ()


@dataclass(frozen=True, slots=True)
class RequestAuthn:
    """The merged RequestAuthentications of one workload (None in ProxyConfig when none applies).

    ``providers`` are the :class:`JwtProvider` of every rule, sorted by issuer
    as Istio sorts them (``convertToEnvoyJwtConfig``: the order of the
    requirement, which decides which error a refused request gets and which
    token gives the principal).  ``output_headers`` are the headers the
    providers write (removed from every request before verification, so the
    app never sees one the sidecar did not write).  ``jwks_uris`` maps each
    ``jwksUri`` to ``(timeout, issuers)``, for the fetcher.
    """

    providers: tuple
    output_headers: tuple
    jwks_uris: tuple


def sanitize_audience(audience: str) -> str:
    """An audience as Envoy compares them (jwt_verify_lib's ``CheckAudience``): without a leading ``http://``
    or ``https://`` and one trailing ``/``, so ``https://api.example.com/`` is ``api.example.com``."""
    if audience.startswith("http://"):
        audience = audience[7:]
    elif audience.startswith("https://"):
        audience = audience[8:]
    return audience[:-1] if audience.endswith("/") else audience


def compile_request_authn(policies) -> tuple:
    """``(RequestAuthn or None, dump)`` of the RequestAuthentications ``policies`` that apply to a workload."""
    rules = [(f"{policy.namespace}/{policy.name}[{index}]", rule)
             for policy in policies for index, rule in enumerate(policy.rules)]
    if not rules:
        return None, None
    rules.sort(key=lambda named: named[1].issuer)  # stable: rules of one issuer keep their policy order
    providers = tuple(_provider(name, rule) for name, rule in rules)
    table = RequestAuthn(providers=providers,
                         output_headers=tuple(sorted({header for provider in providers
                                                      for header in provider.outputs})),
                         jwks_uris=_key_sets(providers))
    return table, [_describe(name, rule) for name, rule in rules]


def _key_sets(providers) -> tuple:
    """``((jwksUri, timeout, issuers), ...)``: each key set to fetch once, with the longest timeout of its rules."""
    uris = {}
    for provider in providers:
        if provider.jwks_uri is not None:
            timeout, issuers = uris.get(provider.jwks_uri, (provider.timeout, ()))
            issuers = tuple(dict.fromkeys(issuers + (provider.issuer,)))
            uris[provider.jwks_uri] = (max(timeout, provider.timeout), issuers)
    return tuple((uri, timeout, issuers) for uri, (timeout, issuers) in sorted(uris.items()))


def _locations(rule: JwtRule) -> tuple:
    """``(headers, params, cookies)`` a rule reads, each in Envoy's extraction order (its maps are sorted:
    headers by name + prefix, a later pair with the same concatenation folded into the first)."""
    if not (rule.from_headers or rule.from_params or rule.from_cookies):
        return (DEFAULT_HEADER,), (DEFAULT_PARAM,), ()
    headers = {}
    for name, prefix in rule.from_headers:
        headers.setdefault(name + prefix, (name, prefix))
    return (tuple(pair for _, pair in sorted(headers.items())), tuple(sorted(set(rule.from_params))),
            tuple(sorted(set(rule.from_cookies))))


def _provider(name: str, rule: JwtRule) -> JwtProvider:
    headers, params, cookies = _locations(rule)
    payload = (rule.output_payload_to_header,) if rule.output_payload_to_header else ()
    return JwtProvider(name=name, issuer=rule.issuer, audiences=frozenset(map(sanitize_audience, rule.audiences)),
                       jwks_uri=rule.jwks_uri, keys=parse_jwks(rule.jwks)[0] if rule.jwks else None,
                       timeout=rule.timeout, forward=rule.forward_original_token,
                       payload_header=rule.output_payload_to_header, claim_headers=rule.output_claim_to_headers,
                       headers=headers, params=params, cookies=cookies,
                       space_delimited=SPACE_DELIMITED_CLAIMS.union(rule.space_delimited_claims),
                       outputs=payload + tuple(header for header, _ in rule.output_claim_to_headers))


def _describe(name: str, rule: JwtRule) -> dict:
    """A rule as JSON values for ``/config_dump`` (the inline key set by its key ids only)."""
    default = not (rule.from_headers or rule.from_params or rule.from_cookies)
    return {"name": name, "issuer": rule.issuer, "audiences": list(rule.audiences),
            "jwks_uri": rule.jwks_uri,
            "jwks": None if rule.jwks is None else [key.kid for key in parse_jwks(rule.jwks)[0]],
            "from_headers": [{"name": name, "prefix": prefix}
                             for name, prefix in ((DEFAULT_HEADER,) if default else rule.from_headers)],
            "from_params": list((DEFAULT_PARAM,) if default else rule.from_params),
            "from_cookies": list(rule.from_cookies), "forward_original_token": rule.forward_original_token,
            "output_payload_to_header": rule.output_payload_to_header,
            "output_claim_to_headers": {header: ".".join(path) for header, path in rule.output_claim_to_headers},
            "space_delimited_claims": sorted(SPACE_DELIMITED_CLAIMS.union(rule.space_delimited_claims))}
