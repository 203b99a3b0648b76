"""A prefork worker's warm shutdown: a job already handed to a pool process is not dropped.

At a warm shutdown Celery's consumer calls ``AsynPool.flush()`` (celery/concurrency/asynpool.py)
after the pool was closed. Flush drops from the pool's cache every job whose ACK the main
process has not read yet, since "the broker will redeliver it". A job whose payload is already
in a pool process's pipe is not stopped by that, and the timeline goes:

1. the main process writes job J to process P's pipe; P starts it and writes its ACK, but the
   main process is busy elsewhere (forking a replacement for a process killed at its hard time
   limit, say) and reads nothing more before SIGTERM arrives;
2. the consumer closes: flush drops J, unacknowledged; the pool's cache is empty;
3. the pool joins: Celery reads its processes' results only while its cache holds a job
   (``ResultHandler.on_stop_not_started``), so it reads neither J's ACK nor its READY;
4. P finishes J, reads the stop sentinel, and then waits for the main process to count J's
   READY before it exits (billiard's ``Worker._ensure_messages_consumed``): 300 tries, 0.1 s
   apart. The main process waits for P in ``Pool.join()``: the warm shutdown stalls for 30 s.

So at shutdown (the pool no longer running: a lost broker connection also flushes, and keeps
Celery's behaviour) every job written in full to a live process stays in the cache, where
Celery's own shutdown drain reads its ACK and READY like those of any running job; the process
then exits at once. This reaches into private attributes of Celery's prefork pool; when they
are not there, nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.pool import RUN

__all__ = ["keep_handed_jobs"]

logger = logging.getLogger(__name__)


def keep_handed_jobs(pool: Any) -> None:
    """Wrap the flush of Celery's prefork ``pool`` (``consumer.pool``) once; others untouched."""
    flush = getattr(pool, "flush", None)
    asyn: Any = getattr(pool, "_pool", None)
    cache = getattr(asyn, "_cache", None)
    if flush is None or getattr(flush, "keeps_handed_jobs", False) or not isinstance(cache, dict):
        return
    if not hasattr(asyn, "_state") or not hasattr(asyn, "_active_writers"):
        return

    def flush_keeping_handed_jobs() -> Any:
        kept = handed(asyn) if asyn._state != RUN else []  # closed: a shutdown
        try:
            return flush()
        finally:
            for job in kept:
                cache.setdefault(job._job, job)
            if kept:
                logger.debug(
                    "celery-throttled: %d job(s) already handed to a pool process kept until "
                    "their results are read",
                    len(kept),
                )

    flush_keeping_handed_jobs.keeps_handed_jobs = True  # type: ignore[attr-defined]
    pool.flush = flush_keeping_handed_jobs


def handed(asyn: Any) -> list[Any]:
    """The jobs of ``asyn``'s cache written in full to a live process that has not acked them."""
    found = []
    for job in list(asyn._cache.values()):
        proc = getattr(job, "_write_to", None)
        if getattr(job, "_accepted", True) or proc is None or job.ready():
            continue
        writer = getattr(job, "_writer", None)
        if writer is not None and writer() in asyn._active_writers:
            continue  # half written: Celery's flush decides
        if proc._is_alive():
            found.append(job)
    return found
