"""Joint GRPO step benchmark: the batched step of src/model/lapdog.py against a naive per-sample loop.

Fast side: exactly what train.py runs for ``--use_grpo --grpo_train_retriever`` —
``LapdogModel.forward("grpo_joint", batch)`` + backward + gradient clipping + one AdamW step for
the reader and one for the retriever (train.py's ``make_optimizer``). That path encodes each
(query, story) once, samples all G replies of all prompts in one decoding loop of its own
(FiDReader.sample: inverse-CDF draws over the key/value cache), and scores every reply in one
teacher-forced pass whose output projection + log-softmax run in row chunks (the [R, T, V]
logits are never held); queries and pool share one retriever forward.

Naive side (``naive_grpo_joint``, the "before" picture, the original extension's cost pattern):
per query, the retriever scores its pool of M stories (one query forward + one pool forward,
for the policy and again for the reference retriever); then for every (example, sampled story)
and each of its G replies: encoder + transformers' ``generate`` of ONE sample (multinomial
draws); per reply: one reward call;
then for every reply separately a full encoder + decoder forward with gradient (policy log-probs)
and one without (reference log-probs). The per-reply losses are summed into one graph and
backpropagated once; the optimizer part is the same as on the fast side.

Both compute the same objective (src/objectives/grpo.py's policy_loss with loss type "grpo" +
retriever_policy_loss); the naive side writes the formulas out per sample instead of calling
src/objectives/grpo.py. ``agreement`` proves it: it runs the fast forward once, feeds that rollout's samples
(sampled stories, replies) to the naive loss, and compares loss values, the KL terms, the mean
reward and the gradients.

    OMP_NUM_THREADS=2 .venv/bin/python bench/grpo_step.py [--models DIR] [--steps 3] [--json]

Shapes: B queries, M pool stories per query, k sampled stories per query, G replies per
(query, story), R = B·k·G replies, T reply tokens.
"""

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.cli import options  # noqa: E402
from src.data.dialogues import load_dialogues, load_passages  # noqa: E402
from src.data.prompts import encoder_inputs, pick_answer, retriever_passage_text  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.infra.tracking import timed  # noqa: E402
from src.model.build import build_all  # noqa: E402
from src.model.lapdog import LapdogModel  # noqa: E402
from src.model.reader import FiDReader, dropout_disabled  # noqa: E402
from src.model.retriever import Retriever  # noqa: E402
from src.objectives import retriever_losses  # noqa: E402
from src.objectives.rewards import grpo_reward, reward_options  # noqa: E402
from src.retrieval.stories import StoryRetrieval  # noqa: E402
from src.run.batch import make_batch  # noqa: E402
from src.run.optim import make_optimizer  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "sample")
PARTS = ("retriever", "sampling", "reward", "reference", "policy")


# ---------------------------------------------------------------------------------- setup
def bench_options(models, batch, G, k, M, gen_len, extra=()):
    """The training options of a joint GRPO run with these sizes (validated like train.py)."""
    argv = ["--reader_model_type", models["reader"], "--retriever_model_path", models["retriever"],
            "--passages", os.path.join(SAMPLE, "stories.jsonl"), "--train_data", os.path.join(SAMPLE, "train.jsonl"),
            "--reader_rl_learning", "--use_grpo", "--grpo_train_retriever",
            # the naive side implements the draw-based step; the pool estimator adds M greedy decodes
            "--grpo_retriever_estimator", "topk_heuristic",
            "--per_gpu_batch_size", str(batch), "--grpo_group_size", str(G),
            "--grpo_retriever_group_size", str(k), "--grpo_retriever_pool_size", str(M),
            "--generation_max_length", str(gen_len), *extra]
    opts, _ = options.parse(argv)
    options.validate(opts)
    if opts.grpo_loss_type != "grpo":
        raise flag_error("--grpo_loss_type", "the naive loop implements the 'grpo' loss type only",
                         "benchmark with the default --grpo_loss_type grpo")
    return opts


def load_lapdog(models, opts, device):
    """A LapdogModel as train.py builds it for joint GRPO (frozen reference copies), in train mode."""
    reader = FiDReader.from_pretrained(models["reader"], dropout=opts.dropout)
    retriever = Retriever.from_pretrained(models["retriever"])
    refs = [copy.deepcopy(m).to(device).eval().requires_grad_(False) for m in (reader, retriever)]
    model = LapdogModel(reader, retriever, opts, refs[0], refs[1]).to(device)
    model.train()
    return model


