"""The bidirectional teacher as an offline video generator, to compare it with the student.

`talkingmachines eval-model --teacher talkingmachines.eval.teacher_video:factory` loads the
teacher shipped next to the student (`MODEL/teacher`) and samples whole clips with Euler
steps and audio CFG, as the ODE stage of training does.
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


def factory(avatar, steps: int = 16, cfg_audio: float = 2.5, seed: int = 0):
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
        au = torch.cat([torch.zeros_like(win[:1]), win])[None].to(avatar.device, avatar.dtype)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, ref.shape[1], n_lat, *ref.shape[3:]), generator=g).to(avatar.device, avatar.dtype)
        fn = guided_v(teacher, ref, au, p, cfg_audio=cfg_audio)
        x = flow.euler_sample(fn, noise, flow.sigmas(steps, p.stream.flow_shift))
        frames = avatar.vae.decode(torch.cat([ref, x.to(ref.dtype)], dim=2))
        return frames[1: 1 + n_frames]

    return generate
