"""LAPDOG's text formats: the reader prompt and target, the fused encoder inputs, the story text
the retriever embeds, retrieval queries from the persona, and the speaker tags of replies."""

import re

from src.infra.errors import flag_error

DEFAULT_ENCODER_FORMAT = "{query} story title: {title} story: {text}"
DEFAULT_RETRIEVER_FORMAT = "{title} {text}"
RETRIEVAL_MODES = ("persona", "context", "all", "persona_rand")


# ----------------------------------------------------------------------------- prompts

def reader_query(question):
    """The reader prompt LAPDOG uses; the answer is generated at the sentinel."""
    return f"dialog with R's persona: {question} R: <extra_id_0>"


def reader_prompt(example):
    """The reader prompt of an example: LAPDOG's for a dialogue; an MLM example (``task`` "mlm",
    src/data/denoising.py) is its corrupted text as it stands, sentinels included."""
    return example["question"] if example.get("task") == "mlm" else reader_query(example["question"])


def reader_target(answer):
    """The reader target (the tokenizer appends EOS)."""
    return f"<extra_id_0> {answer}"


def _passage_fields(passage):
    return passage.get("title", "") or "", passage["text"]


def encoder_inputs(query, passages, n_context, encoder_format=DEFAULT_ENCODER_FORMAT):
    """The n_context fusion-in-decoder encoder inputs (list of str, length n_context).

    Closed book (``passages`` None or empty, or ``n_context`` 0): ``[query]``.
    Raises ValueError if fewer than ``n_context`` passages are given.
    """
    if n_context < 0:
        raise ValueError(f"n_context must be >= 0, got {n_context}")
    if not passages or n_context == 0:
        return [query]
    if len(passages) < n_context:
        raise ValueError(f"n_context={n_context} but only {len(passages)} passages were given")
    out = []
    for passage in passages[:n_context]:
        title, text = _passage_fields(passage)
        try:
            out.append(encoder_format.format(query=query, title=title, text=text))
        except (KeyError, IndexError, ValueError) as exc:
            raise flag_error("--encoder_format", f"unknown placeholder {exc}",
                             "use only {query}, {title} and {text}") from None
    return out


def retriever_passage_text(passage, retriever_format=DEFAULT_RETRIEVER_FORMAT):
    """The text the retriever embeds for a passage (stripped, so an empty title adds no space)."""
    title, text = _passage_fields(passage)
    try:
        return retriever_format.format(title=title, text=text).strip()
    except (KeyError, IndexError, ValueError) as exc:  # ValueError: a malformed string such as "{"
        raise flag_error("--retriever_format", f"bad format string {retriever_format!r} ({exc!r})",
                         "use only the placeholders {title} and {text}") from None


# ----------------------------------------------------------------------------- retrieval queries

def split_persona_context(question):
    """``"persona: P context: C"`` -> ``(P, C)``, both stripped. ValueError without the markers."""
    p = question.find("persona:")
    c = question.find("context:", p + 1) if p >= 0 else -1
    if p < 0 or c < 0:
        raise ValueError(f"question lacks 'persona:' ... 'context:': {question[:80]!r}")
    return question[p + len("persona:"):c].strip(), question[c + len("context:"):].strip()


_TURN = re.compile(r"\b([QR]):\s")


def context_turns(question):
    """[(speaker "Q" or "R", text)] of a question's context, oldest first (turns with no words left out)."""
    parts = _TURN.split(split_persona_context(question)[1])
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2) if parts[i + 1].strip()]


def last_utterance(question):
    """The context's last turn (the words after its last ``Q:`` or ``R:`` tag), or the whole
    context when it has no tag: what a reply answers."""
    turns = context_turns(question)
    return turns[-1][1] if turns else split_persona_context(question)[1]


# A sentence ends at . ! or ? followed by whitespace; ConvAI2 writes both "dogs. i" and "dogs . i",
# and the split keeps whichever period style the data has.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def persona_sentences(persona):
    """The non-empty sentences of a persona text, each keeping its final punctuation."""
    return [s.strip() for s in _SENTENCE_END.split(persona) if s.strip()]


def retrieval_query(question, mode, rng):
    """The retriever's query text for ``--retriever_from`` mode.

    ``persona``: the persona text; ``context`` and ``all``: the whole question (as LAPDOG does);
    ``persona_rand``: one persona sentence drawn with ``rng`` (random.Random); "" if the persona
    is empty.
    """
    if mode == "persona":
        return split_persona_context(question)[0]
    if mode in ("context", "all"):
        return question
    if mode == "persona_rand":
        sentences = persona_sentences(split_persona_context(question)[0])
        return rng.choice(sentences) if sentences else ""
    raise ValueError(f"unknown retrieval mode {mode!r}; expected one of {RETRIEVAL_MODES}")


def pick_answer(example, rng):
    """Training target: one of the example's answers at random (``rng``: random.Random)."""
    return rng.choice(example["answers"])


def reference_answer(example):
    """The reference used by the metrics: the first answer."""
    return example["answers"][0]


# ----------------------------------------------------------------------------- logged rows and replies

def sample_contexts(queries, passage_lists, n_context):
    """One {prompt, story} per reader input, for the logged sample rows: the reader prompt and
    the stories fused into it (title: text, joined by " || "; "" closed book)."""
    lists = passage_lists or [[] for _ in queries]
    return [{"prompt": q, "story": " || ".join(f"{p.get('title') or ''}: {p['text']}".lstrip(": ")
                                               for p in plist[:n_context])}
            for q, plist in zip(queries, lists)]


def strip_speaker(text: str) -> str:
    """Remove every "R:" speaker tag and the surrounding whitespace."""
    return text.replace("R:", "").strip()




# ----------------------------------------------------------------------------- live dialogue (chat.py)

# Punctuation the data writes as its own token ("hi , how are you ?"), except inside a number (3.5, 10,000).
_PUNCT = re.compile(r"(?<!\d)([.,!?;:])|([.,!?;:])(?!\d)")


def normalize_utterance(text):
    """Free text in the data's style: lowercased, punctuation as separate tokens, single spaces
    ("Hi! How are you?" -> "hi ! how are you ?"); apostrophes stay inside their word."""
    return " ".join(_PUNCT.sub(lambda m: f" {m.group(1) or m.group(2)} ", text.lower()).split())


def normalize_persona(sentences):
    """Persona sentences in the data's style: lowercased, single spaces, each ending with its own
    punctuation mark attached ("i have a dog." as ConvAI2 writes them); those without a word dropped."""
    out = []
    for sentence in sentences:
        s = " ".join(sentence.lower().split())
        s = re.sub(r"\s+([.!?])$", r"\1", s)
        if any(c.isalnum() for c in s):  # a sentence of punctuation alone says nothing
            out.append(s if s[-1] in ".!?" else s + ".")
    return out


def dialogue_question(persona, turns, context_turns=3):
    """LAPDOG's question for the next reply of R: ``persona: P context:  Q: ... R: ... Q: ...``.
    ``persona``: normalized sentences; ``turns``: [(speaker "Q" or "R", text)], oldest first, the
    last one Q's; the context keeps the newest ``context_turns`` of them (ConvAI2's keeps 3)."""
    window = turns[-context_turns:] if context_turns > 0 else []
    return join_persona_context(" ".join(persona), " ".join(f"{speaker}: {text}" for speaker, text in window))


def join_persona_context(persona, context):
    """``(P, C)`` -> ``"persona: P context:  C"``: the question format (``split_persona_context``'s inverse)."""
    return f"persona: {persona} context:  {context}"
