"""Where the Datadog agent is: its DogStatsD address and its trace intake, from options or environment.

The options are ``--datadog-statsd`` and ``--datadog-trace-agent``; without
them, the variables Datadog's admission controller injects and its libraries
read: ``DD_DOGSTATSD_URL`` and ``DD_TRACE_AGENT_URL``, else ``DD_AGENT_HOST``
with ``DD_DOGSTATSD_PORT`` (8125) and ``DD_TRACE_AGENT_PORT`` (8126).
"""

from __future__ import annotations

from typing import NamedTuple

STATSD_PORT = 8125
TRACE_PORT = 8126


class StatsdTarget(NamedTuple):
    """A DogStatsD address: ``kind`` ``"udp"`` (``host``, ``port``) or ``"unix"`` (``path``, a datagram socket)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"udp://{_bracketed(self.host)}:{self.port}"


class TraceTarget(NamedTuple):
    """The trace agent: ``url`` (``http://HOST:PORT``) or ``path`` (a Unix stream socket)."""

    url: str = ""
    path: str = ""

    def __str__(self) -> str:
        return self.url or f"unix://{self.path}"


def parse_statsd_address(text: str, what: str = "--datadog-statsd") -> StatsdTarget:
    """``HOST:PORT``, ``udp://HOST:PORT`` (``[V6]:PORT``; the port defaults to 8125), ``unix:///PATH``,
    ``unixgram:///PATH`` or ``/PATH`` (a Unix datagram socket); ValueError saying what to write."""
    text = text.strip()
    path = _unix_path(text, ("unix://", "unixgram://"))
    if path:
        return StatsdTarget("unix", path=path)
    host, port = _host_port(_without(text, "udp://"), STATSD_PORT)
    if port is None:
        raise ValueError(f"{what} wants the agent's DogStatsD address: HOST:PORT (UDP, e.g. 127.0.0.1:8125) "
                         f"or unix:///PATH (a Unix datagram socket, e.g. unix:///var/run/datadog/dsd.socket), "
                         f"not {text!r}")
    return StatsdTarget("udp", host=host, port=port)


def parse_trace_agent(text: str, what: str = "--datadog-trace-agent") -> TraceTarget:
    """``http://HOST:PORT`` or ``HOST:PORT`` (the port defaults to 8126), or ``unix:///PATH``; ValueError
    saying what to write."""
    text = text.strip()
    path = _unix_path(text, ("unix://",))
    if path:
        return TraceTarget(path=path)
    host, port = _host_port(_without(text, "http://").rstrip("/"), TRACE_PORT)
    if port is None:
        raise ValueError(f"{what} wants the agent's trace intake: http://HOST:PORT (e.g. http://127.0.0.1:8126) "
                         f"or unix:///PATH (e.g. unix:///var/run/datadog/apm.socket), not {text!r}")
    return TraceTarget(url=f"http://{_bracketed(host)}:{port}")


def statsd_target_from_env(environ) -> StatsdTarget | None:
    """``$DD_DOGSTATSD_URL``, else ``$DD_AGENT_HOST:$DD_DOGSTATSD_PORT``; None when neither is set."""
    if environ.get("DD_DOGSTATSD_URL"):
        return parse_statsd_address(environ["DD_DOGSTATSD_URL"], "$DD_DOGSTATSD_URL")
    if environ.get("DD_AGENT_HOST"):
        address = _agent_address(environ["DD_AGENT_HOST"], environ.get("DD_DOGSTATSD_PORT"), STATSD_PORT)
        return parse_statsd_address(address, "$DD_AGENT_HOST and $DD_DOGSTATSD_PORT")
    return None


def trace_target_from_env(environ) -> TraceTarget | None:
    """``$DD_TRACE_AGENT_URL``, else ``$DD_AGENT_HOST:$DD_TRACE_AGENT_PORT``; None when neither is set."""
    if environ.get("DD_TRACE_AGENT_URL"):
        return parse_trace_agent(environ["DD_TRACE_AGENT_URL"], "$DD_TRACE_AGENT_URL")
    if environ.get("DD_AGENT_HOST"):
        address = _agent_address(environ["DD_AGENT_HOST"], environ.get("DD_TRACE_AGENT_PORT"), TRACE_PORT)
        return parse_trace_agent(address, "$DD_AGENT_HOST and $DD_TRACE_AGENT_PORT")
    return None


def _agent_address(host: str, port, default: int) -> str:
    return f"{_bracketed(host.strip())}:{port or default}"


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as URLs and ``HOST:PORT`` write it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _without(text: str, scheme: str) -> str:
    return text[len(scheme):] if text.startswith(scheme) else text


def _unix_path(text: str, schemes) -> str | None:
    """The absolute path of ``SCHEME/PATH`` (or of a bare ``/PATH``), else None."""
    for scheme in schemes:
        text = _without(text, scheme)
    return text if text.startswith("/") else None


def _host_port(text: str, default_port: int):
    """``(host, port)`` of ``HOST[:PORT]`` or ``[V6][:PORT]``; ``port`` is None when ``text`` is not one."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return host, None
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        return text, None  # an IPv6 address wants brackets, to tell its port apart
    else:
        host, port_text = text, ""
    if not host or any(character in host for character in "/ @?#"):
        return host, None
    if not port_text:
        return host, default_port
    return host, int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
