"""The bidirectional teacher as an offline video generator, to compare it with the student.

`talkingmachines eval-model --teacher talkingmachines.eval.teacher_video:factory` loads the
teacher shipped next to the student (`MODEL/teacher`) and samples held-out clips with Euler
steps and audio CFG, as the ODE stage of training does. Keywords follow a third colon, e.g.
`--teacher talkingmachines.eval.teacher_video:factory:steps=8,cfg_audio=2`, and the card's
teacher column says what ran (``generate.sampling``).

The teacher was trained on windows of ``clip_chunks`` chunks (2 x 3 latent frames after the
reference), and that is the length the ODE stage samples it at. A whole held-out clip is up to
50 latent frames: one bidirectional pass over it is a sequence 8x longer than any it saw. So by
default the clip is sampled window by window, each window starting right after the reference
like a training crop (the last window is shifted back to stay full length and only its new
frames are kept); ``window_chunks=0`` samples the whole clip at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import SAMPLES_PER_FRAME
from ..diffusion import flow
from ..errors import InputError
from ..model.audio import audio_windows
from ..model.dit import AudioDiT
from ..stream.generator import fit_image
from ..pipeline import guided_v


def windows(n_lat: int, size: int) -> list[tuple[int, int, int]]:
    """(start, stop, keep_from) of full-length windows covering latent frames [0, n_lat): the
    last one is shifted back to stay ``size`` long and keeps only the frames after keep_from."""
    if size <= 0 or size >= n_lat:
        return [(0, n_lat, 0)]
    out = [(s, s + size, s) for s in range(0, n_lat - size + 1, size)]
    if out[-1][1] < n_lat:
        out.append((n_lat - size, n_lat, out[-1][1]))
    return out


def factory(avatar, steps: int = 16, cfg_audio: float = 2.5, seed: int = 0, window_chunks: int = 2):
    if avatar.folder is None or not (avatar.folder / "teacher").is_dir():
        raise InputError("this model folder has no teacher/ to compare with")
    teacher = AudioDiT.from_pretrained(avatar.folder / "teacher", device=avatar.device, dtype=avatar.dtype)
    teacher.eval().requires_grad_(False)
    p = avatar.preset

    @torch.inference_mode()
    def generate(portrait: np.ndarray, audio: np.ndarray) -> np.ndarray:
        n_frames = math.ceil(len(audio) / SAMPLES_PER_FRAME)
        n_lat = math.ceil(n_frames / 4)
        ref = avatar.vae.encode_image(fit_image(portrait, p.height, p.width)).to(avatar.device, avatar.dtype)
        feats = avatar.frontend.features(torch.as_tensor(audio))
        win = audio_windows(feats, context=p.stream.audio_context, n_latent=n_lat)
        win = win.to(avatar.device, avatar.dtype)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, ref.shape[1], n_lat, *ref.shape[3:]), generator=g).to(avatar.device, avatar.dtype)
        parts = []
        for a, b, keep in windows(n_lat, window_chunks * p.stream.chunk_frames):
            au = torch.cat([torch.zeros_like(win[:1]), win[a:b]])[None]  # the reference frame hears nothing
            fn = guided_v(teacher, ref, au, p, cfg_audio=cfg_audio)
            x = flow.euler_sample(fn, noise[:, :, a:b], flow.sigmas(steps, p.stream.flow_shift))
            parts.append(x[:, :, keep - a:])
        x = torch.cat(parts, dim=2)
        frames = avatar.vae.decode(torch.cat([ref, x.to(ref.dtype)], dim=2))
        return frames[1: 1 + n_frames]

    win_latents = window_chunks * p.stream.chunk_frames
    generate.sampling = (f"{steps} Euler steps, audio CFG {cfg_audio:g}, "
                         + (f"{win_latents}-latent windows" if win_latents > 0 else "whole clip"))
    return generate
