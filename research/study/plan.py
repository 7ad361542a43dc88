"""The study's plan: which runs, with which recipe, in which order; pure functions from options
to command lines (research/study/run.py runs them).

Every method is a recipe in configs/ (``ARMS``, ``STAGE1``): the study adds only data, models and
sizes, so the recipe the README reports is the recipe that ran. Sizes come from a scale
(``SCALES``) or the size flags; an arm may override a size (``sizes``: e.g. its pool), never its
method. Steps, batch, seed, data and models are set by the study for every arm alike, so every arm
starts from the same stage-1 checkpoint and sees the same examples.
"""

import os

from src.infra.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stage 1: the reader, with the copy head, reads the posterior story of each target (no relevance
# labels); the lowest dev loss is kept (F1 could not tell a reader that talks from one that says one
# sentence) — the reader search's recipe (results/reader/RESULTS.md). Its lr and warmup go with the
# reader's size.
STAGE1 = {"config": "configs/stage1_convai2.yaml",
          "flags": ["--lr={s1_lr}", "--warmup_steps={s1_warmup}", "--early_stopping_patience={patience}",
                    "--precision={s1_precision}"]}
# How every reader answers: in-loop evaluations (stage 1 and the arms) and every evaluation on test.
DECODING = "configs/decoding_convai2.yaml"

# The generator's GRPO setting chosen on dev for every arm that trains the generator by GRPO (their
# recipes' lr 1e-4 is the sample data's): of lr 1e-4, lr 3e-5 and KL 0.1, none collapsed and lr 3e-5
# had the highest dev F1 (13.62 against 13.20 / 12.61; the control 10.28): results/study/tuning/TUNING.md.
# Last in each arm's flags: research/study/tune.py's --set adds its settings there, so the run tried
# on dev is the study's run (research/study/run.py links it).
GRPO_CHOSEN = ("--lr=3e-5",)

ARMS = {
    "control": {"config": "configs/control.yaml", "about": "stage 1 continued: reader SFT on posterior stories",
                "flags": ["--posterior_fact_swap={fact_swap}"]},
    "lapdog": {"config": "configs/lapdog_paper.yaml",
               "about": "LAPDOG as the paper: f1rougebleudist gold scores, τ_s 0.8, τ_g 0.85, reader by CE",
               "flags": ["--retriever_n_context={pool}"]},
    "lapdog_evidence": {"config": "configs/lapdog_evidence.yaml",
                        "about": "LAPDOG with the quickstart's retriever recipe: emdr_seq on the reader's evidence",
                        "flags": ["--posterior_fact_swap={fact_swap}", "--retriever_n_context={pool}"]},
    "grpo": {"config": "configs/grpo.yaml", "about": "generator GRPO, frozen retriever (top-1 story fused)",
             "flags": [*GRPO_CHOSEN]},
    "joint_grpo": {"config": "configs/joint_grpo_evidence.yaml",
                   "about": "joint GRPO, the quickstart's recipe: posterior estimator on the reader's evidence",
                   "flags": ["--grpo_retriever_pool_size={pool}", *GRPO_CHOSEN]},
    "joint_grpo_reply": {"config": "configs/joint_grpo_reply.yaml",
                         "about": "joint GRPO, posterior estimator on the greedy reply's reward (reply signal)",
                         "flags": ["--grpo_retriever_pool_size={pool}", *GRPO_CHOSEN]},
}
DEFAULT_ARMS = tuple(ARMS)
CONTROL = "control"

# Sizes per scale. cpu: the 3-seed study within about 3 hours on the 2-core CPU (timed:
# results/study/RESULTS.md). gpu: the same recipes at sizes for one GPU.
_CPU_READER = ["--d_model=256", "--d_ff=1024", "--num_layers=4", "--num_heads=4", "--d_kv=64"]
SCALES = {
    "tiny": dict(reader_sizes=["--d_model=32", "--d_ff=64", "--num_layers=1", "--num_heads=2", "--d_kv=16"],
                 pretrain_steps=4, pretrain_batch=8, s1_steps=6, s1_batch=4, s1_eval_freq=3, patience=1, s1_lr=1e-3,
                 s2_steps=2, s2_batch=2, eval_freq=0, dev_n=6, eval_n=8, max_passages=40,
                 text_maxlength=96, target_maxlength=16, generation_max_length=8, pool=4, fact_swap=0.0, eval_batch=8,
                 s1_precision="fp32", precision="fp32"),
    # pretrain_steps 0: the reader starts from its MiniLM-initialized embeddings (on dev, 750 steps of
    # pretraining lowered the perplexity but made the greedy replies more generic: RESULTS.md, "The reader";
    # 400 MLM steps before 1,000 stage-1 steps ended where 1,200 stage-1 steps alone do: results/reader/LOG.md, chunk 3).
    # s1_steps 1200: the reader search's dev loss still fell at step 1,200 (results/reader/LOG.md, chunk 2);
    # it adds about 12 min per seed to the timed 3 hours (800 steps then).
    "cpu": dict(reader_sizes=_CPU_READER, pretrain_steps=0, pretrain_batch=64, s1_steps=1200, s1_batch=32,
                s1_eval_freq=200, patience=2, s1_lr=1e-3, s2_steps=60, s2_batch=8,
                eval_freq=30, dev_n=200, eval_n=None, max_passages=None, text_maxlength=192, target_maxlength=32,
                generation_max_length=32, pool=8, fact_swap=0.0, eval_batch=50, s1_precision="fp32",
                precision="fp32"),  # bf16: 57 s/step against fp32's 3.1 on a CPU without bf16 instructions
                                    # (the copy reader's stage 1; results/study/LOG.md, chunk 1)
    "gpu": dict(reader_sizes=["--d_model=512", "--d_ff=2048", "--num_layers=6", "--num_heads=8", "--d_kv=64"],
                pretrain_steps=10000, pretrain_batch=128, s1_steps=8000, s1_batch=64, s1_eval_freq=500, patience=3,
                s1_lr=5e-4, s2_steps=600, s2_batch=32, eval_freq=100, dev_n=769, eval_n=None,
                max_passages=None, text_maxlength=256, target_maxlength=32, generation_max_length=32, pool=32,
                fact_swap=0.0, eval_batch=128, s1_precision="bf16", precision="bf16"),
}
SIZE_FLAGS = ("pretrain_steps", "s1_steps", "s1_batch", "s1_eval_freq", "patience", "s2_steps", "s2_batch",
              "eval_freq", "dev_n", "eval_n", "max_passages", "text_maxlength", "generation_max_length", "pool")
# Set by the study for every run; an arm setting one would break "same steps, same examples".
SHARED = ("--total_steps", "--per_gpu_batch_size", "--accumulation_steps", "--seed", "--model_path",
          "--train_data", "--eval_data", "--checkpoint_dir", "--passages", "--max_passages",
          "--retriever_model_path", "--text_maxlength", "--target_maxlength", "--generation_max_length")


def sizes_of(scale, overrides=None) -> dict:
    s = dict(SCALES[scale])
    s.update({k: v for k, v in (overrides or {}).items() if v is not None})
    s["s1_warmup"] = max(1, min(100, s["s1_steps"] // 10))
    return s


def check_arms(names, arms=ARMS):
    for name in names:
        if name not in arms:
            raise UsageError(f"--arms: unknown arm '{name}' — pick from {', '.join(arms)}")
    if CONTROL not in names:
        raise UsageError(f"--arms: '{CONTROL}' is missing — every other arm is reported relative to it")
    for name, arm in arms.items():
        for flag in arm["flags"]:
            if flag.split("=")[0] in SHARED:
                raise UsageError(f"ARMS['{name}'] sets {flag.split('=')[0]} — steps, batch, data and models are "
                                 "shared by all arms; change the scale or the size flags instead")
        if not os.path.isfile(os.path.join(ROOT, arm["config"])):
            raise UsageError(f"ARMS['{name}']: {arm['config']} does not exist")


def fill(flags, sizes):
    return [f.format(**sizes) for f in flags]


def with_flags(cmd, **flags):
    """``cmd`` with each ``--key=value`` of ``flags`` replacing the command's own ``--key=`` entry (or
    added), appended in the order given: the study's step commands run again with another checkpoint,
    data or folder (research/study/length_check.py, tuned_test.py)."""
    keep = [c for c in cmd if not c.startswith(tuple(f"--{k}=" for k in flags))]
    return [*keep, *(f"--{k}={v}" for k, v in flags.items())]


def _common(paths, sizes, seed, run_dir, name):
    """What every training run shares: data, models, lengths, precision, the in-loop dev set and its
    decoding (which touches evaluation only: training's scored replies do not read it)."""
    out = ["--config", DECODING, f"--seed={seed}", f"--name={name}", f"--checkpoint_dir={run_dir}",
           f"--train_data={paths['train']}", f"--eval_data={paths['dev']}", f"--max_eval_examples={sizes['dev_n']}",
           f"--passages={paths['stories']}",
           f"--retriever_model_path={paths['retriever']}", f"--text_maxlength={sizes['text_maxlength']}",
           f"--target_maxlength={sizes['target_maxlength']}",
           f"--generation_max_length={sizes['generation_max_length']}", f"--precision={sizes['precision']}",
           f"--per_gpu_eval_batch_size={sizes['eval_batch']}", "--n_context=1", "--retriever_n_context=1",
           "--generation_length_penalty=1.0", f"--load_index_path={paths['index']}"]
    if sizes["max_passages"]:
        out.append(f"--max_passages={sizes['max_passages']}")
    return out


def pretrain_command(paths, sizes, out_dir):
    """Atlas's MLM task in train.py, closed book: T5 span corruption over the stories and the train
    split's dialogue texts; the held-out span loss on the dev dialogues' texts picks checkpoint/best,
    whose reader/ starts stage 1."""
    steps = sizes["pretrain_steps"]
    return ["train.py", "--task=mlm", "--closed_book", "--train_data", paths["stories"], paths["train"],
            f"--eval_data={paths['dev']}", f"--max_eval_examples={sizes['dev_n']}",
            f"--reader_model_type={paths['reader_init']}", f"--checkpoint_dir={out_dir}", "--name=study_pretraining",
            f"--total_steps={steps}", f"--per_gpu_batch_size={sizes['pretrain_batch']}", "--lr=1e-3",
            f"--warmup_steps={max(1, steps // 15)}", f"--eval_freq={max(1, steps // 6)}", f"--save_freq={steps}",
            f"--log_freq={max(1, steps // 60)}", "--keep_best", f"--text_maxlength={sizes['text_maxlength']}",
            f"--target_maxlength={sizes['target_maxlength']}", f"--precision={sizes['precision']}",
            f"--per_gpu_eval_batch_size={sizes['eval_batch']}", "--seed=0"]


def stage1_command(paths, sizes, seed, run_dir):
    return ["train.py", "--config", STAGE1["config"], *_common(paths, sizes, seed, run_dir, f"study_stage1_seed{seed}"),
            f"--reader_model_type={paths['reader']}", f"--total_steps={sizes['s1_steps']}",
            f"--per_gpu_batch_size={sizes['s1_batch']}", f"--eval_freq={sizes['s1_eval_freq']}",
            f"--save_freq={sizes['s1_steps']}", f"--log_freq={max(1, sizes['s1_steps'] // 60)}",
            *fill(STAGE1["flags"], sizes)]


def arm_command(name, paths, sizes, seed, stage1_ckpt, run_dir):
    """The arm's recipe, then the shared sizes (which win), then the arm's own size overrides."""
    arm = ARMS[name]
    return ["train.py", "--config", arm["config"], *_common(paths, sizes, seed, run_dir, f"study_{name}_seed{seed}"),
            f"--model_path={stage1_ckpt}", f"--total_steps={sizes['s2_steps']}",
            f"--per_gpu_batch_size={sizes['s2_batch']}", f"--eval_freq={sizes['eval_freq']}",
            f"--save_freq={sizes['s2_steps']}", f"--log_freq={max(1, min(5, sizes['s2_steps'] // 2))}",
            *fill(arm["flags"], sizes)]


def eval_command(ckpt, mode, paths, sizes, seed, eval_dir):
    cmd = ["evaluate.py", "--config", DECODING, f"--model_path={ckpt}", f"--eval_data={paths['test']}",
           "--write_results", f"--checkpoint_dir={eval_dir}", f"--per_gpu_eval_batch_size={sizes['eval_batch']}",
           f"--seed={seed}", "--generation_length_penalty=1.0", f"--precision={sizes['precision']}"]
    if sizes["eval_n"]:
        cmd.append(f"--max_eval_examples={sizes['eval_n']}")
    if mode in ("retrieval", "random_story"):
        cmd += [f"--passages={paths['stories']}", f"--retriever_model_path={paths['retriever']}", "--n_context=1",
                "--retriever_n_context=1"]
        if sizes["max_passages"]:
            cmd.append(f"--max_passages={sizes['max_passages']}")
        if mode == "random_story":
            cmd.append("--eval_stories=random")
    elif mode == "closed_book":
        cmd.append("--closed_book")
    else:
        raise ValueError(f"unknown evaluation mode {mode!r}")
    return cmd


# The retrieval ablations: the same checkpoint fed a random story, and no story. What an arm scores
# with its retrieved story minus what it scores with a random one is what its retrieval is worth.
ABLATIONS = ("random_story", "closed_book")


def evaluations(arms):
    """[(arm, mode)]: every arm with retrieval (its top-1 story fused), then every arm's ablations."""
    return [(a, "retrieval") for a in arms] + [(a, m) for m in ABLATIONS for a in arms]


def plan(arms, seeds, paths, sizes, out, index_saved=False):
    """[(kind, label, folder, argv)] in run order. Shared by all seeds: the pretraining (the
    reader's starting point) and the index of the pretrained retriever (the first stage 1 saves
    it unless ``index_saved``, every other run loads it: the arms train the query side only, so
    their stories stay embedded by it). Per seed: stage 1, every arm from its best checkpoint,
    the evaluations."""
    steps = []
    if sizes["pretrain_steps"]:
        steps.append(("pretrain", "pretraining (shared)", os.path.join(out, "pretrained"),
                      pretrain_command(paths, sizes, os.path.join(out, "pretrained"))))
    for i, seed in enumerate(seeds):
        sdir = os.path.join(out, f"seed{seed}")
        s1 = os.path.join(sdir, "stage1")
        cmd = stage1_command(paths, sizes, seed, s1)
        if i == 0 and not index_saved:  # the first stage 1 builds and saves the shared index
            cmd = [c for c in cmd if not c.startswith("--load_index_path=")] + [f"--save_index_path={paths['index']}"]
        steps.append(("train", f"seed {seed} stage 1", s1, cmd))
        best = os.path.join(s1, "checkpoint", "best")
        for name in arms:
            run_dir = os.path.join(sdir, name)
            steps.append(("train", f"seed {seed} {name}", run_dir, arm_command(name, paths, sizes, seed, best, run_dir)))
        for name, mode in evaluations(arms):
            ckpt = os.path.join(sdir, name, "checkpoint", "latest")
            eval_dir = os.path.join(sdir, "eval", f"{name}-{mode}")
            cmd = eval_command(ckpt, mode, paths, sizes, seed, eval_dir)
            if mode != "closed_book":
                cmd.append(f"--load_index_path={paths['index']}")
            steps.append(("eval", f"seed {seed} eval {name} ({mode})", eval_dir, cmd))
    return steps
