"""Checkpoints: self-describing folders, written atomically, loaded without pickle.

Layout of `{checkpoint_dir}/checkpoint/step-N/`:
    reader/          HF model folder (safetensors) + tokenizer
    retriever/       HF encoder folder + tokenizer (runs with retrieval)
    options.json     the run's options
    state.pt         step, optimizer / scheduler / data-order state (torch.load(weights_only=True))
    rng-rank{r}.pt   each rank's RNG state (python, numpy as plain lists, torch, cuda)
    rollout-rank{r}.pt  only when saved part-way through --grpo_num_iterations μ > 1 updates of
                     one batch: that rank's micro-batches, their rollouts and the updates done,
                     so a resumed run makes the remaining reuse updates (tensors, strings, dicts)
`{checkpoint_dir}/checkpoint/latest` is a symlink to the newest complete step folder. A step folder
is assembled under a temporary name and renamed into place, then `latest` is swapped with an atomic
rename, so a crash mid-save never leaves a half-written checkpoint behind `latest`.
"""

import contextlib
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors import safe_open

from src.infra.errors import UsageError, data_error, flag_error
from src.infra.exits import disk_problem
from src.infra.files import make_readable
from src.infra.safety import check_weights_to_save


def checkpoint_root(checkpoint_dir):
    return os.path.join(checkpoint_dir, "checkpoint")


def step_dir(checkpoint_dir, step):
    return os.path.join(checkpoint_root(checkpoint_dir), f"step-{step}")


def step_of(path):
    """The step of a checkpoint folder: N of its `step-N` name (after resolving `latest`), else the
    step in its state.pt, else None."""
    path = os.path.realpath(path)
    name = os.path.basename(path.rstrip(os.sep))
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    if os.path.isfile(os.path.join(path, "state.pt")):
        return int(load_state(path)["step"])
    return None


def latest_checkpoint(checkpoint_dir):
    """The folder `latest` points at, or None when there is no complete checkpoint."""
    link = os.path.join(checkpoint_root(checkpoint_dir), "latest")
    if not os.path.islink(link) and not os.path.isdir(link):
        return None
    path = os.path.realpath(link)
    return path if os.path.isfile(os.path.join(path, "state.pt")) else None


def rng_state(data_rng=None):
    """Every RNG a rank draws from; `data_rng` is the trainer's own random.Random (answer picks,
    persona_rand queries, candidate augmentation)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "data": data_rng.getstate() if data_rng is not None else None,
        # numpy's state tuple holds an ndarray, which weights_only loading rejects: store plain lists.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _as_random_state(st):
    return (st[0], tuple(st[1]), st[2])


def set_rng_state(state, data_rng=None):
    random.setstate(_as_random_state(state["python"]))
    if data_rng is not None and state.get("data") is not None:
        data_rng.setstate(_as_random_state(state["data"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())


def begin_save(checkpoint_dir, step):
    """Rank 0: create an empty temporary folder for step N and return its path."""
    root = checkpoint_root(checkpoint_dir)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step-{step}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def tmp_dir(checkpoint_dir, step):
    return os.path.join(checkpoint_root(checkpoint_dir), f".tmp-step-{step}")


@contextlib.contextmanager
def writing(path):
    """Writing `path`: a full or read-only disk, however the library reports it (torch.save's
    RuntimeError, SafetensorError, the tokenizers' Exception, an OSError without a file name),
    becomes an OSError naming `path`, which the entry points print as one line."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None and disk_problem(exc):
            raise OSError(exc.errno, os.strerror(exc.errno), path) from None
        raise
    except Exception as exc:
        code = disk_problem(exc)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), path) from None


def write_rank_rng(tmp, rank, data_rng=None):
    path = os.path.join(tmp, f"rng-rank{rank}.pt")
    with writing(path):
        torch.save(rng_state(data_rng), path)


