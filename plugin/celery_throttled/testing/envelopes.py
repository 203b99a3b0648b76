"""``assert_envelope``: one line that says what a task's envelope must be, and shows it when not."""

from __future__ import annotations

import re
from typing import Any

from ..envelope import KINDS, Envelope

__all__ = ["assert_envelope"]

_ANY: Any = object()


def assert_envelope(
    env: Envelope | dict[str, Any],
    *,
    ok: bool | None = None,
    kind: str | None = None,
    value: Any = _ANY,
    error_type: str | None = None,
    message: str | None = None,
    key: str | None = None,
    degraded: bool | None = None,
) -> Envelope:
    """Check an envelope (or its JSON) against what is given; return it as an :class:`Envelope`.

    ``kind`` implies ``ok=False``. ``error_type`` is the dotted name (``"builtins.ValueError"``),
    ``message`` a regular expression searched in the error's message. Every mismatch is listed
    in one ``AssertionError`` together with the envelope::

        assert_envelope(result.get(timeout=30), ok=False, kind="deadline")
    """
    if isinstance(env, dict):
        env = Envelope.from_json(env)
    if not isinstance(env, Envelope):
        raise TypeError(f"assert_envelope wants an Envelope or its JSON, got {type(env).__name__}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"assert_envelope: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind is not None or error_type is not None or message is not None:
        ok = False if ok is None else ok
    wrong: list[str] = []
    error = env.error
    if ok is not None and env.ok is not ok:
        wrong.append(f"ok is {env.ok}, expected {ok}")
    if value is not _ANY and (not env.ok or env.value != value):
        wrong.append(f"value is {env.value!r}, expected {value!r}")
    if kind is not None and (error is None or error.kind != kind):
        wrong.append(f"kind is {error.kind if error else None!r}, expected {kind!r}")
    if error_type is not None and (error is None or error.type != error_type):
        wrong.append(f"error type is {error.type if error else None!r}, expected {error_type!r}")
    if message is not None and (error is None or not re.search(message, error.message)):
        wrong.append(f"message {error.message if error else None!r} does not match {message!r}")
    if key is not None and env.key != key:
        wrong.append(f"key is {env.key!r}, expected {key!r}")
    if degraded is not None and env.degraded is not degraded:
        wrong.append(f"degraded is {env.degraded}, expected {degraded}")
    if wrong:
        shown = error.summary() if error else f"ok, value {env.value!r}"
        raise AssertionError(
            f"envelope of task {env.task_name or '?'} [{env.task_id}]: "
            + "; ".join(wrong)
            + f"\n  envelope: {shown}"
        )
    return env
