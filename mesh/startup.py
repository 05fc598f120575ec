"""Start-up checks of ``twistd mesh-proxy`` and ``twistd mesh-control``, run by their ``makeService``.

``makeService`` runs before twistd daemonizes and before it binds any port,
with the launching terminal still on stderr:

- :func:`port_problems` tries each port the process will listen on, so that a
  taken port ends the start with one line naming it and the option that
  moves it, instead of twistd's traceback (or, daemonized, its "An error has
  occurred" and a log file to read).
- :func:`raise_fd_limit` raises the soft ``RLIMIT_NOFILE`` to the hard limit,
  as Istio's pilot-agent does for Envoy, so that connection limits are not cut
  short by ``accept()`` failing with EMFILE.
- :func:`stop_once_on_signals` makes a second SIGTERM (or SIGINT) during the
  shutdown a no-op instead of Twisted's ``ReactorNotRunning`` traceback.
"""

from __future__ import annotations

import errno
import resource
import socket
import sys
from dataclasses import dataclass

from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger

log = Logger()

#: The ceiling when the hard limit is "unlimited" (Linux's default fs.nr_open).
_NR_OPEN_DEFAULT = 1048576


@dataclass(frozen=True)
class ListenPort:
    """One port the process listens on, and the options that set it (for the error line)."""

    option: str
    address: str
    port: int
    address_option: str = None

    @property
    def where(self) -> str:
        return f"[{self.address}]:{self.port}" if isIPv6Address(self.address) else f"{self.address}:{self.port}"


def port_problems(ports) -> list[str]:
    """One line per port of ``ports`` (:class:`ListenPort`) that cannot be listened on; port 0 is skipped.

    Each port is bound the way Twisted binds it (``SO_REUSEADDR``) and closed
    again.  Two of ``ports`` that would clash with each other are named together.
    """
    ports = [port for port in ports if port.port]
    problems = []
    for index, port in enumerate(ports):
        clash = next((other for other in ports[:index] if _overlap(port, other)), None)
        if clash is not None:
            problems.append(f"{clash.option} and {port.option} are both {port.port} (on {clash.address} and "
                            f"{port.address}); give each its own port")
            continue
        error = _bind_error(port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            problems.append(f"{port.where} is already in use; choose another port with {port.option}")
        else:
            check = f"check {port.address_option} or " if port.address_option else ""
            problems.append(f"cannot listen on {port.where} ({error.strerror}); {check}choose another port "
                            f"with {port.option}")
    return problems


def exit_on_port_problems(program: str, ports) -> None:
    """Exit with status 1 and one line per :func:`port_problems` problem on stderr, if there is any."""
    problems = port_problems(ports)
    if problems:
        for problem in problems:
            sys.stderr.write(f"{program}: error: {problem}\n")
        raise SystemExit(1)


def _overlap(one: ListenPort, other: ListenPort) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return one.port == other.port and (one.address == other.address or one.address in wildcard
                                       or other.address in wildcard)


def _bind_error(port: ListenPort):
    """The OSError of binding ``port``, or None when it is free."""
    family = socket.AF_INET6 if isIPv6Address(port.address) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((port.address, port.port))
            probe.listen(1)
        except OSError as error:
            return error
    return None


@dataclass(frozen=True)
class FdLimit:
    """The soft ``RLIMIT_NOFILE`` before and after :func:`raise_fd_limit`, and the hard one."""

    before: int
    soft: int
    hard: int

    def describe(self) -> str:
        """The log line's words: what the soft limit is now, and why."""
        if self.soft > self.before:
            return f"soft limit raised from {self.before} to {self.soft} (the hard limit is {self.hard})"
        return f"soft limit {self.soft} (the hard limit is {self.hard})"


def raise_fd_limit() -> FdLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (or ``fs.nr_open`` when that is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # the check below reports the limit as it stands
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdLimit(before=_finite(soft), soft=_finite(now), hard=_finite(hard))


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            return int(nr_open.read())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def _finite(limit: int) -> int:
    return _nr_open() if limit == resource.RLIM_INFINITY else limit


def stop_once_on_signals(reactor) -> None:
    """Let only the first SIGTERM, SIGINT or SIGBREAK stop ``reactor``; later ones are logged and ignored.

    Twisted's handlers call ``reactor.stop()`` for every signal, and a second
    call while the shutdown (a sidecar's drain) is under way raises
    ``ReactorNotRunning``, logged as a critical error with a traceback.  Two
    signals are ordinary: an operator or an orchestrator repeating SIGTERM, or
    a worker process that gets its parent's SIGTERM and then, when the parent
    exits, the one it asked for with ``PR_SET_PDEATHSIG``.  Call before
    ``reactor.run()``, which installs the handlers it finds on the reactor.
    """
    if getattr(reactor.sigTerm, "stops_once", False):
        return  # done already (makeService ran twice in one process, as tests do)
    stopping = []
    for name in ("sigInt", "sigBreak", "sigTerm"):
        setattr(reactor, name, _first_only(getattr(reactor, name), stopping))


def _first_only(handler, stopping: list):
    def on_signal(number, frame=None):
        if stopping:
            log.info("signal {number} while already shutting down: ignored", number=number)
            return
        stopping.append(number)
        handler(number, frame)
    on_signal.stops_once = True
    return on_signal
