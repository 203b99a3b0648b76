"""The Redis protocol on the worker's event loop: the hand-written code beside hiredis and redis-py.

    python benchmarks/bench_resp.py [--quick]

The event-loop transport packs every lease operation into a command and parses every reply it
reads (script replies, grant messages, INFO). This times, in one process and one run, side by
side on the same inputs:

* packing one ``EVALSHA`` of a lease script (5 keys, 8 arguments): the hand-written ``pack``
  (the old ``resp.py``, kept below verbatim as the anchor), redis-py's ``PythonRespSerializer``
  (its packer without hiredis), its ``HiredisRespSerializer`` (its packer with hiredis) and
  ``hiredis.pack_command`` called directly;
* parsing replies of the shapes the transport reads: the hand-written ``Parser`` beside
  ``hiredis.Reader``, whole and arriving in 16-byte pieces (as a busy socket delivers them).

Prints a table (ns per command or reply, best of 5 rounds) and writes every figure to
``benchmarks/results/bench_resp.json``. No Redis server and no worker: pure CPU, on whatever
else the machine is doing, so compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hiredis
import redis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cap import Line, table, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_resp.json"


# -- the anchor: resp.py as the event loop used it, verbatim -----------------------------------
class ReplyError(Exception):
    pass


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


# -- inputs ----------------------------------------------------------------------------------
PREFIX = "throttle"
FAMILY = [f"{PREFIX}:{{tasks.fetch}}:{part}" for part in ("h", "w", "we", "m", "wt")]
WORKER = "celery@host-01/12345/9f8e7d6c"
HOLDER = f"{WORKER} 5f0c6a8e-7c0b-4a65-9d7e-0a1b2c3d4e5f"
COMMAND: tuple[Any, ...] = (
    "EVALSHA",
    "a" * 40,
    5,
    *FAMILY,
    "tasks.fetch",
    HOLDER,
    5,
    30000,
    f"{PREFIX}:grant:",
    WORKER,
    "done",
    12,
)


def holders(n: int) -> bytes:
    return b"*%d\r\n" % n + b"".join(
        b"$%d\r\n%s\r\n" % (len(h), h) for h in (f"{HOLDER}{i}".encode() for i in range(n))
    )


ACQUIRE = b"*5\r\n:1\r\n:5\r\n:3\r\n*0\r\n*0\r\n"
RENEW = b"*3\r\n" + holders(4) + holders(4) + holders(4)
MESSAGE = pack("message", f"{PREFIX}:grant:{WORKER}", f'["tasks.fetch", "{HOLDER}"]')
INFO = pack("\r\n".join(f"field_{i}:{'x' * 24}" for i in range(48)))  # ~1.6 KB, as INFO server
PIPELINED = ACQUIRE * 100
REPLIES: list[tuple[str, bytes, int]] = [  # name, bytes, replies in it
    ("acquire reply", ACQUIRE, 1),
    ("renew reply (3 lists of 4 holders)", RENEW, 1),
    ("grant message (pub/sub)", MESSAGE, 1),
    ("INFO server (1.6 KB bulk string)", INFO, 1),
    ("100 pipelined acquire replies, one read", PIPELINED, 100),
]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- timing ----------------------------------------------------------------------------------
def best_ns(fun: Callable[[], Any], loops: int, rounds: int = 5) -> float:
    """Best of ``rounds``: nanoseconds per call of ``fun``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fun()
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best


def ours(chunks: list[bytes]) -> Callable[[], int]:
    parser = Parser()

    def run() -> int:
        count = 0
        for chunk in chunks:
            for _ in parser.feed(chunk):
                count += 1
        return count

    return run


def theirs(chunks: list[bytes]) -> Callable[[], int]:
    reader = hiredis.Reader()

    def run() -> int:
        count = 0
        for chunk in chunks:
            reader.feed(chunk)
            while reader.gets() is not False:
                count += 1
        return count

    return run


def measure(loops: int) -> tuple[list[Line], dict[str, Any]]:
    lines: list[Line] = []
    figures: dict[str, Any] = {"pack": {}, "parse": {}}
    encoder = Encoder("utf-8", "strict", False)
    python = PythonRespSerializer(6000, encoder.encode)
    hiredis_packer = HiredisRespSerializer()
    packers = {
        "hand-written pack": lambda: pack(*COMMAND),
        "redis-py PythonRespSerializer": lambda: b"".join(python.pack(*COMMAND)),
        "redis-py HiredisRespSerializer": lambda: b"".join(hiredis_packer.pack(*COMMAND)),
        "hiredis.pack_command": lambda: hiredis.pack_command(COMMAND),
    }
    assert len({fun() for fun in packers.values()}) == 1, "the packers disagree"
    anchor = None
    for name, fun in packers.items():
        ns = best_ns(fun, loops)
        anchor = anchor or ns
        figures["pack"][name] = ns
        lines.append(
            Line("pack", f"EVALSHA (5 keys, 8 args): {name}", f"{ns:,.0f} ns ({anchor / ns:.1f}x)")
        )
    for name, data, count in REPLIES:
        for split in (None, 16):
            chunks = [data] if split is None else pieces(data, split)
            label = name if split is None else f"{name}, in {split}-byte pieces"
            n = max(loops // (count * (1 if split is None else 4)), 50)
            assert ours(chunks)() == theirs(chunks)() == count
            hand = best_ns(ours(chunks), n) / count
            fast = best_ns(theirs(chunks), n) / count
            figures["parse"][label] = {"hand-written Parser": hand, "hiredis.Reader": fast}
            lines.append(
                Line(
                    "parse",
                    f"{label}: hand-written / hiredis.Reader",
                    f"{hand:,.0f} / {fast:,.0f} ns per reply ({hand / fast:.1f}x)",
                )
            )
    return lines, figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer loops, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    loops = 2_000 if args.quick else 20_000
    lines, figures = measure(loops)
    print(table(lines))
    write_json(
        args.out,
        {
            "environment": {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "loadavg_at_start": os.getloadavg(),
                "redis_py": redis.__version__,
                "hiredis": hiredis.__version__,
                "loops": loops,
            },
            "ns": figures,
        },
    )


if __name__ == "__main__":
    main()
