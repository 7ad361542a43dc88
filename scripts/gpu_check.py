"""The GPU check behind scripts/gpu_check.sh: every part of the product once, on real model shapes.

    bash scripts/gpu_check.sh [--out DIR] [--tiny] [--data DIR]

Builds, locally and from random initialization (nothing from a hub), a t5-base-shaped reader with a
copy head (d_model 768, 12+12 layers, 12 heads, d_ff 3072; the WordPiece tokenizer of
src/model/build.py) and a BERT-base-shaped retriever (MiniLM's tokenizer), then runs on the sample
data (``--data``, default data/sample): stage 1 (3 steps, --precision bf16, the quickstart's
configs/stage1_reads.yaml), LAPDOG stage 2 (3 steps, configs/lapdog_evidence.yaml), joint GRPO
(3 steps, configs/joint_grpo_evidence.yaml), evaluate.py on the joint GRPO checkpoint, and a FAISS
search (an IVF index of synthetic vectors on the GPU against exact search). With two or more GPUs
the same parts again under 2-process torchrun (``*_2proc``). ``--tiny``: tiny shapes on the CPU,
a few seconds a part (what tests/test_gpu_check.py runs).

Every part runs as its own process with its log in OUT/logs/PART.log. The last stdout line is one
JSON object: ``{"gpu_check": {"device", "gpus", "tiny", "pass", "parts": {PART: {"status": "pass" |
"fail" | "skipped", "seconds", "log", and where measured "s_per_step", "sampling_tokens_per_s"
(joint GRPO: sampled reply tokens per second of ``time/sampling``), "peak_memory_mb"
(``memory/peak_mb``: CUDA max allocated, CPU peak RSS), FAISS: "placement", "search_ms",
"recall@10"}}}}``. The exit status is 1 when any part did not pass.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from src.infra import distributed, exits  # noqa: E402
from src.model.build import build_random_retriever, build_reader, build_reader_tokenizer, jsonl_texts  # noqa: E402
from src.retrieval.index import PassageIndex, faiss_placement, import_faiss, shard_bounds  # noqa: E402

STEPS = 3
# (reader, retriever, sizes) per mode: real shapes on the GPU, tiny ones for the CPU smoke run.
SHAPES = {
    "gpu": {"reader": dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
            "retriever": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
            "s1_batch": 16, "s2_batch": 16, "text_maxlength": 192, "generation_max_length": 32, "eval_n": 64,
            "faiss": (200_000, 768), "timeout": 240},
    "tiny": {"reader": dict(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16),
             "retriever": dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
             "s1_batch": 2, "s2_batch": 2, "text_maxlength": 96, "generation_max_length": 8, "eval_n": 4,
             "faiss": (3000, 32), "timeout": 300},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="folder for models, runs and logs (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run of the script itself)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "sample"),
                   help="folder with train/valid/test/stories.jsonl (default: the built-in sample data)")
    p.add_argument("--faiss_part", default=None, metavar="JSON", help=argparse.SUPPRESS)  # the FAISS part's process
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ parts

def build_models(out, shape, data, tiny):
    """The reader (copy head; tiny: the sample data's vocabulary) and the retriever, random init."""
    vocab = jsonl_texts([os.path.join(data, f) for f in ("train.jsonl", "valid.jsonl", "stories.jsonl")]) if tiny else None
    tok = build_reader_tokenizer(vocab_texts=vocab)
    reader_dir = os.path.join(out, "models", "reader")
    build_reader(tok, seed=0, pointer_generator=True, **shape["reader"]).save_pretrained(reader_dir)
    tok.save_pretrained(reader_dir)
    build_random_retriever(os.path.join(out, "models", "retriever"), seed=0, **shape["retriever"])


def run_logged(cmd, log, timeout):
    """Run ``cmd`` with its output in ``log``: (passed, seconds, the reason when not)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - t0, f"timed out after {timeout}s"
    return rc == 0, time.perf_counter() - t0, None if rc == 0 else f"exit status {rc}"


def step_metrics(run_dir):
    """s/step, sampling tokens/s (GRPO) and peak memory from a run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if not any(k.startswith("eval/") for k in r) and "memory/peak_mb" in r]
    if not rows:
        return {}
    out = {"peak_memory_mb": round(max(float(r["memory/peak_mb"]) for r in rows), 1)}
    if len(rows) > 1 and rows[-1]["step"] > rows[0]["step"]:  # the first step (warm-up) left out
        out["s_per_step"] = round((rows[-1]["wall_time"] - rows[0]["wall_time"]) / (rows[-1]["step"] - rows[0]["step"]), 3)
    else:
        out["s_per_step"] = round(rows[-1]["elapsed_s"] / max(rows[-1]["step"], 1), 3)
    with open(os.path.join(run_dir, "checkpoint", "latest", "options.json")) as fh:
        o = json.load(fh)
    sampled = [r for r in rows if r.get("time/sampling") and r.get("reply_length") is not None]
    if sampled and o.get("use_grpo"):
        replies = o["per_gpu_batch_size"] * o["grpo_group_size"] * (
            o["grpo_retriever_group_size"] if o.get("grpo_train_retriever") else 1)
        rates = [replies * r["reply_length"] / r["time/sampling"] for r in sampled]
        out["sampling_tokens_per_s"] = round(sum(rates) / len(rates), 1)  # per process
    return out


