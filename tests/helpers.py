"""Helpers shared by the test files: option and model builders, tiny batches, the training-run
runner (a subprocess of train.py), fake rewards. Only tests import this file."""

import os
import random
import runpy
import shutil
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import T5Config, T5ForConditionalGeneration

from src.cli import options
from src.data.dialogues import load_dialogues, load_passages
from src.data.posterior import KnowledgeWords, PosteriorStories
from src.data.prompts import retrieval_query, retriever_passage_text
from src.model.lapdog import LapdogModel
from src.model.reader import FiDReader
from src.model.retriever import Retriever, retrieval_scores
from src.run.batch import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

TINY_READER = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32)


def build_tiny_models(out):
    """A tiny random T5 reader and a tiny random BERT retriever (MiniLM's tokenizer), for speed."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    from src.model.build import build_reader, build_reader_tokenizer, minilm_path

    tok = build_reader_tokenizer()
    reader_dir, retriever_dir = os.path.join(out, "reader"), os.path.join(out, "retriever")
    build_reader(tok, seed=0, **TINY_READER).save_pretrained(reader_dir)
    tok.save_pretrained(reader_dir)
    rtok = AutoTokenizer.from_pretrained(minilm_path())
    import torch
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=rtok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(retriever_dir)
    rtok.save_pretrained(retriever_dir)
    return {"reader": reader_dir, "retriever": retriever_dir}


SAMPLE = os.path.join(ROOT, "data", "sample")


def run_script(script, *args, timeout=600, input=None):
    """``python SCRIPT ARGS...`` from the repository root in a subprocess, ``input`` on its standard
    input: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT}, input=input)
    return p.returncode, p.stdout, p.stderr


def run_entry(script, argv):
    """Exit status of ``python SCRIPT ARGV...`` (train.py, evaluate.py) run in this process:
    the script is executed as ``__main__`` (runpy), so it is used as a user runs it, not imported
    as a library; monkeypatched ``src`` modules are the ones it uses."""
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved
    return 0


SHORT = ["--text_maxlength", "96", "--retriever_maxlength", "64", "--target_maxlength", "24",
         "--generation_max_length", "10"]


def make_opts(*flags):
    opts, _ = options.parse(["--passages", "x", "--train_data", "y", *SHORT, *flags])
    options.validate(opts)
    return opts


def load_models(tiny_models, dropout=0.0):
    reader = FiDReader.from_pretrained(tiny_models["reader"], dropout=dropout)
    retriever = Retriever.from_pretrained(tiny_models["retriever"])
    return reader, retriever


def frozen_copy(module):
    import copy
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    return ref.eval()


class BruteForceRetrieval:
    """The retrieval interface make_batch uses, scoring every story exactly (no index). Stories are
    embedded with ``passage_encoder`` when given (what an index built with it holds: the frozen side
    of --query_side_retriever_training), else with the searching retriever."""

    def __init__(self, passages, opts, passage_encoder=None):
        self.passages, self.opts, self.passage_encoder = passages, opts, passage_encoder

    def query_texts(self, examples, rng):
        return [retrieval_query(ex["question"], self.opts.retriever_from, rng) for ex in examples]

    def _stories(self, encoder):
        o = self.opts
        return encoder.embed_texts([retriever_passage_text(x, o.retriever_format) for x in self.passages],
                                   batch_size=64, max_length=o.retriever_maxlength)

    @torch.no_grad()
    def search(self, retriever, texts, k):
        o = self.opts
        q = retriever.embed_texts(texts, batch_size=64, max_length=o.retriever_maxlength)
        p = self._stories(self.passage_encoder or retriever)
        scores, rows = retrieval_scores(q, p).topk(k, dim=-1)
        return [[self.passages[r] for r in row] for row in rows.tolist()], scores, rows

    def augment(self, passage_lists, rows, fraction, rng, mode="original"):
        return passage_lists, rows

    @torch.no_grad()
    def passage_embeddings(self, rows):
        if self.passage_encoder is None:
            raise AssertionError("BruteForceRetrieval(passage_encoder=...) is needed for stored story embeddings")
        return self._stories(self.passage_encoder)[torch.as_tensor(rows)]


_CACHE = {}


def sample_data():
    if not _CACHE:
        _CACHE["train"] = load_dialogues(os.path.join(SAMPLE, "train.jsonl"))
        _CACHE["valid"] = load_dialogues(os.path.join(SAMPLE, "valid.jsonl"))
        _CACHE["stories"] = load_passages(os.path.join(SAMPLE, "stories.jsonl"))
    return _CACHE["train"], _CACHE["valid"], _CACHE["stories"]


def examples_with_story(split, n, start=0):
    train, valid, _ = sample_data()
    data = train if split == "train" else valid
    return [ex for ex in data if ex.get("story_id")][start:start + n]


def retrieval_batch(model, examples, stories, seed=0):
    """A make_batch batch whose retrieval runs over ``stories`` with the model's retriever."""
    o = model.opts
    retrieval = BruteForceRetrieval(stories, o)
    answers = [ex["answers"][0] for ex in examples]
    return make_batch(examples, answers, model.reader, retrieval, model.retriever, o, random.Random(seed),
                      model.device)




def closed_book_batch(model, examples, seed=0):
    answers = [ex["answers"][0] for ex in examples]
    return make_batch(examples, answers, model.reader, None, None, model.opts, random.Random(seed), model.device)


