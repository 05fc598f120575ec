"""``meshctl token create``: a join token for a sidecar outside Kubernetes."""

from __future__ import annotations

import os
import sys

from mesh.config.fields import parse_duration
from mesh.identity.tokens import TOKEN_KEY, create_token, load_or_create_key


def add_parser(subparsers):
    parser = subparsers.add_parser("token", help="bootstrap credentials for sidecars")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="print a join token bound to a namespace and service account")
    create.add_argument("--state-dir", required=True, help="the control plane's --state-dir")
    create.add_argument("--namespace", required=True)
    create.add_argument("--service-account", required=True)
    create.add_argument("--trust-domain", default="cluster.local")
    create.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h (default 1h)")
    create.set_defaults(func=run_create)


def run_create(args) -> int:
    if not os.path.exists(os.path.join(args.state_dir, TOKEN_KEY)):
        print(f"meshctl: {args.state_dir} has no {TOKEN_KEY}; start `twistd mesh-control --state-dir "
              f"{args.state_dir}` once first, or pass the right --state-dir", file=sys.stderr)
        return 1
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as error:
        print(f"meshctl: --ttl: {error}", file=sys.stderr)
        return 2
    key = load_or_create_key(args.state_dir)
    print(create_token(key, args.namespace, args.service_account, args.trust_domain, ttl))
    return 0
