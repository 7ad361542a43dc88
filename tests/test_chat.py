"""chat.py: a persona and turns in LAPDOG's format, replies from a checkpoint with the stories read.

Checkpoints here are folders as train.py writes them (reader/ with a copy head, retriever/, the
frozen passage_retriever/ of a query-side run, options.json), built directly from tiny models; a
checkpoint written by train.py itself is chatted with in tests/test_gpu_check.py.
"""

import json
import os
import shutil

import pytest
import torch
from helpers import SAMPLE, TINY_READER, run_script, sample_data

from src.cli import options
from src.data.prompts import (
    dialogue_question,
    encoder_inputs,
    normalize_persona,
    normalize_utterance,
    reader_query,
    retriever_passage_text,
    split_persona_context,
)
from src.model.build import build_reader, build_reader_tokenizer
from src.model.reader import FiDReader
from src.model.retriever import Retriever

PERSONA = "I have a dog named max. I like to read"
N_STORIES = 30


def write_checkpoint(path, tiny_models, flags, retriever=None, passage_retriever=None):
    tok = build_reader_tokenizer()
    build_reader(tok, seed=0, pointer_generator=True, **TINY_READER).save_pretrained(os.path.join(path, "reader"))
    tok.save_pretrained(os.path.join(path, "reader"))
    for name, model in (("retriever", retriever), ("passage_retriever", passage_retriever)):
        if model is not None:
            model.save_pretrained(os.path.join(path, name))
    opts, _ = options.parse(["--train_data", f"{SAMPLE}/train.jsonl", "--text_maxlength", "96", "--retriever_maxlength",
                             "64", "--generation_max_length", "8", *flags])
    with open(os.path.join(path, "options.json"), "w") as fh:
        json.dump(options.to_json_dict(options.validate(opts)), fh)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models):
    """A query-side retrieval checkpoint (its query side moved off the frozen story side) and a
    closed-book stage-1 one."""
    root = tmp_path_factory.mktemp("chat")
    frozen = Retriever.from_pretrained(tiny_models["retriever"])
    query = Retriever.from_pretrained(tiny_models["retriever"])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rag = write_checkpoint(root / "rag", tiny_models, [
        "--train_retriever", "--query_side_retriever_training", "--passages", f"{SAMPLE}/stories.jsonl",
        "--max_passages", str(N_STORIES), "--retriever_n_context", "3", "--n_context", "1",
        "--retriever_model_path", tiny_models["retriever"]], retriever=query, passage_retriever=frozen)
    closed = write_checkpoint(root / "closed", tiny_models, ["--closed_book"])
    return {"rag": rag, "closed": closed, "root": root}


def lines_of(out, prefix):
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_prompt_helpers_write_the_data_format():
    assert normalize_utterance("Hi! How are you? It is 3.5 degrees, I'm fine.") == \
        "hi ! how are you ? it is 3.5 degrees , i'm fine ."
    assert normalize_persona(["I have a dog .", "  i like TEA", "", " . ", "i am a nurse!"]) == \
        ["i have a dog.", "i like tea.", "i am a nurse!"]
    turns = [("Q", "hi !"), ("R", "hello ."), ("Q", "how are you ?"), ("R", "good ."), ("Q", "cool")]
    q = dialogue_question(["i have a dog.", "i like tea."], turns)
    assert q == "persona: i have a dog. i like tea. context:  Q: how are you ? R: good . Q: cool"
    assert split_persona_context(q) == ("i have a dog. i like tea.", "Q: how are you ? R: good . Q: cool")
    assert dialogue_question(["i have a dog."], turns, context_turns=1).endswith("context:  Q: cool")


