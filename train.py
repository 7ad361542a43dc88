"""Train LAPDOG-GRPO: stage 1 (closed-book reader), stage 2 (LAPDOG retriever training, REINFORCE,
generator GRPO, joint GRPO). Readable top to bottom:
options -> distributed -> data -> models (resume / --model_path / fresh) -> optimizers -> index -> steps.

    python train.py --closed_book --train_data ... --eval_data ... --reader_model_type DIR
    python -m torch.distributed.launch --nproc_per_node=2 train.py ...   (or torchrun)

A step is one optimizer update everywhere (--total_steps, --warmup_steps, --eval_freq,
--save_freq, --log_freq, step-N).
"""

import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from src import checkpoint, distributed, grpo, options, provenance  # noqa: E402
from src import exits, interrupt, preflight, reference, resume, safety  # noqa: E402
from src.data import ShardedSampler, load_dialogues, load_passages, pick_answer  # noqa: E402
from src.errors import flag_error  # noqa: E402
from src.evaluation import evaluate, output_paths  # noqa: E402
from src.lapdog import Batch, LapdogModel, make_batch, rollout_reply_tokens, training_kind  # noqa: E402
from src.model_card import write_model_cards  # noqa: E402
from src.reader import FiDReader  # noqa: E402
from src.retrieval import StoryRetrieval  # noqa: E402
from src.retriever import Retriever  # noqa: E402
from src.tracking import StatWindow, Tracker, peak_memory_mb  # noqa: E402


