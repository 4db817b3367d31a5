"""The options that pick a model and where it runs (``--preset --model --device --seed --steps``),
shared by every command that streams (generate, demo, bench, eval-model, serve), and loading
the avatar they name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Preset, get_preset
from ..errors import InputError


def add_model_args(p: argparse.ArgumentParser, seed: bool = True, steps: bool = True, vae_dtype: bool = True) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny, the shipped model)")
    p.add_argument("--model", default=None, help="a talkingmachines model folder (default: the shipped tiny model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU, else CPU), cpu, cuda, cuda:1, ...")
    if vae_dtype:
        p.add_argument("--vae-dtype", default="fp32", choices=sorted(VAE_DTYPES),
                       help="the VAE's precision (default fp32; bf16 decodes ~1.6x faster on an H100)")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    if steps:
        p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the student's 2)")


VAE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vae_torch_dtype(name: str):
    import torch

    return getattr(torch, VAE_DTYPES[name])


def preset_from_args(args) -> Preset:
    """The preset of ``--model`` (its preset.json), else ``--preset``; one-line errors."""
    if args.model:
        f = Path(args.model) / "preset.json"
        if not f.is_file():
            raise InputError(f"{args.model}: not a talkingmachines model folder (no preset.json)")
        return Preset.load(f)
    try:
        return get_preset(args.preset)
    except ValueError as e:
        raise InputError(str(e)) from None


def load_from_args(args):
    """The avatar the options name (random weights, said on stderr, for a preset without any)."""
    from ..devices import resolve_device
    from .generator import load_avatar

    device = resolve_device(args.device)
    preset_from_args(args)  # clear error for a bad --model / --preset
    avatar = load_avatar(args.model, args.preset, device, vae_dtype=vae_torch_dtype(getattr(args, "vae_dtype", "fp32")))
    if avatar.random_weights:
        print(f"NOTE: preset {avatar.preset.name!r} has no trained weights here: using RANDOM weights "
              "(the video will be noise-like; speed figures are still real).", file=sys.stderr)
    return avatar
