"""FiDReader on a tiny random T5 with the project's reader tokenizer."""

import pytest
import torch
import torch.nn.functional as F
from helpers import PASSAGES, QUERY, batch_one, eos_bias, tiny_t5

from src.infra.errors import UsageError
from src.model.reader import FiDReader, dropout_disabled


def post_process_plain(reader, out):
    """model.generate output -> FiDReader convention (no start token, pad after the first EOS)."""
    return reader._pad_after_eos(out[:, 1:])


def test_tokenize_shapes_truncation_and_labels(reader):
    ids, mask = reader.tokenize_inputs([[QUERY, QUERY + " " + PASSAGES[0]], ["hi", "hello"]], max_length=12)
    assert ids.shape == mask.shape and ids.shape[:2] == (2, 2) and ids.dtype == torch.long
    assert ids.shape[2] == 12
    assert ids[0, 0, -1].item() == reader.eos_token_id  # truncated, EOS kept
    assert mask[1, 0].sum().item() == 2 and ids[1, 0, :2].tolist()[1] == reader.eos_token_id
    labels = reader.tokenize_targets(["<extra_id_0> i am good", "<extra_id_0> a b c d e f g h"], max_length=6)
    assert labels.shape == (2, 6)
    assert labels[0, 5].item() == -100 and labels[0, 4].item() == reader.eos_token_id
    assert labels[1, -1].item() == reader.eos_token_id
    assert labels[0, 0].item() == reader.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    with pytest.raises(ValueError):
        reader.tokenize_inputs([["a", "b"], ["c"]], max_length=8)


def test_single_passage_equals_plain_t5(reader):
    ids, mask, labels = batch_one(reader, n=1)
    plain = reader.model(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=labels)
    fid = reader(ids, mask, labels)
    assert fid.dim() == 0 and abs(fid.item() - plain.loss.item()) < 1e-6
    out = reader.model.generate(input_ids=ids[:, 0], attention_mask=mask[:, 0], max_length=9, do_sample=False,
                                num_beams=1)
    assert torch.equal(reader.generate(ids, mask, max_length=9), post_process_plain(reader, out))
    out = reader.model.generate(input_ids=ids[:, 0], attention_mask=mask[:, 0], max_length=9, do_sample=False,
                                num_beams=3, length_penalty=1.0)
    assert torch.equal(reader.generate(ids, mask, max_length=9, num_beams=3), post_process_plain(reader, out))


def test_encode_is_fusion_of_separate_encodings(reader):
    ids, mask, _ = batch_one(reader, n=3)
    hidden, fmask = reader.encode(ids, mask)
    b, n, length = ids.shape
    assert hidden.shape == (b, n * length, reader.config.d_model) and fmask.shape == (b, n * length)
    manual = torch.cat([reader.model.encoder(input_ids=ids[:, k], attention_mask=mask[:, k]).last_hidden_state
                        for k in range(n)], dim=1)
    torch.testing.assert_close(hidden, manual, atol=1e-5, rtol=1e-5)
    assert torch.equal(fmask, mask.reshape(b, n * length))
    # the decoder really sees all passages: changing the last passage changes the loss
    labels = reader.tokenize_targets(["<extra_id_0> a", "<extra_id_0> b"], max_length=8)
    ids2 = ids.clone()
    ids2[:, -1, :3] = 500
    assert reader(ids, mask, labels).item() != reader(ids2, mask, labels).item()


def test_loss_per_example(reader):
    ids, mask, _ = batch_one(reader, n=2)
    labels = torch.tensor([[5000, 6000, 7000, 1], [8000, 9000, 10000, 1]])
    per = reader.loss_per_example(ids, mask, labels)
    assert per.shape == (2,)
    assert abs(per.mean().item() - reader(ids, mask, labels).item()) < 1e-5
    # padding is ignored: example 1 scored alone with and without -100 padding agrees
    padded = torch.tensor([[5000, 6000, 7000, 1], [8000, 1, -100, -100]])
    alone = reader.loss_per_example(ids[1:], mask[1:], padded[1:, :2])
    assert abs(reader.loss_per_example(ids, mask, padded)[1].item() - alone.item()) < 1e-5


