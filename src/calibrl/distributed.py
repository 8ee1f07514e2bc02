"""Process ranks, read from the environment that ``torchrun``, ``deepspeed`` or ``accelerate launch``
set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), and the few collectives calibrl needs.

One process (no such variables) is rank 0 of 1 and every helper here is then a no-op, so the
single-process path never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "dist_info", "free_port", "gather_objects", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes (>= 1).
        local_rank: rank within the node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that logs and writes run files."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Ranks from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, deepspeed, accelerate),
    else from SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (one task per
    process, e.g. Hydra's submitit launcher), else one process.

    Raises:
        ValueError: inconsistent values (rank outside [0, world_size)).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0)))
    else:
        info = DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} is not in [0, WORLD_SIZE={info.world_size})")
    return info


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str = "gloo", always: bool = False) -> DistInfo:
    """Join the process group when launched with several processes, or with ``always`` (DeepSpeed
    needs a process group even for one process; without launcher variables a one-process group is
    made on a free local port). Idempotent.

    On CPU the backend is ``gloo`` (``DS_ACCELERATOR=cpu`` for DeepSpeed); ``nccl`` on GPUs. The
    rendezvous comes from ``MASTER_ADDR`` / ``MASTER_PORT``, which torchrun and the deepspeed
    launcher set (under SLURM, ``conf/hydra/launcher/slurm.yaml`` exports them).

    Raises:
        ValueError: several processes without ``MASTER_ADDR`` / ``MASTER_PORT``.
    """
    info = dist_info()
    if always and info.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if (info.world_size > 1 or always) and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"{info.world_size} processes but {' and '.join(missing)} unset: the rendezvous needs them")
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; e.g. the run directory rank 0 chose)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` with one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64); ``values`` itself with one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
