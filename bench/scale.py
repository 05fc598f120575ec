"""Control plane scale: N proxy sessions on one mesh-control, time from a config change to every ACK.

Starts ``twistd mesh-control`` (a fresh state dir and a config dir of ``--services`` services, each a
ServiceEntry + DestinationRule + VirtualService exported to every namespace), then runs
:mod:`bench.scale_client` in ``--processes`` separate processes (so that the load generator is not the
bottleneck): ``--sessions`` real config streams in all (mutual TLS, each with its own workload
certificate, HELLO, ACK of every SNAPSHOT).  With ``--endpoints`` every session also announces an
inbound listener, so it is a registry endpoint of its namespace's ``local-app`` service and each new
session changes the snapshots of its namespace.  Then ``--changes`` times this process rewrites one
file of the config dir; the directory watcher applies it and every session's snapshot changes; each
client records, per session, the time from the file write to the session's ACK.

Reported: the connect phase (``connect``: until every session has its first snapshot; ``quiet``: until
no snapshot came for 0.5 s, the registry pushes included), per change the convergence time (the last
session's ACK), and over all changes p50 / p99 / max of the per-session times; the control plane's
peak RSS (VmHWM), its ``mesh_control_pushes_total`` and its /proxies view (every session connected,
``version_acked == version_sent``).

    .venv/bin/python -m bench.scale                      # 500 sessions, 5 changes
    .venv/bin/python -m bench.scale --sessions 200 --changes 3 --endpoints
    .venv/bin/python -m bench.scale --targets            # the three cases of issue #15, docs/performance.md
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

from bench.scale_client import node_name, percentile, write_change

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


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def admin_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


class ClientProcess:
    """One :mod:`bench.scale_client` process, driven by a command a line (its module doc)."""

    def __init__(self, argv, log_path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        """The next JSON line; RuntimeError (with the log's tail) if the process ended or failed."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            with open(self.log.name, "rb") as log:
                tail = log.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"scale client exited {self.proc.returncode}: {tail}")
        document = json.loads(line)
        if "error" in document:
            raise RuntimeError(f"scale client: {document['error']}")
        return document

    def close(self) -> None:
        try:
            self.send("exit")
            self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def ask(clients, command) -> list:
    """Send ``command`` to every client (they run it concurrently), then read each one's answer."""
    for client in clients:
        client.send(command)
    return [client.answer() for client in clients]


