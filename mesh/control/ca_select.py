"""The CA ``mesh-control --ca NAME`` selected: checked at start, then watched while the control plane runs.

Every CA plugin (the built-in ``builtin.ca``, Vault, AWS PCA) reports its CA in ``mesh_ca_status``
(:class:`mesh.api.CAStatus`).  At start :meth:`CAMonitor.select` asks once and refuses a ``--ca``
that no installed plugin reports (:class:`CASelectionError`: which CAs there are, what to install).
While the control plane runs, :class:`CAMonitor` asks again every ``--ca-status-interval`` seconds
(a LoopingCall) and keeps:

- ``ready`` and ``reason``: whether the selected CA can sign now, for ``/ready`` and the
  ``mesh_ca_ready{ca}`` gauge;
- ``bundle_pem``: the selected CA's roots, the trust bundle every sidecar gets.  A change (a root
  rotation: the plugin then reports old and new roots together) calls ``on_bundle(pem, certificates)``,
  which pushes it to the sidecars without restarts.  Roots reported empty leave the last bundle in
  force (a CA that does not know its roots yet, or a transient error); roots that are not PEM
  certificates make the CA not ready and leave it too.

The plugins are asked one by one (:func:`ask_plugins`): one that raises in ``mesh_ca_status`` is
logged (once, with its traceback, by :data:`mesh.plugins.failures`) and left out, so the CA of
another plugin is not affected; if it is the selected CA's, that CA is not ready, with the error
as the reason, until it reports again.  Nothing here stops the poll.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from mesh.plugins import failures

log = Logger()

#: What to install for the CAs txmesh's own plugins provide, for the error of an unknown ``--ca``.
INSTALL_HINTS = {
    "builtin": "the built-in CA is the plugin builtin.ca: do not disable it (--disable-plugin, MESH_DISABLE_PLUGINS)",
    "vault": "pip install txmesh-vault (HashiCorp Vault or OpenBao PKI)",
    "awspca": "pip install txmesh-awspca (AWS Private CA)",
}


class CASelectionError(Exception):
    """``--ca`` names a CA no installed plugin reports; the message lists those there are and what to install."""


def ask_plugins(hook) -> tuple:
    """``(statuses, errors)``: what each implementation of the ``mesh_ca_status`` hook (a pluggy hook caller)
    reports, and one line per plugin that raised (logged, once, by :data:`mesh.plugins.failures`)."""
    statuses, errors = [], []
    for impl in reversed(hook.get_hookimpls()):  # pluggy's order
        try:
            status = impl.function()
        except Exception as error:
            failures.report(impl.plugin_name, "mesh_ca_status", error)
            errors.append(f"plugin {impl.plugin_name!r} failed in mesh_ca_status: {type(error).__name__}: {error}")
        else:
            if status is not None:
                statuses.append(status)
    return statuses, errors


def find_selected(name: str, statuses, errors=()) -> object:
    """The :class:`mesh.api.CAStatus` among ``statuses`` for the CA called ``name``.

    :param errors: the failures of plugins that could not report (they may provide it), for the message.
    :raises CASelectionError: when no plugin or several plugins report ``name``.
    """
    matching = [status for status in statuses if status.name == name]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise CASelectionError(f"--ca {name}: {len(matching)} plugins report a CA named {name!r}; leave all but "
                               "one out with --disable-plugin (meshctl plugins lists them)")
    names = sorted({status.name for status in statuses})
    hint = INSTALL_HINTS.get(name, f"install the plugin that provides the CA {name!r}")
    others = "; ".join(f"--ca {other}: {how}" for other, how in INSTALL_HINTS.items()
                       if other != name and other not in names)
    failed = f" ({'; '.join(errors)})" if errors else ""
    raise CASelectionError(f"--ca {name}: no installed plugin provides a CA named {name!r}{failed} (CAs available: "
                           f"{', '.join(names) or 'none'}). To use it: {hint}; or choose one of those available"
                           + (f". Other CAs: {others}" if others else ""))


def parse_roots(pem: bytes) -> list:
    """The certificates of a PEM bundle; ValueError when it is not PEM certificates (or holds none)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise ValueError(f"not PEM certificates ({error})") from None


class CAMonitor(service.Service):
    """The selected CA's readiness and roots, asked of the plugins every ``interval`` seconds while running.

    :param name: the CA ``--ca`` selected.
    :param statuses: ``() -> (statuses, errors)``: :func:`ask_plugins` of the ``mesh_ca_status`` hook.
    :param on_bundle: ``(bundle_pem, certificates) -> None``, called when the trust bundle changes
        (also for the first one).
    :param ready_gauge: the ``mesh_ca_ready`` child of this CA (``set(0|1)``), or None.
    """

    def __init__(self, reactor, name: str, statuses: Callable, interval: float, on_bundle: Callable,
                 ready_gauge=None):
        self.reactor = reactor
        self.name = name
        self._statuses = statuses
        self.interval = interval
        self._on_bundle = on_bundle
        self._ready_gauge = ready_gauge
        self.ready = False
        self.reason = "the CA has not been asked yet"
        self.issuer = ""
        self.bundle_pem = b""
        self._loop = None

    def select(self) -> None:
        """Ask once, at start.

        :raises CASelectionError: when no plugin reports the CA ``--ca`` names.
        """
        self._apply(find_selected(self.name, *self._statuses()))

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def refresh(self) -> None:
        """Ask the plugins again; a failure is a reason not to be ready, never the end of the poll."""
        statuses, errors = self._statuses()
        try:
            status = find_selected(self.name, statuses, errors)
        except CASelectionError as error:  # its plugin failed, or stopped reporting it
            self._set_ready(False, "; ".join(errors) or str(error))
        else:
            try:
                self._apply(status)
            except Exception:
                log.failure("applying the status of CA {ca} failed; asking again in {interval}s", ca=self.name,
                            interval=self.interval)

    def _apply(self, status) -> None:
        self.issuer = status.issuer
        if status.roots_pem and status.roots_pem != self.bundle_pem:
            try:
                roots = parse_roots(status.roots_pem)
            except ValueError as error:
                self._set_ready(False, f"CA {self.name!r} reported roots that cannot be used: {error}")
                return
            self.bundle_pem = status.roots_pem
            log.info("trust bundle of CA {ca}: {count} root(s): {subjects}", ca=self.name, count=len(roots),
                     subjects="; ".join(root.subject.rfc4514_string() for root in roots))
            self._on_bundle(self.bundle_pem, roots)
        if status.ready and not self.bundle_pem:
            self._set_ready(False, f"CA {self.name!r} reported no root certificates yet")
        else:
            self._set_ready(bool(status.ready), "" if status.ready else (status.reason or "not ready"))

    def _set_ready(self, ready: bool, reason: str) -> None:
        if ready != self.ready or reason != self.reason:
            if ready:
                log.info("CA {ca} is ready ({issuer})", ca=self.name, issuer=self.issuer)
            else:
                log.warn("CA {ca} is not ready: {reason}; CSRs are answered 503 until it is", ca=self.name,
                         reason=reason)
        self.ready, self.reason = ready, reason
        if self._ready_gauge is not None:
            self._ready_gauge.set(1 if ready else 0)
