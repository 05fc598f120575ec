"""``meshctl bug-report [--log PATH ...] [-o FILE]``: one archive with what a bug report needs.

Writes a ``.tar.gz`` (mode 0600) holding: ``meshctl check``'s output; the
versions of meshctl, Python, the plugins and every proxy; the control
plane's ``/ready``, ``/proxies``, ``/resources`` (its config dump: every
resource in force) and ``/metrics``; the ``/ready``, ``/config_dump`` and
``/clusters`` of every sidecar this host can reach (those of ``meshctl run``,
those announcing an admin port, ``--admin``); the local mesh's records,
config directory and logs; and the files given with ``--log`` (a directory
adds its files).

Secrets are redacted from every file before it is archived: PEM private
keys, join tokens and JWTs (service-account tokens), and the values of
Authorization, Proxy-Authorization, Cookie and Set-Cookie headers and of
token, password, secret and API-key fields.  Files that are secrets by their
name (``*key*.pem``, ``*.key``, ``*.token``, ``token-key``) and binary files
are left out, and listed in the archive's ``README.txt``.  Read the archive
before you share it all the same.
"""

from __future__ import annotations

import io
import json
import platform
import re
import sys
import tarfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from mesh import __version__
from mesh.cli import check
from mesh.cli.admin_client import AdminError, fetch_json
from mesh.demo.runner import http_get
from mesh.plugins import describe_plugins, make_plugin_manager

#: Only the end of a larger log file is archived.
MAX_FILE_BYTES = 2 * 1024 * 1024
#: File names that are secrets: never archived.
SECRET_FILE = re.compile(r"(key.*\.pem|\.key|\.token|^token-key)$", re.IGNORECASE)

