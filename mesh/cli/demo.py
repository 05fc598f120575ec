"""``meshctl demo``: run the demo mesh on loopback and take a guided tour of it.

Starts the control plane (the mesh's CA and config server, watching a copy of
the demo's config) and five workloads on loopback, each a demo app plus its
sidecar with a workload certificate and its config from the control plane,
prints where everything is, then sends real traffic through the mesh and
checks what happens: routing, a live change of the canary weights, retries,
mTLS identities and authorization, a gRPC call, then what the metrics say.  Afterwards
the mesh stays up for you to explore until Ctrl-C (or SIGTERM); with
--exit-after-tour it stops right away.  Either way every child process is
stopped before meshctl exits.  The mesh runs the built-in plugins only (so
the tour shows the default load balancer, say), unless --plugin names
installed ones to load.

The mesh is :mod:`mesh.demo.runner`, the tour :mod:`mesh.demo.tour`.

Exit status: 0 when every expectation of the tour held; 1 when one did not or
a process of the mesh died; 2 when the mesh could not start; 130 when
interrupted before the tour finished.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

from mesh.demo.runner import (
    ADMIN_ADDRESS,
    CONTROL_ADMIN_PORT,
    INBOUND_PORT,
    METRICS_PATH,
    METRICS_PORT,
    OUTBOUND_PORT,
    STOP_SIGNALS,
    DemoError,
    DemoMesh,
)
from mesh.demo.tour import CLIENT, PAYMENT_SERVICE, USER_SERVICE, run_tour


def add_parser(subparsers):
    parser = subparsers.add_parser("demo", help="run a demo mesh on loopback and tour it with real traffic",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--exit-after-tour", action="store_true",
                        help="stop the mesh after the tour; exit 0 only if every expectation held")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="where to write the logs, the control plane's state and the join tokens "
                             "(default: a new temporary directory)")
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="load this installed plugin (repeatable; `meshctl plugins` lists them); without it "
                             "the demo runs the built-in plugins only, e.g. the default load balancer")
    parser.set_defaults(func=run)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args) -> int:
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="txmesh-demo-"))
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        with DemoMesh(state_dir, plugins=args.plugin) as mesh:
            print(f"Starting the demo mesh (logs in {mesh.log_dir}) ...", flush=True)
            mesh.start()
            print(mesh.describe(), flush=True)
            passed = run_tour(mesh)
            if not args.exit_after_tour:
                passed = _stay_up(mesh) and passed
            print("Stopping the demo mesh ...", flush=True)
    except DemoError as error:
        print(f"meshctl demo: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\nmeshctl demo: interrupted; the demo mesh is stopped (logs in {state_dir})", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"Stopped. The logs stay in {state_dir}", flush=True)
    return 0 if passed else 1


def _print_try_it(mesh: DemoMesh) -> None:
    client = mesh.workload(CLIENT)
    user = mesh.workload("user-service-v1")
    payment = mesh.workload("payment-service")
    outbound = f"http://{client.address}:{OUTBOUND_PORT}"
    print("\n".join([
        "",
        "The mesh stays up until you press Ctrl-C. Try it yourself:",
        f"  curl -H 'Host: {USER_SERVICE}' {outbound}/",
        f"  curl -H 'Host: {USER_SERVICE}' -H 'x-user-group: beta' {outbound}/",
        f"  curl -i -H 'Host: {PAYMENT_SERVICE}' {outbound}/        # 403: only user-service may call it",
        f"  curl --interface {user.address} -H 'Host: payment-service' http://{user.address}:{OUTBOUND_PORT}/"
        "   # as user-service",
        f"  curl http://{payment.address}:{INBOUND_PORT}/      # plaintext into the mesh: refused (STRICT mTLS)",
        f"  curl http://{ADMIN_ADDRESS}:{client.admin_port}/config_dump",
        f"  $EDITOR {mesh.config_dir / 'user-service.yaml'}   # change the canary weights; "
        "the sidecars get it at once",
        f"  meshctl proxy-status --control-admin {ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}   # who has which config",
        f"  curl http://{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}/ca/root-cert.pem",
        f"  curl -s http://{payment.address}:{METRICS_PORT}{METRICS_PATH} | grep '^istio_requests_total'"
        "   # Istio's metrics",
        f"  curl http://{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}/metrics   # the control plane's",
    ]), flush=True)


def _stay_up(mesh: DemoMesh) -> bool:
    """Say how to explore the mesh, then block until a stop signal (True) or until a process of the
    mesh exits (False, with its log tail).

    The signals are held from before the message on, so a Ctrl-C right after it is a normal stop.
    """
    wake = {*STOP_SIGNALS, signal.SIGCHLD}  # SIGCHLD: a child exited
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wake)
    try:
        _print_try_it(mesh)
        while not (exited := mesh.exited()):
            signum = signal.sigwait(wake)
            if signum != signal.SIGCHLD:
                print(f"\n{signal.Signals(signum).name} received", flush=True)
                return True
        for child in exited:
            print(child.failure(f"meshctl demo: {child.label} exited unexpectedly with status "
                                f"{child.exit_code()}"), file=sys.stderr, flush=True)
        return False
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
