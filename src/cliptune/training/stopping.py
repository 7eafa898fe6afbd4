"""How a run stops before its last step: asked to by a signal, or unable to go on (`TrainingError`)."""

from __future__ import annotations

import signal
from types import FrameType


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


class StopSignals:
    """While active, SIGINT and SIGTERM only record that a stop was asked for: the loop finishes the step
    in progress, checkpoints and returns, so a preempted job resumes where it stopped."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
