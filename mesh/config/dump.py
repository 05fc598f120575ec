"""JSON-ready descriptions of compiled tables, for the admin ``/config_dump``."""

from __future__ import annotations

import dataclasses


def _text(value):
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _header_ops(ops):
    if ops is None:
        return None
    return {"set": {_text(name): _text(value) for name, value in ops.set},
            "add": {_text(name): _text(value) for name, value in ops.add},
            "remove": [_text(name) for name in ops.remove]}


def describe_action(action) -> dict:
    """A :class:`~mesh.config.tables.RouteAction` as plain JSON values."""
    weights, previous = [], 0
    for total in action.cumulative_weights:
        weights.append(total - previous)
        previous = total
    retry = action.retry
    return {
        "name": action.name,
        "clusters": [{"name": name, "weight": weight} for name, weight in zip(action.clusters, weights)],
        "timeout": action.timeout,
        "retry": None if retry is None else {
            "attempts": retry.attempts, "per_try_timeout": retry.per_try_timeout,
            "retry_on": sorted(retry.retry_on), "retry_status_codes": sorted(retry.retry_status_codes)},
        "rewrite": None if action.rewrite_prefix is None and action.rewrite_authority is None else {
            "prefix": _text(action.rewrite_prefix), "strip": action.rewrite_strip,
            "authority": _text(action.rewrite_authority)},
        "request_headers": _header_ops(action.request_headers),
        "response_headers": _header_ops(action.response_headers),
        **(_describe_extras(action.extras) if action.extras is not None else {}),
    }


def _describe_extras(extras) -> dict:
    """The parts of a :class:`~mesh.config.route_extras.RouteExtras` that are set."""
    out = {}
    fault = extras.fault
    if fault is not None:
        out["fault"] = {"delay": fault.delay, "delay_percent": fault.delay_fraction * 100,
                        "abort_http_status": fault.abort_status, "abort_grpc_status": fault.abort_grpc,
                        "abort_percent": fault.abort_fraction * 100}
    redirect = extras.redirect
    if redirect is not None:
        out["redirect"] = {"status": redirect.status, "scheme": _text(redirect.scheme),
                           "authority": _text(redirect.authority), "port": redirect.port,
                           "port_from_request": redirect.port_from_request, "path": _text(redirect.path)}
    if extras.direct_response is not None:
        out["direct_response"] = {"status": extras.direct_response.status,
                                  "body_bytes": len(extras.direct_response.body)}
    cors = extras.cors
    if cors is not None:
        out["cors"] = {"allow_origins": list(cors.origins), "allow_methods": _text(cors.allow_methods),
                       "allow_headers": _text(cors.allow_headers), "expose_headers": _text(cors.expose_headers),
                       "max_age": _text(cors.max_age), "allow_credentials": cors.allow_credentials,
                       "forward_unmatched_preflights": cors.forward_unmatched_preflights}
    if extras.uri_regex is not None:
        match, rewrite = extras.uri_regex.text
        out["uri_regex_rewrite"] = {"match": match, "rewrite": rewrite}
    if extras.whole_path is not None:
        out["whole_path_rewrite"] = _text(extras.whole_path)
    if extras.by_cluster:
        out["destination_headers"] = {
            name: {"request_headers": _header_ops(variant.request_headers),
                   "response_headers": _header_ops(variant.response_headers),
                   "authority": _text(variant.rewrite_authority)}
            for name, variant in sorted(extras.by_cluster.items())}
    if extras.mirrors:
        out["mirrors"] = [{"cluster": name, "percent": fraction * 100} for name, fraction in extras.mirrors]
    return out


def describe_cluster(spec) -> dict:
    """A :class:`~mesh.config.tables.ClusterSpec` with its endpoints as plain JSON values."""
    return {
        "name": spec.name, "service": spec.service, "port": spec.port, "subset": spec.subset,
        "lb_policy": spec.lb_policy, "hash_on": list(spec.hash_on) if spec.hash_on else None,
        "connect_timeout": spec.connect_timeout,
        "max_requests_per_connection": spec.max_requests_per_connection,
        "idle_timeout": spec.idle_timeout, "outlier": dataclasses.asdict(spec.outlier),
        "protocol": spec.protocol, "upstream_protocol": spec.upstream_protocol,
        "max_concurrent_streams": spec.max_concurrent_streams,
        "limits": dataclasses.asdict(spec.limits) if spec.limits else None, "resolution": spec.resolution,
        "tcp_keepalive": dataclasses.asdict(spec.tcp_keepalive) if spec.tcp_keepalive else None,
        "max_connection_duration": spec.max_connection_duration,
        "endpoints": [_endpoint(endpoint) for endpoint in spec.endpoints],
    }


def _endpoint(endpoint) -> dict:
    """An :class:`~mesh.config.tables.EndpointSpec`; ``tls_origination`` only when the sidecar originates
    TLS to it (:class:`~mesh.config.resources.ClientTLS`)."""
    out = {"address": endpoint.address, "port": endpoint.port, "weight": endpoint.weight,
           "labels": dict(endpoint.labels), "identity": endpoint.identity}
    tls = endpoint.origination
    if tls is not None:
        out["tls_origination"] = {"mode": tls.mode, "sni": tls.sni, "subject_alt_names": list(tls.subject_alt_names),
                                  "ca_certificates": tls.ca_certificates,
                                  "client_certificate": tls.client_certificate,
                                  "insecure_skip_verify": tls.insecure_skip_verify}
    return out
