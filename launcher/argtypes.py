"""argparse types for the command line: a bad value is a one-line usage error, not a traceback."""

from __future__ import annotations

import argparse


def _number(kind, text: str, what: str, ok) -> int | float:
    try:
        x = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
    return x


def positive_int(text: str) -> int:
    return _number(int, text, "at least 1", lambda x: x >= 1)


def non_negative_int(text: str) -> int:
    return _number(int, text, "0 or more", lambda x: x >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "above 0", lambda x: x > 0)


def non_negative_float(text: str) -> float:
    return _number(float, text, "0 or more", lambda x: x >= 0)


def port(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    return _number(int, text, "a port, 0 to 65535", lambda x: 0 <= x <= 65535)


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    return _number(float, text, "above 0 and at most 1", lambda x: 0 < x <= 1)


def pair(kind, sep: str, names: str):
    """"A<sep>B" of two positive numbers, e.g. pair(int, "/", "IN/OUT") for "2048/128"."""
    def parse(text: str) -> tuple:
        a, found, b = text.partition(sep)
        try:
            x, y = kind(a), kind(b)
        except ValueError:
            x = y = None
        if not found or x is None or x <= 0 or y <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {names}, two positive numbers")
        return x, y
    return parse
