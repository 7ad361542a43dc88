"""A copy (pointer-generator) head for the T5 reader: it can emit a word of its input by pointing.

Why: replies on the sample data need a fact (a pet's name, a city) that only the fused story holds.
A pretrained T5 copies such words from its input readily; the small T5s trained from scratch here
do not learn to within a quickstart's budget (measured: fact copy rate 0.015 after 2,400 stage-1
steps, README "Why, measured"), and without copying no reward can tell the relevant story from
its same-topic siblings. A pointer makes copying a single learned attention instead of a
key-value circuit that must form inside the network (See et al., 2017, "Get To The Point").

Per decoder position t, with decoder state h_t, encoder states e_s (FiD: all passages of the
example concatenated), source token ids x_s and the T5's own logits z_t:

    a_ts = softmax_s( (W_q h_t) · (W_k e_s) / √d )        over the unpadded source positions
    g_t  = σ(w_g · h_t + b_g)                              probability of generating
    p_t(w) = g_t · softmax(z_t)(w) + (1 − g_t) · Σ_{s: x_s = w} a_ts

``PointerT5`` returns log p_t as its ``logits``: a normalized log-distribution, so softmax,
log_softmax, temperature (log p / τ), argmax and beam search all keep their meaning, and every
caller that scores or samples tokens from ``logits`` needs no change. It needs the source ids:
pass ``copy_source_ids`` [B, S] (the encoder input ids, FiD-flattened like the states) to every
forward. Off by default: a reader gets the head only when its config says ``pointer_generator``.
"""

import math

import torch
from transformers import T5ForConditionalGeneration
from transformers import initialization as hf_init


def copy_mixture_logprobs(logits, gate_logit, attention, source_ids):
    """log p(w) = log[σ(gate) · softmax(logits)(w) + (1 − σ(gate)) · Σ_{s: source_ids_s = w} attention_s].

    logits [B, T, V]; gate_logit [B, T, 1]; attention [B, T, S] (rows sum to 1 over the
    unpadded source); source_ids [B, S] long in [0, V). Returns [B, T, V] float32; every entry is
    finite (the generator's share is positive wherever softmax does not underflow, and a floor of
    float32's smallest normal keeps log finite where it does)."""
    if source_ids.shape != (attention.shape[0], attention.shape[2]):
        raise ValueError(f"source_ids {tuple(source_ids.shape)} do not match attention {tuple(attention.shape)}")
    gate = torch.sigmoid(gate_logit.float())
    vocab = torch.softmax(logits.float(), dim=-1)
    copied = torch.zeros_like(vocab).scatter_add_(
        -1, source_ids[:, None, :].expand(-1, attention.shape[1], -1), attention.float())
    mixed = gate * vocab + (1.0 - gate) * copied
    return mixed.clamp_min(torch.finfo(torch.float32).tiny).log()


class PointerHead(torch.nn.Module):
    """The copy attention and the generate/copy gate (``d_model`` in, no other state)."""

    def __init__(self, d_model):
        super().__init__()
        self.query = torch.nn.Linear(d_model, d_model, bias=False)
        self.key = torch.nn.Linear(d_model, d_model, bias=False)
        self.gate = torch.nn.Linear(d_model, 1)

    def reset_parameters(self, module=None):
        """Scaled-normal projections (std 1/√d: unit-variance scores at init) and a zero gate
        (generate and copy equally likely before training); only ``module`` (one of the head's
        Linears) when given. transformers' init functions, which stay live while
        ``from_pretrained`` has torch's own patched to no-ops."""
        for lin in (self.query, self.key, self.gate) if module is None else (module,):
            if lin is self.gate:
                hf_init.zeros_(lin.weight)
                hf_init.zeros_(lin.bias)
            else:
                hf_init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))

    def forward(self, decoder_states, encoder_states, encoder_mask, source_ids, logits):
        d = decoder_states.shape[-1]
        # (W_q h)·(W_k e) = ((W_q h) W_k)·e: the key projection moves to the decoder side, so a
        # decoding step costs T·d² instead of S·d² (S ≈ 150 source tokens per story, T = 1).
        scores = (self.query(decoder_states) @ self.key.weight) @ encoder_states.transpose(1, 2) / math.sqrt(d)
        scores = scores.float().masked_fill(~encoder_mask.bool()[:, None, :], float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        return copy_mixture_logprobs(logits, self.gate(decoder_states), attention, source_ids)


class PointerT5(T5ForConditionalGeneration):
    """``T5ForConditionalGeneration`` whose ``logits`` are the pointer-generator's log p (above).

    Every forward needs ``copy_source_ids`` [B, S], the ids whose encoder states are
    ``encoder_outputs`` (``generate`` passes model kwargs through and expands them with the beams
    and samples, as it does the attention mask). With ``labels`` the loss is the mean NLL of the
    mixture (ignore index -100), as T5's own is of its softmax."""

    def __init__(self, config):
        super().__init__(config)
        self.pointer = PointerHead(config.d_model)
        self.pointer.reset_parameters()

    def _init_weights(self, module):
        # transformers initializes weights missing from a checkpoint (e.g. a pretrained t5-small
        # given --pointer_generator) through this hook, one module at a time, skipping modules
        # without parameters of their own: the head's Linears are dispatched to the head's init
        # (T5's generic one would give them std 1.0).
        head = getattr(self, "pointer", None)
        if head is not None and any(module is m for m in head.children()):
            head.reset_parameters(module)
        else:
            super()._init_weights(module)

    def forward(self, *args, copy_source_ids=None, labels=None, attention_mask=None, encoder_outputs=None, **kwargs):
        if copy_source_ids is None:
            raise ValueError("a pointer-generator reader needs copy_source_ids (the encoder input ids) on every forward")
        if encoder_outputs is None:
            raise ValueError("PointerT5 is called with precomputed encoder_outputs (the FiD reader encodes first)")
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        if labels is not None and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = self._shift_right(labels)
        out = super().forward(*args, attention_mask=attention_mask, encoder_outputs=encoder_outputs,
                              output_hidden_states=True, return_dict=True, **kwargs)
        encoder_states = encoder_outputs[0]
        mask = attention_mask if attention_mask is not None else torch.ones(
            encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
        out.logits = self.pointer(out.decoder_hidden_states[-1], encoder_states, mask,
                                  copy_source_ids.to(encoder_states.device), out.logits)
        out.decoder_hidden_states = None
        out.encoder_hidden_states = None
        if labels is not None:
            valid = labels != -100
            picked = out.logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.loss = -(picked * valid).sum() / valid.sum().clamp(min=1)
        return out
