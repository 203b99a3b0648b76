"""Just enough of the Redis protocol (RESP2) for the event loop's own connections.

``pack`` encodes one command; :class:`Parser` is fed bytes as they arrive and yields complete
replies: ``bytes`` for simple and bulk strings, ``int``, ``list``, ``None`` for nil, and
:class:`ReplyError` instances (returned, not raised) for error replies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Parser", "ReplyError", "pack"]


class ReplyError(Exception):
    """An error reply from Redis (``-ERR …``, ``-NOSCRIPT …``)."""


def _encode(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")


def pack(*args: Any) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


class Parser:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        self._buffer += data
        while self._buffer:
            try:
                reply, end = self._parse(0)
            except _Incomplete:
                return
            del self._buffer[:end]
            yield reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        return bytes(self._buffer[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[Any, int]:
        line, pos = self._line(pos)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest, pos
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace")), pos
        if kind == b":":
            return int(rest), pos
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None, pos
            if len(self._buffer) < pos + size + 2:
                raise _Incomplete
            return bytes(self._buffer[pos : pos + size]), pos + size + 2
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise ValueError(f"unexpected reply from Redis: {line[:80]!r}")
