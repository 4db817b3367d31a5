"""The optimiser: AdamW over the trainable parameters, the learning-rate schedule, and its state
as safetensors (tensors) + JSON (the rest), keyed by parameter name (FSDP-aware)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .checkpoint import state_dict_options


def adamw(model: nn.Module, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay)


def lr_at(n: int, lr: float, warmup: int, schedule: str, total: int, decay: int = 0) -> float:
    """The learning rate of update ``n`` (0-based) of ``total``: linear warmup over ``warmup``
    updates, then constant, or (``schedule="cosine"``) cosine down to 0.1 ``lr`` at ``total``, or
    (``"wsd"``, warmup-stable-decay) constant until the last ``decay`` updates, which cosine down
    to 0.1 ``lr``. wsd lets a long constant-rate run be extended and still end annealed: its
    first ``total - decay`` updates do not depend on ``total``."""
    if warmup > 0 and n < warmup:
        return lr * (n + 1) / warmup
    if schedule == "cosine":
        p = min(1.0, (n - warmup) / max(1, total - warmup))
    elif schedule == "wsd" and decay > 0:
        p = min(1.0, max(0, n - (total - decay)) / decay)
    else:
        return lr
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_to_flat(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=state_dict_options(full_state_dict=True, cpu_offload=True))
    tensors, scalars = {}, {}
    for name, st in sd.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = []
    for g in sd.get("param_groups", []):
        g = dict(g)
        g["betas"] = list(g["betas"]) if "betas" in g else None
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    for name, st in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if g.get("betas") is not None:
            g["betas"] = tuple(g["betas"])
        else:
            g.pop("betas", None)
        groups.append(g)
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=state_dict_options(full_state_dict=True))


