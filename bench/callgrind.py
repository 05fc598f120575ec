"""Stall-free cost figure: instructions executed by a case's proxies per request.

The host steals CPU in long stalls and has no PMU, so /proc CPU time is
inflated and ``perf`` counts nothing.  Valgrind's callgrind counts the
instructions (Ir) a process executes regardless of stalls.  Each proxy runs
under callgrind with instrumentation off (startup is not counted); after a
warm-up, instrumentation is switched on with ``callgrind_control -i on``, a
fixed number of requests is sent one at a time, and it is switched off again.
Callgrind writes its totals when the proxy exits.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

from bench.loadgen import LoadGenerator
from bench.procs import BenchError, run_tool
from bench.topologies import CASES, Workspace

_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)


def read_totals(path: Path) -> int:
    """The instruction total (``totals:`` line, event Ir) of a callgrind output file."""
    try:
        match = _TOTALS.search(path.read_text(errors="replace"))
    except OSError as exc:
        raise BenchError(f"no callgrind output {path}: {exc.strerror}") from exc
    if not match:
        raise BenchError(f"no 'totals:' line in {path}")
    return int(match.group(1))


def instrument(proxies, switch: str, log_dir: Path) -> None:
    """Turn callgrind's instrumentation ``on`` or ``off`` in every proxy."""
    for proxy in proxies:
        run_tool(["callgrind_control", "-i", switch, str(proxy.pid)], 60,
                 log_dir / f"callgrind_control-{proxy.name}-{switch}.log")


def instructions_per_request(template: Workspace, case: str, backend_port: int, load: LoadGenerator,
                             requests: int, warmup: int) -> tuple[float, dict[str, float]]:
    """Start ``case`` afresh under callgrind in front of the running backend; return Ir per request.

    ``template`` supplies the work dir, venv and CPU pinning; the proxies get
    their own process stack, unwound (so callgrind writes its files) before
    the totals are read.  Returns the sum over the case's proxies, and the
    figure of each proxy that has a role (the sidecars of a pair).
    """
    root = template.root / f"callgrind-{case}"
    root.mkdir()
    with ExitStack() as stack:
        ws = Workspace(root, stack, template.venv_bin, template.server_cpus, callgrind=True)
        target = CASES[case](ws, backend_port)
        if not target.proxies:
            raise BenchError(f"case {case} has no proxy to count instructions of")
        load.fixed_count(target.url, target.host, f"callgrind-{case}-warmup", warmup, target.h2_streams)
        instrument(target.proxies, "on", root)
        load.fixed_count(target.url, target.host, f"callgrind-{case}", requests, target.h2_streams)
        instrument(target.proxies, "off", root)
    per_proxy = [(proxy.role, read_totals(ws.callgrind_file(proxy.name)) / requests) for proxy in target.proxies]
    return sum(value for _, value in per_proxy), {role: value for role, value in per_proxy if role}
