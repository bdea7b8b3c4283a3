"""Process-group setup for training, under a launcher or standalone.

:func:`init_distributed` makes ``torch.distributed`` and ``deepspeed.comm`` ready in every way the trainer is started:

* under ``torchrun`` or the ``deepspeed`` launcher: the environment carries ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``, and the group is initialised from it (``env://``);
* as a plain ``python`` process without those variables: a one-process group on 127.0.0.1 and a free port, so that
  DeepSpeed (which always needs a process group) runs the same code path as in a multi-process job;
* when a group already exists (the caller made it): it is reused as it is.

The backend is NCCL when CUDA is available and gloo otherwise (DeepSpeed's CPU path, as measured in design.md §7).
:func:`shutdown` destroys the group, but only one this module created standalone; a launcher's group belongs to its
launcher's processes and ends with them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_created_standalone = False
_saved_env: dict = {}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process may take it before the
    caller binds it, which is why only the standalone one-process case relies on this)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> DistInfo:
    """Initialise (or reuse) the default process group and DeepSpeed's communication backend; returns this process's
    rank, world size, local rank, compute device (``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``) and the
    backend name. Idempotent."""
    global _created_standalone
    import deepspeed  # imported here: it is slow to import and prints on import

    backend = backend or default_backend()
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"init_distributed: 'backend' must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
    if not dist.is_initialized():
        _reset_deepspeed_comm()  # a default group destroyed since DeepSpeed last saw one leaves stale state behind
        if not all(k in os.environ for k in _ENV):
            partial = [k for k in _ENV if k in os.environ]
            if partial and "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
                raise RuntimeError(f"init_distributed: the environment sets {partial} but not all of {list(_ENV)}; "
                                   "start multi-process jobs with torchrun or the deepspeed launcher")
            # Standalone: a one-process group. DeepSpeed reads these variables itself (LOCAL_RANK in the engine).
            _saved_env.clear()
            _saved_env.update({k: os.environ.get(k) for k in _ENV + ("LOCAL_WORLD_SIZE",)})
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
            _created_standalone = True
        kwargs = {} if timeout is None else {"timeout": timeout}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
    else:
        # A group made by the caller: DeepSpeed wraps it without re-initialising.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, dist.get_backend())


def _reset_deepspeed_comm() -> None:
    """Forget DeepSpeed's communication state: its backend object (``deepspeed.comm.comm.cdb``) and the process
    groups cached in ``deepspeed.utils.groups``. Both outlive ``dist.destroy_process_group()``; reused with a new
    default group they make the next engine fail ("Group ... is not registered"). Only call it with no default group."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.lstrip("_").replace("_", "").isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None
    groups.mesh_device = None


def shutdown() -> None:
    """Destroy the process group if :func:`init_distributed` created it standalone, and restore the environment
    variables it set (no-op otherwise)."""
    global _created_standalone
    if not _created_standalone:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    _reset_deepspeed_comm()
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _created_standalone = False
