"""Control plane scale: N proxy sessions on one mesh-control, time from a config change to every ACK.

Starts ``twistd mesh-control`` (a fresh state dir and a config dir of ``--services`` services, each a
ServiceEntry + DestinationRule + VirtualService exported to every namespace), then runs
:mod:`bench.scale_client` in a separate process: ``--sessions`` real config streams (mutual TLS, each
with its own workload certificate, HELLO, ACK of every SNAPSHOT).  The client rewrites one file of the
config dir ``--changes`` times; the directory watcher applies it and every session's snapshot changes.
For each change it records, per session, the time from the file write to the session's ACK.

Reported: the connect phase, per change the convergence time (the last session's ACK), and over all
changes p50 / p99 / max of the per-session times; the control plane's peak RSS (VmHWM) and its
/proxies view (every session connected, ``version_acked == version_sent``).

    .venv/bin/python -m bench.scale                      # 500 sessions, 5 changes
    .venv/bin/python -m bench.scale --sessions 200 --changes 3 --endpoints
    .venv/bin/python -m bench.scale --profile /tmp/control.prof   # cProfile of mesh-control (twistd --profile)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAMESPACE = "scale-config"


def venv_bin(program: str) -> str:
    for base in (os.environ.get("TXMESH_VENV"), REPO / ".venv", Path(sys.prefix)):
        if base and (Path(base) / "bin" / program).exists():
            return str(Path(base) / "bin" / program)
    raise SystemExit(f"bench.scale: {program} not found in .venv or {sys.prefix}; run `make bootstrap`")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_config(services: int, namespaces: int, endpoints: bool) -> list:
    """``services`` services exported everywhere; with ``endpoints``, one selector service per session namespace."""
    documents = []
    for index in range(services):
        host = f"svc-{index}.{CONFIG_NAMESPACE}.svc.cluster.local"
        documents += [
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": f"svc-{index}", "namespace": CONFIG_NAMESPACE},
             "spec": {"hosts": [host], "location": "MESH_INTERNAL", "resolution": "STATIC",
                      "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                      "endpoints": [{"address": f"10.1.{index % 250}.{n + 1}", "ports": {"http": 8080},
                                     "labels": {"version": f"v{n % 2 + 1}"}} for n in range(4)]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
             "metadata": {"name": f"svc-{index}", "namespace": CONFIG_NAMESPACE},
             "spec": {"host": host, "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                      "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                  {"name": "v2", "labels": {"version": "v2"}}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
             "metadata": {"name": f"svc-{index}", "namespace": CONFIG_NAMESPACE},
             "spec": {"hosts": [host],
                      "http": [{"match": [{"headers": {"x-canary": {"exact": "1"}}}],
                                "route": [{"destination": {"host": host, "subset": "v2"}}]},
                               {"retries": {"attempts": 2, "perTryTimeout": "1s"},
                                "route": [{"destination": {"host": host, "subset": "v1"}, "weight": 90},
                                          {"destination": {"host": host, "subset": "v2"}, "weight": 10}]}]}},
        ]
    if endpoints:
        for ns in range(namespaces):
            documents.append(
                {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                 "metadata": {"name": "local-app", "namespace": f"scale-{ns}"},
                 "spec": {"hosts": [f"local-app.scale-{ns}.svc.cluster.local"], "location": "MESH_INTERNAL",
                          "resolution": "STATIC", "exportTo": ["."],
                          "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                          "workloadSelector": {"labels": {"bench": "scale"}}}})
    return documents


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def admin_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def run_client(control_address: str, state_dir, config_dir, sessions: int, changes: int, *, namespaces: int = 10,
               endpoints: bool = False, admin_port: int | None = None, timeout: float = 600.0, extra=()) -> dict:
    """Run :mod:`bench.scale_client` in its own process; its JSON result."""
    argv = [sys.executable, "-m", "bench.scale_client", "--control", control_address, "--state-dir", str(state_dir),
            "--config-dir", str(config_dir), "--sessions", str(sessions), "--changes", str(changes),
            "--namespaces", str(namespaces), *(["--endpoints"] if endpoints else []),
            *(["--admin-port", str(admin_port)] if admin_port else []), *extra]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"scale client exited {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(result: dict) -> dict:
    """p50 / p99 / max over every session of every change, and per-change convergence."""
    from bench.scale_client import percentile
    changes = result.get("changes", [])
    latencies = [value for change in changes for value in change["latencies"]]
    converged = [change["converged_s"] for change in changes]
    return {"sessions": result.get("sessions"), "connected": result.get("connected"),
            "connect_s": result.get("connect_s"), "changes": len(changes),
            "converged_s": converged,
            "convergence_max_s": max(converged) if converged and None not in converged else None,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies) if latencies else None,
            "missing": sum(change["missing"] for change in changes),
            "extra_pushes": sum(change["extra_pushes"] for change in changes),
            "snapshot_bytes": max((change["snapshot_bytes"] or 0 for change in changes), default=None)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--services", type=int, default=20, help="services (SE+DR+VS each) in the config dir")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces the sessions are spread over")
    parser.add_argument("--endpoints", action="store_true",
                        help="sessions announce inbound listeners: 500 registry endpoints in the snapshots")
    parser.add_argument("--profile", metavar="FILE", help="run mesh-control under cProfile, stats to FILE")
    parser.add_argument("--work", metavar="DIR", help="state/config/log directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    options = parser.parse_args(argv)

    work = Path(options.work or tempfile.mkdtemp(prefix="txmesh-scale-"))
    state, config = work / "state", work / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "base.yaml").write_text(yaml.safe_dump_all(
        base_config(options.services, options.namespaces, options.endpoints), sort_keys=False))
    port, admin_port = free_port(), free_port()
    argv = [venv_bin("twistd"), "-n", "--pidfile="]
    if options.profile:
        argv += ["--profile", options.profile, "--profiler", "cprofile", "--savestats"]
    argv += ["mesh-control", "--state-dir", str(state), "--config-dir", str(config), "--address", "127.0.0.1",
             "--port", str(port), "--admin-port", str(admin_port)]
    log = open(work / "control.log", "ab")
    control = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                admin_json(admin_port, "/ready")
                break
            except OSError:
                if control.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"mesh-control did not start; see {work / 'control.log'}") from None
                time.sleep(0.05)
        rss_idle = status_kib(control.pid, "VmRSS")
        result = run_client(f"127.0.0.1:{port}", state, config, options.sessions, options.changes,
                            namespaces=options.namespaces, endpoints=options.endpoints, admin_port=admin_port)
        hwm = status_kib(control.pid, "VmHWM")
        view = result.get("proxies") or {}
        summary = summarize(result)
        summary.update(control_rss_idle_mib=round(rss_idle / 1024, 1), control_vmhwm_mib=round(hwm / 1024, 1),
                       proxies_rows=view.get("rows"), proxies_synced=view.get("synced"),
                       services=options.services, endpoints=options.endpoints, work=str(work))
    finally:
        control.terminate()
        try:
            control.wait(30)
        except subprocess.TimeoutExpired:
            control.kill()
            control.wait()
        log.close()
    print(f"{summary['connected']}/{summary['sessions']} sessions connected in {summary['connect_s']:.2f}s; "
          f"{options.services} services{', sessions are registry endpoints' if options.endpoints else ''}; "
          f"snapshot {summary['snapshot_bytes']} bytes")
    for index, converged in enumerate(summary["converged_s"]):
        print(f"  change {index + 1}: every session ACKed in {converged}s")
    if summary["p50_s"] is not None:
        print(f"per-session change->ACK over {summary['changes']} changes: p50 {summary['p50_s']:.3f}s  "
              f"p99 {summary['p99_s']:.3f}s  max {summary['max_s']:.3f}s")
    print(f"mesh-control RSS: {summary['control_rss_idle_mib']} MiB idle, peak (VmHWM) "
          f"{summary['control_vmhwm_mib']} MiB; /proxies: {summary['proxies_synced']}/{summary['proxies_rows']} "
          f"synced; missing ACKs {summary['missing']}, extra pushes {summary['extra_pushes']}")
    ok = (summary["convergence_max_s"] is not None and summary["convergence_max_s"] < 2.0
          and summary["control_vmhwm_mib"] < 300 and summary["connected"] == options.sessions
          and summary["proxies_synced"] == options.sessions)
    print(f"targets (all converge < 2 s, RSS < 300 MB): {'met' if ok else 'NOT met'}; work dir {work}")
    if options.json:
        print(json.dumps({**summary, "raw": result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
