"""Early stopping on an in-loop evaluation metric (--early_stopping_patience, --early_stopping_metric).

The first --eval_data file is watched. Each evaluation that improves on the best so far is the new
best (train.py saves it and points ``checkpoint/best`` at it); after ``patience`` evaluations in a
row without an improvement the run stops. Losses and the perplexity improve downwards, every other
metric (F1, ROUGE-L, the reward, ...) upwards. A resumed run takes the evaluations its
metrics.jsonl already holds, so it stops where the uninterrupted run would have.
"""

import math

LOWER_IS_BETTER = ("eval_loss", "ppl")


class EarlyStopping:
    def __init__(self, metric, patience, eval_name):
        self.metric, self.patience, self.key = metric, patience, f"eval/{eval_name}/{metric}"
        self.best_step, self.best, self.stale = None, None, 0

    @property
    def lower_is_better(self):
        return self.metric in LOWER_IS_BETTER

    def _better(self, value):
        if self.best is None:
            return True
        return value < self.best if self.lower_is_better else value > self.best

    def update(self, step, results):
        """(improved, stop) after the evaluation ``results`` ({"eval/<name>/<metric>": value}) of
        ``step``. A non-finite value never improves. Off (patience 0): never stops, still tracks."""
        value = results.get(self.key)
        improved = value is not None and math.isfinite(value) and self._better(value)
        if improved:
            self.best_step, self.best, self.stale = step, value, 0
        elif value is not None:
            self.stale += 1
        return improved, self.should_stop()

    def should_stop(self):
        return self.patience > 0 and self.stale >= self.patience

    def replay(self, history):
        """Take the evaluations an earlier run logged: ``history`` = [(step, results)] in step order."""
        for step, results in history:
            self.update(step, results)
        return self

    def describe(self):
        return (f"{self.key} has not improved on {self.best:.4g} (step {self.best_step}) for {self.stale} "
                f"evaluations (--early_stopping_patience {self.patience})")