def test_generation_lengths(reader):
    ids, mask, _ = batch_one(reader, n=2)
    for beams in (1, 3):
        out = reader.generate(ids, mask, max_length=7, num_beams=beams)
        assert out.shape[0] == 2 and out.shape[1] <= 6
    handle = eos_bias(reader.model, 50.0)
    try:
        for beams in (1, 3):
            assert reader.generate(ids, mask, max_length=10, num_beams=beams)[:, 0].tolist() == [1, 1]
            out = reader.generate(ids, mask, max_length=10, min_length=5, num_beams=beams)
            # transformers' min_length counts the decoder start token: 4 real tokens, then EOS
            assert out.shape[1] == 5 and out[:, 4].tolist() == [1, 1] and (out[:, :4] != 1).all()
        texts = reader.generate_text(ids, mask, max_length=10, min_length=5)
        assert len(texts) == 2 and all(len(t.split()) <= 4 for t in texts)
    finally:
        handle.remove()


def sample_without_cache(reader, ids, mask, num_samples, max_length, temperature, min_length=0):
    """Reference sampler from the raw inputs: re-runs the encoder and the whole decoder prefix at
    every step (no key/value cache), same per-step maths and RNG draws as ``FiDReader.sample``."""
    from src.model import sampling

    b, n, length = ids.shape
    ids = ids.repeat_interleave(num_samples, 0)
    mask = mask.repeat_interleave(num_samples, 0)
    prefix = torch.zeros(b * num_samples, 1, dtype=torch.long)
    finished = torch.zeros(b * num_samples, dtype=torch.bool)
    for step in range(max_length - 1):
        hidden = reader.model.encoder(input_ids=ids.reshape(-1, length), attention_mask=mask.reshape(-1, length))
        hidden = hidden.last_hidden_state.reshape(ids.shape[0], n * length, -1)
        logits = reader.model(encoder_outputs=reader_encoder_output(hidden), attention_mask=mask.reshape(ids.shape[0], -1),
                              decoder_input_ids=prefix, use_cache=False).logits[:, -1].float() / temperature
        if step + 1 < min_length:
            logits[:, 1] = float("-inf")
        token = sampling.categorical(torch.softmax(logits, -1)).masked_fill(finished, 0)
        prefix = torch.cat([prefix, token[:, None]], 1)
        finished |= token == 1
        if finished.all():
            break
    return reader._pad_after_eos(prefix[:, 1:])


@pytest.mark.parametrize("n,min_length", [(1, 0), (2, 4)])
def test_sample_from_cached_states_equals_sampling_from_inputs(reader, n, min_length):
    ids, mask, _ = batch_one(reader, n=n)
    hidden, fmask = reader.encode(ids, mask)
    hidden_before = hidden.clone()
    handle = eos_bias(reader.model, 9.0)
    try:
        torch.manual_seed(123)
        ours = reader.sample(hidden, fmask, num_samples=3, max_length=12, temperature=0.7, min_length=min_length)
        torch.manual_seed(123)
        plain = sample_without_cache(reader, ids, mask, 3, 12, 0.7, min_length=min_length)
        torch.manual_seed(123)
        again = reader.sample(hidden, fmask, num_samples=3, max_length=12, temperature=0.7, min_length=min_length)
    finally:
        handle.remove()
    assert ours.shape[0] == 6 and ours.shape[1] <= 11
    assert torch.equal(ours, plain)
    assert torch.equal(ours, again)
    assert torch.equal(hidden, hidden_before) and hidden.shape[0] == 2
    assert (ours[:, 0] != 0).all()  # the decoder start token is not returned
    eos_at = [(row == 1).nonzero()[0].item() for row in ours if (row == 1).any()]
    assert eos_at, "the EOS bias should end some replies early"
    assert min(eos_at) >= max(min_length - 1, 0)
    assert any(p < ours.shape[1] - 1 for p in eos_at)
    for row in ours:  # pad after the first EOS, nothing else
        if (row == 1).any():
            p = (row == 1).nonzero()[0].item()
            assert (row[p + 1:] == 0).all()


