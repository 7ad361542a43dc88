"""Every command-line option of train.py and evaluate.py (one shared set), with validation.

Options are plain argparse values; `validate` turns impossible combinations into one clear line
(`--flag: problem — what to do`). evaluate.py layers them: built-in defaults, then the
checkpoint's `options.json`, then what was given on its own command line (`explicit_options`).
"""

import argparse
import math
import os
import sys

from src.cli.config import expand_config
from src.infra.errors import flag_error
from src.objectives.rewards import parse_metric_scale_factors
from src.objectives.schedule import retriever_trained
from src.retrieval.index import RefreshSchedule

# Options that describe the run's inputs and bookkeeping rather than the model: evaluate.py
# never takes these from a checkpoint's options.json. The posterior-story options shape training
# inputs only (evaluation fuses retrieved stories, or none closed book).
NOT_INHERITED = {"model_path", "checkpoint_dir", "local_rank", "write_results", "name",
                 "eval_data", "use_wandb", "wandb_run_name", "load_index_path",
                 "save_index_path", "max_eval_examples", "posterior_passages", "posterior_fact_swap",
                 "early_stopping_patience", "keep_best", "passage_retriever_path",
                 "task", "mlm_noise_density", "mlm_mean_noise_span_length"}  # a stage after MLM pretraining is qa


def _add_run_options(p):
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, metavar="FILE.yaml|json",
                   help="recipe file whose keys are flag names (a checkpoint's options.json is one); "
                        "flags on the command line win over it")
    g.add_argument("--name", default="experiment", help="run name (logs, W&B run name)")
    g.add_argument("--checkpoint_dir", default="ckpt/run",
                   help="checkpoints go to {checkpoint_dir}/checkpoint/step-N; logs, metrics.jsonl and "
                        "results/ beside")
    g.add_argument("--model_path", default=None,
                   help="start from a checkpoint folder (step-N); `latest` in --checkpoint_dir wins when present")
    g.add_argument("--load_reader_weights_only", action="store_true",
                   help="with --model_path: take only the reader from the checkpoint (start stage 2 from a stage-1 reader)")
    g.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch (plus the rank)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment is used otherwise")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="autocast precision; fp16 needs a GPU, bf16 works on CPU and GPU")
    g.add_argument("--task", default="qa", choices=["qa", "mlm", "causal_chat"],
                   help="qa: reply in the persona's voice (default); mlm: Atlas's masked-span pretraining of the "
                        "reader on the texts of --train_data (dialogue or story jsonl; spans from --mlm_noise_density "
                        "and --mlm_mean_noise_span_length), closed book or with retrieved stories; its checkpoint's "
                        "reader/ is a --reader_model_type for stage 1. causal_chat is not implemented")
    g.add_argument("--mlm_noise_density", type=float, default=0.15,
                   help="--task mlm: the share of a text's words hidden (T5's noise density)")
    g.add_argument("--mlm_mean_noise_span_length", type=float, default=3,
                   help="--task mlm: the mean length of a hidden span, in words (T5's)")


def _check_run_options(opts):
    if opts.load_reader_weights_only and not opts.model_path:
        raise flag_error("--load_reader_weights_only", "needs --model_path", "pass the stage-1 checkpoint with --model_path")


def _add_data_options(p):
    g = p.add_argument_group("data")
    g.add_argument("--train_data", nargs="+", default=[], help="dialogue jsonl file(s)")
    g.add_argument("--eval_data", nargs="+", default=[], help="one or more dialogue jsonl files")
    g.add_argument("--max_eval_examples", type=int, default=None,
                   help="evaluate on the first N examples of each eval file (default: all)")
    g.add_argument("--passages", default=None, help="story corpus jsonl ({id, title, text})")
    g.add_argument("--max_passages", type=int, default=None, help="use the first N stories only (default: all)")
    g.add_argument("--shuffle", action="store_true", help="shuffle the training data every epoch")
    g.add_argument("--text_maxlength", type=int, default=512,
                   help="reader input tokens per (query, story); the story is cut first")
    g.add_argument("--target_maxlength", type=int, default=32, help="reply tokens for training")
    g.add_argument("--retriever_maxlength", type=int, default=256, help="retriever tokens per query/story")
    g.add_argument("--encoder_format", default="{query} story title: {title} story: {text}",
                   help="reader input for one story (placeholders {query}, {title}, {text})")
    g.add_argument("--retriever_format", default="{title} {text}",
                   help="story text the retriever embeds (placeholders {title}, {text})")
    g.add_argument("--retriever_from", default="persona",
                   choices=["persona", "context", "all", "persona_rand", "forward"],
                   help="what part of the dialogue is the retrieval query (forward is refused: not implemented)")


def _check_mlm_options(opts):
    if not 0 < opts.mlm_noise_density < 1:
        raise flag_error("--mlm_noise_density", f"{opts.mlm_noise_density} is not in (0, 1)", "pass e.g. 0.15 (T5's)")
    if opts.mlm_mean_noise_span_length < 1:
        raise flag_error("--mlm_mean_noise_span_length", f"{opts.mlm_mean_noise_span_length} is below one word",
                         "pass e.g. 3 (T5's)")
    if opts.task != "mlm":
        return
    stage2 = [flag for flag, on in (("--reader_rl_learning", opts.reader_rl_learning), ("--use_grpo", opts.use_grpo),
                                    ("--train_retriever", opts.train_retriever),
                                    ("--grpo_train_retriever", opts.grpo_train_retriever),
                                    ("--posterior_passages", opts.posterior_passages)) if on]
    if stage2:
        raise flag_error("--task", f"mlm trains the reader on masked spans alone, and {stage2[0]} asks for more",
                         f"drop {stage2[0]} (pretrain with --task mlm, then run the stages from its reader)")
    if not opts.closed_book and opts.passages:
        same = [p for p in opts.train_data if os.path.exists(p) and os.path.exists(opts.passages)
                and os.path.samefile(p, opts.passages)]
        if same:
            raise flag_error("--train_data", f"{same[0]} is also --passages: each story would retrieve itself and "
                             "the reader would copy its hidden spans", "pass --closed_book, or dialogue texts to "
                             "train on with the stories retrieved")


