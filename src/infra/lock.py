"""One writer per --checkpoint_dir: `{checkpoint_dir}/run.lock`.

Two trainings in one folder used to both run and corrupt it (interleaved metrics.jsonl rows, a
step-N saved by the other run). Rank 0 takes the lock before it writes anything there and gives
it back on every way out (normal end, error, Ctrl-C); a second writer is refused with one line
that names the running one.

The lock is an advisory ``flock`` on `run.lock`, whose content names the owner (pid, host, start
time, command). The kernel drops a flock when its process dies, even by SIGKILL, so a lock left
by a killed run is taken over (and the log says whose it was). On a file system without flock
(some network mounts), the owner file alone decides: a lock whose process is gone from this host
(its pid dead, or reused by a process started later) is stale and taken over; one held from
another host is refused, with the file to delete if that run is over.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

from src.infra.errors import UsageError

LOCK_NAME = "run.lock"
# flock is not available on this file system (the owner file alone decides).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _process_start(pid):
    """Start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner):
    """Is the owner's process still running (on this host)?"""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    started = owner.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or now == started  # a later process with a reused pid is not it


def describe(owner):
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
            + (f": {owner['command']}" if owner.get("command") else ""))


class RunLock:
    """``acquire()`` (returns log lines) and ``release()`` (idempotent) of `{checkpoint_dir}/run.lock`."""

    def __init__(self, checkpoint_dir, command=None):
        self.dir = checkpoint_dir
        self.path = os.path.join(checkpoint_dir, LOCK_NAME)
        self.command = command if command is not None else " ".join(os.path.basename(a) if i == 0 else a
                                                                    for i, a in enumerate(sys.argv))
        self._fd = None
        self._made = []  # the folders acquire() created, innermost first

    def _owner(self):
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command[:500]}

    def _busy(self, owner, fix):
        return UsageError(f"--checkpoint_dir: {self.dir} is in use by another run ({describe(owner)}; lock "
                          f"{self.path}) — {fix}")

    def acquire(self):
        """Take the lock or raise UsageError naming its holder. Returns log lines (a taken-over stale lock)."""
        self._made = _missing_dirs(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        for _ in range(5):  # the file can be replaced between open and flock: retry on the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._flock(fd)
                if flocked is None:  # another process holds it (its owner line may not be written yet)
                    owner = _read(fd) or {"pid": "?", "host": "?", "started": "just now"}
                    raise self._busy(owner, "wait for it to finish or stop it (Ctrl-C saves it), or pass "
                                            "another --checkpoint_dir")
                st, now = os.fstat(fd), _stat(self.path)
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    continue
                previous = _read(fd)
                if previous and not flocked and previous.get("pid") != os.getpid():
                    if previous.get("host") != socket.gethostname():
                        raise self._busy(previous, f"if that run is over, delete {self.path}; else pass another "
                                                   "--checkpoint_dir")
                    if _alive(previous):
                        raise self._busy(previous, "wait for it to finish or stop it, or pass another "
                                                   "--checkpoint_dir")
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(self._owner()) + "\n").encode(), 0)
                self._fd = fd
                return ([f"took over {self.path} from a run that is no longer running ({describe(previous)})"]
                        if previous else [])
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                    self._remove_made_dir()
                raise
        raise UsageError(f"--checkpoint_dir: {self.path} keeps being replaced by another process — make sure "
                         "only one run uses this folder")

    @staticmethod
    def _flock(fd):
        """True: locked; None: held by another process; False: this file system has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return False
            raise

    def release(self):
        """Remove the lock file (when it is still this run's) and drop the lock; never raises."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            st, now = os.fstat(fd), _stat(self.path)
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.remove(self.path)  # before the flock goes: nobody can lock the removed file in between
        except OSError:
            pass
        finally:
            os.close(fd)
        self._remove_made_dir()

    def _remove_made_dir(self):
        """A run that stopped before writing anything leaves no folder it created (empty ones only)."""
        made, self._made = self._made, []
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                return


def _missing_dirs(path):
    """The folders of `path` that do not exist yet, innermost first."""
    out, d = [], os.path.abspath(path)
    while not os.path.exists(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _stat(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _read(fd):
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode("utf-8", "replace")) if data.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}
    return owner if isinstance(owner, dict) else None
