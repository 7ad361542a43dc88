"""Reading and validating the dialogue and story JSON-lines files.

Every problem in a file is reported as ``PATH:LINE: problem — what to do`` (``src.infra.errors.data_error``)
so a user can open the file at the right line; LINE is 1-based and counts blank lines too. A
missing or empty file has no line to point at and is reported as ``PATH: problem — what to do``."""

import json
import logging
import os

from src.infra.errors import data_error, flag_error

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


_DIALOGUE_EXAMPLE = '{"question": "persona: i like dogs. context:  Q: hi !", "answers": ["hello ."]}'


_PASSAGE_EXAMPLE = '{"id": "17", "title": "the pet bug", "text": "oliver was ..."}'


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
