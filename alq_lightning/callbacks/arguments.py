"""Argument checks of the callbacks: errors name the argument, its value and what is allowed."""
from __future__ import annotations

from typing import Any


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ``ValueError("<name>=<value> is not allowed; expected <allowed>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; expected {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
