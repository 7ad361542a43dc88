"""Split a dialogue jsonl by persona into train / dev / test, with a fixed seed.

    python research/study/split.py DIALOGUES.jsonl --out DIR [--seed 0] [--fractions 0.8 0.1 0.1]

No persona is in two splits (ConvAI2 valid has ~8 dialogue turns per persona, so a split by
line would put the same persona's turns in train and test and reward memorizing it). The
persona is the text between ``persona:`` and ``context:`` of ``question``, stripped. Personas
are sorted, shuffled with ``random.Random(seed)`` and cut by the fractions; each split file
keeps the input lines verbatim and in input order. ``split.json`` records the source, its
sha256, the seed, the fractions and the persona / example counts. Used by research/study/run.py.
"""

import argparse
import hashlib
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.infra.errors import UsageError, data_error  # noqa: E402

SPLITS = ("train", "dev", "test")
_FIX = 'each line must be {"question": "persona: ... context: ...", "answers": [...]}'


def persona_of(question: str) -> str:
    """The persona text of a LAPDOG-format question; ValueError when the markers are missing."""
    start = question.find("persona:")
    end = question.find("context:", start + 1)
    if start < 0 or end < 0:
        raise ValueError("question has no 'persona: ... context:' part")
    return question[start + len("persona:"):end].strip()


def split_counts(n_personas: int, fractions) -> tuple[int, int, int]:
    """Personas per split: dev and test rounded from their fractions (at least 1 each when
    there are 3 or more personas), train gets the rest, so nothing is dropped."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UsageError(f"--fractions: {list(fractions)} — pass three non-negative numbers summing to 1, e.g. 0.8 0.1 0.1")
    dev = round(n_personas * fractions[1])
    test = round(n_personas * fractions[2])
    if n_personas >= 3:
        dev, test = max(dev, 1) if fractions[1] > 0 else 0, max(test, 1) if fractions[2] > 0 else 0
    train = n_personas - dev - test
    if train < 1:
        raise UsageError(f"--fractions: {n_personas} personas leave none for train — lower the dev/test fractions")
    return train, dev, test


def split_by_persona(personas: list[str], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict:
    """{split: [example indices in input order]} for examples whose persona is ``personas[i]``."""
    unique = sorted(set(personas))
    random.Random(seed).shuffle(unique)
    n_train, n_dev, _ = split_counts(len(unique), fractions)
    where = {}
    for rank, p in enumerate(unique):
        where[p] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"
    out = {s: [] for s in SPLITS}
    for i, p in enumerate(personas):
        out[where[p]].append(i)
    return out


def read_dialogue_lines(path: str) -> tuple[list[str], list[str]]:
    """(non-blank lines, their personas); one-line errors for a missing or malformed file."""
    if not os.path.isfile(path):
        raise data_error(path, None, "not found", "pass --data_dir (the folder holding convai2/valid.jsonl) or --dialogues")
    lines, personas = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                personas.append(persona_of(rec["question"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise data_error(path, lineno, f"cannot read the persona ({exc})", _FIX) from None
            lines.append(line if line.endswith("\n") else line + "\n")
    if not lines:
        raise data_error(path, None, "no examples", "pass a non-empty dialogue jsonl")
    return lines, personas


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(dialogues: str, out_dir: str, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict:
    """Write ``out_dir/{train,dev,test}.jsonl`` and ``out_dir/split.json``; return the manifest."""
    lines, personas = read_dialogue_lines(dialogues)
    idx = split_by_persona(personas, seed, fractions)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"source": os.path.abspath(dialogues), "source_sha256": sha256_of(dialogues), "seed": seed,
                "fractions": list(fractions), "rule": "by persona (text between 'persona:' and 'context:')",
                "splits": {}}
    for name in SPLITS:
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i] for i in idx[name])
        manifest["splits"][name] = {"path": os.path.abspath(path), "examples": len(idx[name]),
                                    "personas": len({personas[i] for i in idx[name]})}
    seen = [{personas[i] for i in idx[name]} for name in SPLITS]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), "a persona in two splits"
    with open(os.path.join(out_dir, "split.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def describe(manifest: dict) -> str:
    """``ConvAI2 valid.jsonl split by persona (seed 0): train 6241 ex / 794 personas, ...``."""
    parts = [f"{n} {s['examples']} ex / {s['personas']} personas" for n, s in manifest["splits"].items()]
    return f"{os.path.basename(manifest['source'])} split by persona (seed {manifest['seed']}): " + ", ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dialogues", help="dialogue jsonl (LAPDOG format)")
    p.add_argument("--out", required=True, help="folder for train/dev/test.jsonl and split.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "DEV", "TEST"))
    args = p.parse_args(argv)
    try:
        manifest = write_split(args.dialogues, args.out, args.seed, tuple(args.fractions))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
