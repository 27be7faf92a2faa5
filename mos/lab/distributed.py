"""Training on more than one process: the process group, each rank's share of the batches, gathers.

`torchrun --nproc_per_node=N -m mos train ...` starts N copies of the command and tells each its
RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins them into one process group (gloo on CPU, nccl on
CUDA with one GPU per local rank). A plain `python -m mos train` is a world of one: no group, and
every helper here passes straight through, so the training loop has a single code path.

Sharding: every rank draws the same epoch order (same seed, same generator) and so the same
global batches; rank r takes global batches r, r + N, r + 2N, ... In training the last round wraps
around to the epoch's first batches, so every rank takes the same number of steps: DDP's gradient
all-reduce needs every rank at every step. Each rank also builds the batches it skips, because
`CTRDataset.batches` is the one way batches are made; a batch is one gather out of the shared event
arrays, cheap next to a training step.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mos.lab.errors import InputError
from mos_kernels.backend import cuda_emulating, interpreting, triton_available


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes results and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def single(device) -> Group:
    """The world of one process on `device`."""
    return Group(rank=0, world_size=1, device=torch.device(device))


def check_machine(device_name: str, backend: str) -> None:
    """`InputError` for a device (`train.device`) or kernel backend (`model.mos.backend`) this
    machine does not have: said before any data is loaded."""
    try:
        device = torch.device(device_name)
    except RuntimeError as err:       # torch's own message lists the device types it knows
        raise InputError(f"train.device: expected a device such as 'cpu', 'cuda' or 'cuda:1', got "
                         f"{device_name!r} ({' '.join(str(err).split())[:200]})") from None
    if device.type == "cuda" and device_count() <= (device.index or 0):
        seen = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                else f"torch sees {device_count()} CUDA device(s)")
        raise InputError(f"train.device: expected a device this machine has, got {device_name!r}, but "
                         f"{seen}; use train.device=cpu")
    emulated = {"triton": interpreting, "cuda": cuda_emulating}.get(backend, lambda: True)()
    if device.type != "cuda" and not emulated:
        raise InputError(f"model.mos.backend: {backend!r} runs its kernels on a CUDA device, but train.device is "
                         f"{device_name!r}; use model.mos.backend=auto (the reference kernels on a CPU) "
                         f"or train.device=cuda on a machine with a GPU")
    if backend == "triton" and not triton_available():
        raise InputError("model.mos.backend: 'triton' needs the triton package, which is not installed here "
                         "(it has wheels for Linux only); use model.mos.backend=auto or reference")


def device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def setup(device: str) -> Group:
    """Join the process group torchrun describes in the environment, or stay a world of one.

    With torchrun and `device` "cuda", rank r uses GPU LOCAL_RANK (an index in `device` is ignored)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return single(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    kind = torch.device(device).type
    if kind == "cuda":
        here, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(here)
    elif kind == "cpu":
        here, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"train.device: expected cpu or cuda for training on {world_size} processes, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=here if backend == "nccl" else None)
    return Group(rank=rank, world_size=world_size, device=here)


def teardown(group: Group) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, group: Group) -> torch.nn.Module:
    """The module that trains: DDP around `model` on several processes, `model` itself on one."""
    if not group.distributed:
        return model
    # Themes or experts that get no token in a batch leave parameters without a gradient on that
    # rank; DDP must look for them or it waits for their gradients forever.
    return DistributedDataParallel(model, find_unused_parameters=True)


def steps_per_epoch(num_batches: int, group: Group) -> int:
    """Training steps every rank takes in an epoch of `num_batches` global batches."""
    return -(-num_batches // group.world_size)


def rank_batches(batches: Iterable, num_batches: int, group: Group, *, start: int = 0,
                 wrap_around: bool = True) -> Iterator:
    """This rank's share of one epoch's global `batches` (there are `num_batches`), from its step
    `start` on. `wrap_around` (training) evens the step count out; evaluation takes each batch once."""
    world, rank = group.world_size, group.rank
    if wrap_around:
        picks = [(step * world + rank) % num_batches for step in range(start, steps_per_epoch(num_batches, group))]
    else:
        picks = list(range(rank + start * world, num_batches, world))
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(picks):
        wanted.setdefault(index, []).append(position)
    # Only a wrapped-around pick comes out of order: it waits here, one batch at most.
    ready, position = {}, 0
    for index, batch in enumerate(batches):
        if position == len(picks):
            return
        for slot in wanted.get(index, ()):
            ready[slot] = batch
        while position in ready:
            yield ready.pop(position)
            position += 1


def gather(group: Group, value) -> list:
    """`value` (any picklable object, tensors on the CPU) from every rank, in rank order."""
    if not group.distributed:
        return [value]
    values = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values


def sum_across(group: Group, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over the ranks (a copy; `value` itself is left alone)."""
    total = value.detach().clone()
    if group.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


@contextlib.contextmanager
def main_first(group: Group):
    """Rank 0 runs the block first (say, a download into a shared cache), then the others."""
    if group.distributed and not group.is_main:
        dist.barrier()
    yield
    if group.distributed and group.is_main:
        dist.barrier()


def parameter_digests(group: Group, model: torch.nn.Module) -> list[str]:
    """The sha256 of `model`'s state on every rank; raises when the ranks disagree, which DDP
    should never let happen."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather(group, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"parameters: expected the same on every rank after training, got digests {digests}")
    return digests
