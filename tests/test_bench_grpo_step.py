"""bench/grpo_step.py: the naive per-sample joint GRPO loss computes the objective of the batched
step (src/model/lapdog.py "grpo_joint") on one shared rollout, with tiny models."""

import importlib.util
import json
import os

import pytest
import torch
from helpers import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_step", os.path.join(ROOT, "bench", "grpo_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_reward(hyps, refs, **kwargs):
    """A reward that is almost never flat within a group (random tiny models score 0 on the real
    one, which would zero every advantage and leave the surrogate terms untested)."""
    r = torch.tensor([float(len(h) % 7) for h in hyps])
    zero = torch.zeros(len(hyps))
    return {"reward": r, "bleu": zero, "f1": zero, "rouge": zero, "length_ratio": zero, "distinct3": zero + 1}


SIZES = dict(batch=2, G=3, k=2, M=4, gen_len=8)
SHORT = ["--text_maxlength", "96", "--retriever_maxlength", "48"]


def test_naive_loss_agrees_with_fast_step(tiny_models, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "grpo_reward", fake_reward)
    monkeypatch.setattr("src.model.lapdog.grpo_reward", fake_reward)
    # A large learning rate so that one update moves the policies well away from the references:
    # the KL terms (the only non-zero part of the loss value at ratio 1) are then far from 0.
    opts = bench.bench_options(tiny_models, **SIZES, extra=[*SHORT, "--lr", "0.02", "--lr_retriever", "0.02"])
    batches, _, _ = bench.make_batches(tiny_models, opts, "cpu", 2, seed=0)
    torch.manual_seed(0)
    model = bench.load_lapdog(tiny_models, opts, "cpu")
    optims = bench.make_optimizers(model, opts)
    bench.train_step(model, optims, batches[0], naive=False, device="cpu")

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    agree = bench.agreement(model, batches[1])
    assert agree["kl_reader_fast"] > 1e-3 and agree["kl_retriever_fast"] > 1e-6, agree
    assert abs(agree["loss_fast"] - agree["loss_naive"]) < 1e-4, agree
    assert agree["kl_reader_naive"] == pytest.approx(agree["kl_reader_fast"], rel=1e-4, abs=1e-7)
    # retriever KL ~1e-4 from differences of near-equal float32 log-probs: 1 thread measured 0.15% apart
    assert agree["kl_retriever_naive"] == pytest.approx(agree["kl_retriever_fast"], rel=5e-3, abs=1e-7)
    assert agree["reward_fast"] > 0
    assert agree["reward_naive"] == pytest.approx(agree["reward_fast"], abs=1e-6)
    assert agree["grad_rel_diff"] < 1e-3, agree
    # The check only measures: the parameters are untouched.
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    # ... and it can fail: a naive loss with twice the KL weight disagrees.
    real = bench.naive_grpo_joint

    def doubled_kl(m, batch, stats, samples=None):
        m.opts.grpo_kl_coeff *= 2
        try:
            return real(m, batch, stats, samples)
        finally:
            m.opts.grpo_kl_coeff /= 2

    monkeypatch.setattr(bench, "naive_grpo_joint", doubled_kl)
    wrong = bench.agreement(model, batches[1])
    assert abs(wrong["loss_fast"] - wrong["loss_naive"]) > 1e-4, wrong


def test_cli_json_last_line(tiny_models, capsys):
    bench = _bench()
    models_dir = os.path.dirname(tiny_models["reader"])
    assert bench.main(["--models", models_dir, "--device", "cpu", "--batch", "1", "--G", "2", "--k", "2",
                       "--M", "3", "--gen_len", "6", "--steps", "1", "--warmup", "0", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("speedup", "loss_fast", "loss_naive", "step_s_fast", "step_s_naive"):
        assert key in result
    assert result["speedup"] > 0 and abs(result["loss_fast"] - result["loss_naive"]) < 1e-4
    assert any(line.startswith("| sampling |") for line in out)


def test_bad_models_folder_is_a_usage_error(tmp_path):
    bench = _bench()
    from src.infra.errors import UsageError
    with pytest.raises(UsageError, match="--models"):
        bench.main(["--models", str(tmp_path), "--device", "cpu"])


def _ab():
    spec = importlib.util.spec_from_file_location("bench_ab", os.path.join(ROOT, "bench", "ab_fast_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_fast_step_times_two_checkouts(tiny_models, capsys):
    """The A/B regression timer runs each checkout's own fast step in a subprocess; with the same
    checkout on both sides it reports two positive times and their ratio."""
    models_dir = os.path.dirname(tiny_models["reader"])
    assert _ab().main([ROOT, ROOT, "--models", models_dir, "--rounds", "1", "--steps", "1", "--warmup", "0",
                       "--batch", "1", "--G", "2", "--k", "2", "--M", "3", "--gen_len", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["rounds"]) == 1 and all(r["a"] > 0 and r["b"] > 0 for r in result["rounds"])
    assert result["a_over_b"] == pytest.approx(result["a_mean"] / result["b_mean"])


def test_ab_fast_step_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    from src.infra.errors import UsageError
    with pytest.raises(UsageError, match="no bench/grpo_step.py"):
        _ab().main([ROOT, str(tmp_path)])
