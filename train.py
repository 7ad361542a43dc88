"""Train LAPDOG-GRPO: stage 1 (closed-book reader), stage 2 (LAPDOG retriever training, REINFORCE,
generator GRPO, joint GRPO). Readable top to bottom:
options -> distributed -> data -> models (resume / --model_path / fresh) -> optimizers -> index -> steps.

    python train.py --closed_book --train_data ... --eval_data ... --reader_model_type DIR
    python -m torch.distributed.launch --nproc_per_node=2 train.py ...   (or torchrun)

A step is one optimizer update everywhere (--total_steps, --warmup_steps, --eval_freq,
--save_freq, --log_freq, step-N).
"""

import contextlib
import os
import random
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.infra import interrupt  # noqa: E402

if __name__ == "__main__":
    interrupt.quiet_start()  # Ctrl-C while torch loads: one line, not a traceback from an import

import numpy as np  # noqa: E402
import torch  # noqa: E402

from src.cli import options, preflight  # noqa: E402
from src.data.denoising import eval_examples, load_texts  # noqa: E402
from src.data.dialogues import load_dialogues, load_passages  # noqa: E402
from src.data.sampler import ShardedSampler  # noqa: E402
from src.evaluation.generation import evaluate, output_paths  # noqa: E402
from src.infra import distributed, exits, provenance, safety  # noqa: E402
from src.infra.errors import UsageError, flag_error  # noqa: E402
from src.infra.lock import RunLock  # noqa: E402
from src.infra.tracking import EarlyLines, StatWindow, Tracker, peak_memory_mb  # noqa: E402
from src.model.lapdog import LapdogModel  # noqa: E402
from src.objectives.schedule import retriever_trained  # noqa: E402
from src.retrieval.stories import StoryRetrieval  # noqa: E402
from src.run import checkpoint, resume  # noqa: E402
from src.run.early_stopping import EarlyStopping  # noqa: E402
from src.run.model_card import write_model_cards  # noqa: E402
from src.run.models import load_models, passage_encoder, reference_models  # noqa: E402
from src.run.optim import make_optimizers, optimizer_state  # noqa: E402
from src.run.step import StepRun, draw_batch, resumed_batch, train_step  # noqa: E402


def load_data(opts, info):
    if opts.task == "mlm":  # texts, corrupted as they are drawn (src/run/step.py)
        train = [{"text": t} for path in opts.train_data for t in load_texts(path)]
    else:
        train = [ex for path in opts.train_data for ex in load_dialogues(path)]
    evals = {name: eval_examples(path, opts.task, opts.max_eval_examples, opts.mlm_noise_density,
                                 opts.mlm_mean_noise_span_length)
             for name, path in preflight.eval_names(opts.eval_data).items()}
    passages = None if opts.closed_book else load_passages(opts.passages, opts.max_passages)
    return train, evals, passages


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
        with checkpoint.writing(tmp):
            write_model_cards(tmp, options.to_json_dict(opts), step, tracker.eval_at(step))
        path = checkpoint.commit_save(opts.checkpoint_dir, step)
        tracker.info(f"saved {path}")
        for old in checkpoint.prune(opts.checkpoint_dir, opts.keep_checkpoints):
            tracker.info(f"removed {old} (--keep_checkpoints {opts.keep_checkpoints})")
    distributed.barrier()


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


def stop_interrupted(tracker, signal_name, message):
    tracker.close(exit_code=interrupt.EXIT_INTERRUPTED)
    raise interrupt.Interrupted(f"{signal_name}: {message}; the same command resumes")


def main(argv=None):
    interrupt.stop_by_exception()  # Ctrl-C / SIGTERM before the loop: one line, the lock given back
    exits.note_log(None)
    early_lines = EarlyLines().install()  # warnings from before run.log exists (the data) go into it later
    try:
        return _main(argv, early_lines)
    finally:
        early_lines.uninstall()
        exits.note_log(None)
        interrupt.restore()