def _check_data_options(opts):
    _require_at_least(opts, 1, "text_maxlength", "target_maxlength", "retriever_maxlength")
    _check_mlm_options(opts)
    for name in ("max_passages", "max_eval_examples"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise flag_error(f"--{name}", "must be >= 1", "pass a positive integer or leave it out")


def _add_model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--reader_model_type", default="t5-base",
                   help="Hugging Face id (t5-base, google/t5-xl-lm-adapt) or a local reader folder")
    g.add_argument("--pointer_generator", action="store_true",
                   help="give a new reader (--reader_model_type) a copy head: it can emit a word of its input by "
                        "pointing (src/model/pointer.py; for small from-scratch readers, which do not learn to copy facts "
                        "otherwise). Readers loaded from --model_path or a resume keep what their config says")
    g.add_argument("--retriever_model_path", default="facebook/contriever",
                   help="Hugging Face id or a local folder of a BERT-style encoder")
    g.add_argument("--closed_book", action="store_true", help="no retrieval (stage 1, the paper's recipe)")
    g.add_argument("--posterior_passages", action="store_true",
                   help="supervised reader training fuses the 'posterior' story first: the corpus story sharing the "
                        "most idf-weighted words with the target reply (src/data/posterior.py; no relevance labels), so the "
                        "reader learns to read stories; evaluation always uses retrieved stories (default: off)")
    g.add_argument("--posterior_fact_swap", type=float, default=0.0,
                   help="with --posterior_passages: fraction of training examples whose rarest word shared by reply and "
                        "posterior story is replaced by a random rare corpus word in reply, prompt and story alike, so "
                        "copying from the story is the only way to it (src/data/posterior.py FactSwap; default: 0)")
    g.add_argument("--n_context", type=int, default=1, help="retrieved stories fused in the reader")
    g.add_argument("--retriever_n_context", type=int, default=5, help="stories retrieved per example")
    g.add_argument("--dropout", type=float, default=0.1,
                   help="reader dropout probability (RL forwards always run without dropout)")
    g.add_argument("--use_gradient_checkpoint_reader", action="store_true",
                   help="activation checkpointing in the reader (less memory, more compute)")
    g.add_argument("--use_gradient_checkpoint_retriever", action="store_true",
                   help="activation checkpointing in the retriever")


def _check_model_options(opts):
    _require_at_least(opts, 1, "n_context", "retriever_n_context")
    if not math.isfinite(opts.dropout) or not 0 <= opts.dropout < 1:
        raise flag_error("--dropout", f"must be in [0, 1), got {opts.dropout}", "pass e.g. 0.1")
    if not 0.0 <= opts.posterior_fact_swap <= 1.0:
        raise flag_error("--posterior_fact_swap", f"must be a fraction in [0, 1], got {opts.posterior_fact_swap}",
                         "pass e.g. 0.5")
    if opts.posterior_fact_swap > 0 and not opts.posterior_passages:
        raise flag_error("--posterior_fact_swap", "swaps facts in posterior stories", "add --posterior_passages")
    if opts.posterior_passages and opts.closed_book:
        raise flag_error("--posterior_passages", "needs a story corpus but --closed_book has none",
                         "drop --closed_book and pass --passages")
    if opts.closed_book:
        opts.n_context = opts.retriever_n_context = 1
        if retriever_trained(opts):
            raise flag_error("--closed_book", "has no retriever to train",
                             "drop --train_retriever/--grpo_train_retriever, or drop --closed_book and pass --passages")
    elif opts.n_context > opts.retriever_n_context:
        raise flag_error("--n_context", f"{opts.n_context} is larger than --retriever_n_context {opts.retriever_n_context}",
                         "retrieve at least as many stories as the reader fuses")


def _add_index_options(p):
    g = p.add_argument_group("index")
    g.add_argument("--index_mode", default="flat", choices=["flat", "faiss"],
                   help="flat: exact inner product with torch on the run's device; faiss: a FAISS index, on the "
                        "run's GPU with faiss-gpu (requirements-gpu.txt), else on the CPU")
    g.add_argument("--faiss_index_type", default="flat", choices=["flat", "ivfflat", "ivfsq", "ivfpq", "pq"],
                   help="FAISS index structure (with --index_mode faiss)")
    g.add_argument("--faiss_code_size", type=int, default=None,
                   help="bytes per vector for pq / ivfpq (default: dimension / 8)")
    g.add_argument("--per_gpu_embedder_batch_size", type=int, default=128,
                   help="stories per retriever forward when building the index")
    g.add_argument("--save_index_path", default=None, help="write the index to this folder (in shards)")
    g.add_argument("--load_index_path", default=None, help="load the index from this folder instead of building it")
    g.add_argument("--save_index_n_shards", type=int, default=1, help="shard files --save_index_path writes")
    g.add_argument("--refresh_index", default="-1",
                   help='re-embed the corpus while the retriever trains: "-1" never, "N" every N steps, '
                        'or "0-100:10,100-1000000:500" (step ranges: every n steps)')
    g.add_argument("--freeze_retriever_steps", type=int, default=-1,
                   help="the retriever is not updated (nor the index refreshed) before this step (-1: never frozen)")
    g.add_argument("--retrieve_with_rerank", action="store_true",
                   help="search --n_to_rerank_with_retrieve_with_rerank candidates in the (possibly stale) index, "
                        "re-embed them with the current retriever and keep the best by fresh scores (default: off)")
    g.add_argument("--n_to_rerank_with_retrieve_with_rerank", type=int, default=128,
                   help="candidates re-embedded per query with --retrieve_with_rerank (default 128, Atlas's)")
    g.add_argument("--retriever_signal", default="reply", choices=["reply", "knowledge", "evidence"],
                   help="what the retriever learns from. reply (the original's): joint GRPO scores each pool story by "
                        "the generator's reward of the reply, LAPDOG fits its gold scores on every example. knowledge: "
                        "only the target's fact-like words count (src/data/posterior.py:KnowledgeWords, no relevance labels): "
                        "joint GRPO scores a story by the share of them its greedy reply contains, LAPDOG fits its gold "
                        "scores only on examples whose target has one; chit-chat then gives the retriever no gradient "
                        "instead of noise. evidence: a story scores the reader's log-likelihood of the target's "
                        "fact-like words given it (src/model/gold_scores.py:evidence_scores), for the pool estimators and as "
                        "LAPDOG's gold score, chit-chat again left out; the signal the quickstart's stage 2 learns from "
                        "(default: reply)")
    g.add_argument("--query_side_retriever_training", action="store_true",
                   help="train only the query side of the retriever: the passage side is a frozen copy of the "
                        "retriever as the run started (saved as passage_retriever/ in checkpoints), so the index "
                        "never goes stale and is never refreshed (default: off, one shared encoder)")
    g.add_argument("--passage_retriever_path", default=None,
                   help="evaluate.py: embed the stories with this encoder folder, e.g. for a query-side-trained "
                        "checkpoint that lost its passage_retriever/ (default: the checkpoint's passage_retriever/, "
                        "else its retriever/)")