def lr_multiplier(step, warmup, total, kind):
    """Learning-rate factor for the update that follows `step` completed updates.

    Warmup is linear from 1/warmup to 1 (the first update already moves); with warmup >= total
    the rate simply stays in warmup. Then linear decay to 0 at `total`, cosine, or constant.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "fixed":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def load_data(opts, info):
    train = [ex for path in opts.train_data for ex in load_dialogues(path)]
    evals = {}
    for name, path in preflight.eval_names(opts.eval_data).items():
        exs = load_dialogues(path)
        evals[name] = exs[: opts.max_eval_examples]
    passages = None if opts.closed_book else load_passages(opts.passages, opts.max_passages)
    return train, evals, passages


def load_models(opts, resume_path):
    """(reader, retriever, where from). `latest` in --checkpoint_dir wins over --model_path."""
    retriever = None
    if resume_path:
        reader_path, src_ret = os.path.join(resume_path, "reader"), os.path.join(resume_path, "retriever")
        origin = f"resumed from {resume_path}"
    elif opts.model_path:
        checkpoint.check_model_path(opts.model_path)
        reader_path = os.path.join(opts.model_path, "reader")
        src_ret = None if opts.load_reader_weights_only else os.path.join(opts.model_path, "retriever")
        origin = f"started from {opts.model_path}"
    else:
        reader_path, src_ret, origin = opts.reader_model_type, None, f"new run from {opts.reader_model_type}"
    new_reader = not (resume_path or opts.model_path)  # a checkpoint's reader keeps its own config
    reader = FiDReader.from_pretrained(reader_path, dropout=opts.dropout,
                                       gradient_checkpointing=opts.use_gradient_checkpoint_reader,
                                       pointer_generator=opts.pointer_generator and new_reader)
    if not opts.closed_book:
        path = src_ret if src_ret and os.path.isdir(src_ret) else opts.retriever_model_path
        retriever = Retriever.from_pretrained(path, gradient_checkpointing=opts.use_gradient_checkpoint_retriever)
    return reader, retriever, origin


def reference_models(opts, reader, retriever, info, resumed=False, taken_from="", log=print):
    """Frozen copies taken when stage 2 starts; saved once under {checkpoint_dir}/reference/
    with what they were taken from (src/reference.py)."""
    if not opts.use_grpo:
        return None, None
    ref_dir = os.path.join(opts.checkpoint_dir, "reference")
    need_ret = opts.grpo_train_retriever
    current = None if resumed else reference.fingerprints(reader, retriever if need_ret else None)
    reuse, note = reference.decide(ref_dir, taken_from, current, resumed)
    if note:
        log(note)
    if reuse:
        ref_reader = FiDReader.from_pretrained(os.path.join(ref_dir, "reader"))
        ref_ret = Retriever.from_pretrained(os.path.join(ref_dir, "retriever")) if need_ret else None
    else:
        ref_reader = copy.deepcopy(reader)
        ref_ret = copy.deepcopy(retriever) if need_ret else None
        distributed.barrier()  # every rank has decided before rank 0 replaces the folder
        if info.is_main:
            reference.clear(ref_dir)
            ref_reader.save_pretrained(os.path.join(ref_dir, "reader"))
            if ref_ret is not None:
                ref_ret.save_pretrained(os.path.join(ref_dir, "retriever"))
            checkpoint.make_readable(ref_dir)
            reference.mark_complete(ref_dir, taken_from, current)
        distributed.barrier()
    for m in (ref_reader, ref_ret):
        if m is not None:
            m.to(info.device).eval().requires_grad_(False)
    return ref_reader, ref_ret


def passage_encoder(opts, resume_path, retriever, info):
    """--query_side_retriever_training: the frozen passage side of the untied retriever, or None.

    It is the retriever as this run started: on resume, and when --model_path is a checkpoint
    that was itself trained query-side, the saved passage_retriever/; else a copy of the retriever
    before any update. Saved in every step-N (evaluate.py embeds the corpus with it).
    """
    if retriever is None or not opts.query_side_retriever_training:
        return None
    source = resume_path or (None if opts.load_reader_weights_only else opts.model_path)
    saved = os.path.join(source, "passage_retriever") if source else None
    frozen = Retriever.from_pretrained(saved) if saved and os.path.isdir(saved) else copy.deepcopy(retriever)
    return frozen.to(info.device).eval().requires_grad_(False)


def make_optimizer(params, lr, opts):
    params = [p for p in params if p.requires_grad]
    # fused: one kernel per parameter on CPU and CUDA (4x faster than foreach on CPU here);
    # foreach (multi-tensor, still no Python loop) on other devices.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    kwargs = dict(lr=lr, weight_decay=opts.weight_decay, betas=(0.9, opts.beta2), eps=opts.epsilon,
                  **({"fused": True} if fused else {"foreach": True}))
    if opts.shard_optim and distributed.is_distributed():
        from fairscale.optim.oss import OSS
        opt = OSS(params, optim=torch.optim.AdamW, **kwargs)
    else:
        opt = torch.optim.AdamW(params, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, opts.warmup_steps, opts.scheduler_steps or opts.total_steps, opts.scheduler))
    return opt, sched


def optimizer_state(opt):
    if hasattr(opt, "consolidate_state_dict"):  # fairscale OSS: every rank takes part
        opt.consolidate_state_dict(recipient_rank=0)
        return opt.state_dict() if distributed.is_distributed() and torch.distributed.get_rank() == 0 else {}
    return opt.state_dict()


def clip_and_norm(opt, params, max_norm):
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    if hasattr(opt, "clip_grad_norm"):
        return float(opt.clip_grad_norm(limit))
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def save(opts, info, step, model, optims, scheds, sampler, data_rng, tracker, rollout_state=None):
    """rollout_state: {"micro", "rollouts", "iteration"} when saved part-way through a batch's
    --grpo_num_iterations updates (every rank is at the same iteration), else None."""
    states = {name: optimizer_state(o) for name, o in optims.items()}  # collective for OSS
    if info.is_main:
        tmp = checkpoint.begin_save(opts.checkpoint_dir, step)
    distributed.barrier()
    tmp = checkpoint.tmp_dir(opts.checkpoint_dir, step)
    checkpoint.write_rank_rng(tmp, info.rank, data_rng)
    checkpoint.write_rank_rollout(tmp, info.rank, rollout_state)
    distributed.barrier()
    if info.is_main:
        models = {"reader": model.reader}
        if model.retriever is not None:
            models["retriever"] = model.retriever
        if model.refs["passage_encoder"] is not None:
            models["passage_retriever"] = model.refs["passage_encoder"]
        state = {"step": step, "sampler": sampler.state_dict(),
                 "optimizers": states, "schedulers": {n: s.state_dict() for n, s in scheds.items()},
                 "world": info.world, "rollout_iteration": rollout_state["iteration"] if rollout_state else 0}
        checkpoint.write_main(tmp, models, options.to_json_dict(opts), state)
        write_model_cards(tmp, options.to_json_dict(opts), step, tracker.eval_at(step))
        path = checkpoint.commit_save(opts.checkpoint_dir, step)
        tracker.info(f"saved {path}")
        for old in checkpoint.prune(opts.checkpoint_dir, opts.keep_checkpoints):
            tracker.info(f"removed {old} (--keep_checkpoints {opts.keep_checkpoints})")
    distributed.barrier()


def uses_dapo(opts, kind):
    """dapo's loss on a GRPO objective: rollouts drawn before any loss, TRL's token divisor."""
    return kind in ("grpo", "grpo_joint") and opts.grpo_loss_type == "dapo"


@torch.no_grad()
def sample_rollouts(model, kind, micro, autocast, step):
    """dapo: draw every micro-batch's rollout before any loss, so the step's token count is known
    first (TRL counts the whole generation batch). The unwrapped model, no gradient: nothing for
    DDP to reduce. Returns (rollouts, their statistics averaged over the micro-batches)."""
    rollouts, stats_sum = [], {}
    model.sampling_pass = True
    try:
        for b in micro:
            with autocast:
                _, stats, rollout = model(kind, b, None, step=step)
            rollouts.append(rollout)
            samples = stats.pop("_samples", None)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / len(micro)
            if samples:
                stats_sum["_samples"] = samples
    finally:
        model.sampling_pass = False
    return rollouts, stats_sum


def dapo_normalizer(rollouts, info):
    """TRL's dapo divisor: the reply tokens of the whole accumulated batch over all processes
    (one all-reduce per batch of rollouts), spread over micro-batches and processes."""
    local = sum(rollout_reply_tokens(r) for r in rollouts).to(info.device, torch.float64)
    return grpo.dapo_normalizer(distributed.all_reduce_sum(local).item(), len(rollouts), info.world)


@dataclasses.dataclass
class StepBatch:
    """The micro-batches of --grpo_num_iterations (μ) updates: drawn for the first, then reused,
    with the GRPO rollouts the first update drew (or dapo's sampling pass before it)."""
    kind: str                   # the objective (training_kind at the step it was drawn for)
    micro: list                 # accumulation_steps Batch
    rollouts: list              # one per micro-batch, None until drawn
    done: int = 0               # updates tried with it; a skipped (non-finite) one counts
    sampled: dict = dataclasses.field(default_factory=dict)  # dapo sampling pass: stats of its first update
    t_retrieval: float = 0.0    # seconds spent drawing it, logged with its first applied update
    normalizer: float | None = None  # dapo's token divisor, computed before its first update

    def reuse_state(self, mu):
        """What a checkpoint saved now needs to finish this batch's updates on resume (the
        micro-batches, rollouts and updates done), or None when they are all done."""
        return {"micro": self.micro, "rollouts": self.rollouts, "iteration": self.done} if self.done < mu else None


def draw_batch(run, step, train, sampler, data_rng, retrieval):
    """A new StepBatch for update `step`: accumulation_steps micro-batches (their retrieval
    included) and, with dapo, every micro-batch's rollout."""
    opts, model = run.opts, run.model
    kind = training_kind(opts, step)
    t_retrieval = time.perf_counter()
    micro = []
    for _ in range(opts.accumulation_steps):
        exs = [train[i] for i in sampler.next_batch()]
        answers = [pick_answer(ex, data_rng) for ex in exs]
        micro.append(make_batch(exs, answers, model.reader, retrieval, model.retriever, opts, data_rng,
                                run.info.device, step=step))
    batch = StepBatch(kind, micro, [None] * len(micro), t_retrieval=time.perf_counter() - t_retrieval)
    if uses_dapo(opts, kind):
        batch.rollouts, batch.sampled = sample_rollouts(model, kind, micro, run.autocast, step)
    return batch


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


def train_step(run, batch, step):
    """One optimizer update, the one after `step` completed updates, with `batch`'s micro-batches:
    gradient accumulation (DDP syncs on the last), the rollouts drawn or reused, gradient
    clipping, the non-finite guard, then the optimizer and scheduler steps."""
    opts, info, model, optims, scaler = run.opts, run.info, run.model, run.optims, run.scaler
    if uses_dapo(opts, batch.kind):
        if batch.normalizer is None:
            batch.normalizer = dapo_normalizer(batch.rollouts, info)
        model.token_normalizer = batch.normalizer
    batch.done += 1
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    stats, n = {}, len(batch.micro)
    for i, b in enumerate(batch.micro):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not info.distributed else run.wrapped.no_sync()
        with sync:
            with run.autocast:
                loss, micro_stats, batch.rollouts[i] = run.wrapped(batch.kind, b, batch.rollouts[i], step=step)
            loss = loss / n
            (scaler.scale(loss) if scaler else loss).backward()
        samples = model.samples
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v / n
    # dapo's sampling pass: its reward and sampling statistics belong to this (first) update
    samples = batch.sampled.pop("_samples", samples)
    for k, v in batch.sampled.items():
        stats[k] = stats.get(k, 0.0) + v if k.startswith("time/") else stats.get(k, v)
    batch.sampled = {}
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
        return StepResult(stats, samples, False, stop)
    stats.update(run.guard.log_values())
    for name, o in optims.items():
        if name == "retriever" and options.retriever_frozen_at(opts, step):
            continue
        scaler.step(o) if scaler else o.step()
    if scaler:
        scaler.update()
    for s in run.scheds.values():
        s.step()
    stats["time/retrieval"], batch.t_retrieval = batch.t_retrieval, 0.0
    return StepResult(stats, samples, True, stop)


def log_window(window, step, samples, scheds, sampler, info, tracker):
    """One metrics row: the window's per-key means over ranks, learning rates, speed, memory."""
    logged = distributed.all_reduce_mean(window.means(), info.device)
    logged.update({f"lr/{name}": s.get_last_lr()[0] for name, s in scheds.items()})
    logged["examples_per_s"] = window.examples_per_s()
    logged["memory/peak_mb"] = peak_memory_mb(info.device)
    logged["epoch"] = sampler.epoch
    tracker.log(step, logged)
    if samples:
        tracker.log_samples(step, samples[:8])
    window.reset()


def run_evaluations(opts, info, model, retrieval, evals, step, tracker):
    results = {}
    for name, exs in evals.items():
        path, metrics_path = output_paths(os.path.join(opts.checkpoint_dir, "results"), step, name)
        path = path if opts.write_results else None
        m = evaluate(model, retrieval, exs, opts, info, results_path=path, desc=f"eval {name}",
                     metrics_path=metrics_path, about={"step": step, "eval": name})
        results.update({f"eval/{name}/{k}": v for k, v in m.items()})
        if path:
            tracker.info(f"wrote {path}")
    tracker.log(step, results)
    return results


def make_optimizers(opts, reader, retriever, train_retriever):
    """({name: optimizer}, {name: scheduler}) of the trained parts, reader first."""
    optims, scheds = {}, {}
    if not opts.fix_reader:
        optims["reader"], scheds["reader"] = make_optimizer(reader.parameters(), opts.lr, opts)
    if train_retriever:
        optims["retriever"], scheds["retriever"] = make_optimizer(retriever.parameters(), opts.lr_retriever, opts)
    return optims, scheds


def restore(opts, info, resume_path, optims, scheds, sampler, data_rng, tracker):
    """Continue from a checkpoint: optimizers, schedulers, sampler and this rank's data RNG.
    Returns (step, the StepBatch saved part-way through or None)."""
    state = checkpoint.load_state(resume_path)
    step = int(state["step"])
    sampler.load_state_dict(state["sampler"])
    for name, o in optims.items():
        o.load_state_dict(state["optimizers"][name])
    for name, s in scheds.items():
        s.load_state_dict(state["schedulers"][name])
        if opts.allow_option_changes:
            resume.apply_optimizer_options(optims[name], s, opts.lr if name == "reader" else opts.lr_retriever,
                                           opts.weight_decay)
    rng = checkpoint.load_rank_rng(resume_path, info.rank)
    if rng is not None:
        checkpoint.set_rng_state(rng, data_rng)
    pending = resumed_batch(opts, resume_path, state, info, tracker)
    tracker.info(f"continuing at step {step}")
    return step, pending


def precision(opts, info):
    """(autocast context, fp16 GradScaler or None) for --precision."""
    autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if opts.precision == "bf16"
                else torch.autocast(info.device.type, dtype=torch.float16) if opts.precision == "fp16"
                else contextlib.nullcontext())
    return autocast, torch.amp.GradScaler("cuda") if opts.precision == "fp16" else None