def _main(argv, early_lines):
    opts, _ = options.parse(argv)
    options.validate(opts)
    if opts.retrieve_only:
        raise flag_error("--retrieve_only", "is an evaluation mode", "run evaluate.py --retrieve_only --model_path ...")
    if opts.passage_retriever_path:
        raise flag_error("--passage_retriever_path", "is an evaluation option",
                         "drop it (training takes the frozen passage side from the run or --model_path)")
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
    # the contents of the data files, so that a resume can tell other data from the same
    opts.run_info["data"] = distributed.broadcast_object(resume.data_fingerprints(opts) if info.is_main else None)

    # One writer per folder: rank 0 takes the lock before anything is written there.
    lock = RunLock(opts.checkpoint_dir) if info.is_main else None
    failure, lock_notes = None, []
    try:
        lock_notes = lock.acquire() if lock else []
    except Exception as exc:  # refused, or the folder cannot be created: every rank stops
        failure = exc
    refused = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if refused:
        raise UsageError(f"--checkpoint_dir: rank 0 could not take {opts.checkpoint_dir}'s lock ({refused}) — "
                         "see rank 0's line")
    try:
        return train_run(opts, info, train, evals, passages, lock_notes, early_lines)
    except BaseException as exc:
        exits.log_failure(exc)  # the line that ends the run, in its run.log too
        raise
    finally:
        if lock:
            lock.release()


def train_run(opts, info, train, evals, passages, notes, early_lines):
    # Every check that needs no model runs before the first file is written (the lock aside,
    # which is given back with the folder it created when a check fails).
    resume_path, resume_notes = checkpoint.resolve_resume(opts.checkpoint_dir, clean=info.is_main)
    notes = notes + resume_notes
    if resume_path:
        notes += resume.compare(checkpoint.load_options(resume_path), opts, resume_path, info.world,
                                opts.allow_option_changes)
    elif opts.model_path:
        checkpoint.check_model_path(opts.model_path)
    random.seed(opts.seed + info.rank)  # before the models: a new copy head is initialized from torch's RNG
    np.random.seed(opts.seed + info.rank)
    torch.manual_seed(opts.seed + info.rank)
    weights_from = resume_path or opts.model_path or opts.reader_model_type
    with checkpoint.reading_models(weights_from):
        reader, retriever, origin = load_models(opts, resume_path)
    safety.check_loaded_weights({"reader": reader, "retriever": retriever}, weights_from)
    if resume_path and info.is_main and resume.drop_rows_after(opts.checkpoint_dir,
                                                                int(os.path.basename(resume_path)[5:])):
        notes.append(f"dropped metrics/samples rows logged after {os.path.basename(resume_path)} by the earlier run")
    os.makedirs(opts.checkpoint_dir, exist_ok=True)
    seeded = checkpoint.rng_state()  # whatever W&B draws while it starts, training draws the same numbers
    tracker = Tracker(opts.checkpoint_dir, opts.name, options.to_json_dict(opts), rank=info.rank,
                      use_wandb=opts.use_wandb, wandb_project=opts.wandb_project,
                      wandb_entity=opts.wandb_entity, wandb_run_name=opts.wandb_run_name or opts.name,
                      earlier=early_lines.take())
    checkpoint.set_rng_state(seeded)
    try:
        return train_loop(opts, info, train, evals, passages, notes, tracker, resume_path, reader, retriever,
                          origin, weights_from)
    except BaseException as exc:
        tracker.close(exit_code=exits.describe(exc)[1] if exits.describe(exc) else 1)
        raise


