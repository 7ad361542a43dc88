"""Model cards: the README.md of each saved reader/ and retriever/ folder.

A folder found alone (copied out of its checkpoint, uploaded to a hub) says what it is, how to
format its inputs, how the retriever pools and scores, which stage and command made it and the
evaluation at that step, with code that runs on plain transformers (tests/test_model_card.py
executes it).
"""

import argparse
import json
import os
import random

from src.data.prompts import encoder_inputs, reader_query, retrieval_query, retriever_passage_text
from src.objectives.schedule import retriever_trained, training_kind

_EXAMPLE_QUESTION = "persona: i like dogs. i am a nurse. context: Q: hi ! how are you ?"
_EXAMPLE_STORY = {"id": "0", "title": "the walk", "text": "sam took his dog to the park every morning ."}

_STAGES = {
    "sft": "supervised fine-tuning (cross-entropy on the reference reply)",
    "lapdog": "LAPDOG stage 2: reader cross-entropy + the retriever trained toward the gold scores",
    "reinforce": "stage 2: REINFORCE on the reader",
    "grpo": "stage 2: generator GRPO",
    "grpo_joint": "stage 2: joint GRPO of the reader and the retriever",
}


def stage(opts):
    """One line: which training made these weights (`opts`: the dict of options.json)."""
    ns = argparse.Namespace(**opts)
    where = "closed book, stage 1" if ns.closed_book else "with retrieval"
    return f"{_STAGES[training_kind(ns, max(ns.freeze_retriever_steps, 0))]} ({where})"


def _provenance(opts, step):
    info = opts.get("run_info") or {}
    git = info.get("git") or {}
    commit = git.get("commit") or "unknown"
    lines = [f"- Step: {step} of --total_steps {opts.get('total_steps')} (one step = one optimizer update)",
             f"- Training: {stage(opts)}",
             f"- Code: LAPDOG-GRPO at git commit `{commit}`" + (" (uncommitted changes)" if git.get("dirty") else "")]
    if info.get("command"):
        lines.append(f"- Command: `{info['command']}`")
    if info.get("packages"):
        pins = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if k in ("torch", "transformers") and v)
        lines.append(f"- Trained with {pins}")
    lines.append("- All options: `../options.json` in the checkpoint folder (a valid `--config` for train.py)")
    return "\n".join(lines)


def _metrics_table(metrics):
    """Markdown table of {"eval/<name>/<metric>": value}, or a sentence when there is none."""
    if not metrics:
        return "No evaluation was run at this step (see --eval_freq); `evaluate.py` computes one."
    rows = ["| eval set | metric | value |", "|---|---|---:|"]
    for key, value in metrics.items():
        _, name, metric = key.split("/", 2)
        rows.append(f"| {name} | {metric} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {metric} | {value} |")
    return "\n".join(rows) + ("\n\nBLEU, F1 and ROUGE are ×100 (LAPDOG's definitions, README of the repository); "
                              "`reward` is the GRPO reward of the greedy replies.")


def _snippet(example, opts, copies):
    """Python that loads this folder and replies to ``example``: plain transformers, or this
    repository's FiDReader for a reader with a copy head (its pointer is code transformers lacks)."""
    if copies:
        return f"""import sys
sys.path.insert(0, "path/to/lapdog-grpo")  # this repository: the copy head (src/model/pointer.py) is its code
from src.model.reader import FiDReader

folder = "."  # this folder
reader = FiDReader.from_pretrained(folder).eval()
text = {example!r}
ids, mask = reader.tokenize_inputs([[text]], max_length={opts.get('text_maxlength')})
reply = reader.generate_text(ids, mask, max_length={opts.get('generation_max_length')})[0]"""
    return f"""from transformers import AutoTokenizer, T5ForConditionalGeneration

folder = "."  # this folder
tok = AutoTokenizer.from_pretrained(folder)
model = T5ForConditionalGeneration.from_pretrained(folder).eval()
text = {example!r}
ids = tok(text, return_tensors="pt", truncation=True, max_length={opts.get('text_maxlength')})
out = model.generate(**ids, max_length={opts.get('generation_max_length')}, num_beams=1, do_sample=False)
reply = tok.decode(out[0], skip_special_tokens=True)"""


