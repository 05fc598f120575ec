"""What the harness records when a latency run gets no 2xx response.

A failed h2load run is reported, not retried: the round's latency is left
out of the medians, and this module writes ``<tag>.diagnostics.txt`` in the
work dir with what is needed to tell a proxy fault from a load-generator or
host fault:

- the socket table (``ss -tanpo``) of the case's ports, taken just *before*
  h2load started (:func:`socket_table`, kept in memory) and again after;
- per proxy: process state, thread and descriptor counts, the admin
  ``/ready`` and ``/clusters`` (and the listeners of ``/config_dump`` for
  txmesh), and the tail of its log;
- h2load's own output;
- one probe GET through the case right after the failure (not counted
  anywhere: it only says whether the proxy answers again).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from bench.procs import http_get

LOG_TAIL_LINES = 80


def socket_table(ports) -> str:
    """``ss -tanpo`` restricted to connections from or to any of ``ports``."""
    ports = sorted(set(p for p in ports if p))
    if not ports:
        return "(no ports)"
    expression = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    try:
        out = subprocess.run(["ss", "-tanpo", f"( {expression} )"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(ss failed: {exc})"
    return (out.stdout + out.stderr).rstrip() or "(no sockets)"


def target_ports(target, backend_port: int | None) -> list[int]:
    """Every port of the case: its URL's, its proxies', the backend's."""
    ports = [int(target.url.rsplit(":", 1)[1].split("/", 1)[0])]
    for proxy in target.proxies:
        ports.extend(proxy.ports)
    if backend_port:
        ports.append(backend_port)
    return ports


def _proc_summary(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        keep = [line for line in status if line.split(":")[0] in ("State", "Threads", "VmRSS", "VmHWM")]
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        return f"(cannot read /proc/{pid}: {exc.strerror})"
    return "; ".join(" ".join(line.split()) for line in keep) + f"; open fds {fds}"


def _admin(port: int, path: str) -> str:
    started = time.monotonic()
    status, body = http_get(f"http://127.0.0.1:{port}{path}")
    elapsed = (time.monotonic() - started) * 1000
    text = body.decode(errors="replace")
    if path == "/config_dump" and status == 200:
        try:
            text = json.dumps({"listeners": json.loads(text).get("listeners")}, indent=1)
        except ValueError:
            pass
    return f"GET {path}: {status} in {elapsed:.1f} ms\n{text.rstrip()}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"


def capture(work: Path, tag: str, name: str, target, backend_port: int | None, before: str,
            error: str) -> Path:
    """Write ``<work>/<tag>.diagnostics.txt`` for a failed latency run; return its path."""
    ports = target_ports(target, backend_port)
    sections = [f"case {name}, run {tag}: {error}",
                f"=== ss -tanpo for ports {sorted(set(ports))}, just before h2load started\n{before}",
                f"=== the same, after the failure\n{socket_table(ports)}"]
    for proxy in target.proxies:
        part = [f"=== proxy {proxy.name} (pid {proxy.pid}, role {proxy.role or '-'}, ports {proxy.ports})",
                _proc_summary(proxy.pid)]
        if proxy.admin_port:
            for path in ("/ready", "/clusters", "/config_dump"):
                part.append(_admin(proxy.admin_port, path))
        part.append(f"--- last {LOG_TAIL_LINES} lines of {proxy.name}.log\n{_tail(work / f'{proxy.name}.log')}")
        sections.append("\n".join(part))
    sections.append(f"=== h2load output ({tag}.h2load.out)\n{_tail(work / f'{tag}.h2load.out', 200)}")
    started = time.monotonic()
    status, body = http_get(target.url, target.host)
    sections.append(f"=== probe GET {target.url} (Host: {target.host or 'default'}) after the failure: "
                    f"{status}, {len(body)} bytes in {(time.monotonic() - started) * 1000:.1f} ms\n"
                    f"{body[:300]!r}")
    path = work / f"{tag}.diagnostics.txt"
    path.write_text("\n\n".join(sections) + "\n")
    return path
