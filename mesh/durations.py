"""Durations on the command line: Istio's syntax (``24h``, ``20s``, ``1h30m``)."""

import argparse

from twisted.python import usage

from mesh.config.fields import parse_duration


def duration_option(value: str) -> float:
    """Seconds, for ``usage.Options`` coercion; raises UsageError on garbage."""
    try:
        return parse_duration(value)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None


def duration_argument(value: str) -> float:
    """Seconds, for ``argparse`` ``type=`` (meshctl): a bad value is a usage error naming the syntax."""
    try:
        return parse_duration(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
