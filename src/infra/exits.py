"""How train.py and evaluate.py end: one `error:` line and an exit status, never a traceback, for
everything a user can cause or fix.

    2    a usage error (flags, data, files on disk, no space left, read-only or unwritable folder)
    3    training diverged (non-finite loss / gradients / weights)
    130  Ctrl-C or SIGTERM (after the checkpoint of the current step is written)

Under several processes every rank meets the same usage error (the checks are deterministic),
so only rank 0 prints it, unless the line names the rank's own file (rng-rank3.pt). Errors that
can hit one rank only (a full disk, a collective timeout) are printed by every rank that meets
them. Anything else is a bug and keeps its traceback.

A full or read-only disk shows up in many forms: OSError from Python's own writes, RuntimeError
from torch.save ("unexpected pos ...", "file write failed"), SafetensorError and the tokenizers
library's Exception ("No space left on device (os error 28)"). ``disk_problem`` recognises them
all; `src/run/checkpoint.py` turns them into an OSError naming the file being written, and
``run`` maps whatever is left to the same line.

Once a run has its ``run.log`` (``note_log``), the line that ends it is also appended there
(``log_failure``, called by train.py before it gives its folder's lock back).
"""

import errno
import os
import sys
import time

from src.infra.errors import EXIT_NONFINITE, EXIT_USAGE, NonFiniteError, UsageError
from src.infra.interrupt import EXIT_INTERRUPTED, Interrupted, Terminated

# Where the running command writes (set once its options are known), for errors without a file name
# (a failed flush of a full disk does not say which file it was writing); its run.log, once open.
_output = {"where": None, "log": None}

# Text of the write failures that do not come as an OSError with an errno (see the docstring).
_DISK_TEXT = ((errno.ENOSPC, ("no space left on device", "os error 28", "storagefull", "unexpected pos",
                              "file write failed")),
              (errno.EROFS, ("read-only file system", "os error 30", "readonlyfilesystem")),
              (errno.EDQUOT, ("disk quota exceeded", "os error 122")))


_AT_ONCE = ("stopped at once (nothing saved for the step in progress, if any) — run the same command again "
            "(a training resumes from its last checkpoint)")


def note_output(path):
    _output["where"] = path


def note_log(path):
    """The run.log the ending line also goes to (None: none)."""
    _output["log"] = path


def disk_problem(exc):
    """The errno (ENOSPC, EROFS, EDQUOT, EACCES, EPERM) of a failed write, however the library
    reported it, looking through the exception's causes; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                      errno.EPERM):
            return exc.errno
        text = str(exc).lower()
        for code, needles in _DISK_TEXT:
            if any(n in text for n in needles):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _rank():
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _say(line, every_rank=False):
    # A line naming this rank's own file (rng-rank3.pt) is news only this rank has.
    if every_rank or _rank() == 0 or f"rank{_rank()}" in line:
        print(line, file=sys.stderr, flush=True)


def _disk_line(code, where):
    where = where or _output["where"] or "the output folder"
    if code == errno.ENOSPC:
        return f"error: {where}: no space left on device — free some space or pass another --checkpoint_dir"
    if code == errno.EDQUOT:
        return f"error: {where}: disk quota exceeded — free some space or pass another --checkpoint_dir"
    why = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted"}[code]
    return f"error: {where}: cannot write ({why}) — pass a folder you can write to (--checkpoint_dir)"


def _timeout_line(exc):
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return ("error: another process did not answer within --dist_timeout (it hung or died) "
                f"[{first}] — check the other ranks' logs; raise --dist_timeout if a step legitimately takes longer")
    return None


def describe(exc):
    """(line, exit status, print on every rank) for an exception a user can cause, else None (a bug)."""
    if isinstance(exc, UsageError):
        return f"error: {exc}", EXIT_USAGE, False
    if isinstance(exc, NonFiniteError):
        return f"error: {exc}", EXIT_NONFINITE, False
    if isinstance(exc, Interrupted):
        return f"interrupted: {exc}", EXIT_INTERRUPTED, False
    if isinstance(exc, Terminated):
        return f"interrupted: {exc}: {_AT_ONCE}", EXIT_INTERRUPTED, False
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted: Ctrl-C: {_AT_ONCE}", EXIT_INTERRUPTED, False
    code = disk_problem(exc) if isinstance(exc, Exception) else None
    if code is not None:  # a full disk or a permission problem may hit one rank only
        return _disk_line(code, getattr(exc, "filename", None)), EXIT_USAGE, True
    # torch wraps collective timeouts in RuntimeError subclasses (DistBackendError, DistStoreError).
    if isinstance(exc, RuntimeError) and type(exc).__module__.startswith("torch"):
        line = _timeout_line(exc)
        if line is not None:
            return line, 1, True
    return None


def log_failure(exc):
    """Append the line ``run`` will print for `exc` to the noted run.log (never raises)."""
    path = _output["log"]
    described = describe(exc)
    if path is None or described is None or (described[2] is False and _rank() != 0):
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {described[0]}\n")
    except Exception:  # the disk that failed the run may fail this too
        pass


def run(main_fn, argv=None):
    try:
        return main_fn(argv)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        described = describe(e)
        if described is None:
            raise
        line, status, every_rank = described
        _say(line, every_rank)
        return status