def _check_index_options(opts):
    _require_at_least(opts, 1, "per_gpu_embedder_batch_size", "save_index_n_shards")
    RefreshSchedule.parse(opts.refresh_index)
    if opts.retrieve_with_rerank:
        needed = max(opts.retriever_n_context, opts.grpo_retriever_pool_size if opts.grpo_train_retriever else 1)
        if opts.n_to_rerank_with_retrieve_with_rerank < needed:
            raise flag_error("--n_to_rerank_with_retrieve_with_rerank",
                             f"{opts.n_to_rerank_with_retrieve_with_rerank} is fewer than the {needed} stories kept per query",
                             "rerank at least --retriever_n_context (or --grpo_retriever_pool_size) candidates")
    if opts.query_side_retriever_training and not retriever_trained(opts):
        raise flag_error("--query_side_retriever_training", "has no retriever to train",
                         "add --train_retriever (LAPDOG) or --grpo_train_retriever (joint GRPO)")
    if opts.retriever_signal != "reply":
        sig = opts.retriever_signal
        if not retriever_trained(opts):
            raise flag_error("--retriever_signal", f"{sig} changes how the retriever learns, but no retriever is "
                             "trained", "add --train_retriever (LAPDOG) or --grpo_train_retriever, or drop the flag")
        token_level = ("emdr",) if sig == "evidence" else ("emdr", "emdr_seq")
        if opts.train_retriever and opts.gold_score_mode in token_level:
            raise flag_error("--retriever_signal", f"{sig} leaves chit-chat examples out of LAPDOG's KL to the gold "
                             f"scores; --gold_score_mode {opts.gold_score_mode} fits no KL",
                             "use a KL gold-score mode such as ppmean, or --retriever_signal reply")
        if opts.grpo_train_retriever and opts.grpo_retriever_estimator not in ("pool", "posterior"):
            raise flag_error("--retriever_signal", f"{sig} scores every pool story, which only the pool estimators "
                             f"use (got --grpo_retriever_estimator {opts.grpo_retriever_estimator})",
                             "use --grpo_retriever_estimator pool or posterior")


