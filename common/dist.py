"""torchrun / DDP in a dozen lines, as nanoGPT does it: read RANK / LOCAL_RANK / WORLD_SIZE, pick the
backend by device (nccl on GPU, gloo on CPU), only rank 0 logs and saves.

    torchrun --nproc_per_node=2 script.py ...   # 2 processes (GPUs if present, else CPU with gloo)
    python script.py ...                        # 1 process, no process group
"""
import multiprocessing as mp
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup(device="auto"):
    """Initialises the process group when launched by torchrun; returns DistInfo with the device to use.
    ``device``: 'auto' (cuda if available), 'cpu' or 'cuda'."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        if world > 1:  # two CPU processes on a small machine: do not let each take every core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, local, world, dev)


def cleanup():
    """Ends the process group once every process got here. Call it on success only: a process that failed
    exits (torchrun then stops the others) instead of waiting at the barrier. Without the barrier, a rank
    that finishes first tears gloo down while rank 0 is still writing its checkpoint, and the job aborts."""
    if dist.is_initialized():
        dist.barrier()
        _store_barrier("common.dist.cleanup")
        dist.destroy_process_group()


def _store_barrier(key):
    """Every rank has returned from the gloo barrier before any tears its connections down: gloo can fail a
    peer whose last barrier message is still in flight when the other side closes (pytorch/gloo#155, seen
    here as a rare non-zero exit of a finished torchrun job). The rendezvous store carries no gloo traffic."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # private API: without it, the gloo barrier alone
        return
    store.set(f"{key}/{dist.get_rank()}", "1")
    store.wait([f"{key}/{r}" for r in range(dist.get_world_size())])


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t):
    """Sums a tensor over processes in place (no-op in one process) and returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src=0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def gather_tensors(t, device):
    """A tensor of the same shape on every process, concatenated along dim 0 in rank order, on the CPU
    (the tensor itself in one process). The collective runs on ``device`` (nccl needs the process's GPU)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out).cpu()


def check_in_parallel(items, check_one, info, threads=8):
    """Runs ``check_one(item) -> None or a reason`` over ``items`` before training: each process takes
    every world_size-th item, threads overlap the file reads. Returns [(item, reason)] of the failures,
    the same list on every process (in item order)."""
    from concurrent.futures import ThreadPoolExecutor
    mine = list(range(info.rank, len(items), info.world_size))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(lambda i: check_one(items[i]), mine))
    bad = [(i, r) for i, r in zip(mine, reasons) if r]
    bad = sorted(b for part in gather_objects(bad) for b in part)
    return [(items[i], r) for i, r in bad]


def unwrap(model):
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r takes items r, r+W, r+2W, ... with no padding, so every sample is
    counted exactly once over the processes (DistributedSampler pads with duplicates)."""

    def __init__(self, n, rank=0, world_size=1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class InfiniteSampler(torch.utils.data.Sampler):
    """Training sampler for iteration-based schedules: an endless shuffled stream, sharded over ranks.
    It yields ``(index, sample_seed)`` pairs: datasets draw their augmentation from
    ``numpy.random.default_rng(sample_seed)``, so what a sample looks like depends only on (seed, rank,
    position), not on worker processes. ``start`` skips the first positions, so a resumed run sees
    exactly the samples an uninterrupted run would have seen."""

    def __init__(self, n, rank=0, world_size=1, seed=0, start=0):
        if n == 0:
            raise ValueError("InfiniteSampler over an empty dataset")
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world_size, seed, start

    def __iter__(self):
        epoch, pos = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            for i in perm[self.rank::self.world] if self.n >= self.world else perm:
                if pos >= self.start:
                    yield i, (self.seed * 1_000_003 + self.rank) * 10_000_019 + pos
                pos += 1
            epoch += 1


def data_loader(dataset, workers=0, **kw):
    """torch's DataLoader whose worker processes come from a fork server. Forking the training process
    itself while its other threads run (earlier loaders' queue feeders, tqdm's monitor) can leave the
    child deadlocked in CPython before 3.12 (python/cpython#112275: an evaluation loader's worker hung
    in PyOS_AfterFork_Child under torchrun), and evaluation loaders start workers in mid-training."""
    ctx = "forkserver" if workers > 0 and "forkserver" in mp.get_all_start_methods() else None
    return torch.utils.data.DataLoader(dataset, num_workers=workers, multiprocessing_context=ctx, **kw)


def train_batches(dataset, batch_size, info, seed, start_iter=0, workers=0):
    """Endless iterator of training batches for iteration-based schedules: InfiniteSampler sharded over
    the processes, positioned where iteration ``start_iter`` begins (exact resume)."""
    sampler = InfiniteSampler(len(dataset), info.rank, info.world_size, seed, start=start_iter * batch_size)
    return iter(data_loader(dataset, workers, batch_size=batch_size, sampler=sampler, drop_last=True,
                            persistent_workers=workers > 0))


def seed_step(seed, it, rank):
    """Seeds torch's RNG for iteration ``it``: dropout / DropPath become a function of (seed, it, rank),
    so a resumed run draws exactly what the uninterrupted one would have."""
    torch.manual_seed((seed * 1_000_003 + it) * 64 + rank)


def average_gradients(model):
    """Averages the gradients over processes in place (no-op in one process). For losses that need
    several forwards per step (teachers, mixing, auxiliary heads), where DistributedDataParallel's one
    forward / one backward contract does not hold; parameters without a gradient are skipped on every
    rank alike (the same code path runs everywhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_params(model, src=0, buffers_only=False):
    """Copies rank ``src``'s parameters and buffers to every process, as DistributedDataParallel does when
    it wraps a model (all) and before each forward (buffers: BatchNorm statistics): scripts that average
    gradients themselves must start from one model, not from each process's own random initialisation,
    and keep one set of running statistics."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for t in ([] if buffers_only else list(model.parameters())) + list(model.buffers()):
            dist.broadcast(t.data, src=src)
