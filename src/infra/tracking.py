"""Experiment tracking: console + ``run.log``, ``metrics.jsonl``, ``samples.jsonl`` and W&B.

Only rank 0 writes anything. Files written under ``checkpoint_dir`` (all appended to, so a
resumed run continues the same files; when a run crashes after logging a step but before
the checkpoint of that step, the resumed run logs that step again: readers keep the last line
per step):

- ``run.log``: every console line, with a timestamp.
- ``metrics.jsonl``: one JSON object per :meth:`Tracker.log` call, ``{"step": N, "wall_time": T,
  "elapsed_s": E, key: value...}`` (T: seconds since the epoch; E: seconds of the run so far,
  continued across resumes from the file's last row), flushed at once. Every key is kept here
  and in W&B; the console shows a short summary (``console_line``). Non-finite floats are written
  as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (always, so the file stays strict
  JSON and a reader can tell NaN from inf; Python's ``float()`` parses all three back).
- ``samples.jsonl``: one JSON object per sample row, ``{"step": N, **row}``.
- ``summary.json``: the end of a run (:meth:`Tracker.finish`: steps, time, final training values,
  last and best evaluation), plus anything given to :meth:`Tracker.log_summary`.
- ``wandb_run_id.txt``: the W&B run id, so a resumed run continues the same W&B run.

Console/file lines go through the named logger ``"lapdog"`` (not the root logger); other
modules may log to ``logging.getLogger("lapdog.something")`` and their lines reach the same
console and file. The newest Tracker of a process owns that logger's handlers: creating a
second Tracker replaces the first one's handlers instead of duplicating them.
"""

import fnmatch
import json
import logging
import math
import netrc
import os
import resource
import secrets
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from src.infra import exits
from src.infra.errors import flag_error

LOGGER_NAME = "lapdog"
DEFAULT_WANDB_PROJECT = "lapdog-grpo"
RUN_ID_FILE = "wandb_run_id.txt"
_HANDLER_TAG = "_lapdog_tracker_handler"


# --------------------------------------------------------------------------------------------
# Value conversion and formatting


def _to_python(v):
    """A JSON/W&B-friendly scalar: one-element tensors and numpy scalars become Python numbers."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"only one-element tensors can be logged, got shape {tuple(v.shape)}")
        return v.detach().item()
    if hasattr(v, "item"):  # numpy scalars and 0-d arrays
        return v.item()
    raise TypeError(f"cannot log a value of type {type(v).__name__}: {v!r}")


def _json_safe(v):
    """Non-finite floats as ``"NaN"``/``"Infinity"``/``"-Infinity"`` so the line stays strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        if math.isnan(v):
            return "NaN"
        return "Infinity" if v > 0 else "-Infinity"
    return v


def format_value(v):
    """Compact human-readable text for one number: ``2.345``, ``12.3``, ``1.0e-04``, ``1234``.

    Integers are printed whole; floats with 4 significant digits, in scientific notation when
    tiny (< 1e-3, e.g. learning rates) or huge (>= 1e5); ``nan``/``inf`` as such; tensors and
    numpy scalars are converted first; anything else with ``str``.
    """
    if isinstance(v, torch.Tensor) or (hasattr(v, "item") and not isinstance(v, (str, bytes))):
        v = _to_python(v)
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        a = abs(v)
        if a == 0.0:
            return "0"
        if a < 1e-3 or a >= 1e5:
            return f"{v:.1e}"
        if a >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def _key_group(key):
    """Sort rank of a metric key on the console line: losses, rewards, the rest, lr, time, speed, memory."""
    k = key.lower()
    if k.startswith("loss") or "/loss" in k:
        return 0
    if k.startswith("reward"):
        return 1
    if k.startswith("lr"):
        return 3
    if k.startswith("time/"):
        return 4
    if k.endswith("/s") or k.endswith("per_sec") or k.startswith("throughput"):
        return 5
    if _is_memory_key(k):
        return 6
    return 2


def _is_memory_key(key):
    k = key.lower()
    return k == "mem" or k.startswith("mem/") or k.startswith("memory") or k.endswith("_mb")


