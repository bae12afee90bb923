"""Data-parallel training across processes, as ``torchrun`` launches it.

``torchrun --nproc_per_node N -m course_lib.pretrain ...`` starts N copies of the program and
tells each who it is through environment variables: ``RANK`` (0..N-1 over all machines),
``LOCAL_RANK`` (the GPU index on this machine) and ``WORLD_SIZE`` (N). :func:`init_distributed`
reads them, joins the process group (NCCL between GPUs, gloo between CPU processes, so DDP can
be tested on a laptop) and picks this process's device. Without those variables it is a
single process and nothing is initialised.

Each process holds a full copy of the model; ``DistributedDataParallel`` averages the
gradients across processes during ``backward`` (Li et al., 2020, "PyTorch Distributed").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_lib.utils import get_device


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: ``rank`` of ``world_size``, ``local_rank`` on its machine, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int (set by torchrun), got {value!r}") from None


def check_device(name: str | None) -> torch.device:
    """``course_lib.utils.get_device(name)``, refusing a device name torch does not know, or a GPU
    (``cuda``, ``mps``) that this machine does not have, with a ``ValueError`` naming ``device``."""
    asked = f"device={name!r}" if name else f"COURSE_DEVICE={os.environ.get('COURSE_DEVICE')!r}"
    try:
        device = get_device(name)
    except RuntimeError as error:  # torch.device("gpu"): "Expected one of cpu, cuda, ..."
        raise ValueError(f"{asked} is not a device torch knows ({error}); use cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{asked} but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "use --device=cpu, or leave device empty to pick what is there")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{asked} but this machine has no Apple MPS GPU; use --device=cpu")
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.

    device: ``None`` or ``""`` picks CUDA when visible (GPU ``LOCAL_RANK``), else the CPU;
    ``"cpu"`` forces gloo on CPUs even where GPUs exist. A single process (no torchrun) gets
    ``DistInfo(0, 1, 0, device)`` and no process group.
    """
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} must satisfy 0 <= RANK < WORLD_SIZE")
    base = check_device(device or None)
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if world_size > 1 and not is_distributed():
        backend = "nccl" if base.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, base)


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that prints and saves."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once, at the end of the program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (a new tensor; the input is returned as is in one process)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return out / dist.get_world_size()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (so all of them stop at the same step)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when several processes run, else ``model`` itself.

    The model must already be on ``info.device``. DDP broadcasts rank 0's weights at
    construction, so every process starts from the same parameters.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if info.world_size == 1:
        return model
    if not is_distributed():
        raise ValueError(f"world_size={info.world_size} but no process group is active; call init_distributed()")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
