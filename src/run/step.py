"""One optimizer update: the batch it uses (drawn, or reused for --grpo_num_iterations updates),
gradient accumulation, clipping, the non-finite guard, the optimizer and scheduler steps.

Data flows one way: ``draw_batch`` returns a ``StepBatch`` (with dapo, every micro-batch's
rollout and the step's token divisor already in it), ``train_step`` returns a ``StepResult``
(statistics, logged sample rows, the rollouts for the next reuse) and never changes the batch;
``StepBatch.after(result)`` is the batch for the next update.
"""

import contextlib
import dataclasses
import time

import torch

from src.data.denoising import mlm_example
from src.data.prompts import pick_answer
from src.infra import distributed, interrupt, safety
from src.infra.tracking import Tracker
from src.model.lapdog import LapdogModel, rollout_reply_tokens
from src.objectives import grpo
from src.objectives.schedule import retriever_frozen_at, training_kind
from src.run import checkpoint
from src.run.batch import Batch, make_batch
from src.run.optim import clip_and_norm


def uses_dapo(opts, kind):
    """dapo's loss on a GRPO objective: rollouts drawn before any loss, TRL's token divisor."""
    return kind in ("grpo", "grpo_joint") and opts.grpo_loss_type == "dapo"


@torch.no_grad()
def sample_rollouts(model, kind, micro, autocast, step):
    """dapo: draw every micro-batch's rollout before any loss, so the step's token count is known
    first (TRL counts the whole generation batch). The unwrapped model, no gradient: nothing for
    DDP to reduce. Returns (rollouts, their statistics averaged over the micro-batches, the sample
    rows of the last micro-batch)."""
    rollouts, stats_sum, samples = [], {}, []
    for b in micro:
        with autocast:
            _, stats, rollout, samples = model(kind, b, None, step=step, sampling_only=True)
        rollouts.append(rollout)
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v / len(micro)
    return rollouts, stats_sum, samples