def _add_optim_options(p):
    g = p.add_argument_group("optimization")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW β2 (default 0.999, the original's)")
    g.add_argument("--epsilon", type=float, default=1e-6, help="AdamW ε (default 1e-6, the original's)")
    g.add_argument("--scheduler_steps", type=int, default=None,
                   help="steps the learning-rate schedule spans (default: --total_steps)")
    g.add_argument("--save_optimizer", action="store_true",
                   help="accepted for LAPDOG commands: optimizer state is always saved (resume needs it)")
    g.add_argument("--per_gpu_batch_size", type=int, default=1, help="training examples per process and micro-batch")
    g.add_argument("--per_gpu_eval_batch_size", type=int, default=None,
                   help="evaluation examples per process and batch (default: --per_gpu_batch_size)")
    g.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer update")
    g.add_argument("--total_steps", type=int, default=1000, help="optimizer updates of the run")
    g.add_argument("--warmup_steps", type=int, default=100, help="optimizer updates of linear learning-rate warmup")
    g.add_argument("--scheduler", default="linear", choices=["linear", "cosine", "fixed"],
                   help="learning rate after warmup: linear decay to 0, cosine, or constant")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the reader")
    g.add_argument("--lr_retriever", type=float, default=1e-5, help="AdamW learning rate of the retriever")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (<= 0: off)")
    g.add_argument("--shard_optim", action="store_true", help="fairscale OSS optimizer state sharding")
    g.add_argument("--shard_grads", action="store_true", help="fairscale ShardedDataParallel (needs --shard_optim)")
    g.add_argument("--eval_freq", type=int, default=500, help="evaluate every N steps (0: never in the loop)")
    g.add_argument("--save_freq", type=int, default=500, help="save every N steps (and always at the end)")
    g.add_argument("--log_freq", type=int, default=10,
                   help="log (console, metrics.jsonl, W&B) the mean of the last N steps every N steps (0: never)")
    g.add_argument("--early_stopping_patience", type=int, default=0,
                   help="stop after N in-loop evaluations in a row without a better --early_stopping_metric on the "
                        "first --eval_data file; each better one is saved and becomes checkpoint/best (0: off)")
    g.add_argument("--early_stopping_metric", default="eval_loss",
                   choices=["eval_loss", "ppl", "f1", "rougeL", "bleu", "reward"],
                   help="the metric --early_stopping_patience and --keep_best watch (losses and ppl: lower is "
                        "better); the dev loss by default, which a reader that repeats one sentence cannot game")
    g.add_argument("--keep_best", action="store_true",
                   help="save the checkpoint of each in-loop evaluation that improves --early_stopping_metric on "
                        "the first --eval_data file and point checkpoint/best at it, without stopping early "
                        "(--early_stopping_patience does it too; default: off)")


def _check_optim_options(opts):
    _require_at_least(opts, 1, "per_gpu_batch_size", "accumulation_steps", "total_steps")
    _require_at_least(opts, 0, "warmup_steps", "eval_freq", "save_freq", "log_freq")
    if opts.per_gpu_eval_batch_size is None:
        opts.per_gpu_eval_batch_size = opts.per_gpu_batch_size
    if opts.per_gpu_eval_batch_size < 1:
        raise flag_error("--per_gpu_eval_batch_size", "must be >= 1", "pass a positive integer")
    for name in ["lr", "lr_retriever", "weight_decay"]:
        v = getattr(opts, name)
        if not math.isfinite(v) or v < 0:
            raise flag_error(f"--{name}", f"must be a finite number >= 0, got {v}", "pass e.g. 1e-4")
    if opts.shard_grads and not opts.shard_optim:
        raise flag_error("--shard_grads", "needs --shard_optim (ShardedDataParallel runs on an OSS optimizer)",
                         "add --shard_optim")
    if not 0 <= opts.beta2 < 1 or not opts.epsilon > 0:
        raise flag_error("--beta2/--epsilon", "need 0 <= β2 < 1 and ε > 0", "pass e.g. 0.999 and 1e-6")
    if opts.scheduler_steps is not None and opts.scheduler_steps < 1:
        raise flag_error("--scheduler_steps", "must be >= 1", "pass a positive integer or leave it out")
    _require_at_least(opts, 0, "early_stopping_patience")
    if opts.early_stopping_patience and not (opts.eval_freq and opts.eval_data):
        raise flag_error("--early_stopping_patience", "watches in-loop evaluations, but none runs",
                         "pass --eval_data and --eval_freq N (or drop --early_stopping_patience)")
    if opts.keep_best and not (opts.eval_freq and opts.eval_data):
        raise flag_error("--keep_best", "keeps the best in-loop evaluation, but none runs",
                         "pass --eval_data and --eval_freq N (or drop --keep_best)")


def _add_generation_options(p):
    g = p.add_argument_group("generation")
    g.add_argument("--generation_max_length", type=int, default=32,
                   help="reply tokens, counting the decoder start token (as in transformers)")
    g.add_argument("--generation_min_length", type=int, default=0,
                   help="minimum reply tokens, counting the decoder start token")
    g.add_argument("--generation_num_beams", type=int, default=1, help="1: greedy; beam search keeps length_penalty 1.0")
    g.add_argument("--generation_no_repeat_ngram_size", type=int, default=0,
                   help="evaluation and chat replies: no n-gram of tokens twice in one reply (0: off); the replies "
                        "that training scores (gold scores, pool rewards, GRPO samples) are decoded without it")
    g.add_argument("--generation_repetition_penalty", type=float, default=1.0,
                   help="evaluation and chat replies: > 1 divides the logit of every token already in the reply "
                        "by it (CTRL's penalty, as transformers applies it; 1: off)")
    g.add_argument("--generation_temperature", type=float, default=0.0,
                   help="evaluation and chat replies: > 0 samples from softmax(logits / T) instead of greedy or "
                        "beam search, seeded by --seed (in-loop evaluations leave training's random state as it "
                        "was); 0: off")
    g.add_argument("--generation_top_p", type=float, default=1.0,
                   help="with --generation_temperature > 0: sample from the smallest set of tokens holding this "
                        "much probability (nucleus sampling; 1: off)")
    g.add_argument("--retrieve_only", action="store_true",
                   help="evaluate.py: retrieval only (the reader is never run): results hold the retrieved stories, "
                        "metrics are the retrieval statistics (default: off)")
    g.add_argument("--eval_stories", choices=("retrieved", "random"), default="retrieved",
                   help="the stories evaluation fuses: the retriever's top ones, or random corpus stories (an "
                        "ablation: what the retrieved stories are worth; --closed_book is the other one); "
                        "training is unaffected")
    g.add_argument("--write_results", action="store_true", help="write one JSON line per evaluated example")
    g.add_argument("--dont_write_passages", action="store_true", help="leave retrieved passages out of the results")


def _check_generation_options(opts):
    _require_at_least(opts, 1, "generation_max_length", "generation_num_beams")
    _require_at_least(opts, 0, "generation_min_length", "generation_no_repeat_ngram_size")
    if opts.generation_repetition_penalty <= 0:
        raise flag_error("--generation_repetition_penalty", f"{opts.generation_repetition_penalty} must be > 0",
                         "pass 1 (off) or a penalty above 1, e.g. 1.2")
    if opts.generation_temperature < 0:
        raise flag_error("--generation_temperature", f"{opts.generation_temperature} must be >= 0",
                         "pass 0 (greedy or beam search) or a sampling temperature, e.g. 0.7")
    if not 0 < opts.generation_top_p <= 1:
        raise flag_error("--generation_top_p", f"{opts.generation_top_p} is not in (0, 1]", "pass e.g. 0.9 (1: off)")
    if opts.generation_temperature == 0 and opts.generation_top_p < 1:
        raise flag_error("--generation_top_p", "only acts when sampling, and --generation_temperature is 0",
                         "pass --generation_temperature > 0 as well, or drop --generation_top_p")
    if opts.generation_temperature > 0 and opts.generation_num_beams > 1:
        raise flag_error("--generation_temperature", "samples, and --generation_num_beams asks for beam search",
                         "pick one: --generation_temperature 0 or --generation_num_beams 1")
    if opts.generation_min_length > opts.generation_max_length:
        raise flag_error("--generation_min_length", "is larger than --generation_max_length",
                         "lower it or raise --generation_max_length")
    if opts.retrieve_only and opts.closed_book:
        raise flag_error("--retrieve_only", "needs retrieval but --closed_book has none", "drop --closed_book, pass --passages")
    if opts.eval_stories == "random" and opts.closed_book:
        raise flag_error("--eval_stories", "random stories are fused, but --closed_book fuses none",
                         "use one ablation at a time: drop --closed_book or --eval_stories random")


def _add_retriever_training_options(p):
    g = p.add_argument_group("retriever training (LAPDOG)")
    g.add_argument("--train_retriever", action="store_true",
                   help="LAPDOG retriever training: KL(softmax(gold/τ_g) ‖ softmax(score/τ_s))")
    g.add_argument("--gold_score_mode", default="f1rougebleudist",
                   choices=["ppmean", "pdist", "loop", "emdr", "emdr_seq", "evalnormsum", "adist", "bleudist",
                            "bleudist_pdist", "f1rougebleudist"],
                   help="LAPDOG's gold score (default f1rougebleudist); emdr mixes the stories per reply token over "
                        "log_softmax(logits/τ_g) as the original, emdr_seq (ours) mixes whole-reply likelihoods")
    g.add_argument("--retriever_kl_reduction", default="mean", choices=["mean", "batchmean"],
                   help="LAPDOG's KL to the gold scores: mean over all batch × stories terms, as the original's "
                        "KLDivLoss() (default mean), or batchmean, the KL per example (K times larger)")
    g.add_argument("--temperature_score", type=float, default=0.1, help="τ_s of the retriever scores (LAPDOG: 0.8)")
    g.add_argument("--temperature_gold", type=float, default=0.1, help="τ_g of the gold scores (LAPDOG: 0.85)")
    g.add_argument("--scale_rouge", action="store_true", help="ROUGE-L ×100 in the gold score / reward")
    g.add_argument("--metric_scale_factors", default=None,
                   help="weights of BLEU, F1, ROUGE-L, e.g. \"{'bleu':0.01,'f1':1,'rouge':1}\" (default: the RL reward's "
                        "0.01, 1, 1; LAPDOG's gold score 1, 1, 1, its BLEU being L2-normalized)")
    g.add_argument("--add_random_retrieval", type=float, default=0.0,
                   help="candidate augmentation: fraction f of each example's K retrieved stories made random in "
                        "training (default 0, off)")
    g.add_argument("--add_random_retrieval_mode", default="original", choices=["original", "replace_bottom"],
                   help="original (default): while --train_retriever trains, int(K·f) random stories first, then "
                        "K − int(K·f) drawn with replacement from the retrieved list, as the original LAPDOG; "
                        "replace_bottom: in every training kind, the bottom round(K·f) become distinct random stories")
    g.add_argument("--fix_reader", action="store_true", help="train the retriever only")
    g.add_argument("--reader_rl_learning", action="store_true",
                   help="RL for the reader: REINFORCE, or GRPO with --use_grpo")


def _check_retriever_training_options(opts):
    if not 0.0 <= opts.add_random_retrieval <= 1.0:
        raise flag_error("--add_random_retrieval", f"must be a fraction in [0, 1], got {opts.add_random_retrieval}",
                         "pass e.g. 0.2")
    _require_positive_temperatures(opts, "temperature_score", "temperature_gold")
    if opts.reader_rl_learning and not opts.use_grpo and opts.fix_reader:
        raise flag_error("--reader_rl_learning", "trains the reader but --fix_reader freezes it", "drop one of them")
    if opts.reader_rl_learning and not opts.use_grpo and opts.per_gpu_batch_size < 2:
        raise flag_error("--reader_rl_learning", "REINFORCE's baseline is the batch mean reward, so a batch of one "
                         "has zero advantage", "use --per_gpu_batch_size 2 or more (or --use_grpo)")
    if opts.fix_reader and not opts.train_retriever:
        raise flag_error("--fix_reader", "leaves nothing to train without --train_retriever", "add --train_retriever")
    opts.metric_scale = parse_metric_scale_factors(opts.metric_scale_factors)


def _add_grpo_options(p):
    g = p.add_argument_group("GRPO")
    g.add_argument("--use_grpo", action="store_true", help="GRPO for the reader (needs --reader_rl_learning)")
    g.add_argument("--grpo_group_size", type=int, default=4, help="G: replies sampled per prompt")
    g.add_argument("--grpo_kl_coeff", type=float, default=0.1, help="β: weight of the KL to the reference")
    g.add_argument("--grpo_clip_epsilon", type=float, default=0.2, help="ε: PPO clip range")
    g.add_argument("--grpo_train_retriever", action="store_true", help="joint GRPO on the retriever")
    g.add_argument("--grpo_retriever_group_size", type=int, default=5, help="k: stories sampled per query")
    g.add_argument("--grpo_retriever_pool_size", type=int, default=20, help="M: candidate pool from the index")
    g.add_argument("--grpo_retriever_temperature", type=float, default=1.0, help="τ in softmax(score/τ)")
    g.add_argument("--grpo_retriever_kl_coeff", type=float, default=None,
                   help="β of the retriever's exact KL to its reference over the pool (default: --grpo_kl_coeff)")
    g.add_argument("--grpo_retriever_estimator", default="pool", choices=["pool", "posterior", "rloo", "topk_heuristic"],
                   help="the retriever's objective is the expected reward of a story drawn from it. pool: every pool "
                        "story scored by the reward of the reader's greedy reply, PPO surrogate in exact expectation over "
                        "the pool (no draw noise); posterior: the same pool rewards, but the retriever is fitted (cross-"
                        "entropy) to the KL-regularized improvement step π_old·exp(A/β) "
                        "(src/objectives/retriever_losses.py:pool_posterior_loss, β = --grpo_retriever_target_temperature), "
                        "whose push on a good story does not vanish when the "
                        "retriever ranks it low; rloo: k i.i.d. draws scored by their G replies' mean reward, "
                        "leave-one-out baseline (unbiased); topk_heuristic: the earlier, biased estimator (Gumbel "
                        "top-k draws scored as single draws, std-normalized advantages), for ablations. The k draws "
                        "always give the generator its stories (default: pool)")
    g.add_argument("--grpo_retriever_target_temperature", type=float, default=3.0,
                   help="β of --grpo_retriever_estimator posterior, in reward units: a reward gap of β multiplies a "
                        "story's odds by e (default 3: with --retriever_signal evidence, a fact the story holds is worth "
                        "~10 nats, so the target still shifts clearly while the retriever's prior keeps other topics out)")
    g.add_argument("--grpo_temperature", type=float, default=1.0, help="sampling temperature of replies")
    g.add_argument("--grpo_top_p", type=float, default=1.0, help="nucleus sampling of replies (1: off)")
    g.add_argument("--grpo_num_iterations", type=int, default=1, help="μ: updates per batch of samples")
    g.add_argument("--grpo_loss_type", default="grpo", choices=["grpo", "dr_grpo", "dapo", "bnpo"],
                   help="token aggregation (default grpo): grpo mean per reply then over replies; dr_grpo token sum "
                        "/ (replies × max reply tokens); dapo token sum / token count of the whole accumulated "
                        "batch across processes (TRL); bnpo token sum / token count per micro-batch, averaged")
    g.add_argument("--generation_length_penalty", type=float, default=0.0,
                   help="strength s of the reward's length penalty (0: off; beam search keeps 1.0)")
    g.add_argument("--length_penalty_short_factor", type=float, default=2.0,
                   help="the length penalty's strength is multiplied by this for a reply shorter than the "
                        "reference (2: the original's, a short reply punished twice as hard; 1: symmetric)")
    g.add_argument("--reward_repetition_penalty", type=float, default=0.0,
                   help="strength s of the reward's repetition penalty: × (distinct word 3-grams / word 3-grams "
                        "of the reply)^s, so that a reply looping a phrase earns less (0: off)")


def _check_grpo_options(opts):
    _require_at_least(opts, 1, "grpo_num_iterations")
    _require_positive_temperatures(opts, "grpo_temperature", "grpo_retriever_temperature",
                                   "grpo_retriever_target_temperature")
    if not 0 < opts.grpo_top_p <= 1:
        raise flag_error("--grpo_top_p", f"must be in (0, 1], got {opts.grpo_top_p}", "pass e.g. 1.0")
    if opts.grpo_retriever_kl_coeff is None:
        opts.grpo_retriever_kl_coeff = opts.grpo_kl_coeff
    if opts.grpo_kl_coeff < 0 or opts.grpo_retriever_kl_coeff < 0 or opts.grpo_clip_epsilon <= 0:
        raise flag_error("--grpo_kl_coeff/--grpo_clip_epsilon", "β must be >= 0 and ε > 0", "pass e.g. 0.1 and 0.2")
    for name in ("generation_length_penalty", "reward_repetition_penalty"):
        if getattr(opts, name) < 0:
            raise flag_error(f"--{name}", f"must be >= 0, got {getattr(opts, name)}", "pass 0 (off) or a positive strength")
    if opts.length_penalty_short_factor <= 0:
        raise flag_error("--length_penalty_short_factor", f"must be > 0, got {opts.length_penalty_short_factor}",
                         "pass 2 (the original's) or 1 (symmetric)")
    if opts.use_grpo and not opts.reader_rl_learning:
        raise flag_error("--use_grpo", "needs --reader_rl_learning (GRPO is the reader's RL algorithm)",
                         "add --reader_rl_learning")
    if opts.use_grpo and opts.gold_score_mode != "f1rougebleudist":
        raise flag_error("--gold_score_mode", f"'{opts.gold_score_mode}' cannot be a GRPO reward",
                         "use --gold_score_mode=f1rougebleudist with --use_grpo")
    if opts.grpo_train_retriever and not opts.use_grpo:
        raise flag_error("--grpo_train_retriever", "needs --use_grpo", "add --use_grpo --reader_rl_learning")
    if opts.grpo_train_retriever and opts.train_retriever:
        raise flag_error("--grpo_train_retriever", "and --train_retriever are two retriever objectives",
                         "pick one: GRPO (--grpo_train_retriever) or LAPDOG's KL to the gold scores (--train_retriever)")
    if opts.use_grpo and opts.grpo_group_size < 2:
        raise flag_error("--grpo_group_size", f"must be >= 2, got {opts.grpo_group_size} (a group of one has no spread)",
                         "pass 2 or more, e.g. 4")
    if opts.grpo_train_retriever:
        k, m = opts.grpo_retriever_group_size, opts.grpo_retriever_pool_size
        # The pool estimators learn from every pool story's reward, so one drawn story (the reader's
        # input) is enough; rloo and topk_heuristic compare the drawn stories with each other.
        if k < 1 or (k < 2 and opts.grpo_retriever_estimator in ("rloo", "topk_heuristic")):
            raise flag_error("--grpo_retriever_group_size", f"must be >= 2 for --grpo_retriever_estimator "
                             f"{opts.grpo_retriever_estimator} (its stories are compared with each other), and >= 1 "
                             f"for pool and posterior; got {k}", "pass 2 or more, e.g. 4")
        if k > m:
            raise flag_error("--grpo_retriever_group_size", f"k={k} is larger than --grpo_retriever_pool_size M={m}",
                             "sample at most M stories: raise the pool size or lower k")


def _add_wandb_options(p):
    g = p.add_argument_group("monitoring")
    g.add_argument("--use_wandb", action="store_true", help="log to W&B (rank 0; offline without an API key)")
    g.add_argument("--wandb_project", default="lapdog-grpo", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name (default: --name)")
    g.add_argument("--wandb_entity", default=None, help="W&B entity (default: your W&B default entity)")


# Options of the original LAPDOG/Atlas options.py this project accepts but does not implement:
# name -> (argparse keywords, why). Their defaults are the original's; any other value is refused
# with one line, so an original command line either runs as the original would or says why not.
UNIMPLEMENTED = {
    "alpha": (dict(type=float, default=1.0), "the original declares this AdamW value but never reads it"),
    "main_port": (dict(type=int, default=-1), "SLURM multi-node launch is not supported: use torchrun --master_port"),
    "qa_prompt_format": (dict(default="dialog with R's persona: {question} R: <extra_id_0>"),
                         "the reader prompt is fixed to the original's default"),
    "story_label": (dict(default=""), "the story label in prompts is fixed to the original's default (none)"),
    "decoder_format": (dict(default=None), "target formats are not implemented (the original's TODO: remove)"),
    "decoder_prompt_format": (dict(default=None), "decoder prompting is not implemented"),
    "dont_add_bos": (dict(action="store_true"), "it belongs to the causal-LM reader, which is not implemented"),
    "reader_causallm": (dict(default=None), "the causal-LM reader is not implemented (T5 fusion-in-decoder only)"),
    "add_null_retrieval": (dict(action="store_true"), "the original declares it but never reads it"),
    "compute_crossattention_stats": (dict(action="store_true"),
                                     "cross-attention correlation statistics are not implemented"),
    "filtering_overretrieve_ratio": (dict(type=int, default=2),
                                     "only Atlas's kilt/fever tasks filter retrieved passages; --task qa does not"),
    "use_file_passages": (dict(action="store_true"), "stories always come from the --passages index"),
    "min_words_per_lm_instance": (dict(type=int, default=None), "Atlas's LM/MLM tasks are not implemented"),
    "min_lm_context_ratio": (dict(type=float, default=0.5), "Atlas's LM task is not implemented"),
    "max_lm_context_ratio": (dict(type=float, default=0.5), "Atlas's LM task is not implemented"),
    "multiple_choice_num_options": (dict(type=int, default=4), "Atlas's multiple-choice task is not implemented"),
    "multiple_choice_train_permutations": (dict(default="single", choices=["single", "cyclic", "all"]),
                                           "Atlas's multiple-choice task is not implemented"),
    "multiple_choice_eval_permutations": (dict(default="single", choices=["single", "cyclic", "all"]),
                                          "Atlas's multiple-choice task is not implemented"),
}


def _add_unimplemented_options(p):
    g = p.add_argument_group("original LAPDOG/Atlas options, not implemented (any value but the default is refused)")
    for name, (kwargs, why) in UNIMPLEMENTED.items():
        default = kwargs.get("default", False)
        g.add_argument(f"--{name}", help=f"not implemented: {why} (default {default!r})", **kwargs)


def _check_unimplemented(opts):
    for name, (kwargs, why) in UNIMPLEMENTED.items():
        if getattr(opts, name) != kwargs.get("default", False):
            raise flag_error(f"--{name}", f"is not implemented: {why}", "drop it (the original's default is accepted)")
    if opts.retriever_from == "forward":
        raise flag_error("--retriever_from", "forward (a retrieval query generated by the reader) is not implemented",
                         "use persona, context, all or persona_rand")
    if opts.task == "causal_chat":
        raise flag_error("--task", "causal_chat (the causal-LM chat task) is not implemented", "use --task qa or mlm")


def _add_reliability_options(p):
    g = p.add_argument_group("reliability")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop with exit code 3 after this many consecutive steps skipped for a NaN/inf loss "
                        "or gradient norm (default: %(default)s)")
    g.add_argument("--allow_option_changes", action="store_true",
                   help="on resume, apply changed recorded options (lr, batch size, schedule, GRPO sizes, lengths, "
                        "dropout, other data contents, number of processes, ...) with a warning each, and ignore a "
                        "changed --model_path / --reader_model_type with a warning, instead of refusing (default: off)")
    g.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep only the newest N step-N folders; `latest` and the newest complete one are "
                        "always kept (default: %(default)s, keep all)")
    g.add_argument("--dist_timeout", type=float, default=30.0,
                   help="minutes a process waits for the others in a collective before the run stops "
                        "(default: %(default)s)")


