"""The models a training run starts from: the reader and retriever (resumed, from --model_path, or
new), the frozen GRPO references, and the frozen passage side of --query_side_retriever_training."""

import copy
import os

from src.infra import distributed, safety
from src.infra.files import make_readable
from src.model.reader import FiDReader
from src.model.retriever import Retriever
from src.run import checkpoint, reference


def load_models(opts, resume_path):
    """(reader, retriever, where from). `latest` in --checkpoint_dir wins over --model_path."""
    retriever = None
    if resume_path:
        reader_path, src_ret = os.path.join(resume_path, "reader"), os.path.join(resume_path, "retriever")
        origin = f"resumed from {resume_path}"
    elif opts.model_path:
        checkpoint.check_model_path(opts.model_path)
        reader_path = os.path.join(opts.model_path, "reader")
        src_ret = None if opts.load_reader_weights_only else os.path.join(opts.model_path, "retriever")
        origin = f"started from {opts.model_path}"
    else:
        reader_path, src_ret, origin = opts.reader_model_type, None, f"new run from {opts.reader_model_type}"
    new_reader = not (resume_path or opts.model_path)  # a checkpoint's reader keeps its own config
    reader = FiDReader.from_pretrained(reader_path, dropout=opts.dropout,
                                       gradient_checkpointing=opts.use_gradient_checkpoint_reader,
                                       pointer_generator=opts.pointer_generator and new_reader)
    if not opts.closed_book:
        path = src_ret if src_ret and os.path.isdir(src_ret) else opts.retriever_model_path
        retriever = Retriever.from_pretrained(path, gradient_checkpointing=opts.use_gradient_checkpoint_retriever)
    return reader, retriever, origin


def reference_models(opts, reader, retriever, info, resumed=False, taken_from="", log=print):
    """Frozen copies taken when stage 2 starts; saved once under {checkpoint_dir}/reference/
    with what they were taken from (src/run/reference.py)."""
    if not opts.use_grpo:
        return None, None
    ref_dir = os.path.join(opts.checkpoint_dir, "reference")
    need_ret = opts.grpo_train_retriever
    current = None if resumed else reference.fingerprints(reader, retriever if need_ret else None)
    reuse, note = reference.decide(ref_dir, taken_from, current, resumed)
    if note:
        log(note)
    if reuse:
        ref_reader = _load_reference(FiDReader, ref_dir, "reader")
        ref_ret = _load_reference(Retriever, ref_dir, "retriever") if need_ret else None
    else:
        ref_reader = copy.deepcopy(reader)
        ref_ret = copy.deepcopy(retriever) if need_ret else None
        distributed.barrier()  # every rank has decided before rank 0 replaces the folder
        if info.is_main:
            reference.clear(ref_dir)
            with checkpoint.writing(os.path.join(ref_dir, "reader")):
                ref_reader.save_pretrained(os.path.join(ref_dir, "reader"))
            if ref_ret is not None:
                with checkpoint.writing(os.path.join(ref_dir, "retriever")):
                    ref_ret.save_pretrained(os.path.join(ref_dir, "retriever"))
            make_readable(ref_dir)
            reference.mark_complete(ref_dir, taken_from, current)
        distributed.barrier()
    for m in (ref_reader, ref_ret):
        if m is not None:
            m.to(info.device).eval().requires_grad_(False)
    return ref_reader, ref_ret


def _load_reference(cls, ref_dir, part):
    """A saved reference, checked as every other loaded model: a damaged file or NaN/inf weights
    are one error line naming the file (they used to surface as skipped steps, then "lower --lr")."""
    folder = os.path.join(ref_dir, part)
    fix = (f"the GRPO references are the weights this run started from: restore {ref_dir} from a backup, or "
           "start a new run in another --checkpoint_dir")
    with checkpoint.reading_models(folder):
        model = cls.from_pretrained(folder)
    safety.check_loaded_weights({part: model}, os.path.join(folder, "model.safetensors"), fix=fix)
    return model


def passage_encoder(opts, resume_path, retriever, info):
    """--query_side_retriever_training: the frozen passage side of the untied retriever, or None.

    It is the retriever as this run started: on resume, and when --model_path is a checkpoint
    that was itself trained query-side, the saved passage_retriever/; else a copy of the retriever
    before any update. Saved in every step-N (evaluate.py embeds the corpus with it).
    """
    if retriever is None or not opts.query_side_retriever_training:
        return None
    source = resume_path or (None if opts.load_reader_weights_only else opts.model_path)
    saved = os.path.join(source, "passage_retriever") if source else None
    if saved and os.path.isdir(saved):
        with checkpoint.reading_models(saved):
            frozen = Retriever.from_pretrained(saved)
        safety.check_loaded_weights({"passage_retriever": frozen}, saved)
    else:
        frozen = copy.deepcopy(retriever)
    return frozen.to(info.device).eval().requires_grad_(False)
