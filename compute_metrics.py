"""Metrics of a results file: python compute_metrics.py RESULTS.jsonl [--json]

RESULTS.jsonl has one JSON object per line with a ``generation`` string and either an
``answers`` list (the first answer is the reference) or an ``answer`` string, as written by
evaluate.py --write_results. Prints two blocks: LAPDOG's definitions (BLEU, F1, ROUGE-1/2/L,
Dist-1/2, length ratio, n) and the commonly reported implementations (rouge-score ROUGE-1/2/L
with and without Porter stemming; nltk corpus BLEU-1/2/4, smoothing method1, whitespace
tokens). With --json the last line of stdout is both blocks as one line of JSON (LAPDOG keys
unprefixed, the others prefixed ``rs_`` / ``nltk_``).
Definitions: src/evaluation/metrics.py. Bad input: ``error: PATH:LINE: ...`` and exit 2.
"""

import argparse
import json
import os
import sys

# Runnable from any directory: the package lives next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from src.evaluation.results import read_results, results_metrics  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402


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