def test_sample_follows_the_model_distribution(reader):
    """First-token frequencies of 4,000 samples match softmax(logits / T) of the first step."""
    ids, mask, _ = batch_one(reader, n=1, b=1)
    hidden, fmask = reader.encode(ids, mask)
    temp = 0.5
    with torch.no_grad():
        start = torch.zeros(1, 1, dtype=torch.long)
        logits = reader.model(encoder_outputs=reader_encoder_output(hidden), attention_mask=fmask,
                              decoder_input_ids=start).logits[0, -1]
    probs = torch.softmax(logits / temp, -1)
    top = probs.topk(3)
    torch.manual_seed(0)
    first = reader.sample(hidden, fmask, num_samples=4000, max_length=2, temperature=temp)[:, 0]
    assert top.values.sum() > 0.05, "the test needs some mass on the top tokens"
    for p, tok in zip(top.values.tolist(), top.indices.tolist()):
        freq = (first == tok).float().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / 4000) ** 0.5 + 1e-3, (tok, freq, p)
    # a nucleus this small keeps only the most probable token: sampling turns greedy
    nucleus_first = reader.sample(hidden, fmask, num_samples=50, max_length=2, temperature=temp, top_p=1e-6)[:, 0]
    assert (nucleus_first == top.indices[0]).all()
    with pytest.raises(ValueError, match="max_length"):
        reader.sample(hidden, fmask, num_samples=1, max_length=1)
    with pytest.raises(ValueError, match="temperature"):
        reader.sample(hidden, fmask, num_samples=1, max_length=4, temperature=0.0)


def test_token_logprobs_match_generation_scores(reader):
    ids, mask, _ = batch_one(reader, n=2)
    hidden, fmask = reader.encode(ids, mask)
    temp = 0.7
    handle = eos_bias(reader.model, 9.0)
    try:
        torch.manual_seed(7)
        res = reader.model.generate(encoder_outputs=reader_encoder_output(hidden), attention_mask=fmask,
                                    do_sample=True, num_return_sequences=4, max_length=12, temperature=temp,
                                    top_p=1.0, top_k=0, output_scores=True, return_dict_in_generate=True)
        seqs = post_process_plain(reader, res.sequences)
        logp, tmask = reader.token_logprobs(hidden, fmask, seqs, temperature=temp)
    finally:
        handle.remove()
    assert logp.shape == seqs.shape == tmask.shape and tmask.dtype == torch.float32
    ref = torch.stack([F.log_softmax(s.float(), dim=-1) for s in res.scores], dim=1)
    ref = ref.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    on = tmask.bool()
    torch.testing.assert_close(logp[on], ref[on], atol=1e-4, rtol=1e-4)
    eos_pos = [(row == 1).nonzero()[0].item() if (row == 1).any() else None for row in seqs]
    assert any(p is not None and p < seqs.shape[1] - 1 for p in eos_pos), "test needs an early EOS"
    for row, p in enumerate(eos_pos):
        expected = torch.ones(seqs.shape[1])
        if p is not None:
            expected[p + 1:] = 0
        assert torch.equal(tmask[row], expected)