def run_client(control_address: str, state_dir, config_dir, sessions: int, changes: int, *, namespaces: int = 10,
               endpoints: bool = False, admin_port: int | None = None, processes: int = 4, settle: float = 0.5,
               timeout: float = 120.0, log_dir=None, pace: float = 0.0, on_connected=None) -> dict:
    """Run ``sessions`` sessions in ``processes`` :mod:`bench.scale_client` processes; the merged result.

    Connect every session (``connect_s``: until each has its first snapshot; ``settled_s``: until no
    snapshot came for ``settle`` s, the registry pushes of the connect included), then ``changes`` times
    rewrite the change file and collect, per session, the time from the write to its ACK.  With
    ``pace``, each process opens one session every ``pace`` seconds instead of 25 at a time.
    ``on_connected(result)`` runs once every session has its first snapshot.
    """
    processes = max(1, min(processes, sessions))
    shares = [sessions // processes + (1 if index < sessions % processes else 0) for index in range(processes)]
    log_dir = Path(log_dir or state_dir)
    clients = []
    try:
        offset = 0
        for index, share in enumerate(shares):
            argv = [sys.executable, "-m", "bench.scale_client", "--control", control_address,
                    "--state-dir", str(state_dir), "--sessions", str(share), "--offset", str(offset),
                    "--namespaces", str(namespaces), "--timeout", str(timeout), "--settle", str(settle),
                    "--pace", str(pace),
                    *(["--endpoints"] if endpoints else [])]
            clients.append(ClientProcess(argv, log_dir / f"scale-client-{index}.log"))
            clients[-1].answer()  # loaded the CA (which rewrites the bundle file): the next one may start
            offset += share
        ready = [client.answer() for client in clients]
        connects = ask(clients, "connect")
        started = min(answer["started"] for answer in connects)
        result = {"sessions": sessions, "processes": processes,
                  "connected": sum(answer["connected"] for answer in connects),
                  "connect_failures": [failure for answer in connects for failure in answer["failures"]][:10],
                  "certificates_s": max(answer["certificates_s"] for answer in ready),
                  "connect_s": round(max(answer["finished"] for answer in connects) - started, 3),
                  "clients_connect_cpu_s": round(sum(answer["cpu_s"] for answer in connects), 2), "changes": []}
        if result["connected"] != sessions:
            return result
        if on_connected is not None:
            on_connected(result)
        result["settled_s"] = round(max(answer["quiet"] for answer in ask(clients, f"quiet {settle}")) - started, 3)
        for step in range(changes):
            t0 = write_change(str(config_dir), step)
            result["changes"].append(merge_change(step, ask(clients, f"change {t0}")))
            if result["changes"][-1]["missing"]:
                break
        if admin_port:
            result["proxies"] = proxies_view(admin_port, {node_name(index, namespaces) for index in range(sessions)})
        return result
    finally:
        for client in clients:
            client.close()


def merge_change(step: int, answers: list) -> dict:
    """One change's figures over every client process."""
    latencies = [value for answer in answers for value in answer["latencies"]]
    missing = sum(answer["missing"] for answer in answers)
    return {"step": step, "acked": len(latencies), "missing": missing,
            "extra_pushes": sum(answer["extra_pushes"] for answer in answers),
            "lost": sum(answer["lost"] for answer in answers),
            "versions": len({version for answer in answers for version in answer["versions"]}),
            "snapshot_bytes": max((answer["snapshot_bytes"] or 0 for answer in answers), default=None),
            "converged_s": round(max(latencies), 4) if latencies and not missing else None,
            "p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
            "p99_s": round(percentile(latencies, 0.99), 4) if latencies else None,
            "latencies": latencies}


def proxies_view(admin_port: int, nodes) -> dict:
    """The control plane's /proxies rows of our sessions, while they are still connected."""
    rows = [row for row in admin_json(admin_port, "/proxies") if row["node"] in nodes]
    return {"rows": len(rows), "connected": sum(1 for row in rows if row["connected"]),
            "synced": sum(1 for row in rows if row["connected"] and not row["stale"]
                          and row["version_acked"] == row["version_sent"]),
            "versions_acked": len({row["version_acked"] for row in rows})}


def control_metric(admin_port: int, name: str) -> float:
    """One sample of the control plane's /metrics (0.0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def summarize(result: dict) -> dict:
    """p50 / p99 / max over every session of every change, and per-change convergence."""
    changes = result.get("changes", [])
    latencies = [value for change in changes for value in change["latencies"]]
    converged = [change["converged_s"] for change in changes]
    return {"sessions": result.get("sessions"), "connected": result.get("connected"),
            "connect_s": result.get("connect_s"), "settled_s": result.get("settled_s"), "changes": len(changes),
            "converged_s": converged,
            "convergence_max_s": max(converged) if converged and None not in converged else None,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies) if latencies else None,
            "missing": sum(change["missing"] for change in changes),
            "extra_pushes": sum(change["extra_pushes"] for change in changes),
            "snapshot_bytes": max((change["snapshot_bytes"] or 0 for change in changes), default=None)}


#: The three targets of issue #15 (control plane): case name -> (sessions, changes, endpoints, check, text).
TARGETS = {
    "endpoints": (1000, 3, True, lambda s: s["connect_s"] < 10, "1000 registry-endpoint sessions connect < 10 s"),
    "converge": (1000, 5, False, lambda s: s["p99_s"] is not None and s["p99_s"] < 1.0,
                 "1000 sessions: per-session change->ACK p99 < 1 s"),
    "large": (5000, 3, False, lambda s: s["convergence_max_s"] is not None and s["convergence_max_s"] < 5.0
              and s["control_vmhwm_mib"] < 500, "5000 sessions converge < 5 s, mesh-control peak RSS < 500 MiB"),
}


def run_case(work: Path, sessions: int, changes: int, *, services: int, namespaces: int, endpoints: bool,
             processes: int, profile=None, control_args=()) -> dict:
    """Start mesh-control on a fresh state/config dir under ``work``, run the clients; the summary."""
    state, config = work / "state", work / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "base.yaml").write_text(yaml.safe_dump_all(base_config(services, namespaces, endpoints),
                                                         sort_keys=False))
    port, admin_port = free_port(), free_port()
    argv = [venv_bin("twistd"), "-n", "--pidfile="]
    if profile:
        argv += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
    argv += ["mesh-control", "--state-dir", str(state), "--config-dir", str(config), "--address", "127.0.0.1",
             "--port", str(port), "--admin-port", str(admin_port), *control_args]
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
        rss_idle, cpu = status_kib(control.pid, "VmRSS"), cpu_seconds(control.pid)
        def connected(result):
            result["control_connect_cpu_s"] = round(cpu_seconds(control.pid) - cpu, 2)

        result = run_client(f"127.0.0.1:{port}", state, config, sessions, changes, namespaces=namespaces,
                            endpoints=endpoints, admin_port=admin_port, processes=processes, log_dir=work,
                            on_connected=connected)
        hwm, cpu = status_kib(control.pid, "VmHWM"), cpu_seconds(control.pid) - cpu
        pushes = control_metric(admin_port, "mesh_control_pushes_total")
        view = result.get("proxies") or {}
        summary = summarize(result)
        summary.update(control_rss_idle_mib=round(rss_idle / 1024, 1), control_vmhwm_mib=round(hwm / 1024, 1),
                       proxies_rows=view.get("rows"), proxies_synced=view.get("synced"), pushes=int(pushes),
                       control_cpu_s=round(cpu, 2), control_connect_cpu_s=result.get("control_connect_cpu_s"),
                       clients_connect_cpu_s=result.get("clients_connect_cpu_s"),
                       services=services, endpoints=endpoints, processes=result.get("processes"), work=str(work))
        return summary
    finally:
        control.terminate()
        try:
            control.wait(30)
        except subprocess.TimeoutExpired:
            control.kill()
            control.wait()
        log.close()


def report(summary: dict) -> None:
    """Print one case's figures."""
    endpoints = ", sessions are registry endpoints" if summary["endpoints"] else ""
    print(f"{summary['connected']}/{summary['sessions']} sessions ({summary['processes']} client processes) "
          f"connected in {summary['connect_s']:.2f}s, quiet after {summary.get('settled_s')}s; "
          f"{summary['services']} services{endpoints}; snapshot {summary['snapshot_bytes']} bytes; "
          f"{summary['pushes']} pushes in all")
    print(f"CPU while connecting: mesh-control {summary['control_connect_cpu_s']}s, the clients "
          f"{summary['clients_connect_cpu_s']}s; mesh-control over the whole case {summary['control_cpu_s']}s; "
          f"host load average {os.getloadavg()[0]:.1f}")
    for index, converged in enumerate(summary["converged_s"]):
        print(f"  change {index + 1}: every session ACKed in {converged}s")
    if summary["p50_s"] is not None:
        print(f"per-session change->ACK over {summary['changes']} changes: p50 {summary['p50_s']:.3f}s  "
              f"p99 {summary['p99_s']:.3f}s  max {summary['max_s']:.3f}s")
    print(f"mesh-control RSS: {summary['control_rss_idle_mib']} MiB idle, peak (VmHWM) "
          f"{summary['control_vmhwm_mib']} MiB; /proxies: {summary['proxies_synced']}/{summary['proxies_rows']} "
          f"synced; missing ACKs {summary['missing']}, extra pushes {summary['extra_pushes']}")


def healthy(summary: dict) -> bool:
    """Every session connected, ACKed every change and shows as synced in /proxies."""
    return (summary["connected"] == summary["sessions"] == summary["proxies_synced"]
            and summary["missing"] == 0 and summary["changes"] > 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--services", type=int, default=20, help="services (SE+DR+VS each) in the config dir")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces the sessions are spread over")
    parser.add_argument("--endpoints", action="store_true",
                        help="sessions announce inbound listeners: every session is a registry endpoint")
    parser.add_argument("--processes", type=int, default=4, help="client processes the sessions are spread over")
    parser.add_argument("--targets", action="store_true",
                        help="run the three cases of issue #15 (" + "; ".join(t[4] for t in TARGETS.values()) + ")")
    parser.add_argument("--profile", metavar="FILE", help="run mesh-control under cProfile, stats to FILE")
    parser.add_argument("--control-arg", action="append", default=[], metavar="ARG",
                        help="one more mesh-control argument (repeat it: --control-arg=--push-max-delay "
                             "--control-arg=2)")
    parser.add_argument("--work", metavar="DIR", help="state/config/log directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    options = parser.parse_args(argv)

    work = Path(options.work or tempfile.mkdtemp(prefix="txmesh-scale-"))
    common = {"services": options.services, "namespaces": options.namespaces, "processes": options.processes,
              "control_args": options.control_arg}
    if not options.targets:
        summary = run_case(work, options.sessions, options.changes, endpoints=options.endpoints,
                           profile=options.profile, **common)
        report(summary)
        if options.json:
            print(json.dumps(summary))
        return 0 if healthy(summary) else 1
    met = True
    for name, (sessions, changes, endpoints, check, text) in TARGETS.items():
        summary = run_case(work / name, sessions, changes, endpoints=endpoints, **common)
        report(summary)
        ok = healthy(summary) and check(summary)
        met = met and ok
        print(f"target {name} ({text}): {'met' if ok else 'NOT met'}\n")
        if options.json:
            print(json.dumps(summary))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