def reader_card(opts, step, metrics, copies=False):
    query = reader_query(_EXAMPLE_QUESTION)
    closed = bool(opts.get("closed_book"))
    fmt = opts.get("encoder_format")
    example = query if closed else encoder_inputs(query, [_EXAMPLE_STORY], 1, fmt)[0]
    n_ctx = 1 if closed else opts.get("n_context")
    beams = opts.get("generation_num_beams") or 1
    decoding = f"with beam search ({beams} beams)" if beams > 1 else "greedily (num_beams 1)"
    inputs = ("The input is the prompt alone (closed book)." if closed else
              f"Each of the top {n_ctx} retrieved stories gets its own encoder input "
              f"`{fmt}` (`{{query}}` the prompt above), truncated to {opts.get('text_maxlength')} tokens "
              "(the story is cut first). Fusion-in-decoder: the inputs are encoded separately and their "
              "encoder states concatenated along the sequence for the decoder; with one story this is "
              "plain T5, as in the code below.")
    pointer = (" with a copy head, `src/model/pointer.py`: it can emit a word of its input by pointing"
               if copies else "")
    return f"""---
library_name: transformers
pipeline_tag: text2text-generation
tags: [lapdog-grpo, t5, fusion-in-decoder, personalized-dialogue]
---

# LAPDOG-GRPO reader (step {step})

A T5 encoder-decoder (`T5ForConditionalGeneration`{pointer}) that writes the next reply of R, the persona
owner of a ConvAI2-style dialogue, optionally reading stories a retriever found for the persona
(LAPDOG, Huang et al., EMNLP 2023, extended with GRPO). Text is lowercased and space-tokenized.

## Input and output format

Prompt: `dialog with R's persona: {{question}} R: <extra_id_0>` where `{{question}}` is
`persona: ... context: Q: ... R: ... Q: ...`. {inputs} The reply is generated at the sentinel:
the target is `<extra_id_0> {{reply}}`, so decode with `skip_special_tokens=True`. Evaluation
decodes {decoding} with max_length {opts.get('generation_max_length')} (counting the decoder start token).

```python
{_snippet(example, opts, copies)}
```

## How it was made

{_provenance(opts, step)}

## Evaluation at this step

{_metrics_table(metrics)}
"""


def retriever_card(opts, step, metrics):
    trained = retriever_trained(argparse.Namespace(**opts))
    origin = ("trained in this run from " if trained else "not trained in this run: a copy of ") + \
        f"`{opts.get('retriever_model_path')}`"
    if opts.get("model_path"):
        origin += " (or the --model_path checkpoint's retriever)"
    fmt = opts.get("retriever_format")
    story = retriever_passage_text(_EXAMPLE_STORY, fmt)
    query = retrieval_query(_EXAMPLE_QUESTION, opts.get("retriever_from"), random.Random(0))
    max_len = opts.get("retriever_maxlength")
    return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags: [lapdog-grpo, contriever, dense-retrieval]
---

# LAPDOG-GRPO retriever (step {step})

A Contriever-style dense retriever: one BERT-style encoder (`AutoModel`) for queries and stories,
{origin}. It retrieves the stories the reader in `../reader/` reads.

## Encoding and scoring

- Embedding: the **mean of the last hidden states over the non-padding tokens** (attention
  mask); no pooler, no normalization. At most {max_len} tokens per text.
- Score of story p for query q: **q·p / √H**, H = the hidden size (the scaling of LAPDOG's
  retriever distribution softmax(score / τ)).
- Query: the dialogue's `--retriever_from {opts.get('retriever_from')}` text (persona: the persona
  sentences; context/all: the whole `persona: ... context: ...` question; persona_rand: one persona sentence).
- Story text: `{fmt}` with the story's title and text, stripped.

```python
import torch
from transformers import AutoModel, AutoTokenizer

folder = "."  # this folder
tok = AutoTokenizer.from_pretrained(folder)
encoder = AutoModel.from_pretrained(folder).eval()

def embed(texts):
    batch = tok(texts, padding="longest", truncation=True, max_length={max_len}, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

q = embed([{query!r}])
p = embed([{story!r}])
score = q @ p.T / q.shape[-1] ** 0.5
```

## How it was made

{_provenance(opts, step)}

## Evaluation at this step

Measured with this retriever and the reader beside it (recall@k: the share of examples whose
relevant story is among the top k, when the data records it):

{_metrics_table(metrics)}
"""


def write_model_cards(folder, opts, step, metrics=None):
    """README.md in `folder`/reader and, when present, `folder`/retriever; `opts` is the dict of
    options.json, `metrics` the evaluation logged at `step` ({"eval/<name>/<metric>": value})."""
    metrics = metrics or {}
    cards = {"reader": reader_card, "retriever": retriever_card}
    for name, card in cards.items():
        sub = os.path.join(folder, name)
        if os.path.isdir(sub):
            extra = {"copies": _has_copy_head(sub)} if name == "reader" else {}
            with open(os.path.join(sub, "README.md"), "w", encoding="utf-8") as f:
                f.write(card(opts, step, metrics, **extra))


def _has_copy_head(reader_dir):
    try:
        with open(os.path.join(reader_dir, "config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("pointer_generator"))
    except (OSError, ValueError):
        return False
