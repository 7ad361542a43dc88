"""Model cards: a reader/ or retriever/ folder found alone says how to use it, and its code runs."""

import re
import shutil

import torch

from src.cli import options
from src.infra import provenance
from src.run.model_card import write_model_cards


def checkpoint_like(tmp_path, tiny_models, argv, parts=("reader", "retriever")):
    folder = tmp_path / "step-7"
    for part in parts:
        shutil.copytree(tiny_models[part], folder / part)
    opts = options.validate(options.parse(argv)[0])
    opts.run_info = provenance.run_info(argv)
    return folder, options.to_json_dict(opts)


def card_code(path, folder):
    code = re.search(r"```python\n(.*?)```", path.read_text(), re.S).group(1)
    assert 'folder = "."' in code
    scope = {}
    exec(code.replace('folder = "."', f"folder = {str(folder)!r}"), scope)  # the card's own snippet
    return scope


JOINT = ["--train_data", "t.jsonl", "--passages", "p.jsonl", "--reader_rl_learning", "--use_grpo",
         "--grpo_train_retriever", "--grpo_retriever_group_size", "2", "--text_maxlength", "64",
         "--generation_max_length", "6", "--retriever_maxlength", "32"]


def test_cards_describe_the_checkpoint_and_their_code_runs(tmp_path, tiny_models):
    from src.model.reader import FiDReader
    from src.model.retriever import Retriever, retrieval_scores

    folder, opts = checkpoint_like(tmp_path, tiny_models, JOINT)
    write_model_cards(str(folder), opts, 7, {"eval/valid/f1": 12.5, "eval/valid/recall@1": 3.0})
    reader_md, retriever_md = folder / "reader" / "README.md", folder / "retriever" / "README.md"
    for md in (reader_md, retriever_md):
        text = md.read_text()
        assert "(step 7)" in text and "joint GRPO" in text and "| valid | f1 | 12.5 |" in text
        assert opts["run_info"]["git"]["commit"] in text and "--grpo_train_retriever" in text
    assert "<extra_id_0>" in reader_md.read_text() and "q·p / √H" in retriever_md.read_text()
    assert "mean of the last hidden states" in retriever_md.read_text()

    # the reader snippet (plain T5) replies as the FiD reader does with one story
    scope = card_code(reader_md, folder / "reader")
    reader = FiDReader.from_pretrained(str(folder / "reader")).eval()
    ids, mask = reader.tokenize_inputs([[scope["text"]]], opts["text_maxlength"])
    assert scope["reply"] == reader.generate_text(ids, mask, max_length=opts["generation_max_length"])[0]
    assert scope["text"].startswith("dialog with R's persona: persona:") and "story title: the walk" in scope["text"]

    # the retriever snippet scores as the training code does
    scope = card_code(retriever_md, folder / "retriever")
    retriever = Retriever.from_pretrained(str(folder / "retriever")).eval()
    with torch.no_grad():
        q = retriever.embed_texts(["i like dogs. i am a nurse."], batch_size=1, max_length=32)
        p = retriever.embed_texts(["the walk sam took his dog to the park every morning ."], batch_size=1, max_length=32)
    torch.testing.assert_close(scope["score"], retrieval_scores(q, p))


def test_stage1_card_without_retriever_or_evaluation(tmp_path, tiny_models):
    folder, opts = checkpoint_like(tmp_path, tiny_models, ["--closed_book", "--train_data", "t.jsonl"], parts=("reader",))
    write_model_cards(str(folder), opts, 3)
    text = (folder / "reader" / "README.md").read_text()
    assert "supervised fine-tuning" in text and "closed book, stage 1" in text and "No evaluation" in text
    assert "The input is the prompt alone" in text
    assert not (folder / "retriever").exists()


def test_card_of_a_reader_with_a_copy_head_runs_through_this_repository(tmp_path, tiny_models):
    from src.model.reader import FiDReader

    folder, opts = checkpoint_like(tmp_path, tiny_models, JOINT, parts=())
    FiDReader.from_pretrained(tiny_models["reader"], pointer_generator=True).save_pretrained(str(folder / "reader"))
    write_model_cards(str(folder), opts, 7)
    md = folder / "reader" / "README.md"
    assert "copy head" in md.read_text() and "from src.model.reader import FiDReader" in md.read_text()
    scope = card_code(md, folder / "reader")
    reader = FiDReader.from_pretrained(str(folder / "reader")).eval()
    assert reader.copies
    ids, mask = reader.tokenize_inputs([[scope["text"]]], opts["text_maxlength"])
    assert scope["reply"] == reader.generate_text(ids, mask, max_length=opts["generation_max_length"])[0]
