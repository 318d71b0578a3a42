"""Graceful stop on SIGUSR1/SIGTERM: checkpoint at the next epoch boundary, then exit with ``EXIT_RESUME``.

Only ``hpc-zsem run`` installs the handlers (:func:`install`). A handler just sets a flag; the pipeline puts
the flag into the statistics that are allreduced every epoch, so every rank learns that *some* rank was
signalled at the same epoch boundary (signalling one rank is enough: ``mpiexec`` from the mpich wheel does not
forward SIGUSR1/SIGTERM to its ranks, ``srun`` does). Then every rank takes part in writing a checkpoint and
raises :class:`StopRequested`; the CLI exits with 75 (EX_TEMPFAIL: "run me again").

A second SIGTERM exits at once (``os._exit(143)``; the previous checkpoint is intact because checkpoints are
written atomically). Copies of one signal that arrive within ``DUPLICATE_WINDOW`` seconds of the first count
once: on preemption or at the walltime SLURM signals the batch shell, ``srun`` and the tasks, and the batch
script forwards the signal again, so a task may see the same SIGTERM two or three times in a few ms.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

EXIT_RESUME = 75          # a checkpoint was written on request: run the same command again to resume
DUPLICATE_WINDOW = 2.0    # seconds in which repeated SIGTERMs count as one


class StopRequested(Exception):
    """Raised on every rank after the checkpoint requested by a signal has been written."""

    exit_code = EXIT_RESUME

    def __init__(self, message: str):
        super().__init__(message)


class StopFlag:
    """Set by SIGUSR1/SIGTERM. ``clock`` and ``hard_exit`` are injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, hard_exit: Callable[[int], None] = os._exit):
        self.requested = False
        self.signal_name: str | None = None
        self._first_term: float | None = None
        self._clock = clock
        self._hard_exit = hard_exit

    def __bool__(self) -> bool:
        return self.requested

    def request(self, name: str = "request") -> None:
        """Ask for a checkpoint and a stop at the next epoch boundary."""
        if not self.requested:
            self.requested, self.signal_name = True, name

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler (async-signal-safe enough: no logging, one os.write)."""
        name = signal.Signals(signum).name
        now = self._clock()
        if signum == signal.SIGTERM:
            if self._first_term is not None and now - self._first_term > DUPLICATE_WINDOW:
                _say(f"hpc-zsem: second {name}: exiting at once (the last complete checkpoint is kept)\n")
                self._hard_exit(128 + signum)
                return
            if self._first_term is None:
                self._first_term = now
        if not self.requested:
            _say(f"hpc-zsem: received {name}: writing a checkpoint at the next epoch boundary, then exiting "
                 f"with code {EXIT_RESUME}\n")
        self.request(name)


def _say(text: str) -> None:
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def install(flag: StopFlag | None = None) -> StopFlag:
    """Route SIGUSR1 and SIGTERM to ``flag`` (a new one by default) and return it."""
    flag = flag or StopFlag()
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, flag.handle)
    return flag