def test_token_logprobs_fused_head_equals_full_logits(tokenizer):
    """The chunked projection path (no [R, T, V] logits) gives the log-probs and gradients of
    the plain path: the model's logits -> logprobs.token_logprobs."""
    from src.model.logprobs import token_logprobs

    reader = FiDReader(tiny_t5(tokenizer, seed=2), tokenizer)
    ids, mask, _ = batch_one(reader, n=2)
    targets = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 11], [12, 1, 0, 0]])
    hidden, fmask = reader.encode(ids, mask)
    results = []
    for fused in (True, False):
        reader.model.zero_grad(set_to_none=True)
        h = hidden.detach().clone().requires_grad_(True)
        if fused:
            logp, tmask = reader.token_logprobs(h, fmask, targets, temperature=0.8)
        else:
            hh, mm = h.repeat_interleave(2, 0), fmask.repeat_interleave(2, 0)
            logits = reader._decoder_pass(hh, mm, decoder_input_ids=reader.model._shift_right(targets)).logits
            logp = token_logprobs(logits, targets, 0.8)
        weights = torch.arange(1.0, 17.0).view(4, 4)
        (logp * weights).sum().backward()
        results.append((logp.detach(), h.grad, reader.model.shared.weight.grad.clone(),
                        reader.model.decoder.block[0].layer[0].SelfAttention.q.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert isinstance(reader.model.lm_head, torch.nn.Linear)  # the head is back after the fused pass
    assert reader.model.lm_head.weight is reader.model.shared.weight


def test_loss_and_logprobs_train_under_bf16_autocast(tokenizer):
    """--precision bf16 wraps the reader in CPU autocast: the fused projection path must run and
    backpropagate there, with the loss close to the float32 one."""
    reader = FiDReader(tiny_t5(tokenizer, seed=3), tokenizer)
    ids, mask, labels = batch_one(reader, n=2)
    loss32 = reader(ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = reader(ids, mask, labels)
        hidden, fmask = reader.encode(ids, mask)
        logp, tmask = reader.token_logprobs(hidden, fmask, torch.tensor([[5, 6, 1], [7, 1, 0]]))
    (loss16 + (logp * tmask).sum()).backward()
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    grad = reader.model.shared.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def reader_encoder_output(hidden):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=hidden)


def test_token_logprobs_gradients(tokenizer):
    reader = FiDReader(tiny_t5(tokenizer, seed=1), tokenizer)
    ids, mask, _ = batch_one(reader, n=2)
    hidden, fmask = reader.encode(ids, mask)
    hidden = hidden.detach().requires_grad_(True)
    targets = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 11], [12, 1, 0, 0]])
    logp, tmask = reader.token_logprobs(hidden, fmask, targets, temperature=0.5)
    (logp * tmask).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert reader.model.decoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert reader.model.encoder.block[0].layer[0].SelfAttention.q.weight.grad is None
    # end to end through the encoder as well, with gradient checkpointing in training mode
    reader.model.zero_grad()
    ck = FiDReader(tiny_t5(tokenizer, seed=1, dropout=0.1), tokenizer)
    ck.enable_gradient_checkpointing()
    ck.train()
    hidden, fmask = ck.encode(ids, mask)
    logp, tmask = ck.token_logprobs(hidden, fmask, targets)
    (logp * tmask).sum().backward()
    assert ck.model.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0


def test_dropout_disabled_restores_flags(tokenizer):
    a = tiny_t5(tokenizer).train()
    b = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    a.encoder.eval()  # a frozen part stays frozen afterwards
    before = {id(m): m.training for mod in (a, b) for m in mod.modules()}
    with dropout_disabled(a, b):
        assert not any(m.training for mod in (a, b) for m in mod.modules())
        x = torch.ones(1, 2)
        assert torch.equal(b(x), b(x))
    assert {id(m): m.training for mod in (a, b) for m in mod.modules()} == before
    assert a.training and not a.encoder.training and a.decoder.training
    with pytest.raises(RuntimeError):
        with dropout_disabled(b):
            raise RuntimeError("boom")
    assert b.training and b[1].training


