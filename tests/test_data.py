import os
import random
import time

import pytest
import torch

from src.data.dialogues import load_dialogues, load_passages
from src.data.prompts import (
    DEFAULT_ENCODER_FORMAT,
    DEFAULT_RETRIEVER_FORMAT,
    encoder_inputs,
    pick_answer,
    reader_query,
    reader_target,
    reference_answer,
    retrieval_query,
    retriever_passage_text,
    split_persona_context,
)
from src.data.sampler import ShardedSampler, eval_shard, interleave_results
from src.infra.errors import UsageError

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           os.pardir, "shared", "data")

Q = "persona: i like dogs. i am a nurse. context:  Q: hi ! R: hello . Q: how are you ?"
GOOD_D = '{"question": "persona: i like dogs. context:  Q: hi !", "answers": ["hello ."]}'
GOOD_P = '{"id": "1", "title": "t", "text": "a story ."}'


def write(tmp_path, content, name="f.jsonl"):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


def expect_error(fn, path, line, *words):
    with pytest.raises(UsageError) as info:
        fn(path)
    msg = str(info.value)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(prefix), msg
    rest = msg[len(prefix):]
    assert not rest[:1].isdigit(), msg  # no line number when none was expected
    problem, sep, fix = rest.partition(" — ")
    assert sep and fix.strip(), msg
    for w in words:
        assert w in problem, (w, msg)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- loaders: errors

@pytest.mark.parametrize("loader", [load_dialogues, load_passages])
def test_missing_and_empty_file(tmp_path, loader):
    expect_error(loader, str(tmp_path / "nope.jsonl"), None, "not found")
    expect_error(loader, write(tmp_path, "\n  \n\n"), None, "empty")
    expect_error(loader, write(tmp_path, ""), None, "empty")


@pytest.mark.parametrize("loader,good", [(load_dialogues, GOOD_D), (load_passages, GOOD_P)])
def test_invalid_utf8_json_and_non_object(tmp_path, loader, good):
    bad = (good + "\n\n").encode() + b'{"question": "\xff\xfe"}\n'
    expect_error(loader, write(tmp_path, bad), 3, "UTF-8")
    expect_error(loader, write(tmp_path, good + "\n{not json\n"), 2, "invalid JSON")
    expect_error(loader, write(tmp_path, "[1, 2]\n"), 1, "JSON object", "list")


@pytest.mark.parametrize("line,words", [
    ('{"answers": ["a"]}', ["missing", "question"]),
    ('{"question": "persona: x context: y"}', ["missing", "answers"]),
    ('{"question": "persona: x context: y", "answers": []}', ["answers", "empty"]),
    ('{"question": "persona: x context: y", "answers": "hello"}', ["answers", "list of strings"]),
    ('{"question": "persona: x context: y", "answers": ["a", 3]}', ["answers", "list of strings"]),
    ('{"question": 5, "answers": ["a"]}', ["question", "string"]),
    ('{"question": "context: y", "answers": ["a"]}', ["persona:", "context:"]),
    ('{"question": "persona: x y", "answers": ["a"]}', ["persona:", "context:"]),
    ('{"question": "context: y persona: x", "answers": ["a"]}', ["persona:", "context:"]),
])
def test_dialogue_field_errors(tmp_path, line, words):
    path = write(tmp_path, GOOD_D + "\n" + line + "\n")
    expect_error(load_dialogues, path, 2, *words)


@pytest.mark.parametrize("line,words", [
    ('{"title": "t", "text": "x"}', ["missing", "id"]),
    ('{"id": 3, "title": "t"}', ["missing", "text"]),
    ('{"id": 3, "text": ["x"]}', ["text", "string"]),
    ('{"id": 3, "text": "x", "title": null}', ["title", "string"]),
    ('{"id": 3.5, "text": "x"}', ["id"]),
    ('{"id": true, "text": "x"}', ["id"]),
])
def test_passage_field_errors(tmp_path, line, words):
    path = write(tmp_path, GOOD_P + "\n" + line + "\n")
    expect_error(load_passages, path, 2, *words)