def _to_cpu(x):
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, dict):  # the batch is a dict subclass: saved as a plain dict
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def to_device(x, device):
    """Tensors of nested dicts/lists moved to ``device`` (for a loaded rollout)."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def write_rank_rollout(tmp, rank, rollout_state):
    """A rank's unfinished rollout (``{"micro", "rollouts", "iteration"}``), or nothing when None."""
    if rollout_state is not None:
        path = os.path.join(tmp, f"rollout-rank{rank}.pt")
        with writing(path):
            torch.save(_to_cpu(rollout_state), path)


def load_rank_rollout(path, rank):
    f = os.path.join(path, f"rollout-rank{rank}.pt")
    return torch.load(f, map_location="cpu", weights_only=True) if os.path.exists(f) else None


def write_main(tmp, models, options, state):
    """Rank 0: the models (objects with save_pretrained), options.json and state.pt."""
    check_weights_to_save(models, f"step {state.get('step')}")
    for name, model in models.items():
        with writing(os.path.join(tmp, name)):
            model.save_pretrained(os.path.join(tmp, name))
    with writing(os.path.join(tmp, "options.json")), open(os.path.join(tmp, "options.json"), "w") as f:
        json.dump(options, f, indent=1, sort_keys=True)
    with writing(os.path.join(tmp, "state.pt")):
        torch.save(state, os.path.join(tmp, "state.pt"))
    make_readable(tmp)


