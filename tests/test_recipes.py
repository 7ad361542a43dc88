"""Every method's flags live in its recipe file (configs/): the quickstart, the stage scripts, the
GPU check and the study resolve each method to exactly the values of its recipe.

A command may add what a recipe leaves out (data, models, steps, batch, seed, lengths) and may set
what goes with the model's size: the optimizer schedule (`SCHEDULE`: the stage scripts run the
original's t5-base / t5-xl values) and the sizes a study arm declares (its pool). Anything else set
after `--config` would silently change the method a result is reported under."""

import importlib.util
import os
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from helpers import ENV, ROOT

from research.study import plan as study_plan
from src.cli import options

SCHEDULE = {"lr", "scheduler", "warmup_steps"}


def resolve(argv):
    """train.py's options for its command line (recipe paths relative to the repository)."""
    argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]
    return options.parse(argv)[0]


def assert_follows_recipe(argv, allowed=(), where=""):
    recipe = argv[argv.index("--config") + 1]
    with open(os.path.join(ROOT, recipe)) as f:
        keys = yaml.safe_load(f)
    expected, got = resolve(["--config", recipe, "--train_data", "x"]), resolve(argv)
    changed = {k: (getattr(expected, k), getattr(got, k)) for k in keys
               if k not in allowed and getattr(expected, k) != getattr(got, k)}
    assert not changed, f"{where}: overrides {recipe} (recipe value, command value): {changed}"
    return recipe


def recorded(tmp_path, script, env):
    """The train.py command lines a shell script runs, recorded by a stand-in interpreter."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$CALLS"\necho "----" >> "$CALLS"\n')
    fake.chmod(0o755)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], cwd=ROOT, capture_output=True, text=True,
                       env={**ENV, "PYTHON": str(fake), "CALLS": str(log), **env}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("----\n") if c.strip()]
    return [c[c.index("train.py") + 1:] for c in calls if "train.py" in c]


def test_the_study_runs_every_arm_and_stage1_as_its_recipe():
    paths = {k: f"p/{k}" for k in ("train", "dev", "test", "stories", "index", "retriever", "reader", "reader_init")}
    for scale in ("tiny", "cpu", "gpu"):
        sizes = study_plan.sizes_of(scale)
        for name, arm in study_plan.ARMS.items():
            declared = {f.split("=")[0][2:] for f in arm["flags"]}
            cmd = study_plan.arm_command(name, paths, sizes, 0, "ck", "run")
            assert assert_follows_recipe(cmd[1:], declared, f"study {name}") == arm["config"]
        declared = {f.split("=")[0][2:] for f in study_plan.STAGE1["flags"]}
        assert_follows_recipe(study_plan.stage1_command(paths, sizes, 0, "s1")[1:], declared, "study stage 1")


def test_the_gpu_check_runs_the_quickstarts_recipes():
    spec = importlib.util.spec_from_file_location("gpu_check_script", os.path.join(ROOT, "scripts", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = SimpleNamespace(out="runs/gc", data="data/sample")
    recipes = [assert_follows_recipe(cmd[cmd.index("train.py") + 1:], where=name)
               for name, cmd, _, _ in gpu_check.training_parts(args, gpu_check.SHAPES["tiny"], 1, "")
               if "train.py" in cmd]
    assert recipes == ["configs/stage1_reads.yaml", "configs/lapdog_evidence.yaml", "configs/joint_grpo_evidence.yaml"]


def test_the_quickstart_runs_its_four_recipes_unchanged(tmp_path):
    (tmp_path / "qs").mkdir()  # (nothing runs, so nothing creates it)
    calls = recorded(tmp_path, "quickstart.sh", {"OUT": str(tmp_path / "qs")})
    recipes = [assert_follows_recipe(c, where="quickstart") for c in calls]
    assert recipes == ["configs/stage1_reads.yaml", "configs/control.yaml", "configs/lapdog_evidence.yaml",
                       "configs/joint_grpo_evidence.yaml"]


@pytest.mark.parametrize("script, recipe", [("stage1.sh", "configs/stage1_closed_book.yaml"),
                                            ("stage2_lapdog.sh", "configs/lapdog_paper.yaml"),
                                            ("stage2_grpo.sh", "configs/joint_grpo_evidence.yaml")])
def test_the_stage_scripts_run_their_recipe_at_the_originals_schedule(tmp_path, script, recipe):
    (call,) = recorded(tmp_path, script, {})
    assert assert_follows_recipe(call, SCHEDULE, script) == recipe


def test_a_command_that_overrides_its_recipe_is_caught():
    with pytest.raises(AssertionError, match="grpo_retriever_estimator"):
        assert_follows_recipe(["--config", "configs/joint_grpo_evidence.yaml", "--grpo_retriever_estimator", "pool"])
    assert_follows_recipe(["--config", "configs/joint_grpo_evidence.yaml", "--lr", "1e-5"], SCHEDULE)
