"""Ctrl-C during training: finish the current step, save a checkpoint, exit 130.

The first SIGINT only sets a flag (the loop checks it at the step boundary, together with the
other ranks, so every rank saves the same step); a second one aborts at once.
"""

import signal
import sys

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Raised after the checkpoint of the interrupted step is written; exit status 130."""


class StopOnInterrupt:
    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
