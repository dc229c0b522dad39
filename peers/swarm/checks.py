"""Checks of the values a peer is sent, shared by every message it reads."""

import math


def finite_number(value) -> bool:
    """Whether a JSON value is a finite int or float (a bool is not a number here, and an
    integer too large for a float is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