def test_duplicate_passage_id_names_both_lines(tmp_path):
    # int 1 and str "1" are the same id once stringified
    path = write(tmp_path, GOOD_P + '\n{"id": 2, "text": "b"}\n\n{"id": 1, "text": "c"}\n')
    msg = expect_error(load_passages, path, 4, "duplicate", "'1'")
    assert "line 1" in msg


def test_max_passages_validation(tmp_path):
    path = write(tmp_path, GOOD_P + "\n")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="max_passages.* — "):
            load_passages(path, max_passages=bad)


# ----------------------------------------------------------------------------- loaders: success

def test_load_dialogues_keeps_extras(tmp_path):
    path = write(tmp_path, "\ufeff" + GOOD_D + "\n\n"
                 + '{"question": "persona: a. context: b", "answers": ["x", "y"], "story_id": 7}\r\n')
    d = load_dialogues(path)
    assert len(d) == 2
    assert d[0] == {"question": "persona: i like dogs. context:  Q: hi !", "answers": ["hello ."],
                    "_line": 1}
    assert d[1]["story_id"] == 7 and d[1]["_line"] == 3 and d[1]["answers"] == ["x", "y"]


def test_load_passages(tmp_path):
    path = write(tmp_path, '{"id": 5, "text": "s1"}\n{"id": "b", "title": "tt", "text": "s2", "x": 1}\n'
                 '{"id": 7, "text": "s3"}\n')
    p = load_passages(path)
    assert p[0] == {"id": "5", "title": "", "text": "s1"}
    assert p[1]["id"] == "b" and p[1]["title"] == "tt" and p[1]["x"] == 1
    assert [q["id"] for q in load_passages(path, max_passages=2)] == ["5", "b"]
    assert len(load_passages(path, max_passages=10)) == 3


# ----------------------------------------------------------------------------- prompts

def test_prompt_formats():
    assert reader_query("persona: a. context: Q: hi") == \
        "dialog with R's persona: persona: a. context: Q: hi R: <extra_id_0>"
    assert reader_target("i am fine .") == "<extra_id_0> i am fine ."
    assert DEFAULT_ENCODER_FORMAT == "{query} story title: {title} story: {text}"
    assert DEFAULT_RETRIEVER_FORMAT == "{title} {text}"


def test_encoder_inputs():
    ps = [{"id": "1", "title": "the pet", "text": "a {b} story ."},
          {"id": "2", "title": "", "text": "another ."},
          {"id": "3", "text": "third ."}]
    assert encoder_inputs("QQ", None, 3) == ["QQ"]
    assert encoder_inputs("QQ", [], 1) == ["QQ"]
    assert encoder_inputs("QQ", ps, 0) == ["QQ"]
    assert encoder_inputs("QQ", ps, 2) == ["QQ story title: the pet story: a {b} story .",
                                           "QQ story title:  story: another ."]
    assert encoder_inputs("QQ", ps, 3)[2] == "QQ story title:  story: third ."
    assert encoder_inputs("QQ", ps, 1, "{title}|{query}|{text}") == ["the pet|QQ|a {b} story ."]
    with pytest.raises(ValueError):
        encoder_inputs("QQ", ps, 4)
    with pytest.raises(UsageError, match="--encoder_format"):
        encoder_inputs("QQ", ps, 1, "{query} {nope}")


def test_retriever_passage_text():
    assert retriever_passage_text({"title": "the pet", "text": "a story ."}) == "the pet a story ."
    assert retriever_passage_text({"title": "", "text": "a story . "}) == "a story ."
    assert retriever_passage_text({"text": "x"}, "{text} -- {title}") == "x --"


# ----------------------------------------------------------------------------- retrieval queries

