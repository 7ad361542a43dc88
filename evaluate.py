"""Evaluate a checkpoint: (index) -> generate -> results jsonl + metrics.

    python evaluate.py --model_path ckpt/run/checkpoint/step-N --eval_data valid.jsonl \
        [--passages stories.jsonl] [--write_results]

The checkpoint's options.json supplies the defaults; options on this command line override them.
Results go to --checkpoint_dir when it is given, else next to the checkpoint; the path is printed.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.infra import interrupt  # noqa: E402

if __name__ == "__main__":
    interrupt.quiet_start()  # Ctrl-C while torch loads: one line, not a traceback from an import

from src.cli import options, preflight  # noqa: E402
from src.data.denoising import eval_examples  # noqa: E402
from src.data.dialogues import load_passages  # noqa: E402
from src.evaluation.generation import evaluate, unused_output_paths  # noqa: E402
from src.evaluation.metrics import format_metrics  # noqa: E402
from src.infra import distributed, exits, safety  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.infra.tracking import EarlyLines  # noqa: E402
from src.model.lapdog import LapdogModel  # noqa: E402
from src.model.reader import FiDReader  # noqa: E402
from src.model.retriever import Retriever  # noqa: E402
from src.retrieval.stories import StoryRetrieval  # noqa: E402
from src.run import checkpoint  # noqa: E402


def layered_options(argv):
    """Defaults <- checkpoint options.json <- this command line."""
    cli, explicit = options.parse(argv, shown=options.EVALUATION_OPTIONS, description=options.EVALUATE_DESCRIPTION)
    if not cli.model_path:
        raise flag_error("--model_path", "is required", "pass a checkpoint folder, e.g. ckpt/run/checkpoint/step-N")
    cli.given_model_path = cli.model_path  # e.g. .../checkpoint/latest, printed with what it resolved to
    model_path = os.path.realpath(cli.model_path)
    checkpoint.check_model_path(model_path)
    saved = checkpoint.load_options(model_path)
    options.layer_checkpoint_options(cli, explicit, saved)
    if "passages" in explicit and "closed_book" not in explicit:
        # Evaluating a closed-book (stage-1) reader with retrieval: the stories given here win.
        cli.closed_book = False
    if "closed_book" in explicit and cli.closed_book:
        # A stage-2 checkpoint evaluated without stories (the no-story ablation): its retriever-training
        # switches describe how it was trained, not this evaluation, which fuses and trains nothing.
        parser = options.build_parser()
        for name in ("train_retriever", "grpo_train_retriever", "query_side_retriever_training", "posterior_passages",
                     "posterior_fact_swap", "retriever_signal"):
            setattr(cli, name, parser.get_default(name))
    opts = options.validate(cli)
    preflight.check_options(opts)
    opts.model_path = model_path
    opts.trained_with_retrieval = saved.get("closed_book") is False
    opts.trained_query_side = bool(saved.get("query_side_retriever_training")) and opts.trained_with_retrieval
    return opts, explicit


def output_dir(opts, explicit):
    """{--checkpoint_dir}/results/ when given (as train.py's in-loop evaluations), else the folder
    that holds the checkpoint (ckpt/run/checkpoint/)."""
    if "checkpoint_dir" in explicit:
        return os.path.join(opts.checkpoint_dir, "results")
    return os.path.dirname(opts.model_path)


def passage_side(opts, has_retriever):
    """The folder of the encoder that embeds the stories, or None for the retriever itself.

    A query-side-trained checkpoint (--query_side_retriever_training) embeds them with its frozen
    passage_retriever/: its trained retriever/ is only the query side, and embedding stories with
    it scores them against the wrong encoder (silently worse retrieval)."""
    if opts.passage_retriever_path:
        return opts.passage_retriever_path
    untied = os.path.join(opts.model_path, "passage_retriever")
    if has_retriever and os.path.isdir(untied):
        return untied
    if has_retriever and opts.trained_query_side and not opts.closed_book:
        raise flag_error("--model_path", f"'{opts.model_path}' was trained query-side "
                         "(--query_side_retriever_training) but has no passage_retriever/ folder: its retriever/ "
                         "is the query side only", "restore passage_retriever/ (a copy of the retriever the run "
                         f"started from: {opts.retriever_model_path}), or pass --passage_retriever_path DIR")
    return None


def main(argv=None):
    interrupt.stop_by_exception()  # Ctrl-C / SIGTERM: one line
    warnings = EarlyLines().install()  # the data and evaluation warnings, on stderr
    try:
        return evaluate_main(argv)
    finally:
        warnings.uninstall()
        interrupt.restore()


def evaluate_main(argv):
    opts, explicit = layered_options(argv)
    if not opts.eval_data:
        raise flag_error("--eval_data", "is required", "pass one or more dialogue jsonl files")
    has_retriever = os.path.isdir(os.path.join(opts.model_path, "retriever"))
    if has_retriever and not opts.closed_book and not opts.passages:
        raise flag_error("--passages", "is required to evaluate a retrieval-augmented checkpoint",
                         "pass the story corpus jsonl")
    if not has_retriever and not opts.closed_book and opts.trained_with_retrieval \
            and "retriever_model_path" not in explicit:
        raise flag_error("--model_path", f"'{opts.model_path}' was trained with retrieval but has no retriever/ "
                         "folder", "restore it, or pass --retriever_model_path to evaluate with another retriever")
    passage_path = passage_side(opts, has_retriever)
    info = distributed.init_distributed(opts.local_rank, opts.dist_timeout)
    options.validate_for_device(opts, info.device.type)
    names = preflight.eval_names(opts.eval_data)
    preflight.check_writable_dir(os.path.abspath(output_dir(opts, explicit)), "--checkpoint_dir")
    evals = {name: eval_examples(p, opts.task, opts.max_eval_examples, opts.mlm_noise_density,
                                 opts.mlm_mean_noise_span_length) for name, p in names.items()}
    step = checkpoint.step_of(opts.model_path)
    if info.is_main:
        given = opts.given_model_path
        via = f", {given} resolved" if os.path.realpath(given) != os.path.abspath(given) else ""  # e.g. latest
        print(f"evaluating {opts.model_path} ({'step unknown' if step is None else f'step {step}'}{via})")
    passages = None if opts.closed_book else load_passages(opts.passages, opts.max_passages)
    preflight.check_corpus(opts, passages)
    with checkpoint.reading_models(opts.model_path):
        reader = FiDReader.from_pretrained(os.path.join(opts.model_path, "reader"))
        retriever = None
        if passages is not None:
            path = os.path.join(opts.model_path, "retriever") if has_retriever else opts.retriever_model_path
            retriever = Retriever.from_pretrained(path)
            if not has_retriever and info.is_main:
                print(f"retriever: {path} (the checkpoint has no retriever/)")
    passages_encoder = None
    if passages is not None and passage_path:
        with checkpoint.reading_models(passage_path):
            passages_encoder = Retriever.from_pretrained(passage_path)
        if info.is_main and opts.passage_retriever_path:
            print(f"stories embedded by {passage_path} (--passage_retriever_path)")
    safety.check_loaded_weights({"reader": reader, "retriever": retriever, "passage_retriever": passages_encoder},
                                opts.model_path)
    model = LapdogModel(reader, retriever, opts).to(info.device).eval()
    retrieval = None
    if passages is not None:
        retrieval = StoryRetrieval(passages, opts, info)
        # A query-side-trained checkpoint embeds stories with its frozen passage side.
        with checkpoint.reading_index(opts.load_index_path):
            retrieval.build(passages_encoder or retriever)
    all_metrics = {}
    sources = {os.path.splitext(os.path.basename(p))[0]: p for p in opts.eval_data}
    for name, exs in evals.items():
        # tagged `evaluate`, numbered past any existing one: never over train.py's in-loop files or
        # an earlier evaluation (rank 0 decides; every rank uses its choice)
        path, metrics_path = distributed.broadcast_object(
            unused_output_paths(output_dir(opts, explicit), step, name) if info.is_main else None)
        path = path if opts.write_results else None
        metrics = evaluate(model, retrieval, exs, opts, info, results_path=path, desc=f"eval {name}",
                           metrics_path=metrics_path,
                           about={"step": step, "eval": name, "eval_data": sources[name], "model_path": opts.model_path})
        if info.is_main:
            print(f"{name}: {format_metrics(metrics)}")
            if "recall@1" in metrics:
                k = opts.retriever_n_context
                top1 = metrics.get("retrieval/top1_score")  # none with --eval_stories random
                print(f"{name}: retrieval recall@1 {metrics['recall@1']:.2f} | recall@{k} {metrics[f'recall@{k}']:.2f}"
                      + (f" | mean top-1 score {top1:.3f}" if top1 is not None else " | random stories"))
            if path:
                print(f"results written to {path}")
            print(f"metrics written to {metrics_path}")
        all_metrics[name] = metrics
    if info.is_main:
        print(json.dumps(all_metrics))
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
