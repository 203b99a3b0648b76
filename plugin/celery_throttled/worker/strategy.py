"""The ``Task.Strategy`` hook and the consumer bootstep that own the gate's lifecycle.

Celery calls ``task.start_strategy(app, consumer)`` for every task when the consumer starts.
For a throttled task this installs the worker's :class:`~.gate.Gate` in front of
``consumer.on_task_request`` (so direct, ETA and rate-limited requests all pass through it),
then returns Celery's default strategy unchanged.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker.strategy import default

from .. import request as protocol
from .gate import Gate
from .shutdown import keep_handed_jobs

__all__ = ["ThrottleConsumerStep", "throttled"]


def throttled(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    Gate.for_consumer(consumer)
    return default(task, app, consumer, **kwargs)


class ThrottleConsumerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the gate's sweeps with the consumer; lets go of held messages when it stops; keeps
    a prefork pool's warm shutdown from stalling on a job already handed out (:mod:`.shutdown`).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "Throttle"

    def start(self, c: Any) -> None:
        keep_handed_jobs(c.pool)
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.start()

    def stop(self, c: Any) -> None:
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.stop()

    def shutdown(self, c: Any) -> None:
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.close()
