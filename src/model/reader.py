"""Fusion-in-decoder reader around transformers' ``T5ForConditionalGeneration``.

Shapes: B examples, N passages per example, L tokens per passage input, T target tokens,
R = B·G replies (G samples per example, example-major), d = d_model, V = vocabulary size.

Fusion-in-decoder: each of the B·N (query + passage) inputs is encoded on its own; the encoder
states of one example are concatenated along the sequence ([B, N·L, d]) and the decoder
cross-attends over all of them. Every tensor method works on the device of the model's
parameters; the tokenize methods return tensors on that device.

``max_length`` / ``min_length`` of the generation methods have transformers' meaning for
encoder-decoders (as in the original Atlas/LAPDOG code): they count the decoder start token, so
at most ``max_length - 1`` tokens (EOS included) are produced and returned, and EOS is blocked
until ``min_length - 1`` other tokens have been produced.
"""

import contextlib

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging as hf_logging

from src.data.dialogues import clip_for_tokenizer
from src.infra.errors import flag_error
from src.model import sampling
from src.model.logprobs import linear_token_logprobs, logprobs_without_token, token_logprobs
from src.model.pointer import PointerT5


@contextlib.contextmanager
def dropout_disabled(*modules):
    """Put ``modules`` in eval mode (dropout off) for the block; restore every submodule's own
    ``training`` flag on exit (not just the top-level one: a frozen submodule stays in eval)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _fresh_cache():
    """An empty key/value cache that grows one layer per decoder layer as they run.

    Built from the config, transformers sizes the cache by ``num_layers`` (the encoder's depth,
    T5's ``num_hidden_layers``), so a reader with more decoder than encoder layers fails with an
    IndexError in ``generate``; the lazily grown cache fits any decoder depth and gives the same
    outputs for equal stacks.
    """
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


@contextlib.contextmanager
def _output_projection_removed(model):
    """Within the block ``model(...).logits`` are the decoder states the output projection
    would receive (after the model's own scaling). The projection module is put back on exit;
    its weight (tied to the input embeddings in T5) is never copied, so gradients still reach it
    through whoever uses ``head.weight`` directly."""
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        yield
    finally:
        model.lm_head = head


class FiDReader(torch.nn.Module):
    """A T5 used as a fusion-in-decoder reader, plus its tokenizer (``self.tokenizer``)."""

    def __init__(self, model: T5ForConditionalGeneration, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_pretrained(cls, name_or_path, dropout=None, gradient_checkpointing=False, pointer_generator=False):
        """Load a T5 + tokenizer from a HF id or local folder; ``dropout`` overrides
        ``config.dropout_rate`` when given. A config with ``pointer_generator`` (or
        ``pointer_generator=True``, which adds a freshly initialized head) loads a ``PointerT5``
        (src/model/pointer.py). Raises ``UsageError`` (``--reader_model_type``)."""
        hf_logging.disable_progress_bar()
        name = str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name)
            if dropout is not None:
                config.dropout_rate = float(dropout)
            if pointer_generator:
                config.pointer_generator = True
            model_class = PointerT5 if getattr(config, "pointer_generator", False) else T5ForConditionalGeneration
            model = model_class.from_pretrained(name, config=config)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise flag_error(
                "--reader_model_type",
                f"cannot load reader '{name}': {reason}",
                "pass a local folder such as the reader/ written by scripts/build_small_models.py, "
                "or a checkpoint via --model_path",
            ) from exc
        reader = cls(model, tokenizer)
        if gradient_checkpointing:
            reader.enable_gradient_checkpointing()
        return reader

    def enable_gradient_checkpointing(self):
        """Activation checkpointing on the T5 blocks (non-reentrant, so frozen inputs still work)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers releases before the rename (the GPU machine has 5.17)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def save_pretrained(self, directory):
        """Write model (safetensors) + config + tokenizer into ``directory``."""
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    @property
    def config(self):
        return self.model.config

    @property
    def pad_token_id(self):
        return self.model.config.pad_token_id

    @property
    def eos_token_id(self):
        return self.model.config.eos_token_id

    @property
    def decoder_start_token_id(self):
        return self.model.config.decoder_start_token_id

    @property
    def copies(self):
        """True for a pointer-generator reader: its passes need the encoder input ids."""
        return isinstance(self.model, PointerT5)

    @staticmethod
    def source_ids(input_ids):
        """[B, N, L] encoder input ids -> [B, N·L], aligned with ``encode``'s states."""
        return input_ids.reshape(input_ids.shape[0], -1)

    def _copy_kwargs(self, source_ids, rows):
        """The extra model kwarg of a pointer reader (``{}`` for a plain T5), ids repeated to ``rows``."""
        if not self.copies:
            return {}
        if source_ids is None:
            raise ValueError("this reader has a pointer-generator head: pass source_ids=FiDReader.source_ids(input_ids)")
        if source_ids.shape[0] != rows:
            source_ids = source_ids.repeat_interleave(rows // source_ids.shape[0], dim=0)
        return {"copy_source_ids": source_ids.to(self.device)}

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenization
    def tokenize_inputs(self, inputs, max_length):
        """``inputs``: B lists of N strings each -> ``(input_ids, attention_mask)`` both [B, N, L]
        long; each string truncated to ``max_length`` tokens (EOS kept), padded to the batch max."""
        if not inputs:
            raise ValueError("tokenize_inputs needs at least one example")
        n = len(inputs[0])
        if n == 0 or any(len(x) != n for x in inputs):
            raise ValueError(f"every example needs the same non-zero number of passages; got {[len(x) for x in inputs]}")
        flat = clip_for_tokenizer([s for example in inputs for s in example], max_length)
        enc = self.tokenizer(flat, truncation=True, max_length=max_length, padding="longest",
                             return_tensors="pt")
        shape = (len(inputs), n, enc["input_ids"].shape[1])
        device = self.device
        return (enc["input_ids"].view(shape).to(device), enc["attention_mask"].view(shape).to(device))

    def tokenize_targets(self, targets, max_length):
        """``targets``: B strings -> labels [B, T] long, EOS included (truncated to
        ``max_length`` tokens), -100 at padding."""
        enc = self.tokenizer(clip_for_tokenizer(list(targets), max_length), truncation=True, max_length=max_length,
                             padding="longest", return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return labels.to(self.device)

    def word_mask(self, targets, words, max_length):
        """[B, T] bool over ``tokenize_targets(targets, max_length)``: True at the tokens of the
        space-separated words of ``targets[i]`` that are in ``words[i]`` (a word's pieces all
        count). The fact tokens whose likelihood is the retriever's evidence signal."""
        if len(targets) != len(words):
            raise ValueError(f"{len(targets)} targets but {len(words)} word lists")
        if not self.tokenizer.is_fast:
            raise ValueError("word_mask needs a fast tokenizer (character offsets of each token)")
        texts = clip_for_tokenizer(list(targets), max_length)
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding="longest",
                             return_offsets_mapping=True)
        mask = torch.zeros(len(texts), len(enc["input_ids"][0]), dtype=torch.bool)
        for i, (text, offsets, wanted) in enumerate(zip(texts, enc["offset_mapping"], words)):
            wanted = set(wanted)
            if not wanted:
                continue
            for t, (start, end) in enumerate(offsets):
                if end > start:
                    left = text.rfind(" ", 0, start) + 1
                    right = text.find(" ", start)
                    mask[i, t] = text[left:len(text) if right < 0 else right] in wanted
        return mask.to(self.device)

    def decode(self, ids):
        """[B, T] ids (or list of lists) -> B strings; special tokens skipped, spaces untouched."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------ model passes
    def encode(self, input_ids, attention_mask):
        """[B, N, L] ids and mask -> ``(hidden [B, N·L, d], mask [B, N·L])``: the B·N inputs are
        encoded independently, then each example's N states are concatenated."""
        b, n, length = input_ids.shape
        out = self.model.encoder(input_ids=input_ids.reshape(b * n, length),
                                 attention_mask=attention_mask.reshape(b * n, length), return_dict=True)
        hidden = out.last_hidden_state
        return hidden.reshape(b, n * length, hidden.shape[-1]), attention_mask.reshape(b, n * length)

    def _decoder_pass(self, hidden, mask, labels=None, decoder_input_ids=None, source_ids=None):
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                          labels=labels, decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True,
                          **self._copy_kwargs(source_ids, hidden.shape[0]))

    def forward(self, input_ids, attention_mask, labels):
        """[B, N, L] inputs, [B, T] labels (-100 = ignore) -> the mean token NLL over the
        non-ignored label tokens (a 0-d tensor; transformers' CE loss, without the logits)."""
        nll, valid = self.label_nll(input_ids, attention_mask, labels)
        return nll.sum() / valid.sum()

    def loss_per_example(self, input_ids, attention_mask, labels):
        """[B, N, L] inputs, [B, T] labels -> [B] mean token NLL of each example's labels."""
        nll, valid = self.label_nll(input_ids, attention_mask, labels)
        return nll.sum(1) / valid.sum(1).clamp(min=1)

    def label_nll(self, input_ids, attention_mask, labels):
        """``(nll [B, T] float32, 0 at ignored positions; valid [B, T] bool)``."""
        hidden, mask = self.encode(input_ids, attention_mask)
        logp = self._teacher_forced_logprobs(hidden, mask, labels, source_ids=self.source_ids(input_ids))
        valid = labels != -100
        return -torch.where(valid, logp, torch.zeros_like(logp)), valid

    def _teacher_forced_logprobs(self, hidden, mask, targets, temperature=1.0, eos_blocked=0, source_ids=None):
        """[B, T] float32 log-probs of ``targets`` [B, T] (one per row of ``hidden`` [B, S, d]),
        teacher-forced, logits / ``temperature``; positions of -100 hold junk for the caller's
        mask. The first ``eos_blocked`` positions are scored with EOS removed from the
        distribution (renormalized), as ``sample`` draws them under ``min_length``.
        Differentiable w.r.t. the decoder, the output projection and ``hidden``."""
        targets = targets.to(hidden.device)
        decoder_input_ids = self.model._shift_right(targets)
        head = self.model.lm_head
        n = min(eos_blocked, targets.shape[1])
        eos = torch.full_like(targets[:, :n], self.eos_token_id)
        lean = isinstance(head, torch.nn.Linear) and head.bias is None and not (head._forward_hooks or head._forward_pre_hooks)
        if lean and not self.copies:  # a pointer's log-probs mix in the copy attention: the full logits path
            # The model's own forward (and its pre-head scaling) with the output projection
            # taken out, then projection + log-softmax + gather fused in row chunks: the
            # [B, T, V] logits never exist (see logprobs.linear_token_logprobs). A hooked head
            # (tests bias logits that way) takes the plain path so the hooks still apply.
            with _output_projection_removed(self.model):
                states = self._decoder_pass(hidden, mask, decoder_input_ids=decoder_input_ids).logits
            logp = linear_token_logprobs(states, head.weight, targets, temperature)
            eos_logp = linear_token_logprobs(states[:, :n], head.weight, eos, temperature) if n else None
        else:
            logits = self._decoder_pass(hidden, mask, decoder_input_ids=decoder_input_ids, source_ids=source_ids).logits
            logp = token_logprobs(logits, targets, temperature)
            eos_logp = token_logprobs(logits[:, :n], eos, temperature) if n else None
        if eos_logp is None:
            return logp
        # log p(y | EOS blocked) = log p(y) − log(1 − p(EOS)): one more gather at n positions from
        # the same decoder states instead of a masked [B, n, V] logits copy.
        return torch.cat([logprobs_without_token(logp[:, :n], eos_logp), logp[:, n:]], dim=1)

    # ------------------------------------------------------------------ generation
    def _generation_config(self, **kwargs):
        # An explicit config so a checkpoint's generation_config.json (task prefixes, top_k=50
        # defaults, ...) never changes what greedy/beam/sampling mean here.
        return GenerationConfig(
            decoder_start_token_id=self.decoder_start_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            length_penalty=1.0,
            use_cache=True,
            **kwargs,
        )

    @torch.no_grad()
    def _generate(self, hidden, mask, source_ids=None, **kwargs):
        # transformers expands encoder_outputs in place for num_return_sequences > 1, so a fresh
        # BaseModelOutput is built on every call to keep the caller's tensors intact. It expands
        # the pointer's copy_source_ids with them (as every tensor model kwarg).
        out = self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            generation_config=self._generation_config(**kwargs),
            cache=_fresh_cache(),
            **self._copy_kwargs(source_ids, hidden.shape[0]),
        )
        # Drop the decoder start token; everything after the first EOS becomes pad.
        return self._pad_after_eos(out[:, 1:])

    def _pad_after_eos(self, ids):
        eos = (ids == self.eos_token_id).long()
        after = (eos.cumsum(1) - eos) > 0
        return ids.masked_fill(after, self.pad_token_id)

    def generate(self, input_ids, attention_mask, max_length, min_length=0, num_beams=1, no_repeat_ngram=0,
                 repetition_penalty=1.0, temperature=0.0, top_p=1.0):
        """[B, N, L] inputs -> [B, T] reply ids (no decoder start token, pad after EOS, T <
        ``max_length``): greedy when ``num_beams`` == 1 else beam search; length_penalty 1;
        ``no_repeat_ngram`` n > 0: no n-gram of tokens twice in a reply (transformers' blocking);
        ``repetition_penalty`` > 1: the logit of every token already in the reply is divided by it
        (multiplied where negative: CTRL's penalty, as transformers applies it); ``temperature`` > 0:
        sampling from softmax(logits / temperature) (no top-k cut-off), ``top_p`` < 1 its nucleus,
        with torch's global RNG (greedy and beam search ignore both)."""
        hidden, mask = self.encode(input_ids, attention_mask)
        return self.generate_from_states(hidden, mask, max_length, min_length=min_length, num_beams=num_beams,
                                         source_ids=self.source_ids(input_ids), no_repeat_ngram=no_repeat_ngram,
                                         repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p)

    def generate_from_states(self, hidden, mask, max_length, min_length=0, num_beams=1, source_ids=None,
                             no_repeat_ngram=0, repetition_penalty=1.0, temperature=0.0, top_p=1.0):
        """Like ``generate`` but from cached encoder states ``hidden`` [B, S, d], ``mask`` [B, S]
        (``source_ids`` [B, S]: the encoder input ids, needed by a pointer reader only)."""
        if temperature < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
            raise ValueError(f"decoding needs temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0; got "
                             f"{temperature}, {top_p}, {repetition_penalty}")
        if temperature > 0 and num_beams > 1:
            raise ValueError("sampling (temperature > 0) and beam search (num_beams > 1) do not combine: pick one")
        sampled = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        return self._generate(hidden, mask, source_ids=source_ids, max_length=max_length, min_length=min_length,
                              num_beams=num_beams, num_return_sequences=1, no_repeat_ngram_size=no_repeat_ngram,
                              repetition_penalty=repetition_penalty, **sampled)

    def generate_text(self, input_ids, attention_mask, max_length, **decoding):
        """``decode(generate(...))``: B reply strings (``decoding``: ``generate``'s keyword options)."""
        with torch.no_grad():
            ids = self.generate(input_ids, attention_mask, max_length, **decoding)
        return self.decode(ids)

    @torch.no_grad()
    def sample(self, hidden, mask, num_samples, max_length, temperature=1.0, top_p=1.0, min_length=0,
               source_ids=None):
        """Sample ``num_samples`` replies per example from cached encoder states (``hidden``
        [B, S, d], ``mask`` [B, S]; the encoder is not re-run) -> [B·num_samples, T] ids,
        example-major (b0s0, b0s1, ..., b1s0, ...), no decoder start token, pad after the first
        EOS, T < ``max_length``. Uses torch's global RNG. No top-k cut-off; ``top_p`` < 1 enables
        nucleus sampling (``src.sampling.nucleus``).

        Our own decoding loop over the model's key/value cache rather than ``generate``: each
        step draws its tokens by inverse CDF (``src.sampling.categorical``), which on CPU is
        about twice as fast as generate's multinomial at a 30k vocabulary. The tokens' law is the
        same: softmax(logits / temperature), EOS blocked before ``min_length``. ``source_ids`` [B, S]:
        the encoder input ids, needed by a pointer reader only.
        """
        if temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        if max_length < 2:
            raise ValueError(f"max_length counts the decoder start token and must be >= 2, got {max_length}")
        hidden = hidden.detach().repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        encoder_outputs = BaseModelOutput(last_hidden_state=hidden)
        cache = _fresh_cache()
        rows = hidden.shape[0]
        copy = self._copy_kwargs(source_ids, rows)
        token = torch.full((rows, 1), self.decoder_start_token_id, dtype=torch.long, device=hidden.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=hidden.device)
        out = []
        for step in range(max_length - 1):
            logits = self.model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=token,
                                cache=cache, use_cache=True, return_dict=True, **copy).logits[:, -1].float()
            if temperature != 1.0:
                logits = logits / temperature
            if step + 1 < min_length:  # min_length counts the start token, as in transformers
                logits[:, self.eos_token_id] = float("-inf")
            probs = sampling.nucleus(torch.softmax(logits, dim=-1), top_p)
            token = sampling.categorical(probs).masked_fill_(finished, self.pad_token_id).unsqueeze(1)
            out.append(token)
            finished |= token.squeeze(1) == self.eos_token_id
            if finished.all():
                break
        return self._pad_after_eos(torch.cat(out, dim=1))

    def token_logprobs(self, hidden, mask, targets, temperature=1.0, min_length=0, source_ids=None):
        """Teacher-forced log-probabilities of replies ``targets`` [R, T] (R a multiple of B,
        example-major as ``sample`` returns them) given ``hidden`` [B, S, d] / ``mask`` [B, S]
        -> ``(logp [R, T] float32, token_mask [R, T] float32)``. One decoder pass over all R
        replies, logits divided by ``temperature``; token_mask is 1 up to and including the
        first EOS (and 0 at -100 label padding, so tokenized gold labels work too).
        ``min_length`` (counting the start token, as in ``sample``): the first min_length − 1
        positions are scored with EOS blocked, i.e. under the distribution ``sample`` drew
        them from (their targets are never EOS). Differentiable w.r.t. the decoder and ``hidden``.
        ``source_ids`` [B, S]: the encoder input ids, needed by a pointer reader only."""
        b, r = hidden.shape[0], targets.shape[0]
        if r % b:
            raise ValueError(f"{r} replies is not a multiple of {b} examples")
        if r != b:
            hidden = hidden.repeat_interleave(r // b, dim=0)
            mask = mask.repeat_interleave(r // b, dim=0)
        targets = targets.to(hidden.device)
        logp = self._teacher_forced_logprobs(hidden, mask, targets, temperature, eos_blocked=max(min_length - 1, 0),
                                             source_ids=source_ids)
        return logp, self.reply_mask(targets)

    def reply_mask(self, targets):
        """[R, T] float: 1 up to and including each row's first EOS, 0 after it and at -100."""
        eos = (targets == self.eos_token_id).long()
        return (((eos.cumsum(1) - eos) == 0) & (targets != -100)).float()
