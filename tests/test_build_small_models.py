"""The reader tokenizer and the small-model builder script."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, SAMPLE, run_script

from src.model.build import build_reader, build_reader_tokenizer, tokenizer_stats

CONVAI2_STYLE = [
    "i am good , i just got off work and tired , i have two jobs .",
    "i rather read , i've read about 20 books this year .",
    "wow ! i do love a good horror movie . loving this cooler weather",
    "haha , that's awesome ! what's your favorite color ? mine is blue :)",
    "i'm a stunt double as my second job . we've 3 kids , 2 dogs & a cat ... lol",
    "oliver was playing in his yard one day . suddenly he spotted a very cool beetle and caught it .",
    "do you like pizza ? i love it ! ! ! $ 5 at domino's . e-mail me @ home",
    "my fiancé loves the café in zürich",
]


@pytest.fixture(scope="module")
def tok():
    return build_reader_tokenizer()


def test_special_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    vocab = tok.get_vocab()
    assert not any(t in vocab for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[unused0]"))
    assert "<extra_id_0>" in tok.all_special_tokens
    assert tok("hello")["input_ids"][-1] == 1 and tok("hello")["input_ids"].count(1) == 1


def test_roundtrip_and_no_unk(tok):
    for text in CONVAI2_STYLE:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer_stats(tok, CONVAI2_STYLE) == {"n": len(CONVAI2_STYLE), "roundtrip": 1.0, "unk_rate": 0.0}
    # uppercase input is lowercased (so the only round-trip difference is case)
    assert tok.decode(tok("Hello World", add_special_tokens=False)["input_ids"]) == "hello world"


def test_prompt_keeps_sentinel_as_one_token(tok):
    prompt = "dialog with R's persona: persona: i like dogs . context:  Q: hi ! R: <extra_id_0>"
    pieces = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    assert pieces[-2:] == ["<extra_id_0>", "</s>"]
    assert pieces.count("<extra_id_0>") == 1 and "<unk>" not in pieces
    target = tok("<extra_id_0> i'm fine , you ?")["input_ids"]
    assert target[0] == tok.convert_tokens_to_ids("<extra_id_0>")
    assert tok.decode(target, skip_special_tokens=True) == "i'm fine , you ?"


def test_build_end_to_end_from_other_cwd(tmp_path):
    from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration

    out = tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "build_small_models.py"), "--out", str(out),
         "--d_model", "32", "--d_ff", "64", "--num_layers", "1", "--num_decoder_layers", "1",
         "--num_heads", "2", "--d_kv", "16", "--seed", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote reader" in proc.stdout and "wrote retriever" in proc.stdout
    for sub in ("reader", "retriever"):
        assert (out / sub / "model.safetensors").exists()
    reader = T5ForConditionalGeneration.from_pretrained(out / "reader")
    rtok = AutoTokenizer.from_pretrained(out / "reader")
    cfg = reader.config
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.dropout_rate) == (32, 64, 1, 2, 0.1)
    assert cfg.vocab_size == len(rtok) and cfg.decoder_start_token_id == 0 and cfg.eos_token_id == 1
    assert rtok.decode(rtok("i've read 20 books .", add_special_tokens=False)["input_ids"]) == "i've read 20 books ."
    retriever = AutoModel.from_pretrained(out / "retriever")
    qtok = AutoTokenizer.from_pretrained(out / "retriever")
    with torch.no_grad():
        h = retriever(**qtok(["hello world"], return_tensors="pt")).last_hidden_state
    assert h.shape[-1] == 384


def test_bad_size_flag_is_one_error_line(tmp_path):
    rc, _, err = run_script("scripts/build_small_models.py", "--out", tmp_path, "--d_model", "0")
    assert rc == 2 and err.strip().startswith("error: --d_model: must be a positive integer")


def test_seed_makes_build_deterministic(tok):
    from src.model.build import build_reader

    a = build_reader(tok, seed=5, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8)
    b = build_reader(tok, seed=5, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8)
    c = build_reader(tok, seed=6, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8)
    assert torch.equal(a.shared.weight, b.shared.weight) and not torch.equal(a.shared.weight, c.shared.weight)


def test_vocab_from_training_texts_keeps_their_tokenization(tok, tmp_path):
    from src.model.build import jsonl_texts

    sample = os.path.join(ROOT, "data", "sample")
    texts = jsonl_texts([os.path.join(sample, f) for f in ("train.jsonl", "valid.jsonl", "stories.jsonl")])
    small = build_reader_tokenizer(vocab_texts=texts)
    assert len(small) < len(tok) / 8  # 2,798 vs 29,590 pieces measured
    assert (small.pad_token_id, small.eos_token_id, small.unk_token_id) == (0, 1, 2)
    full_ids = tok(texts, add_special_tokens=False)["input_ids"]
    small_ids = small(texts, add_special_tokens=False)["input_ids"]
    assert all(tok.convert_ids_to_tokens(a) == small.convert_ids_to_tokens(b) for a, b in zip(full_ids, small_ids))
    # words the texts never used still tokenize (piece by piece), without <unk>
    ids = small("zebra quokka", add_special_tokens=False)["input_ids"]
    assert small.unk_token_id not in ids and small.decode(ids) == "zebra quokka"
    assert small.convert_ids_to_tokens(small("<extra_id_0> hi")["input_ids"])[0] == "<extra_id_0>"
def test_num_decoder_layers_defaults_to_num_layers(tmp_path):
    import json

    for extra, decoder in (([], 2), (["--num_decoder_layers", "3"], 3)):
        out = tmp_path / str(decoder)
        rc, _, err = run_script("scripts/build_small_models.py", "--out", out, "--vocab_from",
                                os.path.join(SAMPLE, "valid.jsonl"), "--d_model", "16", "--d_ff", "32", "--num_layers",
                                "2", "--num_heads", "2", "--d_kv", "8", *extra)
        assert rc == 0, err
        config = json.loads((out / "reader" / "config.json").read_text())
        assert (config["num_layers"], config["num_decoder_layers"]) == (2, decoder)


def test_unequal_stacks_generate_and_sample(tok):
    """A reader with more decoder than encoder layers (transformers sizes a config-built cache by
    the encoder) greedy-decodes, beam-searches and samples like any other."""
    from src.model.reader import FiDReader

    model = build_reader(tok, seed=1, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2, d_kv=8)
    reader = FiDReader(model.eval(), tok)
    ids, mask = reader.tokenize_inputs([["hello there"], ["how are you ?"]], 16)
    for beams in (1, 2):
        assert len(reader.generate_text(ids, mask, max_length=5, num_beams=beams)) == 2
    hidden, hmask = reader.encode(ids, mask)
    replies = reader.sample(hidden, hmask, 3, max_length=5)
    assert replies.shape[0] == 6 and replies.shape[1] <= 4
