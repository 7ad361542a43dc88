"""File permissions of what the runs write."""

import os


def make_readable(path):
    """safetensors writes through a private temporary file (mode 0600); give every file of a
    checkpoint the mode the user's umask gives ordinary files, so a colleague can read it too."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, files in os.walk(path):
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