# What `evaluate.py --help` lists; it accepts every other flag too (the checkpoint's
# options.json supplies them), but a user evaluating needs only these.
EVALUATION_OPTIONS = {
    "config", "model_path", "eval_data", "max_eval_examples", "passages", "max_passages", "checkpoint_dir",
    "write_results", "dont_write_passages", "per_gpu_eval_batch_size", "n_context", "retriever_n_context",
    "closed_book", "retriever_model_path", "retriever_from", "generation_max_length", "generation_min_length",
    "generation_num_beams", "generation_no_repeat_ngram_size", "generation_repetition_penalty",
    "generation_temperature", "generation_top_p", "index_mode", "faiss_index_type", "faiss_code_size",
    "per_gpu_embedder_batch_size", "load_index_path", "save_index_path", "save_index_n_shards", "precision", "seed", "local_rank",
    "passage_retriever_path", "eval_stories", "retrieve_only", "task", "mlm_noise_density",
    "mlm_mean_noise_span_length",
}

def add_chat_options(p):
    """chat.py's own flags (no other entry point takes them; `parse(..., extra=(add_chat_options,))`)."""
    g = p.add_argument_group("chat")
    g.add_argument("--persona", default=None,
                   help='the persona R speaks for, its sentences in one string: "i have a dog. i like tea."')
    g.add_argument("--persona_file", default=None, help="the persona from a text file, one sentence per line")
    g.add_argument("--once", default=None, metavar="TEXT",
                   help="reply once to TEXT (what Q says) and exit, no interactive prompt (default: interactive)")
    g.add_argument("--show_stories", type=int, default=1,
                   help="retrieved stories printed under each reply, with title and retrieval score; 0: none")
    g.add_argument("--context_turns", type=int, default=3,
                   help="utterances the prompt's context keeps, newest last (LAPDOG's ConvAI2 data keeps 3: Q R Q)")
    g.add_argument("--show_prompt", action="store_true",
                   help="print the question each reply is generated from, in LAPDOG's format (default: off)")


