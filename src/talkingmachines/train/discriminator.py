"""A patch discriminator for the decoder's adversarial fine-tune (`vae_train.VAEOptions.adv_weight`).

A decoder trained on L1/MSE alone draws the mean of what a latent might hold: soft eyes and
lips, which is what a face detector misses first. A PatchGAN (Isola et al. 2017, as in the
VQGAN / Stable Diffusion autoencoders) scores each ~40-pixel patch (its receptive field: 38 pixels) of a frame as real or
decoded, so the decoder is pushed towards crisp local texture without a pretrained network
(none can be downloaded here). Hinge losses; GroupNorm instead of BatchNorm so that a score
does not depend on the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchDiscriminator", "frames_of", "hinge_d_loss", "adaptive_weight"]


class PatchDiscriminator(nn.Module):
    """frames [N, 3, H, W] in [-1, 1] -> patch logits [N, 1, H/8, W/8]."""

    def __init__(self, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        w = width
        for _ in range(layers - 1):
            mods += [nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2)]
            w *= 2
        mods.append(nn.Conv2d(w, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B*T, 3, H, W]."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last: torch.Tensor,
                    cap: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: the adversarial term scaled so that its gradient on the decoder's last
    layer ``last`` is as large as the reconstruction's (detached; ``cap`` keeps an untrained
    discriminator's near-zero gradient from blowing it up)."""
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, cap).detach()
