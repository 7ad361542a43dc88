"""The study: SFT control vs LAPDOG vs generator GRPO vs joint GRPO on real data, one command.

    python scripts/study.py [--data_dir ../shared/data] [--scale cpu|gpu|tiny] [--seeds 0 1]
                            [--arms control lapdog grpo joint_grpo] [--out runs/study] [--publish DIR]

1. Splits the dialogues (default ``DATA_DIR/convai2/valid.jsonl``) by persona with a fixed seed
   (``--split_seed``) into train / dev / test (scripts/study_split.py); dev feeds the in-loop
   evaluation curves (for choosing hyperparameters), test only the reported table.
2. Per training seed: one shared stage 1 (reader SFT with each reply's posterior story fused,
   ``STAGE1_FLAGS``), then every arm of ``ARMS`` from that same checkpoint with the same
   optimizer steps and batch (so the same examples seen): the sizes are shared, the arms differ
   only in their flags.
3. Evaluates every arm on the test split with retrieval (the control also closed-book), reads
   the results with compute_metrics.py's definitions (LAPDOG's and the standard block) and
   writes ``OUT/RESULTS.md`` (mean ± std over seeds, change vs the control, per-seed lines for
   collapsed arms, command, machine, wall time, split), ``OUT/results.json`` and
   ``OUT/figures/`` (bars with seed spread, training curves).

Each step runs train.py / evaluate.py as a subprocess, logs to its folder and is skipped when
re-run after it finished (delete the folder to redo it); every command is appended to
``OUT/commands.sh``. ``--dry_run`` writes the split and prints the plan. ``--dialogues`` /
``--stories`` run the same study on any small files (the test does, with ``--tiny``).
Missing data: one ``error: ...`` line, exit 2; a failed step: one line naming its log, exit 1.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts import study_report, study_split  # noqa: E402
from src.errors import UsageError  # noqa: E402

# ============================================================================================
# THE ARMS: edit recipes here. Flags are train.py flags; "{name}" is filled from the sizes of
# the chosen scale (SCALES below, or the size flags). Steps, batch, seed, data and model paths
# are shared by all arms and set by the study itself; an arm may not set them (checked), so
# every arm starts from the same stage-1 checkpoint and sees the same examples.
# ============================================================================================
# Stage 1 teaches the reader to read (README: "Teaching the reader to read"); the paper's closed-book
# stage 1 is ["--closed_book", ...] (then the control arm needs --closed_book too).
_READS = ["--posterior_passages", "--posterior_fact_swap=0.9"]
STAGE1_FLAGS = [*_READS, "--lr=1e-3", "--warmup_steps={s1_warmup}", "--scheduler=linear", "--dropout=0.1"]

_GRPO = ["--reader_rl_learning", "--use_grpo", "--gold_score_mode=f1rougebleudist", "--grpo_group_size={G}",
         "--grpo_kl_coeff=0.05", "--grpo_clip_epsilon=0.2", "--grpo_temperature=0.7",
         "--generation_length_penalty=1.0", "--lr=5e-5"]
_LAPDOG = ["--train_retriever", "--gold_score_mode=f1rougebleudist", "--temperature_score=0.8",
           "--temperature_gold=0.85", "--lr=1e-4", "--lr_retriever=1e-5", "--refresh_index={refresh}"]

ARMS = {
    # (a) the control: stage 1 continued with plain closed-book SFT
    "control": {"retrieval": True, "evals": ("retrieval", "closed_book"),
                "about": "stage 1 continued: SFT of the reader on posterior stories (fact swaps)",
                "flags": [*_READS, "--lr=1e-4", "--dropout=0.1"]},
    # (b) LAPDOG stage 2: retriever toward the gold scores, reader by CE on the fused stories
    "lapdog": {"retrieval": True, "own_index": True, "evals": ("retrieval",),
               "about": "LAPDOG: f1rougebleudist gold scores, tau_s 0.8, tau_g 0.85, reader CE",
               "flags": _LAPDOG},
    # (c) generator GRPO (frozen retriever, top-n stories fused)
    "grpo": {"retrieval": True, "evals": ("retrieval",),
             "about": "generator GRPO: G replies per prompt, k3 KL to the stage-1 reader",
             "flags": _GRPO},
    # (d) joint GRPO: generator + retriever
    "joint_grpo": {"retrieval": True, "evals": ("retrieval",),
                   "about": "joint GRPO: pool estimator (greedy rewards of all M pool stories), k stories "
                            "drawn for the generator, G replies each; query side trained, tau 0.02",
                   "flags": _GRPO + ["--grpo_train_retriever", "--grpo_retriever_group_size={k}",
                                     "--grpo_retriever_pool_size={pool}", "--lr_retriever=1e-5",
                                     "--grpo_retriever_estimator=pool", "--query_side_retriever_training",
                                     "--grpo_retriever_temperature=0.02", "--grpo_retriever_kl_coeff=0.001"]},
    # (e) extras, run when named in --arms
    "sft_rag": {"retrieval": True, "evals": ("retrieval",),
                "about": "reader SFT on the frozen retriever's top-n stories (LAPDOG without retriever training)",
                "flags": ["--lr=1e-4", "--dropout=0.1"]},
    "lapdog_aug": {"retrieval": True, "own_index": True, "evals": ("retrieval",),
                   "about": "LAPDOG with candidate augmentation (20% random stories in training)",
                   "flags": _LAPDOG + ["--add_random_retrieval=0.2"]},
    "reinforce": {"retrieval": True, "evals": ("retrieval",),
                  "about": "REINFORCE on the reader, batch-mean baseline, same reward as GRPO",
                  "flags": ["--reader_rl_learning", "--gold_score_mode=f1rougebleudist",
                            "--generation_length_penalty=1.0", "--lr=5e-5"]},
}
DEFAULT_ARMS = ("control", "lapdog", "grpo", "joint_grpo")
CONTROL = "control"
# Same reward for every arm's evaluation (the checkpoints store different length penalties).
EVAL_FLAGS = ["--generation_length_penalty=1.0"]

# Sizes per scale. cpu: meant to finish in about 90 minutes for 2 seeds on a 2-core CPU
# (estimated from the quickstart's speed, not yet measured: time the first run and adjust).
# The quickstart's reader (1.3M parameters with a data-sized vocabulary): 4x faster per step than
# build_small_models.py's default 256-wide 4+4-layer reader.
_QUICKSTART_READER = ["--d_model=128", "--d_ff=512", "--num_layers=2", "--num_decoder_layers=2", "--num_heads=4",
                      "--d_kv=32"]
SCALES = {
    "tiny": dict(s1_steps=4, s2_steps=2, s1_batch=4, s2_batch=2, accumulation=1, eval_n=6, dev_n=4,
                 max_passages=40, text_maxlength=96, target_maxlength=16, generation_max_length=8,
                 eval_freq=0, log_freq=1, n_context=1, retriever_n_context=2, pool=4, k=2, G=2,
                 eval_batch=8, reader_sizes=["--d_model=64", "--d_ff=128", "--num_layers=2",
                                             "--num_decoder_layers=2", "--num_heads=2", "--d_kv=32"]),
    "cpu": dict(s1_steps=600, s2_steps=100, s1_batch=16, s2_batch=4, accumulation=1, eval_n=None, dev_n=100,
                max_passages=5000, text_maxlength=192, target_maxlength=32, generation_max_length=32,
                eval_freq=50, log_freq=1, n_context=1, retriever_n_context=4, pool=8, k=4, G=4,
                eval_batch=32, reader_sizes=_QUICKSTART_READER),
    "gpu": dict(s1_steps=4000, s2_steps=600, s1_batch=32, s2_batch=8, accumulation=1, eval_n=None, dev_n=400,
                max_passages=None, text_maxlength=256, target_maxlength=32, generation_max_length=32,
                eval_freq=100, log_freq=5, n_context=2, retriever_n_context=6, pool=20, k=4, G=8,
                eval_batch=64, reader_sizes=[]),
}
SIZE_FLAGS = ("s1_steps", "s2_steps", "s1_batch", "s2_batch", "accumulation", "eval_n", "dev_n", "max_passages",
              "text_maxlength", "generation_max_length", "eval_freq", "n_context", "retriever_n_context",
              "pool", "k", "G")
# Set by the study for every run; an arm setting one would break "same steps, same examples".
_SHARED = ("--total_steps", "--per_gpu_batch_size", "--accumulation_steps", "--seed", "--model_path",
           "--train_data", "--eval_data", "--checkpoint_dir", "--passages", "--max_passages",
           "--retriever_model_path", "--n_context", "--retriever_n_context", "--text_maxlength",
           "--target_maxlength", "--generation_max_length", "--warmup_steps")
_RESULT_KEYS = ("reward", "eval_loss", "retrieval/top1_score")  # taken from evaluate.py's own JSON


# --------------------------------------------------------------------------------------------
# Plan: pure functions from options to commands

def sizes_of(args) -> dict:
    s = dict(SCALES[args.scale])
    for name in SIZE_FLAGS:
        if getattr(args, name, None) is not None:
            s[name] = getattr(args, name)
    s["refresh"] = max(1, s["s2_steps"] // 4)  # re-embed the corpus 4 times while a retriever trains
    s["s1_warmup"] = max(1, s["s1_steps"] // 20)
    s["s2_warmup"] = max(1, s["s2_steps"] // 10)
    s["s1_log_freq"] = max(1, s["s1_steps"] // 50)  # ~50 points on the stage-1 curve
    return s


def check_arms(names, arms=ARMS):
    for name in names:
        if name not in arms:
            raise UsageError(f"--arms: unknown arm '{name}' — pick from {', '.join(arms)}")
    if CONTROL not in names:
        raise UsageError(f"--arms: '{CONTROL}' is missing — every other arm is reported relative to it")
    for name, arm in arms.items():
        for flag in arm["flags"]:
            if flag.split("=")[0] in _SHARED:
                raise UsageError(f"ARMS['{name}'] sets {flag.split('=')[0]} — steps, batch, data and models are "
                                 "shared by all arms; change the scale or the size flags instead")


def fill(flags, sizes):
    return [f.format(**sizes) for f in flags]


def _retrieval_flags(paths, sizes):
    out = [f"--passages={paths['stories']}", f"--retriever_model_path={paths['retriever']}",
           f"--n_context={sizes['n_context']}", f"--retriever_n_context={sizes['retriever_n_context']}"]
    if sizes["max_passages"]:
        out.append(f"--max_passages={sizes['max_passages']}")
    return out


def stage1_command(paths, sizes, seed, run_dir):
    reads = [] if "--closed_book" in STAGE1_FLAGS else _retrieval_flags(paths, sizes)
    return [*_stage1_base(paths, sizes, seed, run_dir), *reads]


def _stage1_base(paths, sizes, seed, run_dir):
    return ["train.py", "--shuffle", f"--total_steps={sizes['s1_steps']}", f"--per_gpu_batch_size={sizes['s1_batch']}",
            f"--save_freq={sizes['s1_steps']}", "--eval_freq=0", f"--log_freq={sizes['s1_log_freq']}", f"--seed={seed}",
            f"--name=study_stage1_seed{seed}", f"--checkpoint_dir={run_dir}", f"--reader_model_type={paths['reader']}",
            f"--train_data={paths['train']}", f"--eval_data={paths['dev']}", f"--max_eval_examples={sizes['dev_n']}",
            f"--text_maxlength={sizes['text_maxlength']}", f"--target_maxlength={sizes['target_maxlength']}",
            f"--generation_max_length={sizes['generation_max_length']}", *fill(STAGE1_FLAGS, sizes)]


def arm_command(name, paths, sizes, seed, stage1_ckpt, run_dir):
    arm = ARMS[name]
    cmd = ["train.py", "--shuffle", f"--total_steps={sizes['s2_steps']}", f"--per_gpu_batch_size={sizes['s2_batch']}",
           f"--accumulation_steps={sizes['accumulation']}", f"--warmup_steps={sizes['s2_warmup']}",
           f"--save_freq={sizes['s2_steps']}", f"--eval_freq={sizes['eval_freq']}", f"--log_freq={sizes['log_freq']}",
           f"--seed={seed}", f"--name=study_{name}_seed{seed}", f"--checkpoint_dir={run_dir}",
           f"--model_path={stage1_ckpt}", f"--train_data={paths['train']}", f"--eval_data={paths['dev']}",
           f"--max_eval_examples={sizes['dev_n']}", f"--text_maxlength={sizes['text_maxlength']}",
           f"--target_maxlength={sizes['target_maxlength']}", f"--generation_max_length={sizes['generation_max_length']}"]
    if arm["retrieval"]:
        cmd += _retrieval_flags(paths, sizes)
    return cmd + fill(arm["flags"], sizes)


def eval_command(ckpt, mode, paths, sizes, seed, eval_dir):
    cmd = ["evaluate.py", f"--model_path={ckpt}", f"--eval_data={paths['test']}", "--write_results",
           f"--checkpoint_dir={eval_dir}", f"--per_gpu_eval_batch_size={sizes['eval_batch']}", f"--seed={seed}",
           *EVAL_FLAGS]
    if sizes["eval_n"]:
        cmd.append(f"--max_eval_examples={sizes['eval_n']}")
    if mode == "retrieval":
        cmd += _retrieval_flags(paths, sizes)
    return cmd


def plan(arms, seeds, paths, sizes, out):
    """[(kind, label, folder, argv)] in run order: stage 1, arms, evaluations, per seed.

    Every run whose stories are embedded by the pretrained retriever (stage 1, the arms that do
    not train the passage side, their evaluations) shares one index: the first stage 1 saves it
    (--save_index_path), the others load it (--load_index_path; its fingerprint is checked).
    Embedding 5,000 stories took ~2 minutes per run on the 2-core CPU."""
    shared = os.path.join(out, "index-pretrained")
    steps = []
    for seed in seeds:
        sdir = os.path.join(out, f"seed{seed}")
        s1 = os.path.join(sdir, "stage1")
        s1_ckpt = os.path.join(s1, "checkpoint", "latest")
        index = [f"--save_index_path={shared}"] if not steps else [f"--load_index_path={shared}"]
        steps.append(("train", f"seed {seed} stage 1", s1, stage1_command(paths, sizes, seed, s1) + index))
        load = [f"--load_index_path={shared}"]
        for name in arms:
            run_dir = os.path.join(sdir, name)
            own = ARMS[name].get("own_index") or not ARMS[name]["retrieval"]
            steps.append(("train", f"seed {seed} {name}", run_dir,
                          arm_command(name, paths, sizes, seed, s1_ckpt, run_dir) + ([] if own else load)))
        for name in arms:
            ckpt = os.path.join(sdir, name, "checkpoint", "latest")
            for mode in ARMS[name]["evals"]:
                eval_dir = os.path.join(sdir, "eval", f"{name}-{mode}")
                own = ARMS[name].get("own_index") or mode != "retrieval"
                steps.append(("eval", f"seed {seed} eval {name} ({mode})", eval_dir,
                              eval_command(ckpt, mode, paths, sizes, seed, eval_dir) + ([] if own else load)))
    return steps


# --------------------------------------------------------------------------------------------
# Running

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc):
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]


DONE = "study_done.json"


def run_step(label, folder, argv, nproc, commands_file):
    """Run one train.py / evaluate.py; skipped when its folder holds study_done.json."""
    done = os.path.join(folder, DONE)
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        print(f"== {label}: done before ({info['wall_s']:.0f} s), skipped", flush=True)
        return info
    os.makedirs(folder, exist_ok=True)
    cmd = launcher(nproc) + argv
    with open(commands_file, "a") as f:
        f.write(shlex.join(cmd) + "\n")
    log = os.path.join(folder, "study.log")
    print(f"== {label}", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "offline")
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise StepFailed(f"{label}: {argv[0]} exited {p.returncode} — see {log}")
    info = {"label": label, "wall_s": wall, "command": shlex.join(cmd)}
    with open(done, "w") as f:
        json.dump(info, f)
    print(f"   {wall:.0f} s", flush=True)
    return info


class StepFailed(Exception):
    pass


def eval_metrics(eval_dir, test_path):
    """compute_metrics.py's numbers (both blocks) of the results file, plus evaluate.py's reward,
    eval loss and retrieval statistics from the last line of its log."""
    import compute_metrics as cm

    import glob

    name = os.path.splitext(os.path.basename(test_path))[0]
    # evaluate.py names it {--checkpoint_dir}/results/step-N.<name>.results.jsonl (`name` alone
    # for a checkpoint folder not called step-N)
    found = sorted(glob.glob(os.path.join(eval_dir, "**", f"*{name}.results.jsonl"), recursive=True))
    gens, refs = cm.read_results(found[-1] if found else os.path.join(eval_dir, f"{name}.results.jsonl"))
    metrics = cm.results_metrics(gens, refs)
    own = {}
    with open(os.path.join(eval_dir, "study.log")) as f:
        for line in f:  # progress bars share the log, so the JSON may follow a \r on its line
            start = line.find('{"')
            try:
                parsed = json.loads(line[start:]) if start >= 0 else None
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and isinstance(parsed.get(name), dict):
                own = parsed[name]
    metrics.update({k: v for k, v in own.items() if k in _RESULT_KEYS or k.startswith("recall@")})
    return metrics


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    # GNU nproc honours OMP_NUM_THREADS, which the runs set to 1: ask it without that
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, env=env).stdout.strip()
    except OSError:
        nproc = str(len(os.sched_getaffinity(0)))
    gpu = ""
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = ", ".join(q.stdout.split("\n")).strip(", ") if q.returncode == 0 else ""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return {"platform": platform.platform(), "cpu": cpu, "nproc": nproc, "gpu": gpu or "none",
            "python": platform.python_version(), "torch": torch_version}


def build_models(out, sizes, vocab_from=()):
    """A small random-init T5 reader + MiniLM retriever (scripts/build_small_models.py), once.
    ``vocab_from``: jsonl files whose word pieces make the reader's vocabulary (the split's
    dialogues and the stories: a ~10x smaller output layer, same tokenization of those texts)."""
    models = os.path.join(out, "models")
    cmd = [sys.executable, "scripts/build_small_models.py", f"--out={models}", *sizes["reader_sizes"]]
    if vocab_from:
        cmd += ["--vocab_from", *vocab_from]
    if not os.path.exists(os.path.join(models, "reader", "config.json")):
        print("== building the small models", flush=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise StepFailed(f"build_small_models.py exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return os.path.join(models, "reader"), os.path.join(models, "retriever")


# --------------------------------------------------------------------------------------------
# Report

def write_figures(rows, arms, seeds, out, title):
    """{name: png path}. A figure that cannot be drawn (a run that logged nothing) is left out
    with a warning: the numbers, not the pictures, are the study's result."""
    from scripts.plot_metrics import plot_runs

    fig_dir = os.path.join(out, "figures")
    jobs = [("bars", lambda p: study_report.plot_bars(rows, p, title=title))]
    for seed in seeds:
        runs = [os.path.join(out, f"seed{seed}", a) for a in arms]
        jobs.append((f"curves_seed{seed}", lambda p, runs=runs, seed=seed: plot_runs(
            runs, p, labels=list(arms), smooth=5, title=f"stage 2 training curves, seed {seed} (eval/* on the dev split)")))
    jobs.append(("stage1", lambda p: plot_runs([os.path.join(out, f"seed{s}", "stage1") for s in seeds], p,
                                               labels=[f"seed {s}" for s in seeds],
                                               title="stage 1 (reader SFT with posterior stories, fact swaps)")))
    figs = {}
    for name, draw in jobs:
        path = os.path.join(fig_dir, f"{name}.png")
        try:
            draw(path)
            figs[name] = path
        except UsageError as exc:
            print(f"warning: figure {name} left out: {exc}", file=sys.stderr)
    return figs


