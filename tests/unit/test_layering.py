"""The layering of mesh/ (docs/architecture.md, "Packages and layering"), checked on the source.

Every module under mesh/ is parsed (``ast``; nothing is imported) and every
``import``/``from ... import`` in it is read, those inside functions and
``if TYPE_CHECKING:`` blocks included.  Each rule below names the packages a
package must not import; on top of them no module imports a ``_private`` name
(or module) of another package, and the packages form no cycle.  A failure
lists every offence as ``mesh/path.py:LINE: [rule] what``, so the fix starts at
the line it names.
"""

from __future__ import annotations

import ast
import io
import textwrap
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MESH = Path(__file__).resolve().parents[2] / "mesh"


@dataclass(frozen=True)
class Rule:
    """Modules under ``source`` (a dotted prefix) must import nothing under any of ``forbidden``."""

    name: str
    source: str
    forbidden: tuple[str, ...]
    why: str


#: The allowed directions, as docs/architecture.md draws them.  ``mesh.control`` includes
#: ``mesh.control.kube`` and ``mesh.control.inject``.
RULES = (
    Rule("proxy-no-control", "mesh.proxy", ("mesh.control",),
         "the data plane imports no control-plane code (the wire format is mesh.protocol)"),
    Rule("telemetry-no-proxy", "mesh.telemetry", ("mesh.proxy", "mesh.control"),
         "telemetry reads the data plane through duck-typed views, it imports neither plane"),
    Rule("config-is-a-leaf", "mesh.config", ("mesh.proxy", "mesh.control", "mesh.telemetry", "mesh.identity"),
         "the resource model is used by both planes and uses neither"),
    Rule("identity-no-planes", "mesh.identity", ("mesh.proxy", "mesh.control"),
         "CA core, SPIFFE ids and TLS serve both planes"),
    Rule("protocol-neutral", "mesh.protocol", ("mesh.proxy", "mesh.control"),
         "the wire format is shared by both ends"),
    Rule("contract-neutral", "mesh.sidecar_contract", ("mesh",),
         "the names shared by sidecar, injector and control plane import nothing of mesh"),
    Rule("backoff-neutral", "mesh.backoff", ("mesh",), "one retry schedule for every package, importing none"),
    Rule("kube-and-inject-under-control", "mesh", ("mesh.kube", "mesh.inject"),
         "Kubernetes and injection code is control-plane code: mesh.control.kube, mesh.control.inject"),
    Rule("control-ca-is-a-plugin", "mesh.control", ("mesh.builtin.ca",),
         "the CA signer is reached through the mesh_sign_csr hook (DEFAULT_PLUGINS), not imported"),
)

#: What plugins see: ``mesh.api`` and ``mesh.hookspecs`` may import each other and the package
#: root (``mesh.hookimpl``); any other module of mesh only if their source documents it (names it,
#: as ``mesh.x.y`` or ``mesh/x/y.py``, in the module docstring or a comment), as a re-export.
PLUGIN_SURFACE = ("mesh.api", "mesh.hookspecs")
PLUGIN_SURFACE_MAY_IMPORT = frozenset({"mesh", "mesh.api", "mesh.hookspecs"})

#: Offences known and accepted for now, as (module, rule): each names the issue that removes it.
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One imported module as a module of the tree sees it: ``target`` is a module, ``name`` the imported name."""

    module: str
    path: str
    line: int
    target: str
    name: str | None = None


@dataclass(frozen=True)
class Offence:
    """A broken rule, with the module and line that break it."""

    path: str
    line: int
    rule: str
    what: str
    module: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.what}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (a package named ``root.name``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(root: Path) -> list[Import]:
    """Every import of every module under ``root``, resolved to module names (relative ones too)."""
    modules = module_names(root)
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root.parent))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            found.extend(_resolve(node, module, is_package, rel, modules))
    return found


def _resolve(node: ast.AST, module: str, is_package: bool, rel: str, modules: dict) -> Iterator[Import]:
    """The :class:`Import` records of one ``import`` node (none for other nodes)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield Import(module, rel, node.lineno, alias.name)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in modules:
                yield Import(module, rel, node.lineno, submodule)
            else:
                yield Import(module, rel, node.lineno, base, alias.name)