def train_loop(opts, info, train, evals, passages, notes, tracker, resume_path, reader, retriever, origin,
               weights_from):
    for note in notes:
        tracker.info(note)
    tracker.info(f"{origin}; {info.world} process(es) on {info.device}; {len(train)} training examples"
                 + ("" if passages is None else f", {len(passages)} stories"))
    for line in options.warnings(opts):
        tracker.info(line)
    ref_reader, ref_retriever = reference_models(opts, reader, retriever, info, resumed=bool(resume_path),
                                                 taken_from=weights_from, log=tracker.info)
    frozen_passages = passage_encoder(opts, resume_path, retriever, info)
    model = LapdogModel(reader, retriever, opts, ref_reader, ref_retriever, frozen_passages).to(info.device)
    train_retriever = retriever_trained(opts)
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
        with checkpoint.reading_index(opts.load_index_path):
            seconds = retrieval.build(retriever if frozen_passages is None else frozen_passages)
        tracker.info(f"index over {len(passages)} stories built in {seconds:.1f}s")
    autocast, scaler = precision(opts, info)
    if step >= opts.total_steps:
        tracker.info(f"already at step {step} >= --total_steps {opts.total_steps}: nothing to train")
    window = StatWindow(examples_per_step=opts.per_gpu_batch_size * opts.accumulation_steps * info.world)
    mu = opts.grpo_num_iterations if opts.use_grpo else 1
    run = StepRun(opts, info, model, wrapped, optims, scheds, autocast, scaler,
                  safety.StepGuard(opts.max_nonfinite_steps), interrupt.StopOnInterrupt().install(), tracker)
    first_eval = next(iter(preflight.eval_names(opts.eval_data)), None)
    early = EarlyStopping(opts.early_stopping_metric, opts.early_stopping_patience, first_eval)
    early.replay(distributed.broadcast_object(tracker.eval_history() if info.is_main else None))
    keeps_best = bool(opts.early_stopping_patience or opts.keep_best)  # checkpoint/best: the best evaluation
    if early.should_stop():
        tracker.info(f"stopped early before: {early.describe()}")
    tracker.start_progress(step, opts.total_steps)
    model.train()

    while step < opts.total_steps and not early.should_stop():
        if batch is None or batch.done >= mu:  # a batch serves μ updates (GRPO rollout reuse)
            batch = draw_batch(run, step, train, sampler, data_rng, retrieval)
        result = train_step(run, batch, step)
        batch = batch.after(result)
        if not result.applied:
            if result.stop:
                save(opts, info, step, model, optims, scheds, sampler, data_rng, tracker)
                stop_interrupted(tracker, run.stopper.signal,
                                 f"stopped at step {step}, saved {checkpoint.step_dir(opts.checkpoint_dir, step)}")
            continue
        step += 1
        tracker.advance(step)
        window.add(result.stats)
        if opts.log_freq and step % opts.log_freq == 0:
            log_window(window, step, result.samples, scheds, sampler, info, tracker)
        if retrieval is not None and retrieval.should_refresh(step):
            tracker.log(step, {"time/index_refresh": retrieval.build(retriever, allow_load=False)})
        improved = False
        if opts.eval_freq and step % opts.eval_freq == 0 and evals:
            model.eval()
            with tracker.not_training(), window.paused():  # s/step, ETA and examples/s count training only
                improved, _ = early.update(step, run_evaluations(opts, info, model, retrieval, evals, step, tracker))
            model.train()
        if ((opts.save_freq and step % opts.save_freq == 0) or step == opts.total_steps or result.stop
                or (keeps_best and improved) or (opts.early_stopping_patience and early.should_stop())):
            save(opts, info, step, model, optims, scheds, sampler, data_rng, tracker, batch.reuse_state(mu))
        if improved and keeps_best and info.is_main:
            checkpoint.mark_best(opts.checkpoint_dir, step)
        if early.should_stop():
            tracker.info(f"stopping early at step {step}: {early.describe()}; best: "
                         f"{checkpoint.checkpoint_root(opts.checkpoint_dir)}/best -> step-{early.best_step}")
        if result.stop:
            stop_interrupted(tracker, run.stopper.signal,
                             f"stopped after step {step}, saved {checkpoint.step_dir(opts.checkpoint_dir, step)}")
    run.stopper.uninstall()
    # summary.json's best evaluation is the one checkpoint/best holds, when the run keeps one
    best_by = {"metric": early.metric, "lower_is_better": early.lower_is_better} if keeps_best else {}
    tracker.finish(step, opts.total_steps, **best_by)
    tracker.close()
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
