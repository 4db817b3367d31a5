"""torch.distributed for the training stages: joining the process group, and FSDP2 / DDP wrapping.

Launched by torchrun (``WORLD_SIZE > 1``) the process group is gloo on CPU, nccl on CUDA;
trainable and frozen DiTs are sharded with FSDP2 (`fully_shard` per block and on the root, see
`parallelize`; extra entry points such as ``forward_causal`` are registered with
`register_fsdp_forward_method`) or replicated with DDP (``dist_mode="ddp"``, through a
dispatcher so any method goes through DDP's hooks). Each rank takes ``batch_size / world``
consecutive samples of the global batch (`local_slice`); gradients are averaged, so the update
equals the single-process one on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..devices import resolve_device
from ..errors import InputError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"  # none | fsdp | ddp
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, x: float | torch.Tensor) -> float:
        """Average a scalar over ranks."""
        if not self.distributed:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world


def init_distributed(device: str = "auto", dist_mode: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local, dev, "none")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
        mode = dist_mode
        if mode == "auto":
            mode = "fsdp" if _fully_shard() is not None else "ddp"
        if mode not in ("fsdp", "ddp"):
            raise InputError(f"dist_mode must be auto, fsdp or ddp, got {dist_mode!r}")
        env.mode = mode
        if mode == "fsdp" and _fully_shard() is not None:
            from torch.distributed.device_mesh import init_device_mesh

            env.mesh = init_device_mesh(dev.type, (env.world,))
    return env


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - older torch
        return None
    return fully_shard


FORWARD_METHODS = ("forward_causal", "encode_context", "prefill_sink", "forward_chunk")


class _Dispatch(nn.Module):
    """Lets DDP wrap any method: ``ddp("forward_causal", ...)`` goes through DDP's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class Handle:
    """A model as the stages call it: ``h("forward_causal", ...)`` / ``h(...)`` (forward),
    whatever the parallel wrapping. ``module`` is the model (sharded in place under FSDP2)."""

    def __init__(self, module: nn.Module, ddp: nn.Module | None = None):
        self.module = module
        self.ddp = ddp

    def __call__(self, *args, **kwargs):
        return self.call("forward", *args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        if self.ddp is not None:
            return self.ddp(method, *args, **kwargs)
        fn = self.module if method == "forward" else getattr(self.module, method)
        return fn(*args, **kwargs)


def parallelize(model: nn.Module, env: DistEnv, trainable: bool) -> Handle:
    """Shard (FSDP2) or replicate (DDP) a DiT for ``env``."""
    model.to(env.device)
    if not env.distributed:
        return Handle(model)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import register_fsdp_forward_method

        fully_shard = _fully_shard()
        # One FSDP unit per block (only one block's parameters are gathered at a time), and
        # one for the rest. The blocks' cross-attention K/V are computed outside their forward
        # (`AudioDiT.encode_context`), through `cross_kv`, registered to gather like a forward.
        for blk in getattr(model, "blocks", []):
            fully_shard(blk, mesh=env.mesh)
            if hasattr(blk, "cross_kv"):
                register_fsdp_forward_method(blk, "cross_kv")
        fully_shard(model, mesh=env.mesh)
        for m in FORWARD_METHODS:
            if hasattr(model, m):
                register_fsdp_forward_method(model, m)
        return Handle(model)
    if not trainable:
        return Handle(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return Handle(model, DDP(_Dispatch(model), device_ids=ids, broadcast_buffers=False))


def local_slice(batch_size: int, env: DistEnv) -> range:
    if batch_size % env.world:
        raise InputError(f"batch_size {batch_size} is not divisible by the world size {env.world}")
    k = batch_size // env.world
    return range(env.rank * k, (env.rank + 1) * k)
