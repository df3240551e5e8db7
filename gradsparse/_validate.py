"""Checks for constructor arguments: each names the argument and says what to pass.

A value of the wrong type raises :class:`~gradsparse.errors.ConfigTypeError`
(a ``TypeError`` and an ``InvalidConfigError``); a value of the right type out
of range raises :class:`~gradsparse.errors.InvalidConfigError` (a ``ValueError``).
Numbers are ``numbers.Real`` / ``numbers.Integral`` (Python and numpy scalars),
never ``bool``; booleans are ``bool`` or ``numpy.bool_``.

Example::

    >>> from gradsparse._validate import real
    >>> real(0.5, "ratio", low=0, high=1, low_open=True)
    0.5
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Set

from .errors import ConfigTypeError, InvalidConfigError


def _got(value) -> str:
    """How a refused value is shown: its type and a short repr, or the class it is."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_bool(value) -> bool:
    numpy = sys.modules.get("numpy")  # numpy is never imported here: if it is not loaded, no numpy.bool_ exists
    return isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))


def _num(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def real(value, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
         allow_none: bool = False) -> float | None:
    """``value`` as a finite float within the bounds (``None`` passes with ``allow_none``).

    >>> real(0.9, "momentum", low=0, high=1, high_open=True)
    0.9
    >>> real("0.9", "momentum", low=0, high=1, high_open=True)
    Traceback (most recent call last):
    ...
    gradsparse.errors.ConfigTypeError: momentum must be a finite number in [0, 1), got str '0.9'
    """
    if value is None and allow_none:
        return None
    wanted = f"a finite number{_bounds(low, high, low_open, high_open)}{' or None' if allow_none else ''}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name} must be {wanted}, got {_got(value)}")
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        raise InvalidConfigError(f"{name} must be {wanted}, got {value!r}")
    return number


def integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False) -> int | None:
    """``value`` as an int in ``[minimum, maximum]``; integral floats (``100.0``) pass, ``2.5`` does not.

    >>> import numpy as np
    >>> integer(np.int64(3), "start_iter", minimum=1)
    3
    >>> integer(-1, "history_size", minimum=0)
    Traceback (most recent call last):
    ...
    gradsparse.errors.InvalidConfigError: history_size must be an integer >= 0, got -1
    """
    if value is None and allow_none:
        return None
    wanted = f"an integer{_bounds(minimum, maximum, False, False)}{' or None' if allow_none else ''}"
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer())
    if _is_bool(value) or not integral:
        raise ConfigTypeError(f"{name} must be {wanted}, got {_got(value)}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise InvalidConfigError(f"{name} must be {wanted}, got {value!r}")
    return number


def boolean(value, name: str) -> bool:
    """``value`` as a bool; only ``bool`` and ``numpy.bool_`` pass (``"no"`` would be truthy).

    >>> boolean("no", "nesterov")
    Traceback (most recent call last):
    ...
    gradsparse.errors.ConfigTypeError: nesterov must be True or False, got str 'no'
    """
    if not _is_bool(value):
        raise ConfigTypeError(f"{name} must be True or False, got {_got(value)}")
    return bool(value)


def choice(value, name: str, options: tuple):
    """``value`` if it is one of ``options``; a non-string for string options is a type error.

    >>> choice("sum", "op", ("average", "sum"))
    'sum'
    >>> choice("max", "op", ("average", "sum"))
    Traceback (most recent call last):
    ...
    gradsparse.errors.InvalidConfigError: op must be one of 'average', 'sum', got 'max'
    """
    wanted = ", ".join(repr(o) for o in options)
    if all(isinstance(o, str) for o in options) and not isinstance(value, str):
        raise ConfigTypeError(f"{name} must be one of {wanted}, got {_got(value)}")
    if value not in options:
        raise InvalidConfigError(f"{name} must be one of {wanted}, got {value!r}")
    return value


def instance(value, name: str, cls: type, hint: str, *, allow_none: bool = False):
    """``value`` if it is a ``cls`` instance; a class passed instead of an instance is named as such.

    >>> from gradsparse import Compressor, TopK
    >>> instance(TopK, "compressor", Compressor, "TopK(0.01)")
    Traceback (most recent call last):
    ...
    gradsparse.errors.ConfigTypeError: compressor must be an instance such as TopK(0.01), got the class TopK
    """
    if (value is None and allow_none) or isinstance(value, cls):
        return value
    alternative = " or None" if allow_none else ""
    if isinstance(value, type):
        raise ConfigTypeError(f"{name} must be an instance such as {hint}{alternative}, got {_got(value)}")
    raise ConfigTypeError(f"{name} must be a {cls.__name__} instance such as {hint}{alternative}, got {_got(value)}")


def sequence(value, name: str, hint: str) -> tuple:
    """``value`` (a list, tuple or other sized sequence, never a string) as a tuple.

    >>> sequence([0.5, 0.1], "ratios", "(0.25, 0.0625)")
    (0.5, 0.1)
    >>> sequence(0.25, "ratios", "(0.25, 0.0625)")
    Traceback (most recent call last):
    ...
    gradsparse.errors.ConfigTypeError: ratios must be a sequence such as (0.25, 0.0625), got float 0.25
    """
    is_sequence = hasattr(value, "__len__") and hasattr(value, "__getitem__")
    if isinstance(value, (str, bytes, Mapping, Set)) or not is_sequence:
        raise ConfigTypeError(f"{name} must be a sequence such as {hint}, got {_got(value)}")
    return tuple(value)
