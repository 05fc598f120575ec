"""``twistd mesh-proxy``: command-line options and service construction."""

from __future__ import annotations

import os
import sys

from twisted.logger import Logger
from twisted.python import usage

import mesh.proxy.web_http1  # noqa: F401  (first of the mesh imports: before anything imports twisted.web)
from mesh import logging as mesh_logging
from mesh.api import Config
from mesh.config.compile import Workload, load_and_compile
from mesh.config.errors import ConfigErrors
from mesh.config.hosts import is_ip
from mesh.durations import duration_option
from mesh.plugins import configure_or_exit, disable_after_parse, plugin_options
from mesh.proxy.app_probes import parse_app_probers
from mesh.proxy.codec import http2_engine
from mesh.proxy.gateway import GatewaySettings
from mesh.proxy.listener import Limits
from mesh.proxy.overload import FDS_PER_CONNECTION, MIN_CONNECTIONS, connection_limit
from mesh.proxy.passthrough import ALLOW_ANY, OUTBOUND_TRAFFIC_POLICIES, PassthroughSettings
from mesh.proxy.paths import BASE, NORMALIZATIONS, normalization_option
from mesh.proxy.service import IdentitySettings, ProxyService, ProxySettings
from mesh.proxy.workers import Supervisor, SupervisorSettings, WorkerSettings, become_worker
from mesh.sidecar_contract import (
    ADMIN_PORT,
    APP_PROBERS_ENV,
    HEALTH_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
)
from mesh.startup import ListenPort, exit_on_port_problems, raise_fd_limit, stop_once_on_signals
from mesh.telemetry.sidecar import TelemetrySettings
from mesh.telemetry.tracing import DEFAULT_SAMPLING, TracingSettings

log = Logger()


