"""The frozen GRPO references under {checkpoint_dir}/reference/ and what they were taken from.

`source.json` (written last, it marks the folder complete) records the model the references
were copied from and a SHA-256 of its weights. A fresh start in a folder whose reference/ came
from other weights (a failed first attempt with another --model_path) rebuilds it; a resumed
run reuses it as it is, since its own weights have moved on since the reference was taken.
"""

import json
import os
import shutil

from src.infra import fingerprint
from src.infra.errors import UsageError

SOURCE = "source.json"
LEGACY_MARKER = "complete"  # folders written before source.json existed


def fingerprints(reader, retriever=None):
    out = {"reader": fingerprint.weights(reader)}
    if retriever is not None:
        out["retriever"] = fingerprint.weights(retriever)
    return out


def decide(ref_dir, taken_from, current, resumed):
    """(reuse the saved references?, log line or None).

    `current`: fingerprints of the models this run starts from (ignored when `resumed`).
    """
    source_file = os.path.join(ref_dir, SOURCE)
    if os.path.isfile(source_file):
        with open(source_file) as f:
            saved = json.load(f)
        if resumed:
            return True, None
        if saved.get("fingerprints") == current:
            return True, f"reusing {ref_dir} (taken from the same weights: {saved.get('taken_from')})"
        return False, (f"warning: {ref_dir} was taken from {saved.get('taken_from')} (other weights than "
                       f"{taken_from}, which this run starts from): rebuilding it")
    if os.path.isfile(os.path.join(ref_dir, LEGACY_MARKER)):
        if resumed:
            return True, None
        return False, f"warning: {ref_dir} does not record what it was taken from: rebuilding it from {taken_from}"
    if resumed:
        raise UsageError(f"{ref_dir}: missing or incomplete, but this run resumes a GRPO run that needs the "
                         "references it started with — restore the folder, or start a new run in another "
                         "--checkpoint_dir")
    return False, None


def clear(ref_dir):
    if os.path.exists(ref_dir):
        shutil.rmtree(ref_dir)


def mark_complete(ref_dir, taken_from, current):
    tmp = os.path.join(ref_dir, SOURCE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"taken_from": taken_from, "fingerprints": current}, f, indent=1)
    os.replace(tmp, os.path.join(ref_dir, SOURCE))
