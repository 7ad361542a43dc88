"""Ctrl-C (SIGINT) and SIGTERM during training: finish the current step, save a checkpoint, exit 130.

The first signal only sets a flag (the loop checks it at the step boundary, together with the
other ranks, so every rank saves the same step); a second one aborts at once. Before the loop
(loading, index building) a signal raises ``KeyboardInterrupt`` (``Terminated`` for SIGTERM), so
the run stops with one line and gives its folder's lock back; nothing of the unfinished start is
kept.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupted(Exception):
    """Raised after the checkpoint of the interrupted step is written; exit status 130."""


class Terminated(KeyboardInterrupt):
    """SIGTERM where no step can be finished first (startup, or a second signal)."""


def _raise(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signal_name(signum))


_original = {}  # the handlers before quiet_start, put back by restore()


def _exit_quietly(signum, frame):
    print(f"interrupted: {signal_name(signum)} while starting (nothing was written)", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def quiet_start():
    """While an entry point imports its libraries (torch takes seconds): a signal ends the process
    with one line instead of a traceback from inside an import."""
    for s in SIGNALS:
        _original.setdefault(s, signal.getsignal(s))
        signal.signal(s, _exit_quietly)


def stop_by_exception():
    """From the start of main to the training loop: SIGINT and SIGTERM raise (KeyboardInterrupt /
    Terminated), so the run ends through its cleanup (the lock) with one line."""
    for s in SIGNALS:
        _original.setdefault(s, signal.getsignal(s))
        signal.signal(s, _raise)


def restore():
    """The handlers from before quiet_start / stop_by_exception (a process that goes on: tests)."""
    for s, handler in _original.items():
        signal.signal(s, handler)
    _original.clear()


class StopOnInterrupt:
    def __init__(self):
        self.requested = False
        self.signal = "Ctrl-C"  # what asked to stop, for the last line
        self._previous = {}

    def install(self):
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            for s in SIGNALS:
                signal.signal(s, _raise)
            _raise(signum, frame)
        self.requested = True
        self.signal = signal_name(signum)
        print(f"interrupt: {self.signal}: stopping after this step and saving a checkpoint "
              f"({self.signal} again to abort now)", file=sys.stderr, flush=True)

    def uninstall(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
