"""The Lua scripts of ``lua/``, run by their SHA1 (EVALSHA), their source sent only when Redis
does not know it yet.

The lease scripts (:class:`Scripts`) are each one file of ``lua/`` with the shared ones
prepended: ``admission.lua`` (rates, families, priorities, pending sets), ``fair.lua`` (a
family's fair shares), ``grant.lua`` and ``free.lua``. The others (:func:`read_script`) run
as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis

__all__ = ["Script", "Scripts", "read_script"]


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, *parts: str) -> Script:
        """The scripts of ``lua/`` named ``parts``, joined in that order, as ``name``."""
        lua = resources.files("celery_throttled").joinpath("lua")
        source = "\n".join(lua.joinpath(part).read_text() for part in parts)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    def run(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run it on ``client`` by its SHA (EVALSHA), sending its source only when Redis does
        not know it yet."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


class Scripts:
    """The lease scripts, with ``admission.lua``, ``fair.lua``, ``grant.lua`` and ``free.lua``
    prepended, and their SHA1s for EVALSHA."""

    @staticmethod
    @cache
    def get(name: str) -> Script:
        return Script.of(name, "admission.lua", "fair.lua", "grant.lua", "free.lua", name)


def read_script(name: str) -> Script:
    """A script of ``lua/`` on its own (nothing prepended), for EVALSHA."""
    return Script.of(name, name)