_REDACTIONS = (
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL),
     "[REDACTED PRIVATE KEY]"),
    # a PEM block cut off (by the size limit, or a log line): BEGIN and the base64 lines after it
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:(?:\r?\n|\\n)[A-Za-z0-9+/=]+(?=\r?\n|\\n|$))*"),
     "[REDACTED PRIVATE KEY]"),
    (re.compile(r"\btxm1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "txm1.[REDACTED JOIN TOKEN]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[REDACTED JWT]"),
    (re.compile(r"(?i)((?:proxy-)?authorization|set-cookie|cookie)([\"']?\s*[:=]\s*[\"']?)[^\"'\r\n]+"),
     r"\1\2[REDACTED]"),
    (re.compile(r"(?i)([\"']?\b(?:token|password|passwd|secret|api[-_]?key|client[-_]?secret)[\"']?\s*[:=]\s*"
                r"[\"']?)(?!\[REDACTED)[^\"'\s,}&]+"), r"\1[REDACTED]"),
)


def redact(text: str) -> str:
    """*text* with private keys, tokens, credentials in headers and secret-looking fields replaced."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def add_parser(subparsers):
    parser = subparsers.add_parser("bug-report", help="one archive with config dumps, logs, versions and checks "
                                                      "(secrets redacted)",
                                   description=__doc__.split("\n\n")[1])
    check.add_target_options(parser)
    parser.add_argument("--log", action="append", default=[], type=Path, metavar="PATH",
                        help="a log file or directory to include (repeatable), e.g. a sidecar's --access-log")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="the archive to write (default: ./txmesh-bug-report-TIMESTAMP.tar.gz)")
    parser.set_defaults(func=run, pre=False)


class Archive:
    """The members of the report, redacted as they are added, and what was left out and why."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.members = {}
        self.left_out = []

    def add_text(self, name: str, text: str) -> None:
        self.members[f"{self.prefix}/{name}"] = redact(text).encode("utf-8")

    def add_json(self, name: str, document) -> None:
        self.add_text(name, json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")

    def add_file(self, name: str, path: Path) -> None:
        if SECRET_FILE.search(path.name):
            self.left_out.append(f"{path}: a secret by its name")
            return
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(max(0, size - MAX_FILE_BYTES))
                data = handle.read()
        except OSError as error:
            self.left_out.append(f"{path}: {error.strerror}")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.left_out.append(f"{path}: binary")
            return
        if size > MAX_FILE_BYTES:
            text = f"[first {size - MAX_FILE_BYTES} bytes left out]\n" + text.split("\n", 1)[-1]
        self.add_text(name, text)

    def add_tree(self, name: str, path: Path) -> None:
        """A file, or every file under a directory."""
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                self.add_file(f"{name}/{child.relative_to(path)}", child)
        elif path.exists():
            self.add_file(name, path)
        else:
            self.left_out.append(f"{path}: does not exist")

    def write(self, path: Path) -> None:
        """The gzipped tar, created 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as raw:
            path.chmod(0o600)
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name, data in sorted(self.members.items()):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                    tar.addfile(info, io.BytesIO(data))


def run(args) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or Path(f"txmesh-bug-report-{stamp}.tar.gz")
    if output.exists():
        print(f"meshctl bug-report: {output} exists; give another -o FILE or remove it", file=sys.stderr)
        return 1
    archive = Archive(f"txmesh-bug-report-{stamp}")
    target = check.Target(args)
    checks_out = io.StringIO()
    with redirect_stdout(checks_out):
        check.run(args)
    archive.add_text("check.txt", checks_out.getvalue())
    proxies = _control_plane(archive, target)
    _sidecars(archive, target, proxies)
    _local(archive, target)
    for path in args.log:
        archive.add_tree(f"logs/given/{path.name or 'log'}", path)
    archive.add_json("versions.json", _versions(proxies))
    archive.add_text("README.txt", _readme(archive))
    try:
        archive.write(output)
    except OSError as error:
        print(f"meshctl bug-report: cannot write {output}: {error.strerror}; give a writable -o FILE",
              file=sys.stderr)
        return 1
    print(f"Wrote {output} ({len(archive.members)} files; secrets redacted, {len(archive.left_out)} file(s) left "
          "out, see its README.txt). Read it before you share it.")
    return 0


def _control_plane(archive: Archive, target: check.Target) -> list:
    """The control plane's admin pages; returns its ``/proxies`` rows."""
    host, port = target.control_admin
    proxies = []
    for page in ("ready", "proxies", "resources"):
        try:
            document = fetch_json(host, port, f"/{page}", "the control plane's admin port", "")
        except AdminError as error:
            archive.left_out.append(f"control plane /{page}: {error}")
            continue
        archive.add_json(f"control/{page}.json", document)
        if page == "proxies":
            proxies = document.get("proxies", []) if isinstance(document, dict) else document
    try:
        archive.add_text("control/metrics.txt", http_get(host, port, "/metrics", timeout=check.TIMEOUT).body.decode())
    except OSError as error:
        archive.left_out.append(f"control plane /metrics: {error}")
    return proxies


def _sidecars(archive: Archive, target: check.Target, proxies) -> None:
    for name, admin in sorted(check.proxy_admins(target, proxies).items()):
        for page in ("ready", "config_dump", "clusters"):
            try:
                reply = http_get(admin.host, admin.port, f"/{page}", timeout=check.TIMEOUT)
            except OSError as error:
                archive.left_out.append(f"proxy {name} /{page}: {error}")
                continue
            archive.add_text(f"proxies/{_safe(name)}/{page}.json", reply.body.decode("utf-8", "replace"))


def _local(archive: Archive, target: check.Target) -> None:
    """The local mesh of ``meshctl up``: records, config directory, logs."""
    mesh = target.mesh
    if mesh.up_path.exists():
        archive.add_file("local/up.json", mesh.up_path)
    if mesh.runs_dir.is_dir():
        archive.add_tree("local/runs", mesh.runs_dir)
    if target.local is not None:
        archive.add_tree("local/config", Path(target.local["config_dir"]))
    if mesh.log_dir.is_dir():
        archive.add_tree("logs/local", mesh.log_dir)


def _versions(proxies) -> dict:
    plugins = [{"name": name, "origin": origin, "hooks": hooks}
               for name, origin, hooks in describe_plugins(make_plugin_manager())]
    return {"meshctl": __version__, "python": sys.version, "platform": platform.platform(), "plugins": plugins,
            "proxies": {row.get("node"): row.get("proxy_version") for row in proxies}}


def _readme(archive: Archive) -> str:
    lines = [f"txmesh bug report, {time.strftime('%Y-%m-%d %H:%M:%S %z')}, meshctl {__version__}",
             "",
             "Secrets were redacted from every file (private keys, join tokens, JWTs, Authorization and cookie",
             "headers, token/password/secret fields); secret files and binary files were left out.", ""]
    lines += ["Left out:", *(f"  {item}" for item in archive.left_out)] if archive.left_out else ["Left out: nothing"]
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
