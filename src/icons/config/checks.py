"""The checks every schema field uses, and the errors they raise.

A check raises :class:`FieldError` naming the field relative to its dataclass; ``validate``
adds the dotted prefix, so every message is one line naming the full key::

    config error: selection.ratio=1.5 must be in (0, 1]
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import ListConfig

class ConfigError(ValueError):
    """A bad config. ``str(err)`` is one line: ``config error: <key>=<value> <reason>``."""


class FieldError(ValueError):
    """Raised by ``__post_init__``; :func:`validate` adds the dotted prefix.

    ``key`` is the field name relative to the dataclass that raised (or a
    tuple of names for a check over several fields). ``reason`` may contain
    ``{prefix}`` to name other fields of the same node.
    """

    def __init__(self, key: str | tuple[str, ...], value: Any = None, reason: str | None = None):
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(self.render(""))

    def render(self, prefix: str) -> str:
        if self.reason is None:  # re-raised by OmegaConf with a single message argument
            return str(self.key)
        keys = (self.key,) if isinstance(self.key, str) else self.key
        name = "+".join(f"{prefix}{k}" for k in keys)
        reason = self.reason.replace("{prefix}", prefix)
        return f"config error: {name}={_fmt(self.value)} {reason}"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("\n", "\\n")


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"must be {'>' if lo_open else '>='} {_bound(lo)}"
    assert hi is not None
    return f"must be {'<' if hi_open else '<='} {_bound(hi)}"


def _unresolved(value: Any) -> bool:
    """True for an interpolation string such as ``${oc.env:X}``.

    Hydra's ConfigStore builds every schema from its defaults without resolving
    them; the checks run again on resolved values in :func:`validate`.
    """
    return isinstance(value, str) and "${" in value


def _numbers(obj: Any, *names: str) -> bool:
    """True when every named field holds a (resolved) number."""
    return all(
        isinstance(getattr(obj, n), (int, float)) and not isinstance(getattr(obj, n), bool)
        for n in names
    )


def _check_range(
    obj: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    value = getattr(obj, name)
    if _unresolved(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, value, "must be a number")
    ok = not (isinstance(value, float) and math.isnan(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise FieldError(name, value, _interval(lo, hi, lo_open, hi_open))


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        _check_range(obj, name, 0, None, lo_open=True)


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        _check_range(obj, name, 0, None)


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if _unresolved(value):
        return
    if value not in choices:
        raise FieldError(name, value, f"must be one of {', '.join(choices)}")


def _check_nonempty_str(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, str) or not value.strip():
            raise FieldError(name, value, "must be a non-empty string")


def _check_str_list(obj: Any, name: str, *, nonempty: bool = True, unique: bool = True) -> None:
    values = list(getattr(obj, name))
    if nonempty and not values:
        raise FieldError(name, values, "must not be empty")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise FieldError(name, values, f"contains an empty name {_fmt(v)!r}")
    if unique:
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise FieldError(name, values, f"lists {v!r} twice")
            seen.add(v)

