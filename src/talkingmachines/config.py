"""Presets and stream settings.

A preset is a `DiTConfig` (the score network, field names follow diffusers'
`WanTransformer3DModel` so real Wan2.1 configs map one to one) plus the audio and
streaming settings that TalkingMachines adds on top.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Time grid shared by every stage: video frames per second and audio sample rate.
FPS = 25
SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
VAE_TEMPORAL = 4  # one latent frame covers 4 video frames (the first latent: 1 frame)


@dataclass
class DiTConfig:
    # --- Wan2.1 transformer (diffusers `WanTransformer3DModel` names) ---
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 36  # 16 noisy latent + 4 mask + 16 reference latent
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = 1280  # CLIP image tokens (I2V); None for models without them
    rope_max_seq_len: int = 1024
    # --- TalkingMachines additions ---
    audio_dim: int | None = 768  # audio feature size (wav2vec2-base 768); None: no audio layers
    audio_window: int = 8  # audio feature frames each latent frame attends to
    audio_proj_dim: int | None = None  # width of the audio projector (default: model dim)
    # zero-init the audio output projection: right when adapting a pretrained Wan (it starts
    # unchanged), but a model trained from scratch (tiny) then learns to ignore the audio
    audio_zero_init: bool = True

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def token_bottleneck(self) -> str | None:
        """Why a token cannot carry its patch, or None. proj_out maps `dim` features to
        out_channels x patch values per token, so with more values than features its output lies in a
        `dim`-wide subspace. The flow target (noise - x0) has noise in every direction: the part
        outside that subspace is never predicted, a loss floor, and sampling never removes that
        noise (tiny-face5-x4, patch 4 on a 16-channel 4x VAE, 256 values from 128: its teacher's
        loss stayed near 0.7 from step 5000 to 23600, the shipped teacher's ends at 0.21)."""
        n = self.out_channels * math.prod(self.patch_size)
        if n <= self.dim:
            return None
        return (f"each token predicts {n} latent values (patch {'x'.join(map(str, self.patch_size))} x "
                f"{self.out_channels} channels) from {self.dim} features: the DiT cannot draw the detail its "
                "VAE keeps; use fewer latent channels, a smaller patch or a wider DiT")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        return cls(**kw)


@dataclass
class StreamConfig:
    chunk_frames: int = 3  # latent frames per chunk: 3 -> 12 video frames, 0.48 s
    student_steps: int = 2
    student_timesteps: tuple[float, ...] = (1000.0, 500.0)  # fixed few-step schedule (shifted sigmas x 1000)
    flow_shift: float = 5.0
    audio_context: int = 2  # video frames of audio before and after a latent frame's own 4

    @property
    def chunk_video_frames(self) -> int:
        return self.chunk_frames * VAE_TEMPORAL

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_video_frames / FPS

    @property
    def lookahead_ms(self) -> float:
        """Audio the generator must hold beyond a chunk's end before it can start it."""
        return 1000.0 * self.audio_context / FPS


@dataclass
class Preset:
    name: str
    dit: DiTConfig
    stream: StreamConfig = field(default_factory=StreamConfig)
    height: int = 512
    width: int = 512
    vae: str = "wan"  # "wan" (diffusers AutoencoderKLWan) or "tiny"
    vae_spatial: int = 8  # pixels per latent pixel, each way (Wan: 8; a TinyVAE can be 4)
    audio_frontend: str = "wav2vec2"  # "wav2vec2" or "logmel"
    text_len: int = 512  # umT5 tokens; tiny uses a single learned-free constant token
    image_len: int = 257  # CLIP tokens for I2V

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_spatial, self.width // self.vae_spatial

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        d = dict(d)
        dit = DiTConfig.from_dict(d.pop("dit"))
        st = d.pop("stream", {})
        if "student_timesteps" in st:
            st["student_timesteps"] = tuple(st["student_timesteps"])
        stream = StreamConfig(**st)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(dit=dit, stream=stream, **{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Preset":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tiny() -> Preset:
    return Preset(
        name="tiny",
        dit=DiTConfig(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=2 * 8 + 4,
            out_channels=8,
            text_dim=32,
            freq_dim=64,
            ffn_dim=512,
            num_layers=6,
            image_dim=None,
            audio_dim=80,
            audio_window=8,
        ),
        height=128,
        width=128,
        vae="tiny",
        audio_frontend="logmel",
        text_len=1,
        image_len=0,
    )


def _wan_audio(name: str, heads: int, ffn_dim: int, layers: int) -> Preset:
    """Wan2.1 geometry (head size 128) with the I2V 36-channel input, CLIP image tokens and an
    audio cross-attention on 768-d wav2vec2 features in every block, at 512x512."""
    return Preset(
        name=name,
        dit=DiTConfig(num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn_dim, num_layers=layers,
                      in_channels=36, out_channels=16, image_dim=1280, audio_dim=768),
        height=512,
        width=512,
    )


def _wan_13b_audio() -> Preset:
    return _wan_audio("wan-1.3b-audio", heads=12, ffn_dim=8960, layers=30)  # Wan2.1 1.3B geometry


def _wan_14b_audio() -> Preset:
    # Wan2.1-I2V-14B plus audio cross-attention in each of its 40 blocks: about 18B.
    return _wan_audio("wan-i2v-14b-audio", heads=40, ffn_dim=13824, layers=40)


PRESETS = {"tiny": _tiny, "wan-1.3b-audio": _wan_13b_audio, "wan-i2v-14b-audio": _wan_14b_audio}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