def commit_save(checkpoint_dir, step):
    """Rank 0: move the finished temporary folder into place and point `latest` at it."""
    tmp = tmp_dir(checkpoint_dir, step)
    with writing(tmp):
        _fsync_tree(tmp)
    final = step_dir(checkpoint_dir, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(checkpoint_dir, "latest", step)
    return final


def _point(checkpoint_dir, name, step):
    """Make the link `name` in checkpoint/ point at step-N, atomically (a new link renamed over it)."""
    root = checkpoint_root(checkpoint_dir)
    link_tmp = os.path.join(root, f".{name}-tmp")
    if os.path.lexists(link_tmp):
        os.remove(link_tmp)
    os.symlink(f"step-{step}", link_tmp)
    os.replace(link_tmp, os.path.join(root, name))


def mark_best(checkpoint_dir, step):
    """Rank 0: point `best` at step-N (as `latest`): the checkpoint early stopping keeps."""
    _point(checkpoint_dir, "best", step)


def _safe_load(f):
    """torch.load(weights_only=True), with a refused or damaged file as one UsageError line.

    torch's own message for a refused payload recommends weights_only=False, which would run
    whatever code the file carries: only its one-line diagnosis is passed on.
    """
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
        why = why or next((ln for ln in lines if "weights_only" not in ln), type(exc).__name__)
        raise UsageError(f"{f}: not a valid checkpoint state file ({why}) — delete "
                         f"{os.path.dirname(f)} to resume from the checkpoint before it, or start a new run") from None


def load_state(path):
    return _safe_load(os.path.join(path, "state.pt"))


def load_rank_rng(path, rank):
    f = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(f):
        f = os.path.join(path, "rng-rank0.pt")
    return _safe_load(f) if os.path.exists(f) else None


def load_options(path):
    f = os.path.join(path, "options.json")
    if not os.path.isfile(f):
        raise flag_error("--model_path", f"'{path}' is not a checkpoint (no options.json)",
                         "pass a folder such as ckpt/run/checkpoint/step-N or .../checkpoint/latest")
    try:
        with open(f) as fh:
            saved = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(f, getattr(exc, "lineno", None), f"invalid JSON ({exc})",
                         "restore the file from the training run, or evaluate another checkpoint") from None
    if not isinstance(saved, dict):
        raise data_error(f, None, "expected a JSON object of options", "restore the file from the training run")
    return saved


def check_model_path(path):
    if not os.path.isdir(os.path.join(path, "reader")):
        raise flag_error("--model_path", f"'{path}' has no reader/ folder",
                         "pass a checkpoint folder such as ckpt/run/checkpoint/step-N")
    return path


_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-step-(\d+)$")


def is_complete(path):
    """A step folder that a resume can use: everything write_main writes, and rank 0's RNG file."""
    return (os.path.isdir(os.path.join(path, "reader")) and
            all(os.path.isfile(os.path.join(path, f)) for f in ("state.pt", "options.json", "rng-rank0.pt")))


def step_folders(checkpoint_dir):
    """[(step, path)] of the step-N folders, oldest first."""
    root = checkpoint_root(checkpoint_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := _STEP_RE.match(name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


def resolve_resume(checkpoint_dir, clean=True):
    """(folder to resume from or None, log lines). `latest` when it is complete; else the newest
    complete step-N, saying why `latest` was passed over. Raises UsageError when step folders
    exist but none is complete: training from step 0 would overwrite them.

    `clean` (rank 0 only): remove .tmp-step-N folders, which a crash mid-save leaves behind and
    which a resume never reads.
    """
    root = checkpoint_root(checkpoint_dir)
    notes = []
    if clean and os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if _TMP_RE.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                notes.append(f"removed {os.path.join(root, name)} (a partial save left by an interrupted run)")
    link = os.path.join(root, "latest")
    why = "there is no `latest` link"
    if os.path.lexists(link):
        target = os.path.realpath(link)
        if is_complete(target):
            return target, notes
        why = (f"`latest` points at {target}, which does not exist" if not os.path.exists(target)
               else f"`latest` points at {target}, which is incomplete")
    steps = step_folders(checkpoint_dir)
    complete = [p for _, p in steps if is_complete(p)]
    if complete:
        notes.append(f"resuming from {complete[-1]}, the newest complete checkpoint ({why})")
        return complete[-1], notes
    if steps:
        names = ", ".join(os.path.basename(p) for _, p in steps)
        raise UsageError(f"{root}: {why} and no step folder ({names}) is complete (each needs reader/, "
                         "state.pt, options.json, rng-rank0.pt) — move or delete them to start a new run "
                         "there, or pass another --checkpoint_dir")
    if os.path.lexists(link):
        notes.append(f"{why} and there are no step folders: starting a new run")
    return None, notes


def prune(checkpoint_dir, keep):
    """Rank 0, after a save: delete all but the newest `keep` complete step folders (keep <= 0:
    keep all). The targets of `latest` and `best` and the newest complete folder are never deleted.
    Returns the deleted paths."""
    if keep <= 0:
        return []
    root = checkpoint_root(checkpoint_dir)
    pinned = {os.path.realpath(os.path.join(root, name)) for name in ("latest", "best")}
    complete = [p for _, p in step_folders(checkpoint_dir) if is_complete(p)]
    keep_set = set(complete[-keep:]) | pinned
    doomed = [p for p in complete if p not in keep_set]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


@contextlib.contextmanager
def reading_models(where):
    """Loading weights from `where`: a truncated or corrupted file becomes one UsageError line."""
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:  # safetensors, transformers and torch each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"{where}: cannot load the model weights ({type(exc).__name__}: {first}) — the files "
                         "are damaged or incomplete: use another checkpoint or re-create this one") from None


@contextlib.contextmanager
def reading_index(path):
    """Building the index with --load_index_path `path`: a damaged saved index (a truncated
    shard, a corrupted meta.json) becomes one UsageError line naming the folder."""
    if not path:
        yield
        return
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:  # safetensors, json and torch each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = _broken_shard(path) or path
        raise flag_error("--load_index_path", f"cannot load the index in {where} ({type(exc).__name__}: {first})",
                         "drop --load_index_path to rebuild it, or re-create it with --save_index_path") from None


def _broken_shard(path):
    """The first shard file of a saved index (meta.json's "files") that safetensors cannot open, or None."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            files = [str(x["file"]) for x in json.load(f)["files"]]
    except Exception:
        return None
    for name in files:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as fh:
                fh.keys()
        except Exception:
            return os.path.join(path, name)
    return None
