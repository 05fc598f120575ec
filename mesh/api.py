"""What plugins may rely on: the types the hooks of :mod:`mesh.hookspecs` pass and return.

Everything here is part of plugin API :data:`mesh.hookspecs.API_VERSION`.
A plugin imports only :mod:`mesh.api` and :mod:`mesh.hookspecs` (and
:data:`hookimpl`); the classes behind these views are internal and change
without notice.

The *views* (:class:`RequestView`, :class:`EndpointView`, :class:`ClusterView`,
:class:`ConnectionView`) are :class:`typing.Protocol` classes: they describe
what the objects a hook receives provide, they are not wrappers.  The proxy
hands its own objects (``RequestContext``, ``Endpoint``, ...) to the hooks, so
a view costs nothing per request; tests/unit/test_plugin_api.py checks that
those objects satisfy the views.  Attributes declared as properties are
read-only for plugins; the rest (``extra``, ``state``) are theirs to write.

The *result types* (:class:`AuthzDecision`, :class:`SignedCertificate`,
:data:`GIVE_UP`) name what a hook returns; they are tuples (or ``False``), so
the plain forms of earlier releases still work.

The *lifecycle types* (:class:`OptionParser`, :class:`Config`) are what
``mesh_addoption`` and ``mesh_configure``/``mesh_unconfigure`` receive.

The *service shells* are base classes a plugin's Twisted service may build on:
:class:`ExternalCAService` (an external CA whose client blocks) and
``SpanExporter`` (finished spans batched to an HTTP collector), re-exported from
mesh/span_export.py when first asked for (so not in ``__all__``): what imports
:mod:`mesh.api` alone does not load Twisted's HTTP client.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from twisted.application import service
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from mesh import hookimpl
from mesh.hookspecs import API_VERSION
from mesh.response_flags import FLAGS, Flag

__all__ = [
    "API_VERSION", "hookimpl",
    "RequestView", "EndpointView", "EndpointSpecView", "ClusterView", "ClusterSpecView", "ConnectionView",
    "TryOutcome", "RequestOutcome", "AuthzDecision", "SignedCertificate", "GIVE_UP",
    "CAUnavailable", "CAStatus",
    "ResponseFlag", "RESPONSE_FLAGS", "ConfigSource",
    "OptionParser", "PluginOption", "Config", "ROLES", "ExternalCAPlugin", "ExternalCAService",
    "PluginConfigError", "seconds_option",
]

#: The processes a plugin runs in: ``twistd mesh-proxy`` and ``twistd mesh-control``.
ROLES = ("proxy", "control")

# -- response flags: one table (mesh/response_flags.py), re-exported ---------------------
#: One response flag: ``code`` (``"UF"``), Envoy's ``name``, ``meaning``, ``what_to_do``.
ResponseFlag = Flag
#: Every response flag by code, as Envoy's ``%RESPONSE_FLAGS%``.
RESPONSE_FLAGS: Mapping[str, Flag] = FLAGS


# -- read-only views --------------------------------------------------------------------
@runtime_checkable
class RequestView(Protocol):
    """One HTTP request passing through a sidecar, as every data-plane hook's ``ctx`` sees it.

    Set before any hook runs: ``direction`` (``"outbound"``: app -> mesh, or
    ``"inbound"``), ``method``, ``path`` (the request target after path
    normalization), ``uri_path`` (``path`` without the query), ``host`` (the
    Host header, lower-case, no port), ``authority`` (the Host header as
    received, bytes), ``headers`` (lower-case name -> value, repeated headers
    joined with ``", "``), ``raw_headers`` (the ``(name, value)`` bytes pairs
    forwarded), ``http_version``, ``request_id``, ``source_address`` (the
    client's IP), ``peer`` (the caller's verified SPIFFE id over mTLS, else
    None), ``start`` (epoch seconds when the head was parsed).

    Filled in as the request proceeds: ``route`` (the route action chosen),
    ``cluster`` (its name) and ``upstream_host`` (``"ip:port"``), ``attempts``,
    ``response_code`` (0 until a response starts), ``response_flags``
    (``"URX,UF"``: in the order set, as Envoy 1.30+; see :data:`RESPONSE_FLAGS`), ``error``, ``bytes_received``
    / ``bytes_sent`` (body bytes from / to the downstream), ``upstream_start``,
    ``upstream_time``, ``authz_policy`` (the AuthorizationPolicy that decided),
    ``authz_dry_run``, ``request_auth`` (inbound, set before ``mesh_authorize``: None, or
    the request's verified JWT (RequestAuthentication) with ``principal`` (``iss/sub``),
    ``audiences``, ``presenter`` and ``claims``), ``grpc`` (None unless the request is gRPC; then its
    ``status``, the gRPC status once known, and ``request_messages`` /
    ``response_messages``, the messages counted each way).

    ``extra`` is a dict plugins share per-request data in (created on first
    use); it is the one attribute a plugin may write.
    """

    @property
    def direction(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def uri_path(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def authority(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def http_version(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def source_address(self) -> str: ...
    @property
    def peer(self) -> str | None: ...
    @property
    def start(self) -> float: ...
    @property
    def route(self) -> Any: ...
    @property
    def cluster(self) -> str | None: ...
    @property
    def upstream_host(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def response_code(self) -> int: ...
    @property
    def response_flags(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def upstream_start(self) -> float | None: ...
    @property
    def upstream_time(self) -> float | None: ...
    @property
    def authz_policy(self) -> str | None: ...
    @property
    def authz_dry_run(self) -> tuple | None: ...
    @property
    def request_auth(self) -> Any: ...
    @property
    def grpc(self) -> Any: ...
    @property
    def extra(self) -> dict[str, Any]: ...


@runtime_checkable
class EndpointSpecView(Protocol):
    """An endpoint as configured: ``address``, ``port``, ``labels`` (sorted ``(key, value)`` pairs),
    ``weight``, ``identity`` (the SPIFFE id it must present, None for plaintext)."""

    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def weight(self) -> int: ...
    @property
    def identity(self) -> str | None: ...


@runtime_checkable
class EndpointView(Protocol):
    """A live upstream endpoint, as ``mesh_pick_endpoint`` sees it.

    ``spec`` is its :class:`EndpointSpecView`; ``host_port`` is ``"ip:port"``;
    ``active_requests`` the tries in flight to it; ``total_requests`` and
    ``total_failures`` count its tries.  ``state`` is a dict balancers may keep
    per-endpoint state in (e.g. a latency average).
    """

    @property
    def spec(self) -> EndpointSpecView: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def host_port(self) -> str: ...
    @property
    def active_requests(self) -> int: ...
    @property
    def total_requests(self) -> int: ...
    @property
    def total_failures(self) -> int: ...
    @property
    def state(self) -> dict[str, Any]: ...


@runtime_checkable
class ClusterSpecView(Protocol):
    """A cluster as configured: ``name`` (Istio's ``outbound|PORT|SUBSET|HOST``), ``service``, ``port``,
    ``subset``, ``lb_policy`` (ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH) and ``hash_on``
    (``("header", name)``, ``("cookie", name)``, ``("source_ip", None)``, ``("query", name)`` or None)."""

    @property
    def name(self) -> str: ...
    @property
    def service(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def subset(self) -> str: ...
    @property
    def lb_policy(self) -> str: ...
    @property
    def hash_on(self) -> tuple[str, str | None] | None: ...


@runtime_checkable
class ClusterView(Protocol):
    """An upstream cluster, as ``mesh_pick_endpoint`` sees it: ``name``, ``spec`` (a
    :class:`ClusterSpecView`), ``endpoints`` (all of them, healthy or not) and ``state``, a dict
    balancers may keep per-cluster state in (it lives as long as a cluster of that name is in the config,
    across config swaps: check what is cached in it against the ``endpoints`` of each call)."""

    @property
    def name(self) -> str: ...
    @property
    def spec(self) -> ClusterSpecView: ...
    @property
    def endpoints(self) -> Sequence[EndpointView]: ...
    @property
    def state(self) -> dict[str, Any]: ...


@runtime_checkable
class ConnectionView(Protocol):
    """One downstream connection, as :func:`mesh.hookspecs.mesh_connection_open` and
    :func:`mesh.hookspecs.mesh_connection_complete` see it.  Read-only.

    ``direction`` is ``"inbound"`` or ``"outbound"``; ``protocol`` is
    ``"http/1.1"``, ``"h2"`` (HTTP/2: the connection was opened as ``"http/1.1"`` and is
    completed as ``"h2"``, a view of its own) or ``"tcp"`` (a routed TCP connection or a
    passthrough tunnel).  ``source_address`` is the client's IP; ``destination`` the original destination ``(ip, port)``
    of a transparently captured connection, else None; ``upstream`` the
    ``(host, port)`` a TCP tunnel connected to, else None.  ``peer`` is the
    client's verified SPIFFE id over mTLS, else None.  ``start`` is when it
    was accepted (``reactor.seconds()``) and ``duration`` the seconds it
    lasted (0.0 until it ends).  ``bytes_received`` counts client -> proxy
    bytes and ``bytes_sent`` proxy -> client bytes (after TLS), ``requests``
    the HTTP requests it carried.  ``cluster`` is the cluster a TCP tunnel
    went to (``PassthroughCluster``, ``BlackHoleCluster``, a registry
    cluster, ``inbound|PORT||``), None for HTTP; ``response_flags`` the tunnel's flags
    (``UF`` connect failure, ``UH`` refused by policy, ``RBAC`` denied, ``NR`` no
    TCP route, ...), ``""`` if none.
    """

    @property
    def direction(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def source_address(self) -> str: ...
    @property
    def destination(self) -> tuple[str, int] | None: ...
    @property
    def upstream(self) -> tuple[str, int] | None: ...
    @property
    def peer(self) -> str | None: ...
    @property
    def start(self) -> float: ...
    @property
    def duration(self) -> float: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def cluster(self) -> str | None: ...
    @property
    def response_flags(self) -> str: ...


class ConfigSource(Protocol):
    """What ``mesh_config_sources`` returns: a place Istio-style resources come from.

    ``name`` is short, for logs (``files:/etc/mesh``).  ``load()`` reads the
    whole current content now; ``watch(on_update)`` calls ``on_update`` with
    the whole content after every change, once started.  A source that is also
    a Twisted ``IService`` becomes a child service of the control plane (it
    watches while it runs).  The control plane's ``IConfigSource`` (a
    zope.interface) says the same.
    """

    @property
    def name(self) -> str: ...
    def load(self) -> Any: ...
    def watch(self, on_update: Callable[[Any], None]) -> None: ...


# -- outcomes ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TryOutcome:
    """How one try failed, as seen by ``mesh_retry_decision``.

    ``kind`` is ``"status"`` (the upstream answered ``status``),
    ``"connect-failure"``, ``"reset"`` (the connection broke before a
    response) or ``"timeout"`` (the per-try timeout fired).  For a gRPC
    request, ``grpc_status`` is the gRPC status of a Trailers-Only response
    (``grpc-status`` in the response headers; the HTTP ``status`` is then
    usually 200), else None.
    """

    kind: str
    status: int | None = None
    detail: str = ""
    grpc_status: int | None = None


class RequestOutcome(NamedTuple):
    """How a whole request ended, as seen by ``mesh_request_complete``.

    Made once per request, so it is a NamedTuple: as immutable as a frozen
    dataclass, and cheaper to build (about 1.4% of a small request).

    ``status`` is what the downstream got (0 if the connection was cut before
    any response), ``local`` is True when the proxy generated the response,
    ``duration`` is seconds from the parsed head to the last byte sent.
    ``detail`` is Envoy's ``%RESPONSE_CODE_DETAILS%``: why the response is what
    it is, for operators only (the caller gets just the flags): ``via_upstream``
    when the upstream answered, else e.g. ``route_not_found``,
    ``rbac_access_denied_matched_policy[shop/deny-batch]`` or
    ``plugin_error{NAME,HOOK}``.
    """

    status: int
    flags: str
    local: bool
    duration: float
    detail: str = ""


# -- results ------------------------------------------------------------------------------
class AuthzDecision(NamedTuple):
    """What ``mesh_authorize`` returns when it has an opinion: ``allowed``, and the ``policy`` that decided.

    A plain ``(allowed, policy)`` tuple means the same (it is what releases
    before plugin API 1 returned).
    """

    allowed: bool
    policy: str | None


class SignedCertificate(NamedTuple):
    """What ``mesh_sign_csr`` returns (or a Deferred fires with): PEM bytes of the workload certificate
    and of the chain above it (the signing certificate up to, not including, the root).  A plain
    ``(cert_pem, chain_pem)`` tuple means the same."""

    cert_pem: bytes
    chain_pem: bytes


class CAUnavailable(Exception):
    """Raised by ``mesh_sign_csr`` (or the failure of its Deferred) when the CA cannot sign now:
    an external CA that is sealed, down, slow or throttling.

    The control plane answers the CSR ``503`` with ``reason`` and a ``Retry-After`` of
    ``retry_after`` seconds; the workload's agent retries with backoff and keeps serving on its
    current certificate.  Any other exception is a ``500`` (a bug, logged with its traceback).
    ``reason`` says what is wrong and what to do (``"vault at https://... is sealed: unseal it"``);
    it must never contain a secret.
    """

    def __init__(self, reason: str, retry_after: float = 5.0):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class CAStatus(NamedTuple):
    """What ``mesh_ca_status`` returns for the CA a plugin provides.

    ``name`` is the CA's name as ``mesh-control --ca NAME`` selects it (``builtin``, ``vault``,
    ``awspca``); ``selected`` whether it is the one selected; ``ready`` whether it can sign now;
    ``reason`` why not (empty when ready); ``roots_pem`` the PEM root certificates workloads must
    trust for it (during a rotation, old and new roots together; empty if not known yet);
    ``issuer`` a one-line description of who signs (``"vault https://127.0.0.1:8200 pki/sign/mesh"``),
    shown by ``meshctl proxy-config cert``.
    """

    name: str
    selected: bool
    ready: bool
    reason: str
    roots_pem: bytes
    issuer: str


#: What ``mesh_retry_decision`` returns to give up (a float is the delay before the next try,
#: None defers to the next implementation).
GIVE_UP = False


# -- lifecycle ----------------------------------------------------------------------------
class PluginOption(NamedTuple):
    """One command-line option a plugin added (see :meth:`OptionParser.addoption`)."""

    name: str
    default: Any
    help: str
    coerce: Callable[[str], Any] | None
    role: str
    plugin: str


class OptionParser:
    """What ``mesh_addoption(parser)`` gets: collects the options plugins add to ``twistd mesh-proxy``
    and ``twistd mesh-control``.

    The options become ``--NAME VALUE`` options of the role's command line
    (Twisted ``usage.Options`` parameters) and show in its ``--help``; after
    parsing, ``config.option(NAME)`` holds the value (the default when not
    given: defaults are not coerced, so give them in the final type).
    """

    def __init__(self, existing: Mapping[str, Iterable[str]] | None = None):
        #: role -> the option names the role has already (built-in options), to refuse a clash.
        self._existing = {role: set(names) for role, names in (existing or {}).items()}
        self.options: list[PluginOption] = []
        #: the name of the plugin whose ``mesh_addoption`` runs (set by the plugin manager), for errors.
        self.current_plugin = "?"

    def addoption(self, name: str, default: Any = None, help: str = "",
                  coerce: Callable[[str], Any] | None = None, role: str = "proxy") -> None:
        """Add ``--NAME``: ``default`` when not given, ``coerce`` turns the given string into the value.

        :param role: ``"proxy"``, ``"control"`` or ``"both"``: which command lines get it.
        :raises ValueError: when the name is not ``lower-case-with-dashes``, the role is unknown, or the
            option exists already (a built-in option or another plugin's).
        """
        if role not in ROLES + ("both",):
            raise ValueError(f"plugin {self.current_plugin!r}: addoption({name!r}): role is 'proxy', "
                             f"'control' or 'both', not {role!r}")
        if not name or name.startswith("-") or name != name.lower() or " " in name:
            raise ValueError(f"plugin {self.current_plugin!r}: addoption({name!r}): give the long name "
                             "without dashes in front, lower-case, e.g. 'example-header-value'")
        for role_name in (ROLES if role == "both" else (role,)):
            taken = self._existing.setdefault(role_name, set())
            if name in taken:
                raise ValueError(f"plugin {self.current_plugin!r}: option --{name} exists already in "
                                 f"mesh-{role_name}; choose another name (prefix it with the plugin's)")
            taken.add(name)
        self.options.append(PluginOption(name, default, help, coerce, role, self.current_plugin))

    def for_role(self, role: str) -> list[PluginOption]:
        """The options of ``role``'s command line."""
        return [option for option in self.options if option.role in (role, "both")]


class Config:
    """What ``mesh_configure(config)`` and ``mesh_unconfigure(config)`` get: one per process.

    :ivar role: ``"proxy"`` or ``"control"``.
    :ivar options: the parsed command line (a mapping from long option name, e.g. ``"workload"``).
    :ivar reactor: the Twisted reactor.
    :ivar service: the process's top Twisted service (a ``MultiService``): a plugin may add child
        services to it (they start and stop with the process).  Its other attributes are internal,
        for built-in plugins only.
    :ivar pluginmanager: the plugin manager (``pluggy.PluginManager``).
    :ivar stash: a dict plugins may share objects in for the life of the process.
    """

    def __init__(self, role: str, options: Mapping[str, Any], reactor: Any, service: Any, pluginmanager: Any):
        if role not in ROLES:
            raise ValueError(f"role is one of {ROLES}, not {role!r}")
        self.role = role
        self.options = options
        self.reactor = reactor
        self.service = service
        self.pluginmanager = pluginmanager
        self.stash: dict[str, Any] = {}
        #: plugin name -> why it stays idle in this process (see :meth:`set_idle`).
        self.idle: dict[str, str] = {}

    def option(self, name: str, default: Any = None) -> Any:
        """The value of ``--NAME`` (``default`` when this role has no such option)."""
        return self.options.get(name, default)

    def set_idle(self, plugin: object, reason: str) -> None:
        """Say, from ``mesh_configure``, that ``plugin`` does nothing in this process (``reason``, e.g.
        ``"control plane only"`` or ``"--access-log off"``).

        Once every ``mesh_configure`` has run, an idle plugin is unregistered:
        none of its hooks is called again (so it costs nothing per request),
        nor its ``mesh_unconfigure``.  It is still listed, as idle, by
        ``/config_dump``.
        """
        name = self.pluginmanager.get_name(plugin)
        if name is None:
            raise ValueError(f"set_idle: {plugin!r} is not a registered plugin")
        self.idle[name] = reason


# -- external certificate authorities ---------------------------------------------------------
class PluginConfigError(Exception):
    """A mistake in a plugin's own options, found in ``mesh_configure``: the message names the option and
    says what to give.  :class:`ExternalCAPlugin` exits the process with it, without a traceback."""


def seconds_option(value: str) -> float:
    """An option's positive number of seconds, at most an hour (``5``, ``2.5``, ``5s``)."""
    try:
        number = float(value.removesuffix("s"))
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds (e.g. 5 or 2.5)") from None
    if not 0 < number <= 3600:
        raise ValueError(f"{value!r}: give a number of seconds between 0 and 3600")
    return number


class ExternalCAService(service.Service):
    """The Twisted service shell of an external CA whose client blocks (hvac, boto3).

    Its calls run in a pool of ``concurrency`` worker threads (:meth:`in_thread`), never in the
    reactor.  While it runs, a status check runs in that pool at start and then again after
    :meth:`next_check` seconds: a subclass implements :meth:`check` (blocking, in a worker thread)
    and :meth:`checked` / :meth:`check_failed` (in the reactor, with its result or failure), and
    may override :meth:`check_ended`.  :meth:`check_soon` moves the next check to now.
    """

    def __init__(self, reactor: Any, thread_name: str, concurrency: int) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=concurrency, name=thread_name)
        self._timer: Any = None

    def startService(self) -> None:
        """Start the threads and the first status check."""
        super().startService()
        self.pool.start()
        self._check_now()

    def stopService(self) -> Any:
        """Stop checking and wait for the calls in flight (each bounded by the CA's own timeout)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.pool.stop()
        return super().stopService()

    def in_thread(self, function: Callable, *args: Any) -> Any:
        """A Deferred of ``function(*args)`` called in a worker thread."""
        return threads.deferToThreadPool(self.reactor, self.pool, function, *args)

    def check_soon(self) -> None:
        """Check the CA's status now (the next check was due later)."""
        if self._timer is not None and self._timer.active():
            self._timer.reset(0)

    def check(self) -> Any:
        """Find the CA's status (blocking, in a worker thread); the result goes to :meth:`checked`."""
        raise NotImplementedError

    def checked(self, result: Any) -> None:
        """The result of :meth:`check` (in the reactor)."""
        raise NotImplementedError

    def check_failed(self, failure: Any) -> None:
        """:meth:`check` raised (in the reactor)."""
        raise NotImplementedError

    def check_ended(self) -> None:
        """A check ended, well or not (in the reactor, before the next is scheduled)."""

    def next_check(self) -> float:
        """Seconds until the next status check."""
        raise NotImplementedError

    def _check_now(self) -> None:
        self._timer = None
        d = self.in_thread(self.check)
        d.addCallbacks(self.checked, self.check_failed)
        d.addBoth(self._schedule_next)

    def _schedule_next(self, _: Any) -> None:
        self.check_ended()
        if self.running:
            self._timer = self.reactor.callLater(self.next_check(), self._check_now)


