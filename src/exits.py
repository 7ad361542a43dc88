"""How train.py and evaluate.py end: one `error:` line and an exit status, never a traceback, for
everything a user can cause or fix.

    2    a usage error (flags, data, files on disk, no space left, unwritable folder)
    3    training diverged (non-finite loss / gradients / weights)
    130  Ctrl-C (after the checkpoint of the current step is written)

Under several processes every rank meets the same usage error (the checks are deterministic),
so only rank 0 prints it, unless the line names the rank's own file (rng-rank3.pt). Errors that
can hit one rank only (a full disk, a collective timeout) are printed by every rank that meets
them. Anything else is a bug and keeps its traceback.
"""

import errno
import os
import sys

from src.errors import UsageError
from src.interrupt import EXIT_INTERRUPTED, Interrupted
from src.safety import EXIT_NONFINITE, NonFiniteError


# Where the running command writes (set once its options are known), for errors without a file name
# (a failed flush of a full disk does not say which file it was writing).
_output = {"where": None}


def note_output(path):
    _output["where"] = path


def _rank():
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _say(line, every_rank=False):
    # A line naming this rank's own file (rng-rank3.pt) is news only this rank has.
    if every_rank or _rank() == 0 or f"rank{_rank()}" in line:
        print(line, file=sys.stderr, flush=True)


def _os_error_line(exc):
    where = exc.filename or _output["where"] or "the output folder"
    if exc.errno == errno.ENOSPC:
        return f"error: {where}: no space left on device — free some space or pass another --checkpoint_dir"
    if exc.errno == errno.EDQUOT:
        return f"error: {where}: disk quota exceeded — free some space or pass another --checkpoint_dir"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"error: {where}: cannot write ({exc.strerror}) — pass a folder you can write to"
    return None


def _timeout_line(exc):
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return ("error: another process did not answer within --dist_timeout (it hung or died) "
                f"[{first}] — check the other ranks' logs; raise --dist_timeout if a step legitimately takes longer")
    return None


def run(main_fn, argv=None):
    try:
        return main_fn(argv)
    except UsageError as e:
        _say(f"error: {e}")
        return 2
    except NonFiniteError as e:
        _say(f"error: {e}")
        return EXIT_NONFINITE
    except Interrupted as e:
        _say(f"interrupted: {e}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("interrupted: Ctrl-C (no checkpoint written for the current step)")
        return EXIT_INTERRUPTED
    except OSError as e:
        line = _os_error_line(e)
        if line is None:
            raise
        _say(line, every_rank=True)  # a full disk or a permission problem may hit one rank only
        return 2
    except RuntimeError as e:
        # torch wraps failed writes (ENOSPC inside torch.save) and collective timeouts in
        # RuntimeError subclasses (DistBackendError, DistStoreError).
        text = str(e)
        if "No space left on device" in text or "file write failed" in text:
            _say(f"error: {_output['where'] or 'the output folder'}: no space left on device while writing — "
                 "free some space or pass another --checkpoint_dir", every_rank=True)
            return 2
        line = _timeout_line(e) if type(e).__module__.startswith("torch") else None
        if line is None:
            raise
        _say(line, every_rank=True)
        return 1
