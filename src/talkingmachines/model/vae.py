"""Video VAEs: the tiny VAE of the `tiny` preset and Wan-VAE (diffusers `AutoencoderKLWan`).

Time convention (Wan-VAE's, shared by both): a video of ``T = 1 + 4k`` frames maps to
``1 + k`` latent frames. Latent 0 <-> video frame 0 (the reference image, the "sink");
latent ``j >= 1`` <-> video frames ``4j-3 .. 4j``. Spatial compression is 8x.

Both VAEs implement the small `VideoVAE` interface the rest of the project codes against:

* ``encode_video(video) -> latents`` normalised (per channel, with ``latents_mean`` and
  ``latents_std``) so the diffusion model sees roughly unit variance, ``[B, C, 1 + (T-1)//4, h, w]``;
* ``encode_image(image) -> [1, C, 1, h, w]`` (the sink latent of a still image);
* ``decode(latents) -> uint8 [T, H, W, 3]`` (whole clip); ``decode_float`` gives the float
  ``[B, 3, T, H, W]`` in [-1, 1];
* ``stream_decoder()`` -> an object whose ``decode(z_chunk [1, C, t, h, w])`` returns the
  next uint8 frames ``[F, H, W, 3]`` carrying the causal state across calls (the first call's
  first latent is the sink and yields 1 frame, every other latent yields 4), and ``reset()``.

Pixels are in [-1, 1] inside, uint8 ``[..., H, W, 3]`` at the edges.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import atomic_write

__all__ = [
    "VideoVAE",
    "StreamDecoder",
    "TinyVAEConfig",
    "TinyVAE",
    "TinyStreamingDecoder",
    "WanVAE",
    "WanStreamingDecoder",
    "load_vae",
    "as_video_vae",
    "video_to_tensor",
    "tensor_to_uint8",
]

SPATIAL = 8
TEMPORAL = 4

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# --------------------------------------------------------------------------------------
# pixel helpers
# --------------------------------------------------------------------------------------


def video_to_tensor(video: Any, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` / ``[B, T, H, W, 3]`` (numpy or torch) -> float ``[B, 3, T, H, W]`` in [-1, 1].

    A float tensor already shaped ``[B, 3, T, H, W]`` (or ``[3, T, H, W]``) passes through
    (assumed in [-1, 1]).
    """
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.ndim == 4:
            video = video[None]
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be [T, H, W, 3] or [B, T, H, W, 3], got {tuple(video.shape)}")
        x = video.to(device=device).permute(0, 4, 1, 2, 3).to(dtype)
        return x / 127.5 - 1.0
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"float video must be [B, 3, T, H, W], got {tuple(video.shape)}")
    return video.to(device=device, dtype=dtype)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[B, 3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (B == 1) or ``[B, T, H, W, 3]``."""
    u = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    u = u.permute(0, 2, 3, 4, 1).cpu().numpy()
    return u[0] if u.shape[0] == 1 else u


def _check_frames(t: int) -> None:
    if t < 1 or (t - 1) % TEMPORAL:
        raise ValueError(f"video must have 1 + 4k frames (1, 5, 9, 13, ...), got {t}")


# --------------------------------------------------------------------------------------
# the common interface
# --------------------------------------------------------------------------------------


class StreamDecoder:
    """Decodes latent chunks one after another, carrying the causal state (constant memory)."""

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:  # [1, C, t, h, w] -> [1, 3, F, H, W]
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Normalised latents ``[1, C, t, h, w]`` -> uint8 frames ``[F, H, W, 3]``."""
        return tensor_to_uint8(self.decode_float(z))

    def reset(self) -> None:
        raise NotImplementedError

    def state_numel(self) -> int:
        """Elements held in the causal state (for memory checks)."""
        raise NotImplementedError


class VideoVAE:
    """What the generator, trainers and tools need from a video VAE."""

    spatial: int = SPATIAL
    temporal: int = TEMPORAL

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def encode_video(self, video: Any) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` or float ``[B, 3, T, H, W]`` -> normalised ``[B, C, 1 + (T-1)//4, h, w]``."""
        raise NotImplementedError

    def encode_image(self, image: Any) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` (or float ``[B, 3, H, W]``) -> normalised ``[B, C, 1, h, w]``."""
        if isinstance(image, np.ndarray):
            image = torch.tensor(image)  # a copy: read-only arrays (e.g. from PIL) are fine
        if image.dtype == torch.uint8:
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image must be uint8 [H, W, 3], got {tuple(image.shape)}")
            return self.encode_video(image[None])
        if image.ndim == 3:
            image = image[None]
        return self.encode_video(image[:, :, None])

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, t, h, w]`` -> float video ``[B, 3, 1 + 4(t-1), H, W]`` in [-1, 1]."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 ``[T, H, W, 3]`` (``[B, T, H, W, 3]`` when B > 1)."""
        return tensor_to_uint8(self.decode_float(latents))

    def stream_decoder(self) -> StreamDecoder:
        raise NotImplementedError

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.spatial, width // self.spatial

    @staticmethod
    def latent_frames(video_frames: int) -> int:
        _check_frames(video_frames)
        return 1 + (video_frames - 1) // TEMPORAL

    @staticmethod
    def video_frames(latent_frames: int) -> int:
        return 1 + TEMPORAL * (latent_frames - 1)


# --------------------------------------------------------------------------------------
# TinyVAE
# --------------------------------------------------------------------------------------


# The widths the recipes train, per spatial factor: 8x is the shipped `tiny` VAE; 4x drops the H/8
# level (configs/tiny-face5-x4.json). Used where only a preset is known (plan, speed estimates),
# and the config's defaults.
TINY_WIDTHS = {8: ((32, 64, 128), (96, 48, 24)), 4: ((32, 128), (96, 48))}


@dataclass
class TinyVAEConfig:
    latent_channels: int = 8
    in_channels: int = 3
    spatial: int = SPATIAL  # 8 or 4: pixel-unshuffle 2x + one stride-2 conv per further 2x
    temporal: int = TEMPORAL  # fixed: 4 frames stacked on channels per latent
    enc_widths: tuple[int, ...] = TINY_WIDTHS[8][0]  # at H/2, H/4(, H/8): one per 2x of `spatial`
    enc_res_blocks: int = 1
    dec_widths: tuple[int, ...] = TINY_WIDTHS[8][1]  # at (H/8,) H/4, H/2
    dec_res_blocks: int = 1
    # the decoder also sees the stream's first latent (the portrait's, clean): what does not move (eyes,
    # hair, background) can be copied from it where the DiT's latents are smudged
    decoder_ref: bool = False
    latents_mean: list[float] = field(default_factory=lambda: [0.0] * 8)
    latents_std: list[float] = field(default_factory=lambda: [1.0] * 8)

    def __post_init__(self) -> None:
        self.enc_widths = tuple(self.enc_widths)
        self.dec_widths = tuple(self.dec_widths)
        if self.spatial not in (4, 8) or self.temporal != TEMPORAL:
            raise ValueError("TinyVAE supports spatial 8 or 4 and temporal 4 only")
        levels = self.spatial.bit_length() - 1  # 2x steps: 3 for 8, 2 for 4
        if len(self.enc_widths) != levels or len(self.dec_widths) != levels:
            raise ValueError(f"spatial {self.spatial} needs {levels} encoder and decoder widths, "
                             f"got {list(self.enc_widths)} and {list(self.dec_widths)}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (*self.enc_widths, *self.dec_widths)):
            raise ValueError(f"widths must be whole numbers >= 1, got {list(self.enc_widths)} and {list(self.dec_widths)}")
        if not isinstance(self.decoder_ref, bool):
            raise ValueError(f"decoder_ref must be true or false, got {self.decoder_ref!r}")
        for name in ("enc_res_blocks", "dec_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
        c = self.latent_channels
        if len(self.latents_mean) != c:
            self.latents_mean = [0.0] * c
        if len(self.latents_std) != c:
            self.latents_std = [1.0] * c
        self.latents_mean = [float(v) for v in self.latents_mean]
        self.latents_std = [float(v) for v in self.latents_std]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["enc_widths"] = list(self.enc_widths)
        d["dec_widths"] = list(self.dec_widths)
        d["_class_name"] = "TinyVAE"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def tiny_vae_config(spatial: int = 8, latent_channels: int = 8) -> TinyVAEConfig:
    """The recipe's TinyVAE geometry for a spatial factor (8 or 4)."""
    if spatial not in TINY_WIDTHS:
        raise ValueError(f"TinyVAE supports spatial 8 or 4, got {spatial}")
    enc, dec = TINY_WIDTHS[spatial]
    return TinyVAEConfig(latent_channels=latent_channels, spatial=spatial, enc_widths=enc, dec_widths=dec)


class _Res(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class _Up(nn.Module):
    """silu -> conv to 4x channels -> pixel shuffle (2x up) -> silu -> conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Conv2d(cin, 4 * cout, 3, padding=1)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(self.up(F.silu(x)), 2)
        return x + self.conv(F.silu(x))


class TinyEncoder(nn.Module):
    """One temporal group (4 frames stacked on channels, [N, 12, H, W]) -> [N, 2C, H/s, W/s]
    (s = ``cfg.spatial``)."""

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        w = cfg.enc_widths
        cin = cfg.in_channels * TEMPORAL * 4  # after pixel-unshuffle 2x
        self.spatial = cfg.spatial
        self.conv_in = nn.Conv2d(cin, w[0], 3, padding=1)
        self.down1 = nn.Conv2d(w[0], w[1], 3, stride=2, padding=1)
        if len(w) > 2:  # spatial 8 (named down2 so that older checkpoints load)
            self.down2 = nn.Conv2d(w[1], w[2], 3, stride=2, padding=1)
        w2 = w[-1]
        self.res = nn.ModuleList(_Res(w2) for _ in range(cfg.enc_res_blocks))
        self.conv_out = nn.Conv2d(w2, 2 * cfg.latent_channels, 3, padding=1)
        # linear shortcut: s x s average colour of the 4 frames -> latent mean (coarse colour is
        # learnt in a few steps; the conv path learns the detail)
        self.skip = nn.Conv2d(cfg.in_channels * TEMPORAL, cfg.latent_channels, 1)
        with torch.no_grad():  # start with a narrow posterior (logvar ~ -6) so the decoder sees the mean
            c = cfg.latent_channels
            self.conv_out.weight[c:].mul_(0.1)
            self.conv_out.bias[c:].fill_(-6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(x, self.spatial))
        x = F.pixel_unshuffle(x, 2)
        x = F.silu(self.conv_in(x))
        x = self.down1(x)
        if hasattr(self, "down2"):
            x = self.down2(F.silu(x))
        for r in self.res:
            x = r(x)
        out = self.conv_out(F.silu(x))
        c = skip.shape[1]
        return torch.cat([out[:, :c] + skip, out[:, c:]], dim=1)


class TinyDecoder(nn.Module):
    """[N, 2C + 1, h, w] (latent j, latent j-1, is-first flag; with ``cfg.decoder_ref`` then the
    reference latent, [N, 3C + 1, h, w]) -> 4 frames [N, 12, s*h, s*w] (s = ``cfg.spatial``)."""

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        d = cfg.dec_widths
        self.spatial = cfg.spatial
        self.conv_in = nn.Conv2d((3 if cfg.decoder_ref else 2) * cfg.latent_channels + 1, d[0], 3, padding=1)
        self.res = nn.ModuleList(_Res(d[0]) for _ in range(cfg.dec_res_blocks))
        self.up1 = _Up(d[0], d[1])
        if len(d) > 2:  # spatial 8
            self.up2 = _Up(d[1], d[2])
        self.conv_out = nn.Conv2d(d[-1], 4 * cfg.in_channels * TEMPORAL, 3, padding=1)
        # linear shortcut: latent j -> the 4 frames' coarse colour, bilinearly upsampled s x
        self.skip = nn.Conv2d(cfg.latent_channels, cfg.in_channels * TEMPORAL, 1)
        self.latent_channels = cfg.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x[:, : self.latent_channels])
        skip = F.interpolate(skip, scale_factor=self.spatial, mode="bilinear", align_corners=False)
        x = self.conv_in(x)
        for r in self.res:
            x = r(x)
        x = self.up1(x)
        if hasattr(self, "up2"):
            x = self.up2(x)
        return F.pixel_shuffle(self.conv_out(F.silu(x)), 2) + skip


class TinyVAE(nn.Module, VideoVAE):
    """A small, fast causal video VAE (8x or 4x spatial, 4x temporal) for the `tiny` preset.

    Encoder: each temporal group is encoded independently by a 2-D conv net; group 0 is
    frame 0 replicated 4 times (a still), group j >= 1 is frames 4j-3..4j stacked on channels.
    It predicts a diagonal Gaussian (mean, logvar); encoding uses the mean.
    Decoder: latent j together with latent j-1 (causal context; zeros and a flag for the sink)
    goes through a 2-D conv net with pixel-shuffle upsampling to 4 frames; the sink keeps the
    last of its 4 outputs (1 frame). The streaming state is therefore one latent frame (and, with
    ``decoder_ref``, the stream's first latent, which every latent is decoded beside).
    """

    def __init__(self, config: TinyVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyVAEConfig()
        self.encoder = TinyEncoder(self.config)
        self.decoder = TinyDecoder(self.config)
        c = self.config.latent_channels
        self.register_buffer("latents_mean", torch.tensor(self.config.latents_mean).view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(self.config.latents_std).view(1, c, 1, 1, 1), persistent=False)

    # ---- properties
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial(self) -> int:  # type: ignore[override]
        return self.config.spatial

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_latent_stats(self, mean: Any, std: Any) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        c = self.latent_channels
        self.config.latents_mean = [float(v) for v in mean]
        self.config.latents_std = [float(v) for v in std]
        self.latents_mean = mean.view(1, c, 1, 1, 1).to(self.device, self.dtype)
        self.latents_std = std.view(1, c, 1, 1, 1).to(self.device, self.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)

    # ---- raw (un-normalised) paths, used by training
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float ``[B, 3, T, H, W]`` in [-1, 1] -> raw (mean, logvar), each ``[B, C, t, h, w]``."""
        b, ch, t, hh, ww = x.shape
        _check_frames(t)
        s = self.spatial
        if hh % s or ww % s:
            raise ValueError(f"height and width must be divisible by {s}, got {hh}x{ww}")
        first = x[:, :, :1].expand(b, ch, TEMPORAL, hh, ww)
        groups = torch.cat([first, x[:, :, 1:]], dim=2)  # [B, 3, 4n, H, W]
        n = groups.shape[2] // TEMPORAL
        g = groups.view(b, ch, n, TEMPORAL, hh, ww).permute(0, 2, 3, 1, 4, 5)  # [B, n, 4, 3, H, W]
        g = g.reshape(b * n, TEMPORAL * ch, hh, ww)
        out = self.encoder(g)
        out = out.view(b, n, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, 2C, n, h, w]
        mean, logvar = out.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z: torch.Tensor, prev: torch.Tensor | None = None, first: bool = True,
                   ref: torch.Tensor | None = None) -> torch.Tensor:
        """Raw latents ``[B, C, t, h, w]`` -> float ``[B, 3, F, H, W]`` (unclamped).

        ``prev`` is the raw latent frame before ``z[:, :, 0]`` (``[B, C, 1, h, w]``); with
        ``first=True`` ``z[:, :, 0]`` is the sink (no context) and yields one frame. A
        ``decoder_ref`` VAE decodes every latent beside ``ref`` (``[B, C, 1, h, w]``), the
        stream's first latent: ``z[:, :, :1]`` when ``first`` and no ``ref`` is given.
        """
        b, c, t, h, w = z.shape
        if first:
            ctx0 = torch.zeros_like(z[:, :, :1])
        else:
            if prev is None:
                raise ValueError("prev latent is required when first=False")
            ctx0 = prev.to(z.dtype)
        ctx = torch.cat([ctx0, z[:, :, :-1]], dim=2)
        flag = torch.zeros(b, 1, t, h, w, dtype=z.dtype, device=z.device)
        if first:
            flag[:, :, 0] = 1.0
        parts = [z, ctx, flag]
        if self.config.decoder_ref:
            if ref is None:
                if not first:
                    raise ValueError("a decoder_ref VAE needs the reference latent when first=False")
                ref = z[:, :, :1]
            parts.append(ref.to(z.dtype).expand(b, c, t, h, w))
        elif ref is not None:
            raise ValueError("ref is for a decoder_ref VAE; this one decodes without it")
        cin = sum(x.shape[1] for x in parts)
        inp = torch.cat(parts, dim=1).permute(0, 2, 1, 3, 4).reshape(b * t, cin, h, w)
        out = self.decoder(inp)  # [B*t, 12, H, W]
        ch = self.config.in_channels
        s = self.spatial
        out = out.view(b, t, TEMPORAL, ch, h * s, w * s).permute(0, 3, 1, 2, 4, 5)
        out = out.reshape(b, ch, t * TEMPORAL, h * s, w * s)
        if first:
            out = out[:, :, TEMPORAL - 1:]
        return out

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: float video -> (reconstruction, mean, logvar)."""
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + eps * torch.exp(0.5 * logvar)
        return self.decode_raw(z), mean, logvar

    # ---- VideoVAE interface
    @torch.no_grad()
    def encode_video(self, video: Any) -> torch.Tensor:
        x = video_to_tensor(video, self.device, self.dtype)
        mean, _ = self.encode_moments(x)
        return self.normalize(mean)

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(latents.to(self.device, self.dtype))
        return self.decode_raw(z).clamp(-1.0, 1.0)

    def stream_decoder(self) -> "TinyStreamingDecoder":
        return TinyStreamingDecoder(self)

    def with_new_decoder(self, dec_widths: Any, dec_res_blocks: int, seed: int = 0) -> "TinyVAE":
        """A copy with this encoder (weights and latent statistics, so the same latents) and a freshly
        initialised decoder of other widths: a larger decoder can then be trained under a DiT that
        was trained on this encoder's latents (`vae_train.VAEOptions.dec_widths`)."""
        d = self.config.to_dict()
        d.update(dec_widths=list(dec_widths), dec_res_blocks=dec_res_blocks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the new decoder's initial weights depend on the seed only
            vae = TinyVAE(TinyVAEConfig.from_dict(d))
        vae.encoder.load_state_dict(self.encoder.state_dict())
        return vae.to(self.device, self.dtype)

    def with_ref_decoder(self) -> "TinyVAE":
        """A copy whose decoder also sees the reference latent (``decoder_ref``), starting as exactly
        this decoder: the new input channels' weights are zero, so it ignores the reference until
        trained to use it (`vae_train.VAEOptions.decoder_ref`)."""
        if self.config.decoder_ref:
            raise ValueError("this VAE's decoder already sees the reference latent")
        d = self.config.to_dict()
        d["decoder_ref"] = True
        vae = TinyVAE(TinyVAEConfig.from_dict(d)).to(self.device, self.dtype)
        state = self.state_dict()
        w = state["decoder.conv_in.weight"]
        grown = w.new_zeros(w.shape[0], w.shape[1] + self.latent_channels, *w.shape[2:])
        grown[:, : w.shape[1]] = w
        state["decoder.conv_in.weight"] = grown
        vae.load_state_dict(state)
        return vae

    # ---- persistence (safetensors + config.json, never pickle)
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        text = json.dumps(self.config.to_dict(), indent=2)
        atomic_write(path / CONFIG_NAME, lambda p: Path(p).write_text(text))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "TinyVAE":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no TinyVAE config at {cfg_file}")
        cfg = TinyVAEConfig.from_dict(json.loads(cfg_file.read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.to(device).eval()


class TinyStreamingDecoder(StreamDecoder):
    """TinyVAE streaming decoder: the causal state is the last raw latent frame, and for a
    ``decoder_ref`` VAE the stream's first one (the sink: the portrait's latent)."""

    def __init__(self, vae: TinyVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self.prev: torch.Tensor | None = None
        self.ref: torch.Tensor | None = None

    def state_numel(self) -> int:
        return sum(0 if x is None else x.numel() for x in (self.prev, self.ref))

    @torch.no_grad()
    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        raw = vae.denormalize(z.to(vae.device, vae.dtype))
        if vae.config.decoder_ref and self.ref is None:
            self.ref = raw[:, :, :1].clone()
        out = vae.decode_raw(raw, prev=self.prev, first=self.prev is None, ref=self.ref)
        self.prev = raw[:, :, -1:].clone()
        return out.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------
# Wan-VAE (diffusers AutoencoderKLWan)
# --------------------------------------------------------------------------------------


def _wan_stats(vae: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    return mean, std


class WanStreamingDecoder(StreamDecoder):
    """Streams diffusers' `AutoencoderKLWan` decoder across calls with our own causal cache.

    Mirrors `AutoencoderKLWan._decode` (one latent frame per decoder call, ``first_chunk=True``
    for the very first frame of the stream, unpatchify when the config has ``patch_size``,
    clamp to [-1, 1]) but keeps ``feat_cache`` between calls instead of clearing it, so
    sink + chunk + chunk + ... equals ``vae.decode`` of the whole clip. The cache holds at
    most 2 frames per causal conv: memory is constant over an endless stream.
    Input latents are normalised (``(z - latents_mean) / latents_std``, the pipelines' convention).
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self.feat_cache: list = [None] * self.vae._cached_conv_counts["decoder"]
        self.frames_done = 0

    def state_numel(self) -> int:
        return sum(t.numel() for t in self.feat_cache if isinstance(t, torch.Tensor))

    @torch.no_grad()
    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        p = next(vae.parameters())
        z = z.to(p.device, p.dtype)
        mean, std = _wan_stats(vae, z.device, z.dtype)
        x = vae.post_quant_conv(z * std + mean)  # 1x1x1 conv: frame-wise
        outs = []
        for i in range(x.shape[2]):
            feat_idx = [0]
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.feat_cache, feat_idx=feat_idx,
                                    first_chunk=self.frames_done == 0))
            self.frames_done += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)


class WanVAE(VideoVAE):
    """`VideoVAE` over a diffusers `AutoencoderKLWan` (Wan2.1: 16 channels, 8x / 4x)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial(self) -> int:  # type: ignore[override]
        return int(self.vae.config.scale_factor_spatial or SPATIAL)

    @property
    def temporal(self) -> int:  # type: ignore[override]
        return int(self.vae.config.scale_factor_temporal or TEMPORAL)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, *args: Any, **kwargs: Any) -> "WanVAE":
        self.vae.to(*args, **kwargs)
        return self

    def eval(self) -> "WanVAE":
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode_video(self, video: Any) -> torch.Tensor:
        x = video_to_tensor(video, self.device, self.dtype)
        _check_frames(x.shape[2])
        z = self.vae.encode(x).latent_dist.mode()
        mean, std = _wan_stats(self.vae, z.device, z.dtype)
        return (z - mean) / std

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.dtype)
        mean, std = _wan_stats(self.vae, z.device, z.dtype)
        return self.vae.decode(z * std + mean).sample  # diffusers clamps to [-1, 1]

    def stream_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self.vae)


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def as_video_vae(vae: Any) -> VideoVAE:
    """Wrap a raw diffusers `AutoencoderKLWan` as a `VideoVAE` (other VideoVAEs pass through)."""
    if isinstance(vae, VideoVAE):
        return vae
    if type(vae).__name__ == "AutoencoderKLWan":
        return WanVAE(vae)
    raise TypeError(f"not a video VAE: {type(vae).__name__}")


def load_vae(kind: str, path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> VideoVAE:
    """``kind="tiny"``: a TinyVAE folder (config.json + model.safetensors).
    ``kind="wan"``: a diffusers `AutoencoderKLWan` folder (e.g. ``WAN_DIR/vae``); if ``path``
    holds a ``vae`` subfolder, that is used.
    """
    path = Path(path)
    if kind == "tiny":
        vae = TinyVAE.from_pretrained(path, device=device)
        if dtype is not None:
            vae = vae.to(dtype)
        return vae
    if kind == "wan":
        from diffusers import AutoencoderKLWan

        if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
            path = path / "vae"
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        model = AutoencoderKLWan.from_pretrained(str(path), **kw)
        return WanVAE(model.to(device).eval())
    raise ValueError(f"unknown VAE kind {kind!r}; use 'tiny' or 'wan'")