def make_optimizers(model, opts):
    """AdamW for the reader (--lr) and the retriever (--lr_retriever): train.py's own make_optimizer."""
    return {"reader": make_optimizer(model.reader.parameters(), opts.lr, opts)[0],
            "retriever": make_optimizer(model.retriever.parameters(), opts.lr_retriever, opts)[0]}


def make_batches(models, opts, device, n_batches, seed):
    """``n_batches`` micro-batches built with make_batch over a flat index of the sample stories.

    Returns (batches, seconds to build the index, seconds of make_batch per batch). The index
    and the pools come from the initial retriever; both sides of the benchmark get the same
    batches, so they do the same work.
    """
    opts = copy.copy(opts)
    opts.index_mode = "flat"
    retriever = Retriever.from_pretrained(models["retriever"]).to(device)
    passages = load_passages(opts.passages)
    info = types.SimpleNamespace(rank=0, world=1, device=torch.device(device), is_main=False)
    retrieval = StoryRetrieval(passages, opts, info)
    index_s = retrieval.build(retriever, allow_load=False)
    reader = FiDReader.from_pretrained(models["reader"]).to(device)  # make_batch only tokenizes with it
    train = load_dialogues(opts.train_data[0])
    rng = random.Random(seed)
    batches, batch_s = [], []
    for _ in range(n_batches):
        exs = rng.sample(train, opts.per_gpu_batch_size)
        answers = [pick_answer(ex, rng) for ex in exs]
        t0 = time.perf_counter()
        batches.append(make_batch(exs, answers, reader, retrieval, retriever, opts, rng, torch.device(device)))
        batch_s.append(time.perf_counter() - t0)
    return batches, index_s, sum(batch_s) / len(batch_s)


# ---------------------------------------------------------------------------------- naive loss
def _reply_length(reply, eos_id):
    """Tokens of one reply up to and including its first EOS (all of them when there is none)."""
    hits = (reply == eos_id).nonzero()
    return int(hits[0, 0]) + 1 if hits.numel() else reply.shape[0]


def _generate_one(reader, hidden, mask, o):
    """ONE sampled reply [T] with transformers' ``generate`` (do_sample, multinomial), as the
    original extension drew its samples; the fast side uses FiDReader.sample's own loop. Same
    law: softmax(logits / temperature), no top-k, nucleus at ``--grpo_top_p``."""
    return reader._generate(hidden, mask, max_length=o.generation_max_length, min_length=o.generation_min_length,
                            num_beams=1, do_sample=True, num_return_sequences=1, temperature=o.grpo_temperature,
                            top_p=o.grpo_top_p, top_k=0)[0]


def _reply_logprobs(reader_model, ids, mask, reply, temperature):
    """Encoder + decoder forward of ONE reply [T] -> log-probs of its tokens [T] (float32)."""
    decoder_input = reader_model._shift_right(reply.unsqueeze(0))
    logits = reader_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input,
                          use_cache=False, return_dict=True).logits[0].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, reply.unsqueeze(-1)).squeeze(-1)


def _pool_logprobs(model, retriever, query, pool, tau):
    """One query's log softmax(q·p/sqrt(H)/τ) over its M stories [M]: one forward for the query,
    one for its pool."""
    o, dev = model.opts, model.device
    q = retriever.tokenize([query], o.retriever_maxlength)
    p = retriever.tokenize([retriever_passage_text(x, o.retriever_format) for x in pool], o.retriever_maxlength)
    q_emb = retriever(q["input_ids"].to(dev), q["attention_mask"].to(dev))[0]
    p_emb = retriever(p["input_ids"].to(dev), p["attention_mask"].to(dev))
    return torch.log_softmax((p_emb @ q_emb) / math.sqrt(q_emb.shape[-1]) / tau, dim=-1)


