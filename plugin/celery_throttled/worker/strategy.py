"""The ``Task.Strategy`` hook and the consumer bootstep that own the gate's lifecycle.

Celery calls ``task.start_strategy(app, consumer)`` for every task when the consumer starts.
For a throttled task this installs the worker's :class:`~.gate.Gate` in front of
``consumer.on_task_request`` (so direct, ETA and rate-limited requests all pass through it),
once per consumer, then returns Celery's default strategy unchanged. The bootstep starts and
stops the gate with the consumer, and its sweep (:mod:`.sweep`) on the consumer's timer.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery import bootsteps
from celery.worker.strategy import default

from .. import request as protocol
from .gate import Gate
from .shutdown import keep_handed_jobs
from .sweep import sweep

__all__ = ["ThrottleConsumerStep", "throttled"]


def throttled(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    if protocol.GATE.get(consumer) is None:
        protocol.GATE.set(consumer, Gate(consumer))
    return default(task, app, consumer, **kwargs)


class ThrottleConsumerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the gate's sweeps with the consumer; lets go of held messages when it stops; keeps
    a prefork pool's warm shutdown from stalling on a job already handed out (:mod:`.shutdown`).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "Throttle"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.sweeper: Any = None

    def start(self, c: Any) -> None:
        keep_handed_jobs(c.pool)
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.start()
            if self.sweeper is None:
                every = gate.settings.sweep_interval
                self.sweeper = c.timer.call_repeatedly(every, partial(sweep, gate), priority=5)

    def stop(self, c: Any) -> None:
        self._unsweep(c)
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.stop()

    def shutdown(self, c: Any) -> None:
        self._unsweep(c)
        gate = protocol.GATE.get(c)
        if gate is not None:
            gate.close()

    def _unsweep(self, c: Any) -> None:
        if self.sweeper is not None:
            c.timer.cancel(self.sweeper)
            self.sweeper = None
