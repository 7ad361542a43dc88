"""Results files (evaluate.py --write_results): reading them, and both metric blocks of their replies."""

import json
import os

from src.evaluation.metrics import compute_metrics, compute_standard_metrics
from src.infra.errors import data_error

_LINE_FIX = ('each line must be one JSON object like '
             '{"generation": "...", "answers": ["..."]} (evaluate.py --write_results writes this)')


def _reference(record, path, lineno):
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
            raise data_error(path, lineno, "'answers' is not a non-empty list of strings", _LINE_FIX)
        return answers[0]
    if "answer" in record:
        if not isinstance(record["answer"], str):
            raise data_error(path, lineno, "'answer' is not a string", _LINE_FIX)
        return record["answer"]
    raise data_error(path, lineno, "no 'answers' (or 'answer') field", _LINE_FIX)


def read_results(path: str) -> tuple[list[str], list[str]]:
    """(generations, references) from a results jsonl; blank lines are skipped."""
    if not os.path.exists(path):
        raise data_error(path, None, "file not found", "check the path of the results file")
    if os.path.isdir(path):
        raise data_error(path, None, "is a directory", "pass the results .jsonl file inside it")
    generations, references = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise data_error(path, lineno, f"invalid JSON ({exc.msg})", _LINE_FIX) from None
                if not isinstance(record, dict):
                    raise data_error(path, lineno, "line is not a JSON object", _LINE_FIX)
                if not isinstance(record.get("generation"), str):
                    raise data_error(path, lineno, "missing or non-string 'generation'", _LINE_FIX)
                generations.append(record["generation"])
                references.append(_reference(record, path, lineno))
    except UnicodeDecodeError:
        raise data_error(path, None, "not UTF-8 text", "pass the .jsonl written by evaluate.py") from None
    except OSError as exc:
        raise data_error(path, None, f"cannot read ({exc.strerror})", "check the file's permissions") from None
    if not generations:
        raise data_error(path, None, "no results in the file", "run evaluate.py with --write_results first")
    return generations, references


def results_metrics(generations: list[str], references: list[str], per_example: dict | None = None) -> dict:
    """Both blocks in one dict (the --json object); the key sets do not overlap. ``per_example``:
    see ``compute_metrics``."""
    return {**compute_metrics(generations, references, per_example),
            **compute_standard_metrics(generations, references)}
