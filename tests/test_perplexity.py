"""Per-token perplexity of the gold replies (src/evaluation/generation.py:reply_nll), against a
hand computation from the tiny model's own logits."""

import math

import torch
from helpers import batch_one

from src.evaluation.generation import reply_nll
from src.run.batch import Batch


def test_reply_nll_is_the_gold_tokens_log_likelihood_without_the_sentinel(reader):
    ids, mask, labels = batch_one(reader)
    batch = Batch(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        nll, tokens, loss = reply_nll(reader, batch)
        logits = reader.model(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=labels).logits
    logp = torch.log_softmax(logits.float(), -1)
    sentinel = reader.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    assert (labels[:, 0] == sentinel).all()
    for i in range(labels.shape[0]):
        positions = [t for t in range(1, labels.shape[1]) if labels[i, t] != -100]  # words and EOS, not the sentinel
        by_hand = -sum(logp[i, t, labels[i, t]].item() for t in positions)
        assert tokens[i].item() == len(positions)
        assert math.isclose(nll[i].item(), by_hand, rel_tol=1e-5)
    # eval_loss's term: the mean over every label token, the sentinel included
    every = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum() / (labels != -100).sum()
    assert math.isclose(loss.item(), every.item(), rel_tol=1e-5)
    assert tokens.tolist() == [7, 2]  # "i am good , thanks ! </s>" and "fine </s>"