def check_chat_options(opts):
    _require_at_least(opts, 0, "show_stories")
    _require_at_least(opts, 1, "context_turns")
    if opts.persona is not None and opts.persona_file is not None:
        raise flag_error("--persona", "and --persona_file both given", "pass one of them")
    if opts.persona is None and opts.persona_file is None:
        raise flag_error("--persona", "is required (or --persona_file)",
                         'pass the persona\'s sentences, e.g. --persona "i have a dog. i like tea."')


# What `chat.py --help` lists (it accepts every option; the checkpoint's options.json supplies them).
CHAT_OPTIONS = {
    "config", "model_path", "persona", "persona_file", "once", "show_stories", "context_turns", "show_prompt",
    "passages", "max_passages", "n_context", "retriever_n_context", "closed_book", "retriever_model_path",
    "retriever_from", "generation_max_length", "generation_min_length", "generation_num_beams",
    "generation_no_repeat_ngram_size", "generation_repetition_penalty",
    "generation_temperature", "generation_top_p", "index_mode", "faiss_index_type", "load_index_path", "save_index_path",
    "per_gpu_embedder_batch_size", "seed",
}


def layer_checkpoint_options(opts, explicit, saved):
    """Built-in defaults <- a checkpoint's options.json (``saved``) <- the command line: every option
    not given explicitly (``explicit``) and not in NOT_INHERITED takes the checkpoint's value."""
    merged = vars(opts)
    for key, value in saved.items():
        if key in merged and key not in explicit and key not in NOT_INHERITED:
            merged[key] = value
    return opts


