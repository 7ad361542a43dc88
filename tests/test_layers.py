"""The import layers of src/ (the contract in pyproject.toml, checked by lint-imports in scripts/test.sh).

The contract is only worth something if it fails when a layer is crossed: these tests break it on
purpose in a copy of the code."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint_imports(cwd):
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def code_copy(tmp_path):
    """src/, research/ and pyproject.toml copied, so that an import can be added without touching the repository."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("src", "research"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder, ignore=skip)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    return tmp_path


def add_import(path, line):
    """A module-level import at the end of the file: lint-imports reads it like one at the top."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n{line}\n")


def test_the_repository_keeps_its_layers(code_copy):
    result = lint_imports(code_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_model_module_importing_the_cli_breaks_the_contract(code_copy):
    add_import(code_copy / "src" / "model" / "reader.py", "from src.cli import options  # noqa: F401")
    result = lint_imports(code_copy)
    assert result.returncode != 0
    assert "src layers" in result.stdout and "BROKEN" in result.stdout
    assert "src.model.reader -> src.cli.options" in result.stdout


def test_infra_importing_a_higher_layer_breaks_the_contract(code_copy):
    add_import(code_copy / "src" / "infra" / "errors.py", "import src.data.prompts  # noqa: F401")
    result = lint_imports(code_copy)
    assert result.returncode != 0 and "src.infra.errors -> src.data.prompts" in result.stdout


def test_the_product_importing_research_breaks_the_contract(code_copy):
    add_import(code_copy / "src" / "objectives" / "grpo.py", "import research.study.plan  # noqa: F401")
    result = lint_imports(code_copy)
    assert result.returncode != 0
    assert "the product does not import the research code BROKEN" in " ".join(result.stdout.split())
