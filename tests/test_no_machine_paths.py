"""No file of the repository names a path of the machine it was written on: published results,
docs and examples use paths relative to the repository (or a placeholder such as CKPT)."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Home folders, this workplace's checkouts, scratch folders, mounted volumes, Windows profiles.
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/home/[a-z]|/root/|/Users/[A-Za-z]|/tmp/|/mnt/|/scratch/|[A-Z]:\\Users\\)")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.isfile(path) and not name.endswith((".png", ".safetensors", ".bin")):
            with open(path, "rb") as f:
                raw = f.read()
            if b"\0" not in raw:
                yield name, raw.decode("utf-8", errors="replace")


def machine_paths(text):
    return [m.group(0) for m in MACHINE_PATH.finditer(text)]


def test_the_pattern_catches_machine_paths_and_spares_relative_ones():
    assert machine_paths("see /work/main/runs/x and /home/ana/ckpt, C:\\Users\\bo\\x, /tmp/qs") == [
        "/work/", "/home/a", "C:\\Users\\", "/tmp/"]
    assert machine_paths("runs/quickstart-seed0/curves.png ../shared/data results/study/README.md") == []


def test_no_tracked_file_holds_a_machine_path():
    this = os.path.relpath(__file__, ROOT)
    found = {name: machine_paths(text) for name, text in tracked_text_files() if name != this}
    found = {name: hits for name, hits in found.items() if hits}
    assert not found, f"machine paths in tracked files (use paths relative to the repository): {found}"
