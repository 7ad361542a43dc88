"""The one exception type for user mistakes (bad flags, bad files).

Entry points catch it, print ``error: {message}`` on one line and exit with status 2, so a
user sees what was wrong, where, and what to do, without a traceback.
"""



class UsageError(Exception):
    """A mistake the user can fix: a bad flag value, a malformed data file, a missing model."""


def data_error(path, line, problem, fix):
    """``PATH:LINE: problem — what to do`` for a problem in a data file (line may be None)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UsageError(f"{where}: {problem} — {fix}")


def flag_error(flag, problem, fix):
    """``--flag: problem — what to do`` for a bad option or combination of options."""
    return UsageError(f"{flag}: {problem} — {fix}")


def entry(main_fn, argv=None):
    """Run an entry point's ``main_fn(argv)`` the way train.py and evaluate.py do (src/exits.py):
    a UsageError becomes one ``error: ...`` line (once under several processes) and exit 2."""
    from src import exits

    return exits.run(main_fn, argv)
