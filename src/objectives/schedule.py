"""Which objective a training step runs, and what acts at which step, read from the options.

Pure functions of the parsed options (an argparse namespace) and the step (completed optimizer
updates): the model, the batch builder, retrieval and the model card all ask here, so the answer
is the same everywhere."""

def training_kind(opts, step):
    if opts.use_grpo:
        return "grpo_joint" if opts.grpo_train_retriever else "grpo"
    if opts.reader_rl_learning:
        return "reinforce"
    if lapdog_retriever_trained(opts, step):
        return "lapdog"
    return "sft"


def lapdog_retriever_trained(opts, step):
    """Whether LAPDOG's retriever loss (--train_retriever) acts at this step (completed updates)."""
    return bool(opts.train_retriever) and not retriever_frozen_at(opts, step)


def augments_candidates(opts, step, train):
    """--add_random_retrieval at this step: the original augments only while LAPDOG trains the
    retriever; replace_bottom in every training step."""
    if not train or opts.add_random_retrieval <= 0:
        return False
    return opts.add_random_retrieval_mode == "replace_bottom" or lapdog_retriever_trained(opts, step)


def max_reply_tokens(opts):
    """The most tokens a sampled reply can have (EOS included): --generation_max_length counts the
    decoder start token, as in transformers. dr_grpo's constant divisor (TRL's max_completion_length)."""
    return opts.generation_max_length - 1


def retriever_trained(opts):
    return bool(opts.train_retriever or opts.grpo_train_retriever)


def retriever_frozen_at(opts, step):
    """True while --freeze_retriever_steps holds the retriever at `step` (completed updates):
    no retriever loss, no retriever optimizer step, no index refresh. The one test of it."""
    return step < opts.freeze_retriever_steps
