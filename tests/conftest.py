"""pytest set-up: the repository on sys.path, offline W&B, the markers, and the shared fixtures.

Markers: ``slow`` (more than ~20 s on a 2-core CPU; ``FAST=1 bash scripts/test.sh`` skips them)
and ``learning`` (a method must learn, by a margin measured on several seeds; also slow)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SAMPLE, TINY_READER, build_tiny_models, load_models, sample_data, tiny_t5  # noqa: E402

from src.model.build import build_reader_tokenizer  # noqa: E402
from src.model.reader import FiDReader  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")
    config.addinivalue_line("markers", "learning: a method must learn (a measured margin on several seeds); slow too")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="session")
def minilm_path():
    from src.model.build import minilm_path as path
    return path()


@pytest.fixture(scope="module")
def lapdog_setup(tiny_models):
    torch.manual_seed(0)
    reader, retriever = load_models(tiny_models)
    _, _, stories = sample_data()
    return reader, retriever, stories[:12]


@pytest.fixture(scope="module")
def tokenizer():
    return build_reader_tokenizer()


@pytest.fixture(scope="module")
def reader(tokenizer):
    return FiDReader(tiny_t5(tokenizer), tokenizer)


@pytest.fixture(scope="session")
def sample_vocab_reader_dir(tmp_path_factory):
    """A tiny random T5 whose vocabulary is the sample data's word pieces (2.8k, not 29.6k)."""
    from src.model.build import build_reader, jsonl_texts

    tok = build_reader_tokenizer(vocab_texts=jsonl_texts([os.path.join(SAMPLE, f) for f in
                                                          ("train.jsonl", "valid.jsonl", "stories.jsonl")]))
    out = str(tmp_path_factory.mktemp("sample_vocab_reader"))
    build_reader(tok, seed=0, **TINY_READER).save_pretrained(out)
    tok.save_pretrained(out)
    return out
