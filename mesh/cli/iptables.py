"""``meshctl iptables``: transparent capture of a pod's TCP traffic into its sidecar.

Installs nat rules in chains of their own, as Istio's ``istio-iptables`` does
(ISTIO_OUTPUT / ISTIO_REDIRECT / ISTIO_INBOUND / ISTIO_IN_REDIRECT)::

    OUTPUT     -p tcp -j MESH_OUTPUT          app -> anywhere
    PREROUTING -p tcp -j MESH_INBOUND         anywhere -> pod

    MESH_OUTPUT       RETURN  traffic of the proxy's UID (its own upstream connections)
                      RETURN  -o lo (loopback destinations: 127.0.0.0/8 and the pod's own IPs)
                      RETURN  -d 127.0.0.0/8
                      RETURN  each --exclude-outbound-ports, each --exclude-outbound-ip-ranges
                      -> MESH_REDIRECT
    MESH_REDIRECT     REDIRECT --to-ports 15001 (the outbound listener)
    MESH_INBOUND      RETURN  the proxy's own ports (15000 15001 15006 15012 15014 15020 15021 15090)
                              and each --exclude-inbound-ports
                      -> MESH_IN_REDIRECT
    MESH_IN_REDIRECT  REDIRECT --to-ports 15006 (the inbound listener)

The sidecar reads the destination the app dialled with ``SO_ORIGINAL_DST``
(:mod:`mesh.proxy.original_dst`).  IPv4 only (``iptables``, not ``ip6tables``).

Installing first removes any previous MESH_* rules, so it can be re-run with new
options; ``--clean`` removes them all and is idempotent.  ``--dry-run`` prints
the commands instead of running them.  See docs/operations.md, "Transparent capture".
"""

from __future__ import annotations

import ipaddress
import pwd
import shlex
import subprocess
import sys
from dataclasses import dataclass

from mesh.sidecar_contract import INBOUND_PORT, OUTBOUND_PORT, PROXY_PORTS

