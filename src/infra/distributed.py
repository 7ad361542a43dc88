"""Launch detection, device and backend, collectives, model wrapping.

One code path for CPU and GPU: the device is chosen once here (cuda:LOCAL_RANK when CUDA is
available, else cpu) and passed around; the backend follows it (nccl on GPU, gloo on CPU).
Works for a single process, `python -m torch.distributed.launch` (which passes --local-rank and
sets LOCAL_RANK) and torchrun (environment variables only).
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1


def init_distributed(local_rank_flag=-1, timeout_minutes=None):
    """`timeout_minutes` (--dist_timeout) bounds every collective and the initial rendezvous: a
    rank that hangs or died makes the others fail with a timeout instead of waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if timeout_minutes is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values, device):
    """Average a dict of floats over ranks (one collective for the whole dict)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def all_reduce_sum(tensor):
    """Sum of a tensor over ranks (a new tensor; the input is left alone)."""
    out = tensor.clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def all_gather_objects(obj):
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(module, info, shard_grads=False, optimizers=(), find_unused_parameters=False):
    """DDP (or fairscale ShardedDataParallel with --shard_grads) when there is more than one rank.

    Frozen parts (requires_grad False) are invisible to DDP; find_unused_parameters is needed
    when the retriever is trained: it sits out steps before --freeze_retriever_steps, and a
    BERT checkpoint's pooler is never used by mean pooling.
    """
    if not info.distributed:
        return module
    if shard_grads:
        from fairscale.nn.data_parallel import ShardedDataParallel
        return ShardedDataParallel(module, sharded_optimizer=list(optimizers), auto_refresh_trainable=True)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
