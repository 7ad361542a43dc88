"""Data files, prompt formats, retrieval queries and the deterministic sharded sampler.

Dialogue files (ConvAI2 in LAPDOG's format) and story corpora are JSON lines. Every problem in
a file is reported as ``PATH:LINE: problem — what to do`` (``src.errors.data_error``) so a user
can open the file at the right line; LINE is 1-based and counts blank lines too. A missing or
empty file has no line to point at and is reported as ``PATH: problem — what to do``.
"""

import json
import logging
import os
import re

import torch

from src.errors import UsageError, data_error, flag_error

log = logging.getLogger("lapdog.data")
# A question this long is almost certainly a broken line; it is kept but warned about.
LONG_TEXT_CHARS = 100_000
# No T5 / BERT vocabulary piece is longer than this many characters, so cutting a text at
# max_tokens * TOKEN_CHARS characters before tokenizing leaves the first max_tokens tokens intact
# (and a 20 MB line no longer costs gigabytes in the tokenizer).
TOKEN_CHARS = 64


def clip_for_tokenizer(texts, max_tokens):
    limit = max_tokens * TOKEN_CHARS
    return [t if len(t) <= limit else t[:limit] for t in texts]

DEFAULT_ENCODER_FORMAT = "{query} story title: {title} story: {text}"
DEFAULT_RETRIEVER_FORMAT = "{title} {text}"
RETRIEVAL_MODES = ("persona", "context", "all", "persona_rand")

_DIALOGUE_EXAMPLE = '{"question": "persona: i like dogs. context:  Q: hi !", "answers": ["hello ."]}'
_PASSAGE_EXAMPLE = '{"id": "17", "title": "the pet bug", "text": "oliver was ..."}'


# ----------------------------------------------------------------------------- loading

def _read_json_lines(path, kind, example):
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file.

    The whole file is decoded at once (fast path); only when that fails is the offending line
    located, so a 31k-line corpus costs one decode and one ``json.loads`` per line.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise data_error(path, None, f"{kind} file not found",
                         "check the path (relative paths are resolved from the current directory)")
    if os.path.isdir(path):
        raise data_error(path, None, f"expected a {kind} file (JSON lines) but this is a directory",
                         "pass the .jsonl file inside it")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise data_error(path, line, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x})",
                         "re-save the file as UTF-8") from None
    if text.startswith("\ufeff"):  # editors on Windows add a BOM; json.loads rejects it
        text = text[1:]
    found = False
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        found = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # Some of json's messages end in "at" ("Unterminated string starting at"): no "at at".
            msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
            raise data_error(path, number, f"invalid JSON ({msg} at column {exc.colno})",
                             f"write one JSON object per line, e.g. {example}") from None
        if not isinstance(obj, dict):
            raise data_error(path, number,
                             f"expected a JSON object, found {type(obj).__name__}",
                             f"write one JSON object per line, e.g. {example}")
        yield number, obj
    if not found:
        raise data_error(path, None, f"empty {kind} file (no non-blank lines)",
                         f"write one JSON object per line, e.g. {example}")


def _check_question(path, number, question):
    if not isinstance(question, str):
        raise data_error(path, number,
                         f"'question' must be a string, found {type(question).__name__}",
                         "write it as \"persona: ... context: ...\"")
    p = question.find("persona:")
    if p < 0 or question.find("context:", p) < 0:
        raise data_error(path, number,
                         "'question' must contain 'persona:' followed by 'context:'",
                         "write it as \"persona: i like dogs. context:  Q: hi !\"")


def load_dialogues(path):
    """Load a ConvAI2-format dialogue file.

    Each line: ``{"question": "persona: ... context: ...", "answers": [str, ...]}``; extra
    fields are kept on the dict. Every dict also gets ``_line`` (its 1-based line in the file).
    Raises UsageError on any malformed line.
    """
    examples, empty, long_lines = [], [], []
    for number, obj in _read_json_lines(path, "dialogue", _DIALOGUE_EXAMPLE):
        for key in ("question", "answers"):
            if key not in obj:
                raise data_error(path, number, f"missing field '{key}'",
                                 f"every line needs 'question' and 'answers', e.g. {_DIALOGUE_EXAMPLE}")
        _check_question(path, number, obj["question"])
        answers = obj["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise data_error(path, number, "'answers' must be a list of strings",
                             "write it as [\"reply one\", \"reply two\"]")
        if not answers:
            raise data_error(path, number, "'answers' is empty",
                             "give at least one gold reply, e.g. [\"hello .\"]")
        obj["_line"] = number
        examples.append(obj)
        if not any(a.strip() for a in answers):
            empty.append(number)
        if len(obj["question"]) > LONG_TEXT_CHARS:
            long_lines.append(number)
    if empty:
        log.warning(f"warning: {path}: {len(empty)} example(s) have only empty answers (first: line {empty[0]}); "
                    "they teach the reader to reply nothing — remove them or fill in the reply")
    if long_lines:
        log.warning(f"warning: {path}: {len(long_lines)} question(s) longer than {LONG_TEXT_CHARS} characters "
                    f"(first: line {long_lines[0]}); only their beginning reaches the model (see --text_maxlength)")
    return examples