def test_split_persona_context():
    assert split_persona_context(Q) == ("i like dogs. i am a nurse.",
                                        "Q: hi ! R: hello . Q: how are you ?")
    with pytest.raises(ValueError):
        split_persona_context("no markers")


def test_join_persona_context_is_the_inverse_of_the_split():
    from src.data.prompts import join_persona_context
    assert join_persona_context(*split_persona_context(Q)) == Q
    assert join_persona_context("i fly.", "Q: hi") == "persona: i fly. context:  Q: hi"


def test_retrieval_query_modes():
    rng = random.Random(0)
    assert retrieval_query(Q, "persona", rng) == "i like dogs. i am a nurse."
    assert retrieval_query(Q, "context", rng) == Q
    assert retrieval_query(Q, "all", rng) == Q
    seen = {retrieval_query(Q, "persona_rand", rng) for _ in range(50)}
    assert seen == {"i like dogs.", "i am a nurse."}
    spaced = "persona: i like dogs . i am a nurse . context: Q: hi"
    assert {retrieval_query(spaced, "persona_rand", rng) for _ in range(50)} == \
        {"i like dogs .", "i am a nurse ."}
    assert retrieval_query("persona: context: Q: hi", "persona_rand", rng) == ""
    a = [retrieval_query(Q, "persona_rand", random.Random(3)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same choice
    with pytest.raises(ValueError):
        retrieval_query(Q, "story", rng)


def test_answers():
    ex = {"question": Q, "answers": ["a", "b", "c"]}
    assert reference_answer(ex) == "a"
    rng = random.Random(1)
    assert {pick_answer(ex, rng) for _ in range(60)} == {"a", "b", "c"}


# ----------------------------------------------------------------------------- sampler

def take(s, k):
    return [s.next_batch() for _ in range(k)]


def test_sampler_order_and_determinism():
    n = 10
    perm0 = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    perm1 = torch.randperm(n, generator=torch.Generator().manual_seed(6)).tolist()
    s = ShardedSampler(n, 4, seed=5)
    flat = sum(take(s, 5), [])
    assert flat == perm0 + perm1  # 20 positions = exactly two epochs, carried across the boundary
    assert s.epoch == 2
    assert take(ShardedSampler(n, 3, seed=5), 7) == take(ShardedSampler(n, 3, seed=5), 7)
    assert take(ShardedSampler(n, 3, seed=5), 4) != take(ShardedSampler(n, 3, seed=6), 4)
    assert sum(take(ShardedSampler(5, 2, shuffle=False), 4), []) == [0, 1, 2, 3, 4, 0, 1, 2]


def test_sampler_wraps_epochs_without_drop_or_duplicate():
    n, bs = 7, 3
    s = ShardedSampler(n, bs, seed=1)
    flat = sum(take(s, 14), [])  # 42 positions = 6 epochs
    for e in range(6):
        epoch_items = flat[e * n:(e + 1) * n]
        assert sorted(epoch_items) == list(range(n))
        assert epoch_items == torch.randperm(n, generator=torch.Generator().manual_seed(1 + e)).tolist()
    # a batch larger than the dataset spans several epochs
    big = ShardedSampler(3, 8, shuffle=False)
    assert big.next_batch() == [0, 1, 2, 0, 1, 2, 0, 1] and big.epoch == 2


def test_sampler_sharding_partitions_global_batches():
    n, bs, world = 11, 2, 2
    ranks = [ShardedSampler(n, bs, rank=r, world=world, seed=3) for r in range(world)]
    single = ShardedSampler(n, bs * world, seed=3)
    per_epoch = []
    for _ in range(11):  # 44 positions = 4 epochs
        parts = [r.next_batch() for r in ranks]
        glob = single.next_batch()
        assert parts[0] + parts[1] == glob
        assert len(parts[0]) == len(parts[1]) == bs
        per_epoch.extend(glob)
    for e in range(4):
        assert sorted(per_epoch[e * n:(e + 1) * n]) == list(range(n))
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_sampler_resume():
    a = ShardedSampler(9, 4, rank=1, world=2, seed=7)
    take(a, 3)
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    assert state["epoch"] == 2 and state["position"] == 6  # 24 positions consumed
    expected = take(a, 5)
    b = ShardedSampler(9, 4, rank=1, world=2, seed=7)
    b.load_state_dict(dict(state))
    assert take(b, 5) == expected and b.epoch == a.epoch
    # a resume with a different world size continues the same global order
    c = ShardedSampler(9, 8, seed=7)
    c.load_state_dict({"epoch": 2, "position": 6})
    assert c.next_batch()[4:] == expected[0]
    with pytest.raises(UsageError, match=" — "):
        ShardedSampler(10, 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError):
        ShardedSampler(9, 4).load_state_dict({"epoch": 0, "position": 9})


def test_sampler_validation():
    with pytest.raises(ValueError):
        ShardedSampler(0, 2)
    with pytest.raises(ValueError):
        ShardedSampler(5, 0)
    with pytest.raises(ValueError):
        ShardedSampler(5, 2, rank=2, world=2)
    s = ShardedSampler(5, 2, shuffle=False)
    assert s.next_batch(3) == [0, 1, 2]


def test_eval_shard_round_trip():
    n, world = 10, 3
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    results = [[f"r{i}" for i in shard] for shard in shards]
    assert interleave_results(results, n) == [f"r{i}" for i in range(n)]
    assert interleave_results([[0, 1]], 2) == [0, 1]
    assert eval_shard(2, 2, 3) == [] and interleave_results([["a"], ["b"], []], 2) == ["a", "b"]
    with pytest.raises(ValueError):
        interleave_results([[1], [2, 3]], 3)


# ----------------------------------------------------------------------------- real data

def test_real_files_load_fast():
    dialogues = os.path.join(SHARED_DATA, "convai2", "valid.jsonl")
    stories = os.path.join(SHARED_DATA, "corpora", "story", "story.jsonl")
    if not (os.path.exists(dialogues) and os.path.exists(stories)):
        pytest.skip("../shared/data absent")
    t0 = time.perf_counter()
    d = load_dialogues(dialogues)
    p = load_passages(stories)
    elapsed = time.perf_counter() - t0
    assert len(d) == 7801
    assert len(p) == 31185
    assert elapsed < 3.0, elapsed
    assert all(isinstance(x["id"], str) for x in p)
    assert len({retrieval_query(x["question"], "persona", None) for x in d}) == 992
    assert len(load_passages(stories, max_passages=100)) == 100


def test_batch_attribute_access_and_missing_attribute():
    from src.run.batch import Batch
    b = Batch(queries=["q"], passages=None)
    assert b.queries == ["q"] and b.passages is None
    with pytest.raises(AttributeError, match="'labels'"):
        b.labels
    assert getattr(b, "labels", "absent") == "absent" and not hasattr(b, "input_ids")


def test_index_and_objectives_embed_the_same_passage_text():
    """build_index formats stories through retriever_passage_text, like the objectives do."""
    from src.data.prompts import retriever_passage_text
    from src.retrieval.index import build_index

    class Recorder:
        hidden_size = 2

        def embed_texts(self, texts, **_):
            self.texts = texts
            return torch.zeros(len(texts), 2)

    passages = [{"id": "1", "title": "", "text": "a b"}, {"id": "2", "title": "t", "text": "c"}]
    r = Recorder()
    build_index(r, passages, retriever_format="{title} | {text}", show_progress=False)
    assert r.texts == [retriever_passage_text(p, "{title} | {text}") for p in passages] == ["| a b", "t | c"]
    with pytest.raises(UsageError, match="^--retriever_format"):
        retriever_passage_text(passages[0], "{")  # malformed, not only unknown placeholders