def _size(text: str) -> int:
    """``"64k"``, ``"10M"``, ``"1G"`` or plain bytes."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


class ProxyOptions(usage.Options):
    """The built-in options of ``twistd mesh-proxy`` (:func:`Options` adds the plugins')."""

    synopsis = "[options]"
    longdesc = ("Run a txmesh sidecar proxy.  Standalone: --config-dir DIR holds Istio YAML "
                "(ServiceEntry, DestinationRule, VirtualService, ...); SIGHUP reloads it.")

    optParameters = [
        ["config-dir", "c", None, "Directory of Istio YAML resources (standalone mode; without it and with "
                                  "--control, the config comes from the control plane)."],
        ["state-dir", None, None, "Directory for the last-known-good config snapshot (with --control and no "
                                  "--config-dir)."],
        ["workload", "w", None, "Name of this workload (required)."],
        ["namespace", None, "default", "Namespace of this workload."],
        ["service-account", None, "default", "Service account of this workload."],
        ["outbound-address", None, "127.0.0.1", "Address of the outbound listener."],
        ["outbound-port", None, OUTBOUND_PORT, "Port of the outbound listener (app -> mesh).", int],
        ["inbound-address", None, "0.0.0.0", "Address of the inbound listener."],
        ["inbound-port", None, INBOUND_PORT, "Port of the inbound listener (mesh -> app).", int],
        ["app-address", None, "127.0.0.1", "Address of the local app."],
        ["app-port", None, 0, "Port of the local app; 0 disables the inbound listener.", int],
        ["admin-port", None, ADMIN_PORT, "Admin port, bound to 127.0.0.1.", int],
        ["health-port", None, HEALTH_PORT, "Port of /healthz/ready (the kubelet's probes), on the inbound address; "
                                     "0 turns it off.", int],
        ["app-probers", None, None, "The app's probes the health port runs for the kubelet at /app-health/..., "
                                    f"as JSON (Istio's ISTIO_KUBE_APP_PROBERS format); default: ${APP_PROBERS_ENV}, "
                                    "which the injector sets."],
        ["max-header-bytes", None, "60k", "Limit on a request head (431 beyond)."],
        ["http2-engine", None, http2_engine.DEFAULT, "The HTTP/2 codecs' protocol engine: nghttp2 (libnghttp2's "
                                                     "session, its callbacks in C when built; h2 when the library "
                                                     "cannot be loaded), nghttp2-cffi (the same, its callbacks in "
                                                     "Python) or h2 (the pure-Python h2 library)."],
        ["max-headers", None, 100, "Limit on the number of request headers (431 beyond).", int],
        ["max-request-body", None, "0", "Limit on a request body, 0 for none (413 beyond)."],
        ["max-connections", None, 4096, "Connections per listener (lowered at start if the file-descriptor "
                                          "limit cannot hold them; near it, the longest idle are closed).", int],
        ["drain-time", None, "5s", "On SIGTERM: how long in-flight requests get to finish (new connections "
                                   "are refused at once).", duration_option],
        ["header-timeout", None, 10.0, "Seconds a client may take to send a request head.", float],
        ["idle-timeout", None, 300.0, "Seconds a connection may stay idle.", float],
        ["retry-buffer", None, "1M", "Request body bytes held for retries (larger: no retry)."],
        ["retry-budget-percent", None, 20.0, "Retries in flight to a cluster, as a percentage of its requests in "
                                             "flight (Envoy's retry budget; beyond, a retry is not made).", float],
        ["retry-budget-min-concurrency", None, 3, "Retries in flight a cluster's retry budget always allows.", int],
        ["outbound-traffic-policy", None, ALLOW_ANY,
         "Captured traffic to destinations the mesh does not know: ALLOW_ANY passes it through (Istio's default), "
         "REGISTRY_ONLY blocks it (HTTP: 502; other TCP: connection closed)."],
        ["protocol-detection-timeout", None, "500ms", "How long a captured connection may stay silent before it is "
                                                      "taken for a server-first protocol (TCP).",
         duration_option],
        ["passthrough-connect-timeout", None, "10s", "Connect timeout of TCP passthrough connections.",
         duration_option],
        ["max-passthrough-connections", None, 1024, "Open TCP passthrough connections per listener.", int],
        ["path-normalization", None, BASE, "How request paths are normalized before routing, authorization and "
         "forwarding (Istio's meshConfig.pathNormalization): " + ", ".join(NORMALIZATIONS) + "."],
        ["dns-server", None, None, "IP:PORT of the DNS server that resolves the host names of ServiceEntries "
                                   "with resolution DNS (default: the servers of /etc/resolv.conf)."],
        ["trust-domain", None, "cluster.local", "SPIFFE trust domain of the mesh."],
        ["control", None, None, "HOST:PORT of mesh-control: get and rotate the workload certificate there."],
        ["control-identity", None, None,
         "SPIFFE id mesh-control must present (default spiffe://TD/ns/mesh-system/sa/mesh-control)."],
        ["ca-bundle", None, None, "Trust bundle (PEM roots), e.g. mesh-control's STATE/root-cert.pem."],
        ["token-file", None, None, "File with the join token (`meshctl token create`) for --control."],
        ["cert", None, None, "Static workload certificate chain (PEM), instead of --control."],
        ["key", None, None, "Private key of --cert (PEM)."],
        ["cert-ttl", None, None, "Certificate lifetime to ask for (capped by the control plane).",
         duration_option],
        ["zipkin-url", None, None, "Export spans to Zipkin (v2 JSON), e.g. http://zipkin:9411/api/v2/spans."],
        ["trace-sampling", None, DEFAULT_SAMPLING,
         "Percent of requests to trace when the caller did not decide (0-100; Istio's default: 1).", float],
        ["zipkin-max-queue", None, 2048, "Spans held for export; beyond, spans are dropped and counted.", int],
        ["metrics-port", None, METRICS_PORT, "Port of /stats/prometheus, on the inbound address; 0 turns metrics "
                                             "off.", int],
        ["workers", None, 1, "Worker processes serving the listeners (also --concurrency, Envoy's word); 1: this "
                             "process serves them (docs/operations.md, \"Worker processes\").", int],
        ["gateway-address", None, "0.0.0.0", "Address of the gateway ports (with --gateway)."],
        ["gateway-credentials-dir", None, None, "Where the Secrets that Gateways name in credentialName are mounted "
                                                "(with --gateway): DIR/NAME/tls.crt, tls.key, ca.crt.  Default with "
                                                "--control and --state-dir: the Secrets mesh-control --kubernetes "
                                                "sends, written to STATE_DIR/gateway-credentials."],
        ["access-log", None, "stdout",
         "Access log (a JSON line per request and per TCP passthrough connection): stdout (a daemon has none: "
         "then log), log (twistd's log: its --logfile, --syslog or --logger), off, or a file."],
    ]

    optFlags = [["gateway", None, "Run as an ingress gateway (docs/gateway.md): listen on the ports of the Gateways "
                                  "whose selector matches this proxy's --label, and route with the VirtualServices "
                                  "bound to them."]]

    def __init__(self):
        super().__init__()
        self["labels"] = {}
        self["disabled-plugins"] = []
        self["outbound-tcp-ports"] = []
        self["gateway-ports"] = {}

    def opt_label(self, value):
        """KEY=VALUE label of this workload (repeatable); selectors match them."""
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise usage.UsageError(f"--label wants KEY=VALUE, got {value!r}")
        self["labels"][key] = val

    def opt_outbound_tcp_port(self, value):
        """PORT of an explicit TCP listener on --outbound-address (repeatable): a connection to it goes to the
        TCP, TLS or HTTPS service port PORT (Istio's Sidecar egress listener without capture)."""
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise usage.UsageError(f"--outbound-tcp-port wants a port number, got {value!r}")
        self["outbound-tcp-ports"].append(int(value))

    def opt_gateway_port(self, value):
        """PORT=LOCAL (repeatable, with --gateway): serve the Gateway server port PORT on the local port LOCAL
        (unmapped ports listen on their own number)."""
        port, sep, local = value.partition("=")
        if not sep or not all(text.isdigit() and 1 <= int(text) <= 65535 for text in (port, local)):
            raise usage.UsageError(f"--gateway-port wants PORT=LOCAL (two port numbers), got {value!r}")
        self["gateway-ports"][int(port)] = int(local)

    def opt_concurrency(self, value):
        """N: the same as --workers N (Envoy's option name)."""
        self["workers"] = value

    def opt_disable_plugin(self, name):
        """Do not load the plugin NAME (repeatable); see `meshctl plugins`."""
        self["disabled-plugins"].append(name)

    def postOptions(self):
        if not self["workload"]:
            raise usage.UsageError("--workload is required")
        if not str(self["workers"]).isdigit() or not 1 <= int(self["workers"]) <= 64:
            raise usage.UsageError(f"--workers (--concurrency) is a number of processes from 1 to 64, "
                                   f"got {self['workers']!r}")
        self["workers"] = int(self["workers"])
        self._check_gateway_options()
        if not self["config-dir"] and not self["control"]:
            raise usage.UsageError("--config-dir (the directory of Istio YAML files) or --control (config from "
                                   "the control plane) is required")
        self._check_identity_options()
        self._parse_app_probers()
        if self["outbound-traffic-policy"] not in OUTBOUND_TRAFFIC_POLICIES:
            raise usage.UsageError(f"--outbound-traffic-policy is ALLOW_ANY or REGISTRY_ONLY, "
                                   f"got {self['outbound-traffic-policy']!r}")
        try:
            self["path-normalization"] = normalization_option(self["path-normalization"])
        except ValueError as error:
            raise usage.UsageError(f"--path-normalization: {error}") from None
        if not 0.0 <= self["trace-sampling"] <= 100.0:
            raise usage.UsageError(f"--trace-sampling is a percentage (0-100), got {self['trace-sampling']}")
        if self["zipkin-url"] and not self["zipkin-url"].startswith(("http://", "https://")):
            raise usage.UsageError(f"--zipkin-url wants http://HOST:PORT/api/v2/spans, got {self['zipkin-url']!r}")
        if self["access-log"] not in ("stdout", "log", "off"):
            try:
                open(self["access-log"], "ab").close()
            except OSError as error:
                message = f"--access-log: cannot append to {self['access-log']}: {error.strerror}"
                raise usage.UsageError(message) from None
        if self["dns-server"] is not None:
            self["dns-server"] = _dns_server(self["dns-server"])
        if self["retry-budget-percent"] < 0 or self["retry-budget-min-concurrency"] < 0:
            raise usage.UsageError("--retry-budget-percent and --retry-budget-min-concurrency are 0 or more; "
                                   f"got {self['retry-budget-percent']} and {self['retry-budget-min-concurrency']}")
        if self["http2-engine"] not in http2_engine.ENGINES:
            raise usage.UsageError(f"--http2-engine: one of {', '.join(http2_engine.ENGINES)}; "
                                   f"got {self['http2-engine']!r}")
        try:
            for name in ("max-header-bytes", "max-request-body", "retry-buffer"):
                self[name] = _size(self[name])
        except ValueError as error:
            raise usage.UsageError(f"bad size: {error}") from None


    def _check_gateway_options(self):
        if not self["gateway"]:
            if self["gateway-ports"] or self["gateway-credentials-dir"]:
                raise usage.UsageError("--gateway-port and --gateway-credentials-dir are for a gateway: add --gateway")
            return
        if self["app-port"]:
            raise usage.UsageError("a gateway has no app: remove --app-port (or --gateway)")
        if self["workers"] > 1:
            raise usage.UsageError("a gateway runs in one process: remove --workers (its ports follow the config, "
                                   "which the workers' shared sockets cannot)")

    def _parse_app_probers(self):
        given = self["app-probers"] is not None
        source = "--app-probers" if given else f"${APP_PROBERS_ENV}"
        try:
            self["app-probers"] = parse_app_probers(self["app-probers"] if given else os.environ.get(APP_PROBERS_ENV))
        except ValueError as error:
            raise usage.UsageError(f"{source}: {error}") from None
        if self["app-probers"] and not self["health-port"]:
            raise usage.UsageError(f"{source} needs the health port the kubelet probes: give --health-port")

    def _check_identity_options(self):
        if self["control"] and (self["cert"] or self["key"]):
            raise usage.UsageError("--control and --cert/--key are alternatives; give one")
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        if (self["control"] or self["cert"]) and not self["ca-bundle"]:
            raise usage.UsageError("--ca-bundle is required with --control or --cert (the mesh's root-cert.pem)")
        if self["control"]:
            if not self["token-file"]:
                raise usage.UsageError("--token-file is required with --control (see `meshctl token create`)")
            host, sep, port = self["control"].rpartition(":")
            if not sep or not port.isdigit():
                raise usage.UsageError(f"--control wants HOST:PORT, got {self['control']!r}")
            self["control"] = (host.strip("[]"), int(port))
        if not self["control-identity"]:
            self["control-identity"] = f"spiffe://{self['trust-domain']}/ns/mesh-system/sa/mesh-control"


def Options() -> ProxyOptions:
    """The options of ``twistd mesh-proxy``: :class:`ProxyOptions` and those the plugins add in
    ``mesh_addoption``; ``options.pluginmanager`` has every plugin not disabled."""
    return plugin_options(ProxyOptions, "proxy")


def _dns_server(value) -> tuple:
    """``--dns-server IP:PORT`` (``[IPV6]:PORT`` for IPv6) as ``(ip, port)``."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--dns-server wants IP:PORT (e.g. 127.0.0.1:53), got {value!r}")
    return host, int(port)


def _seconds(value) -> float:
    """usage.Options coerces only the values given on the command line, not the defaults."""
    return duration_option(value) if isinstance(value, str) else float(value)


def _listen_ports(options) -> list:
    """The ports mesh-proxy cannot run without (the health and metrics ports are optional: see OptionalServer)."""
    return [ListenPort("--admin-port", "127.0.0.1", options["admin-port"]), *_traffic_ports(options)]


def _traffic_ports(options) -> list:
    """The listeners of the traffic: outbound, inbound (with an app port) and each --outbound-tcp-port."""
    ports = [ListenPort("--outbound-port", options["outbound-address"], options["outbound-port"], "--outbound-address")]
    if options["app-port"]:
        ports.append(ListenPort("--inbound-port", options["inbound-address"], options["inbound-port"],
                                "--inbound-address"))
    ports += [ListenPort("--outbound-tcp-port", options["outbound-address"], port, "--outbound-address")
              for port in options["outbound-tcp-ports"]]
    return ports


def _inbound_addresses(options) -> tuple:
    """``(address, port)`` pairs where peers reach the inbound listener (a wildcard address: loopback,
    the app's and the outbound address); none without an app port."""
    if not options["app-port"]:
        return ()
    address = options["inbound-address"]
    addresses = {address} if address not in ("0.0.0.0", "::") else {
        "127.0.0.1", options["app-address"], options["outbound-address"]}
    return tuple(sorted((address, options["inbound-port"]) for address in addresses))


def _connection_limit(options) -> int:
    """Raise the file-descriptor limit, and fit ``--max-connections`` per listener into it (logged)."""
    fds = raise_fd_limit()
    listeners = (2 if options["app-port"] else 1) + len(options["outbound-tcp-ports"])
    requested = options["max-connections"]
    limit = connection_limit(requested, listeners, fds.soft)
    if limit < MIN_CONNECTIONS:
        sys.stderr.write(f"mesh-proxy: error: the file-descriptor limit ({fds.describe()}) leaves room for "
                         f"{limit} connections per listener; raise the hard limit (ulimit -Hn, systemd "
                         "LimitNOFILE=, the container runtime's nofile) and start again\n")
        raise SystemExit(1)
    if limit < requested:
        log.warn("--max-connections {requested} does not fit in the file-descriptor limit ({fds}): {limit} "
                 "connections per listener instead; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, the "
                 "container runtime's nofile) to allow more", requested=requested, fds=fds.describe(), limit=limit)
    log.info("file descriptors: {fds}; {limit} connections per listener ({listeners} listener(s), up to {per} "
             "descriptors each)", fds=fds.describe(), limit=limit, listeners=listeners, per=FDS_PER_CONNECTION)
    return limit


def _access_log(options) -> str:
    """``--access-log``; a daemon has no stdout, so ``stdout`` becomes ``log`` (twistd's log file) then."""
    server = options.parent  # twistd's own options, or None when built without twistd
    if options["access-log"] == "stdout" and server is not None and not server["nodaemon"]:
        log.info("access log: twistd runs as a daemon (no -n), so its lines go to twistd's log "
                 "(--logfile); give --access-log FILE for a file of their own")
        return "log"
    return options["access-log"]


def _workload(options) -> Workload:
    return Workload(name=options["workload"], namespace=options["namespace"], labels=dict(options["labels"]),
                    service_account=options["service-account"], app_port=options["app-port"] or None,
                    inbound=_inbound_addresses(options), gateway=bool(options["gateway"]),
                    credentials_dir=_credentials_dir(options))


def _credentials_dir(options):
    """``--gateway-credentials-dir``; for a gateway fed by the control plane without it, the private
    directory of its state dir where the Secrets the control plane sends are written."""
    if options["gateway-credentials-dir"] or options["config-dir"] or not (options["gateway"] and options["state-dir"]):
        return options["gateway-credentials-dir"]
    from mesh.proxy.gateway_credentials import private_dir
    return private_dir(options["state-dir"])


def _exit_on_config_errors(errors: ConfigErrors, config_dir: str):
    for error in errors.errors:
        sys.stderr.write(f"{error}\n")
    sys.stderr.write(f"mesh-proxy: {len(errors.errors)} config error(s) in {config_dir}; "
                     "fix them (see `meshctl validate`) and start again\n")
    raise SystemExit(1) from None


def _supervisor(options) -> Supervisor:
    """The parent of ``--workers N`` (:mod:`mesh.proxy.workers`): it checks the ports and the config, binds the
    listeners and runs N copies of this command line as its workers."""
    exit_on_port_problems("mesh-proxy", _listen_ports(options))
    mesh_logging.follow_twistd(options.parent)
    if options["config-dir"]:
        try:
            load_and_compile(options["config-dir"], _workload(options))
        except ConfigErrors as errors:
            _exit_on_config_errors(errors, options["config-dir"])
    command = sys.argv[sys.argv.index("mesh-proxy"):]
    health = ((options["inbound-address"], options["health-port"]),) if options["health-port"] else ()
    return Supervisor(None, SupervisorSettings(
        workers=options["workers"], listeners=tuple((port.address, port.port) for port in _traffic_ports(options)),
        optional_listeners=health, admin_port=options["admin-port"], metrics_port=options["metrics-port"],
        metrics_address=options["inbound-address"], drain_time=_seconds(options["drain-time"]),
        argv=("-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
              *_worker_logger(options.parent), *command)))


def _worker_logger(server) -> tuple:
    """twistd's ``--logger`` of the parent (e.g. ``mesh.logging.json_observer``), for its workers; they log
    to the parent's standard output, so its ``--logfile`` is not theirs."""
    logger = server.get("logger") if server is not None else None  # twistd has imported it: name it again
    return ("--logger", f"{logger.__module__}.{logger.__qualname__}") if logger else ()


def makeService(options):
    """Build the :class:`ProxyService` (or, with ``--workers`` above 1, the :class:`~mesh.proxy.workers.Supervisor`
    of N of them); exit with one line per problem if a port is taken or the config is invalid.

    twistd calls this before it daemonizes and binds the ports, so the
    lines reach the terminal that started it.
    """
    from twisted.internet import reactor  # here, not at import: twistd installs its --reactor first

    stop_once_on_signals(reactor)
    worker = WorkerSettings.from_environ()
    if worker is None and options["workers"] > 1:
        return _supervisor(options)
    if worker is None:
        exit_on_port_problems("mesh-proxy", _listen_ports(options))
    else:
        become_worker(worker)  # the parent bound the ports
    mesh_logging.follow_twistd(options.parent)
    http2_engine.use(options["http2-engine"])
    workload = _workload(options)
    limits = Limits(
        max_header_bytes=options["max-header-bytes"], max_headers=options["max-headers"],
        max_request_body=options["max-request-body"], max_connections=_connection_limit(options),
        header_timeout=options["header-timeout"], idle_timeout=options["idle-timeout"],
        retry_buffer=options["retry-buffer"], retry_budget_percent=options["retry-budget-percent"],
        retry_budget_min_concurrency=options["retry-budget-min-concurrency"])
    settings = ProxySettings(
        config_dir=options["config-dir"], workload=workload,
        outbound_address=options["outbound-address"], outbound_port=options["outbound-port"],
        inbound_address=options["inbound-address"], inbound_port=options["inbound-port"],
        app_address=options["app-address"], app_port=options["app-port"],
        admin_port=options["admin-port"], health_port=options["health-port"],
        app_probes=options["app-probers"], state_dir=options["state-dir"], limits=limits,
        drain_time=_seconds(options["drain-time"]), path_normalization=options["path-normalization"],
        outbound_tcp_ports=tuple(options["outbound-tcp-ports"]), dns_server=options["dns-server"],
        passthrough=PassthroughSettings(
            outbound_traffic_policy=options["outbound-traffic-policy"],
            detection_timeout=_seconds(options["protocol-detection-timeout"]),
            connect_timeout=_seconds(options["passthrough-connect-timeout"]),
            max_connections=options["max-passthrough-connections"]),
        identity=IdentitySettings(
            trust_domain=options["trust-domain"], service_account=options["service-account"],
            control=options["control"], control_identity=options["control-identity"],
            ca_bundle=options["ca-bundle"], token_file=options["token-file"], cert_file=options["cert"],
            key_file=options["key"], cert_ttl=options["cert-ttl"]),
        tracing=TracingSettings(zipkin_url=options["zipkin-url"], sampling=options["trace-sampling"],
                                zipkin_max_queue=options["zipkin-max-queue"]),
        telemetry=TelemetrySettings(metrics_port=options["metrics-port"], access_log=_access_log(options)),
        worker=worker, gateway=GatewaySettings(options["gateway-address"], dict(options["gateway-ports"]))
        if options["gateway"] else None)
    plugins = options.pluginmanager
    disable_after_parse(plugins, options["disabled-plugins"])
    proxy = ProxyService(settings, plugins)
    configure_or_exit("mesh-proxy", Config("proxy", options, proxy.reactor, proxy, plugins))
    try:
        proxy.load()
    except ConfigErrors as errors:
        _exit_on_config_errors(errors, settings.config_dir)
    return proxy
