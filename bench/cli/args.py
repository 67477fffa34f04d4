"""argparse value types shared by the ``bench`` subcommands: each refuses a bad value with what was expected."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return value


def count(text: str) -> int:
    """A whole number, 0 allowed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def positive_seconds(text: str) -> float:
    from pipeline.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 30, 30s or 2m, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 30, 30s or 2m, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 1,2, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, e.g. 1,2, got {text!r}")
    return values


def rate_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected rates separated by commas, e.g. 500,1000,2000, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive rates, e.g. 500,1000,2000, got {text!r}")
    return values


def broker_url(text: str) -> str:
    """A broker URL given on the command line: never with a password, which results.json would keep."""
    from bench.scenario import refuse_url_password

    try:
        refuse_url_password(text, "the scenario's transport.mqtt.password")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
