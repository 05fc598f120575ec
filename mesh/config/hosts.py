"""Host names as Istio reads them, and the names a client may use for them.

- Hosts compare lower-case and without a port.
- A short name (no dot) in a resource of namespace ``ns`` means
  ``name.ns.svc.<domain>``: Istio reads short names relative to the namespace
  of the *resource* that contains them.  Names with a dot, IP literals and
  wildcards (``*.example.com``) are taken as written.
- A Kubernetes-style service name ``svc.ns.svc.<domain>`` can be reached as
  ``svc.ns.svc``, ``svc.ns`` and (from the same namespace only, like the DNS
  search path of a pod) ``svc``.
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_DOMAIN = "cluster.local"

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def normalize(host: str) -> str:
    """Lower-case ``host`` and strip a port (``Foo:8080`` -> ``foo``, ``[::1]:80`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def is_ip(host: str) -> bool:
    """Is ``host`` an IPv4 or IPv6 literal?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def fqdn(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """The fully qualified name Istio gives ``host`` in a resource of ``namespace``."""
    host = normalize(host)
    if host == "*" or "." in host or is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{domain}"


def aliases(name: str, client_namespace: str | None = None, domain: str = DEFAULT_DOMAIN) -> tuple:
    """Every Host header a client may use for ``name``, longest first.

    For ``svc.ns.svc.<domain>``: the full name, ``svc.ns.svc`` and ``svc.ns``,
    plus ``svc`` when ``client_namespace`` is ``ns`` (or None: all of them).
    Any other name has only itself.
    """
    suffix = f".svc.{domain}"
    if not name.endswith(suffix):
        return (name,)
    parts = name[:-len(suffix)].split(".")
    if len(parts) != 2:
        return (name,)
    service, namespace = parts
    names = (name, f"{service}.{namespace}.svc", f"{service}.{namespace}")
    if client_namespace is None or client_namespace == namespace:
        names += (service,)
    return names


def most_specific(names, host: str) -> str | None:
    """Of ``names`` (host names and ``*.`` wildcards, e.g. a dict's keys), the one that applies to ``host``:
    ``host`` itself, else the longest wildcard that covers it (Istio's ``MostSpecificHostMatch``), or None."""
    if host in names:
        return host
    covering = [name for name in names if name.startswith("*") and covers(name, host)]
    return max(covering, key=len, default=None)


def covers(pattern: str, host: str) -> bool:
    """Does ``pattern`` (a name or ``*.suffix`` wildcard) match ``host``?

    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
    ``example.com``; a wildcard also covers a narrower wildcard.
    """
    if pattern == host:
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return False


def check(host, allow_ip: bool = False, allow_wildcard: bool = True) -> str | None:
    """Why ``host`` is not a valid host of a resource, or None if it is."""
    if not isinstance(host, str) or not host:
        return "must be a non-empty host name"
    if host == "*":
        return "the catch-all host '*' is not allowed here; name the hosts (wildcards like '*.example.com' are)"
    if is_ip(host):
        return None if allow_ip else "an IP address is not allowed here; use a host name"
    if ":" in host:
        return "hosts must not include a port; txmesh matches the Host header without its port"
    name = host.lower()
    if name.startswith("*."):
        if not allow_wildcard:
            return "wildcard hosts are not allowed here"
        name = name[2:]
    if len(name) > 253:
        return "host names are at most 253 characters"
    for label in name.split("."):
        if len(label) > 63 or not _LABEL.match(label):
            return (f"invalid host '{host}': each dot-separated label must be letters, digits and '-' "
                    "(a '*' is allowed only as the whole first label)")
    return None
