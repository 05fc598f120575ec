"""``meshctl check [--pre]``: is this host ready for the mesh, and is the running mesh healthy?

Each check prints one line, ``PASS``, ``WARN`` or ``FAIL``, what it found and,
unless it passed, what to do.  The exit status is 1 when any check FAILs.

``--pre`` (pre-flight, before ``meshctl up``): txmesh's twistd plugins are
installed, the control plane's ports are free (or held by the local control
plane), the state directory is writable, and its CA, if there is one yet,
is valid with a private key (0600).  Without ``--pre`` (post-install), also:
the control plane answers and is ready, its TLS port presents the control
plane's SPIFFE id under the trust bundle, the clocks agree (the admin port's
HTTP ``Date``), its config has no rejected resource, every proxy has ACKed
the config it was sent, and each proxy this host can reach (the workloads of
``meshctl run``, those announcing an admin port, ``--admin``) is ready with a
valid certificate.

The mesh is the local one of ``meshctl up`` (``--state-dir``), or the one
``--control-admin``, ``--control`` and ``--ca-bundle`` point at.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import socket
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from mesh.cli.admin_client import AdminError, fetch_json, parse_address
from mesh.cli.local import LOOPBACK, LocalMesh, add_state_dir_option, port_problem
from mesh.demo.runner import http_get
from mesh.identity.ca import CA_KEY, CLOCK_SKEW
from mesh.sidecar_contract import ADMIN_PORT, CONTROL_ADMIN_PORT, CONTROL_PORT

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
#: A CA certificate closer than this to its end is a warning.
CA_WARN_DAYS = 30
#: A clock difference up to this many seconds (plus the request's round trip) is no difference: the
#: HTTP Date header has whole seconds.
SKEW_TOLERANCE = 2.0
#: A workload certificate with less than this share of its life left should have been renewed (at half).
CERT_WARN_SHARE = 0.25
TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    """The result of one check: PASS, WARN or FAIL, its subject and one line saying what was found (and
    what to do unless it passed)."""

    status: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}"


def add_parser(subparsers):
    parser = subparsers.add_parser("check", help="pre-flight and health checks of the mesh, PASS/WARN/FAIL each",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--pre", action="store_true", help="pre-flight only: can the mesh start on this host?")
    add_target_options(parser)
    parser.set_defaults(func=run)


def add_target_options(parser) -> None:
    """Which mesh: ``--state-dir`` (the local one of meshctl up), ``--control-admin``, ``--control``,
    ``--ca-bundle``, and extra sidecars (``--admin``); shared with ``meshctl bug-report``."""
    add_state_dir_option(parser)
    parser.add_argument("--control-admin", metavar="HOST:PORT",
                        help="the control plane's admin port (default: the local one of meshctl up)")
    parser.add_argument("--control", metavar="HOST:PORT",
                        help="the control plane's CA and config port (default: the local one of meshctl up)")
    parser.add_argument("--ca-bundle", metavar="FILE", help="the mesh's trust bundle (default: STATE/control/"
                                                            "root-cert.pem)")
    parser.add_argument("--admin", action="append", default=[], metavar="HOST:PORT",
                        help="also a sidecar with this admin port (repeatable)")


class Target:
    """Where the mesh under check is: the local one of ``meshctl up`` unless options say otherwise."""

    def __init__(self, args):
        self.mesh = LocalMesh(args.state_dir)
        self.local = self.mesh.control()
        local = self.local or {}
        self.control_admin = parse_address(args.control_admin, CONTROL_ADMIN_PORT) if args.control_admin \
            else (LOOPBACK, local.get("admin_port", CONTROL_ADMIN_PORT))
        self.control = parse_address(args.control, CONTROL_PORT) if args.control \
            else (LOOPBACK, local.get("port", CONTROL_PORT))
        self.ca_bundle = Path(args.ca_bundle) if args.ca_bundle else self.mesh.ca_bundle
        self.extra_admins = [parse_address(admin, ADMIN_PORT) for admin in args.admin]

    def address(self, pair) -> str:
        return f"{pair[0]}:{pair[1]}"


def run(args) -> int:
    checks = run_checks(args)
    for check in checks:
        print(check, flush=True)
    failed = sum(check.status == FAIL for check in checks)
    warned = sum(check.status == WARN for check in checks)
    print(f"{len(checks)} checks: {failed} failed, {warned} warning(s)")
    return 1 if failed else 0


def run_checks(args) -> list:
    """Every check for the options in *args* (the parsed ``meshctl check`` options)."""
    target = Target(args)
    checks = [check_install(), check_state_dir(target), check_control_ports(target), *check_ca_files(target)]
    if args.pre:
        return checks
    ready = None
    try:
        ready, skew = read_control(target)
    except AdminError as error:
        checks.append(Check(FAIL, "control plane", f"{error}; start it with `meshctl up{target.mesh.option()}` "
                                                   "or point --control-admin at it"))
    if ready is not None:
        checks += [check_ready(target, ready), check_clock(skew), check_tls(target, ready), check_config(ready)]
        rows = _proxies(target)
        checks.append(check_sync(rows))
        checks += check_proxies(target, rows)
    return checks


# -- pre-flight -----------------------------------------------------------------------------

def check_install() -> Check:
    """``twistd`` finds the mesh-proxy and mesh-control plugins (Twisted's dropin cache)."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    found = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
    missing = sorted({"mesh-proxy", "mesh-control"} - found)
    if missing:
        return Check(FAIL, "install", f"twistd does not find {', '.join(missing)}: reinstall txmesh (`make bootstrap`: "
                                      "an editable install in compat mode puts twisted/plugins on sys.path)")
    return Check(PASS, "install", f"twistd finds mesh-proxy and mesh-control ({Path(sys.executable).parent})")


def check_state_dir(target: Target) -> Check:
    root = target.mesh.root
    existing = next((path for path in (root, *root.parents) if path.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        return Check(FAIL, "state directory", f"{root} cannot be created or written ({existing} is not writable); "
                                              "give a writable --state-dir")
    return Check(PASS, "state directory", f"{root} is writable")


def check_control_ports(target: Target) -> Check:
    """The control plane's ports: held by the local control plane, or free for it."""
    if target.local is not None:
        pid = target.local["process"]["pid"]
        closed = [port for port in (target.local["port"], target.local["admin_port"]) if not _accepts(LOOPBACK, port)]
        if closed:
            return Check(FAIL, "control plane ports", f"the local control plane (pid {pid}) runs but does not listen "
                         f"on {', '.join(map(str, closed))}; see {target.local['log']}, then `meshctl down` and "
                         "`meshctl up`")
        return Check(PASS, "control plane ports", f"{LOOPBACK}:{target.local['port']} and :{target.local['admin_port']}"
                                                  f" are the local control plane's (pid {pid})")
    if target.control[0] not in (LOOPBACK, "localhost"):
        return Check(PASS, "control plane ports", f"the control plane is remote ({target.address(target.control)})")
    problems = [problem for problem in (port_problem(target.control[1], "the control plane's", "meshctl up --port"),
                                        port_problem(target.control_admin[1], "the control plane's admin",
                                                     "meshctl up --admin-port")) if problem]
    if problems and _accepts(*target.control_admin) and _is_control_plane(target):
        return Check(PASS, "control plane ports", f"a control plane not started by meshctl up listens on "
                                                  f"{target.address(target.control_admin)}")
    if problems:
        return Check(FAIL, "control plane ports", "; ".join(problems))
    return Check(PASS, "control plane ports", f"{target.control[1]} and {target.control_admin[1]} are free on "
                                              f"{LOOPBACK} for `meshctl up`")


def check_ca_files(target: Target) -> list:
    """The trust bundle's roots are valid; the local CA key, if any, is private (0600)."""
    bundle = target.ca_bundle
    if not bundle.exists():
        if target.local is None and bundle == target.mesh.ca_bundle:
            return [Check(PASS, "CA", f"none yet in {target.mesh.control_dir}: `meshctl up` creates one")]
        return [Check(FAIL, "CA", f"no trust bundle at {bundle}; give the mesh's root-cert.pem with --ca-bundle")]
    try:
        roots = x509.load_pem_x509_certificates(bundle.read_bytes())
    except (ValueError, OSError) as error:
        return [Check(FAIL, "CA", f"{bundle} is not a PEM certificate bundle ({error}); restore it from the "
                                  "control plane: curl http://127.0.0.1:15014/ca/root-cert.pem")]
    checks = [_root_check(bundle, root) for root in roots]
    key = target.mesh.control_dir / CA_KEY
    if bundle == target.mesh.ca_bundle and key.exists():
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            checks.append(Check(FAIL, "CA key", f"{key} has mode {mode:04o}: others can read the mesh's CA key; "
                                                f"`chmod 600 {key}` (and consider a new CA if it leaked)"))
        else:
            checks.append(Check(PASS, "CA key", f"{key} is private (mode {mode:04o})"))
    return checks


def _root_check(bundle: Path, root) -> Check:
    subject = root.subject.rfc4514_string() or "(no subject)"
    left = root.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left.total_seconds() <= 0:
        return Check(FAIL, "CA", f"root {subject} in {bundle} expired on {root.not_valid_after_utc:%Y-%m-%d}: "
                                 "rotate the root (docs/operations.md, \"Rotating the root\")")
    if left.days < CA_WARN_DAYS:
        return Check(WARN, "CA", f"root {subject} expires in {left.days} day(s) ({root.not_valid_after_utc:%Y-%m-%d}):"
                                 " rotate it soon (docs/operations.md, \"Rotating the root\")")
    return Check(PASS, "CA", f"root {subject} valid until {root.not_valid_after_utc:%Y-%m-%d} ({left.days} days)")


# -- the running control plane --------------------------------------------------------------

def read_control(target: Target) -> tuple:
    """The control plane's ``/ready`` document and the clock skew (its Date minus ours, seconds)."""
    host, port = target.control_admin
    before = time.time()
    try:
        reply = http_get(host, port, "/ready", timeout=TIMEOUT)
        ready = reply.json()
    except (OSError, ValueError) as error:
        raise AdminError(f"cannot read the control plane's admin port at http://{host}:{port}/ready: "
                         f"{getattr(error, 'strerror', None) or error}") from None
    after = time.time()
    date = reply.headers.get("date")
    skew = None
    if date:
        server = email.utils.parsedate_to_datetime(date).timestamp()
        skew = (server + 0.5 - (before + after) / 2, after - before)  # Date truncates to the second
    return ready, skew


def _is_control_plane(target: Target) -> bool:
    try:
        return "trust_domain" in read_control(target)[0]
    except AdminError:
        return False


def check_ready(target: Target, ready: dict) -> Check:
    where = target.address(target.control_admin)
    if ready.get("ready") is not True:
        return Check(FAIL, "control plane", f"at {where} answers but is not ready ({ready.get('reason', ready)}); "
                                            "see its log")
    return Check(PASS, "control plane", f"ready at {where}, identity {ready.get('identity')}")


def check_clock(skew) -> Check:
    if skew is None:
        return Check(WARN, "clock skew", "the control plane's admin port sent no Date header; compare the clocks "
                                         "by hand (`date -u` on both hosts)")
    offset, round_trip = skew
    if abs(offset) <= SKEW_TOLERANCE + round_trip:
        return Check(PASS, "clock skew", f"the control plane's clock and this host's agree (within "
                                         f"{SKEW_TOLERANCE + round_trip:.0f}s)")
    text = f"the control plane's clock is {abs(offset):.0f}s {'ahead of' if offset > 0 else 'behind'} this host's"
    if abs(offset) > CLOCK_SKEW.total_seconds():
        return Check(FAIL, "clock skew", f"{text}, more than the {CLOCK_SKEW.total_seconds():.0f}s certificates are "
                                         "backdated by: new certificates are not yet valid on one side; "
                                         "synchronise the clocks (NTP: timedatectl set-ntp true)")
    return Check(WARN, "clock skew", f"{text}; synchronise the clocks (NTP: timedatectl set-ntp true)")


def check_tls(target: Target, ready: dict) -> Check:
    """A TLS handshake with the CA and config port, verified against the trust bundle, names the control
    plane's SPIFFE id."""
    host, port = target.control
    where = f"{host}:{port}"
    if not target.ca_bundle.exists():
        return Check(FAIL, "control plane TLS", f"no trust bundle at {target.ca_bundle} to verify {where}; give "
                                                "--ca-bundle")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the peer is named by its SPIFFE id, checked below
    context.load_verify_locations(str(target.ca_bundle))
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock, \
                context.wrap_socket(sock) as tls:
            cert = tls.getpeercert()
    except ssl.SSLCertVerificationError as error:
        return Check(FAIL, "control plane TLS", f"{where}'s certificate does not verify against {target.ca_bundle}: "
                                                f"{error.verify_message}; is it the bundle of this mesh (--ca-bundle)?")
    except (OSError, ssl.SSLError) as error:
        return Check(FAIL, "control plane TLS", f"no TLS handshake with {where}: {error}; is the control plane's "
                                                "--port right (give --control HOST:PORT)?")
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    expected = ready.get("identity")
    if expected and expected not in uris:
        return Check(FAIL, "control plane TLS", f"{where} presents {', '.join(uris) or 'no SPIFFE id'}, not "
                                                f"{expected}: another server holds that port?")
    left = ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()
    return Check(PASS, "control plane TLS", f"{where} presents {', '.join(uris)}, verified against the trust bundle "
                                            f"(certificate valid {_duration(left)} more)")


def check_config(ready: dict) -> Check:
    config = ready.get("config") or {}
    errors = ready.get("config_errors") or []
    if errors:
        shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        return Check(FAIL, "config", f"{len(errors)} resource(s) rejected: {shown}; fix them (`meshctl validate "
                                     "DIR` shows the same), the last good versions stay in force meanwhile")
    return Check(PASS, "config", f"version {config.get('version', '?')}, {config.get('resources', 0)} resource(s), "
                                 "none rejected")


def _proxies(target: Target) -> list:
    host, port = target.control_admin
    try:
        rows = fetch_json(host, port, "/proxies", "the control plane's admin port", "")
    except AdminError:
        return []
    return rows.get("proxies", []) if isinstance(rows, dict) else rows


def check_sync(rows) -> Check:
    """Every connected proxy ACKed the version it was sent."""
    if not rows:
        return Check(WARN, "config sync", "no proxy is connected to the control plane yet: start one "
                                          "(`meshctl run --service NAME -- COMMAND`)")
    nacked = [row for row in rows if row.get("last_nack")]
    if nacked:
        row = nacked[0]
        return Check(FAIL, "config sync", f"{len(nacked)} proxy(ies) rejected their config, e.g. {row.get('node')}: "
                                          f"{row['last_nack']}; fix the resource it names "
                                          "(`meshctl proxy-status` lists them all)")
    stale = [row.get("node") for row in rows if row.get("stale")]
    if stale:
        return Check(WARN, "config sync", f"{len(stale)} of {len(rows)} proxies have not applied the latest config "
                                          f"({', '.join(stale[:5])}): disconnected or still applying; "
                                          "`meshctl proxy-status` says which")
    versions = sorted({str(row.get("version_acked"))[:12] for row in rows})
    return Check(PASS, "config sync", f"{len(rows)} proxies, all SYNCED (version {', '.join(versions)})")


# -- the proxies ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProxyAdmin:
    """A sidecar admin port to try: ``node`` (if known) is checked against its /config_dump; ``listening``
    lists ``(role, port)`` that must accept connections (the ports ``meshctl run`` gave it)."""

    host: str
    port: int
    node: str = None
    listening: tuple = ()


def proxy_admins(target: Target, rows) -> dict:
    """name -> :class:`ProxyAdmin` of every sidecar admin port this host can try: the workloads of
    ``meshctl run``, the proxies that announced an admin port, ``--admin``."""
    admins = {}
    for record in target.mesh.runs():
        listening = tuple((role, port) for role, port in sorted(record["ports"].items()) if role != "admin")
        admins[record["name"]] = ProxyAdmin(LOOPBACK, record["ports"]["admin"], None, listening)
    for row in rows:
        name = row.get("node")
        if row.get("admin_port") and row.get("connected", True) and name and row.get("workload") not in admins:
            admins.setdefault(name, ProxyAdmin(LOOPBACK, row["admin_port"], name))
    for host, port in target.extra_admins:
        admins[f"{host}:{port}"] = ProxyAdmin(host, port)
    return admins


def check_proxies(target: Target, rows) -> list:
    return [check_proxy(name, admin) for name, admin in sorted(proxy_admins(target, rows).items())]


def check_proxy(name: str, admin: ProxyAdmin) -> Check:
    """One sidecar: its ports listen, it is ready, and its certificate is valid and renewed in time."""
    subject = f"proxy {name}"
    try:
        dump = fetch_json(admin.host, admin.port, "/config_dump", "its admin port", "")
        ready = http_get(admin.host, admin.port, "/ready", timeout=TIMEOUT)
    except (AdminError, OSError) as error:
        return Check(FAIL, subject, f"{str(error).rstrip('; ')}; is it running? Its log says why")
    if admin.node is not None and (dump.get("control") or {}).get("node") != admin.node:
        return Check(WARN, subject, f"runs on another host (its admin port {admin.port} is not reachable here): run "
                                    "`meshctl check` there")
    closed = [f"{role} {port}" for role, port in admin.listening if not _accepts(admin.host, port)]
    if closed:
        return Check(FAIL, subject, f"does not listen on {', '.join(closed)}; see its log (another process may "
                                    "hold the port)")
    if ready.status != 200:
        return Check(FAIL, subject, f"not ready: {ready.body.decode(errors='replace')[:200]}; see its log")
    return certificate_check(subject, dump.get("certificate"))


def certificate_check(subject: str, cert) -> Check:
    """A ready sidecar's verdict from its /config_dump ``certificate``: valid, renewed in time?"""
    if not cert:
        return Check(WARN, subject, "ready, without a workload certificate (plaintext only); give it --control "
                                    "or --cert to join mTLS")
    left = cert.get("expires_in_s") or 0
    lifetime = (datetime.datetime.fromisoformat(cert["not_after"])
                - datetime.datetime.fromisoformat(cert["not_before"])).total_seconds()
    text = f"ready, certificate {cert.get('identity')} valid {_duration(left)} more"
    if left <= 0:
        return Check(FAIL, subject, f"its certificate {cert.get('identity')} has expired: is the control plane "
                                    "reachable from it? (`meshctl proxy-config cert`; restart it with a new token)")
    if cert.get("last_renewal_error") or (lifetime > 0 and left < CERT_WARN_SHARE * lifetime):
        reason = cert.get("last_renewal_error") or "not renewed at half-life"
        return Check(WARN, subject, f"{text}, renewal overdue ({reason}); check that it reaches the control plane")
    return Check(PASS, subject, text)


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT).close()
    except OSError:
        return False
    return True


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400}d"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
