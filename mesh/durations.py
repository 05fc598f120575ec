"""Durations on the command line: Istio's syntax (``24h``, ``20s``, ``1h30m``)."""

from twisted.python import usage

from mesh.config.fields import parse_duration


def duration_option(value: str) -> float:
    """Seconds, for ``usage.Options`` coercion; raises UsageError on garbage."""
    try:
        return parse_duration(value)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None