def knowledge_retrieval(stories, opts):
    train, _, _ = sample_data()
    retrieval = BruteForceRetrieval(stories, opts)
    retrieval.knowledge = KnowledgeWords(PosteriorStories(sample_data()[2]),
                                         [" ".join([ex["question"], *ex["answers"]]) for ex in train])
    return retrieval


def chit_chat_and_fact_examples():
    train, _, _ = sample_data()
    chit = next(ex for ex in train if not ex.get("story_id") and "thanks" in ex["answers"][0])
    return [chit] + examples_with_story("train", 1)


QUERY = "dialog with R's persona: persona: i like dogs . context:  Q: hi , how are you ? R: <extra_id_0>"


PASSAGES = [
    "story title: the pet bug story: oliver was playing in his yard one day .",
    "story title: big break story: joey had dreams of being a singer .",
    "story title: rain story: it rained all day and we stayed inside .",
]




def tiny_t5(tokenizer, seed=0, dropout=0.0):
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, d_kv=16, dropout_rate=dropout, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()




def eos_bias(model, bias):
    """Forward hook on lm_head that adds ``bias`` to the EOS logit (makes EOS positions testable)."""
    def hook(module, args, output):
        output = output.clone()
        output[..., 1] += bias
        return output

    return model.lm_head.register_forward_hook(hook)


def batch_one(reader, n=1, b=2):
    inputs = [[f"{QUERY} {p}" for p in PASSAGES[:n]], [f"{QUERY} hello there {p}" for p in PASSAGES[:n]]][:b]
    ids, mask = reader.tokenize_inputs(inputs, max_length=64)
    labels = reader.tokenize_targets(["<extra_id_0> i am good , thanks !", "<extra_id_0> fine"][:b], max_length=16)
    return ids, mask, labels


G = 4


def grpo_model(tiny_models, *flags, dropout=0.1):
    torch.manual_seed(0)
    reader, retriever = load_models(tiny_models, dropout=dropout)
    opts = make_opts("--reader_rl_learning", "--use_grpo", "--closed_book", "--grpo_group_size", str(G), *flags)
    model = LapdogModel(reader, retriever, opts, ref_reader=frozen_copy(reader), ref_retriever=frozen_copy(retriever))
    model.train()
    return model


def fixed_rewards(values):
    """A _rewards replacement giving reply i the reward values[i % len(values)]."""
    def rewards(self, replies, answers, p, contexts, per_reply_answers=None):
        n = replies.shape[0]
        r = torch.tensor([float(values[i % len(values)]) for i in range(n)])
        p.stats["reward/mean"] = r.mean().item()
        return {"reward": r}
    return rewards


PY = sys.executable


ENV = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=1, check=True, timeout=600, env=None):
    cmd = [PY, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] \
        if nproc > 1 else [PY]
    p = subprocess.run(cmd + args, cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-5000:]}")
    return p


def stage1(ckpt, models, steps=4, extra=()):
    return ["train.py", "--closed_book", "--shuffle", "--per_gpu_batch_size=4", f"--total_steps={steps}",
            "--eval_freq=0", "--save_freq=2", "--log_freq=1", "--name=t", f"--checkpoint_dir={ckpt}",
            f"--reader_model_type={models['reader']}", "--lr=1e-3", "--warmup_steps=2", "--text_maxlength=96",
            "--target_maxlength=16", "--generation_max_length=8", "--dropout=0.1",
            f"--train_data={SAMPLE}/train.jsonl", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=6",
            *extra]


def grpo_stage2(ckpt, models, stage1_ckpt, steps=4, extra=()):
    return ["train.py", "--shuffle", "--per_gpu_batch_size=2", "--accumulation_steps=2", f"--total_steps={steps}",
            "--eval_freq=0", "--save_freq=2", "--log_freq=1", "--name=g", f"--checkpoint_dir={ckpt}",
            "--gold_score_mode=f1rougebleudist", "--reader_rl_learning", "--use_grpo", "--grpo_group_size=2",
            "--grpo_train_retriever", "--grpo_retriever_group_size=2", "--grpo_retriever_pool_size=4",
            "--grpo_kl_coeff=0.01", "--grpo_clip_epsilon=0.2", "--lr=1e-4", "--lr_retriever=1e-4",
            "--warmup_steps=1", "--text_maxlength=96", "--generation_max_length=8", "--retriever_n_context=2",
            f"--train_data={SAMPLE}/train.jsonl", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=4",
            f"--passages={SAMPLE}/stories.jsonl", "--max_passages=64", f"--model_path={stage1_ckpt}",
            f"--retriever_model_path={models['retriever']}", "--generation_length_penalty=1.0", "--refresh_index=2",
            *extra]


def weights(step_dir, part="reader"):
    return load_file(os.path.join(step_dir, part, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def crash_after(ckpt, step):
    """Pretend the run died right after saving `step`: later checkpoints vanish, latest points back."""
    root = os.path.join(ckpt, "checkpoint")
    for name in os.listdir(root):
        if name.startswith("step-") and int(name.split("-")[1]) > step:
            shutil.rmtree(os.path.join(root, name))
    os.remove(os.path.join(root, "latest"))
    os.symlink(f"step-{step}", os.path.join(root, "latest"))