OUTPUT, REDIRECT, INBOUND, IN_REDIRECT = "MESH_OUTPUT", "MESH_REDIRECT", "MESH_INBOUND", "MESH_IN_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
#: (built-in chain, our chain) jumps, installed last and removed first.
JUMPS = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))
DEFAULT_PROXY_UID = 1337  # Istio's


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture; :func:`install_commands` turns it into iptables commands."""

    proxy_uid: int = DEFAULT_PROXY_UID
    proxy_gid: int = None
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    exclude_outbound_ports: tuple = ()
    exclude_inbound_ports: tuple = ()
    exclude_outbound_ip_ranges: tuple = ()
    inbound: bool = True


def _nat(*args) -> list:
    return ["-t", "nat", *args]


def install_commands(spec: CaptureSpec) -> list:
    """The iptables argument lists (without the program name) that install ``spec``, in order."""
    commands = [_nat("-N", chain) for chain in CHAINS]
    commands.append(_nat("-A", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.outbound_port)))
    commands.append(_nat("-A", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(spec.inbound_port)))
    # inbound: never the proxy's own ports, nor excluded ones
    skipped = []
    for port in (*PROXY_PORTS, spec.outbound_port, spec.inbound_port, *spec.exclude_inbound_ports):
        if port not in skipped:
            skipped.append(port)
    for port in skipped:
        commands.append(_nat("-A", INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN"))
    commands.append(_nat("-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT))
    # outbound: not the proxy itself, not loopback, not excluded ports or ranges
    commands.append(_nat("-A", OUTPUT, "-m", "owner", "--uid-owner", str(spec.proxy_uid), "-j", "RETURN"))
    if spec.proxy_gid is not None:
        commands.append(_nat("-A", OUTPUT, "-m", "owner", "--gid-owner", str(spec.proxy_gid), "-j", "RETURN"))
    commands.append(_nat("-A", OUTPUT, "-o", "lo", "-j", "RETURN"))
    commands.append(_nat("-A", OUTPUT, "-d", "127.0.0.0/8", "-j", "RETURN"))
    for port in dict.fromkeys(spec.exclude_outbound_ports):
        commands.append(_nat("-A", OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN"))
    for cidr in dict.fromkeys(spec.exclude_outbound_ip_ranges):
        commands.append(_nat("-A", OUTPUT, "-d", cidr, "-j", "RETURN"))
    commands.append(_nat("-A", OUTPUT, "-p", "tcp", "-j", REDIRECT))
    # hook the chains in last: traffic enters them only once they are complete
    for builtin, chain in JUMPS:
        if chain == INBOUND and not spec.inbound:
            continue
        commands.append(_nat("-A", builtin, "-p", "tcp", "-j", chain))
    return commands


def clean_commands() -> list:
    """The iptables argument lists that remove every MESH_* rule and chain.

    Each may fail harmlessly (nothing to remove); :func:`clean` repeats a
    jump's ``-D`` until it fails, in case it was installed more than once.
    """
    commands = [_nat("-D", builtin, "-p", "tcp", "-j", chain) for builtin, chain in JUMPS]
    commands += [_nat("-F", chain) for chain in CHAINS]
    commands += [_nat("-X", chain) for chain in CHAINS]
    return commands


class IptablesError(Exception):
    pass


def _run(program, args, check=True):
    argv = [program, "-w", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise IptablesError(f"{program} not found; install iptables (Debian: apt-get install iptables) "
                            "or pass --iptables PATH") from None
    if check and result.returncode != 0:
        raise IptablesError(f"`{shlex.join(argv)}` failed (exit {result.returncode}): "
                            f"{result.stderr.strip() or result.stdout.strip()}")
    return result.returncode == 0


def clean(program="iptables") -> None:
    """Remove every MESH_* rule and chain; a no-op when there are none."""
    for args in clean_commands():
        if args[2] == "-D":
            for _ in range(64):  # a jump installed several times by hand
                if not _run(program, args, check=False):
                    break
        else:
            _run(program, args, check=False)


def install(spec: CaptureSpec, program="iptables") -> None:
    """Replace any MESH_* rules with those of ``spec``; on failure nothing is left half-installed."""
    clean(program)
    try:
        for args in install_commands(spec):
            _run(program, args)
    except IptablesError:
        clean(program)
        raise


# -- command line ---------------------------------------------------------------------------

def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _list(values, parse) -> tuple:
    """Repeated options and comma-separated lists (Istio's annotation style) both work."""
    return tuple(parse(item.strip()) for value in values or () for item in value.split(",") if item.strip())


def _cidr(text: str) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP range (e.g. 10.0.0.0/8)") from None
    if network.version != 4:
        raise ValueError(f"{text!r}: only IPv4 ranges are captured (iptables, not ip6tables)")
    return str(network)


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no user {text!r}; give the proxy's numeric UID") from None


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "iptables", help="redirect a pod's TCP traffic to its sidecar (nat rules in MESH_* chains)",
        description="Install (or with --clean remove) the nat rules of transparent capture, in the current "
                    "network namespace: outbound TCP -> the outbound listener, inbound TCP -> the inbound "
                    "listener.  Needs root (CAP_NET_ADMIN).")
    parser.add_argument("--proxy-uid", default=str(DEFAULT_PROXY_UID),
                        help=f"UID (or user name) the sidecar runs as; its traffic is not captured "
                             f"(default {DEFAULT_PROXY_UID})")
    parser.add_argument("--proxy-gid", default=None, help="also exclude traffic of this GID")
    parser.add_argument("--outbound-port", default=str(OUTBOUND_PORT),
                        help=f"outbound listener port (default {OUTBOUND_PORT})")
    parser.add_argument("--inbound-port", default=str(INBOUND_PORT),
                        help=f"inbound listener port (default {INBOUND_PORT})")
    parser.add_argument("--exclude-outbound-ports", action="append", metavar="PORTS",
                        help="destination ports not captured, comma-separated or repeated")
    parser.add_argument("--exclude-inbound-ports", action="append", metavar="PORTS",
                        help="local ports not captured inbound, comma-separated or repeated")
    parser.add_argument("--exclude-outbound-ip-ranges", action="append", metavar="CIDRS",
                        help="destination ranges not captured, e.g. 169.254.169.254/32")
    parser.add_argument("--no-inbound", action="store_true", help="capture outbound traffic only")
    parser.add_argument("--clean", action="store_true", help="remove every MESH_* rule and chain (idempotent)")
    parser.add_argument("--dry-run", action="store_true", help="print the iptables commands, run nothing")
    parser.add_argument("--iptables", default="iptables", help="the iptables program (default: iptables)")
    parser.set_defaults(func=run)


def spec_from_args(args) -> CaptureSpec:
    return CaptureSpec(
        proxy_uid=_uid(args.proxy_uid),
        proxy_gid=int(args.proxy_gid) if args.proxy_gid is not None else None,
        outbound_port=_port(args.outbound_port), inbound_port=_port(args.inbound_port),
        exclude_outbound_ports=_list(args.exclude_outbound_ports, _port),
        exclude_inbound_ports=_list(args.exclude_inbound_ports, _port),
        exclude_outbound_ip_ranges=_list(args.exclude_outbound_ip_ranges, _cidr),
        inbound=not args.no_inbound)


def run(args) -> int:
    program = args.iptables
    if args.clean:
        if args.dry_run:
            for command in clean_commands():
                print(shlex.join([program, "-w", *command]))
            return 0
        try:
            clean(program)
        except IptablesError as error:
            print(f"meshctl iptables: {error}", file=sys.stderr)
            return 1
        print("meshctl iptables: MESH_* rules removed")
        return 0
    try:
        spec = spec_from_args(args)
    except ValueError as error:
        print(f"meshctl iptables: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for command in install_commands(spec):
            print(shlex.join([program, "-w", *command]))
        return 0
    try:
        install(spec, program)
    except IptablesError as error:
        print(f"meshctl iptables: {error}; nothing was left installed (run as root, with CAP_NET_ADMIN, "
              "in the pod's network namespace)", file=sys.stderr)
        return 1
    print(f"meshctl iptables: capturing outbound TCP -> :{spec.outbound_port}"
          + (f", inbound TCP -> :{spec.inbound_port}" if spec.inbound else "")
          + f"; traffic of UID {spec.proxy_uid} is not captured")
    return 0
