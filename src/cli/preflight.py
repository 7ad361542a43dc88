"""Checks that need no model, run before train.py / evaluate.py write anything.

A mistake found after the models are loaded used to leave run.log, metrics.jsonl, reference/ and
empty checkpoint folders behind, and a later corrected run then picked some of them up. Everything
that can be decided from the options, the data and the files on disk is decided here.
"""

import errno
import logging
import os

from src.infra.errors import flag_error

log = logging.getLogger("lapdog.preflight")


def check_options(opts):
    """Values that options.validate lets through but that fail later with a traceback."""
    if not 0 <= opts.seed < 2 ** 32:
        raise flag_error("--seed", f"must be in [0, 2**32), got {opts.seed}", "pass e.g. --seed 0")
    for flag, fmt, fields in (("--encoder_format", opts.encoder_format, ("query", "title", "text")),
                              ("--retriever_format", opts.retriever_format, ("title", "text"))):
        try:
            fmt.format(**{f: "" for f in fields})
        except (KeyError, IndexError) as exc:
            raise flag_error(flag, f"unknown placeholder {exc} in {fmt!r}",
                             "use only " + ", ".join("{%s}" % f for f in fields)) from None
        except ValueError as exc:
            raise flag_error(flag, f"{fmt!r} is not a valid format string ({exc})",
                             "close every { with } (write {{ and }} for literal braces)") from None
    if opts.reader_rl_learning and opts.generation_max_length < 2:
        raise flag_error("--generation_max_length", f"must be >= 2 with --reader_rl_learning, got "
                         f"{opts.generation_max_length} (it counts the decoder start token)",
                         "pass e.g. --generation_max_length 32")
    if getattr(opts, "dist_timeout", 1) <= 0:
        raise flag_error("--dist_timeout", f"must be > 0 minutes, got {opts.dist_timeout}", "pass e.g. 30")
    if getattr(opts, "max_nonfinite_steps", 1) < 1:
        raise flag_error("--max_nonfinite_steps", f"must be >= 1, got {opts.max_nonfinite_steps}", "pass e.g. 5")
    if getattr(opts, "keep_checkpoints", 0) < 0:
        raise flag_error("--keep_checkpoints", f"must be >= 0, got {opts.keep_checkpoints}", "pass 0 (keep all) or N")
    if opts.closed_book and opts.passages:
        log.warning(f"warning: --passages {opts.passages} is ignored with --closed_book (no retrieval)")


def eval_names(paths):
    """{name: path} for --eval_data, named by basename; two files with one basename would write
    the same result files and metric keys, so that is refused."""
    names = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in names and os.path.abspath(names[name]) != os.path.abspath(path):
            raise flag_error("--eval_data", f"'{names[name]}' and '{path}' have the same name '{name}' "
                             "(their metrics and result files would collide)",
                             "rename or copy one of them")
        names[name] = path
    return names


def check_writable_dir(path, flag):
    """The folder exists and is writable, or can be created: fail now, not after hours of work."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise flag_error(flag, f"cannot create '{path}': '{probe}' is a file, not a folder",
                         "pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise flag_error(flag, f"'{probe}' is not writable", "pass a folder you can write to")
    # os.access ignores read-only mounts for some file systems and root ignores permissions:
    # an existing folder is probed with a real (removed) file.
    if probe == os.path.abspath(path):
        test = os.path.join(probe, f".write-test-{os.getpid()}")
        try:
            with open(test, "w"):
                pass
            os.remove(test)
        except OSError as exc:
            raise flag_error(flag, f"cannot write in '{probe}' ({os.strerror(exc.errno or errno.EIO)})",
                             "pass a folder you can write to") from None


def check_corpus(opts, passages):
    """Enough stories for what one query retrieves (else the first batch fails)."""
    if passages is None:
        return
    needed = max(opts.retriever_n_context, opts.grpo_retriever_pool_size if opts.grpo_train_retriever else 1)
    if len(passages) < needed:
        raise flag_error("--passages", f"the corpus has {len(passages)} stories but {needed} are retrieved per query",
                         "use a larger corpus or lower --retriever_n_context / --grpo_retriever_pool_size")

