"""``meshctl inject -f in.yaml > out.yaml``: add the txmesh sidecar to workloads, offline.

The same injection as the admission webhook (:mod:`mesh.control.webhook`), on
files: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
CronJobs get the sidecar in their pod template; every other document comes out
as it came in.  Injecting twice changes nothing.  See docs/kubernetes.md.
"""

from __future__ import annotations

import sys

import yaml

from mesh.control.inject.sidecar import PROXY_UID, InjectError, InjectSettings, inject_object

_DEFAULTS = InjectSettings()


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "inject", help="add the txmesh sidecar to Kubernetes workloads (offline, like the webhook)",
        description="Read Kubernetes YAML (several documents allowed), print it with the txmesh sidecar "
                    "injected into every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob. "
                    "Honours Istio's annotations sidecar.istio.io/inject: \"false\" and "
                    "traffic.sidecar.istio.io/exclude{Outbound,Inbound}Ports, excludeOutboundIPRanges.")
    parser.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                        help="YAML file to inject, - for stdin (repeatable)")
    parser.add_argument("-o", "--output", default="-", metavar="FILE", help="where to write (default: stdout)")
    parser.add_argument("--image", default=_DEFAULTS.image, help=f"the txmesh image (default {_DEFAULTS.image})")
    parser.add_argument("--image-pull-policy", default=_DEFAULTS.image_pull_policy,
                        choices=("Always", "IfNotPresent", "Never"))
    parser.add_argument("--control", default=_DEFAULTS.control,
                        help=f"HOST:PORT of mesh-control for the sidecars (default {_DEFAULTS.control})")
    parser.add_argument("--trust-domain", default=_DEFAULTS.trust_domain)
    parser.add_argument("--proxy-uid", type=int, default=PROXY_UID,
                        help=f"UID of the proxy, exempt from capture (default {PROXY_UID}, the image's user)")
    parser.add_argument("--datadog", action="store_true",
                        help="add Datadog's Autodiscovery annotations: the agent scrapes the sidecar's metrics "
                             "(OpenMetrics check) and tails its access log (a pod's mesh.txmesh.io/datadog "
                             "annotation decides first)")
    parser.set_defaults(func=run)


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    with open(name, encoding="utf-8") as handle:
        return handle.read()


def run(args) -> int:
    settings = InjectSettings(image=args.image, image_pull_policy=args.image_pull_policy, control=args.control,
                              trust_domain=args.trust_domain, proxy_uid=args.proxy_uid, datadog=args.datadog)
    out, errors = [], []
    for name in args.filename:
        try:
            documents = [doc for doc in yaml.load_all(_read(name), Loader=getattr(yaml, "CSafeLoader",
                                                                                   yaml.SafeLoader))
                         if doc is not None]
        except OSError as error:
            errors.append(f"{name}: cannot read: {error.strerror}")
            continue
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            errors.append(f"{where}: yaml: {getattr(error, 'problem', None) or error}")
            continue
        for doc in documents:
            try:
                out.append(inject_object(doc, settings))
            except InjectError as error:
                errors.append(f"{name}: {error}")
    if errors:
        for error in errors:
            print(f"meshctl inject: {error}", file=sys.stderr)
        print(f"meshctl inject: {len(errors)} error(s); nothing written", file=sys.stderr)
        return 1
    text = dump(out)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """Safe dumper that writes shared objects out in full: no ``&id001`` anchors in manifests."""

    def ignore_aliases(self, data):
        return True


def dump(documents) -> str:
    """Documents as YAML, keys in their order (the input's, then the injector's), separated by ``---``."""
    return yaml.dump_all(documents, sort_keys=False, default_flow_style=False, explicit_start=False,
                              width=120, allow_unicode=True, Dumper=_Dumper)