def faiss_part(json_path, tiny):
    """The FAISS part's process (one per rank under torchrun): an ivfflat index of synthetic
    clustered vectors on this rank's device, searched collectively against the exact torch index."""
    info = distributed.init_distributed()
    n, dim = SHAPES["tiny" if tiny else "gpu"]["faiss"]
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(max(n // 200, 2), dim, generator=g)
    x = torch.nn.functional.normalize(centers[torch.randint(len(centers), (n,), generator=g)]
                                      + 0.5 * torch.randn(n, dim, generator=g), dim=1)
    q = torch.nn.functional.normalize(centers[torch.randint(len(centers), (64,), generator=g)]
                                      + 0.5 * torch.randn(64, dim, generator=g), dim=1)
    lo, hi = shard_bounds(n, info.rank, info.world)
    mine = q[shard_bounds(64, info.rank, info.world)[0]:shard_bounds(64, info.rank, info.world)[1]].to(info.device)
    t0 = time.perf_counter()
    index = PassageIndex(dim, mode="faiss", faiss_index_type="ivfflat", device=info.device).build(x[lo:hi], lo, n)
    build_s = time.perf_counter() - t0
    exact = PassageIndex(dim, device=info.device).build(x[lo:hi].to(info.device), lo, n)
    index.search(mine, 10)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search(mine, 10)
    search_ms = 1000 * (time.perf_counter() - t0)
    want = exact.search(mine, 10)[1]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.cpu(), want.cpu()))
    recall = distributed.all_reduce_sum(torch.tensor([float(hits), float(want.numel())], device=info.device))
    rows = torch.arange(0, n, max(n // 97, 1))
    looked_up = torch.equal(index.lookup(rows.to(info.device)).cpu(), x[rows])
    where, why = faiss_placement(info.device.type, import_faiss(), "ivfflat")
    result = {"placement": index.faiss_on, "search_ms": round(search_ms, 2), "build_s": round(build_s, 2),
              "recall@10": round(float(recall[0] / recall[1]), 3), "n": n, "dim": dim, "lookup_exact": looked_up}
    if where == "cpu":
        result["placement_reason"] = why
    ok = result["recall@10"] >= 0.8 and looked_up and (index.faiss_on == "gpu" or info.device.type != "cuda")
    if info.is_main:
        with open(json_path, "w") as fh:
            json.dump({**result, "ok": ok}, fh)
        print(json.dumps(result))
    distributed.cleanup()
    return 0 if ok else 1


def training_parts(args, shape, nproc, suffix):
    """(name, command, run folder, parts it needs) of stage 1, LAPDOG, joint GRPO and evaluate."""
    out, data = os.path.abspath(args.out), args.data
    py = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    models = os.path.join(out, "models")
    common = [f"--train_data={data}/train.jsonl", f"--eval_data={data}/valid.jsonl", f"--passages={data}/stories.jsonl",
              f"--retriever_model_path={models}/retriever", f"--text_maxlength={shape['text_maxlength']}",
              f"--generation_max_length={shape['generation_max_length']}", "--log_freq=1", "--eval_freq=0",
              f"--save_freq={STEPS}", f"--total_steps={STEPS}", "--seed=0", "--generation_length_penalty=1.0"]
    run = {p: os.path.join(out, f"{p}{suffix}") for p in ("stage1", "lapdog", "joint_grpo", "evaluate")}
    s1 = os.path.join(run["stage1"], "checkpoint", f"step-{STEPS}")
    stage2 = common + [f"--per_gpu_batch_size={shape['s2_batch']}", f"--model_path={s1}", "--n_context=1",
                       "--retriever_n_context=5"]
    return [
        ("stage1" + suffix, py + ["train.py", "--config", "configs/stage1_reads.yaml", *common, "--precision=bf16",
                                  f"--per_gpu_batch_size={shape['s1_batch']}", f"--reader_model_type={models}/reader",
                                  f"--checkpoint_dir={run['stage1']}", "--name=gpu_check_stage1"], run["stage1"], []),
        # (the LAPDOG recipe sets the pool, --retriever_n_context 32: it comes after the shared sizes)
        ("lapdog" + suffix, py + ["train.py", *stage2, "--config", "configs/lapdog_evidence.yaml",
                                  f"--checkpoint_dir={run['lapdog']}", "--name=gpu_check_lapdog"],
         run["lapdog"], ["stage1" + suffix]),
        ("joint_grpo" + suffix, py + ["train.py", "--config", "configs/joint_grpo_evidence.yaml", *stage2,
                                      f"--checkpoint_dir={run['joint_grpo']}", "--name=gpu_check_joint_grpo"],
         run["joint_grpo"], ["stage1" + suffix]),
        ("evaluate" + suffix, py + ["evaluate.py", f"--model_path={run['joint_grpo']}/checkpoint/latest",
                                    f"--eval_data={data}/test.jsonl", f"--passages={data}/stories.jsonl",
                                    f"--retriever_model_path={models}/retriever", "--n_context=1",
                                    "--retriever_n_context=5", f"--max_eval_examples={shape['eval_n']}",
                                    f"--checkpoint_dir={run['evaluate']}", "--write_results"],
         run["evaluate"], ["joint_grpo" + suffix]),
    ]


def main(argv=None):
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.faiss_part:
        return faiss_part(args.faiss_part, args.tiny)
    gpus = torch.cuda.device_count()
    device = "cpu" if args.tiny or not gpus else "cuda"
    shape = SHAPES["tiny" if args.tiny else "gpu"]
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    env_note = {} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}  # --tiny: the CPU even on a GPU machine
    os.environ.update(env_note)
    parts = {}

    t0 = time.perf_counter()
    log = os.path.join(logs, "models.log")
    try:
        with open(log, "w") as fh:
            fh.write(f"reader {shape['reader']}, retriever {shape['retriever']}\n")
        build_models(out, shape, args.data, args.tiny)
        parts["models"] = {"status": "pass", "seconds": round(time.perf_counter() - t0, 1), "log": log}
    except Exception as exc:  # reported as this part's failure, the JSON line still comes
        with open(log, "a") as fh:
            fh.write(f"{type(exc).__name__}: {exc}\n")
        parts["models"] = {"status": "fail", "seconds": round(time.perf_counter() - t0, 1), "log": log,
                           "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}

    rounds = [(1, "")] + ([(2, "_2proc")] if device == "cuda" and gpus >= 2 else [])
    for nproc, suffix in rounds:
        for name, cmd, run_dir, needs in training_parts(args, shape, nproc, suffix):
            log = os.path.join(logs, f"{name}.log")
            missing = [n for n in ["models", *needs] if parts.get(n, {}).get("status") != "pass"]
            if missing:
                parts[name] = {"status": "skipped", "reason": f"needs {', '.join(missing)}", "log": log}
                continue
            ok, seconds, reason = run_logged(cmd, log, shape["timeout"])
            parts[name] = {"status": "pass" if ok else "fail", "seconds": round(seconds, 1), "log": log,
                           **({} if name.startswith("evaluate") else step_metrics(run_dir)),
                           **({} if ok else {"reason": reason})}
        name = "faiss" + suffix
        log, result = os.path.join(logs, f"{name}.log"), os.path.join(out, f"{name}.json")
        py = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else [])
        ok, seconds, reason = run_logged(py + [os.path.abspath(__file__), "--faiss_part", result]
                                         + (["--tiny"] if args.tiny else []), log, shape["timeout"])
        found = json.load(open(result)) if os.path.isfile(result) else {}
        found.pop("ok", None)
        parts[name] = {"status": "pass" if ok else "fail", "seconds": round(seconds, 1), "log": log, **found,
                       **({} if ok else {"reason": reason})}

    passed = all(p["status"] == "pass" for p in parts.values())
    for name, p in parts.items():
        extra = "" if p["status"] == "pass" else f" ({p.get('reason', '')}; log {p['log']})"
        print(f"{name:>18}: {p['status']}{extra}", flush=True)
    print(json.dumps({"gpu_check": {"device": device, "gpus": gpus, "tiny": args.tiny, "pass": passed, "parts": parts}}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(exits.run(main))
