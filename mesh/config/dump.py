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
    }


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
        "endpoints": [{"address": endpoint.address, "port": endpoint.port, "weight": endpoint.weight,
                       "labels": dict(endpoint.labels), "identity": endpoint.identity}
                      for endpoint in spec.endpoints],
    }
