"""Where a run came from: the command line, the git commit (and whether the tree was dirty) and
the installed versions of the pinned packages. Recorded as `run_info` in options.json, so a
checkpoint found alone says what code and environment made it."""

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Packages whose version changes results or loading; the rest of requirements.txt is tooling.
_ALWAYS = ("torch",)


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git, or a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state():
    """{"commit": sha or None, "dirty": bool or None}; None values outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def pinned_packages(requirements=os.path.join(ROOT, "requirements.txt")):
    """Names of the packages pinned in requirements.txt (plus torch, pinned in constraints.txt)."""
    names = list(_ALWAYS)
    if os.path.isfile(requirements):
        with open(requirements, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==", line)
                if m and m.group(1) not in names:
                    names.append(m.group(1))
    return names


def package_versions(names=None):
    """{name: installed version or None} for `names` (default: the pinned packages)."""
    out = {}
    for name in names or pinned_packages():
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_info(argv):
    """The provenance record of this process, `argv` being the arguments after the script."""
    return {"command": shlex.join([os.path.basename(sys.argv[0]) or "python", *argv]),
            "cwd": os.getcwd(), "git": git_state(), "python": platform.python_version(),
            "packages": package_versions()}
