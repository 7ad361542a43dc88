"""What the study publishes as it goes, so that its report outlives the machine it ran on.

``OUT/`` (runs/study: checkpoints, generations, logs) stays on one machine; ``DEST/`` (results/study)
is committed. Each finished evaluation publishes ``DEST/evaluations/seedS/ARM-MODE.metrics.json``
(evaluate.py's metrics) and ``ARM-MODE.replies.jsonl.gz`` (the generated replies in test order, one
JSON string a line; the references are the test split's, rebuilt from the data); each finished
training run its curves, ``DEST/logs/seedS/NAME.metrics.jsonl``.

A seed whose steps are absent from ``OUT`` but whose every evaluation is published is a *published
seed*: the study does not run it again, and the report reads it back from here. Where its replies
were published, it is as good as a seed run here (per-example scores, paired intervals). Seeds
published before replies were kept (0 and 1 of the CPU study) have only the per-seed numbers of the
results.json that reported them: their means, spread and seed-level intervals count, their examples
cannot enter a paired bootstrap, and their figures are the ones published then.
"""

import gzip
import json
import os
import re
import shutil

from research.study.plan import evaluations


def evaluation_files(dest, seed, arm, mode):
    """(metrics.json, replies.jsonl.gz) of one published evaluation."""
    stem = os.path.join(dest, "evaluations", f"seed{seed}", f"{arm}-{mode}")
    return stem + ".metrics.json", stem + ".replies.jsonl.gz"


def log_file(dest, seed, name):
    return os.path.join(dest, "logs", f"seed{seed}", f"{name}.metrics.jsonl")


def write_replies(path, generations):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # mtime=0: the same replies give the same bytes, so a re-publish does not show as a change in git
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write("".join(json.dumps(g) + "\n" for g in generations).encode("utf-8"))


def read_replies(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_previous(dest):
    """The results.json published before (None if none): the per-seed numbers of published seeds
    without replies."""
    path = os.path.join(dest, "results.json") if dest else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def carried_numbers(previous, seed, arm, mode):
    """{"metrics", "most_frequent"} of one (seed, arm, mode) from a results.json, or None (whether it
    collapsed is not carried: the report derives it from the metrics)."""
    key = arm if mode == "retrieval" else f"{arm}_{mode}"
    entry = ((previous or {}).get("arms") or {}).get(key) or {}
    metrics = (entry.get("per_seed") or {}).get(str(seed))
    if metrics is None:
        return None
    return {"metrics": dict(metrics), "most_frequent": (entry.get("most_frequent_reply") or {}).get(str(seed))}


def has_evaluation(dest, seed, arm, mode, previous):
    metrics, replies = evaluation_files(dest, seed, arm, mode)
    return (os.path.isfile(metrics) and os.path.isfile(replies)) or carried_numbers(previous, seed, arm, mode) is not None


def seed_is_published(dest, seed, arms, previous):
    """Whether every evaluation of ``seed`` (every arm, every mode) can be read back from ``dest``."""
    return bool(dest) and all(has_evaluation(dest, seed, arm, mode, previous) for arm, mode in evaluations(arms))


def _split_without_paths(manifest):
    manifest = dict(manifest or {})
    manifest.pop("source", None)  # where the data and the split files were is not what they are
    manifest["splits"] = {k: {n: v for n, v in part.items() if n != "path"} for k, part in (manifest.get("splits") or {}).items()}
    return manifest


def same_settings(previous, sizes, split_manifest):
    """Published per-seed numbers count only for the settings that made them: the same sizes and the
    same split (the data's hash, the split's seed, fractions, rule and counts; not their paths)."""
    if previous is None:
        return True
    return previous.get("sizes") == sizes and _split_without_paths(previous.get("split")) == _split_without_paths(split_manifest)


def publish_evaluation(folder, generations, metrics_file, dest, seed):
    """One finished evaluation (``folder`` = OUT/seedS/eval/ARM-MODE): its metrics and replies."""
    arm, _, mode = os.path.basename(folder).rpartition("-")
    metrics, replies = evaluation_files(dest, seed, arm, mode)
    os.makedirs(os.path.dirname(metrics), exist_ok=True)
    shutil.copy(metrics_file, metrics)
    write_replies(replies, generations)
    return metrics


def publish_log(run_folder, dest, seed):
    """A finished training run's metrics.jsonl (its curves), if it wrote one."""
    source = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.isfile(source):
        return None
    target = log_file(dest, seed, os.path.basename(run_folder.rstrip(os.sep)))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(source, target)
    return target


def curves_of(out, dest, seed, name):
    """Where the curves of run ``name`` of ``seed`` are: its folder here, else its published log, else None."""
    local = os.path.join(out, f"seed{seed}", name)
    if os.path.isfile(os.path.join(local, "metrics.jsonl")):
        return local
    published = log_file(dest, seed, name) if dest else None
    return published if published and os.path.isfile(published) else None


def kept_figures(dest, seeds):
    """{name: path} of the published figures that belong only to ``seeds`` (every seed number in the
    file name is one of them): drawn when those seeds ran, kept while their curves cannot be redrawn."""
    found = {}
    folder = os.path.join(dest, "figures") if dest else None
    if not folder or not os.path.isdir(folder) or not seeds:
        return found
    for name in sorted(os.listdir(folder)):
        numbers = {int(n) for n in re.findall(r"seed(\d+)", name)}
        if name.endswith(".png") and numbers and numbers <= set(seeds):
            found[name[:-4]] = os.path.join(folder, name)
    return found


def earlier_intervals(entry, name, default_seeds, carried_seeds):
    """{"seeds", "diff", "ci"}: the paired bootstrap interval ``ci_NAME`` (``vs_control``,
    ``retrieved_vs_random``) that a previous results.json ``entry`` computed while the replies of its
    seeds were at hand (``default_seeds`` where it did not name them), when those seeds are all
    published without them now (``carried_seeds``); None otherwise. Kept so that a later report does
    not lose the example-level interval of seeds whose replies are gone."""
    entry = entry or {}
    if f"earlier_ci_{name}" in entry:
        found = entry[f"earlier_ci_{name}"]
    elif f"ci_{name}" in entry:
        found = {"seeds": entry.get(f"ci_seeds_{name}", default_seeds), "diff": entry.get(f"diff_{name}"),
                 "ci": entry[f"ci_{name}"]}
    else:
        return None
    seeds = found.get("seeds") or []
    if not seeds or not set(seeds) <= set(carried_seeds) or not found.get("ci"):
        return None
    return found
