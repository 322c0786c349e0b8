"""Argument types shared by the ``ctscreen`` subcommands (argparse ``type=`` callables).

Each raises ``argparse.ArgumentTypeError`` so argparse prints one line naming the option.

>>> positive(int)("3"), positive(float)("0.5"), positive_list(int)("1,4")
(3, 0.5, [1, 4])
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def _noun(kind: Callable[[str], object]) -> str:
    return "an integer" if kind is int else "a number"


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """A parser of one number of ``kind`` (int or float) that must be > 0."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_noun(kind)}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value

    return parse


def positive_list(kind: Callable[[str], N], what: str | None = None) -> Callable[[str], list[N]]:
    """A parser of a non-empty comma-separated list of ``kind`` values, each > 0.

    ``what`` names the values in messages (default: integers or numbers).
    """
    what = what or ("integers" if kind is int else "numbers")

    def parse(text: str) -> list[N]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return values

    return parse
