"""Resuming: the command line against the checkpoint it continues, and the logs past its step.

A restored optimizer carries its own learning rate and weight decay, so a changed --lr used to
be ignored while the new options.json claimed it ran. Options that change the optimization are
now refused on resume unless --allow_option_changes is given; then each is applied and logged.
Options that change what is trained (the stage) cannot continue a run at all.
"""

import glob
import json
import os

from src.errors import UsageError

# What is trained: a checkpoint of one stage cannot be continued as another.
STAGE = ("closed_book", "use_grpo", "reader_rl_learning", "grpo_train_retriever", "train_retriever", "fix_reader")
# How it is optimized: refused unless --allow_option_changes, then applied.
OPTIMIZATION = ("lr", "lr_retriever", "weight_decay", "clip", "per_gpu_batch_size", "accumulation_steps",
                "scheduler", "warmup_steps", "freeze_retriever_steps", "grpo_group_size",
                "grpo_retriever_group_size", "grpo_retriever_pool_size", "grpo_num_iterations",
                "grpo_kl_coeff", "grpo_clip_epsilon", "grpo_loss_type", "grpo_temperature", "grpo_top_p",
                "grpo_retriever_temperature")


def _stage(saved):
    if saved.get("closed_book"):
        return "a stage-1 (closed-book) run"
    if saved.get("use_grpo"):
        return "a GRPO run" + (" with the retriever trained" if saved.get("grpo_train_retriever") else "")
    return "a stage-2 run"


def saved_world(path):
    """World size of the run that wrote a checkpoint (one RNG file per rank)."""
    return max(1, len(glob.glob(os.path.join(path, "rng-rank*.pt"))))


def compare(saved, opts, path, world, allow):
    """Warning lines for the changes that will be applied; raises UsageError for a refused one.

    `saved` is the checkpoint's options.json, `world` this run's number of processes.
    """
    stage = [k for k in STAGE if k in saved and bool(saved[k]) != bool(getattr(opts, k))]
    if stage:
        flags = ", ".join(f"--{k} {'on' if getattr(opts, k) else 'off'} (checkpoint: "
                          f"{'on' if saved[k] else 'off'})" for k in stage)
        raise UsageError(f"--checkpoint_dir: {opts.checkpoint_dir} holds {_stage(saved)} ({path}) but this command "
                         f"differs in {flags} — to start the next stage from it pass a new --checkpoint_dir and "
                         f"--model_path {path}; to continue it, repeat its own command")
    changes = [(k, saved[k], getattr(opts, k)) for k in OPTIMIZATION if k in saved and saved[k] != getattr(opts, k)]
    then = saved_world(path)
    if then != world:
        changes.append(("world size", then, world))
    if changes and not allow:
        listed = ", ".join(f"{k} {a} -> {b}" for k, a, b in changes)
        raise UsageError(f"--checkpoint_dir: resuming {path} with changed optimization options ({listed}) — "
                         "repeat the original values, or add --allow_option_changes to apply the new ones")
    notes = [f"warning: resume applies a changed option: {k} {a} -> {b}" for k, a, b in changes]
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
