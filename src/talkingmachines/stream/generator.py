"""The streaming engine: portrait + audio as it arrives -> video chunks, forever, at flat cost.

Data flows one way: audio -> features -> (DiT, 2 steps per chunk, KV cache) -> latents ->
streaming VAE decoder -> frames. Per session, the sink's keys/values, the text/image
cross-attention keys/values and the reference latent are computed once (`__init__`);
per chunk, only the chunk's own tokens are computed (2 denoising passes + 1 clean pass that
writes its keys/values for the next chunk).

Audio timing: generated video frame g (0-based, after the portrait) shows samples
[640 g, 640 (g+1)); latent frame j (1-based) covers generated frames 4(j-1) .. 4j-1.
A chunk can start once its audio and `lookahead_samples` beyond it have arrived.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, VAE_TEMPORAL, Preset, get_preset
from .. import pipeline
from ..diffusion import flow
from ..model import audio as audio_fe
from ..model.dit import AudioDiT
from ..model.vae import VideoVAE
from .types import Chunk, LatentChunk

log = logging.getLogger(__name__)

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny"


def fit_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect and resize (a portrait given as an array, e.g. from the web page)."""
    from PIL import Image, ImageOps

    img = np.asarray(img, dtype=np.uint8)
    if img.shape[:2] == (height, width):
        return img
    im = ImageOps.fit(Image.fromarray(img[..., :3]), (width, height), method=Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


class AudioBuffer:
    """Samples with an absolute position: old audio is dropped as chunks consume it, so memory
    stays flat however long the call lasts. Thread-safe: a consumer may push audio while the
    DiT thread of a pipelined stream (`stream.disagg`) reads and trims it; without the lock a
    push racing a trim could lose or duplicate samples."""

    def __init__(self, keep_before: int):
        self._lock = threading.RLock()
        self.data = np.zeros(0, np.float32)
        self.start = 0  # absolute sample index of data[0]
        self.keep_before = keep_before  # samples of history kept before the read position
        self.ended = False

    @property
    def end(self) -> int:
        with self._lock:
            return self.start + len(self.data)

    def push(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        with self._lock:
            self.data = np.concatenate([self.data, samples])

    def read(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) in absolute positions; zeros where there is no audio (yet, or any more)."""
        out = np.zeros(b - a, np.float32)
        with self._lock:
            lo, hi = max(a, self.start), min(b, self.end)
            if hi > lo:
                out[lo - a: hi - a] = self.data[lo - self.start: hi - self.start]
        return out

    def drop_before(self, pos: int) -> None:
        with self._lock:
            cut = pos - self.keep_before - self.start
            if cut > 0:
                self.data = self.data[cut:]
                self.start += cut

    def skip_to(self, pos: int) -> None:
        """The consumer went past the end of the audio (it padded with silence): audio that
        arrives from now on belongs at `pos`, not where the old audio ended."""
        with self._lock:
            if self.end < pos:
                self.data = np.zeros(0, np.float32)
                self.start = pos

    def clear_after(self, pos: int) -> int:
        """Barge-in: forget everything from absolute sample `pos` on."""
        with self._lock:
            n = max(0, self.end - pos)
            self.data = self.data[: max(0, pos - self.start)]
            return n


@dataclass
class Avatar:
    """A loaded model: DiT, VAE, audio front end and per-model constants. Share it across streams."""

    preset: Preset
    dit: AudioDiT
    vae: VideoVAE
    frontend: audio_fe.AudioFrontEnd
    device: torch.device
    dtype: torch.dtype
    text: torch.Tensor  # [1, Lt, text_dim] prompt embedding (constant per model)
    random_weights: bool = False
    folder: Path | None = None  # the model folder it was loaded from (None: random weights)

    def default_portrait(self) -> np.ndarray:
        from ..media import load_image

        return load_image(Path(__file__).resolve().parent.parent / "assets" / "portrait.png",
                          (self.preset.height, self.preset.width))

    def new_stream(self, portrait: np.ndarray | None = None, seed: int = 0, steps: int | None = None):
        return StreamingGenerator(self, self.default_portrait() if portrait is None else portrait, seed, steps)


def random_dit(cfg, device, dtype) -> AudioDiT:
    """A DiT with random weights (benchmarks), built on the meta device and filled in place on
    `device` in `dtype`: no fp32 copy ever exists (the 18B preset's would be 77 GiB, on the CPU
    or on the GPU) and nothing is initialised twice. Scaled normal weights (1/sqrt(fan_in)), unit
    norms, zero biases; the same seed gives the same weights on a given device."""
    device = torch.device(device)
    with torch.device("meta"):
        dit = AudioDiT(cfg).to(dtype)
    dit = dit.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, w in dit.named_parameters():
            if "scale_shift_table" in name:
                w.normal_(0.0, w.shape[-1] ** -0.5, generator=g)
            elif w.ndim >= 2 and "pos_embed" not in name:
                w.normal_(0.0, w[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):  # the norms' scales
                w.fill_(1.0)
            else:  # biases, the audio window's position embedding
                w.zero_()
    if next(dit.buffers(), None) is not None:  # to_empty leaves buffers uninitialised; the DiT has none
        raise RuntimeError("random_dit: the DiT has buffers, which this would leave uninitialised")
    return dit


def model_vae(folder: Path, p: Preset, dev):
    """A model folder's VAE (``folder/vae``), which must make the latent grid its preset says."""
    from ..errors import InputError
    from ..model import vae as vae_mod

    vae = vae_mod.load_vae(p.vae, folder / "vae", device=dev)
    if vae.spatial != p.vae_spatial:
        raise InputError(f"{folder}: preset.json says the latents are 1/{p.vae_spatial} of the frame, "
                         f"its VAE makes them 1/{vae.spatial}")
    return vae


def _random_vae(kind: str, dev):
    from ..model import vae as vae_mod

    if kind == "tiny":
        return vae_mod.TinyVAE().to(dev).eval()
    from diffusers import AutoencoderKLWan

    return vae_mod.WanVAE(AutoencoderKLWan().to(dev).eval())


def _random_wav2vec2() -> Path:
    """A randomly initialised wav2vec2-base folder (for speed runs of real presets without weights)."""
    import tempfile

    from transformers import Wav2Vec2Config, Wav2Vec2Model

    d = Path(tempfile.gettempdir()) / "talkingmachines-random-wav2vec2-base"
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(d)
    return d


def load_avatar(model: str | Path | None = None, preset: str = "tiny", device: str = "cpu",
                dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None) -> Avatar:
    """Load a model folder (ours: preset.json, dit/, vae/), the shipped tiny model by default, or
    random weights for `preset` when no trained weights exist (benchmarks; said loudly).
    ``device``: as `devices.resolve_device` reads it (``auto``: CUDA when there is a GPU).
    ``vae_dtype``: the VAE's weights and activations (default fp32). On an H100 the Wan2.1 VAE's
    streaming decode takes 189 ms per chunk in bf16 against 312 ms in fp32 (BENCHMARKS.md)."""
    from ..devices import resolve_device

    dev = torch.device(resolve_device(device))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    folder = Path(model) if model else (SHIPPED_MODEL if preset == "tiny" else None)
    random_weights = folder is None or not (folder / "preset.json").exists()
    if model and random_weights:
        from ..errors import InputError

        raise InputError(f"{model}: not a talkingmachines model folder (no preset.json)")
    if not random_weights:
        p = Preset.load(folder / "preset.json")
        dit = AudioDiT.from_pretrained(folder / "dit", device=dev, dtype=dtype)
        vae = model_vae(folder, p, dev)
        fe_path = folder / "wav2vec2" if p.audio_frontend == "wav2vec2" else None
    else:
        p = get_preset(preset)
        dit = random_dit(p.dit, dev, dtype)
        vae = _random_vae(p.vae, dev)
        fe_path = _random_wav2vec2() if p.audio_frontend == "wav2vec2" else None
    if vae_dtype is not None:
        vae = vae.to(vae_dtype)
    dit.eval().requires_grad_(False)
    # the audio front end runs where the DiT does (wav2vec2 on a 2-core CPU costs ~0.9 s per
    # chunk window, in series with the DiT); it stays fp32, as `plan` counts it
    frontend = audio_fe.build_frontend(p, fe_path).to(dev)
    text = torch.zeros(1, p.text_len, p.dit.text_dim, device=dev, dtype=dtype)
    if not random_weights and (folder / "text_embeds.safetensors").exists():
        from safetensors.torch import load_file

        text = load_file(folder / "text_embeds.safetensors")["text"].to(dev, dtype)
    return Avatar(p, dit, vae, frontend, dev, dtype, text, random_weights, None if random_weights else folder)


class StreamingGenerator:
    """One call's engine (implements `stream.types.AvatarStream`)."""

    fps = FPS
    sample_rate = SAMPLE_RATE

    def __init__(self, avatar: Avatar, portrait: np.ndarray, seed: int = 0, steps: int | None = None):
        a = self.avatar = avatar
        p = a.preset
        self.height, self.width = p.height, p.width
        self.chunk_frames = p.stream.chunk_frames
        self.chunk_video_frames = p.stream.chunk_video_frames
        self.chunk_samples = self.chunk_video_frames * SAMPLES_PER_FRAME
        self.context = p.stream.audio_context
        self.lookahead_samples = self.context * SAMPLES_PER_FRAME + getattr(a.frontend, "lookahead_samples", 0)
        self.sigmas = flow.student_schedule(p.stream, steps).tolist()  # the schedule training used
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.index = 0  # chunks produced
        self.audio = AudioBuffer(keep_before=(self.context + 8) * SAMPLES_PER_FRAME + 16000)
        self.pos = 0  # absolute sample where the next chunk's audio starts
        with torch.inference_mode():
            img = fit_image(portrait, self.height, self.width)
            self.ref = a.vae.encode_image(img).to(a.device, a.dtype)  # [1, C, 1, h, w]
            C, h, w = self.ref.shape[1], self.ref.shape[3], self.ref.shape[4]
            self.latent_shape = (1, C, self.chunk_frames, h, w)
            self.ctx = a.dit.encode_context(a.text, None)
            self.cache = a.dit.new_cache()
            sink = self.dit_input(self.ref, known=True)
            a.dit.prefill_sink(self.cache, sink, self.ctx, self.sink_audio())
            self.decoder = a.vae.stream_decoder()
            self.decoder.decode(self.ref)  # the sink decodes to the portrait frame: primes the causal state

    # ------------------------------------------------------------------ audio in
    def push_audio(self, samples: np.ndarray) -> None:
        self.audio.push(samples)

    def end_audio(self) -> None:
        self.audio.ended = True

    def clear_audio(self) -> int:
        return self.audio.clear_after(self.pos)

    def buffered_samples(self) -> int:
        return max(0, self.audio.end - self.pos)

    def ready(self) -> bool:
        return self.audio.ended or self.audio.end >= self.pos + self.chunk_samples + self.lookahead_samples

    # ------------------------------------------------------------------ the DiT's inputs
    def dit_input(self, x, known: bool):
        """Wan I2V input of frames on their own: [latent | 4 mask channels | reference latent]."""
        return pipeline.dit_input(x, self.ref, "all" if known else "none")

    def sink_audio(self):
        """The sink's audio window: zeros (None for a DiT without audio layers)."""
        d = self.avatar.preset.dit
        if d.audio_dim is None:
            return None
        return torch.zeros(1, 1, d.audio_window, d.audio_dim, device=self.avatar.device, dtype=self.avatar.dtype)

    def audio_windows(self, first_frame: int, n_latent: int) -> torch.Tensor | None:
        """Feature windows [1, n_latent, W, C] for the latents covering generated frames first_frame.."""
        d = self.avatar.preset.dit
        if d.audio_dim is None:
            return None
        fe = self.avatar.frontend

        def features(start, n):  # absolute video frames -> [n, C], from the buffered samples only
            lo, hi = fe.samples_needed(start, n)
            return fe.features_for_frames(self.audio.read(lo, hi), start, n, buffer_offset=lo)

        # once the audio has ended, frames past it get zero features, as offline (training) windows do
        total = -(-self.audio.end // SAMPLES_PER_FRAME) if self.audio.ended else None
        win = audio_fe.windows_for_latents(features, first_frame // VAE_TEMPORAL, n_latent, fe.dim, self.context,
                                           num_frames=total)
        return win.to(self.avatar.device, self.avatar.dtype)[None]

    # ------------------------------------------------------------------ the chunk step
    def new_noise(self) -> torch.Tensor:
        """Fresh noise for the next draw of this stream (one seeded CPU generator per stream)."""
        return torch.randn(self.latent_shape, generator=self.gen).to(self.avatar.device, self.avatar.dtype)

    @torch.inference_mode()
    def denoise(self, au) -> torch.Tensor:
        """The next chunk's latents [1, C, F, h, w]: `flow.denoise_chunk` with the DiT against the
        KV cache (sink + previous chunk), then the clean pass that writes the chunk's keys and
        values as the next chunk's previous chunk. ``au``: the chunk's audio windows."""
        a, dit = self.avatar, self.avatar.dit
        chunk = self.index + 1

        def x0_fn(x, s):
            t = torch.tensor([s * 1000.0], device=a.device)
            v = dit.forward_chunk(self.cache, self.dit_input(x, False), t, self.ctx, au, chunk=chunk)
            return x - s * v

        x, _ = flow.denoise_chunk(x0_fn, self.new_noise(), self.sigmas, self.new_noise)
        dit.forward_chunk(self.cache, self.dit_input(x, True), torch.zeros(1, device=a.device), self.ctx, au,
                          chunk=chunk, write=True)
        return x

    @torch.inference_mode()
    def next_latents(self, wait: bool = False) -> LatentChunk | None:
        """The DiT half of a chunk step: the next chunk's latents, its audio and timings
        (a disaggregated decode stage takes it from here, see `stream.disagg`)."""
        if wait and not self.ready():
            return None
        a = self.avatar
        t0 = time.perf_counter()
        first_frame = self.index * self.chunk_video_frames
        chunk_audio = self.audio.read(self.pos, self.pos + self.chunk_samples)
        au = self.audio_windows(first_frame, self.chunk_frames)
        t1 = time.perf_counter()
        x = self.denoise(au)
        if a.device.type == "cuda":
            torch.cuda.current_stream(a.device).synchronize()  # not device-wide: a decode stream may overlap
        t2 = time.perf_counter()
        self.index += 1
        self.pos += self.chunk_samples
        self.audio.drop_before(self.pos)
        if not self.audio.ended:
            self.audio.skip_to(self.pos)
        speaking = not audio_fe.is_silence(chunk_audio)
        return LatentChunk(self.index - 1, x, chunk_audio, speaking,
                           {"audio_ms": 1e3 * (t1 - t0), "dit_ms": 1e3 * (t2 - t1)})

    def next_chunk(self, wait: bool = False) -> Chunk | None:
        lc = self.next_latents(wait)
        if lc is None:
            return None
        t = time.perf_counter()
        with torch.inference_mode():
            frames = self.decoder.decode(lc.latents)
        return Chunk(lc.index, frames, lc.audio, lc.speaking, {**lc.timings, "vae_ms": 1e3 * (time.perf_counter() - t)})

    def stream(self, audio_iter=None, max_chunks: int | None = None):
        """Yield chunks; with an iterator of sample arrays, pull audio as needed, stop when it ends."""
        while max_chunks is None or self.index < max_chunks:
            while audio_iter is not None and not self.ready():
                try:
                    self.push_audio(next(audio_iter))
                except StopIteration:
                    self.end_audio()
            if self.audio.ended and self.pos >= self.audio.end:
                return
            yield self.next_chunk()
