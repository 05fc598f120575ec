"""The CA backends bench.ca measures, one small module each: ``bench/ca_backend_<name>.py``.

A backend module defines one function::

    @contextlib.contextmanager
    def backend(ws: bench.topologies.Workspace) -> Iterator[CABackend]:
        ...  # start the CA server (if any) through ws.start(...), set it up
        yield CABackend(args=["--ca", "vault", ...], env={...})
        # stopped when the workspace's stack unwinds (ws.start) or here, after the yield

``args`` are the extra ``twistd mesh-control`` arguments that select and configure the CA (the
plugin's own options), ``env`` extra environment variables for mesh-control (an endpoint, a
credential file).  ``bench.ca`` starts mesh-control with them, waits for its admin ``/ready``
(the selected CA ready), and measures.  ``bench/ca_backend_builtin.py`` is the smallest example;
``python -m bench.ca --backends builtin,vault`` measures the modules named.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from bench.procs import BenchError


@dataclass
class CABackend:
    """What a backend gives mesh-control: its command-line arguments and environment variables."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def load(name: str):
    """The ``backend`` context-manager function of ``bench/ca_backend_<name>.py``."""
    try:
        module = importlib.import_module(f"bench.ca_backend_{name}")
    except ModuleNotFoundError as error:
        if error.name != f"bench.ca_backend_{name}":
            raise BenchError(f"CA backend {name!r} cannot be loaded: {error}; install what it needs") from None
        raise BenchError(f"no CA backend {name!r}: write bench/ca_backend_{name}.py (see bench/ca_backends.py)") \
            from None
    return module.backend


def third_party() -> list[str]:
    """The names of the installed ``mesh.plugins`` entry points (plugins not built in)."""
    return sorted({entry.name for entry in entry_points(group="mesh.plugins")})
