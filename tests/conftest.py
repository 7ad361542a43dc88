import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


import pytest  # noqa: E402

TINY_READER = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32)


def _build_tiny(out):
    """A tiny random T5 reader and a tiny random BERT retriever (MiniLM's tokenizer), for speed."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    from scripts.build_small_models import build_reader, build_reader_tokenizer, minilm_path

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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return _build_tiny(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="session")
def minilm_path():
    from scripts.build_small_models import minilm_path as path
    return path()


SAMPLE = os.path.join(ROOT, "data", "sample")
