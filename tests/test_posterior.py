"""The posterior story of a reply (src/data/posterior.py) and its use in supervised reader batches."""

import json
import math
import os

from src.data.posterior import PosteriorStories

STORIES = [
    {"id": "a", "title": "the dog", "text": "the lee family has a dog named max ."},
    {"id": "b", "title": "the dog", "text": "the kim family has a dog named rex ."},
    {"id": "c", "title": "the car", "text": "the kim family drives a red honda ."},
]


def test_idf_weighted_overlap_by_hand():
    post = PosteriorStories(STORIES)
    # idf over 3 stories: "max" 1 story -> log 3; "dog" 2 -> log 1.5; "the"/"family"/"a" 3 -> 0
    assert math.isclose(post.idf["max"], math.log(3))
    assert math.isclose(post.idf["dog"], math.log(1.5))
    assert post.idf["the"] == 0.0
    s = post.scores("his name is max , he is a good dog")
    assert math.isclose(s[0], math.log(3) + math.log(1.5))
    assert math.isclose(s[1], math.log(1.5))
    assert 2 not in s  # shares only zero-idf words
    assert post.best("his name is max")["id"] == "a"
    assert post.best("i drive a honda")["id"] == "c"
    assert post.best("kim")["id"] == "b"  # tie between b and c goes to the earlier row
    assert post.best_row("hello there") == 0  # nothing informative in common


def test_posterior_finds_the_relevant_story_on_sample_data_without_labels():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stories = [json.loads(line) for line in open(os.path.join(root, "data", "sample", "stories.jsonl"))]
    rows = [json.loads(line) for line in open(os.path.join(root, "data", "sample", "train.jsonl"))]
    post = PosteriorStories(stories)
    facts = [r for r in rows if r.get("story_id") is not None]
    hits = sum(post.best(r["answers"][0])["id"] == r["story_id"] for r in facts)
    # Measured 0.442 (629 of 1,423); a random story would be right 1/288 of the time. The misses
    # are mostly stories that hold the same fact word (an equally good story to copy from).
    assert hits / len(facts) > 0.40


def test_fact_swap_replaces_the_shared_fact_everywhere_and_leaves_chit_chat_alone():
    import random

    from src.data.posterior import FactSwap

    stories = [{"id": str(i), "title": "the dog", "text": f"the family has a dog named pet{chr(97 + i)} . thanks to it ."}
               for i in range(26)]
    # "thanks" is in every story (idf 0); "fine" is in one story but in most dialogues: chit-chat,
    # never swapped.
    stories[0]["text"] += " fine ."
    dialogues = ["Q: hi R: i am fine"] * 40 + ["Q: dog name ? R: petd"]
    post = PosteriorStories(stories)
    swap = FactSwap(post, dialogues)
    assert "petd" in swap.facts and "fine" not in swap.facts and "thanks" not in swap.facts
    question = "persona: i have a dog. context: Q: is it petd ? R: yes . Q: name ?"
    story = post.best("his name is petd .")
    assert story["id"] == "3"
    q2, r2, s2 = swap(question, "his name is petd .", story, random.Random(0))
    new = r2.split()[3]
    assert new != "petd" and new in swap.facts
    assert r2 == f"his name is {new} ." and f"is it {new} ?" in q2
    assert s2["text"] == story["text"].replace("petd", new) and story["text"].count("petd") == 1  # original intact
    assert swap(question, "i am fine", post.best("i am fine"), random.Random(0))[1] == "i am fine"


def test_reading_probe_reports_the_three_fusions(tiny_models):
    from src.evaluation.reading import probe

    res = probe(os.path.dirname(tiny_models["reader"]), os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "data", "sample"), batch_size=64)
    assert res["n"] == 135  # valid examples with a relevant story
    assert set(res) == {"relevant", "same_topic", "random", "n", "fact_copy_rate", "n_swapped"}
    assert all(0 <= res[k]["reward"] <= 3 and 0 <= res[k]["f1"] <= 100 for k in ("relevant", "same_topic", "random"))
    assert 100 < res["n_swapped"] <= 135 and 0 <= res["fact_copy_rate"] <= 1


def test_reading_probe_fact_copy_rate_is_one_for_a_copier_and_zero_for_a_constant(tiny_models, monkeypatch):
    """A 'reader' whose reply is its whole input copies every swapped fact; a constant one none."""
    from src.evaluation import reading as reading_probe
    from src.model.reader import FiDReader

    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")
    ckpt = os.path.dirname(tiny_models["reader"])
    monkeypatch.setattr(FiDReader, "generate_text",
                        lambda self, ids, mask, **kw: self.decode(ids[:, 0]))
    assert reading_probe.probe(ckpt, sample, batch_size=64, max_examples=40)["fact_copy_rate"] == 1.0
    monkeypatch.setattr(FiDReader, "generate_text", lambda self, ids, mask, **kw: ["his name is max ."] * len(ids))
    assert reading_probe.probe(ckpt, sample, batch_size=64, max_examples=40)["fact_copy_rate"] == 0.0


def test_knowledge_words_are_rare_in_stories_and_in_dialogues():
    from src.data.posterior import FactSwap, KnowledgeWords

    stories = STORIES + [{"id": str(i), "title": "", "text": f"filler story {i} thanks ."} for i in range(17)]
    # 20 stories: "max"/"rex"/"honda"/"red" are in 1 (idf log 20 >= log 1/0.05), "dog" in 2 (not rare enough:
    # df 0.1 > 0.05); "thanks" is in most stories. "always" is rare in stories but in 2 of 40 dialogues (> 3%),
    # "max" in 1 of 40 (2.5%).
    dialogues = ["hi , how are you ?"] * 38 + ["i always walk max", "i always drive"]
    words = KnowledgeWords(PosteriorStories(stories), dialogues)
    assert words("his name is max , he is a good dog") == ["max"]
    assert words("i always drive a red honda") == ["honda", "red"]
    assert words("thanks , i am good") == [] and "always" not in words
    # FactSwap swaps exactly these words
    assert FactSwap(PosteriorStories(stories), dialogues).facts == words.words
