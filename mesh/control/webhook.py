"""The sidecar-injection admission webhook (AdmissionReview v1), as a twisted.web resource.

``POST /inject`` with an ``admission.k8s.io/v1`` AdmissionReview whose request
is a Pod CREATE answers with the same review carrying a response:
``allowed: true`` always (injection never blocks a pod), plus a base64
``JSONPatch`` (RFC 6902) that turns the pod into what ``meshctl inject`` makes
of it (:mod:`mesh.control.inject`).  Pods that opt out (``sidecar.istio.io/inject:
"false"``), pods already injected, ``hostNetwork`` pods, other resources and
other operations get no patch.  A pod with a malformed
``traffic.sidecar.istio.io/*`` annotation is admitted without a sidecar and
with a warning that says what to fix.  A body that is not an AdmissionReview
gets ``400`` with the reason; one larger than :data:`MAX_BODY`, ``413``.

``twistd mesh-control --webhook-port 15017`` serves it over TLS
(:mod:`mesh.control.injector`).  See docs/kubernetes.md.
"""

from __future__ import annotations

import base64
import json

from twisted.web import resource

from mesh.control.inject.jsonpatch import diff
from mesh.control.inject.sidecar import InjectError, InjectSettings, inject_pod, skip_reason
from mesh.webpages import LimitedSite, SiteLimits

API_VERSION = "admission.k8s.io/v1"
MAX_BODY = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects
#: The API server keeps connections to webhooks open (Go's default: 90 s idle) and calls them with a
#: timeout of at most 30 s (``timeoutSeconds``); a request must arrive well within that.
LIMITS = SiteLimits(max_connections=256, max_request_bytes=MAX_BODY + 64 * 1024, request_timeout=30.0,
                    idle_timeout=90.0)


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


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except ValueError as error:
        raise MalformedReview(f"the body is not JSON: {error}") from None


class InjectionWebhook(resource.Resource):
    """``POST`` an AdmissionReview, get one back (see the module docstring)."""

    isLeaf = True

    def __init__(self, settings: InjectSettings = InjectSettings()):
        super().__init__()
        self.settings = settings

    def render_POST(self, request):
        body = request.content.read()  # at most LIMITS.max_request_bytes: the site cuts larger requests (413)
        try:
            answer = review_response(_parse_json(body), self.settings)
        except MalformedReview as error:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": str(error)}).encode() + b"\n"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode()


def webhook_site(settings: InjectSettings = InjectSettings(), reactor=None) -> LimitedSite:
    """A Site serving the webhook at ``/inject`` (and ``/healthz``, 200 ``ok``, for the kubelet's probes)."""
    root = resource.Resource()
    root.putChild(b"inject", InjectionWebhook(settings))
    health = resource.Resource()
    health.isLeaf = True
    health.render_GET = lambda request: b"ok\n"
    root.putChild(b"healthz", health)
    return LimitedSite(root, LIMITS, reactor=reactor)