def render_results(ctx) -> str:
    rows, sizes = ctx["rows"], ctx["sizes"]
    m = ctx["machine"]
    lines = [f"# Study: SFT control vs LAPDOG vs GRPO ({ctx['scale']} scale)", ""]
    if ctx["scale"] == "tiny":
        lines += ["> **Tiny mode**: a check that the pipeline runs end to end on a few examples with a tiny "
                  "random model. These numbers mean nothing about the methods.", ""]
    n_test = ctx["n_test"] if not sizes["eval_n"] else min(sizes["eval_n"], ctx["n_test"])
    lines += [f"- **Split**: {ctx['split']}. Dev: in-loop curves only; test: this table "
              f"({n_test} of the {ctx['n_test']} test examples).",
              f"- **Stories**: `{ctx['paths']['stories']}`"
              f"{' (first ' + str(sizes['max_passages']) + ')' if sizes['max_passages'] else ''}.",
              f"- **Models**: reader `{ctx['paths']['reader']}`, retriever `{ctx['paths']['retriever']}`.",
              f"- **Seeds**: {', '.join(map(str, ctx['seeds']))} (training seeds; one split for all).",
              f"- **Sizes**: stage 1 {sizes['s1_steps']} steps × {sizes['s1_batch']} examples; every arm "
              f"{sizes['s2_steps']} steps × {sizes['s2_batch']} × {sizes['accumulation']} examples from the same "
              f"stage-1 checkpoint; G = {sizes['G']}, k = {sizes['k']}, M = {sizes['pool']}, "
              f"n_context = {sizes['n_context']}, retriever_n_context = {sizes['retriever_n_context']}.",
              f"- **Command**: `{ctx['command']}`",
              f"- **Machine**: {m['platform']}; {m['cpu']}; nproc {m['nproc']}; GPU: {m['gpu']}; "
              f"Python {m['python']}, torch {m['torch']}.",
              f"- **Wall time**: {ctx['steps_s'] / 60:.1f} min, the sum over all training and evaluation "
              f"steps (this invocation: {ctx['wall_s'] / 60:.1f} min; finished {ctx['finished']}); "
              "per step in `timings.json`.", ""]
    lines += ["## Test split, LAPDOG's metric definitions", "",
              "Mean ± std over seeds; in parentheses the relative change of the mean vs "
              f"**{CONTROL} (retrieval)**. Indented lines: every seed of an arm where one seed collapsed "
              f"(Distinct-1 < {study_report.COLLAPSE_DIST1_RATIO:g} × that seed's control, or more than "
              f"{study_report.COLLAPSE_EMPTY_FRACTION:.0%} empty replies).", "",
              study_report.table(rows, study_report.MAIN_COLUMNS), ""]
    collapsed = study_report.collapsed_conditions(rows)
    lines += ["Collapsed: " + ("; ".join(collapsed) if collapsed else "none") + ".", ""]
    lines += ["## Test split, standard implementations", "",
              "rouge-score 0.1.2 F (RS; `stem` = Porter stemmer), nltk corpus BLEU (whitespace tokens, "
              "smoothing method1); greedy reward = the GRPO reward with length penalty 1.0 for every arm.", "",
              study_report.table(rows, study_report.STANDARD_COLUMNS + study_report.EXTRA_COLUMNS, collapse_rows=False),
              ""]
    lines += ["## Figures", ""]
    for key, path in ctx["figures"].items():
        lines += [f"![{key}]({os.path.relpath(path, ctx['out'])})", ""]
    lines += ["## Arms", "", "| arm | what | train.py flags (besides the shared ones) |", "|---|---|---|"]
    for name in ctx["arms"]:
        lines.append(f"| {name} | {ARMS[name]['about']} | `{' '.join(fill(ARMS[name]['flags'], sizes))}` |")
    lines += ["", f"Stage 1: `{' '.join(fill(STAGE1_FLAGS, sizes))}`. Every command run is in `commands.sh`.", "",
              "## Every seed", "", study_report.per_seed_table(rows, study_report.MAIN_COLUMNS), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                   help="folder with convai2/valid.jsonl and corpora/story/story.jsonl (default ../shared/data)")
    p.add_argument("--dialogues", help="dialogue jsonl to split (default DATA_DIR/convai2/valid.jsonl)")
    p.add_argument("--stories", help="story corpus jsonl (default DATA_DIR/corpora/story/story.jsonl)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "study"), help="output folder")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="size preset (see SCALES)")
    p.add_argument("--tiny", action="store_true", help="same as --scale tiny (pipeline check)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help=f"arms to run, from: {', '.join(ARMS)}")
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "DEV", "TEST"))
    p.add_argument("--reader_model", help="reader folder or HF id (default: build a small random-init T5)")
    p.add_argument("--retriever_model", help="retriever folder or HF id (default: all-MiniLM-L6-v2)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torch.distributed.launch)")
    p.add_argument("--publish", help="also copy RESULTS.md and figures/ into this folder (e.g. in the repository)")
    p.add_argument("--dry_run", action="store_true", help="write the split, print the plan, run nothing")
    g = p.add_argument_group("sizes (override the scale)")
    for name in SIZE_FLAGS:
        g.add_argument(f"--{name}", type=int, help="0 = all" if name in ("eval_n", "max_passages") else None)
    args = p.parse_args(argv)
    if args.tiny:
        args.scale = "tiny"
    return args