HYPHENS = "every flag takes hyphens or underscores alike: --total-steps is --total_steps"
TRAIN_DESCRIPTION = f"LAPDOG-GRPO: train (stage 1, LAPDOG or GRPO stage 2). {HYPHENS}."
EVALUATE_DESCRIPTION = (
    "LAPDOG-GRPO: evaluate a checkpoint. Listed here are the evaluation options, with their built-in "
    "defaults; every training option is accepted too, and the checkpoint's options.json supplies each "
    f"option not given on this command line. {HYPHENS}.")
CHAT_DESCRIPTION = (
    "LAPDOG-GRPO: talk to a trained checkpoint. A persona, then turns: each reply is printed with the story "
    "it read. Greedy by default (--generation_num_beams for beam search); the checkpoint's options.json supplies "
    f"each option not given here (the story corpus --passages included). {HYPHENS}.")


def build_parser(prog=None, shown=None, description=TRAIN_DESCRIPTION, extra=()):
    """The parser of every option; `shown`: the option names --help lists (default: all);
    `extra`: functions adding an entry point's own option groups (chat.py's `add_chat_options`)."""
    # allow_abbrev=False: `--per_gpu_batch 2` must not silently mean --per_gpu_batch_size.
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=_HelpFormatter, allow_abbrev=False)
    for add in (_add_run_options, _add_data_options, _add_model_options, _add_index_options,
                _add_optim_options, _add_generation_options, _add_retriever_training_options,
                _add_grpo_options, _add_wandb_options, _add_unimplemented_options, _add_reliability_options,
                *extra):
        add(p)
    if shown is not None:
        for action in p._actions:
            if action.dest not in shown and action.dest != "help":
                action.help = argparse.SUPPRESS
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag's help unless the help already words its default
    (for None defaults: "(default: all)" says more than "(default: None)")."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad flags become one `error:` line."""

    def error(self, message):
        raise flag_error("command line", message, "see --help for the options")


