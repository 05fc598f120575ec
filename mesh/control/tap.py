"""``twistd mesh-control``: command-line options and service construction."""

from __future__ import annotations

import sys

from twisted.logger import Logger
from twisted.python import usage

from mesh import logging as mesh_logging
from mesh.api import Config
from mesh.control.ca_select import CASelectionError
from mesh.control.inject.sidecar import DEFAULT_IMAGE
from mesh.control.kube.client import KubeConfigError
from mesh.control.kube.webhook_ca import DEFAULT_NAME as DEFAULT_WEBHOOK_CONFIG
from mesh.control.service import ControlService, ControlSettings
from mesh.durations import duration_option
from mesh.identity.ca import CAError
from mesh.plugins import configure_or_exit, disable_after_parse, plugin_options
from mesh.sidecar_contract import CONTROL_ADMIN_PORT, CONTROL_PORT
from mesh.startup import ListenPort, exit_on_port_problems, raise_fd_limit, stop_once_on_signals

log = Logger()


class ControlOptions(usage.Options):
    """The built-in options of ``twistd mesh-control`` (:func:`Options` adds the plugins')."""

    synopsis = "--state-dir DIR [options]"
    longdesc = ("Run the txmesh control plane: the mesh CA (CSR endpoint on --port, TLS) and the "
                "admin port (loopback).  The state dir holds the CA key (0600), the trust bundle "
                "root-cert.pem and the join-token key.")

    optParameters = [
        ["state-dir", None, None, "Directory for the CA and token keys (created 0700)."],
        ["config-dir", "c", None, "Directory of Istio YAML resources (validated and reported)."],
        ["trust-domain", None, "cluster.local", "SPIFFE trust domain."],
        ["namespace", None, "mesh-system", "Namespace of the control plane's own identity."],
        ["address", None, "0.0.0.0", "Address of the CSR/config port."],
        ["port", None, CONTROL_PORT, "CSR/config port (TLS).", int],
        ["admin-port", None, CONTROL_ADMIN_PORT, "Admin port (/ready, /metrics, /proxies, /ca/root-cert.pem).", int],
        ["admin-address", None, "127.0.0.1", "Address of the admin port; 0.0.0.0 lets Prometheus scrape it "
         "from other hosts (nothing secret is served there)."],
        ["workload-cert-ttl", None, "24h", "Lifetime of workload certificates (and the cap on requests).",
         duration_option],
        ["ca", None, "builtin", "The CA that signs workload certificates: builtin (the CA of --state-dir), or "
         "one an installed plugin provides (vault: pip install txmesh-vault; awspca: pip install txmesh-awspca)."],
        ["ca-status-interval", None, "5s", "How often the selected CA's status (ready, roots) is read; a change of "
         "roots is pushed to every sidecar.", duration_option],
        ["ca-cert", None, None, "Use this CA certificate (root or intermediate) instead of generating one."],
        ["ca-key", None, None, "Private key of --ca-cert (PEM, unencrypted, mode 0600)."],
        ["ca-chain", None, None, "Chain from --ca-cert's issuer up to the root (PEM), for an intermediate."],
        ["ca-workers", None, 0, "Worker processes that check CSRs and sign with the built-in CA, to use more "
         "than one core (e.g. 2 on 2 CPUs); 0 = in mesh-control's own process.", int],
        ["push-debounce", None, 0.1, "Seconds to wait for more config changes before pushing snapshots.", float],
        ["push-max-delay", None, 1.0, "Seconds at most from a change to its push while changes keep coming "
         "(caps --push-debounce).", float],
        ["registry-grace", None, 5.0, "Seconds a disconnected proxy stays an endpoint (DRAIN removes at once).",
         float],
        ["kubeconfig", None, None, "With --kubernetes: kubeconfig file (default: in-cluster credentials)."],
        ["ca-secret", None, None, "With --kubernetes: Secret in --namespace holding the CA root and key "
         "(created on first start; shared by all replicas)."],
        ["secret-review-ttl", None, "60s", "With --kubernetes: how long the verdict of a SubjectAccessReview (may a "
         "gateway's service account get Secrets in its namespace?) is used before it is asked again.",
         duration_option],
        ["webhook-port", None, 0, "Sidecar-injection webhook port (TLS, mesh-CA certificate; Istio's is 15017); "
         "0 = off.", int],
        ["webhook-dns-names", None, None, "Comma-separated DNS names of the webhook's certificate, the first "
         "being the Service the API server calls (default mesh-control.NAMESPACE.svc); injected sidecars "
         "reach the control plane at FIRST:--port."],
        ["proxy-image", None, DEFAULT_IMAGE, "Image of the sidecars the webhook injects."],
        ["webhook-config-name", None, DEFAULT_WEBHOOK_CONFIG, "With --kubernetes and --webhook-port: the "
         "MutatingWebhookConfiguration whose caBundle mesh-control keeps equal to the mesh root."],
    ]
    optFlags = [
        ["kubernetes", None, "Read Services, EndpointSlices, Pods and txmesh CRDs from the Kubernetes API, "
         "and verify projected service-account tokens with TokenReview."],
        ["istio-crds", None, "With --kubernetes: also read Istio's own API groups (networking.istio.io, "
         "security.istio.io)."],
    ]

    def __init__(self):
        super().__init__()
        self["disabled-plugins"] = []

    def opt_disable_plugin(self, name):
        """Do not load the plugin NAME (repeatable)."""
        self["disabled-plugins"].append(name)

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required (where the CA key and trust bundle live)")
        # usage.Options coerces only the values given on the command line, not the defaults
        for duration in ("workload-cert-ttl", "ca-status-interval", "secret-review-ttl"):
            if isinstance(self[duration], str):
                self[duration] = duration_option(self[duration])
        if not self["secret-review-ttl"] > 0:
            raise usage.UsageError("--secret-review-ttl must be more than 0 (e.g. 60s)")
        if not self["ca-status-interval"] > 0:
            raise usage.UsageError("--ca-status-interval must be more than 0 (e.g. 5s)")
        if not 0 <= self["ca-workers"] <= 64:
            raise usage.UsageError("--ca-workers must be 0 to 64 (0: sign in mesh-control's process; about one "
                                   "per CPU)")
        if not (self["push-debounce"] >= 0 and self["push-max-delay"] > 0):
            raise usage.UsageError("--push-debounce must be 0 or more and --push-max-delay more than 0 (seconds, "
                                   "e.g. 0.1 and 1)")
        names = [name.strip() for name in (self["webhook-dns-names"] or "").split(",") if name.strip()]
        if self["webhook-dns-names"] is not None and not names:
            raise usage.UsageError("--webhook-dns-names wants names such as mesh-control.mesh-system.svc")
        self["webhook-dns-names"] = tuple(names)
        for needs_kubernetes in ("kubeconfig", "ca-secret", "istio-crds"):
            if self[needs_kubernetes] and not self["kubernetes"]:
                raise usage.UsageError(f"--{needs_kubernetes} needs --kubernetes")
        if self["ca-secret"] and (self["ca-cert"] or self["ca-key"]):
            raise usage.UsageError("--ca-secret and --ca-cert/--ca-key are two sources of the CA; give one")


