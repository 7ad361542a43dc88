"""The exceptions entry points turn into one line and an exit status (src/infra/exits.py).

``UsageError`` is a mistake the user can fix (exit 2): ``error: {message}`` on one line says
what was wrong, where, and what to do, without a traceback. ``NonFiniteError`` is a training
run that diverged (exit 3).
"""

EXIT_USAGE = 2
EXIT_NONFINITE = 3


class UsageError(Exception):
    """A mistake the user can fix: a bad flag value, a malformed data file, a missing model."""


class NonFiniteError(Exception):
    """Training diverged (NaN/inf); entry points print it on one line and exit with status 3."""


def data_error(path, line, problem, fix):
    """``PATH:LINE: problem — what to do`` for a problem in a data file (line may be None)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UsageError(f"{where}: {problem} — {fix}")


def flag_error(flag, problem, fix):
    """``--flag: problem — what to do`` for a bad option or combination of options."""
    return UsageError(f"{flag}: {problem} — {fix}")
