"""The pointer-generator (copy) head: its maths against hand-computed values, and a PointerT5 inside
FiDReader: every pass (teacher forcing, greedy, beam, sampling) uses the same copy distribution."""

import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from src.model.build import build_reader_tokenizer
from src.model.pointer import PointerT5, copy_mixture_logprobs
from src.model.reader import FiDReader


def test_mixture_matches_hand_computed_values():
    # V = 4, uniform generator, gate 0.5; source tokens [2, 2, 3] with attention [0.5, 0.25, 0.25]:
    # copy mass 0.75 on token 2, 0.25 on token 3 -> p = 0.5·0.25 + 0.5·copy.
    logits = torch.zeros(1, 1, 4)
    attention = torch.tensor([[[0.5, 0.25, 0.25]]])
    logp = copy_mixture_logprobs(logits, torch.zeros(1, 1, 1), attention, torch.tensor([[2, 2, 3]]))
    assert torch.allclose(logp.exp(), torch.tensor([[[0.125, 0.125, 0.5, 0.25]]]))


def test_mixture_is_normalized_and_differentiable_everywhere():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, requires_grad=True)
    gate = torch.randn(2, 3, 1, requires_grad=True)
    attention = torch.softmax(torch.randn(2, 3, 5), -1).requires_grad_()
    source = torch.randint(0, 10, (2, 5))
    logp = copy_mixture_logprobs(logits, gate, attention, source)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 3), atol=1e-6)
    logp[..., 7].sum().backward()  # token 7 may be absent from the source: its copy mass is 0
    for t in (logits, gate, attention):
        assert torch.isfinite(t.grad).all()


def test_gate_limits_are_the_generator_and_the_copy_distribution():
    logits = torch.tensor([[[1.0, 2.0, 0.0]]])
    attention = torch.tensor([[[0.3, 0.7]]])
    source = torch.tensor([[0, 2]])
    gen = copy_mixture_logprobs(logits, torch.full((1, 1, 1), 40.0), attention, source)
    assert torch.allclose(gen, torch.log_softmax(logits, -1), atol=1e-6)
    cp = copy_mixture_logprobs(logits, torch.full((1, 1, 1), -40.0), attention, source)
    assert torch.allclose(cp.exp(), torch.tensor([[[0.3, 0.0, 0.7]]]), atol=1e-6)


def test_mixture_rejects_misaligned_source():
    with pytest.raises(ValueError, match="source_ids"):
        copy_mixture_logprobs(torch.zeros(1, 1, 4), torch.zeros(1, 1, 1), torch.ones(1, 1, 3) / 3,
                              torch.zeros(1, 2, dtype=torch.long))


@pytest.fixture(scope="module")
def tokenizer():
    return build_reader_tokenizer(vocab_texts=["alpha beta gamma delta", "one two three four five six seven",
                                               "copy the word red green blue"])


def config(tokenizer, **extra):
    return T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=2, d_kv=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, **extra)


@pytest.fixture()
def reader(tokenizer):
    torch.manual_seed(0)
    return FiDReader(PointerT5(config(tokenizer, pointer_generator=True)).eval(), tokenizer)


def inputs(reader):
    return reader.tokenize_inputs([["alpha beta gamma", "delta alpha"], ["one two three", "four five six"]], 16)


def test_head_initialization_fresh_and_added_to_a_plain_t5(tmp_path, tokenizer, reader):
    head = reader.model.pointer
    assert abs(head.query.weight.std().item() - 1 / math.sqrt(32)) < 0.04
    assert head.gate.weight.abs().sum() == 0 and head.gate.bias.abs().sum() == 0
    torch.manual_seed(1)
    plain = T5ForConditionalGeneration(config(tokenizer))
    plain.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    loaded = FiDReader.from_pretrained(tmp_path / "plain", pointer_generator=True)
    assert loaded.copies and not FiDReader.from_pretrained(tmp_path / "plain").copies
    # transformers initializes the missing head through PointerT5._init_weights, not with garbage
    head = loaded.model.pointer
    assert torch.isfinite(head.key.weight).all()
    assert abs(head.key.weight.std().item() - 1 / math.sqrt(32)) < 0.04
    assert head.gate.bias.abs().sum() == 0
    assert torch.equal(loaded.model.shared.weight, plain.shared.weight)


def test_save_load_roundtrip_keeps_the_head(tmp_path, reader):
    ids, mask = inputs(reader)
    labels = reader.tokenize_targets(["gamma", "five"], 8)
    reader.save_pretrained(tmp_path / "r")
    again = FiDReader.from_pretrained(tmp_path / "r")
    assert isinstance(again.model, PointerT5)
    assert torch.allclose(again(ids, mask, labels), reader(ids, mask, labels))
    # the model's own labels loss is the same mixture NLL
    hidden, enc_mask = reader.encode(ids, mask)
    out = reader.model(encoder_outputs=(hidden,), attention_mask=enc_mask, labels=labels,
                       copy_source_ids=reader.source_ids(ids))
    assert torch.allclose(out.loss, reader(ids, mask, labels), atol=1e-6)


def test_every_pass_needs_the_source_ids(reader):
    ids, mask = inputs(reader)
    hidden, enc_mask = reader.encode(ids, mask)
    with pytest.raises(ValueError, match="source_ids"):
        reader.sample(hidden, enc_mask, 1, 6)
    with pytest.raises(ValueError, match="source_ids"):
        reader.token_logprobs(hidden, enc_mask, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="copy_source_ids"):
        reader.model(encoder_outputs=(hidden,), attention_mask=enc_mask, decoder_input_ids=torch.zeros(2, 1).long())


def test_a_copying_reader_emits_only_its_own_examples_source(reader):
    """Gate forced to copy: greedy, beam search and sampling may emit only tokens of the same
    example's (FiD-concatenated) input, so the source ids travel with beams and samples."""
    with torch.no_grad():
        reader.model.pointer.gate.bias.fill_(-40.0)
    ids, mask = inputs(reader)
    allowed = [set(row[m.bool()].tolist()) | {reader.pad_token_id} for row, m in zip(reader.source_ids(ids),
                                                                                        reader.source_ids(mask))]
    hidden, enc_mask = reader.encode(ids, mask)
    torch.manual_seed(0)
    outputs = [reader.generate(ids, mask, max_length=6), reader.generate(ids, mask, max_length=6, num_beams=3),
               reader.sample(hidden, enc_mask, 4, 6, temperature=1.5, source_ids=reader.source_ids(ids))]
    for out in outputs:
        per = out.shape[0] // 2
        for i, row in enumerate(out.tolist()):
            assert set(row) <= allowed[i // per], (row, allowed[i // per])


def test_greedy_follows_the_teacher_forced_argmax_and_scores_match(reader):
    ids, mask = inputs(reader)
    greedy = reader.generate(ids, mask, max_length=6)
    hidden, enc_mask = reader.encode(ids, mask)
    source = reader.source_ids(ids)
    logits = reader.model(encoder_outputs=(hidden,), attention_mask=enc_mask,
                          decoder_input_ids=reader.model._shift_right(greedy), copy_source_ids=source).logits
    live = reader.reply_mask(greedy).bool()
    assert torch.equal(logits.argmax(-1)[live], greedy[live])
    logp, tmask = reader.token_logprobs(hidden, enc_mask, greedy, source_ids=source)
    expected = logits.log_softmax(-1).gather(-1, greedy.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp[live], expected[live], atol=1e-5)
    assert torch.allclose(logits.exp().sum(-1), torch.ones_like(logits[..., 0]), atol=1e-5)
