"""LAPDOG's gold scores: how useful each retrieved story is to the reader, per --gold_score_mode.

One parameterized path: every mode is a sum of components, each a function of the same inputs
returning [B, K] scores (higher = more useful story). Components that need a reply generated from
one story alone share one greedy generation pass.
"""

import torch
from transformers.modeling_outputs import BaseModelOutput

from src.data.prompts import encoder_inputs
from src.model.reader import dropout_disabled
from src.objectives.rewards import lapdog_gold_scores, scale_tuple, sentence_bleu

# mode -> components whose scores are added
MODES = {
    "ppmean": ("likelihood",), "pdist": ("likelihood",),
    "loop": ("leave_one_out",),
    "emdr": ("sequence_loglik",), "emdr_seq": ("sequence_loglik",),
    "evalnormsum": ("attention",), "adist": ("attention",),
    "bleudist": ("bleu",),
    "bleudist_pdist": ("bleu", "likelihood"),
    "f1rougebleudist": ("f1rougebleu",),
}


class GoldInputs:
    """What every component may need, built once per batch."""

    def __init__(self, reader, queries, passages, labels, references, opts):
        self.reader, self.queries, self.passages = reader, queries, passages
        self.labels, self.references, self.opts = labels, references, opts
        self.B, self.K = len(passages), len(passages[0])
        self._replies = None
        self._single = None

    def single_story_inputs(self):
        """[B*K, 1, L] reader inputs: each query with one story alone (tokenized once per batch)."""
        if self._single is None:
            texts = [encoder_inputs(q, [p], 1, self.opts.encoder_format)
                     for q, plist in zip(self.queries, self.passages) for p in plist]
            self._single = self.reader.tokenize_inputs(texts, self.opts.text_maxlength)
        return self._single

    def repeated_labels(self, times):
        return self.labels.repeat_interleave(times, dim=0)

    def replies(self):
        """The reply generated from each (query, story k) alone, decoded as the original's gold
        scores do: --generation_num_beams, --generation_min_length, --generation_max_length."""
        if self._replies is None:
            ids, mask = self.single_story_inputs()
            dev, o = self.labels.device, self.opts
            self._replies = self.reader.generate_text(ids.to(dev), mask.to(dev), max_length=o.generation_max_length,
                                                      min_length=o.generation_min_length,
                                                      num_beams=o.generation_num_beams)
        return self._replies

    def references_per_story(self):
        return [r for r in self.references for _ in range(self.K)]


def _likelihood(g):
    ids, mask = g.single_story_inputs()
    dev = g.labels.device
    nll = g.reader.loss_per_example(ids.to(dev), mask.to(dev), g.repeated_labels(g.K))
    return -nll.view(g.B, g.K)


def _sequence_loglik(g):
    ids, mask = g.single_story_inputs()
    dev = g.labels.device
    labels = g.repeated_labels(g.K)
    n_tokens = (labels != -100).sum(-1).clamp(min=1)
    nll = g.reader.loss_per_example(ids.to(dev), mask.to(dev), labels)
    return -(nll * n_tokens).view(g.B, g.K)


def _leave_one_out(g):
    if g.K < 2:
        raise ValueError("gold_score_mode=loop needs --retriever_n_context >= 2")
    texts = [encoder_inputs(q, plist[:k] + plist[k + 1:], g.K - 1, g.opts.encoder_format)
             for q, plist in zip(g.queries, g.passages) for k in range(g.K)]
    ids, mask = g.reader.tokenize_inputs(texts, g.opts.text_maxlength)
    dev = g.labels.device
    nll = g.reader.loss_per_example(ids.to(dev), mask.to(dev), g.repeated_labels(g.K))
    # Leaving a useful story out raises the loss of the gold reply.
    return nll.view(g.B, g.K)


def _attention(g):
    """Decoder cross-attention mass on each story's tokens, weighted by the value vectors' norms."""
    texts = [encoder_inputs(q, plist, g.K, g.opts.encoder_format) for q, plist in zip(g.queries, g.passages)]
    ids, mask = g.reader.tokenize_inputs(texts, g.opts.text_maxlength)
    dev = g.labels.device
    return cross_attention_story_scores(g.reader, ids.to(dev), mask.to(dev), g.labels)


# The original's divisor of the summed attention mass (fid.py aggregate_value, "normssum"):
# 256 · n_layers · reply tokens, with 256 a literal constant (not a length of this run).
ORIGINAL_ATTENTION_DIVISOR = 256


