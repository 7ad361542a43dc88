"""Resuming: the command line against the checkpoint it continues, and the logs past its step.

A restored optimizer carries its own learning rate and weight decay, so a changed --lr used to
be ignored while the new options.json claimed it ran; a new --model_path was ignored and other
data of the same size used, without a word. Now every recorded option (outside the bookkeeping
ones, FREE) is compared with the checkpoint's options.json, the data files by the SHA-256 of their
contents: a change is refused unless --allow_option_changes is given; then each is applied (or,
for the model paths, ignored) with one warning line. Options that change what is trained (the
stage) cannot continue a run at all.
"""

import glob
import hashlib
import json
import os

from src.infra.errors import UsageError

# What is trained: a checkpoint of one stage cannot be continued as another.
STAGE = ("closed_book", "use_grpo", "reader_rl_learning", "grpo_train_retriever", "train_retriever", "fix_reader")
# How it is optimized (the restored optimizer takes the new values: `apply_optimizer_options`).
OPTIMIZATION = ("lr", "lr_retriever", "weight_decay", "clip", "per_gpu_batch_size", "accumulation_steps",
                "scheduler", "warmup_steps", "freeze_retriever_steps", "grpo_group_size",
                "grpo_retriever_group_size", "grpo_retriever_pool_size", "grpo_num_iterations",
                "grpo_kl_coeff", "grpo_clip_epsilon", "grpo_loss_type", "grpo_temperature", "grpo_top_p",
                "grpo_retriever_temperature")
# Options that change neither what is trained nor how: where and how often the run logs and saves,
# monitoring, limits. They may differ on resume without a word (a changed --total_steps is noted).
FREE = {"checkpoint_dir", "local_rank", "config", "run_info", "allow_option_changes", "total_steps", "name",
        "use_wandb", "wandb_project", "wandb_entity", "wandb_run_name", "log_freq", "save_freq",
        "keep_checkpoints", "dist_timeout", "max_nonfinite_steps", "write_results", "dont_write_passages",
        "save_index_path", "save_index_n_shards", "load_index_path", "save_optimizer"}
# Where the weights of a new run come from: a resume takes them from its checkpoint instead.
MODEL_SOURCES = ("model_path", "reader_model_type", "retriever_model_path", "load_reader_weights_only",
                 "pointer_generator")
# Data files, compared by the SHA-256 of their contents (`data_fingerprints`, in run_info["data"]).
DATA = ("train_data", "eval_data", "passages")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprints(opts):
    """{option: SHA-256 of each file's contents} of the data options (lists for the multi-file
    ones, None where unset), recorded in options.json's run_info at every start."""
    out = {}
    for key in DATA:
        value = getattr(opts, key, None)
        if isinstance(value, (list, tuple)):
            out[key] = [_sha256(p) for p in value]
        else:
            out[key] = _sha256(value) if value and os.path.isfile(value) else None
    return out


def saved_world(path):
    """World size of the run that wrote a checkpoint (one RNG file per rank)."""
    return max(1, len(glob.glob(os.path.join(path, "rng-rank*.pt"))))


def _stage(saved):
    if saved.get("closed_book"):
        return "a stage-1 (closed-book) run"
    if saved.get("use_grpo"):
        return "a GRPO run" + (" with the retriever trained" if saved.get("grpo_train_retriever") else "")
    return "a stage-2 run"


def _resolved(value, cwd):
    """A path option as an absolute path (relative ones against `cwd`) when it names something on
    disk; else as given (a Hugging Face id)."""
    if not isinstance(value, str) or not value:
        return value
    path = os.path.join(cwd or os.getcwd(), value)
    return os.path.realpath(path) if os.path.exists(path) else value


def _short(fingerprint):
    return fingerprint[:12] if isinstance(fingerprint, str) else fingerprint


def _data_change(key, before, after, saved_fp, now_fp, saved_cwd):
    """Text of a change of data option `key`, or None when the data are the same (by contents when
    the checkpoint recorded them, else by path)."""
    if saved_fp is not None and key in saved_fp:
        if saved_fp[key] == now_fp.get(key):
            return None
        if isinstance(saved_fp[key], list) and isinstance(now_fp.get(key), list) \
                and len(saved_fp[key]) == len(now_fp[key]):
            shown = [f"{_short(a)} -> {_short(b)}" for a, b in zip(saved_fp[key], now_fp[key]) if a != b]
        else:
            shown = [f"{_short(saved_fp[key])} -> {_short(now_fp.get(key))}"]
        return f"{key} {before} -> {after}: other contents (sha256 {', '.join(shown)})"
    return None if _resolved_all(before, saved_cwd) == _resolved_all(after, None) else f"{key} {before} -> {after}"