def dapo_normalizer(rollouts, info):
    """TRL's dapo divisor: the reply tokens of the whole accumulated batch over all processes
    (one all-reduce per batch of rollouts), spread over micro-batches and processes."""
    local = sum(rollout_reply_tokens(r) for r in rollouts).to(info.device, torch.float64)
    return grpo.dapo_normalizer(distributed.all_reduce_sum(local).item(), len(rollouts), info.world)


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The micro-batches of --grpo_num_iterations (μ) updates: drawn for the first, then reused,
    with the GRPO rollouts the first update drew (or dapo's sampling pass before it)."""
    kind: str                   # the objective (training_kind at the step it was drawn for)
    micro: list                 # accumulation_steps Batch
    rollouts: list              # one per micro-batch, None until drawn
    done: int = 0               # updates tried with it; a skipped (non-finite) one counts
    sampled: dict = dataclasses.field(default_factory=dict)  # dapo sampling pass: stats of its first update
    sampled_rows: list = dataclasses.field(default_factory=list)  # ... and its sample rows
    t_retrieval: float = 0.0    # seconds spent drawing it, logged with its first applied update
    normalizer: float | None = None  # dapo's token divisor

    def after(self, result):
        """The batch for the next update, once ``result`` (a StepResult of this batch) is known."""
        return dataclasses.replace(self, rollouts=result.rollouts, done=self.done + 1, sampled={}, sampled_rows=[],
                                   t_retrieval=0.0 if result.applied else self.t_retrieval)

    def reuse_state(self, mu):
        """What a checkpoint saved now needs to finish this batch's updates on resume (the
        micro-batches, rollouts and updates done), or None when they are all done."""
        return {"micro": self.micro, "rollouts": self.rollouts, "iteration": self.done} if self.done < mu else None


def draw_batch(run, step, train, sampler, data_rng, retrieval):
    """A new StepBatch for update `step`: accumulation_steps micro-batches (their retrieval
    included) and, with dapo, every micro-batch's rollout and the step's token divisor."""
    opts, model = run.opts, run.model
    kind = training_kind(opts, step)
    t_retrieval = time.perf_counter()
    micro = []
    for _ in range(opts.accumulation_steps):
        exs = [train[i] for i in sampler.next_batch()]
        if opts.task == "mlm":  # new spans each time a text comes round, as T5 and Atlas corrupt on the fly
            exs = [mlm_example(ex["text"], data_rng, opts.mlm_noise_density, opts.mlm_mean_noise_span_length)
                   for ex in exs]
        answers = [pick_answer(ex, data_rng) for ex in exs]
        micro.append(make_batch(exs, answers, model.reader, retrieval, model.retriever, opts, data_rng,
                                run.info.device, step=step))
    t_retrieval = time.perf_counter() - t_retrieval
    if not uses_dapo(opts, kind):
        return StepBatch(kind, micro, [None] * len(micro), t_retrieval=t_retrieval)
    rollouts, sampled, rows = sample_rollouts(model, kind, micro, run.autocast, step)
    return StepBatch(kind, micro, rollouts, sampled=sampled, sampled_rows=rows, t_retrieval=t_retrieval,
                     normalizer=dapo_normalizer(rollouts, run.info))


def resumed_batch(opts, resume_path, state, info, tracker):
    """The StepBatch a checkpoint was saved part-way through (μ > 1), to finish its reuse
    updates first; None when it was saved between batches."""
    done = int(state.get("rollout_iteration", 0))
    if not done:
        return None
    if state.get("world") != info.world:  # the same test on every rank: all start a new batch
        tracker.info(f"the checkpoint was saved after {done} of a batch's --grpo_num_iterations updates by "
                     f"{state.get('world')} process(es); with {info.world} this run draws a new batch instead")
        return None
    saved = checkpoint.to_device(checkpoint.load_rank_rollout(resume_path, info.rank), info.device)
    return StepBatch(training_kind(opts, int(state["step"])), [Batch(b) for b in saved["micro"]],
                     saved["rollouts"], done=int(saved["iteration"]))


@dataclasses.dataclass
class StepRun:
    """What train_step needs: the model (and its DDP wrapper), optimizers, schedulers, precision,
    the non-finite guard, the Ctrl-C flag and the tracker."""
    opts: object
    info: object
    model: LapdogModel
    wrapped: torch.nn.Module
    optims: dict
    scheds: dict
    autocast: object
    scaler: object
    guard: safety.StepGuard
    stopper: interrupt.StopOnInterrupt
    tracker: Tracker


@dataclasses.dataclass
class StepResult:
    stats: dict                 # the update's statistics (averaged over micro-batches)
    samples: list               # sample rows of its last micro-batch (or of dapo's sampling pass)
    applied: bool               # False: skipped as non-finite (weights, optimizers, step unchanged)
    stop: bool                  # some rank was asked to stop (Ctrl-C)
    rollouts: list              # the micro-batches' rollouts, for the batch's next reuse


def train_step(run, batch, step):
    """One optimizer update, the one after `step` completed updates, with `batch`'s micro-batches:
    gradient accumulation (DDP syncs on the last), the rollouts drawn or reused, gradient
    clipping, the non-finite guard, then the optimizer and scheduler steps."""
    opts, info, model, optims, scaler = run.opts, run.info, run.model, run.optims, run.scaler
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    stats, n, rollouts, samples = {}, len(batch.micro), list(batch.rollouts), []
    for i, b in enumerate(batch.micro):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not info.distributed else run.wrapped.no_sync()
        with sync:
            with run.autocast:
                loss, micro_stats, rollouts[i], samples = run.wrapped(batch.kind, b, rollouts[i], step=step,
                                                                      token_normalizer=batch.normalizer)
            loss = loss / n
            (scaler.scale(loss) if scaler else loss).backward()
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v / n
    # dapo's sampling pass: its reward and sampling statistics and rows belong to this (first) update
    samples = batch.sampled_rows or samples
    for k, v in batch.sampled.items():
        stats[k] = stats.get(k, 0.0) + v if k.startswith("time/") else stats.get(k, v)
    if scaler:
        for o in optims.values():
            scaler.unscale_(o)
    for name in ("reader", "retriever"):
        if name in optims:
            stats[f"grad_norm/{name}"] = clip_and_norm(optims[name], getattr(model, name).parameters(), opts.clip)
    # fp16: GradScaler skips steps with inf gradients by design; only the loss is checked.
    applied, stop = run.guard.check(step, stats, run.stopper.requested, info.device, check_grads=not scaler)
    if not applied:
        g = run.guard
        run.tracker.warning(f"step {step + 1}: {g.last}, update skipped ({g.consecutive} in a row, {g.skipped} in this run)")
        for o in optims.values():
            o.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        return StepResult(stats, samples, False, stop, rollouts)
    stats.update(run.guard.log_values())
    for name, o in optims.items():
        if name == "retriever" and retriever_frozen_at(opts, step):
            continue
        scaler.step(o) if scaler else o.step()
    if scaler:
        scaler.update()
    for s in run.scheds.values():
        s.step()
    stats["time/retrieval"] = batch.t_retrieval
    return StepResult(stats, samples, True, stop, rollouts)
