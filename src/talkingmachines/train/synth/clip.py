"""One clip (`make_clip`): turns of speech and silence, blinks, gaze, idle and speaking head
motion, rendered -> `Clip` (T = 1 + 4k frames, audio T * 640 samples)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, VAE_TEMPORAL
from ...errors import InputError
from .face import FaceParams, FaceState, framed
from .mouth import mouth_drive
from .render import FaceRenderer
from .speech import ESPEAK_VOICES, _cut_quiet, _require_espeak, _utterance, espeak_available


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [T * 640] at 16 kHz
    mouth_open: np.ndarray  # float32 [T]
    mouth_round: np.ndarray  # float32 [T]
    speaking: np.ndarray  # bool [T]
    params: dict = field(default_factory=dict)  # identity + clip metadata (json-able)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def clip_frames_for(seconds: float) -> int:
    """Frame count of 1 + 4k frames closest to `seconds` at 25 fps."""
    k = max(1, int(round((seconds * FPS - 1) / VAE_TEMPORAL)))
    return 1 + VAE_TEMPORAL * k


def _smooth_noise(rng: np.random.Generator, T: int, sigma: float) -> np.ndarray:
    n = rng.normal(0, 1, T + int(6 * sigma))
    k = np.exp(-0.5 * (np.arange(-3 * sigma, 3 * sigma + 1) / sigma) ** 2)
    s = np.convolve(n, k / k.sum(), mode="same")[: T]
    return (s / (s.std() + 1e-8)).astype(np.float32)



# per close-up version: head-motion amplitude (v1's varies with speech; max opening: `face._OPEN_SCALE`)
_HEAD_AMP = {2: 1.6, 3: 0.55, 4: 0.55, 5: 0.55, 6: 0.0, 7: 0.0, 8: 0.0}
# versions whose eyes hold one fixation for the whole clip (`gaze_track`)
STEADY_GAZE = (7,)


def moves_head(version: int) -> bool:
    """Whether data `version`'s head sways, nods and tilts (every version but 6, 7 and 8)."""
    return version == 1 or _HEAD_AMP[version] > 0


