"""Contriever-style dense retriever: a BERT encoder with mean pooling over real tokens.

Queries and passages share one encoder (as in Contriever/Atlas/LAPDOG). Scores are
``q·p / sqrt(H)``, the scaling LAPDOG uses for the retriever's training distribution.
"""
import math
import os
import sys

import torch
from tqdm.auto import tqdm

from src.data.dialogues import clip_for_tokenizer
from src.infra.errors import flag_error

_LOAD_FIX = "pass a local folder, e.g. the retriever/ written by scripts/build_small_models.py"


def _quiet_transformers():
    # Loading prints weight/shard progress bars on stderr; they drown the training log.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _looks_like_local_path(name):
    # "facebook/contriever" is a hub id, not a relative folder; these spellings are clearly paths.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") >= 2


class Retriever(torch.nn.Module):
    """A shared query/passage encoder.

    ``encoder`` is a transformers BERT-style ``AutoModel`` without a pooling head (its output has
    ``last_hidden_state`` [B, T, H]); ``tokenizer`` is its tokenizer.
    """

    def __init__(self, encoder, tokenizer):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path="facebook/contriever", gradient_checkpointing=False):
        """Load encoder + tokenizer from a local folder or hub id.

        Raises ``UsageError`` (``--retriever_model_path``) with a one-line reason when it cannot
        be loaded (offline hub id, missing or broken folder).
        """
        from transformers import AutoModel, AutoTokenizer

        _quiet_transformers()
        name = str(name_or_path)
        expanded = os.path.expanduser(name)
        if _looks_like_local_path(name) and not os.path.isdir(expanded):
            raise flag_error("--retriever_model_path",
                             f"cannot load retriever '{name}': no such folder", _LOAD_FIX)
        source = expanded if os.path.isdir(expanded) else name
        try:
            encoder = AutoModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # `from None`: the user needs the one-line reason, not transformers' internal traceback.
            raise flag_error("--retriever_model_path",
                             f"cannot load retriever '{name}': {reason}", _LOAD_FIX) from None
        if not hasattr(encoder, "embeddings"):
            raise flag_error("--retriever_model_path",
                             f"cannot load retriever '{name}': {type(encoder).__name__} is not a "
                             "BERT-style encoder", _LOAD_FIX)
        model = cls(encoder, tokenizer)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def enable_gradient_checkpointing(self):
        """Recompute layer activations in backward (transformers 5 activation-checkpointing API)."""
        # (transformers 5 also hooks the input embeddings to require grad, non-reentrant checkpoint)
        self.encoder.activation_checkpointing_enable()

    def save_pretrained(self, directory):
        """Write the encoder (safetensors, AutoModel parameter names) and the tokenizer."""
        _quiet_transformers()
        os.makedirs(directory, exist_ok=True)
        # transformers 5 always writes model.safetensors (there is no pickle option left).
        self.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def hidden_size(self):
        """H, the embedding dimension."""
        return int(self.encoder.config.hidden_size)

    @property
    def device(self):
        return next(self.encoder.parameters()).device

    def tokenize(self, texts, max_length):
        """``dict(input_ids [B,T] long, attention_mask [B,T] long)`` on CPU; pads to the longest."""
        enc = self.tokenizer(clip_for_tokenizer(list(texts), max_length), padding="longest", truncation=True,
                             max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids, attention_mask):
        """[B,T] ids and mask -> [B,H] mean of the last hidden states over non-padding tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        summed = (hidden * mask).sum(dim=1)
        # clamp: an all-padding row (empty text after truncation) gives 0, not NaN.
        return summed / mask.sum(dim=1).clamp(min=1.0)

    def embed_texts(self, texts, batch_size, max_length, device=None, show_progress=False):
        """Embed ``texts`` -> FloatTensor [N,H] (float32) on ``device`` (default: the model's).

        Runs in eval mode under ``torch.no_grad`` (not inference_mode: callers may later mix these
        tensors into autograd graphs) and restores the previous train/eval mode.
        """
        texts = list(texts)
        model_device = self.device
        device = torch.device(device) if device is not None else model_device
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32, device=device)
        try:
            with torch.no_grad():
                starts = range(0, len(texts), batch_size)
                # no bar where stderr is not a terminal (a redirected log would get every redraw)
                for begin in tqdm(starts, desc="embedding", unit="batch",
                                  disable=not show_progress or not sys.stderr.isatty()):
                    batch = self.tokenize(texts[begin:begin + batch_size], max_length)
                    emb = self(batch["input_ids"].to(model_device),
                               batch["attention_mask"].to(model_device))
                    out[begin:begin + emb.shape[0]] = emb.to(device=device, dtype=torch.float32)
        finally:
            self.train(was_training)
        return out


def retrieval_scores(query_emb, passage_emb):
    """LAPDOG retriever scores ``q·p / sqrt(H)``.

    query_emb [B,H]; passage_emb [B,K,H] (per-query passages) or [K,H] (shared) -> [B,K].
    """
    dim = query_emb.shape[-1]
    if passage_emb.dim() == 3:
        scores = torch.einsum("bh,bkh->bk", query_emb, passage_emb)
    elif passage_emb.dim() == 2:
        scores = query_emb @ passage_emb.transpose(0, 1)
    else:
        raise ValueError(f"passage_emb must be [B,K,H] or [K,H], got shape {tuple(passage_emb.shape)}")
    return scores / math.sqrt(dim)