def cross_attention_story_scores(reader, input_ids, attention_mask, labels):
    """[B, N] attention × ||value|| mass on each story's tokens, normalized as the original:
    Σ over layers, reply tokens and the story's tokens of the head-mean of attention·||value||,
    divided by 256 · n_layers · reply tokens. With the paper's τ_g the gold distribution is then
    as flat as the original's (the plain layer sum was 256·n_layers times larger: peaked).

    Needs the attention probabilities, which sdpa does not return: eager attention for this pass.
    """
    B, N, L = input_ids.shape
    model = reader.model
    hidden, mask = reader.encode(input_ids, attention_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                    labels=labels, output_attentions=True, return_dict=True,
                    **reader._copy_kwargs(reader.source_ids(input_ids), B))
    finally:
        model.set_attn_implementation(previous)
    tgt = (labels != -100).float()  # [B, T]
    score = torch.zeros(B, N * L, device=hidden.device)
    for block, attn in zip(model.decoder.block, out.cross_attentions):
        cross = block.layer[1].EncDecAttention
        v = cross.v(hidden).view(B, N * L, cross.n_heads, cross.key_value_proj_dim)
        v_norm = v.norm(dim=-1).transpose(1, 2)  # [B, heads, S]
        weighted = (attn * v_norm.unsqueeze(2)).sum(1)  # [B, T, S]
        score += (weighted * tgt.unsqueeze(-1)).sum(1) / (tgt.sum(1, keepdim=True) * cross.n_heads).clamp(min=1)
    n_layers = len(model.decoder.block)
    return (score * mask).view(B, N, L).sum(-1) / (ORIGINAL_ATTENTION_DIVISOR * n_layers)


def _bleu(g):
    scores = [sentence_bleu(h, r) for h, r in zip(g.replies(), g.references_per_story())]
    return torch.tensor(scores, dtype=torch.float32, device=g.labels.device).view(g.B, g.K)


def gold_metric_scale(opts):
    """(a, b, c) weights of (normalized BLEU, F1, ROUGE-L) in the f1rougebleudist gold score.

    LAPDOG's gold score is BLEU/||BLEU|| + F1 + ROUGE-L unless --metric_scale_factors is given.
    The default of opts.metric_scale (bleu 0.01) exists to bring a 0-100 BLEU to the 0-1 range
    in the GRPO reward; the gold score's BLEU is already L2-normalized, so applying that default
    here would scale it twice and all but drop BLEU from the gold score.
    """
    if getattr(opts, "metric_scale_factors", None) is None:
        return (1.0, 1.0, 1.0)
    return scale_tuple(opts.metric_scale)


def _f1rougebleu(g):
    scale = gold_metric_scale(g.opts)
    s = lapdog_gold_scores(g.replies(), g.references_per_story(), scale=scale, scale_rouge=g.opts.scale_rouge)
    return s.to(g.labels.device).view(g.B, g.K)


COMPONENTS = {"likelihood": _likelihood, "sequence_loglik": _sequence_loglik, "leave_one_out": _leave_one_out,
              "attention": _attention, "bleu": _bleu, "f1rougebleu": _f1rougebleu}


@torch.no_grad()
def emdr_token_logprobs(reader, queries, passages, labels, opts):
    """([B, K, T] log_softmax(logits / τ_g) at the gold reply's tokens given the query and story
    k alone, [B, T] mask of real reply tokens): what the original's EMDR² mixes per token."""
    g = GoldInputs(reader, queries, passages, labels, None, opts)
    ids, mask = g.single_story_inputs()
    dev = labels.device
    with dropout_disabled(reader):
        hidden, fmask = reader.encode(ids.to(dev), mask.to(dev))
        logp, _ = reader.token_logprobs(hidden, fmask, g.repeated_labels(g.K), temperature=opts.temperature_gold,
                                        source_ids=reader.source_ids(ids.to(dev)))
    return logp.view(g.B, g.K, -1), labels != -100


@torch.no_grad()
def gold_scores(mode, reader, queries, passages, labels, references, opts):
    """[B, K] gold scores of the K stories of each example (no gradient, dropout off)."""
    g = GoldInputs(reader, queries, passages, labels, references, opts)
    with dropout_disabled(reader):
        return sum(COMPONENTS[c](g) for c in MODES[mode]).float()


@torch.no_grad()
def evidence_scores(reader, queries, passages, labels, fact_mask, opts, chunk=128):
    """[B, K] the reader's evidence for each story: Σ over the target's fact tokens (``fact_mask``
    [B, T], src/model/reader.py:word_mask) of log p(y_t | query, story k alone), dropout off.

    Only the fact tokens count: how likely the rest of the reply is swings by several nats from
    story to story with nothing to do with relevance (measured on the sample data's stage-1
    reader: 24 nats between random stories for "i am good , thanks ."), while a story that holds
    the fact lets the copy head give it most of its probability. Rows without a fact token score
    0 for every story (no reader pass): a reply no story explains says nothing about the stories.
    """
    B, K = len(passages), len(passages[0])
    scores = torch.zeros(B, K, device=labels.device)
    rows = [i for i in range(B) if bool(fact_mask[i].any())]
    if not rows:
        return scores
    texts = [encoder_inputs(queries[i], [p], 1, opts.encoder_format) for i in rows for p in passages[i]]
    rep_labels = labels[rows].repeat_interleave(K, dim=0)
    rep_mask = fact_mask[rows].to(labels.device).repeat_interleave(K, dim=0)
    out = []
    with dropout_disabled(reader):
        for start in range(0, len(texts), chunk):
            ids, mask = reader.tokenize_inputs(texts[start:start + chunk], opts.text_maxlength)
            nll, _ = reader.label_nll(ids.to(labels.device), mask.to(labels.device), rep_labels[start:start + chunk])
            out.append(-(nll * rep_mask[start:start + chunk]).sum(-1))
    scores[rows] = torch.cat(out).view(len(rows), K).float()
    return scores