def _under(name: str, prefix: str) -> bool:
    """Whether dotted ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def package_of(module: str) -> str:
    """The layer a module belongs to: ``mesh.proxy.codec.heads`` -> ``mesh.proxy``; ``mesh.api`` -> itself."""
    return ".".join(module.split(".")[:2])


def check(root: Path) -> list[Offence]:
    """Every offence against the layering rules in the tree under ``root``, in file and line order."""
    internal = [imp for imp in imports_of(root) if _under(imp.target, root.name)]
    offences = {*_rule_offences(internal), *_surface_offences(root, internal), *_private_offences(internal),
                *_cycle_offences(internal)}
    return sorted(offences, key=lambda o: (o.path, o.line, o.rule, o.what))


def _rule_offences(imports: Iterable[Import]) -> Iterator[Offence]:
    """Imports that go against one of :data:`RULES`."""
    for imp in imports:
        for rule in RULES:
            if _under(imp.module, rule.source) and not _under(imp.target, imp.module):
                if any(_under(imp.target, bad) and not _inside(imp.module, bad) for bad in rule.forbidden):
                    yield Offence(imp.path, imp.line, rule.name,
                                  f"{imp.module} imports {imp.target}: {rule.why}", imp.module)


def _inside(module: str, package: str) -> bool:
    """Whether ``module`` is inside the (sub)package ``package``, whose own modules may import each other."""
    return "." in package and _under(module, package)


def _surface_offences(root: Path, imports: Iterable[Import]) -> Iterator[Offence]:
    """Internal imports of the plugin surface beyond :data:`PLUGIN_SURFACE_MAY_IMPORT` that it does not document."""
    for imp in imports:
        if imp.module in PLUGIN_SURFACE and imp.target not in PLUGIN_SURFACE_MAY_IMPORT:
            documented = _documentation(root.parent / imp.path)
            if imp.target not in documented and imp.target.replace(".", "/") + ".py" not in documented:
                yield Offence(imp.path, imp.line, "plugin-surface-closed",
                              f"{imp.module} imports {imp.target}, which it does not document: plugins see "
                              "only mesh.api, mesh.hookspecs and what they document as re-exported", imp.module)


def _documentation(path: Path) -> str:
    """The module docstring and the comments of a source file, joined."""
    source = path.read_text()
    comments = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT]
    return "\n".join([ast.get_docstring(ast.parse(source)) or "", *comments])


def _private_offences(imports: Iterable[Import]) -> Iterator[Offence]:
    """Imports of a ``_private`` name or module that belongs to another package."""
    for imp in imports:
        dotted = imp.target + (f".{imp.name}" if imp.name else "")
        private = [part for part in dotted.split(".") if part.startswith("_") and not part.startswith("__")]
        if private and package_of(imp.target) != package_of(imp.module):
            yield Offence(imp.path, imp.line, "no-private-across-packages",
                          f"{imp.module} imports {dotted}, private to {package_of(imp.target)}: "
                          "make it public (rename) or keep its use inside its package", imp.module)


def _cycle_offences(imports: Iterable[Import]) -> Iterator[Offence]:
    """One offence per package cycle, naming an import for every edge of it."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        src, dst = package_of(imp.module), package_of(imp.target)
        if src != dst and dst != "mesh":  # the package root (hookimpl, __version__) imports nothing of mesh
            edges.setdefault(src, {}).setdefault(dst, imp)
    for cycle in _cycles(edges):
        hops = [edges[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        path = " -> ".join(f"{hop.module} ({hop.path}:{hop.line})" for hop in hops)
        first = hops[0]
        yield Offence(first.path, first.line, "no-package-cycles",
                      f"packages import each other: {path} -> {package_of(first.module)}", first.module)


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """A shortest cycle through each package of each strongly connected group (Tarjan, then BFS), no repeats."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    cycles = {}
    for group in groups:
        for start in sorted(group):
            cycle = _shortest_cycle(start, group, edges)
            first = cycle.index(min(cycle))
            cycles.setdefault(tuple(cycle[first:] + cycle[:first]), None)
    return [list(cycle) for cycle in cycles]


def _shortest_cycle(start: str, group: set[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """The shortest path from ``start`` back to itself inside ``group``, as its list of nodes."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    return paths[node]
                if nxt in group and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle of {sorted(group)} but no path leads back")


# -- the tests ------------------------------------------------------------------------------------------------------


def test_mesh_keeps_its_layering():
    """The tree under mesh/ breaks no rule (apart from :data:`KNOWN_EXCEPTIONS`)."""
    offences = [o for o in check(MESH) if (o.module, o.rule) not in KNOWN_EXCEPTIONS]
    assert not offences, "layering broken (docs/architecture.md, 'Packages and layering'):\n" + "\n".join(
        map(str, offences))


def test_known_exceptions_still_happen():
    """An exception that no longer occurs is removed from :data:`KNOWN_EXCEPTIONS`, so the rule holds again."""
    happening = {(o.module, o.rule) for o in check(MESH)}
    assert KNOWN_EXCEPTIONS <= happening, f"fixed, remove from KNOWN_EXCEPTIONS: {KNOWN_EXCEPTIONS - happening}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake ``mesh`` package under ``tmp_path``: relative path -> source; every directory is a package."""
    root = tmp_path / "mesh"
    for rel, source in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == tmp_path:
                break
            (parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return root


def _found(root: Path) -> set[tuple[str, int, str]]:
    return {(o.path, o.line, o.rule) for o in check(root)}


def test_a_forbidden_import_is_named_with_module_line_and_rule(tmp_path):
    root = _tree(tmp_path, {
        "proxy/service.py": "import os\nfrom mesh.control.kube import client\n",
        "control/kube/client.py": "",
        "telemetry/health.py": """\
            def pool_size(pool):
                from mesh.proxy.pool import ConnectionPool  # inside a function still counts
                return isinstance(pool, ConnectionPool)
            """,
        "proxy/pool.py": "ConnectionPool = object\n",
        "config/compile.py": "from ..identity import spiffe\n",
        "identity/spiffe.py": "",
    })
    offences = check(root)
    assert {(o.path, o.line, o.rule) for o in offences} == {
        ("mesh/proxy/service.py", 2, "proxy-no-control"),
        ("mesh/telemetry/health.py", 2, "telemetry-no-proxy"),
        ("mesh/config/compile.py", 1, "config-is-a-leaf"),
    }
    assert "mesh/proxy/service.py:2: [proxy-no-control] mesh.proxy.service imports mesh.control.kube.client" \
        in "\n".join(map(str, offences))


def test_private_names_across_packages_but_not_inside_one(tmp_path):
    root = _tree(tmp_path, {
        "config/compile.py": "_exported = 1\n",
        "config/analyze.py": "from mesh.config.compile import _exported\n",
        "control/distribution.py": "from mesh.config.compile import _exported\nfrom mesh.config import _helpers\n",
        "config/_helpers.py": "",
    })
    assert _found(root) == {("mesh/control/distribution.py", 1, "no-private-across-packages"),
                            ("mesh/control/distribution.py", 2, "no-private-across-packages")}


def test_plugin_surface_and_neutral_modules(tmp_path):
    root = _tree(tmp_path, {
        "api.py": """\
            from mesh import hookimpl
            from mesh.hookspecs import API_VERSION
            from mesh.proxy import context
            from mesh.config.tables import Table  # re-exported from mesh/config/tables.py
            """,
        "hookspecs.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mesh.config import tables\n",
        "protocol.py": "from mesh.proxy import context\n",
        "sidecar_contract.py": "from mesh.config import tables\n",
        "proxy/context.py": "",
        "config/tables.py": "",
        "control/service.py": "from mesh.builtin import ca\n",
        "builtin/ca.py": "",
    })
    assert _found(root) == {("mesh/api.py", 3, "plugin-surface-closed"),
                            ("mesh/hookspecs.py", 3, "plugin-surface-closed"),
                            ("mesh/protocol.py", 1, "protocol-neutral"),
                            ("mesh/sidecar_contract.py", 1, "contract-neutral"),
                            ("mesh/control/service.py", 1, "control-ca-is-a-plugin")}


def test_package_cycles_are_found_with_every_edge(tmp_path):
    root = _tree(tmp_path, {
        "control/service.py": "from mesh.builtin import sources\n",
        "builtin/sources.py": "def make():\n    from mesh.control.store import Store\n",
        "control/store.py": "Store = object\n",
        "cli/main.py": "from mesh.control import service\n",
    })
    offences = check(root)
    assert [(o.path, o.line, o.rule) for o in offences] == [("mesh/builtin/sources.py", 2, "no-package-cycles")]
    assert "mesh.builtin.sources (mesh/builtin/sources.py:2) -> mesh.control.service (mesh/control/service.py:1)" \
        in offences[0].what


if __name__ == "__main__":  # python tests/unit/test_layering.py [PATH/TO/mesh]: the offences of any tree
    import sys

    found = check(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else MESH)
    print("\n".join(map(str, found)) or "no offence")
    sys.exit(1 if found else 0)
