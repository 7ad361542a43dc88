"""The other speaker's turns as extra training targets (a reader that learns to talk from more text).

A ConvAI2 example holds R's persona, the last turns (``Q: ... R: ... Q: ...``) and R's reply. The
turns Q said are replies too: Q's turn given the turns before it, seen from Q's side (Q's turns
tagged R, R's tagged Q), with no persona (Q's is not in R's data). ``partner_turn_examples`` builds
them from training dialogues only, once each, and drops any whose reply equals a reply of the
evaluation files (so that no dev or test target is trained on).
"""

from src.data.prompts import context_turns, split_persona_context


def _as_question(turns):
    swapped = {"Q": "R", "R": "Q"}
    return "persona:  context:  " + " ".join(f"{swapped[s]}: {t}" for s, t in turns)


def _key(reply):
    return " ".join(reply.lower().split())


def partner_turn_examples(examples, exclude_replies=()):
    """(new examples, statistics): each turn Q said in ``examples``' contexts, once, as
    ``{"question", "answers", "story_id": None, "speaker": "partner"}``, without those whose reply
    equals one of ``exclude_replies`` (after lowercasing and collapsing spaces).

    A turn is seen in several examples' contexts, each keeping only the last turns; it is taken
    from the one that shows the most turns before it (the same persona and words count as the
    same turn), in the order turns are first met."""
    excluded = {_key(r) for r in exclude_replies}
    best = {}  # (persona, turn) -> (turns before it, question)
    for ex in examples:
        persona = split_persona_context(ex["question"])[0]
        turns = context_turns(ex["question"])
        for i, (speaker, text) in enumerate(turns):
            key = (persona, text)
            if speaker == "Q" and (key not in best or i > best[key][0]):
                best[key] = (i, _as_question(turns[:i]))
    out, dropped = [], 0
    for (_, text), (_, question) in best.items():
        if _key(text) in excluded:
            dropped += 1
            continue
        out.append({"question": question, "answers": [text], "story_id": None, "speaker": "partner"})
    return out, {"train": len(examples), "added": len(out), "dropped_equal_to_eval": dropped}
