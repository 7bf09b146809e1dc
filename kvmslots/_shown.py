"""Bad input, shown in an error message: bounded in length, and never failing itself.

``repr()`` of a value a caller or QEMU handed over can raise: an int of more than
4300 digits raises ValueError (Python's integer-string limit), nesting deeper than
the recursion limit raises RecursionError.  It can also be megabytes long.  Error
messages show input through :func:`shown` instead, so that reporting a malformed
value can never turn a typed error into a ``ValueError`` of its own.
"""

from __future__ import annotations

import reprlib

__all__ = ["shown"]

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = 60
_SHORT.maxother = 60


def shown(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to at most *limit* characters; a placeholder where repr() fails."""
    if isinstance(value, int) and value.bit_length() > 4096:
        return f"<int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # RecursionError, ValueError (a huge int inside), a broken __repr__
        try:
            text = _SHORT.repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