def _group_advantages(rewards, eps=1e-4, zero_std_tol=1e-6):
    """(r − mean)/(std + eps) of one group (python floats), unbiased std; 0 for a flat group."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    if std < zero_std_tol:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]


def _clipped(ratio, adv, eps):
    """Elementwise PPO-clipped surrogate loss −min(ratio·A, clip(ratio, 1±ε)·A)."""
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)


def naive_grpo_joint(model, batch, stats, samples=None):
    """The joint GRPO loss of ``model`` on ``batch``, one sample at a time.

    samples: None to sample here (μ = 1: the sampling policy is the current one), or
    ``{"idx": [B, k] long, "replies": [R, T] long}`` (a fast rollout's sampled stories and
    replies, example-major then story then reply) to score exactly those. Timings are added to
    ``stats["time/<part>"]``; ``stats`` also gets ``kl/reader``, ``kl/retriever``, ``reward/mean``.
    Returns the scalar loss (with gradient to the reader and the retriever).
    """
    o, dev = model.opts, model.device
    reader, retriever = model.reader, model.retriever
    ref_reader, ref_retriever = model.refs["reader"], model.refs["retriever"]
    k, G, tau, T = o.grpo_retriever_group_size, o.grpo_group_size, o.grpo_retriever_temperature, o.grpo_temperature
    eps, beta, eos = o.grpo_clip_epsilon, o.grpo_kl_coeff, reader.eos_token_id
    reward_kwargs = reward_options(o)
    B = len(batch.queries)
    reader_terms, ret_surrogate, ret_kl, kl_tokens, rewards_all = [], [], [], [], []
    with dropout_disabled(reader, retriever):
        for i in range(B):
            with timed(stats, "time/retriever", dev):
                pool_logp = _pool_logprobs(model, retriever, batch.retrieval_queries[i], batch.passages[i], tau)
                with torch.no_grad():
                    ref_pool_logp = _pool_logprobs(model, ref_retriever, batch.retrieval_queries[i],
                                                   batch.passages[i], tau)
                    if samples is None:
                        chosen = retriever_losses.sample_without_replacement(pool_logp.detach().unsqueeze(0), k)[0].tolist()
                    else:
                        chosen = samples["idx"][i].tolist()
            story_rewards = []
            for j, story in enumerate(chosen):
                text = encoder_inputs(batch.queries[i], [batch.passages[i][story]], 1, o.encoder_format)
                ids, mask = reader.tokenize_inputs([text], o.text_maxlength)
                ids, mask = ids[:, 0].to(dev), mask[:, 0].to(dev)  # [1, L]: one (query, story) input
                replies = []
                for g in range(G):
                    if samples is None:
                        with timed(stats, "time/sampling", dev), torch.no_grad():
                            hidden, hmask = reader.encode(ids.unsqueeze(1), mask.unsqueeze(1))
                            reply = _generate_one(reader, hidden, hmask, o)
                    else:
                        reply = samples["replies"][(i * k + j) * G + g].to(dev)
                    replies.append(reply[:_reply_length(reply, eos)])
                rewards = []
                for reply in replies:
                    with timed(stats, "time/reward", dev):
                        hyp = reader.decode(reply.unsqueeze(0))
                        rewards.append(float(grpo_reward(hyp, [batch.answers[i]], **reward_kwargs)["reward"][0]))
                rewards_all += rewards
                story_rewards.append(sum(rewards) / G)
                for reply, adv in zip(replies, _group_advantages(rewards)):
                    with timed(stats, "time/policy", dev):
                        logp = _reply_logprobs(reader.model, ids, mask, reply, T)
                    with timed(stats, "time/reference", dev), torch.no_grad(), dropout_disabled(ref_reader):
                        ref_logp = _reply_logprobs(ref_reader.model, ids, mask, reply, T)
                    with timed(stats, "time/policy", dev):
                        # μ = 1: old log-probs are the detached current ones (ratio exactly 1).
                        ratio = torch.exp(logp - logp.detach())
                        d = ref_logp - logp
                        k3 = torch.exp(d) - d - 1
                        reader_terms.append((_clipped(ratio, adv, eps) + beta * k3).mean())
                        kl_tokens.append(k3.detach())
            with timed(stats, "time/retriever", dev):
                for j, adv in zip(chosen, _group_advantages(story_rewards)):
                    ratio = torch.exp(pool_logp[j] - pool_logp[j].detach())
                    ret_surrogate.append(_clipped(ratio, adv, eps))
                p = pool_logp.exp()
                ret_kl.append((p * (pool_logp - ref_pool_logp)).sum())
    reader_loss = sum(reader_terms) / len(reader_terms)
    ret_loss = sum(ret_surrogate) / len(ret_surrogate) + beta * (sum(ret_kl) / B)
    stats["kl/reader"] = torch.cat(kl_tokens).mean().item()
    stats["kl/retriever"] = (sum(ret_kl) / B).item()
    stats["reward/mean"] = sum(rewards_all) / len(rewards_all)
    return reader_loss + ret_loss


# ---------------------------------------------------------------------------------- steps
def _grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in model.parameters() if p.requires_grad])


def agreement(model, batch):
    """Loss agreement on ONE shared set of samples: the fast forward samples stories and replies,
    the naive loss scores those same samples. Parameters are not changed; gradients are left
    zeroed. Returns a dict: loss_fast, loss_naive, |Δ|, the KL terms and mean reward of both, and
    grad_rel_diff = max|g_fast − g_naive| / max|g_fast| over all trained parameters."""
    model.zero_grad(set_to_none=True)
    loss_fast, fstats, rollout, _ = model("grpo_joint", batch)
    loss_fast.backward()
    g_fast = _grads(model)
    model.zero_grad(set_to_none=True)
    nstats = {}
    loss_naive = naive_grpo_joint(model, batch, nstats,
                                  samples={"idx": rollout["idx"], "replies": rollout["gen"]["replies"]})
    loss_naive.backward()
    g_naive = _grads(model)
    model.zero_grad(set_to_none=True)
    return {"loss_fast": loss_fast.item(), "loss_naive": loss_naive.item(),
            "loss_abs_diff": abs(loss_fast.item() - loss_naive.item()),
            "kl_reader_fast": fstats["kl/reader"], "kl_reader_naive": nstats["kl/reader"],
            "kl_retriever_fast": fstats["kl/retriever"], "kl_retriever_naive": nstats["kl/retriever"],
            "reward_fast": fstats["reward/mean"], "reward_naive": nstats["reward/mean"],
            "grad_rel_diff": ((g_fast - g_naive).abs().max() / g_fast.abs().max().clamp(min=1e-30)).item()}


def train_step(model, optims, batch, naive, device, step=0):
    """One optimizer update (``step``: completed updates before it) as train.py does it; returns
    the stats with time/* parts, time/step and time/backward_optim (backward + clipping + AdamW)."""
    stats = {}
    with timed(stats, "time/step", device):
        for o in optims.values():
            o.zero_grad(set_to_none=True)
        with timed(stats, "time/forward", device):
            if naive:
                loss = naive_grpo_joint(model, batch, stats)
            else:
                loss, fstats, _, _ = model("grpo_joint", batch, step=step)
                stats.update({k: v for k, v in fstats.items() if k.startswith(("time/", "kl/", "reward/mean"))})
        with timed(stats, "time/backward_optim", device):
            loss.backward()
            clip = model.opts.clip if model.opts.clip > 0 else float("inf")
            torch.nn.utils.clip_grad_norm_([p for p in model.reader.parameters() if p.grad is not None], clip)
            torch.nn.utils.clip_grad_norm_([p for p in model.retriever.parameters() if p.grad is not None], clip)
            for o in optims.values():
                o.step()
    stats["loss"] = loss.item()
    return stats


class PeakMemory:
    """Peak memory of a block, in MiB.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the rise of the
    process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the RSS at
    the block's start; ``None`` where /proc does not allow the reset (not Linux).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.mib = None

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as fh:
            return int(re.search(rf"^{field}:\s+(\d+)", fh.read(), re.M).group(1))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        try:  # hand freed heap back to the OS first, or an earlier side's leftovers hide this one's rise
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.rss0 = self._status_kib("VmRSS")
        except OSError:
            self.rss0 = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.rss0 is not None:
            self.mib = (self._status_kib("VmHWM") - self.rss0) / 1024


def run_side(models, opts, batches, device, naive, warmup, steps, seed):
    """Fresh models, ``warmup`` untimed then ``steps`` timed updates; returns (model, mean stats,
    peak memory MiB over all of the side's steps, from the loaded models on: optimizer state +
    the largest step working set; on CPU the heap a step grows is what later steps reuse, so a
    per-step measure after warm-up would hide it)."""
    torch.manual_seed(seed)
    model = load_lapdog(models, opts, device)
    optims = make_optimizers(model, opts)
    timed = []
    with PeakMemory(device) as mem:
        for step, b in enumerate(batches[:warmup]):
            train_step(model, optims, b, naive, device, step)
        for step, b in enumerate(batches[warmup:warmup + steps], start=warmup):
            timed.append(train_step(model, optims, b, naive, device, step))
    mean = {key: sum(s.get(key, 0.0) for s in timed) / len(timed) for key in timed[0] if key != "_texts"}
    return model, mean, mem.mib


# ---------------------------------------------------------------------------------- report
def table(fast, naive, mem_fast, mem_naive, mem_kind):
    rows = [("step (total)", "time/step")] + [(p, f"time/{p}") for p in PARTS]
    rows.append(("other forward", None))
    rows.append(("backward + AdamW", "time/backward_optim"))
    lines = ["| part | fast s | naive s | naive/fast |", "|---|---:|---:|---:|"]
    for name, key in rows:
        if key is None:
            f = fast["time/forward"] - sum(fast.get(f"time/{p}", 0.0) for p in PARTS)
            n = naive["time/forward"] - sum(naive.get(f"time/{p}", 0.0) for p in PARTS)
        else:
            f, n = fast.get(key, 0.0), naive.get(key, 0.0)
        ratio = f"{n / f:.1f}×" if f > 1e-9 else "–"
        lines.append(f"| {name} | {f:.3f} | {n:.3f} | {ratio} |")
    def fmt(m):
        return "n/a" if m is None else f"{m:.0f}"

    lines.append(f"| peak memory MiB ({mem_kind}) | {fmt(mem_fast)} | {fmt(mem_naive)} | |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description="Joint GRPO step: batched (src/model/lapdog.py) vs a naive per-sample loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None,
                   help="folder with reader/ and retriever/ (scripts/build_small_models.py); default: build into a temp dir")
    p.add_argument("--batch", type=int, default=2, help="B: queries per step")
    p.add_argument("--G", type=int, default=4, help="replies per (query, story)")
    p.add_argument("--k", type=int, default=4, help="stories sampled per query")
    p.add_argument("--M", type=int, default=8, help="pool of stories per query")
    p.add_argument("--gen_len", type=int, default=32, help="--generation_max_length")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per side before timing (the first steps of a process pay one-time costs: "
                        "optimizer state, heap growth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one line of JSON as the last line of stdout")
    return p


def resolve_models(path, tmp):
    if path is None:
        return build_all(tmp)
    models = {"reader": os.path.join(path, "reader"), "retriever": os.path.join(path, "retriever")}
    for name, d in models.items():
        if not os.path.isdir(d):
            raise flag_error("--models", f"{d} does not exist",
                             "pass the --out folder of scripts/build_small_models.py (with reader/ and retriever/ inside)")
    return models


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise flag_error("--steps/--warmup", "need steps >= 1 and warmup >= 0", "pass e.g. --steps 3 --warmup 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise flag_error("--device", "CUDA is not available here", "pass --device cpu")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 maths so the two losses are comparable
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        models = resolve_models(args.models, tmp)
        opts = bench_options(models, args.batch, args.G, args.k, args.M, args.gen_len)
        built_s = time.perf_counter() - t0
        batches, index_s, batch_s = make_batches(models, opts, device, args.warmup + args.steps + 1, args.seed)
        fast_model, fast, mem_fast = run_side(models, opts, batches, device, False, args.warmup, args.steps, args.seed)
        # The agreement check runs after the fast side's updates, so the policy has moved away from
        # the reference and the KL terms are not trivially 0.
        agree = agreement(fast_model, batches[-1])
        del fast_model
        _, naive, mem_naive = run_side(models, opts, batches, device, True, args.warmup, args.steps, args.seed)
    mem_kind = ("CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak-RSS rise (VmHWM)") + ", whole side"
    speedup = naive["time/step"] / fast["time/step"]
    print(f"device {device} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}); "
          f"B={args.batch} G={args.G} k={args.k} M={args.M} gen_len={args.gen_len}; "
          f"warmup {args.warmup}, {args.steps} timed steps each")
    print(f"models {'built' if args.models is None else 'loaded'} in {built_s:.1f}s; index over the sample stories "
          f"{index_s:.2f}s; make_batch (retrieval) {batch_s:.3f}s per batch (outside the step timing)")
    print(table(fast, naive, mem_fast, mem_naive, mem_kind))
    print(f"speedup (naive step / fast step): {speedup:.2f}×")
    print(f"loss agreement on one shared rollout: fast {agree['loss_fast']:.8f}  naive {agree['loss_naive']:.8f}  "
          f"|Δ| {agree['loss_abs_diff']:.2e}; KL reader {agree['kl_reader_fast']:.6f}/{agree['kl_reader_naive']:.6f}, "
          f"KL retriever {agree['kl_retriever_fast']:.6f}/{agree['kl_retriever_naive']:.6f}, "
          f"reward {agree['reward_fast']:.5f}/{agree['reward_naive']:.5f}, grad rel diff {agree['grad_rel_diff']:.2e}")
    if args.json:
        out = {"speedup": speedup, "loss_fast": agree["loss_fast"], "loss_naive": agree["loss_naive"],
               "step_s_fast": fast["time/step"], "step_s_naive": naive["time/step"],
               "loss_abs_diff": agree["loss_abs_diff"], "grad_rel_diff": agree["grad_rel_diff"],
               "peak_mib_fast": mem_fast, "peak_mib_naive": mem_naive, "memory_kind": mem_kind,
               "device": str(device), "batch": args.batch, "G": args.G, "k": args.k, "M": args.M,
               "gen_len": args.gen_len, "steps": args.steps, "warmup": args.warmup,
               "index_s": index_s, "make_batch_s": batch_s,
               "fast": {k: v for k, v in fast.items() if k.startswith("time/")},
               "naive": {k: v for k, v in naive.items() if k.startswith("time/")}}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
