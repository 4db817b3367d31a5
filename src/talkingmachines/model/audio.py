"""Audio front ends: per-video-frame audio features, frame-aligned and streaming-exact.

Time grid: video frame ``n`` spans samples ``[640 n, 640 (n + 1))`` (16 kHz, 25 fps). Every
feature is defined on *absolute* sample positions, with zeros outside the signal, so a
generator that holds only a window of recent audio gets exactly the features an offline pass
over the whole file gives (`LogMelFrontEnd`; wav2vec2 is an approximation, see its docstring).

Latent frame ``j`` of the generated video covers video frames ``4j .. 4j+3`` and attends to an
audio window of video frames ``4j - context .. 4j + 3 + context`` (zero-padded outside the
signal): ``4 + 2 * context`` = 8 rows for the default ``StreamConfig.audio_context = 2``
(`DiTConfig.audio_window`).

Streaming look-ahead (audio that must have arrived past the end of the last frame of a chunk
before the chunk can start):

* ``audio_context`` frames x 40 ms = 80 ms for the window's future context, plus
* the front end's own reach past a frame's end: for the log-mel front end the STFT half-window
  (200 samples = 12.5 ms) less the half hop its centred frames sit in (80 samples), i.e.
  120 samples = 7.5 ms, so **87.5 ms** in all for the tiny preset; for wav2vec2, its
  configurable future context (200 ms by default), so 280 ms in all.

`lookahead_ms(stream_config, frontend)` computes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from talkingmachines.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, VAE_TEMPORAL
from talkingmachines.errors import InputError

__all__ = [
    "AudioFrontEnd",
    "LogMelFrontEnd",
    "Wav2Vec2FrontEnd",
    "AudioFeatureStream",
    "audio_windows",
    "windows_for_latents",
    "build_frontend",
    "lookahead_ms",
    "num_video_frames",
    "num_latent_frames",
    "rms_db",
    "is_silence",
    "frame_rms",
    "frame_rms_db",
]

HOP = 160  # 10 ms
WIN = 400  # 25 ms
HOPS_PER_FRAME = SAMPLES_PER_FRAME // HOP  # 4
# log10 mel power is mapped by (x - LOG_MEAN) / LOG_SCALE; with LOG_FLOOR digital silence -> -2,
# speech at -30..-10 dBFS lands roughly in [-2, 2] (peaks of loud speech a bit above).
LOG_FLOOR = 1e-5
LOG_MEAN = -2.0
LOG_SCALE = 1.5


def num_video_frames(num_samples: int) -> int:
    """Video frames for `num_samples` of 16 kHz audio (a partial last frame counts)."""
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


def num_latent_frames(num_frames: int) -> int:
    """Latent frames covering `num_frames` video frames (4 per latent, a partial last counts)."""
    return -(-int(num_frames) // VAE_TEMPORAL)


def _as_1d_tensor(audio, device=None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim != 1:
        raise ValueError(f"audio must be mono 1-D samples, got shape {tuple(t.shape)}")
    return t


def _slice_abs(buffer: torch.Tensor, buffer_offset: int, lo: int, hi: int) -> torch.Tensor:
    """Samples [lo, hi) in absolute positions, zero where the buffer has nothing."""
    out = buffer.new_zeros(hi - lo)
    b_lo, b_hi = max(lo, buffer_offset), min(hi, buffer_offset + buffer.shape[0])
    if b_hi > b_lo:
        out[b_lo - lo : b_hi - lo] = buffer[b_lo - buffer_offset : b_hi - buffer_offset]
    return out


class AudioFrontEnd(nn.Module):
    """Common interface. Subclasses set `dim`, `lookahead_samples`, `lookback_samples`, `exact`.

    * `features(audio) -> [T, dim]`, T = ceil(len / 640): offline, over a whole signal.
    * `features_for_frames(buffer, start_frame, n, buffer_offset=0) -> [n, dim]`: features of
      absolute video frames start_frame .. start_frame+n-1 from a buffer whose first sample
      is absolute sample `buffer_offset`. Needs samples `samples_needed(start_frame, n)`;
      anything missing from the buffer is treated as zero (correct before the signal start
      and after its end; *callers must wait for the look-ahead* while the stream is live).
    """

    dim: int
    lookahead_samples: int  # samples past a frame's end its feature needs
    lookback_samples: int  # samples before a frame's start its feature uses
    exact: bool  # streaming == offline exactly

    def samples_needed(self, start_frame: int, n: int) -> tuple[int, int]:
        lo = start_frame * SAMPLES_PER_FRAME - self.lookback_samples
        hi = (start_frame + n) * SAMPLES_PER_FRAME + self.lookahead_samples
        return lo, hi

    def features(self, audio) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features_for_frames(self, buffer, start_frame: int, n: int, buffer_offset: int = 0) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def forward(self, audio) -> torch.Tensor:
        return self.features(audio)


class LogMelFrontEnd(AudioFrontEnd):
    """Log-mel features per video frame, [T, n_mels].

    STFT: Hann window 400 (25 ms), hop 160 (10 ms), n_fft 400, power spectrum -> Slaney mel
    filters 0-8 kHz (`transformers.audio_utils.mel_filter_bank`, as Whisper) -> log10(mel +
    1e-5). Hop ``k`` is centred at sample ``160 k + 80`` (the middle of its 10 ms slot), so
    its window spans ``[160 k - 120, 160 k + 280)`` and video frame ``n`` owns hops
    ``4n .. 4n+3`` exactly (centres 640n + 80, 240, 400, 560). The 4 log-mel vectors are
    averaged and normalised by fixed constants ((x + 2) / 1.5): digital silence -> -2, speech
    at ordinary levels roughly in [-2, 2]. Being local and fixed, streaming equals offline exactly; a frame
    needs 120 samples (7.5 ms) before its start and after its end.
    """

    exact = True

    def __init__(self, n_mels: int = 80, block_frames: int = 1500):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_mels = self.dim = int(n_mels)
        self.block_frames = int(block_frames)  # offline: frames per block (bounds memory)
        fb = mel_filter_bank(
            num_frequency_bins=WIN // 2 + 1,
            num_mel_filters=self.n_mels,
            min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_filters", torch.tensor(fb, dtype=torch.float32), persistent=False)  # [201, M]
        self.register_buffer("window", torch.hann_window(WIN, periodic=True), persistent=False)
        self.lookback_samples = WIN // 2 - HOP // 2  # 120
        self.lookahead_samples = WIN // 2 - HOP // 2  # 120

    def _from_segment(self, seg: torch.Tensor, n: int) -> torch.Tensor:
        """seg: samples [640 a - 120, 640 (a + n) + 120) -> [n, M]."""
        win = seg.unfold(0, WIN, HOP)  # [4n, 400]
        spec = torch.fft.rfft(win * self.window, n=WIN)
        power = spec.real.square() + spec.imag.square()  # [4n, 201]
        mel = power @ self.mel_filters  # [4n, M]
        logmel = torch.log10(mel + LOG_FLOOR)
        feats = logmel.reshape(n, HOPS_PER_FRAME, self.n_mels).mean(1)
        return (feats - LOG_MEAN) / LOG_SCALE

    @torch.no_grad()
    def features_for_frames(self, buffer, start_frame: int, n: int, buffer_offset: int = 0) -> torch.Tensor:
        buf = _as_1d_tensor(buffer, self.window.device)
        if n <= 0:
            return buf.new_zeros(0, self.n_mels)
        out = []
        for a in range(start_frame, start_frame + n, self.block_frames):
            k = min(self.block_frames, start_frame + n - a)
            lo, hi = self.samples_needed(a, k)
            out.append(self._from_segment(_slice_abs(buf, buffer_offset, lo, hi), k))
        return torch.cat(out) if len(out) > 1 else out[0]

    def features(self, audio) -> torch.Tensor:
        a = _as_1d_tensor(audio, self.window.device)
        return self.features_for_frames(a, 0, num_video_frames(a.shape[0]), 0)


class Wav2Vec2FrontEnd(AudioFrontEnd):
    """wav2vec2 hidden states resampled (linearly) from 50 Hz to 25 fps, [T, hidden_size].

    Loads `transformers.Wav2Vec2Model.from_pretrained(path, local_files_only=True)`; the input
    is normalised to zero mean / unit variance over the segment the model sees (as
    `Wav2Vec2FeatureExtractor(do_normalize=True)`; skipped if the checkpoint's
    preprocessor_config.json says `do_normalize: false`). `layer="last"` takes
    `last_hidden_state`, `"mean"` averages the transformer layers' outputs, an int picks
    `hidden_states[i]`.

    Hidden state ``i`` covers samples ``[320 i, 320 i + 400)`` (stride/receptive field are
    read from the config); video frame ``n`` takes the linear interpolation at its centre
    (position ``2 n + 0.375``), on absolute time, so offline and streaming use one grid.

    **Approximation**: wav2vec2 is not causal (group norm over time in the conv stack, a
    ~1.3 s positional conv and full self-attention), so the streaming path
    `features_for_frames` runs the model on a sliding window: `past_context_s` (2 s) before
    the first requested frame up to `lookahead_s` (0.2 s) after the last one, and its output
    differs slightly from a whole-utterance pass. Offline `features` runs the whole signal in
    one pass up to `offline_max_s` (20 s) and in sliding windows (with the same past context
    and `past_context_s` of future) beyond that.
    """

    exact = False

    def __init__(
        self,
        path,
        layer: str | int = "last",
        past_context_s: float = 2.0,
        lookahead_s: float = 0.2,
        offline_max_s: float = 20.0,
        offline_block_s: float = 10.0,
    ):
        super().__init__()
        p = Path(path)
        if not p.exists():
            raise InputError(f"wav2vec2 model directory not found: {p}")
        if not p.is_dir() or not (p / "config.json").exists():
            raise InputError(f"wav2vec2 model path {p} is not a directory with a config.json (save_pretrained layout)")
        from transformers import Wav2Vec2Model

        try:
            self.model = Wav2Vec2Model.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # corrupt / incomplete checkpoint
            msg = " ".join(str(e).split())[:200]
            raise InputError(f"cannot load wav2vec2 model from {p}: {msg}") from None
        self.model.eval().requires_grad_(False)
        self.do_normalize = True
        if (p / "preprocessor_config.json").exists():
            try:
                from transformers import Wav2Vec2FeatureExtractor

                fe = Wav2Vec2FeatureExtractor.from_pretrained(str(p), local_files_only=True)
                self.do_normalize = bool(getattr(fe, "do_normalize", True))
            except Exception:
                pass
        if layer not in ("last", "mean") and not isinstance(layer, int):
            raise ValueError(f"layer must be 'last', 'mean' or an int, got {layer!r}")
        self.layer = layer
        cfg = self.model.config
        self.dim = int(cfg.hidden_size)
        rf, jump = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            rf += (k - 1) * jump
            jump *= s
        self.receptive_field, self.stride = rf, jump  # 400, 320 for wav2vec2-base
        self.past_context = int(round(past_context_s * SAMPLE_RATE))
        self.lookahead_samples = int(round(lookahead_s * SAMPLE_RATE))
        self.lookback_samples = self.past_context
        self.offline_max = int(offline_max_s * SAMPLE_RATE)
        self.offline_block_frames = max(1, int(offline_block_s * FPS))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _hidden(self, seg: torch.Tensor) -> torch.Tensor:
        """[L] samples -> [K, dim] hidden states (hidden i covers [stride i, stride i + rf))."""
        if seg.shape[0] < self.receptive_field:
            seg = torch.nn.functional.pad(seg, (0, self.receptive_field - seg.shape[0]))
        x = seg.double()
        if self.do_normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        x = x.to(dtype=next(self.model.parameters()).dtype)[None]
        if self.layer == "last":
            h = self.model(x).last_hidden_state
        else:
            hs = self.model(x, output_hidden_states=True).hidden_states
            h = torch.stack(hs[1:]).mean(0) if self.layer == "mean" else hs[self.layer]
        return h[0].float()

    def _interp(self, h: torch.Tensor, seg_start: int, start_frame: int, n: int) -> torch.Tensor:
        f = torch.arange(start_frame, start_frame + n, device=h.device, dtype=torch.float64)
        centre = f * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME / 2  # frame centre (between samples)
        pos = (centre - self.receptive_field / 2 - seg_start) / self.stride
        pos = pos.clamp(0, h.shape[0] - 1)
        i0 = pos.floor().long()
        i1 = (i0 + 1).clamp(max=h.shape[0] - 1)
        w = (pos - i0).float()[:, None]
        return h[i0] * (1 - w) + h[i1] * w

    @torch.no_grad()
    def _window(self, buf, buffer_offset, start_frame, n, past, future) -> torch.Tensor:
        lo = start_frame * SAMPLES_PER_FRAME - past
        hi = (start_frame + n) * SAMPLES_PER_FRAME + future
        # the model sees real samples only: no zeros before the signal / past the buffer
        lo = max(lo, 0, buffer_offset)
        hi = min(hi, buffer_offset + buf.shape[0])
        if hi <= lo:
            return buf.new_zeros(n, self.dim)
        h = self._hidden(buf[lo - buffer_offset : hi - buffer_offset])
        return self._interp(h, lo, start_frame, n)

    @torch.no_grad()
    def features_for_frames(self, buffer, start_frame: int, n: int, buffer_offset: int = 0) -> torch.Tensor:
        buf = _as_1d_tensor(buffer, self.device)
        if n <= 0:
            return buf.new_zeros(0, self.dim)
        return self._window(buf, buffer_offset, start_frame, n, self.past_context, self.lookahead_samples)

    @torch.no_grad()
    def features(self, audio) -> torch.Tensor:
        a = _as_1d_tensor(audio, self.device)
        T = num_video_frames(a.shape[0])
        if T == 0:
            return a.new_zeros(0, self.dim)
        if a.shape[0] <= self.offline_max:
            return self._interp(self._hidden(a), 0, 0, T)
        out = []
        for s in range(0, T, self.offline_block_frames):
            k = min(self.offline_block_frames, T - s)
            out.append(self._window(a, 0, s, k, self.past_context, self.past_context))
        return torch.cat(out)


# ----------------------------------------------------------------------------- windows

FeatureFn = Callable[[int, int], torch.Tensor]


def windows_for_latents(
    feature_fn: FeatureFn,
    start_latent: int,
    n_latent: int,
    dim: int,
    context: int = 2,
    num_frames: int | None = None,
) -> torch.Tensor:
    """Audio windows [n_latent, 4 + 2 context, dim] for latents start_latent .. +n_latent-1.

    `feature_fn(first_frame, n)` returns features [n, dim] of absolute video frames
    first_frame .. first_frame+n-1; it is only asked for frames >= 0 and, when `num_frames`
    (the total, once the audio has ended) is given, < num_frames. Frames outside are zero.
    `audio_windows` is this with `feature_fn` slicing a full feature array, so a streaming
    caller with an exact front end gets the offline windows bit for bit.
    """
    size = VAE_TEMPORAL + 2 * context
    lo = VAE_TEMPORAL * start_latent - context
    hi = VAE_TEMPORAL * (start_latent + n_latent) + context
    c_lo = max(lo, 0)
    c_hi = hi if num_frames is None else min(hi, num_frames)
    buf = None
    if c_hi > c_lo:
        f = feature_fn(c_lo, c_hi - c_lo)
        if f.shape != (c_hi - c_lo, dim):
            raise ValueError(f"feature_fn returned {tuple(f.shape)}, expected {(c_hi - c_lo, dim)}")
        buf = f.new_zeros(hi - lo, dim)
        buf[c_lo - lo : c_hi - lo] = f
    else:
        buf = torch.zeros(hi - lo, dim)
    if n_latent <= 0:
        return buf.new_zeros(0, size, dim)
    return buf.unfold(0, size, VAE_TEMPORAL).permute(0, 2, 1).contiguous()  # [n, size, dim]


def audio_windows(features: torch.Tensor, context: int = 2, n_latent: int | None = None) -> torch.Tensor:
    """features [T, C] (per video frame) -> [n_latent, 4 + 2 context, C].

    Latent j sees video frames 4j - context .. 4j + 3 + context, zero outside [0, T).
    `n_latent` defaults to ceil(T / 4).
    """
    features = torch.as_tensor(features)
    T, C = features.shape
    n = num_latent_frames(T) if n_latent is None else int(n_latent)
    return windows_for_latents(lambda s, k: features[s : s + k], 0, n, C, context, num_frames=T)


class AudioFeatureStream:
    """Audio buffer + front end for a streaming generator; windows identical to offline.

    ```
    s = AudioFeatureStream(frontend, context=2)
    s.push(samples)                     # as audio arrives (float32 mono 16 kHz)
    if s.latents_ready() >= j + 3:      # enough audio (incl. look-ahead) for latents j..j+2
        w = s.windows(j, 3)             # [3, 8, C] == audio_windows(frontend.features(all))[j:j+3]
    s.end()                             # end of the utterance: the tail becomes ready (zero-padded)
    ```

    Samples older than the oldest still-needed ones are dropped after each `windows` call
    (windows are expected in increasing latent order). `reset()` starts a new utterance.
    """

    def __init__(self, frontend: AudioFrontEnd, context: int = 2):
        self.frontend = frontend
        self.context = int(context)
        self.reset()

    def reset(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._buf = np.zeros(0, np.float32)
        self.offset = 0  # absolute index of the buffer's first sample
        self.total = 0  # samples pushed since reset
        self.ended = False

    def push(self, samples) -> None:
        if self.ended:
            raise RuntimeError("push() after end(); call reset() for a new utterance")
        a = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples)
        if a.dtype == np.int16:
            a = a.astype(np.float32) / 32768.0
        a = a.astype(np.float32, copy=False).reshape(-1)
        if a.size:
            self._chunks.append(a)
            self.total += a.size

    def end(self) -> None:
        self.ended = True

    @property
    def buffer(self) -> np.ndarray:
        if self._chunks:
            self._buf = np.concatenate([self._buf, *self._chunks])
            self._chunks = []
        return self._buf

    @property
    def num_frames(self) -> int | None:
        """Total video frames once `end()` was called, else None."""
        return num_video_frames(self.total) if self.ended else None

    def frames_ready(self) -> int:
        """Leading video frames whose features are final."""
        if self.ended:
            return num_video_frames(self.total)
        return max(0, (self.total - self.frontend.lookahead_samples) // SAMPLES_PER_FRAME)

    def latents_ready(self) -> int:
        """Leading latent frames whose audio windows are final."""
        if self.ended:
            return num_latent_frames(num_video_frames(self.total))
        return max(0, (self.frames_ready() - self.context) // VAE_TEMPORAL)

    def windows(self, start_latent: int, n_latent: int, drop: bool = True) -> torch.Tensor:
        if start_latent + n_latent > self.latents_ready() and not self.ended:
            raise RuntimeError(
                f"audio for latents {start_latent}..{start_latent + n_latent - 1} has not arrived yet "
                f"({self.latents_ready()} ready)"
            )
        buf = self.buffer
        first_frame = max(0, VAE_TEMPORAL * start_latent - self.context)
        need_lo = self.frontend.samples_needed(first_frame, 1)[0]
        if max(need_lo, 0) < self.offset:
            raise RuntimeError(f"samples before {self.offset} were dropped; windows must be asked in order")
        fe = self.frontend
        w = windows_for_latents(
            lambda s, k: fe.features_for_frames(buf, s, k, buffer_offset=self.offset),
            start_latent,
            n_latent,
            fe.dim,
            self.context,
            num_frames=self.num_frames,
        )
        if drop:
            nxt = max(0, VAE_TEMPORAL * (start_latent + n_latent) - self.context)
            keep_from = max(0, fe.samples_needed(nxt, 1)[0])
            if keep_from > self.offset:
                cut = min(keep_from - self.offset, buf.shape[0])
                self._buf = buf[cut:].copy()
                self.offset += cut
        return w


# ----------------------------------------------------------------------------- helpers


def build_frontend(preset, path=None, **kwargs) -> AudioFrontEnd:
    """The front end `preset.audio_frontend` names: "logmel" or "wav2vec2" (needs `path`)."""
    kind = getattr(preset, "audio_frontend", preset)
    audio_dim = getattr(getattr(preset, "dit", None), "audio_dim", None)
    if kind == "logmel":
        return LogMelFrontEnd(n_mels=audio_dim or 80, **kwargs)
    if kind == "wav2vec2":
        if path is None:
            raise InputError("this preset needs a wav2vec2 model: pass the directory of a saved Wav2Vec2Model")
        fe = Wav2Vec2FrontEnd(path, **kwargs)
        if audio_dim is not None and fe.dim != audio_dim:
            raise InputError(
                f"wav2vec2 model at {path} has hidden size {fe.dim}, but the preset expects audio_dim={audio_dim}"
            )
        return fe
    raise ValueError(f"unknown audio front end {kind!r} (expected 'logmel' or 'wav2vec2')")


def lookahead_ms(stream_config, frontend: AudioFrontEnd | None = None) -> float:
    """Audio needed past a chunk's last frame before it can be generated, in ms:
    audio_context x 40 ms + the front end's look-ahead (log-mel: 7.5 ms, the default)."""
    la = frontend.lookahead_samples if frontend is not None else WIN // 2 - HOP // 2
    return 1000.0 * stream_config.audio_context / FPS + 1000.0 * la / SAMPLE_RATE


