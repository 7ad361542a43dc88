"""Flag validation: every impossible combination gives one clear `--flag: problem — what to do` line."""

import pytest

from src.cli import options
from src.infra.errors import UsageError
from src.objectives import schedule

BASE = ["--train_data", "t.jsonl", "--passages", "p.jsonl"]
GRPO = BASE + ["--reader_rl_learning", "--use_grpo"]


def parsed(argv):
    opts, _ = options.parse(argv)
    return options.validate(opts)


def error_of(argv):
    with pytest.raises(UsageError) as exc:
        parsed(argv)
    msg = str(exc.value)
    assert "\n" not in msg and " — " in msg
    return msg


def test_seed_defaults():
    o = parsed(BASE)
    assert (o.per_gpu_batch_size, o.accumulation_steps, o.lr, o.warmup_steps) == (1, 1, 1e-4, 100)
    assert (o.grpo_group_size, o.grpo_kl_coeff, o.grpo_clip_epsilon, o.grpo_retriever_group_size) == (4, 0.1, 0.2, 5)
    assert (o.generation_length_penalty, o.grpo_temperature, o.grpo_top_p) == (0.0, 1.0, 1.0)
    assert (o.grpo_retriever_temperature, o.grpo_retriever_pool_size, o.grpo_num_iterations) == (1.0, 20, 1)
    assert o.grpo_loss_type == "grpo"
    assert o.metric_scale == {"bleu": 0.01, "f1": 1.0, "rouge": 1.0}
    assert o.per_gpu_eval_batch_size == 1


def test_local_rank_both_spellings():
    assert parsed(BASE + ["--local-rank=1"]).local_rank == 1
    assert parsed(BASE + ["--local_rank", "0"]).local_rank == 0


def test_seed_metric_scale_factors_string():
    o = parsed(BASE + ["--metric_scale_factors", "{'bleu':0.01,'f1':0.01,'rouge':0.01}", "--scale_rouge"])
    assert o.metric_scale == {"bleu": 0.01, "f1": 0.01, "rouge": 0.01}


@pytest.mark.parametrize("argv, flag", [
    (GRPO + ["--grpo_group_size", "1"], "--grpo_group_size"),
    (GRPO + ["--grpo_train_retriever", "--grpo_retriever_group_size", "1", "--grpo_retriever_estimator", "rloo"],
     "--grpo_retriever_group_size"),
    (GRPO + ["--grpo_train_retriever", "--grpo_retriever_group_size", "0", "--grpo_retriever_estimator", "posterior"],
     "--grpo_retriever_group_size"),
    (GRPO + ["--grpo_train_retriever", "--grpo_retriever_group_size", "8", "--grpo_retriever_pool_size", "4"],
     "--grpo_retriever_group_size"),
    (BASE + ["--use_grpo"], "--use_grpo"),
    (GRPO + ["--gold_score_mode", "ppmean"], "--gold_score_mode"),
    (GRPO + ["--grpo_train_retriever", "--train_retriever"], "--grpo_train_retriever"),
    (BASE + ["--metric_scale_factors", "__import__('os')"], "--metric_scale_factors"),
    (BASE + ["--refresh_index", "abc"], "--refresh_index"),
    (BASE + ["--add_random_retrieval", "1.5"], "--add_random_retrieval"),
    (BASE + ["--n_context", "6", "--retriever_n_context", "2"], "--n_context"),
    (["--closed_book", "--train_retriever"], "--closed_book"),
    (BASE + ["--total_steps", "0"], "--total_steps"),
    (BASE + ["--shard_grads"], "--shard_grads"),
    (BASE + ["--grpo_top_p", "0"], "--grpo_top_p"),
    (BASE + ["--retriever_signal", "knowledge"], "--retriever_signal"),
    (GRPO + ["--grpo_train_retriever", "--retriever_signal", "knowledge", "--grpo_retriever_estimator", "rloo"],
     "--retriever_signal"),
    (BASE + ["--train_retriever", "--gold_score_mode", "emdr", "--retriever_signal", "knowledge"], "--retriever_signal"),
    (BASE + ["--retriever_signal", "evidence"], "--retriever_signal"),
    (GRPO + ["--grpo_train_retriever", "--retriever_signal", "evidence", "--grpo_retriever_estimator", "rloo"],
     "--retriever_signal"),
    (BASE + ["--train_retriever", "--gold_score_mode", "emdr", "--retriever_signal", "evidence"], "--retriever_signal"),
    (GRPO + ["--grpo_train_retriever", "--grpo_retriever_estimator", "posterior",
             "--grpo_retriever_target_temperature", "0"], "--grpo_retriever_target_temperature"),
    (BASE + ["--generation_repetition_penalty", "0"], "--generation_repetition_penalty"),
    (BASE + ["--generation_temperature", "-1"], "--generation_temperature"),
    (BASE + ["--generation_temperature", "0.7", "--generation_top_p", "1.5"], "--generation_top_p"),
    (BASE + ["--generation_top_p", "0.9"], "--generation_top_p"),  # without sampling it would do nothing
    (BASE + ["--generation_temperature", "0.7", "--generation_num_beams", "4"], "--generation_temperature"),
    (BASE + ["--keep_best", "--eval_freq", "0"], "--keep_best"),
    (BASE + ["--precision", "fp64"], "command line"),
    (BASE + ["--no_such_flag"], "command line"),
])
def test_flag_errors(argv, flag):
    assert error_of(argv).startswith(flag)


def test_top_p_below_one_is_allowed():
    assert parsed(GRPO + ["--grpo_top_p", "0.9"]).grpo_top_p == 0.9


def test_fp16_on_cpu_is_an_error_bf16_is_not():
    o = parsed(BASE + ["--precision", "fp16"])
    with pytest.raises(UsageError, match="--precision"):
        options.validate_for_device(o, "cpu")
    options.validate_for_device(parsed(BASE + ["--precision", "bf16"]), "cpu")
    options.validate_for_device(o, "cuda")


def test_closed_book_forces_one_context():
    o = parsed(["--closed_book", "--n_context", "4", "--retriever_n_context", "4"])
    assert o.n_context == o.retriever_n_context == 1


def test_explicit_options():
    assert options.explicit_options(["--lr", "1e-3", "--closed_book"]) == {"lr", "closed_book"}


def test_retriever_frozen_at_is_the_one_freeze_test():
    from src.objectives.schedule import training_kind
    o = parsed(BASE + ["--train_retriever", "--freeze_retriever_steps", "3"])
    assert [schedule.retriever_frozen_at(o, s) for s in range(5)] == [True, True, True, False, False]
    assert [training_kind(o, s) for s in (2, 3)] == ["sft", "lapdog"]
    never = parsed(BASE + ["--train_retriever"])  # the default -1: trained from step 0
    assert not schedule.retriever_frozen_at(never, 0)
