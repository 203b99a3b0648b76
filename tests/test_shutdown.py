"""A worker's warm shutdown (SIGTERM) ends within a bound, whatever its pool was doing."""

from __future__ import annotations

import os
import signal

import pytest
from celery import Celery

from .conftest import Workers, wait_until
from .probes import queued, unacknowledged

pytestmark = pytest.mark.timeout(120)

#: a normal warm shutdown of a prefork worker takes about 2 s; the stall this guards against, 30 s
EXIT_BOUND = 15.0


def test_a_job_handed_to_a_pool_process_does_not_stall_the_warm_shutdown(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork worker whose one pool process has a throttled job in its pipe but has not
    taken it yet (the process is descheduled: here, stopped), when the worker gets SIGTERM and
    the process then runs the job, then the worker exits within 15 s, the job's result is
    stored and its message is acknowledged, not back in the queue to run again. Catches:
    Celery's flush at shutdown dropping the job because the main process had not read its ACK;
    the main process then reads none of that process's results, while the process waits 30 s
    for its READY to be counted (billiard's _ensure_messages_consumed): the warm shutdown
    stalls for 30 s, and the message, never acknowledged, is restored (worker/shutdown.py)."""
    worker = workers.start(pool="prefork", concurrency=1, loglevel="debug")
    [process] = worker.children()
    os.kill(process, signal.SIGSTOP)
    try:
        result = client.send_task("t.limited", ("handed", 0.0))
        wait_until(
            lambda: f"'t.limited', '{result.id}'" in worker.output(),
            30,
            what="the job to be handed to the pool",
        )
        # the job is written on the loop's next pass: an answered ping comes after it
        workers.wait_ready(worker)
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: "Worker: Stopping Pool" in worker.output(),
            30,
            what="the worker to stop its pool",
        )
    finally:
        os.kill(process, signal.SIGCONT)
    wait_until(lambda: not worker.alive(), EXIT_BOUND, what="the worker to exit")
    assert result.get(timeout=10) == "handed"
    assert queued(probe, prefix, [result.id]) == set()
    assert unacknowledged(probe, [result.id]) == set()