def stop_interrupted(tracker, message):
    tracker.close(exit_code=interrupt.EXIT_INTERRUPTED)
    raise interrupt.Interrupted(f"Ctrl-C: {message}; the same command resumes")


def main(argv=None):
    opts, _ = options.parse(argv)
    options.validate(opts)
    if opts.retrieve_only:
        raise flag_error("--retrieve_only", "is an evaluation mode", "run evaluate.py --retrieve_only --model_path ...")
    preflight.check_options(opts)
    opts.run_info = provenance.run_info(sys.argv[1:] if argv is None else argv)  # into options.json
    if not opts.train_data:
        raise flag_error("--train_data", "is required for training", "pass a dialogue jsonl file")
    if not opts.closed_book and not opts.passages:
        raise flag_error("--passages", "is required unless --closed_book", "pass the story corpus jsonl")
    info = distributed.init_distributed(opts.local_rank, opts.dist_timeout)
    options.validate_for_device(opts, info.device.type)
    preflight.check_writable_dir(opts.checkpoint_dir, "--checkpoint_dir")
    exits.note_output(opts.checkpoint_dir)
    train, evals, passages = load_data(opts, info)  # validated before anything is trained
    preflight.check_corpus(opts, passages)

    # Every check that needs no model runs before the first file is written.
    resume_path, notes = checkpoint.resolve_resume(opts.checkpoint_dir, clean=info.is_main)
    if resume_path:
        notes += resume.compare(checkpoint.load_options(resume_path), opts, resume_path, info.world,
                                opts.allow_option_changes)
        if info.is_main and resume.drop_rows_after(opts.checkpoint_dir, int(os.path.basename(resume_path)[5:])):
            notes.append(f"dropped metrics/samples rows logged after {os.path.basename(resume_path)} by the earlier run")
    elif opts.model_path:
        checkpoint.check_model_path(opts.model_path)
    os.makedirs(opts.checkpoint_dir, exist_ok=True)
    tracker = Tracker(opts.checkpoint_dir, opts.name, options.to_json_dict(opts), rank=info.rank,
                      use_wandb=opts.use_wandb, wandb_project=opts.wandb_project,
                      wandb_entity=opts.wandb_entity, wandb_run_name=opts.wandb_run_name or opts.name)
    random.seed(opts.seed + info.rank)
    np.random.seed(opts.seed + info.rank)
    torch.manual_seed(opts.seed + info.rank)

    for note in notes:
        tracker.info(note)
    weights_from = resume_path or opts.model_path or opts.reader_model_type
    with checkpoint.reading_models(weights_from):
        reader, retriever, origin = load_models(opts, resume_path)
    safety.check_loaded_weights({"reader": reader, "retriever": retriever}, weights_from)
    tracker.info(f"{origin}; {info.world} process(es) on {info.device}; {len(train)} training examples"
                 + ("" if passages is None else f", {len(passages)} stories"))
    for line in options.warnings(opts):
        tracker.info(line)
    ref_reader, ref_retriever = reference_models(opts, reader, retriever, info, resumed=bool(resume_path),
                                                 taken_from=weights_from, log=tracker.info)
    frozen_passages = passage_encoder(opts, resume_path, retriever, info)
    model = LapdogModel(reader, retriever, opts, ref_reader, ref_retriever, frozen_passages).to(info.device)
    train_retriever = options.retriever_trained(opts)
    if retriever is not None and not train_retriever:
        retriever.requires_grad_(False)
    if opts.fix_reader:
        reader.requires_grad_(False)
    optims, scheds = make_optimizers(opts, reader, retriever, train_retriever)
    sampler = ShardedSampler(len(train), opts.per_gpu_batch_size, info.rank, info.world, opts.shuffle, opts.seed)
    data_rng = random.Random(opts.seed * 1000 + info.rank)
    step, batch = 0, None  # batch: the StepBatch of the coming update(s)
    if resume_path:
        step, batch = restore(opts, info, resume_path, optims, scheds, sampler, data_rng, tracker)
    wrapped = distributed.wrap_model(model, info, opts.shard_grads, optims.values(),
                                     find_unused_parameters=train_retriever)
    retrieval = None
    if passages is not None:
        retrieval = StoryRetrieval(passages, opts, info, dialogues=train)
        seconds = retrieval.build(retriever if frozen_passages is None else frozen_passages)
        tracker.info(f"index over {len(passages)} stories built in {seconds:.1f}s")
    autocast, scaler = precision(opts, info)
    if step >= opts.total_steps:
        tracker.info(f"already at step {step} >= --total_steps {opts.total_steps}: nothing to train")
    window = StatWindow(examples_per_step=opts.per_gpu_batch_size * opts.accumulation_steps * info.world)
    mu = opts.grpo_num_iterations if opts.use_grpo else 1
    run = StepRun(opts, info, model, wrapped, optims, scheds, autocast, scaler,
                  safety.StepGuard(opts.max_nonfinite_steps), interrupt.StopOnInterrupt().install(), tracker)
    tracker.start_progress(step, opts.total_steps)
    model.train()

    while step < opts.total_steps:
        if batch is None or batch.done >= mu:  # a batch serves μ updates (GRPO rollout reuse)
            batch = draw_batch(run, step, train, sampler, data_rng, retrieval)
        result = train_step(run, batch, step)
        if not result.applied:
            if result.stop:
                save(opts, info, step, model, optims, scheds, sampler, data_rng, tracker)
                stop_interrupted(tracker, f"stopped at step {step}, saved {checkpoint.step_dir(opts.checkpoint_dir, step)}")
            continue
        step += 1
        tracker.advance(step)
        window.add(result.stats)
        if opts.log_freq and step % opts.log_freq == 0:
            log_window(window, step, result.samples, scheds, sampler, info, tracker)
        if retrieval is not None and retrieval.should_refresh(step):
            tracker.log(step, {"time/index_refresh": retrieval.build(retriever, allow_load=False)})
        if opts.eval_freq and step % opts.eval_freq == 0 and evals:
            model.eval()
            run_evaluations(opts, info, model, retrieval, evals, step, tracker)
            model.train()
        if (opts.save_freq and step % opts.save_freq == 0) or step == opts.total_steps or result.stop:
            save(opts, info, step, model, optims, scheds, sampler, data_rng, tracker, batch.reuse_state(mu))
        if result.stop:
            stop_interrupted(tracker, f"stopped after step {step}, saved {checkpoint.step_dir(opts.checkpoint_dir, step)}")
    run.stopper.uninstall()
    tracker.finish(step, opts.total_steps)
    tracker.close()
    distributed.cleanup()
    return 0


def entry(main_fn, argv=None):
    return exits.run(main_fn, argv)


if __name__ == "__main__":
    sys.exit(entry(main))
