"""Content fingerprints, so that saved artefacts (GRPO references, passage indexes) can say what
they were made from and a mismatch is caught instead of silently used."""

import hashlib

import torch


def weights(model):
    """SHA-256 over parameter names, dtypes, shapes and bytes (about 1 s per GB on a CPU)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def corpus(passages):
    """SHA-256 over every story's id, title and text, in order (row i of an index is story i)."""
    h = hashlib.sha256()
    for p in passages:
        for field in (p.get("id"), p.get("title"), p.get("text")):
            h.update(str(field).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()
