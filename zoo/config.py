"""Checks every family's config dataclass runs in ``__post_init__``, so a bad value — from Python, a YAML
config or a ``config.json`` from disk or the Hub — fails before anything is allocated, with a message that
names the field, says what it got and what is accepted.

The field types come from the dataclass annotations (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[int, ...]``, ``dict``): a field annotated ``int`` refuses ``1e9`` (a float), ``"64"`` and ``True``; a
``float`` field accepts ints. JSON lists are accepted for tuple fields (and turned into tuples).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable


def _allowed(annotation) -> tuple[type, ...]:
    """The runtime types a field annotation accepts (``None`` as ``type(None)``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed(arg))
    if annotation is type(None) or annotation is None:
        return (type(None),)
    if origin is not None:
        return (origin,)
    return (annotation,)


def _accepts(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, never to a config
        return bool in allowed
    if float in allowed and isinstance(value, int):
        return True
    if tuple in allowed and isinstance(value, list):
        return True
    return isinstance(value, allowed)


def _type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in allowed)


def check_config_types(config) -> None:
    """Every field of the dataclass ``config`` has a value of its annotated type; lists become tuples for
    tuple fields; floats must be finite."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, allowed = getattr(config, f.name), _allowed(hints[f.name])
        if not _accepts(value, allowed):
            raise ValueError(f"{type(config).__name__}.{f.name} must be {_type_name(allowed)}, "
                             f"got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be finite, got {value!r}")
        if isinstance(value, list) and tuple in allowed:
            setattr(config, f.name, tuple(value))


def check_positive(config, names: Iterable[str], *, least: int | float = 1) -> None:
    """Each named field (when not None) is at least ``least``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < least:
            raise ValueError(f"{type(config).__name__}.{name} must be >= {least}, got {value!r}")


def check_choice(config, name: str, choices: Iterable[str]) -> None:
    value, choices = getattr(config, name), tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r} ({type(config).__name__}.{name}); accepted: {', '.join(choices)}")
