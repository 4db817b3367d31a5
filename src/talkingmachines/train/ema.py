"""An exponential moving average of a model's weights (fp32, sharded like the model under FSDP)."""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of a model's parameters (kept in fp32, sharded like them).
    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    def full_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.shadow.items():
            out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
        return out

    def load_full(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            src = sd[k]
            if hasattr(v, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(v.device), v.device_mesh, v.placements)
                v.copy_(src)
            else:
                v.copy_(src.to(v.device))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))