def check_same_settings(out, settings):
    """Finished steps are reused on a re-run, so they must come from the same settings: refuse an
    output folder made with other sizes, split or models (other seeds or arms are fine)."""
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise UsageError(f"{out}: made with other settings ({k}: {old.get(k)} -> {settings.get(k)}) — "
                             "pass a new --out, or delete the folder to start over")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.time()
    try:
        dialogues = args.dialogues or os.path.join(args.data_dir, "convai2", "valid.jsonl")
        stories = args.stories or os.path.join(args.data_dir, "corpora", "story", "story.jsonl")
        for what, path in (("dialogues", dialogues), ("stories", stories)):
            if not os.path.isfile(path):
                raise UsageError(f"{path}: {what} not found — the study needs ../shared/data beside the checkout, "
                                 "or --data_dir / --dialogues / --stories")
        check_arms(args.arms)
        sizes = sizes_of(args)
        out = os.path.abspath(args.out)
        settings = {"sizes": sizes, "dialogues_sha256": study_split.sha256_of(dialogues), "split_seed": args.split_seed,
                    "fractions": list(args.fractions), "stories": os.path.abspath(stories),
                    "reader_model": args.reader_model, "retriever_model": args.retriever_model}
        if not args.dry_run:
            check_same_settings(out, settings)
        manifest = study_split.write_split(dialogues, os.path.join(out, "split"), args.split_seed, tuple(args.fractions))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(study_split.describe(manifest), flush=True)
    split = manifest["splits"]
    paths = {"train": split["train"]["path"], "dev": split["dev"]["path"], "test": split["test"]["path"],
             "stories": os.path.abspath(stories), "reader": args.reader_model, "retriever": args.retriever_model}
    steps = plan(args.arms, args.seeds, {**paths, "reader": paths["reader"] or "<built>",
                                         "retriever": paths["retriever"] or "<built>"}, sizes, out)
    if args.dry_run:
        for kind, label, folder, cmd in steps:
            print(f"{label}: {shlex.join(cmd)}")
        return 0

    commands = os.path.join(out, "commands.sh")
    timings = []
    try:
        if not (paths["reader"] and paths["retriever"]):
            built = build_models(out, sizes, [paths["train"], paths["dev"], paths["test"], paths["stories"]])
            paths["reader"] = paths["reader"] or built[0]
            paths["retriever"] = paths["retriever"] or built[1]
        for kind, label, folder, cmd in plan(args.arms, args.seeds, paths, sizes, out):
            timings.append(run_step(label, folder, cmd, args.nproc, commands))
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    rows = []
    for seed in args.seeds:
        for name in args.arms:
            for mode in ARMS[name]["evals"]:
                eval_dir = os.path.join(out, f"seed{seed}", "eval", f"{name}-{mode}")
                rows.append({"arm": name, "eval": mode, "seed": seed, "metrics": eval_metrics(eval_dir, paths["test"])})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": rows, "sizes": {k: v for k, v in sizes.items()}, "split": manifest}, f, indent=2)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    figures = write_figures(rows, args.arms, args.seeds, out, title=f"test split ({args.scale} scale): mean over "
                            "seeds (bars), ± std (whiskers), each seed (dots), control (retrieval) mean (dashed)")
    wall = time.time() - t_start
    ctx = {"rows": rows, "sizes": sizes, "scale": args.scale, "split": study_split.describe(manifest),
           "paths": paths, "seeds": args.seeds, "arms": args.arms, "machine": machine(), "wall_s": wall,
           "steps_s": sum(t["wall_s"] for t in timings), "n_test": split["test"]["examples"],
           "command": shlex.join(["python", "scripts/study.py", *argv]), "figures": figures, "out": out,
           "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    results_md = os.path.join(out, "RESULTS.md")
    with open(results_md, "w") as f:
        f.write(render_results(ctx))
    print(f"wrote {results_md} ({wall / 60:.1f} min)")
    if args.publish:
        dest = os.path.abspath(args.publish)
        os.makedirs(os.path.join(dest, "figures"), exist_ok=True)
        shutil.copy(results_md, os.path.join(dest, "RESULTS.md"))
        for path in figures.values():
            shutil.copy(path, os.path.join(dest, "figures", os.path.basename(path)))
        print(f"copied RESULTS.md and figures/ to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