def Options() -> ControlOptions:
    """The options of ``twistd mesh-control``: :class:`ControlOptions` and those the plugins add in
    ``mesh_addoption``; ``options.pluginmanager`` has every plugin not disabled."""
    return plugin_options(ControlOptions, "control")


def _listen_ports(options) -> list:
    """Every port mesh-control listens on (the webhook's only with --webhook-port)."""
    return [ListenPort("--port", options["address"], options["port"], "--address"),
            ListenPort("--admin-port", options["admin-address"], options["admin-port"], "--admin-address"),
            ListenPort("--webhook-port", options["address"], options["webhook-port"], "--address")]


def makeService(options):
    """Build the :class:`ControlService`; exit with one line if a port is taken, the CA cannot load or no
    plugin provides the CA ``--ca`` names.

    twistd calls this before it daemonizes and binds the ports, so the
    line reaches the terminal that started it.
    """
    from twisted.internet import reactor  # here, not at import: twistd installs its --reactor first

    stop_once_on_signals(reactor)
    exit_on_port_problems("mesh-control", _listen_ports(options))
    mesh_logging.follow_twistd(options.parent)
    log.info("file descriptors: {fds} (one per connected sidecar)", fds=raise_fd_limit().describe())
    settings = ControlSettings(
        state_dir=options["state-dir"], config_dir=options["config-dir"],
        trust_domain=options["trust-domain"], namespace=options["namespace"], address=options["address"],
        port=options["port"], admin_port=options["admin-port"], admin_address=options["admin-address"],
        workload_cert_ttl=options["workload-cert-ttl"],
        ca=options["ca"], ca_status_interval=options["ca-status-interval"],
        ca_cert=options["ca-cert"], ca_key=options["ca-key"], ca_chain=options["ca-chain"],
        ca_workers=options["ca-workers"],
        push_debounce=options["push-debounce"], push_max_delay=options["push-max-delay"],
        registry_grace=options["registry-grace"],
        kubernetes=bool(options["kubernetes"]), kubeconfig=options["kubeconfig"],
        istio_crds=bool(options["istio-crds"]), ca_secret=options["ca-secret"],
        webhook_port=options["webhook-port"], webhook_dns_names=options["webhook-dns-names"],
        proxy_image=options["proxy-image"], webhook_config_name=options["webhook-config-name"])
    plugins = options.pluginmanager
    disable_after_parse(plugins, options["disabled-plugins"])
    try:
        control = ControlService(settings, plugins)
    except (CAError, KubeConfigError) as error:
        sys.stderr.write(f"mesh-control: {error}\n")
        raise SystemExit(1) from None
    configure_or_exit("mesh-control", Config("control", options, control.reactor, control, plugins))
    try:
        control.select_ca()
    except CASelectionError as error:
        sys.stderr.write(f"mesh-control: {error}\n")
        raise SystemExit(1) from None
    control.load_config()
    return control
