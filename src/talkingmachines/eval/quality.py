"""Quality metrics for talking-avatar videos (lip-sync, listening stillness, drift): the API.

Everything is plain numpy (torch only to run a model); nothing is downloaded. What each module
holds:

- `eval.mouth`: the mouth-opening signal from pixels (ROI from the renderer's geometry for our
  synthetic faces, else a centred-portrait prior refined by motion);
- `eval.metrics`: speech frames from the audio, lip-sync (lag and correlation), listening
  stillness, drift, per-clip and pooled figures;
- `eval.clips`: the clips an evaluation runs on (data set, `synth.Clip`s, dicts), the long
  stream's audio;
- `eval.runners`: models run on them (`evaluate_model`: student, teacher, VAE round trip, long
  stream);
- `eval.report`: the targets checked and the JSON;
- here: `evaluate_video(video, audio)`, every metric of one video (with the face judge's when
  it is installed), `frames_for_eval` and `judge_landmarks` (what it reads and what the judge
  saw, for a caller that also draws them: `eval --grid`), and the names above for
  ``from talkingmachines.eval import quality as q``.

The metrics' definitions and their limits are in `eval.mouth` and `eval.metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import FPS, SAMPLES_PER_FRAME
from .clips import long_stream_audio
from .metrics import (MAX_LAG, PSNR_CAP, DriftAccumulator, drift, evaluate_signals, lipsync, speech_envelope,
                      speech_frames, stillness)
from .mouth import Roi, auto_mouth_roi, mouth_roi_from_face, mouth_signal
from .report import to_json
from .runners import evaluate_model, generate_video, vae_roundtrip

__all__ = [
    "Roi",
    "mouth_roi_from_face",
    "auto_mouth_roi",
    "mouth_signal",
    "speech_envelope",
    "speech_frames",
    "lipsync",
    "stillness",
    "drift",
    "DriftAccumulator",
    "evaluate_video",
    "evaluate_signals",
    "evaluate_model",
    "generate_video",
    "vae_roundtrip",
    "long_stream_audio",
    "to_json",
    "PSNR_CAP",
]


def frames_for_eval(video, audio=None, fps: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """What `evaluate_video` measures: uint8 frames [T, H, W, 3] on the 25 fps grid and the audio.

    video: a path (decoded once with `media.read_video`; its audio track is used unless `audio`
    is given) or uint8 frames at ``fps`` (default 25). audio: float32 mono 16 kHz samples or a path."""
    from ..media import load_audio, read_video

    if isinstance(video, (str, Path)):
        frames, track, vfps = read_video(video)
        fps = fps or vfps
        if audio is None:
            audio = track
    else:
        frames = np.asarray(video)
    fps = float(fps or FPS)
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio)
    if abs(fps - FPS) > 0.01:
        # metrics are defined on the 25 fps grid: resample frames by nearest index
        T = int(round(len(frames) * FPS / fps))
        frames = frames[np.minimum((np.arange(T) * fps / FPS).round().astype(int), len(frames) - 1)]
    return frames, audio


def judge_landmarks(frames) -> list | None:
    """The face judge's landmarks of every frame (`FaceJudge.video_landmarks`), or None when its
    optional extra is not installed."""
    from ..errors import InputError
    from . import face_judge

    try:
        return face_judge.FaceJudge.load().video_landmarks(frames)
    except InputError:
        return None


def evaluate_video(video, audio=None, roi: Roi | None = None, face=None, fps: float | None = None,
                   drift_window: float = 10.0, max_lag: int = MAX_LAG, landmarks: list | None = None) -> dict:
    """All metrics of one video.

    video, audio, fps: as `frames_for_eval` takes them. landmarks: the face judge's per-frame
    results on these frames (`judge_landmarks`) when the caller already has them.
    Returns {frames, seconds, fps, roi, lag, confidence, corr_at_0, stillness_ratio,
    stillness{...}, drift{...}, mouth (list)}; the lip-sync keys are None without audio."""
    frames, audio = frames_for_eval(video, audio, fps)
    fps = float(FPS)
    speech = audio if audio is not None and len(audio) >= SAMPLES_PER_FRAME else None  # at least a frame of it
    mouth, info = mouth_signal(frames, roi=roi, face=face, return_info=True, audio=speech)
    out = {"frames": int(len(frames)), "seconds": len(frames) / fps, "fps": fps, "roi": info["roi"],
           "head_shift_px": info["head_shift_px"]}
    if speech is not None:
        out.update(evaluate_signals(mouth, speech, max_lag))
    else:
        out.update({"lag": None, "confidence": None, "corr_at_0": None, "stillness_ratio": None,
                    "stillness": None, "note": "no audio: lip-sync and stillness need the speech track"})
    out["drift"] = drift(frames, fps, drift_window)
    out["mouth"] = [round(float(v), 5) for v in mouth]
    out["face"] = _judge(frames, speech, landmarks)
    return out


def _judge(frames, audio, landmarks: list | None = None) -> dict:
    """The face judge's figures, or {"unavailable": why} when its optional extra is missing."""
    from ..errors import InputError
    from . import face_judge

    if landmarks is not None:
        return face_judge.face_metrics(frames, audio, landmarks=landmarks)
    try:
        judge = face_judge.FaceJudge.load()
    except InputError as e:
        return {"unavailable": str(e)}
    return face_judge.face_metrics(frames, audio, judge)