def test_once_with_stories_from_a_query_side_checkpoint(checkpoints, tiny_models):
    rc, out, err = run_script("chat.py", "--model_path", checkpoints["rag"], "--persona", PERSONA,
                              "--once", "Hi! Do you have pets?", "--show_stories", "2", "--show_prompt")
    assert rc == 0, err
    question = "persona: i have a dog named max. i like to read. context:  Q: hi ! do you have pets ?"
    assert lines_of(out, "persona: ") == ["persona: i have a dog named max. i like to read."]
    assert lines_of(out, "stories: ")[0].startswith(f"stories: {N_STORIES} from ")
    assert lines_of(out, "   (prompt) ") == [f"   (prompt) {question}"]
    (reply,) = lines_of(out, "R: ")
    shown = lines_of(out, "   story ")
    assert len(shown) == 2

    # The stories: the trained query side's persona against the FROZEN side's story embeddings.
    stories = sample_data()[2][:N_STORIES]
    ck = checkpoints["rag"]
    query, frozen = (Retriever.from_pretrained(os.path.join(ck, d)) for d in ("retriever", "passage_retriever"))
    q = query.embed_texts(["i have a dog named max. i like to read."], batch_size=1, max_length=64)
    p = frozen.embed_texts([retriever_passage_text(s) for s in stories], batch_size=64, max_length=64)
    scores, rows = (q @ p.T)[0].topk(2)
    for line, row, score in zip(shown, rows.tolist(), scores.tolist()):
        assert f"(id {stories[row]['id']}, score {score:.3f})" in line and stories[row]["title"] in line
    # The reply: the greedy reply of the reader (copy head) to that prompt fused with the top story.
    reader = FiDReader.from_pretrained(os.path.join(ck, "reader"))
    assert reader.copies
    ids, mask = reader.tokenize_inputs([encoder_inputs(reader_query(question), [stories[rows[0]]], 1)], 96)
    assert reply == "R: " + reader.generate_text(ids, mask, max_length=8)[0]


def test_closed_book_checkpoint_says_so_and_replies(checkpoints, tiny_models):
    rc, out, err = run_script("chat.py", "--model_path", checkpoints["closed"], "--persona", PERSONA, "--once", "hi !")
    assert rc == 0, err
    (line,) = lines_of(out, "closed book: ")
    assert "trained closed book and no --passages was given" in line
    assert len(lines_of(out, "R: ")) == 1 and not lines_of(out, "   story ")
    # the same stage-1 reader with stories given here reads them
    rc, out, err = run_script("chat.py", "--model_path", checkpoints["closed"], "--persona", PERSONA, "--once", "hi !",
                              "--passages", f"{SAMPLE}/stories.jsonl", "--max_passages", "12",
                              "--retriever_model_path", tiny_models["retriever"])
    assert rc == 0, err
    assert not lines_of(out, "closed book") and len(lines_of(out, "   story 1: ")) == 1


def test_interactive_turns_keep_lapdog_context_and_reset(checkpoints):
    rc, out, err = run_script("chat.py", "--model_path", checkpoints["rag"], "--persona", PERSONA, "--show_prompt",
                              "--show_stories", "0", input="hi !\n/reset\nhow are you ?\n\nDo you like dogs?\n/quit\nnever\n")
    assert rc == 0, err
    prompts = [line.split(" context:  ")[1] for line in lines_of(out, "   (prompt) ")]
    replies = [line[3:] for line in lines_of(out, "R: ")]
    assert len(replies) == 3 and not lines_of(out, "   story ")
    assert prompts[0] == "Q: hi !"
    assert prompts[1] == "Q: how are you ?"  # /reset forgot the first exchange
    assert prompts[2] == f"Q: how are you ? R: {replies[1]} Q: do you like dogs ?"
    assert "Q: never" not in out  # /quit ended it


@pytest.mark.parametrize("case", ["empty persona", "persona file missing", "persona file empty", "no persona",
                                  "both personas", "empty once", "no checkpoint", "corpus moved"])
def test_bad_input_is_one_error_line(checkpoints, case, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    moved = tmp_path / "moved"
    shutil.copytree(checkpoints["rag"], moved)
    saved = json.loads((moved / "options.json").read_text())
    (moved / "options.json").write_text(json.dumps({**saved, "passages": str(tmp_path / "gone.jsonl")}))
    ck = ["--model_path", checkpoints["rag"]]
    args, expected = {
        "empty persona": (ck + ["--persona", " . ", "--once", "hi"], "error: --persona: is empty — "),
        "persona file missing": (ck + ["--persona_file", tmp_path / "nope.txt"], "error: --persona_file: no such file"),
        "persona file empty": (ck + ["--persona_file", blank, "--once", "hi"], "error: --persona_file: is empty — "),
        "no persona": (ck + ["--once", "hi"], "error: --persona: is required (or --persona_file) — "),
        "both personas": (ck + ["--persona", "i am", "--persona_file", blank], "error: --persona: and --persona_file"),
        "empty once": (ck + ["--persona", PERSONA, "--once", " "], "error: --once: is empty — "),
        "no checkpoint": (["--model_path", tmp_path / "nope", "--persona", PERSONA], "error: --model_path: "),
        "corpus moved": (["--model_path", moved, "--persona", PERSONA, "--once", "hi"],
                         f"error: {tmp_path / 'gone.jsonl'}: "),
    }[case]
    rc, out, err = run_script("chat.py", *args)
    assert rc == 2, (out, err)
    assert err.strip().splitlines() == [err.strip()] and err.startswith(expected), err
    assert " — " in err and "Traceback" not in err