def _resolved_all(value, cwd):
    return [_resolved(x, cwd) for x in value] if isinstance(value, list) else _resolved(value, cwd)


def compare(saved, opts, path, world, allow):
    """Warning lines for the changes a resume applies (or ignores); raises UsageError for refused ones.

    `saved` is the checkpoint's options.json, `world` this run's number of processes. Every recorded
    option outside FREE is compared: a changed one is refused unless `allow`; the data files by their
    contents, the model paths (which a resume ignores: the weights come from the checkpoint) by
    where they point.
    """
    stage = [k for k in STAGE if k in saved and bool(saved[k]) != bool(getattr(opts, k))]
    if stage:
        flags = ", ".join(f"--{k} {'on' if getattr(opts, k) else 'off'} (checkpoint: "
                          f"{'on' if saved[k] else 'off'})" for k in stage)
        raise UsageError(f"--checkpoint_dir: {opts.checkpoint_dir} holds {_stage(saved)} ({path}) but this command "
                         f"differs in {flags} — to start the next stage from it pass a new --checkpoint_dir and "
                         f"--model_path {path}; to continue it, repeat its own command")
    info = saved.get("run_info") if isinstance(saved.get("run_info"), dict) else {}
    saved_cwd, saved_fp = info.get("cwd"), info.get("data")
    now_fp = (getattr(opts, "run_info", None) or {}).get("data") or {}
    applied, ignored = [], []
    for key in sorted(saved):
        if key in FREE or key in STAGE or not hasattr(opts, key):
            continue
        before, after = saved[key], json.loads(json.dumps(getattr(opts, key)))
        if key in DATA:
            change = _data_change(key, before, after, saved_fp, now_fp, saved_cwd)
            if change:
                applied.append(change)
        elif key in MODEL_SOURCES:
            if _resolved(before, saved_cwd) != _resolved(after, None):
                ignored.append(f"{key} {before} -> {after}")
        elif before != after:
            applied.append(f"{key} {before} -> {after}")
    then = saved_world(path)
    if then != world:
        applied.append(f"world size {then} -> {world}")
    if (applied or ignored) and not allow:
        listed = ", ".join(applied + [f"{c} (a resume ignores it: the weights come from the checkpoint)"
                                      for c in ignored])
        raise UsageError(f"--checkpoint_dir: resuming {path} with changed options ({listed}) — repeat the original "
                         "values (or pass a new --checkpoint_dir for a new run), or add --allow_option_changes to "
                         "apply them")
    notes = [f"warning: resume applies a changed option: {c}" for c in applied]
    notes += [f"warning: resume ignores a changed option: {c} (the weights come from {path})" for c in ignored]
    if then != world:
        notes.append(f"warning: the checkpoint was written by {then} process(es), this run has {world}: the data "
                     "order is re-sharded and ranks without their own RNG file start from rank 0's")
    if "total_steps" in saved and saved["total_steps"] != opts.total_steps:
        notes.append(f"--total_steps {saved['total_steps']} -> {opts.total_steps}: the learning-rate schedule "
                     f"now ends at step {opts.total_steps}")
    return notes


def apply_optimizer_options(optimizer, scheduler, lr, weight_decay):
    """After loading a checkpoint's optimizer and scheduler: use this run's learning rate (the
    schedule's base), the current schedule factor and weight decay, instead of the restored ones."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
        group["weight_decay"] = weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def drop_rows_after(checkpoint_dir, step):
    """Rank 0 on resume: remove metrics.jsonl / samples.jsonl rows of steps after the resumed one
    (the crashed run logged them; the resumed run logs them again). Returns rows dropped."""
    dropped = 0
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                row_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                row_step = None  # a line cut by the crash
                if not line.endswith("\n"):
                    dropped += 1
                    continue
            if isinstance(row_step, int) and row_step > step:
                dropped += 1
                continue
            kept.append(line)
        if len(kept) != len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
    return dropped