def load_passages(path, max_passages=None):
    """Load a story corpus: a list of ``{"id": str, "title": str, "text": str}`` (+ extra fields).

    ``id`` (int or str, stored as str) and ``text`` are required; ``title`` defaults to "".
    Ids must be unique. ``max_passages`` keeps only the first N passages (the rest is not read).
    """
    if max_passages is not None:
        if isinstance(max_passages, bool) or not isinstance(max_passages, int) or max_passages < 1:
            raise flag_error("--max_passages", f"must be an integer >= 1, got {max_passages!r}",
                             "give a positive count, or leave it out to load the whole corpus")
    passages = []
    first_line = {}
    for number, obj in _read_json_lines(path, "passage", _PASSAGE_EXAMPLE):
        for key in ("id", "text"):
            if key not in obj:
                raise data_error(path, number, f"missing field '{key}'",
                                 f"every passage needs 'id' and 'text', e.g. {_PASSAGE_EXAMPLE}")
        pid = obj["id"]
        if isinstance(pid, bool) or not isinstance(pid, (int, str)) or pid == "":
            raise data_error(path, number,
                             f"'id' must be a non-empty string or an integer, found {pid!r}",
                             "give every passage a unique id such as \"17\"")
        pid = str(pid)
        if pid in first_line:
            raise data_error(path, number,
                             f"duplicate id {pid!r} (also on line {first_line[pid]})",
                             "give every passage a unique id")
        first_line[pid] = number
        text = obj["text"]
        if not isinstance(text, str):
            raise data_error(path, number, f"'text' must be a string, found {type(text).__name__}",
                             "write the story as one string")
        title = obj.get("title", "")
        if not isinstance(title, str):
            raise data_error(path, number,
                             f"'title' must be a string, found {type(title).__name__}",
                             "write the title as a string, or leave the field out")
        obj["id"] = pid
        obj["title"] = title
        passages.append(obj)
        if max_passages is not None and len(passages) >= max_passages:
            break
    return passages


# ----------------------------------------------------------------------------- prompts

def reader_query(question):
    """The reader prompt LAPDOG uses; the answer is generated at the sentinel."""
    return f"dialog with R's persona: {question} R: <extra_id_0>"


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


# ----------------------------------------------------------------------------- sampling

class ShardedSampler:
    """An infinite, resumable stream of per-rank batches of example indices.

    Epoch e's global order is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``
    (``range(n)`` without shuffle). Each global step consumes the next ``batch_size * world``
    positions of that order, continuing into epoch e+1 when e runs out, so every example is
    seen exactly once per epoch; rank r gets positions ``[r*batch_size, (r+1)*batch_size)`` of
    the step. All ranks hold the same state, which is two ints (epoch, position).
    """

    def __init__(self, n_examples, batch_size, rank=0, world=1, shuffle=True, seed=0):
        if n_examples < 1:
            raise ValueError(f"ShardedSampler needs at least one example, got n_examples={n_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.n_examples = int(n_examples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world = int(world)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._orders = {}

    @property
    def epoch(self):
        """The epoch the next example comes from."""
        return self._epoch

    def _order(self, epoch):
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n_examples, generator=g).tolist()
            else:
                order = list(range(self.n_examples))
            # only the current and the next epoch are ever needed
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def next_batch(self, batch_size=None):
        """This rank's next ``batch_size`` example indices (list of int); advances all ranks' state.

        ``batch_size`` defaults to the one given at construction.
        """
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        start, stop = self.rank * bs, (self.rank + 1) * bs
        need = bs * self.world
        taken = 0
        mine = []
        while taken < need:
            order = self._order(self._epoch)
            chunk = min(need - taken, self.n_examples - self._position)
            # the overlap of this chunk's global positions [taken, taken+chunk) with this rank's slice
            lo, hi = max(start, taken), min(stop, taken + chunk)
            if lo < hi:
                base = self._position - taken
                mine.extend(order[base + lo:base + hi])
            taken += chunk
            self._position += chunk
            if self._position == self.n_examples:
                self._epoch += 1
                self._position = 0
        return mine

    def state_dict(self):
        """Plain ints: ``epoch``, ``position`` (next position in that epoch's order), and
        ``n_examples`` / ``seed`` / ``shuffle`` to catch a resume with different data."""
        return {"epoch": self._epoch, "position": self._position, "n_examples": self.n_examples,
                "seed": self.seed, "shuffle": int(self.shuffle)}

    def load_state_dict(self, state):
        """Continue from ``state`` (from state_dict); the world size and batch size may differ."""
        for key, mine in (("n_examples", self.n_examples), ("seed", self.seed),
                          ("shuffle", int(self.shuffle))):
            if key in state and int(state[key]) != mine:
                raise UsageError(
                    f"the checkpoint's data sampler was saved with {key}={int(state[key])} but this "
                    f"run has {key}={mine} — resume with the same training data, --seed and "
                    f"--shuffle, or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_examples:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position} "
                             f"for {self.n_examples} examples")
        self._epoch, self._position = epoch, position


def eval_shard(n, rank, world):
    """The evaluation indices of one rank: ``[i for i in range(n) if i % world == rank]``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return list(range(rank, n, world))


def interleave_results(per_rank_lists, n):
    """Inverse of eval_shard: ``per_rank_lists[r]`` holds rank r's results in its index order;
    returns the n results in input order."""
    world = len(per_rank_lists)
    if world < 1:
        raise ValueError("interleave_results needs at least one rank's results")
    for r, results in enumerate(per_rank_lists):
        expected = len(range(r, n, world))
        if len(results) != expected:
            raise ValueError(f"rank {r} has {len(results)} results, expected {expected} of n={n}")
    return [per_rank_lists[i % world][i // world] for i in range(n)]