def _quiet_parser(extra=()):
    p = build_parser(extra=extra)
    p.__class__ = _Parser
    return p


def normalize_flags(argv, parser=None):
    """`--total-steps` -> `--total_steps` for every known flag (also `--flag-name=value`).

    Only the flag name is rewritten, never a value; unknown names are left for argparse to reject.
    """
    known = {s for a in (parser or _quiet_parser())._actions for s in a.option_strings}
    out = []
    for token in argv:
        if token.startswith("--") and "-" in token[2:]:
            name, eq, value = token.partition("=")
            alt = "--" + name[2:].replace("-", "_")
            if name not in known and alt in known:
                token = alt + eq + value
        out.append(token)
    return out


def parse(argv=None, shown=None, description=TRAIN_DESCRIPTION, extra=(), prog=None):
    """Parse a command line; returns (options namespace, set of option names given explicitly).

    `--config FILE` expands, in place, into the flags its keys name, so flags after it win;
    `shown`/`description`/`prog` shape --help (evaluate.py lists only its own options); `extra`:
    an entry point's own option groups (see `build_parser`).
    """
    argv = normalize_flags(list(sys.argv[1:] if argv is None else argv), _quiet_parser(extra))
    if "-h" in argv or "--help" in argv:
        build_parser(prog=prog, shown=shown, description=description, extra=extra).parse_args(argv)  # help, exit 0
    argv = expand_config(argv, _quiet_parser(extra))
    opts = _quiet_parser(extra).parse_args(argv)
    if opts.config is not None:  # an abbreviation such as --conf reached argparse unexpanded
        raise flag_error("--config", "was abbreviated", "write --config in full")
    return opts, explicit_options(argv, extra)


def explicit_options(argv, extra=()):
    """Names of the options that appear on the command line (for evaluate.py's layering)."""
    p = _quiet_parser(extra)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(normalize_flags(argv, p))).keys())


def _require_at_least(opts, low, *names):
    for name in names:
        if getattr(opts, name) < low:
            fix = "pass a positive integer" if low == 1 else "pass 0 or a positive integer"
            raise flag_error(f"--{name}", f"must be >= {low}, got {getattr(opts, name)}", fix)


def _require_positive_temperatures(opts, *names):
    for name in names:
        if not getattr(opts, name) > 0:
            raise flag_error(f"--{name}", "must be > 0", "pass a positive temperature")


# Each option group's check, in the order the groups are declared; each raises UsageError.
_CHECKS = (_check_run_options, _check_data_options, _check_model_options, _check_index_options, _check_optim_options,
           _check_generation_options, _check_retriever_training_options, _check_grpo_options, _check_unimplemented)


def validate(opts):
    """Check values and combinations, group by group; normalise derived values. Raises UsageError."""
    for check in _CHECKS:
        check(opts)
    return opts


def warnings(opts):
    """Lines to print for valid but probably unintended setups (not errors)."""
    lines = []
    never = not RefreshSchedule.parse(opts.refresh_index).ranges
    if retriever_trained(opts) and not opts.closed_book and not opts.query_side_retriever_training and never:
        lines.append("warning: --refresh_index: -1 (never) while the retriever trains its passage side: the index keeps "
                     "the stories' step-0 embeddings, so retrieval (pools, in-loop evaluation) searches a stale index "
                     "— pass --refresh_index N (e.g. 500) or --query_side_retriever_training")
    return lines


def validate_for_device(opts, device_type):
    if opts.precision == "fp16" and device_type != "cuda":
        raise flag_error("--precision", "fp16 needs a GPU (this run is on CPU)",
                         "use --precision bf16 (works on CPU and GPU) or fp32")


def to_json_dict(opts):
    """Options as a JSON-serialisable dict (what options.json holds)."""
    return {k: v for k, v in vars(opts).items() if k not in ("metric_scale",)}