def rms_db(audio) -> float:
    """RMS level in dBFS (full scale = 1.0); -inf-safe (floor at -200 dB)."""
    a = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return -200.0
    return float(20.0 * np.log10(max(math.sqrt(float(np.mean(a * a))), 1e-10)))


def is_silence(audio, threshold_db: float = -45.0) -> bool:
    """True when the RMS level is below `threshold_db` dBFS (listening rather than speaking)."""
    return rms_db(audio) < threshold_db


def frame_rms(audio, n_frames: int | None = None) -> np.ndarray:
    """Per-video-frame RMS (640 samples each), linear, float64 [n_frames]; by default
    ``ceil(len / 640)`` frames. Audio past ``n_frames`` is ignored, missing audio is silence."""
    a = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float64).reshape(-1)
    T = num_video_frames(a.size) if n_frames is None else int(n_frames)
    need = T * SAMPLES_PER_FRAME
    a = np.pad(a[:need], (0, max(0, need - a.size))).reshape(T, SAMPLES_PER_FRAME)
    return np.sqrt((a * a).mean(1))


def frame_rms_db(audio, n_frames: int | None = None) -> np.ndarray:
    """`frame_rms` in dBFS (floor -200 dB)."""
    return 20.0 * np.log10(np.maximum(frame_rms(audio, n_frames), 1e-10))
