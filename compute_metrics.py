"""Metrics of a results file: python compute_metrics.py RESULTS.jsonl [--json]

RESULTS.jsonl has one JSON object per line with a ``generation`` string and either an
``answers`` list (the first answer is the reference) or an ``answer`` string, as written by
evaluate.py --write_results. Prints two blocks: LAPDOG's definitions (BLEU, F1, ROUGE-1/2/L,
Dist-1/2, length ratio, n) and the commonly reported implementations (rouge-score ROUGE-1/2/L
with and without Porter stemming; nltk corpus BLEU-1/2/4, smoothing method1, whitespace
tokens). With --json the last line of stdout is both blocks as one line of JSON (LAPDOG keys
unprefixed, the others prefixed ``rs_`` / ``nltk_``).
Definitions: src/metrics.py. Bad input: ``error: PATH:LINE: ...`` and exit 2.
"""

import argparse
import json
import os
import sys

# Runnable from any directory: the package lives next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from src.errors import UsageError, data_error  # noqa: E402
from src.metrics import compute_metrics, compute_standard_metrics  # noqa: E402

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


def format_table(m: dict) -> str:
    rows = [("BLEU", m["bleu"]), ("F1", m["f1"]), ("ROUGE-1", m["rouge1"]), ("ROUGE-2", m["rouge2"]),
            ("ROUGE-L", m["rougeL"]), ("Dist-1", m["dist1"]), ("Dist-2", m["dist2"])]
    lines = [f"{'metric':<14}{'value':>10}"]
    lines += [f"{name:<14}{value:>10.2f}" for name, value in rows]
    lines.append(f"{'length ratio':<14}{m['length_ratio']:>10.3f}")
    lines.append(f"{'n':<14}{m['n']:>10d}")
    if m.get("rouge_errors"):
        lines.append(f"{'ROUGE errors':<14}{m['rouge_errors']:>10d}  (scored 0)")
    if m.get("empty_predictions"):
        lines.append(f"{'empty preds':<14}{m['empty_predictions']:>10d}  (ROUGE 0)")
    return "\n".join(lines)


def format_standard_table(m: dict) -> str:
    """The rouge-score / nltk block; its own header so nobody mixes it up with LAPDOG's."""
    lines = ["standard implementations (not LAPDOG's definitions):",
             f"{'metric':<14}{'no stem':>10}{'stemmed':>10}"]
    for name, key in (("RS ROUGE-1", "rouge1"), ("RS ROUGE-2", "rouge2"), ("RS ROUGE-L", "rougeL")):
        lines.append(f"{name:<14}{m[f'rs_{key}']:>10.2f}{m[f'rs_{key}_stem']:>10.2f}")
    lines += [f"{name:<14}{m[key]:>10.2f}" for name, key in
              (("nltk BLEU-1", "nltk_bleu1"), ("nltk BLEU-2", "nltk_bleu2"), ("nltk BLEU-4", "nltk_bleu4"))]
    lines.append("(RS = rouge-score 0.1.2, F x100, averaged per example; nltk = corpus_bleu, "
                 "whitespace tokens, SmoothingFunction().method1)")
    return "\n".join(lines)


def results_metrics(generations: list[str], references: list[str]) -> dict:
    """Both blocks in one dict (the --json object); the key sets do not overlap."""
    return {**compute_metrics(generations, references),
            **compute_standard_metrics(generations, references)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", metavar="RESULTS.jsonl", help="results file from evaluate.py")
    parser.add_argument("--json", action="store_true",
                        help="also print the metrics as one JSON line (the last line of stdout)")
    args = parser.parse_args(argv)
    try:
        generations, references = read_results(args.results)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = results_metrics(generations, references)
    print(f"{args.results}")
    print("LAPDOG definitions:")
    print(format_table(metrics))
    print()
    print(format_standard_table(metrics))
    if args.json:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
