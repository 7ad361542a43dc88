"""The deterministic, resumable sharded sampler of training batches, and the evaluation shards."""

import torch

from src.infra.errors import UsageError


class ShardedSampler:
    """An infinite, resumable stream of per-rank batches of example indices.

    Epoch e's global order is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``
    (``range(n)`` without shuffle). Each global step consumes the next ``batch_size * world``
    positions of that order, continuing into epoch e+1 when e runs out, so every example is
    seen exactly once per epoch; rank r gets positions ``[r*batch_size, (r+1)*batch_size)`` of
    the step. All ranks hold the same state, which is two ints (epoch, position).
    """

    def __init__(self, n_examples, batch_size, rank=0, world=1, shuffle=True, seed=0):
        if n_examples < 1:
            raise ValueError(f"ShardedSampler needs at least one example, got n_examples={n_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.n_examples = int(n_examples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world = int(world)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._orders = {}

    @property
    def epoch(self):
        """The epoch the next example comes from."""
        return self._epoch

    def _order(self, epoch):
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n_examples, generator=g).tolist()
            else:
                order = list(range(self.n_examples))
            # only the current and the next epoch are ever needed
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def next_batch(self, batch_size=None):
        """This rank's next ``batch_size`` example indices (list of int); advances all ranks' state.

        ``batch_size`` defaults to the one given at construction.
        """
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        start, stop = self.rank * bs, (self.rank + 1) * bs
        need = bs * self.world
        taken = 0
        mine = []
        while taken < need:
            order = self._order(self._epoch)
            chunk = min(need - taken, self.n_examples - self._position)
            # the overlap of this chunk's global positions [taken, taken+chunk) with this rank's slice
            lo, hi = max(start, taken), min(stop, taken + chunk)
            if lo < hi:
                base = self._position - taken
                mine.extend(order[base + lo:base + hi])
            taken += chunk
            self._position += chunk
            if self._position == self.n_examples:
                self._epoch += 1
                self._position = 0
        return mine

    def state_dict(self):
        """Plain ints: ``epoch``, ``position`` (next position in that epoch's order), and
        ``n_examples`` / ``seed`` / ``shuffle`` to catch a resume with different data."""
        return {"epoch": self._epoch, "position": self._position, "n_examples": self.n_examples,
                "seed": self.seed, "shuffle": int(self.shuffle)}

    def load_state_dict(self, state):
        """Continue from ``state`` (from state_dict); the world size and batch size may differ."""
        for key, mine in (("n_examples", self.n_examples), ("seed", self.seed),
                          ("shuffle", int(self.shuffle))):
            if key in state and int(state[key]) != mine:
                raise UsageError(
                    f"the checkpoint's data sampler was saved with {key}={int(state[key])} but this "
                    f"run has {key}={mine} — resume with the same training data, --seed and "
                    f"--shuffle, or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_examples:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position} "
                             f"for {self.n_examples} examples")
        self._epoch, self._position = epoch, position


def eval_shard(n, rank, world):
    """The evaluation indices of one rank: ``[i for i in range(n) if i % world == rank]``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return list(range(rank, n, world))


def interleave_results(per_rank_lists, n):
    """Inverse of eval_shard: ``per_rank_lists[r]`` holds rank r's results in its index order;
    returns the n results in input order."""
    world = len(per_rank_lists)
    if world < 1:
        raise ValueError("interleave_results needs at least one rank's results")
    for r, results in enumerate(per_rank_lists):
        expected = len(range(r, n, world))
        if len(results) != expected:
            raise ValueError(f"rank {r} has {len(results)} results, expected {expected} of n={n}")
    return [per_rank_lists[i % world][i // world] for i in range(n)]