class ExternalCAPlugin:
    """The plugin side every external CA shares (``txmesh-vault``, ``txmesh-awspca``).

    A subclass sets ``ca_name`` (what ``mesh-control --ca NAME`` selects) and ``options`` (its
    control-plane options: objects with ``name``, ``default``, ``help`` and ``coerce``), and implements
    :meth:`start_ca`.  In a sidecar the plugin is idle.  In the control plane it adds its options; when
    ``--ca`` names it, it starts its CA as a child service of mesh-control, reports the CA's ``status``
    through ``mesh_ca_status`` and signs through its ``sign``; while another CA is selected it reports
    itself not selected and signs nothing.
    """

    ca_name: str = ""
    options: Sequence[Any] = ()

    def __init__(self) -> None:
        self.ca: Any = None

    def start_ca(self, config: Config) -> Any:
        """Build the CA for ``config`` (raise :class:`PluginConfigError` for a bad option): a Twisted
        service with a ``status`` attribute (a :class:`CAStatus`) and ``sign(csr, identity, ttl)``, which
        answers as ``mesh_sign_csr`` does."""
        raise NotImplementedError

    @hookimpl
    def mesh_addoption(self, parser: OptionParser) -> None:
        for option in self.options:
            parser.addoption(option.name, default=option.default, help=option.help, coerce=option.coerce,
                             role="control")

    @hookimpl
    def mesh_configure(self, config: Config) -> None:
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        if config.option("ca") != self.ca_name:
            return
        try:
            ca = self.start_ca(config)
        except PluginConfigError as error:
            sys.stderr.write(f"mesh-control: {error}\n")
            raise SystemExit(1) from None
        ca.setServiceParent(config.service)
        self.ca = ca

    @hookimpl
    def mesh_unconfigure(self, config: Config) -> None:
        self.ca = None

    @hookimpl
    def mesh_ca_status(self) -> CAStatus:
        if self.ca is None:
            return CAStatus(self.ca_name, False, False, f"not selected: run mesh-control with --ca {self.ca_name}",
                            b"", "")
        return self.ca.status

    @hookimpl
    def mesh_sign_csr(self, csr: Any, identity: str, ttl: float) -> Any:
        return None if self.ca is None else self.ca.sign(csr, identity, ttl)


def __getattr__(name: str) -> Any:
    """``SpanExporter``, imported on first use (see the module docstring)."""
    if name == "SpanExporter":
        from mesh.span_export import SpanExporter

        return SpanExporter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
