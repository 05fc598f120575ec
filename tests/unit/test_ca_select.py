"""The choice of CA (``--ca``) and its status poll: mesh.control.ca_select, the built-in CA plugin, Retry-After."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Gauge
from twisted.internet.task import Clock

from mesh import hookimpl
from mesh.api import CAStatus
from mesh.builtin.ca import BuiltinSigner
from mesh.control.ca_select import CAMonitor, CASelectionError, ask_plugins, find_selected, parse_roots
from mesh.control.csr_api import MAX_RETRY_AFTER, retry_after_seconds
from mesh.identity.ca import generate_root
from mesh.plugins import MeshPluginManager


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


ROOT_1 = generate_root("one.example")[1]
ROOT_2 = generate_root("two.example")[1]


def status(name="vault", ready=True, reason="", roots=pem(ROOT_1), issuer="vault https://v:8200 pki/sign/mesh"):
    return CAStatus(name=name, selected=True, ready=ready, reason=reason, roots_pem=roots, issuer=issuer)


# -- find_selected: the start-up check ---------------------------------------------------------------


def test_the_selected_ca_is_found_among_the_reports():
    vault = status("vault")
    assert find_selected("vault", [status("builtin"), vault]) is vault


def test_an_unknown_ca_names_those_available_and_what_to_install():
    with pytest.raises(CASelectionError) as caught:
        find_selected("vault", [status("builtin")])
    message = str(caught.value)
    assert message.startswith("--ca vault: no installed plugin provides a CA named 'vault' (CAs available: builtin). "
                              "To use it: pip install txmesh-vault")
    assert "--ca awspca: pip install txmesh-awspca" in message


def test_an_unknown_ca_with_a_failing_plugin_names_the_failure():
    with pytest.raises(CASelectionError, match=r"'awspca' \(plugin 'awspca' failed in mesh_ca_status: "
                                               r"RuntimeError: boom\) \(CAs available: builtin\)"):
        find_selected("awspca", [status("builtin")], ["plugin 'awspca' failed in mesh_ca_status: RuntimeError: boom"])


def test_two_plugins_reporting_one_name_is_refused():
    with pytest.raises(CASelectionError, match="2 plugins report a CA named 'vault'; leave all but one out"):
        find_selected("vault", [status("vault"), status("vault")])


def test_roots_must_be_pem_certificates():
    assert parse_roots(pem(ROOT_1) + pem(ROOT_2)) == [ROOT_1, ROOT_2]
    with pytest.raises(ValueError, match="not PEM certificates"):
        parse_roots(b"nothing here\n")
    with pytest.raises(ValueError, match="not PEM certificates"):
        parse_roots(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- ask_plugins: each plugin alone ------------------------------------------------------------------


class Reporter:
    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def mesh_ca_status(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_failing_plugin_does_not_hide_the_others():
    pm = MeshPluginManager()
    pm.register(Reporter(status("builtin")), name="builtin.ca")
    pm.register(Reporter(RuntimeError("broken on purpose")), name="broken")
    pm.register(Reporter(None), name="not-a-ca")
    statuses, errors = ask_plugins(pm.hook.mesh_ca_status)
    assert [found.name for found in statuses] == ["builtin"]
    assert errors == ["plugin 'broken' failed in mesh_ca_status: RuntimeError: broken on purpose"]


# -- CAMonitor: the poll --------------------------------------------------------------------------------


class Plugins:
    """What the plugins report, as the test sets it."""

    def __init__(self, *statuses):
        self.statuses = list(statuses)
        self.errors = []

    def __call__(self):
        return self.statuses, self.errors


class ReadyGauge:
    """``mesh_ca_ready{ca}`` in a registry of its own; ``value`` is what Prometheus would scrape."""

    def __init__(self, name):
        self.registry = CollectorRegistry()
        self.name = name
        self.child = Gauge("mesh_ca_ready", "", ("ca",), registry=self.registry).labels(name)

    @property
    def value(self):
        return self.registry.get_sample_value("mesh_ca_ready", {"ca": self.name})


def monitor(plugins, name="vault"):
    bundles = []
    gauge = ReadyGauge(name)
    clock = Clock()
    watched = CAMonitor(clock, name, plugins, 5.0, lambda bundle, roots: bundles.append((bundle, roots)),
                        gauge.child)
    return watched, bundles, gauge, clock


def test_select_takes_the_roots_and_readiness():
    watched, bundles, gauge, _ = monitor(Plugins(status("builtin", roots=pem(ROOT_2)), status()))
    watched.select()
    assert (watched.ready, watched.reason, watched.bundle_pem) == (True, "", pem(ROOT_1))
    assert bundles == [(pem(ROOT_1), [ROOT_1])] and gauge.value == 1


def test_select_refuses_an_unknown_ca():
    watched, bundles, _, _ = monitor(Plugins(status("builtin")))
    with pytest.raises(CASelectionError):
        watched.select()
    assert bundles == []


def test_the_poll_follows_readiness_and_pushes_new_roots_once():
    plugins = Plugins(status())
    watched, bundles, gauge, clock = monitor(plugins)
    watched.select()
    watched.startService()
    plugins.statuses = [status(ready=False, reason="vault is sealed: unseal it")]
    clock.advance(5.0)
    assert (watched.ready, watched.reason) == (False, "vault is sealed: unseal it") and gauge.value == 0
    plugins.statuses = [status(roots=pem(ROOT_1) + pem(ROOT_2))]  # a rotation: old and new
    clock.advance(5.0)
    clock.advance(5.0)
    assert watched.ready and gauge.value == 1
    assert bundles == [(pem(ROOT_1), [ROOT_1]), (pem(ROOT_1) + pem(ROOT_2), [ROOT_1, ROOT_2])]
    watched.stopService()
    assert not clock.getDelayedCalls()


def test_roots_reported_empty_keep_the_bundle_in_force():
    plugins = Plugins(status())
    watched, bundles, _, _ = monitor(plugins)
    watched.select()
    plugins.statuses = [status(roots=b"")]
    watched.refresh()
    assert watched.ready and watched.bundle_pem == pem(ROOT_1) and len(bundles) == 1


def test_a_ca_ready_without_any_root_is_not_ready():
    watched, bundles, _, _ = monitor(Plugins(status(roots=b"")))
    watched.select()
    assert (watched.ready, watched.reason) == (False, "CA 'vault' reported no root certificates yet")
    assert bundles == []


def test_unusable_roots_make_the_ca_not_ready_and_keep_the_bundle():
    plugins = Plugins(status())
    watched, bundles, _, _ = monitor(plugins)
    watched.select()
    plugins.statuses = [status(roots=b"garbage")]
    watched.refresh()
    assert not watched.ready and watched.reason.startswith("CA 'vault' reported roots that cannot be used")
    assert watched.bundle_pem == pem(ROOT_1) and len(bundles) == 1


def test_the_plugin_of_the_ca_failing_is_the_reason_until_it_reports_again():
    plugins = Plugins(status())
    watched, _, _, _ = monitor(plugins)
    watched.select()
    plugins.statuses, plugins.errors = [], ["plugin 'vault' failed in mesh_ca_status: OSError: gone"]
    watched.refresh()
    assert (watched.ready, watched.reason) == (False, "plugin 'vault' failed in mesh_ca_status: OSError: gone")
    plugins.statuses, plugins.errors = [status()], []
    watched.refresh()
    assert watched.ready and watched.reason == ""


# -- the built-in CA plugin ---------------------------------------------------------------------------


def configured_builtin(ca_option, workers=None):
    ca = SimpleNamespace(bundle_pem=lambda: pem(ROOT_1), cert=ROOT_1,
                         sign=lambda csr, identity, ttl: (b"CERT", b"CHAIN"))
    config = SimpleNamespace(role="control", service=SimpleNamespace(ca=ca, ca_workers=workers),
                             option=lambda name, default=None: ca_option if name == "ca" else default)
    signer = BuiltinSigner()
    signer.mesh_configure(config)
    return signer


def test_the_builtin_ca_reports_itself_ready_with_its_bundle():
    reported = configured_builtin("builtin").mesh_ca_status()
    assert reported == CAStatus(name="builtin", selected=True, ready=True, reason="", roots_pem=pem(ROOT_1),
                                issuer="builtin CA CN=txmesh root CA one.example,O=one.example")


def test_the_builtin_ca_signs_only_when_selected():
    assert configured_builtin("builtin").mesh_sign_csr(None, "spiffe://td/ns/a/sa/b", 60) == (b"CERT", b"CHAIN")
    other = configured_builtin("vault")
    assert other.mesh_sign_csr(None, "spiffe://td/ns/a/sa/b", 60) is None
    assert other.mesh_ca_status().selected is False


def test_with_ca_workers_the_builtin_ca_signs_there_and_is_ready_while_one_runs():
    running = [True]
    workers = SimpleNamespace(ready=lambda: running[0], sign=lambda csr, identity, ttl: ("IN A WORKER", identity))
    signer = configured_builtin("builtin", workers)
    assert signer.mesh_sign_csr(None, "spiffe://td/ns/a/sa/b", 60) == ("IN A WORKER", "spiffe://td/ns/a/sa/b")
    assert signer.mesh_ca_status().ready is True
    running[0] = False
    status = signer.mesh_ca_status()
    assert (status.ready, status.roots_pem) == (False, pem(ROOT_1))
    assert status.reason.startswith("no CA worker process is running (--ca-workers)")


# -- Retry-After --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, header", [(5.0, 5), (0.2, 1), (2.5, 3), (0, 1), (-4, 1), (float("nan"), 1),
                                           (float("inf"), MAX_RETRY_AFTER), (1e9, MAX_RETRY_AFTER), ("7", 7),
                                           (None, 1), ("soon", 1)])
def test_retry_after_is_whole_seconds_within_bounds(value, header):
    assert retry_after_seconds(value) == header
