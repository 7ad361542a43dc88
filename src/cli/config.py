"""`--config FILE.yaml|json`: a recipe file whose keys are flag names.

The file is expanded, where `--config` stands on the command line, into the flags it names, and
argparse then reads them like typed flags: the same types, choices and errors, and a flag given
after `--config` wins (argparse keeps the last value). A checkpoint's `options.json` is a valid
recipe: its bookkeeping keys (below) are skipped.
"""

import argparse
import json
import os

from src.infra.errors import data_error, flag_error

# Keys of options.json that are not recipe flags: the provenance record, the config path itself,
# and the launcher's rank (LOCAL_RANK belongs to the process, not to the recipe).
SKIPPED_KEYS = {"run_info", "config", "local_rank"}
_FIX = "write a JSON or YAML mapping of flag names to values, e.g. {total_steps: 1000, closed_book: true}"


def _read(path):
    if not os.path.isfile(path):
        raise data_error(path, None, "config file not found", "check the path given to --config")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise data_error(path, None, f"unknown config type '{ext or 'no extension'}'",
                         "name the file .yaml, .yml or .json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise data_error(path, None, f"invalid JSON ({exc})", _FIX) from None
    import yaml  # lazily: only recipes in YAML need it (PyYAML, pinned in requirements.txt)

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise data_error(path, None, f"invalid YAML ({' '.join(str(exc).split())})", _FIX) from None


def config_flags(path, parser):
    """The command-line tokens the recipe at `path` stands for."""
    cfg = _read(path)
    if cfg is None:
        return []
    if not isinstance(cfg, dict):
        raise data_error(path, None, f"the config is a {type(cfg).__name__}, not a mapping", _FIX)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    tokens = []
    for key, value in cfg.items():
        name = str(key).replace("-", "_")
        if name in SKIPPED_KEYS:
            continue
        if name not in actions:
            raise data_error(path, None, f"unknown option '{key}'", "use flag names as keys (see --help)")
        action = actions[name]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if value is None:
            continue  # the flag's own default
        _check_value(path, key, action, value)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise data_error(path, None, f"'{key}' is a switch, got {value!r}", "write true or false")
            tokens += [flag] if value else []
        elif action.nargs == "+":
            values = value if isinstance(value, list) else [value]
            tokens += [flag, *map(str, values)] if values else []
        elif isinstance(value, (dict, list)):
            tokens.append(f"{flag}={json.dumps(value)}")  # e.g. metric_scale_factors as a mapping
        else:
            tokens.append(f"{flag}={value}")
    return tokens


_TYPE_NAMES = {int: "an integer", float: "a number"}


def _check_value(path, key, action, value):
    """A wrong type or choice is reported against the file and key, not as a command-line flag
    (argparse would say "argument --text_maxlength: invalid int value" and blame the command line)."""
    if isinstance(action, argparse._StoreTrueAction) or isinstance(value, dict):
        return
    values = value if isinstance(value, list) and action.nargs == "+" else [value]
    for v in values:
        if action.type in _TYPE_NAMES:
            ok = not isinstance(v, (bool, list, dict))
            if ok:
                try:
                    v = action.type(str(v))
                except ValueError:
                    ok = False
            if not ok:
                raise data_error(path, None, f"'{key}' must be {_TYPE_NAMES[action.type]}, got {value!r}",
                                 f"write e.g. {key}: {action.default if action.default is not None else 1}")
        if action.choices is not None and v not in action.choices:
            raise data_error(path, None, f"'{key}' must be one of {', '.join(map(str, action.choices))}, "
                                         f"got {value!r}", f"write one of them, e.g. {key}: {action.choices[0]}")


def expand_config(argv, parser):
    """`argv` with every `--config FILE` (or `--config=FILE`) replaced by the flags of FILE."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--config":
            if i + 1 >= len(argv):
                raise flag_error("--config", "needs a file", "pass --config FILE.yaml or --config FILE.json")
            out += config_flags(argv[i + 1], parser)
            i += 2
            continue
        if token.startswith("--config="):
            out += config_flags(token.split("=", 1)[1], parser)
        else:
            out.append(token)
        i += 1
    return out
