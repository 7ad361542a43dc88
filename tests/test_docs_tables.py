"""The documentation's promises point at tests that exist: every test the reliability table in
docs/operations.md names is defined in tests/ (a renamed or deleted test would leave a promise
nobody checks)."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def named_tests(markdown, header):
    table = markdown[markdown.index(header):].split("\n\n")[0]
    return set(re.findall(r"`(test_[a-z0-9_]+)`", table))


def test_every_test_the_reliability_table_names_exists():
    doc = open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8").read()
    names = named_tests(doc, "| failure | what the user gets | test |")
    assert len(names) >= 20  # the table is there and names its tests
    defined = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)\(", open(path, encoding="utf-8").read(), re.M))
    assert names - defined == set(), f"docs/operations.md names tests that do not exist: {sorted(names - defined)}"


def test_named_tests_finds_backticked_test_names_only():
    md = "| a | b | test |\n|---|---|---|\n| x | `--flag` | `test_one`, `test_two_2` |\n\nafter `test_three`"
    assert named_tests(md, "| a | b | test |") == {"test_one", "test_two_2"}
