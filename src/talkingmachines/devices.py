"""What a ``--device`` names: ``auto`` is CUDA when the machine has a GPU, else the CPU (the
default of every command); a CUDA device on a machine without one is a one-line error."""

from __future__ import annotations

from .errors import InputError


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` or ``cpu``; anything else is checked and returned as given."""
    import torch

    d = str(device or "auto").strip()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise InputError(f"--device {d}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {d}: CUDA is not available on this machine")
    return d


def indexed_device(device):
    """``device`` as a torch.device with its CUDA index filled in: torch.device("cuda") != a
    tensor's "cuda:0", so comparing the two would take one GPU for two."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d
