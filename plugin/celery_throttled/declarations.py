"""What a task declares, checked once at decoration, and kept consistent across task types.

Every check raises :class:`~.errors.ConfigurationError` naming the task, the setting and the
bad value. Some declarations belong to something several task types share: a static key's
limit, a family's total, the weight of a static key in a family. The lease scripts write
those into Redis at every acquire, so two values would take turns between the tasks' runs. The
first declaration is kept here, and a task type that declares another one is refused.
"""

from __future__ import annotations

import threading
from typing import Any

from .admission import Admission
from .errors import ConfigurationError
from .keys import family_key

__all__ = ["MAX_KEY_LENGTH", "validate_limit", "validate_shared", "validate_timeout"]

#: the longest key, static or returned by a key function
MAX_KEY_LENGTH = 1024
#: (what, whose) -> (value, task): the first declaration of a key's limit, a family's total, a
#: family key's weight; every task sharing that key or family must declare the same
_declared: dict[tuple[str, str], tuple[Any, str]] = {}
_declared_lock = threading.Lock()


def validate_limit(name: str, limit: Any, key: Any, declared: Any = None) -> None:
    """``limit`` (an int) and ``key``; ``declared`` (the int, or the Adaptive) must be the same
    for every task sharing a static key."""
    declared = limit if declared is None else declared
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(
            f"task {name!r}: limit must be a positive int, an Adaptive(...) or None, got {limit!r}"
        )
    if key is None or callable(key):
        return
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or "\x1f" in key:
        raise ConfigurationError(
            f"task {name!r}: key must be a non-empty str (at most {MAX_KEY_LENGTH} "
            f"characters, no \\x1f), a callable or None, got {key!r}"
        )
    if limit is None:
        return
    if known := _other_declaration("limit", key, declared, name):
        raise ConfigurationError(
            f"task {name!r}: key {key!r} is already capped at {known[0]} by task "
            f"{known[1]!r}; tasks sharing a key must declare the same limit, got {declared}"
        )


def validate_shared(name: str, key: Any, admission: Admission | None) -> None:
    """Tasks sharing a family must declare the same total, and tasks sharing a static key in
    one family the same static weight (none is 1): the lease scripts write both into Redis at
    every acquire, so two values would flip between the tasks' runs."""
    if admission is None or admission.family is None or admission.total is None:
        return
    family, total = admission.family, admission.total
    if known := _other_declaration("total", family, total, name):
        raise ConfigurationError(
            f"task {name!r}: family {family!r} already has total {known[0]} from "
            f"task {known[1]!r}; tasks sharing a family must declare the same total, got "
            f"{total!r}"
        )
    weight = 1 if admission.weight is None else admission.weight
    if not isinstance(key, str) or callable(weight):
        return
    if known := _other_declaration("weight", family_key(family, key), weight, name):
        raise ConfigurationError(
            f"task {name!r}: key {key!r} of family {family!r} already has weight={known[0]} "
            f"from task {known[1]!r}; tasks sharing a key must declare the same weight, got "
            f"weight={weight!r}"
        )


def _other_declaration(what: str, whose: str, value: Any, name: str) -> tuple[Any, str] | None:
    """The first task's (value, name) of ``what`` for ``whose``, when another task declared
    another value; None when this is the first declaration, or they agree."""
    with _declared_lock:
        known = _declared.setdefault((what, whose), (value, name))
    return known if known[0] != value and known[1] != name else None


def validate_timeout(
    name: str, setting: str, value: Any, options: dict[str, Any], celery_name: str
) -> float | None:
    """``setting`` in seconds, else Celery's own ``celery_name`` in ``options``; None for none."""
    if value is None:
        value, setting = options.get(celery_name), celery_name
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(
            f"task {name!r}: {setting} must be a positive number of seconds, got {value!r}"
        )
    return float(value)