def format_line(step, values):
    """``step 20 | loss/reader 2.345 | lr/reader 1.0e-04 | ex/s 12.3 | mem 512MB``.

    Keys keep the caller's order within their group (see ``_key_group``); ``time/*`` values are
    seconds (``1.23s``) and memory keys (``mem``, ``mem/*``, ``memory*``, ``*_mb``) megabytes.
    """
    keys = sorted(values, key=lambda k: _key_group(k))  # stable: caller's order within a group
    parts = [f"step {step}"]
    for k in keys:
        v = values[k]
        if _is_memory_key(k) and isinstance(v, (int, float)) and math.isfinite(v):
            text = f"{v:.0f}MB"
        elif k.lower().startswith("time/") and isinstance(v, (int, float)):
            text = f"{format_value(float(v))}s"
        else:
            text = format_value(v)
        parts.append(f"{k} {text}")
    return " | ".join(parts)


# What the console line shows of a logged row (glob patterns, in this order); metrics.jsonl and
# W&B keep every key. A row none of these match (e.g. only time/index_refresh) prints in full.
CONSOLE_KEYS = ("loss/*", "reward/mean", "lr/*", "eval/*/f1", "eval/*/bleu", "eval/*/rougeL", "eval/*/reward",
                "eval/*/recall@1")
# Evaluation metric whose maximum is the run's best evaluation in summary.json.
BEST_EVAL_METRIC = "f1"


def format_duration(seconds):
    """``45s``, ``12m05s``, ``3h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def console_line(step, values, total=None, sec_per_step=None, eta=None):
    """``step 20/1000 | loss/reader 2.345 | reward 0.52 | lr/reader 1.0e-04 | 0.41 s/step | ETA 6m41s``:
    the ``CONSOLE_KEYS`` of ``values`` (``reward/mean`` shown as ``reward``), then speed and ETA."""
    shown = {}
    for pattern in CONSOLE_KEYS:
        for k in values:
            if k not in shown and fnmatch.fnmatchcase(k, pattern):
                shown[k] = values[k]
    if not shown:
        return format_line(step if total is None else f"{step}/{total}", values)
    parts = [f"step {step}" if total is None else f"step {step}/{total}"]
    parts += [f"{'reward' if k == 'reward/mean' else k} {format_value(v)}" for k, v in shown.items()]
    if sec_per_step is not None:
        parts.append(f"{format_value(float(sec_per_step))} s/step")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


def _as_float(v):
    """A logged number back from metrics.jsonl ("NaN"/"Infinity" strings included), else None."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Memory and timing


def _is_cuda(device):
    return device is not None and torch.device(device).type == "cuda"


def peak_memory_mb(device):
    """Peak memory in MB: CUDA max allocated for a cuda device, else the process's peak RSS."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is kilobytes on Linux but bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Timer:
    """Wall-clock timer; a context manager (``with Timer(device) as t: ...; t.elapsed``).

    On a cuda device the stream is synchronized on entry and exit, so queued kernels are
    charged to the block that launched them rather than to whatever waits on them later.
    ``elapsed`` is the last block's seconds, ``total`` the sum over all blocks.
    """

    def __init__(self, device=None):
        self.device = device
        self.elapsed = 0.0
        self.total = 0.0
        self._start = None

    def _sync(self):
        if _is_cuda(self.device):
            torch.cuda.synchronize(torch.device(self.device))

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._sync()
        self.elapsed = time.perf_counter() - self._start
        self.total += self.elapsed
        self._start = None
        return False


@contextmanager
def timed(stats, key, device=None):
    """Add the wall seconds of the block to ``stats[key]`` (created at 0.0), e.g. ``time/sampling``."""
    timer = Timer(device)
    try:
        with timer:
            yield timer
    finally:
        stats[key] = stats.get(key, 0.0) + timer.elapsed


class StatWindow:
    """Step statistics summed over a logging window; each key is averaged over the steps that
    produced it. With --grpo_num_iterations μ > 1 the reward and sampling keys exist only on
    the steps that drew a new batch: dividing them by every step of the window would log them
    about 1/μ too low.

    It also counts the window's training examples (``examples_per_step`` per added step) and
    its wall time, for ``examples_per_s``; ``reset`` starts the next window."""

    def __init__(self, examples_per_step=0):
        self.examples_per_step = examples_per_step
        self.reset()

    def reset(self):
        self.sums, self.counts = {}, {}
        self.examples, self.t0 = 0, time.perf_counter()

    def add(self, stats):
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.examples += self.examples_per_step

    def means(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def examples_per_s(self):
        """Examples of the window's steps over the seconds since it started (``paused`` blocks left out)."""
        return self.examples / max(time.perf_counter() - self.t0, 1e-9)

    @contextmanager
    def paused(self):
        """A block (an evaluation) whose seconds examples_per_s leaves out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# W&B helpers


def _wandb_host():
    base = os.environ.get("WANDB_BASE_URL")
    return (urlparse(base).hostname if base else None) or "api.wandb.ai"


def wandb_api_key_available():
    """True when ``WANDB_API_KEY`` is set or the netrc file has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return False
    try:
        return netrc.netrc(path).authenticators(_wandb_host()) is not None
    except (netrc.NetrcParseError, OSError):
        return False


