"""Non-finite values: skip a step whose loss or gradient norm is NaN/inf, stop after too many in a
row (exit 3), and never save or load weights that hold NaN/inf.

Every rank must take the same decision or DDP's next all-reduce hangs, so the per-step flags
(this rank saw a non-finite value; this rank was asked to stop) are combined in one collective.
"""

import math

import torch

from src.infra import distributed
from src.infra.errors import NonFiniteError, UsageError

FIX = "lower --lr / --lr_retriever, use --precision fp32 instead of bf16/fp16, or check the training data"


def agree(flags, device):
    """OR of boolean flags over all ranks (one collective for all of them)."""
    if not distributed.is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def first_nonfinite(values, prefixes=("loss/", "grad_norm/")):
    """(name, value) of the first non-finite entry of a stats dict among the given keys, or None."""
    for k, v in values.items():
        if k.startswith(prefixes) and isinstance(v, (int, float)) and not math.isfinite(v):
            return k, v
    return None


class StepGuard:
    """Decides, once per optimizer step and identically on every rank, whether to apply it.

    A skipped step leaves weights, optimizer and schedulers untouched and does not advance the
    step counter; the next batch is drawn instead. `max_consecutive` skips in a row end the run.
    """

    def __init__(self, max_consecutive):
        self.max_consecutive = max_consecutive
        self.skipped = 0          # since the start of this process, logged as train/skipped_nonfinite
        self.consecutive = 0
        self.last = None          # what the last skipped step saw, for the log line

    def check(self, step, stats, stop_requested, device, check_grads=True):
        """(apply this step?, did any rank ask to stop?). Raises NonFiniteError after too many skips."""
        prefixes = ("loss/", "grad_norm/") if check_grads else ("loss/",)
        bad = first_nonfinite(stats, prefixes)
        any_bad, any_stop = agree([bad is not None, stop_requested], device)
        if not any_bad:
            self.consecutive = 0
            return True, any_stop
        self.skipped += 1
        self.consecutive += 1
        what = f"{bad[0]} {bad[1]}" if bad else "a non-finite loss or gradient norm on another rank"
        self.last = what
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step + 1}: {what} for {self.consecutive} consecutive steps "
                f"(--max_nonfinite_steps {self.max_consecutive}); no checkpoint was written for them — {FIX}")
        return False, any_stop

    def log_values(self):
        return {"train/skipped_nonfinite": float(self.skipped)}


def require_finite(tensor, what, step=None):
    """Raise NonFiniteError when a forward value (e.g. retrieval scores) holds NaN/inf; a model whose
    weights diverged gives no usable scores, and sampling from them would fail with an unrelated error."""
    # -inf is how unusable entries are masked; NaN and +inf are not.
    if bool((torch.isnan(tensor) | torch.isposinf(tensor)).any()):
        at = f"step {step + 1}: " if step is not None else ""
        raise NonFiniteError(f"{at}{what} are NaN/inf (the weights diverged) — {FIX}")


def first_nonfinite_tensor(state_dict):
    """Name of the first floating-point tensor holding NaN/inf, or None."""
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_weights_to_save(models, where):
    """Before writing a checkpoint: refuse weights that hold NaN/inf (exit 3)."""
    for part, model in models.items():
        name = first_nonfinite_tensor(model.state_dict())
        if name is not None:
            raise NonFiniteError(f"{where}: refusing to save: {part} weight '{name}' holds NaN/inf — {FIX}")


def check_loaded_weights(models, where, fix="use an earlier checkpoint or the pretrained model"):
    """After loading: a model holding NaN/inf is a broken file, not something to train or evaluate."""
    for part, model in models.items():
        if model is None:
            continue
        name = first_nonfinite_tensor(model.state_dict())
        if name is not None:
            raise UsageError(f"{where}: {part} weight '{name}' holds NaN/inf — {fix}")
