"""Preemption: schedulers ask a job to stop with SIGTERM (SLURM can warn minutes ahead
with SIGUSR1), a user with Ctrl-C (SIGINT). The first such signal only sets a flag, so the
trainer finishes its step, writes a checkpoint and exits 0; a second one aborts at once."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("pyvf")

SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` ... `guard.requested` is the name of the first
    signal received (None before). The previous handlers come back on exit."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # the second signal: stop now, as without the guard
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then a checkpoint and exit (send it again to abort now)",
                    self.requested)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
