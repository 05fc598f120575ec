"""Response flags: the one table of what each flag means and what to do about it.

The flags are Envoy's (``%RESPONSE_FLAGS%``), so operators read txmesh's
access log, ``x-mesh-flags`` header and ``response_flags`` metric label as
they would Envoy's.  A 403 from an AuthorizationPolicy carries ``RBAC``; the
deciding policy is in the access log (``authz_policy``, and Envoy's
``response_code_details`` ``rbac_access_denied_matched_policy[NS/NAME]``).
Earlier versions wrote it into the flag (``RBAC:NS/NAME``); both are read.

``meshctl why`` explains a failed request from this table;
tests/unit/test_response_flags.py checks that every flag the proxy emits is
in it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    """One response flag: Envoy's short and long name, what it means, what to check next.

    ``emitted`` is False for Envoy flags txmesh does not produce (kept so that
    an Envoy access-log line is explained too).
    """

    code: str
    name: str
    meaning: str
    what_to_do: str
    emitted: bool = True


FLAGS = {flag.code: flag for flag in (
    Flag("NR", "NoRouteFound",
         "no route for the request's Host: no ServiceEntry or VirtualService defines that host "
         "(visible to the caller's namespace)",
         "check the Host header; define the host in a ServiceEntry (exportTo must include the caller's namespace); "
         "meshctl proxy-config routes NAME shows the hosts this sidecar knows"),
    Flag("NC", "NoClusterFound",
         "the route points at a cluster that does not exist: a destination host, port or subset nobody defines",
         "run meshctl analyze on the config (unknown host/subset); add the DestinationRule subset or fix the "
         "VirtualService destination"),
    Flag("UH", "NoHealthyUpstream",
         "no healthy endpoint in the cluster: it has no endpoints, or every one is ejected by outlier detection "
         "(or the destination is blocked by REGISTRY_ONLY / an AuthorizationPolicy on passthrough)",
         "meshctl proxy-config endpoints NAME: are there endpoints, are they EJECTED? Check that the "
         "subset's labels match the workloads and that they are running"),
    Flag("UF", "UpstreamConnectionFailure",
         "the connection to the endpoint failed: refused, unreachable, timed out, or the mTLS handshake or the "
         "peer's identity check failed",
         "is the endpoint's app (or its sidecar's inbound port) listening? For TLS failures, compare the "
         "endpoint's identity in meshctl proxy-config clusters NAME with the certificate the peer presents"),
    Flag("UC", "UpstreamConnectionTermination",
         "the upstream closed the connection before or while sending the response",
         "look at the upstream app's logs (crash, restart, connection limit); retries help only for "
         "replayable requests"),
    Flag("UT", "UpstreamRequestTimeout",
         "no response within the route's timeout (or the per-try timeout)",
         "is the upstream slow (meshctl stat)? Raise the VirtualService http timeout, or fix the slow call"),
    Flag("URX", "UpstreamRetryLimitExceeded",
         "every allowed retry failed too; the other flags say why the last try failed",
         "read the other flags of the line; the route's retry policy is in meshctl proxy-config routes NAME"),
    Flag("UO", "UpstreamOverflow",
         "a limit was reached: too many connections or pending requests (passthrough: "
         "--max-passthrough-connections)",
         "raise the limit (DestinationRule connectionPool, or the sidecar option) or reduce the load"),
    Flag("DC", "DownstreamConnectionTermination",
         "the client closed the connection before the response was complete",
         "usually the client gave up (its own timeout); compare its timeout with the upstream's latency"),
    Flag("RBAC", "AuthorizationDenied",
         "an AuthorizationPolicy denied the request: a DENY policy matched, or ALLOW policies apply and none "
         "matched (the access log's authz_policy names the deciding policy, allow-nothing-matched for the latter)",
         "meshctl describe pod NAME lists the policies of the workload; check the caller's identity "
         "(source_principal) against the policy's rules"),
    Flag("PE", "PluginError",
         "txmesh's own flag: a plugin's hook raised on this request, so the proxy answered 500 instead of "
         "guessing",
         "read the sidecar's log for the plugin's traceback; disable the plugin (--disable-plugin NAME) or fix it"),
    Flag("DT", "DurationTimeout", "the stream's maximum duration was reached",
         "raise the maximum duration or shorten the stream", emitted=False),
    Flag("LH", "FailedLocalHealthCheck", "the local service failed its health check",
         "check the app's health endpoint", emitted=False),
    Flag("LR", "LocalReset", "the proxy reset the connection locally",
         "look at the proxy's log", emitted=False),
    Flag("UR", "UpstreamRemoteReset", "the upstream reset the connection",
         "look at the upstream app's logs", emitted=False),
    Flag("DI", "DelayInjected", "a fault-injection delay held the request before it was forwarded "
         "(VirtualService http[].fault.delay)",
         "expected while the fault is configured (meshctl proxy-config routes NAME shows it); remove the "
         "route's fault.delay, or lower its percentage, to stop it"),
    Flag("FI", "FaultInjected", "a fault-injection abort answered the request; it never reached the upstream "
         "(VirtualService http[].fault.abort)",
         "expected while the fault is configured (meshctl proxy-config routes NAME shows it); remove the "
         "route's fault.abort, or lower its percentage, to stop it"),
    Flag("RL", "RateLimited", "a rate limit refused the request",
         "lower the request rate or raise the limit", emitted=False),
    Flag("UAEX", "UnauthorizedExternalService", "the external authorization service denied the request",
         "check the external authorization service's decision", emitted=False),
    Flag("IH", "InvalidEnvoyRequestHeaders", "the request had invalid proxy-controlled headers",
         "fix the client's headers", emitted=False),
    Flag("SI", "StreamIdleTimeout", "the stream was idle for too long",
         "raise the idle timeout or keep the stream busy", emitted=False),
    Flag("DPE", "DownstreamProtocolError", "the client broke the HTTP protocol",
         "fix the client (the proxy's log says what was malformed)", emitted=False),
    Flag("UPE", "UpstreamProtocolError", "the upstream broke the HTTP protocol",
         "fix the upstream app's HTTP", emitted=False),
    Flag("DF", "DnsResolutionFailure", "resolving the upstream's name failed",
         "check DNS for the ServiceEntry's endpoints", emitted=False),
)}


def parse(text) -> list:
    """The :class:`Flag` of each flag in ``"UF,URX"`` (``-``/empty: none); unknown ones as unexplained Flags.

    ``RBAC:<policy>`` gives the RBAC flag (the policy is the caller's to print).
    """
    if not text or text == "-":
        return []
    flags = []
    for code in text.split(","):
        code = code.strip()
        known = FLAGS.get(code.partition(":")[0])
        flags.append(known or Flag(code, "unknown", "a flag this version of txmesh does not know",
                                   "check the Envoy documentation of %RESPONSE_FLAGS%", emitted=False))
    return flags


def denying_policy(flags, details=None):
    """The policy that denied a request, from its flags (``RBAC:NS/NAME``) or its
    ``response_code_details`` (``rbac_access_denied_matched_policy[NS/NAME]``); None if neither says."""
    for code in (flags or "").split(","):
        kind, _, policy = code.strip().partition(":")
        if kind == "RBAC" and policy:
            return policy
    prefix = "rbac_access_denied_matched_policy["
    if details and details.startswith(prefix) and details.endswith("]"):
        policy = details[len(prefix):-1]
        return "allow-nothing-matched" if policy == "none" else policy
    return None
