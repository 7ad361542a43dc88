"""Checkpoints: self-describing folders, written atomically, loaded without pickle.

Layout of `{checkpoint_dir}/checkpoint/step-N/`:
    reader/          HF model folder (safetensors) + tokenizer
    retriever/       HF encoder folder + tokenizer (runs with retrieval)
    options.json     the run's options
    state.pt         step, optimizer / scheduler / data-order state (torch.load(weights_only=True))
    rng-rank{r}.pt   each rank's RNG state (python, numpy as plain lists, torch, cuda)
`{checkpoint_dir}/checkpoint/latest` is a symlink to the newest complete step folder. A step folder
is assembled under a temporary name and renamed into place, then `latest` is swapped with an atomic
rename, so a crash mid-save never leaves a half-written checkpoint behind `latest`.
"""

import json
import os
import random
import shutil

import numpy as np
import torch

from src.errors import flag_error


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


def write_rank_rng(tmp, rank, data_rng=None):
    torch.save(rng_state(data_rng), os.path.join(tmp, f"rng-rank{rank}.pt"))


def write_main(tmp, models, options, state):
    """Rank 0: the models (objects with save_pretrained), options.json and state.pt."""
    for name, model in models.items():
        model.save_pretrained(os.path.join(tmp, name))
    with open(os.path.join(tmp, "options.json"), "w") as f:
        json.dump(options, f, indent=1, sort_keys=True)
    torch.save(state, os.path.join(tmp, "state.pt"))


def commit_save(checkpoint_dir, step):
    """Rank 0: move the finished temporary folder into place and point `latest` at it."""
    tmp = tmp_dir(checkpoint_dir, step)
    _fsync_tree(tmp)
    final = step_dir(checkpoint_dir, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = checkpoint_root(checkpoint_dir)
    link_tmp = os.path.join(root, ".latest-tmp")
    if os.path.lexists(link_tmp):
        os.remove(link_tmp)
    os.symlink(f"step-{step}", link_tmp)
    os.replace(link_tmp, os.path.join(root, "latest"))
    return final


def load_state(path):
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)


def load_rank_rng(path, rank):
    f = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(f):
        f = os.path.join(path, "rng-rank0.pt")
    return torch.load(f, map_location="cpu", weights_only=True) if os.path.exists(f) else None


def load_options(path):
    f = os.path.join(path, "options.json")
    if not os.path.isfile(f):
        raise flag_error("--model_path", f"'{path}' is not a checkpoint (no options.json)",
                         "pass a folder such as ckpt/run/checkpoint/step-N or .../checkpoint/latest")
    with open(f) as fh:
        return json.load(fh)


def check_model_path(path):
    if not os.path.isdir(os.path.join(path, "reader")):
        raise flag_error("--model_path", f"'{path}' has no reader/ folder",
                         "pass a checkpoint folder such as ckpt/run/checkpoint/step-N")
    return path