class _StdStreamHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stdout``/``sys.stderr``, so redirections made after the
    Tracker was created (pytest capture, W&B console wrapping) still see the lines."""

    def __init__(self, name):
        super().__init__(getattr(sys, name))
        self._name = name
        self.bar = None  # the Tracker's progress bar while one is shown

    def emit(self, record):
        self.stream = getattr(sys, self._name)
        if self.bar is not None and not self.bar.disable:
            # Through tqdm, so the bar is cleared, the line printed and the bar redrawn below it.
            try:
                tqdm.write(self.format(record), file=self.stream)
            except Exception:  # logging's contract: a failing handler reports, never raises
                self.handleError(record)
            return
        super().emit(record)


class _RunLogHandler(logging.FileHandler):
    """run.log. A failed write (a full or read-only disk) stops the run with one line, instead of
    logging's "--- Logging error ---" traceback on every later line."""

    def handleError(self, record):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, self.baseFilename) from None
        super().handleError(record)


class EarlyLines(logging.Handler):
    """Warnings logged (``lapdog.*`` loggers: the data checks) before a run's Tracker exists, so
    before its run.log may be written: printed on stderr at once, and kept for the Tracker, which
    writes them into run.log with their times (``Tracker(earlier=...)``). evaluate.py, which has no
    Tracker, prints its warnings through it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []
        self._propagate = None

    def emit(self, record):
        self.records.append(record)
        print(record.getMessage(), file=sys.stderr, flush=True)

    def install(self):
        logger = logging.getLogger(LOGGER_NAME)
        logger.addHandler(self)
        self._propagate, logger.propagate = logger.propagate, False  # printed here, not by the root's handlers too
        return self

    def take(self):
        """The kept records (no longer kept, no longer printed: the Tracker's handlers take over)."""
        self.uninstall()
        records, self.records = self.records, []
        return records

    def uninstall(self):
        logger = logging.getLogger(LOGGER_NAME)
        if self in logger.handlers:
            logger.removeHandler(self)
            logger.propagate = self._propagate


# --------------------------------------------------------------------------------------------
# Tracker


class Tracker:
    """Console/file logging, ``metrics.jsonl``, ``samples.jsonl`` and optional W&B for one run.

    On ranks other than 0 every method is a no-op apart from :meth:`warning`, which prints
    ``[rank r] ...`` to stderr (``info`` stays silent to keep the console clean).
    """

    def __init__(self, checkpoint_dir, run_name, options, rank=0, use_wandb=False,
                 wandb_project=None, wandb_entity=None, wandb_run_name=None, earlier=()):
        self.checkpoint_dir = str(checkpoint_dir)
        self.run_name = run_name
        self.rank = rank
        self.is_main = rank == 0
        if options is None:
            options = {}
        # An argparse Namespace is accepted as well as a dict.
        self.options = dict(options) if isinstance(options, dict) else dict(vars(options))
        self.use_wandb = bool(use_wandb) and self.is_main
        self.wandb_run = None
        self.wandb_run_dir = None
        self._wandb = None
        self._metrics_file = None
        self._samples_file = None
        self._closed = False
        self._t0 = time.time()
        self._elapsed_before = 0.0  # seconds of the run before this process (a resume)
        self._evals = {}  # step -> {"eval/<name>/<metric>": value}
        self._final = {}  # the latest value of every training key
        self._bar = None
        self._total = None
        self._progress_from = None  # (time, step) when the progress started
        self._last_row = None  # (time, step, excluded seconds then) of the last training row, for s/step
        self._excluded = 0.0  # seconds spent in not_training() blocks (evaluations), left out of s/step and ETA

        self._logger = logging.getLogger(LOGGER_NAME)
        self._logger.propagate = False  # the root logger would print every line a second time
        self._logger.setLevel(logging.INFO)
        self._handlers = []
        self._install_handlers()

        if not self.is_main:
            return
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        for record in earlier:  # the data warnings printed before run.log existed
            self._file_handler.handle(record)
        self._metrics_path = os.path.join(self.checkpoint_dir, "metrics.jsonl")
        self._read_history(self._metrics_path)  # (opened at the first row: a run that logs none leaves none)
        if self.use_wandb:
            self._init_wandb(wandb_project or DEFAULT_WANDB_PROJECT, wandb_entity,
                             wandb_run_name or run_name)

    # ---- history (a resumed run continues its evaluations and elapsed time) ----------------

    def _read_history(self, path):
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a crash: the rest of the history still counts
                    continue
                self._remember(int(row.get("step", 0)), row)
                self._elapsed_before = _as_float(row.get("elapsed_s")) or self._elapsed_before

    def _remember(self, step, values):
        evals = {k: v for k, v in values.items() if k.startswith("eval/")}
        if evals:
            self._evals.setdefault(step, {}).update(evals)
        self._final.update({k: v for k, v in values.items()
                            if not k.startswith("eval/") and k not in ("step", "wall_time", "elapsed_s")})

    def elapsed(self):
        """Seconds of the run so far (earlier processes of a resumed run included)."""
        return self._elapsed_before + time.time() - self._t0

    def eval_at(self, step):
        """The evaluation metrics logged at ``step`` (``{"eval/<name>/<metric>": value}``), or {}."""
        return dict(self._evals.get(step, {}))

    def eval_history(self):
        """[(step, {"eval/<name>/<metric>": value})] of every evaluation logged so far, in step order
        (a resumed run's included: read back from metrics.jsonl)."""
        return [(step, dict(row)) for step, row in sorted(self._evals.items())]

    def best_eval(self, metric=BEST_EVAL_METRIC, lower_is_better=False):
        """{eval name: {"step", metric: best value, "metrics": that evaluation}} over the run (the
        highest value, or the lowest with ``lower_is_better``: losses, perplexity)."""
        best = {}
        for step, row in sorted(self._evals.items()):
            for key, value in row.items():
                parts = key.split("/")
                number = _as_float(value)
                if len(parts) != 3 or parts[2] != metric or number is None or not math.isfinite(number):
                    continue
                name = parts[1]
                if name not in best or (number < best[name][metric] if lower_is_better else number > best[name][metric]):
                    best[name] = {"step": step, metric: number,
                                  "metrics": {k.split("/", 2)[2]: v for k, v in row.items()
                                              if k.startswith(f"eval/{name}/")}}
        return best

    # ---- progress --------------------------------------------------------------------------

    def start_progress(self, step, total, force_bar=False):
        """A progress bar (rank 0, on a terminal; ``force_bar``: also elsewhere) from ``step`` to
        ``total``, and s/step and ETA on the console lines."""
        if not self.is_main:
            return
        self._total, self._progress_from = total, (time.time(), step, self._excluded)
        self._bar = tqdm(total=total, initial=step, unit="step", desc=self.run_name, dynamic_ncols=True,
                         disable=False if force_bar else None, file=sys.stderr, smoothing=0.05)
        for h in self._handlers:
            if isinstance(h, _StdStreamHandler):
                h.bar = self._bar

    def advance(self, step):
        """Move the progress bar to ``step`` (completed optimizer updates)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    @contextmanager
    def not_training(self):
        """A block (an evaluation) whose seconds s/step and the ETA leave out."""
        start = time.time()
        try:
            yield
        finally:
            self._excluded += time.time() - start

    def _speed(self, step):
        """(seconds per training step over the last logging window, ETA in seconds) or Nones;
        the time of ``not_training`` blocks (evaluations) is left out of both."""
        now = time.time()

        def per_step(since):
            t, s, excluded = since
            return max(now - t - (self._excluded - excluded), 0.0) / (step - s)

        sec_per_step = eta = None
        if self._last_row is not None and step > self._last_row[1]:
            sec_per_step = per_step(self._last_row)
        elif self._progress_from is not None and step > self._progress_from[1]:
            sec_per_step = per_step(self._progress_from)
        if self._progress_from is not None and step > self._progress_from[1] and self._total is not None:
            # the average since this process started (saves included, evaluations not)
            eta = per_step(self._progress_from) * max(self._total - step, 0)
        return sec_per_step, eta

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            for h in self._handlers:
                if isinstance(h, _StdStreamHandler):
                    h.bar = None
            self._bar = None

    # ---- logging setup ---------------------------------------------------------------------

    def _install_handlers(self):
        for h in list(self._logger.handlers):
            if getattr(h, _HANDLER_TAG, False):
                self._logger.removeHandler(h)
                h.close()
        datefmt = "%Y-%m-%d %H:%M:%S"
        if self.is_main:
            fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt=datefmt)
            console = _StdStreamHandler("stdout")
            console.setLevel(logging.INFO)
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            log_path = os.path.join(self.checkpoint_dir, "run.log")
            file = _RunLogHandler(log_path, mode="a", encoding="utf-8")
            file.setLevel(logging.INFO)
            self._file_handler = file
            exits.note_log(log_path)  # the line that ends the run goes there too
            handlers = [console, file]
        else:
            fmt = logging.Formatter(f"[rank {self.rank}] %(asctime)s | %(message)s", datefmt=datefmt)
            console = _StdStreamHandler("stderr")
            console.setLevel(logging.WARNING)
            handlers = [console]
        for h in handlers:
            h.setFormatter(fmt)
            setattr(h, _HANDLER_TAG, True)
            self._logger.addHandler(h)
        self._handlers = handlers

    # ---- W&B -------------------------------------------------------------------------------

    def _init_wandb(self, project, entity, name):
        import wandb  # lazily: runs without W&B do not pay for the import

        self._wandb = wandb
        wandb_dir = os.environ.get("WANDB_DIR") or self.checkpoint_dir
        os.makedirs(wandb_dir, exist_ok=True)
        mode = None  # None lets wandb read WANDB_MODE itself
        no_key = False
        if not os.environ.get("WANDB_MODE") and not wandb_api_key_available():
            mode, no_key = "offline", True

        id_path = os.path.join(self.checkpoint_dir, RUN_ID_FILE)
        run_id = None
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)

        try:
            run = wandb.init(project=project, entity=entity, name=name, config=self.options,
                             dir=wandb_dir, id=run_id, resume="allow", mode=mode)
        except wandb.errors.Error as exc:
            raise flag_error("--use_wandb", f"W&B could not start a run ({exc})",
                             "run `wandb login`, or set WANDB_MODE=offline (sync later) or "
                             "WANDB_MODE=disabled") from exc
        self.wandb_run = run
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run.id + "\n")
        # run.dir is ".../wandb/offline-run-DATE-ID/files"; the run directory is its parent.
        self.wandb_run_dir = os.path.dirname(run.dir) if run.dir else None
        if run.settings.mode == "offline":
            why = ("no W&B API key found (WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc)"
                   if no_key else "WANDB_MODE=offline")
            self.info(f"W&B: {why}; logging offline to {self.wandb_run_dir} — "
                      f"upload later with: wandb sync {self.wandb_run_dir}")
        else:
            self.info(f"W&B: run {run.id} ({run.settings.mode})")

    # ---- public API ------------------------------------------------------------------------

    def info(self, msg):
        """One line on the console and in ``run.log`` (rank 0 only)."""
        if self.is_main:
            self._logger.info(msg)

    def warning(self, msg):
        """A warning: console + ``run.log`` on rank 0; ``[rank r]`` on stderr on other ranks."""
        self._logger.warning(f"warning: {msg}")

    def log(self, step, values):
        """Append ``{"step": step, **values}`` to metrics.jsonl (flushed), print one line, W&B log.

        ``values``: str -> number (Python, numpy scalar or one-element tensor), str or None.
        """
        if not self.is_main:
            return
        self._check_open()
        clean = {str(k): _to_python(v) for k, v in values.items()}
        record = {"step": int(step), "wall_time": round(time.time(), 3), "elapsed_s": round(self.elapsed(), 3)}
        record.update({k: _json_safe(v) for k, v in clean.items()})
        try:
            if self._metrics_file is None:
                self._metrics_file = open(self._metrics_path, "a", encoding="utf-8")
            self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
            self._metrics_file.flush()  # a crash right after this call loses nothing
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self._metrics_path) from None
        self._remember(int(step), clean)
        training_row = not any(k.startswith("eval/") for k in clean)
        sec_per_step, eta = self._speed(int(step)) if training_row else (None, None)
        self._logger.info(console_line(step, clean, self._total, sec_per_step, eta))
        if training_row:
            self._last_row = (time.time(), int(step), self._excluded)
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=int(step))

    def log_samples(self, step, rows, key="samples"):
        """Rows (dicts, e.g. prompt/reply/reward) to samples.jsonl and, with W&B, a ``wandb.Table``.

        The table's columns are the keys in order of first appearance; missing cells are None.
        """
        if not self.is_main or not rows:
            return
        self._check_open()
        clean_rows = [{str(k): _to_python(v) for k, v in row.items()} for row in rows]
        if self._samples_file is None:
            self._samples_file = open(os.path.join(self.checkpoint_dir, "samples.jsonl"), "a",
                                      encoding="utf-8")
        for row in clean_rows:
            rec = {"step": int(step)}
            rec.update({k: _json_safe(v) for k, v in row.items()})
            self._samples_file.write(json.dumps(rec, allow_nan=False, ensure_ascii=False) + "\n")
        self._samples_file.flush()
        if self.wandb_run is not None:
            columns = list(dict.fromkeys(k for row in clean_rows for k in row))
            table = self._wandb.Table(columns=columns,
                                      data=[[row.get(c) for c in columns] for row in clean_rows])
            self.wandb_run.log({key: table}, step=int(step))

    def log_summary(self, values):
        """Final numbers: merged into ``summary.json`` and the W&B run summary, and printed."""
        if not self.is_main:
            return
        self._check_open()
        clean = {str(k): _to_python(v) for k, v in values.items()}
        self._update_summary_file({k: _json_safe(v) for k, v in clean.items()})
        self._logger.info("summary | " + " | ".join(f"{k} {format_value(v)}" for k, v in clean.items()))
        if self.wandb_run is not None:
            self.wandb_run.summary.update(clean)

    def _update_summary_file(self, values):
        path = os.path.join(self.checkpoint_dir, "summary.json")
        summary = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        summary.update(values)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)  # never leave a half-written summary

    def finish(self, step, total_steps=None, metric=BEST_EVAL_METRIC, lower_is_better=False):
        """The end of a run into ``summary.json``: steps, time, the final training values, the last
        and the best evaluation (by ``metric``: the one the run kept its best checkpoint by; F1
        unless told); one line on the console."""
        if not self.is_main:
            return
        self._check_open()
        self._close_bar()
        last = max(self._evals) if self._evals else None
        best = self.best_eval(metric, lower_is_better)
        summary = {"name": self.run_name, "steps": int(step), "total_steps": total_steps,
                   "elapsed_s": round(self.elapsed(), 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "final": {k: _json_safe(v) for k, v in self._final.items()},
                   "last_eval": None if last is None else {"step": last, **{k: _json_safe(v) for k, v in
                                                                             self._evals[last].items()}},
                   "best_eval": {name: {**b, "metrics": {k: _json_safe(v) for k, v in b["metrics"].items()}}
                                 for name, b in best.items()}}
        self._update_summary_file(summary)
        told = "; ".join(f"best {name} {metric} {format_value(b[metric])} at step {b['step']}"
                         for name, b in best.items())
        self._logger.info(f"finished: {step} steps in {format_duration(self.elapsed())}"
                          f"{'; ' + told if told else ''}; {os.path.join(self.checkpoint_dir, 'summary.json')}")
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"best/{name}/{metric}": b[metric]
                                           for name, b in best.items()})

    def _check_open(self):
        if self._closed:
            raise RuntimeError("Tracker is closed: log before close()")

    def close(self, exit_code=0):
        """Finish the W&B run, close the files and detach this Tracker's log handlers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._close_bar()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        for f in (self._metrics_file, self._samples_file):
            if f is not None:
                f.close()
        self._metrics_file = self._samples_file = None
        for h in self._handlers:
            if h in self._logger.handlers:
                self._logger.removeHandler(h)
            h.close()
        self._handlers = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # A run that died with an exception is marked failed in W&B.
        self.close(exit_code=0 if exc_type is None else 1)
        return False
