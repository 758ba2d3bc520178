"""Type checks for constructor options, so that a bad value fails at construction with its name.

Hydra passes command-line values through as typed by YAML (``margin=abc`` arrives as the string
``"abc"``), so every policy checks its options' types before using them.

Example::

    >>> real_option("GuidedNegatives", "margin", 0.1)
    0.1
    >>> real_option("GuidedNegatives", "margin", "abc")
    Traceback (most recent call last):
    ...
    TypeError: GuidedNegatives: expected `margin` to be a real number, but got 'abc' (str).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional


def _fail(owner: str, name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{owner}: expected `{name}` to be {expected}, but got {value!r} ({type(value).__name__}).")


def real_option(owner: str, name: str, value: Any, optional: bool = False, finite: bool = True) -> Optional[float]:
    """``value`` as a float (ints accepted); ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(owner, name, "a real number" + (" or None" if optional else ""), value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{owner}: expected a finite `{name}`, but got {value!r}.")
    return float(value)


def int_option(owner: str, name: str, value: Any, minimum: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """``value`` as an int of at least ``minimum``; ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(owner, name, "an integer" + (" or None" if optional else ""), value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: expected `{name}` >= {minimum}, but got {value}.")
    return value


def bool_option(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(owner, name, "true or false", value)
    return value


def str_option(owner: str, name: str, value: Any, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(owner, name, "a non-empty string" + (" or None" if optional else ""), value)
    return value


def path_option(owner: str, name: str, value: Any, optional: bool = True) -> Optional[str]:
    """A file-system path (str or ``os.PathLike``) as a str; ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(owner, name, "a path" + (" or None" if optional else ""), value)
    return str(value)


def str_list_option(owner: str, name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise _fail(owner, name, "a list of column names", value)
    return list(value)
