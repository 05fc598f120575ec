"""The sidecar-injection admission webhook (AdmissionReview v1), as a twisted.web resource.

``POST /inject`` with an ``admission.k8s.io/v1`` AdmissionReview whose request
is a Pod CREATE answers with the same review carrying a response:
``allowed: true`` always (injection never blocks a pod), plus a base64
``JSONPatch`` (RFC 6902) that turns the pod into what ``meshctl inject`` makes
of it (:mod:`mesh.inject`).  Pods that opt out (``sidecar.istio.io/inject:
"false"``), pods already injected, ``hostNetwork`` pods, other resources and
other operations get no patch.  A pod with a malformed
``traffic.sidecar.istio.io/*`` annotation is admitted without a sidecar and
with a warning that says what to fix.  A body that is not an AdmissionReview
gets ``400`` with the reason.

Not wired into ``twistd mesh-control`` yet: run it on its own with
``python -m mesh.control.webhook --tls-cert CERT --tls-key KEY`` (port 15017),
as deploy/base/control-plane does.  See docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from twisted.web import resource

from mesh.inject.jsonpatch import diff
from mesh.inject.sidecar import InjectError, InjectSettings, inject_pod, skip_reason
from mesh.webpages import QuietSite

API_VERSION = "admission.k8s.io/v1"
MAX_BODY = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview v1 this webhook can answer."""


def review_response(review, settings: InjectSettings = InjectSettings()) -> dict:
    """The AdmissionReview to send back for ``review`` (a parsed request body)."""
    if not isinstance(review, dict):
        raise MalformedReview("the body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise MalformedReview(f"expected apiVersion {API_VERSION} kind AdmissionReview, got apiVersion "
                              f"{review.get('apiVersion')!r} kind {review.get('kind')!r}; set the webhook's "
                              "admissionReviewVersions to [v1]")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise MalformedReview("request.uid is missing")
    response = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    kind = request.get("kind") or {}
    if (not isinstance(kind, dict) or kind.get("kind") != "Pod" or kind.get("group", "") != ""
            or request.get("operation", "CREATE") != "CREATE" or request.get("subResource")):
        return answer
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise MalformedReview("request.object is not a Pod (no spec)")
    if skip_reason(pod):
        return answer
    metadata = pod.get("metadata") or {}
    fallback = metadata.get("name") or (metadata.get("generateName") or "").rstrip("-") or None
    try:
        injected = inject_pod(pod, settings, fallback_name=fallback)
    except InjectError as error:
        response["warnings"] = [f"txmesh: no sidecar injected: {error}"]
        return answer
    patch = diff(pod, injected)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode("ascii")
    return answer


class InjectionWebhook(resource.Resource):
    """``POST`` an AdmissionReview, get one back (see the module docstring)."""

    isLeaf = True

    def __init__(self, settings: InjectSettings = InjectSettings()):
        super().__init__()
        self.settings = settings

    def render_POST(self, request):
        body = request.content.read(MAX_BODY + 1)
        try:
            if len(body) > MAX_BODY:
                raise MalformedReview(f"the body is larger than {MAX_BODY} bytes")
            try:
                review = json.loads(body)
            except ValueError as error:
                raise MalformedReview(f"the body is not JSON: {error}") from None
            answer = review_response(review, self.settings)
        except MalformedReview as error:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": str(error)}).encode() + b"\n"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode()


def webhook_site(settings: InjectSettings = InjectSettings()) -> QuietSite:
    """A Site serving the webhook at ``/inject`` (and ``/healthz``, 200 ``ok``, for probes)."""
    root = resource.Resource()
    root.putChild(b"inject", InjectionWebhook(settings))
    health = resource.Resource()
    health.isLeaf = True
    health.render_GET = lambda request: b"ok\n"
    root.putChild(b"healthz", health)
    return QuietSite(root, timeout=30)


def main(argv=None) -> int:
    """``python -m mesh.control.webhook``: serve the webhook on its own (TLS, or plain HTTP for tests)."""
    from twisted.internet import endpoints, reactor
    from twisted.python import log

    defaults = InjectSettings()
    parser = argparse.ArgumentParser(prog="python -m mesh.control.webhook",
                                     description="Serve txmesh's sidecar-injection admission webhook.")
    parser.add_argument("--port", type=int, default=15017)
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--tls-cert", help="PEM certificate (chain) of the webhook's Service name")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--plaintext", action="store_true", help="serve HTTP without TLS (tests only: the "
                                                                 "API server calls webhooks over HTTPS)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--image", default=defaults.image)
    parser.add_argument("--control", default=defaults.control)
    parser.add_argument("--trust-domain", default=defaults.trust_domain)
    parser.add_argument("--probe", choices=("exec", "http"), default=defaults.probe)
    args = parser.parse_args(argv)
    if not args.plaintext and not (args.tls_cert and args.tls_key):
        parser.error("--tls-cert and --tls-key are required (or --plaintext, for tests)")
    settings = InjectSettings(image=args.image, control=args.control, trust_domain=args.trust_domain,
                              probe=args.probe)
    interface = args.address.replace(":", "\\:")
    if args.plaintext:
        description = f"tcp:{args.port}:interface={interface}"
    else:
        description = (f"ssl:{args.port}:interface={interface}:privateKey={args.tls_key}"
                       f":certKey={args.tls_cert}")
    log.startLogging(sys.stdout)

    def listening(port):
        bound = port.getHost().port
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as handle:
                handle.write(f"{bound}\n")
            os.replace(args.port_file + ".tmp", args.port_file)
        log.msg(f"txmesh injection webhook on {args.address}:{bound} ({'http' if args.plaintext else 'https'})")

    def failed(failure):
        log.err(failure, "cannot listen")
        reactor.stop()

    endpoints.serverFromString(reactor, description).listen(webhook_site(settings)).addCallbacks(listening, failed)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