def gaze_track(rng: np.random.Generator, T: int, version: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame gaze x, y: fixations of 0.5-2.5 s joined by saccades. v7: the first fixation held for
    the whole clip (the same draws, so the rest of the clip is v6's): where the eyes look next is
    not in the audio, and a small DiT that cannot guess it draws the average of the places the pupils
    might be, a grey smudge."""
    gx = np.zeros(T, np.float32)
    gy = np.zeros(T, np.float32)
    t = 0
    while t < T:
        d = int(rng.uniform(0.5, 2.5) * FPS)
        gx[t: t + d] = rng.normal(0, 0.35)
        gy[t: t + d] = rng.normal(0, 0.3)
        t += d
    if version in STEADY_GAZE:
        gx[:], gy[:] = gx[0], gy[0]
    return gx, gy


def head_motion(rng: np.random.Generator, speaking: np.ndarray, mouth_open: np.ndarray, version: int = 1):
    """Per-frame head offsets dx, dy (image fractions), tilt (degrees) and brow raise: slow
    smooth noise. v1: larger while speaking, with nods and brow raises that follow the mouth.
    v2: the same whatever is said (the amplitude of v1's average), so that loudness drives the
    mouth and nothing else. v3: as v2 at a third of the amplitude, so that the mouth, not the
    head, holds most of what changes from frame to frame (the teacher learns what explains most
    of its loss first; in v2 the opening explained 4 % of the latents' change over time). v6:
    still (amplitude 0; the same random draws, so the rest of the clip is v4's): a head that
    moves a few pixels from its reference frame makes a small DiT blend the reference's eyes at
    both places (ghosts at mid noise that sampling keeps as grey smudges)."""
    T = len(speaking)
    spk_s = np.convolve(speaking.astype(np.float32), np.ones(13) / 13, mode="same")
    amp = 1.0 + 1.2 * spk_s if version == 1 else np.full(T, _HEAD_AMP[version], np.float32)
    head_amp = float(rng.uniform(0.5, 1.5))
    dx = 0.010 * head_amp * _smooth_noise(rng, T, 15) * amp
    dy = 0.007 * head_amp * _smooth_noise(rng, T, 12) * amp
    tilt = 2.0 * head_amp * _smooth_noise(rng, T, 20) * amp
    emph = np.convolve(mouth_open, np.ones(7) / 7, mode="same")
    brow_speech = 0.6 * np.convolve(mouth_open, np.ones(9) / 9, mode="same") ** 2 * rng.uniform(0, 1.5)
    brow_idle = 0.25 * np.clip(_smooth_noise(rng, T, 25), 0, None) * rng.uniform(0, 1)
    if version == 1:
        return dx, dy + 0.008 * emph, tilt, np.clip(brow_speech + brow_idle, 0, 1)
    return dx, dy, tilt, np.clip(brow_idle, 0, 1)


def make_clip(seed: int, seconds: float = 6.0, size: int = 128, speech: str = "auto",
              babble_frac: float = 0.15, listen_frac: float | None = None,
              face: FaceParams | None = None, version: int = 1) -> Clip:
    """One clip: a random identity speaking in turns with listening pauses.

    speech: 'espeak' (raises InputError when espeak-ng is missing), 'babble' (numpy
    synthesiser), or 'auto' (espeak-ng when installed, with `babble_frac` of the clips
    babble for variety; babble only when it is missing). T = 1 + 4k frames.
    version: 1, the original data; 2, a close-up face (`framed`) whose head motion and brows
    do not follow the speech, so that loudness explains the mouth and nothing else (in v1,
    head motion was 2.2x larger while speaking and nods and brows followed loudness: a model
    could lower its loss by moving the head instead of opening the mouth); 3-8: `framed`,
    `head_motion` and `gaze_track` say what each changes."""
    rng = np.random.default_rng([int(seed), 15485863])
    T = clip_frames_for(seconds)
    N = T * SAMPLES_PER_FRAME
    if speech == "auto":
        source = "espeak" if espeak_available() and rng.random() >= babble_frac else "babble"
    elif speech in ("espeak", "babble"):
        source = speech
        if source == "espeak":
            _require_espeak()
    else:
        raise InputError(f"speech must be 'auto', 'espeak' or 'babble', got {speech!r}")
    params = framed(face if face is not None else FaceParams.sample(seed), version)

    # --- speech turns and listening
    voice = str(rng.choice(ESPEAK_VOICES))
    rate = int(rng.uniform(130, 210))
    pitch = int(rng.uniform(20, 80))
    f0 = float(rng.uniform(90, 240))
    if listen_frac is None:
        u = rng.random()
        listen_frac = 1.0 if u < 0.05 else (0.0 if u < 0.1 else float(rng.uniform(0.25, 0.55)))
    speech_track = np.zeros(N, np.float32)
    turn = np.zeros(N, bool)
    texts = []
    pos = 0
    speaking_turn = bool(rng.random() < 0.5) if 0 < listen_frac < 1 else listen_frac < 1
    last_len = int(2.0 * SAMPLE_RATE)
    while pos < N:
        if listen_frac >= 1:
            break
        if speaking_turn:
            x, text = _utterance(rng, source, voice, rate, pitch, f0)
            if 0 < listen_frac < 1:  # leave room for listening: cut long utterances in a quiet spot
                x = _cut_quiet(x, int(max(0.6 * SAMPLE_RATE, (1 - listen_frac) * N * rng.uniform(0.45, 0.8))))
            n = min(len(x), N - pos)
            speech_track[pos: pos + n] = x[:n]
            turn[pos: pos + n] = True
            if text:
                texts.append(text)
            pos += n
            last_len = max(n, 1)
            # within a turn, a short breath between utterances sometimes
            if rng.random() < 0.3 and listen_frac > 0:
                pos += int(rng.uniform(0.15, 0.4) * SAMPLE_RATE)
                continue
        else:
            if listen_frac <= 0:
                pos += int(rng.uniform(0.1, 0.3) * SAMPLE_RATE)
            else:
                d = last_len * listen_frac / (1 - listen_frac) * rng.uniform(0.6, 1.4)
                pos += int(np.clip(d, 0.4 * SAMPLE_RATE, 4.0 * SAMPLE_RATE))
        speaking_turn = not speaking_turn
    # a speech frame is one whose 640 samples are mostly inside an utterance
    speaking = turn.reshape(T, SAMPLES_PER_FRAME).mean(1) > 0.3

    # room noise (the model should learn to ignore it)
    noise_amp = float(rng.uniform(0.0, 0.004))
    audio = speech_track + rng.normal(0, 1, N).astype(np.float32) * noise_amp
    if rng.random() < 0.3:  # a hum now and then
        t = np.arange(N) / SAMPLE_RATE
        audio += (rng.uniform(0.0, 0.003) * np.sin(2 * np.pi * rng.choice([50, 60]) * t)).astype(np.float32)
    audio = np.clip(audio, -1, 1).astype(np.float32)

    mouth_open, mouth_round = mouth_drive(speech_track, speaking)

    # --- blinks
    blink = np.zeros(T, np.float32)
    t = int(rng.uniform(0.3, 3.0) * FPS)
    while t < T:
        dur = int(rng.integers(4, 7))
        prof = np.sin(np.linspace(0, np.pi, dur + 2)[1:-1]) ** 0.6
        prof = prof / prof.max()
        blink[t: t + dur] = np.maximum(blink[t: t + dur], prof[: max(0, min(dur, T - t))])
        t += dur + int(rng.uniform(2.0, 5.0) * FPS)

    dx, dy, tilt, brow = head_motion(rng, speaking, mouth_open, version)
    gx, gy = gaze_track(rng, T, version)

    # --- render
    renderer = FaceRenderer(params, size)
    frames = np.empty((T, size, size, 3), np.uint8)
    for i in range(T):
        st = FaceState(mouth_open=float(mouth_open[i]), mouth_round=float(mouth_round[i]), blink=float(blink[i]),
                       dx=float(dx[i]), dy=float(dy[i]), tilt=float(tilt[i]), brow=float(brow[i]),
                       gaze_x=float(np.clip(gx[i], -1, 1)), gaze_y=float(np.clip(gy[i], -1, 1)))
        frames[i] = renderer.render(st)

    meta = dict(
        seed=int(seed), frames=T, fps=FPS, sample_rate=SAMPLE_RATE, size=size,
        speech_source=source, voice=voice if source == "espeak" else None,
        rate=rate if source == "espeak" else None, pitch=pitch if source == "espeak" else None,
        f0=f0 if source == "babble" else None, texts=texts,
        listen_frac_target=float(listen_frac), listen_frac=float(1 - speaking.mean()),
        face=params.to_dict(), data_version=int(version),
    )
    return Clip(frames=frames, audio=audio, mouth_open=mouth_open, mouth_round=mouth_round,
                speaking=speaking, params=meta)