def test_save_and_from_pretrained(reader, tmp_path):
    reader.save_pretrained(tmp_path / "r")
    assert (tmp_path / "r" / "model.safetensors").exists()
    loaded = FiDReader.from_pretrained(str(tmp_path / "r"), dropout=0.3, gradient_checkpointing=True)
    assert loaded.config.dropout_rate == 0.3 and loaded.pad_token_id == 0 and loaded.eos_token_id == 1
    assert loaded.model.is_activation_checkpointing
    ids, mask, labels = batch_one(reader, n=2)
    loaded.eval()
    assert abs(loaded(ids, mask, labels).item() - reader(ids, mask, labels).item()) < 1e-6
    assert loaded.tokenizer("<extra_id_0> hi")["input_ids"] == reader.tokenizer("<extra_id_0> hi")["input_ids"]


def test_from_pretrained_error_is_usage_error(tmp_path):
    with pytest.raises(UsageError) as info:
        FiDReader.from_pretrained(str(tmp_path / "no_such_reader"))
    msg = str(info.value)
    assert msg.startswith("--reader_model_type: cannot load reader") and "build_small_models.py" in msg
    assert "\n" not in msg


def test_decode_skips_specials_and_keeps_spaces(reader):
    text = "<extra_id_0> i'm good , thanks ! do you like dogs ?"
    ids = torch.tensor([reader.tokenizer(text)["input_ids"] + [0, 0]])
    assert reader.decode(ids) == ["i'm good , thanks ! do you like dogs ?"]


def _step_logits(reader, ids, mask, prefix):
    """Teacher-forced next-token logits [B, V] after the decoder start token and ``prefix`` [B, t]."""
    hidden, fmask = reader.encode(ids, mask)
    start = torch.full((ids.shape[0], 1), reader.decoder_start_token_id, dtype=torch.long)
    dec = torch.cat([start, prefix], 1)
    from transformers.modeling_outputs import BaseModelOutput
    return reader.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=fmask,
                        decoder_input_ids=dec).logits[:, -1]


def test_repetition_penalty_is_ctrls_rule_step_by_step(reader):
    """Greedy with penalty p takes, at every step, the argmax of the logits in which each token
    already in the sequence (decoder start token included, as transformers counts it) has its logit
    divided by p where positive and multiplied by p where negative."""
    ids, mask, _ = batch_one(reader, n=2)
    with torch.no_grad():
        plain = reader.generate(ids, mask, max_length=10)
        penal = reader.generate(ids, mask, max_length=10, repetition_penalty=3.0)
        assert not torch.equal(plain, penal)  # the tiny random reader repeats tokens; the penalty stops it
        for b in range(ids.shape[0]):
            seq = penal[b]
            for t in range(len(seq)):
                if t > 0 and seq[t - 1] == reader.eos_token_id:
                    break
                logits = _step_logits(reader, ids[b:b + 1], mask[b:b + 1], seq[None, :t])[0]
                seen = torch.tensor(sorted({reader.decoder_start_token_id, *seq[:t].tolist()}))
                chosen = logits.clone()
                chosen[seen] = torch.where(logits[seen] > 0, logits[seen] / 3.0, logits[seen] * 3.0)
                assert chosen.argmax().item() == seq[t].item()


def test_sampling_is_seeded_and_its_tiny_nucleus_is_greedy(reader):
    ids, mask, _ = batch_one(reader, n=2)
    greedy = reader.generate(ids, mask, max_length=10)
    # a nucleus of (almost) no mass keeps only each step's most probable token: greedy decoding
    assert torch.equal(reader.generate(ids, mask, max_length=10, temperature=1.0, top_p=1e-6), greedy)
    draws = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        draws.append(reader.generate(ids, mask, max_length=10, temperature=2.0))
    assert torch.equal(draws[0], draws[1])  # same seed, same replies
    assert any(not (d.shape == greedy.shape and torch.equal(d, greedy)) for d in draws[2:])
    with pytest.raises(ValueError, match="do not combine"):
        reader.generate(ids, mask, max_length=10, temperature=1.0, num_beams=2)
    with pytest.raises(ValueError, match="top_p"):
        reader.generate(ids, mask, max_length=10, temperature=1.0, top_p=0.0)
